//! The hub's vision transformers — ViT-B/16 (`google/vit-base-patch16-224` names), the CLIP
//! ViT-B/32 image tower (`openai/clip-vit-base-patch32`) and DINOv2 ViT-S/14
//! (`lmz/candle-dinov2`) — as one pre-norm encoder written here, so that `--finetune full` can
//! train them: candle-nn's fused layer-norm and last-dimension softmax have no backward pass, so
//! once a network is made trainable it switches to ours, which have one
//! ([`crate::ops::fused_grad`]: fused on the CPU, the same formulas in candle's ops elsewhere).
//! Inference keeps candle-nn's kernels. The class token and position embeddings stay as
//! pretrained (DINOv2's are resampled to the input's grid); everything else trains.
//! Same arithmetic as candle-transformers' implementations (tested against them).

use candle_core::{DType, IndexOp, Result, Tensor, Var};
use candle_nn::VarBuilder;

use super::layers::Tunable;
use crate::ops::bf16_gemm::Precision;
use crate::ops::{bf16_linear, fused_grad};

/// Which of the three checkpoints, and so which names, activation and pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// ViT-B/16: the layer-normed class token.
    Vit,
    /// CLIP ViT-B/32: the post-normed class token through the visual projection (512-d).
    Clip,
    /// DINOv2 ViT-S/14: the mean of the final-normed patch tokens.
    Dinov2,
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Exact (erf) GELU: ViT.
    GeluErf,
    /// tanh-approximated GELU: DINOv2 as candle-transformers runs it.
    GeluTanh,
    /// x·σ(1.702x): CLIP.
    QuickGelu,
}

impl Act {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::GeluErf => fused_grad::gelu_erf(x),
            Act::GeluTanh => x.gelu(),
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// Shape of one flavour.
struct Dims {
    dim: usize,
    depth: usize,
    heads: usize,
    mlp: usize,
    patch: usize,
    /// Patches per side of the position embeddings.
    grid: usize,
    eps: f64,
    act: Act,
}

impl Flavour {
    fn dims(self) -> Dims {
        match self {
            Flavour::Vit => Dims {
                dim: 768,
                depth: 12,
                heads: 12,
                mlp: 3072,
                patch: 16,
                grid: 14,
                eps: 1e-12,
                act: Act::GeluErf,
            },
            Flavour::Clip => Dims {
                dim: 768,
                depth: 12,
                heads: 12,
                mlp: 3072,
                patch: 32,
                grid: 7,
                eps: 1e-5,
                act: Act::QuickGelu,
            },
            Flavour::Dinov2 => Dims {
                dim: 384,
                depth: 12,
                heads: 6,
                mlp: 1536,
                patch: 14,
                grid: 37,
                eps: 1e-5,
                act: Act::GeluTanh,
            },
        }
    }
}

/// A tensor with its checkpoint name, trainable or not.
#[derive(Debug, Clone)]
struct Param {
    name: String,
    value: Tensor,
}

impl Param {
    fn get<S: Into<candle_core::Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Self> {
        Ok(Self {
            value: vb.get(shape, name)?.to_dtype(DType::F32)?.detach(),
            name: match vb.prefix().as_str() {
                "" => name.to_owned(),
                prefix => format!("{prefix}.{name}"),
            },
        })
    }

    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        let var = Var::from_tensor(&self.value)?;
        self.value = var.as_tensor().clone();
        vars.push(var);
        Ok(())
    }

    fn export(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((self.name.clone(), self.value.detach()));
    }
}

/// `x·Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: Param::get(&vb, (outputs, inputs), "weight")?,
            bias: bias.then(|| Param::get(&vb, outputs, "bias")).transpose()?,
        })
    }

    fn params(&mut self) -> impl Iterator<Item = &mut Param> {
        std::iter::once(&mut self.weight).chain(self.bias.as_mut())
    }

    fn forward(&self, x: &Tensor, precision: Precision) -> Result<Tensor> {
        let y = bf16_linear::linear(x, &self.weight.value, precision)?;
        match &self.bias {
            Some(b) => fused_grad::bias_add(&y, &b.value),
            None => Ok(y),
        }
    }
}

