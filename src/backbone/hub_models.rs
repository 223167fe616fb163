//! Backbones from candle-transformers whose weights come from the hub, wrapped so that each
//! returns its embedding: the pooled feature before the classifier.

use candle_core::{IndexOp, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::{clip, dinov2, vit};

/// ViT-B/16 (`google/vit-base-patch16-224` names): the layer-normed CLS token.
#[derive(Debug, Clone)]
pub struct VitEmbedder {
    embeddings: vit::Embeddings,
    encoder: vit::Encoder,
    layernorm: LayerNorm,
}

impl VitEmbedder {
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let cfg = vit::Config::vit_base_patch16_224();
        let vb = vb.pp("vit");
        Ok(Self {
            embeddings: vit::Embeddings::new(&cfg, false, vb.pp("embeddings"))?,
            encoder: vit::Encoder::new(&cfg, vb.pp("encoder"))?,
            layernorm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("layernorm"),
            )?,
        })
    }

    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let tokens = self
            .encoder
            .forward(&self.embeddings.forward(x, None, false)?)?;
        tokens.i((.., 0, ..))?.apply(&self.layernorm)
    }
}

/// CLIP ViT-B/32 image tower (`openai/clip-vit-base-patch32` names): the projected image
/// embedding (512-d), as `get_image_features` computes it. The text tower is not loaded.
#[derive(Debug, Clone)]
pub struct ClipEmbedder {
    vision: clip::vision_model::ClipVisionTransformer,
    projection: Linear,
}

impl ClipEmbedder {
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let cfg = clip::vision_model::ClipVisionConfig::vit_base_patch32();
        let vision = clip::vision_model::ClipVisionTransformer::new(vb.pp("vision_model"), &cfg)?;
        let projection = candle_nn::linear_no_bias(
            cfg.embed_dim,
            cfg.projection_dim,
            vb.pp("visual_projection"),
        )?;
        Ok(Self { vision, projection })
    }

    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        x.apply(&self.vision)?.apply(&self.projection)
    }
}

/// DINOv2 ViT-S/14 (`lmz/candle-dinov2` names): the mean of the final-normed patch tokens.
/// candle-transformers 0.11's implementation fails on batches larger than one, so images
/// run one at a time.
#[derive(Debug)]
pub struct Dinov2Embedder {
    model: dinov2::DinoVisionTransformer,
}

/// Index of DINOv2-S's last block.
const DINOV2_SMALL_LAST_BLOCK: usize = 11;

impl Dinov2Embedder {
    pub fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            model: dinov2::vit_small(vb)?,
        })
    }

    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let rows = (0..x.dim(0)?)
            .map(|i| {
                let one = x.narrow(0, i, 1)?;
                // [1 layer, 1 image, patches, dim] → mean over patches → [1, dim]
                let patches = self.model.get_intermediate_layers(
                    &one,
                    &[DINOV2_SMALL_LAST_BLOCK],
                    false,
                    false,
                    true,
                )?;
                patches.squeeze(0)?.mean(D::Minus2)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
}