/// Layer-norm over the last dimension.
#[derive(Debug, Clone)]
struct Norm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::get(&vb, dim, "weight")?,
            bias: Param::get(&vb, dim, "bias")?,
            eps,
        })
    }

    fn params(&mut self) -> impl Iterator<Item = &mut Param> {
        [&mut self.weight, &mut self.bias].into_iter()
    }

    fn forward(&self, x: &Tensor, trainable: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight.value, &self.bias.value);
        if !trainable {
            return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, self.eps as f32);
        }
        fused_grad::layer_norm(x, w, b, self.eps)
    }
}

/// Query, key and value projections: one fused matrix (DINOv2) or three (ViT, CLIP).
#[derive(Debug, Clone)]
enum Qkv {
    Fused(Linear),
    Separate([Linear; 3]),
}

/// One pre-norm transformer block, with DINOv2's layer scales.
#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    qkv: Qkv,
    out: Linear,
    scale1: Option<Param>,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    scale2: Option<Param>,
}

impl Block {
    fn load(vb: VarBuilder, flavour: Flavour, d: &Dims) -> Result<Self> {
        let lin = |vb: VarBuilder, i, o| Linear::load(vb, i, o, true);
        let dim = d.dim;
        Ok(match flavour {
            Flavour::Vit => {
                let att = vb.pp("attention");
                let qkv =
                    ["query", "key", "value"].map(|n| lin(att.pp("attention").pp(n), dim, dim));
                let [q, k, v] = qkv;
                Self {
                    norm1: Norm::load(vb.pp("layernorm_before"), dim, d.eps)?,
                    qkv: Qkv::Separate([q?, k?, v?]),
                    out: lin(att.pp("output").pp("dense"), dim, dim)?,
                    scale1: None,
                    norm2: Norm::load(vb.pp("layernorm_after"), dim, d.eps)?,
                    fc1: lin(vb.pp("intermediate").pp("dense"), dim, d.mlp)?,
                    fc2: lin(vb.pp("output").pp("dense"), d.mlp, dim)?,
                    scale2: None,
                }
            }
            Flavour::Clip => {
                let att = vb.pp("self_attn");
                let [q, k, v] = ["q_proj", "k_proj", "v_proj"].map(|n| lin(att.pp(n), dim, dim));
                Self {
                    norm1: Norm::load(vb.pp("layer_norm1"), dim, d.eps)?,
                    qkv: Qkv::Separate([q?, k?, v?]),
                    out: lin(att.pp("out_proj"), dim, dim)?,
                    scale1: None,
                    norm2: Norm::load(vb.pp("layer_norm2"), dim, d.eps)?,
                    fc1: lin(vb.pp("mlp").pp("fc1"), dim, d.mlp)?,
                    fc2: lin(vb.pp("mlp").pp("fc2"), d.mlp, dim)?,
                    scale2: None,
                }
            }
            Flavour::Dinov2 => Self {
                norm1: Norm::load(vb.pp("norm1"), dim, d.eps)?,
                qkv: Qkv::Fused(lin(vb.pp("attn").pp("qkv"), dim, 3 * dim)?),
                out: lin(vb.pp("attn").pp("proj"), dim, dim)?,
                scale1: Some(Param::get(&vb.pp("ls1"), dim, "gamma")?),
                norm2: Norm::load(vb.pp("norm2"), dim, d.eps)?,
                fc1: lin(vb.pp("mlp").pp("fc1"), dim, d.mlp)?,
                fc2: lin(vb.pp("mlp").pp("fc2"), d.mlp, dim)?,
                scale2: Some(Param::get(&vb.pp("ls2"), dim, "gamma")?),
            },
        })
    }

    fn params(&mut self) -> Vec<&mut Param> {
        let mut out: Vec<&mut Param> = Vec::new();
        out.extend(self.norm1.params());
        match &mut self.qkv {
            Qkv::Fused(l) => out.extend(l.params()),
            Qkv::Separate(ls) => ls.iter_mut().for_each(|l| out.extend(l.params())),
        }
        out.extend(self.out.params());
        out.extend(self.scale1.as_mut());
        out.extend(self.norm2.params());
        out.extend(self.fc1.params());
        out.extend(self.fc2.params());
        out.extend(self.scale2.as_mut());
        out
    }

    /// Multi-head self-attention of tokens `[B, N, C]` (already normed).
    fn attention(&self, x: &Tensor, heads: usize, mode: Mode) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(l) => {
                let qkv = l
                    .forward(x, mode.precision)?
                    .reshape((b, n, 3, heads, hd))?;
                let part = |i: usize| -> Result<Tensor> {
                    qkv.i((.., .., i))?.transpose(1, 2)?.contiguous()
                };
                (part(0)?, part(1)?, part(2)?)
            }
            Qkv::Separate([q, k, v]) => (
                split(q.forward(x, mode.precision)?)?,
                split(k.forward(x, mode.precision)?)?,
                split(v.forward(x, mode.precision)?)?,
            ),
        };
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let probs = if mode.trainable {
            fused_grad::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let mixed = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out.forward(&mixed, mode.precision)
    }

    fn forward(&self, x: &Tensor, d: &Dims, mode: Mode) -> Result<Tensor> {
        let scaled = |y: Tensor, s: &Option<Param>| match s {
            Some(s) => y.broadcast_mul(&s.value),
            None => Ok(y),
        };
        let a = self.attention(&self.norm1.forward(x, mode.trainable)?, d.heads, mode)?;
        let x = (scaled(a, &self.scale1)? + x)?;
        let h = d.act.apply(
            &self
                .fc1
                .forward(&self.norm2.forward(&x, mode.trainable)?, mode.precision)?,
        )?;
        let m = self.fc2.forward(&h, mode.precision)?;
        scaled(m, &self.scale2)? + x
    }
}

/// One of the hub's vision transformers, embedding images `[N, 3, H, W]` into `[N, D]`.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    flavour: Flavour,
    patch_weight: Param,
    patch_bias: Option<Param>,
    /// `[1, 1, C]`, frozen.
    cls: Param,
    /// `[1, grid² + 1, C]`, frozen.
    pos: Param,
    pre_norm: Option<Norm>,
    blocks: Vec<Block>,
    final_norm: Norm,
    projection: Option<Linear>,
    trainable: bool,
    /// The arithmetic of the linear layers' products.
    precision: Precision,
}

/// How a forward pass runs: through the ops with a backward pass (trained), and the linear
/// layers' arithmetic.
#[derive(Debug, Clone, Copy)]
struct Mode {
    trainable: bool,
    precision: Precision,
}

impl VisionTransformer {
    /// Loads `flavour`'s network from a checkpoint with its own tensor names (the
    /// classifier heads, where present, are not read).
    pub fn load(flavour: Flavour, vb: VarBuilder) -> Result<Self> {
        let d = flavour.dims();
        let (dim, p, positions) = (d.dim, d.patch, d.grid * d.grid + 1);
        let blocks = |vb: VarBuilder| -> Result<Vec<Block>> {
            (0..d.depth)
                .map(|i| Block::load(vb.pp(i), flavour, &d))
                .collect()
        };
        let reshaped = |p: Param, shape: (usize, usize, usize)| -> Result<Param> {
            Ok(Param {
                value: p.value.reshape(shape)?,
                ..p
            })
        };
        Ok(match flavour {
            Flavour::Vit => {
                let vb = vb.pp("vit");
                let emb = vb.pp("embeddings");
                let proj = emb.pp("patch_embeddings").pp("projection");
                Self {
                    flavour,
                    patch_weight: Param::get(&proj, (dim, 3, p, p), "weight")?,
                    patch_bias: Some(Param::get(&proj, dim, "bias")?),
                    cls: Param::get(&emb, (1, 1, dim), "cls_token")?,
                    pos: Param::get(&emb, (1, positions, dim), "position_embeddings")?,
                    pre_norm: None,
                    blocks: blocks(vb.pp("encoder").pp("layer"))?,
                    final_norm: Norm::load(vb.pp("layernorm"), dim, d.eps)?,
                    projection: None,
                    trainable: false,
                    precision: Precision::F32,
                }
            }
            Flavour::Clip => {
                let projection = Linear::load(vb.pp("visual_projection"), dim, 512, false)?;
                let vb = vb.pp("vision_model");
                let emb = vb.pp("embeddings");
                let cls = Param::get(&emb, dim, "class_embedding")?;
                let pos = Param::get(&emb.pp("position_embedding"), (positions, dim), "weight")?;
                Self {
                    flavour,
                    patch_weight: Param::get(&emb.pp("patch_embedding"), (dim, 3, p, p), "weight")?,
                    patch_bias: None,
                    cls: reshaped(cls, (1, 1, dim))?,
                    pos: reshaped(pos, (1, positions, dim))?,
                    pre_norm: Some(Norm::load(vb.pp("pre_layrnorm"), dim, d.eps)?),
                    blocks: blocks(vb.pp("encoder").pp("layers"))?,
                    final_norm: Norm::load(vb.pp("post_layernorm"), dim, d.eps)?,
                    projection: Some(projection),
                    trainable: false,
                    precision: Precision::F32,
                }
            }
            Flavour::Dinov2 => {
                let proj = vb.pp("patch_embed").pp("proj");
                Self {
                    flavour,
                    patch_weight: Param::get(&proj, (dim, 3, p, p), "weight")?,
                    patch_bias: Some(Param::get(&proj, dim, "bias")?),
                    cls: Param::get(&vb, (1, 1, dim), "cls_token")?,
                    pos: Param::get(&vb, (1, positions, dim), "pos_embed")?,
                    pre_norm: None,
                    blocks: blocks(vb.pp("blocks"))?,
                    final_norm: Norm::load(vb.pp("norm"), dim, d.eps)?,
                    projection: None,
                    trainable: false,
                    precision: Precision::F32,
                }
            }
        })
    }

    /// The position embeddings for a `gh × gw` patch grid: as loaded when it matches, else
    /// (DINOv2) the patch part resampled by nearest neighbour, as candle-transformers does.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let d = self.flavour.dims();
        if gh == d.grid && gw == d.grid {
            return Ok(self.pos.value.clone());
        }
        if self.flavour != Flavour::Dinov2 {
            candle_core::bail!(
                "{:?} takes {}×{} images (a {}×{} patch grid), got a {gh}×{gw} grid",
                self.flavour,
                d.grid * d.patch,
                d.grid * d.patch,
                d.grid,
                d.grid
            );
        }
        let pos = &self.pos.value;
        let cls = pos.i((.., ..1))?;
        let patches = pos
            .i((.., 1..))?
            .reshape((1, d.grid, d.grid, d.dim))?
            .permute((0, 3, 1, 2))?
            .upsample_nearest2d(gh, gw)?
            .permute((0, 2, 3, 1))?
            .reshape((1, gh * gw, d.dim))?;
        Tensor::cat(&[&cls, &patches], 1)
    }

    /// The patch embedding's weight (its device is the network's).
    pub fn patch_weight(&self) -> &Tensor {
        &self.patch_weight.value
    }

    /// Runs the linear layers' products — nearly all of the network's multiply-adds — in
    /// `precision` ([`Precision::Bf16`]: bf16 operands summed in f32, forward and backward,
    /// [`bf16_linear`]); the attention's own products, the patch embedding and the norms stay
    /// f32. bf16 needs the weights on a CUDA GPU, or on the CPU with AVX512-BF16.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        crate::ops::bf16_gemm::check_on(precision, self.patch_weight.value.device())?;
        self.precision = precision;
        Ok(())
    }

    /// Embeddings `[N, D]` of preprocessed images `[N, 3, H, W]`.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.flavour.dims();
        let (n, _c, h, w) = x.dims4()?;
        if h % d.patch != 0 || w % d.patch != 0 {
            candle_core::bail!(
                "image {h}×{w} is not a multiple of the {0}×{0} patch",
                d.patch
            );
        }
        let mut patches = x.conv2d(&self.patch_weight.value, 0, d.patch, 1, 1)?;
        if let Some(b) = &self.patch_bias {
            patches = patches.broadcast_add(&b.value.reshape((d.dim, 1, 1))?)?;
        }
        let (gh, gw) = (h / d.patch, w / d.patch);
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls.value.broadcast_as((n, 1, d.dim))?;
        let mut tokens =
            Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions(gh, gw)?)?;
        if let Some(norm) = &self.pre_norm {
            tokens = norm.forward(&tokens, self.trainable)?;
        }
        let mode = Mode {
            trainable: self.trainable,
            precision: self.precision,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, &d, mode)?;
        }
        match self.flavour {
            Flavour::Vit => self.final_norm.forward(&tokens.i((.., 0))?, self.trainable),
            Flavour::Clip => {
                let pooled = self
                    .final_norm
                    .forward(&tokens.i((.., 0))?, self.trainable)?;
                match &self.projection {
                    Some(p) => p.forward(&pooled, self.precision),
                    None => Ok(pooled),
                }
            }
            Flavour::Dinov2 => self
                .final_norm
                .forward(&tokens, self.trainable)?
                .i((.., 1..))?
                .mean(1),
        }
    }

    /// Every trained parameter, in a fixed order.
    fn trained(&mut self) -> Vec<&mut Param> {
        let mut out: Vec<&mut Param> = vec![&mut self.patch_weight];
        out.extend(self.patch_bias.as_mut());
        out.extend(self.pre_norm.iter_mut().flat_map(|n| n.params()));
        for block in &mut self.blocks {
            out.extend(block.params());
        }
        out.extend(self.final_norm.params());
        out.extend(self.projection.iter_mut().flat_map(|p| p.params()));
        out
    }
}

impl VisionTransformer {
    /// Trainable variables per block, in the order of [`Tunable::make_trainable`]: the patch
    /// embedding (with CLIP's pre-norm), then each encoder layer; the final norm and
    /// projection after them are no block (`--freeze-blocks` never freezes them).
    pub fn block_var_counts(&self) -> Vec<usize> {
        let mut copy = self.clone();
        let embedding = 1
            + usize::from(copy.patch_bias.is_some())
            + copy
                .pre_norm
                .iter_mut()
                .map(|n| n.params().count())
                .sum::<usize>();
        std::iter::once(embedding)
            .chain(copy.blocks.iter_mut().map(|b| b.params().len()))
            .collect()
    }
}

impl Tunable for VisionTransformer {
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        self.trainable = true;
        self.trained()
            .into_iter()
            .try_for_each(|p| p.make_trainable(vars))
    }

    /// The trained parameters and the frozen embeddings, in the checkpoint's names and
    /// shapes (CLIP's class and position embeddings back to their own).
    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let mut copy = self.clone();
        copy.trained().into_iter().for_each(|p| p.export(out));
        let dim = self.flavour.dims().dim;
        if self.flavour == Flavour::Clip {
            out.push((self.cls.name.clone(), self.cls.value.reshape(dim)?));
            let positions = self.pos.value.dim(1)?;
            out.push((
                self.pos.name.clone(),
                self.pos.value.reshape((positions, dim))?,
            ));
        } else {
            self.cls.export(out);
            self.pos.export(out);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, D};
    use candle_nn::VarMap;
    use candle_transformers::models::{clip, dinov2, vit};

    /// Sets every tensor of `vm` to uniform noise: scales of norms around 1, the rest small.
    fn randomise(vm: &VarMap, seed: u64) -> Result<()> {
        let mut rng = crate::rng::Rng::new(seed);
        for (name, var) in vm.data().lock().expect("varmap lock").iter() {
            let t = var.as_tensor();
            let norm_scale = t.rank() == 1 && (name.contains("norm") || name.contains("gamma"));
            let (lo, hi) = if norm_scale && name.ends_with("weight") {
                (0.5, 1.5)
            } else {
                (-0.05, 0.05)
            };
            let values: Vec<f32> = (0..t.elem_count())
                .map(|_| (lo + (hi - lo) * rng.unit_f64()) as f32)
                .collect();
            var.set(&Tensor::from_vec(values, t.shape(), t.device())?)?;
        }
        Ok(())
    }

    fn images(n: usize, size: usize, seed: u64) -> Result<Tensor> {
        let mut rng = crate::rng::Rng::new(seed);
        let pixels: Vec<f32> = (0..n * 3 * size * size)
            .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
            .collect();
        Tensor::from_vec(pixels, (n, 3, size, size), &Device::Cpu)
    }

    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// candle-transformers' network of `flavour` over random weights in a fresh VarMap, and
    /// its embedding as the backbone computed it before this module.
    fn reference(flavour: Flavour, vm: &VarMap, x: &Tensor) -> Result<Tensor> {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        match flavour {
            Flavour::Vit => {
                let cfg = vit::Config::vit_base_patch16_224();
                let vb = vb.pp("vit");
                let emb = vit::Embeddings::new(&cfg, false, vb.pp("embeddings"))?;
                let enc = vit::Encoder::new(&cfg, vb.pp("encoder"))?;
                let ln =
                    candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
                randomise(vm, 1)?;
                let tokens = enc.forward(&emb.forward(x, None, false)?)?;
                tokens.i((.., 0, ..))?.apply(&ln)
            }
            Flavour::Clip => {
                let cfg = clip::vision_model::ClipVisionConfig::vit_base_patch32();
                // Made first: candle-transformers draws a class embedding of its own when the
                // checkpoint has none.
                let emb = vb.pp("vision_model").pp("embeddings");
                emb.get_with_hints(cfg.embed_dim, "class_embedding", candle_nn::Init::Const(0.))?;
                let tower =
                    clip::vision_model::ClipVisionTransformer::new(vb.pp("vision_model"), &cfg)?;
                let proj = candle_nn::linear_no_bias(
                    cfg.embed_dim,
                    cfg.projection_dim,
                    vb.pp("visual_projection"),
                )?;
                randomise(vm, 2)?;
                x.apply(&tower)?.apply(&proj)
            }
            Flavour::Dinov2 => {
                let model = dinov2::vit_small(vb)?;
                randomise(vm, 3)?;
                let rows = (0..x.dim(0)?)
                    .map(|i| {
                        let one = x.narrow(0, i, 1)?;
                        let patches =
                            model.get_intermediate_layers(&one, &[11], false, false, true)?;
                        patches.squeeze(0)?.mean(D::Minus2)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }

    #[test]
    fn bf16_linear_layers_stay_within_rounding_forward_and_backward() -> Result<()> {
        if !crate::ops::bf16_gemm::available() {
            return Ok(());
        }
        // DINOv2-S at 56×56, random weights, two images, trained form.
        let vm = VarMap::new();
        let x = images(2, 56, 9)?;
        reference(Flavour::Dinov2, &vm, &x)?;
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut net = VisionTransformer::load(Flavour::Dinov2, vb)?;
        let mut vars = Vec::new();
        net.make_trainable(&mut vars)?;
        let run = |net: &VisionTransformer| -> Result<(Tensor, Vec<Tensor>)> {
            let y = net.embed(&x)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let g = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned().expect("a gradient"))
                .collect();
            Ok((y, g))
        };
        let (y32, g32) = run(&net)?;
        net.set_precision(Precision::Bf16)?;
        let (y16, g16) = run(&net)?;
        // Relative L2 distance: bf16 operands (8 significant bits) through 12 blocks; measured
        // 2.3e-4 for the embedding and 4e-3 for the worst gradient.
        let l2 = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            Ok((d / b.sqr()?.sum_all()?.to_scalar::<f32>()?.max(1e-30)).sqrt())
        };
        let err = l2(&y16, &y32)?;
        assert!(err > 1e-6 && err < 5e-3, "bf16 embedding {err} from f32");
        let mut worst = 0f32;
        for (a, b) in g16.iter().zip(&g32) {
            worst = worst.max(l2(a, b)?);
        }
        eprintln!("bf16 DINOv2-S: embedding {err:.2e}, worst gradient {worst:.2e} from f32");
        assert!(worst < 0.03, "a bf16 gradient {worst} from f32's");
        // Back to f32: the f32 bits again.
        net.set_precision(Precision::F32)?;
        let (again, _) = run(&net)?;
        assert_eq!(rel(&again, &y32)?, 0.0);
        Ok(())
    }

    #[test]
    fn each_flavour_matches_candle_transformers_then_trains_every_weight() -> Result<()> {
        // DINOv2 at 56×56 resamples its 37×37 position grid to 4×4; two images per batch
        // (candle-transformers' own DINOv2 runs them one at a time).
        for (flavour, size, width) in [
            (Flavour::Dinov2, 56, 384),
            (Flavour::Clip, 224, 512),
            (Flavour::Vit, 224, 768),
        ] {
            let vm = VarMap::new();
            let x = images(2, size, 9)?;
            let want = reference(flavour, &vm, &x)?;
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let mut ours = VisionTransformer::load(flavour, vb)?;
            let fused = ours.embed(&x)?;
            assert_eq!(fused.dims(), &[2, width], "{flavour:?}");
            let err = rel(&fused, &want)?;
            assert!(err < 1e-4, "{flavour:?}: {err} from candle-transformers");

            // Trainable: the differentiable formulas give the same embedding, and every
            // trained tensor gets a gradient.
            let mut vars = Vec::new();
            ours.make_trainable(&mut vars)?;
            let x1 = x.narrow(0, 0, 1)?;
            let composed = ours.embed(&x1)?;
            let err = rel(&composed, &fused.narrow(0, 0, 1)?)?;
            assert!(err < 1e-4, "{flavour:?}: trainable form differs by {err}");
            let grads = composed.sqr()?.sum_all()?.backward()?;
            for (i, v) in vars.iter().enumerate() {
                let g = grads.get(v.as_tensor()).expect("a gradient per variable");
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{flavour:?}: variable {i} gradient {norm}"
                );
            }

            // The export loads back into the same network.
            let mut out = Vec::new();
            ours.export(&mut out)?;
            let tensors = out.into_iter().collect();
            let again = VisionTransformer::load(
                flavour,
                VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            )?;
            let err = rel(&again.embed(&x1)?, &composed)?;
            assert!(err < 1e-5, "{flavour:?}: export round trip {err}");
        }
        Ok(())
    }

    #[test]
    fn trainable_layer_norm_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let _ = vb.get_with_hints(5, "n.weight", candle_nn::Init::Const(1.0))?;
        let _ = vb.get_with_hints(5, "n.bias", candle_nn::Init::Const(0.0))?;
        randomise(&vm, 4)?;
        let norm = Norm::load(vb.pp("n"), 5, 1e-5)?;
        let x0: Vec<f64> = vec![0.3, -1.2, 2.0, 0.7, -0.4, 1.1, 0.0, -2.2, 0.9, 0.5];
        let weights = Tensor::new(&[[1f64, -2., 0.5, 3., 1.5], [0.2, 1., -1., 2., -0.5]], &dev)?;
        let loss = |x: &Tensor| -> Result<Tensor> {
            norm.forward(&x.to_dtype(DType::F32)?, true)?
                .to_dtype(DType::F64)?
                .mul(&weights)?
                .sum_all()
        };
        let var =
            Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 5), &dev)?.to_dtype(DType::F32)?)?;
        let grads = norm
            .forward(var.as_tensor(), true)?
            .mul(&weights.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("input gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let h = 1e-3;
        for i in 0..x0.len() {
            let at = |d: f64| -> Result<f64> {
                let mut x = x0.clone();
                x[i] += d;
                loss(&Tensor::from_vec(x, (2, 5), &dev)?)?.to_scalar::<f64>()
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            assert!(
                (numeric - g[i] as f64).abs() < 2e-2 * numeric.abs().max(1.0),
                "x[{i}]: {numeric} vs {}",
                g[i]
            );
        }
        Ok(())
    }
}
