//! Building blocks of the convolutional backbones written here: a convolution with its
//! batch-norm folded in, in three flavours — dense, depthwise, pointwise — and the
//! [`Tunable`] interface that fine-tuning uses.

use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use crate::ops::{bias_act, depthwise_conv2d, DepthwiseParams};

/// Below this many pixels per map, a 1×1 convolution runs as one matrix product over the
/// whole batch (per-image products are too thin for the GEMM kernels).
const SMALL_MAP: usize = 100;

/// How a [`ConvBn`] convolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// A full convolution (groups = 1).
    Dense,
    /// One filter per channel (our direct op).
    Depthwise,
    /// A 1×1 convolution, computed as a batched matrix product.
    Pointwise,
}

/// Spatial padding (top, bottom, left, right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same amount on every side (PyTorch style).
    Symmetric(usize),
    /// TensorFlow "same": output = ceil(input / stride), the extra pixel on the bottom/right.
    TfSame,
}

impl Padding {
    /// (top, bottom, left, right) for an `h × w` input.
    pub(crate) fn resolve(
        self,
        h: usize,
        w: usize,
        kernel: usize,
        stride: usize,
    ) -> (usize, usize, usize, usize) {
        match self {
            Padding::Symmetric(p) => (p, p, p, p),
            Padding::TfSame => {
                let total = |n: usize| (n.div_ceil(stride) - 1) * stride + kernel;
                let th = total(h).saturating_sub(h);
                let tw = total(w).saturating_sub(w);
                (th / 2, th - th / 2, tw / 2, tw - tw / 2)
            }
        }
    }
}

/// A network whose parameters can be fine-tuned and saved back in checkpoint layout.
pub trait Tunable {
    /// Turns every parameter into a trainable variable and appends it to `vars`.
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()>;
    /// The parameters under their checkpoint names, loadable by the same network's `load`.
    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()>;
}

/// Conv → batch-norm (→ ReLU6), with the batch-norm folded into the convolution's weight and
/// bias when loaded: `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`. Fine-tuning trains `w'` and
/// `b'`, i.e. the batch-norm statistics stay frozen (its affine part is trained).
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// Checkpoint prefixes of the convolution and the batch-norm.
    conv_name: String,
    bn_name: String,
    bn_eps: f64,
    pub(crate) kind: ConvKind,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: Padding,
    pub(crate) relu6: bool,
}

/// Where a [`ConvBn`]'s tensors live in a checkpoint.
pub struct ConvBnNames<'a> {
    pub conv: VarBuilder<'a>,
    pub bn: VarBuilder<'a>,
}

/// Shape and behaviour of a [`ConvBn`].
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
    pub kind: ConvKind,
    pub relu6: bool,
    pub bn_eps: f64,
}

impl ConvBn {
    /// Loads the convolution weight (no bias) and batch-norm statistics, checking shapes.
    pub fn load(spec: ConvSpec, names: ConvBnNames) -> Result<Self> {
        let in_per_group = match spec.kind {
            ConvKind::Depthwise => 1,
            _ => spec.in_channels,
        };
        let weight = names
            .conv
            .get(
                (spec.out_channels, in_per_group, spec.kernel, spec.kernel),
                "weight",
            )?
            .to_dtype(DType::F32)?;
        let bn = |name: &str| names.bn.get(spec.out_channels, name)?.to_dtype(DType::F32);
        let (gamma, beta, mean, var) = (
            bn("weight")?,
            bn("bias")?,
            bn("running_mean")?,
            bn("running_var")?,
        );
        let scale = gamma.div(&(var + spec.bn_eps)?.sqrt()?)?;
        let weight = weight.broadcast_mul(&scale.reshape((spec.out_channels, 1, 1, 1))?)?;
        let bias = (beta - mean.mul(&scale)?)?;
        let weight = match spec.kind {
            ConvKind::Pointwise => weight.reshape((spec.out_channels, spec.in_channels))?,
            _ => weight,
        };
        Ok(Self {
            weight,
            bias,
            conv_name: names.conv.prefix(),
            bn_name: names.bn.prefix(),
            bn_eps: spec.bn_eps,
            kind: spec.kind,
            kernel: spec.kernel,
            stride: spec.stride,
            padding: spec.padding,
            relu6: spec.relu6,
        })
    }
}

impl Tunable for ConvBn {
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        for t in [&mut self.weight, &mut self.bias] {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            vars.push(var);
        }
        Ok(())
    }

    /// The folded weight as the convolution and an identity batch-norm (γ = √(1+ε), β = b',
    /// μ = 0, σ² = 1), so that loading folds it back to exactly `w'` and `b'`.
    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let c = self.bias.dim(0)?;
        let weight = match self.kind {
            ConvKind::Pointwise => {
                let (cout, cin) = self.weight.dims2()?;
                self.weight.reshape((cout, cin, 1, 1))?
            }
            _ => self.weight.clone(),
        };
        let ones = Tensor::ones(c, DType::F32, self.bias.device())?;
        let key = |prefix: &str, name: &str| format!("{prefix}.{name}");
        out.push((key(&self.conv_name, "weight"), weight.detach()));
        out.push((key(&self.bn_name, "weight"), (&ones + self.bn_eps)?.sqrt()?));
        out.push((key(&self.bn_name, "bias"), self.bias.detach()));
        out.push((key(&self.bn_name, "running_mean"), ones.zeros_like()?));
        out.push((key(&self.bn_name, "running_var"), ones));
        Ok(())
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _c, h, w) = x.dims4()?;
        let y = match self.kind {
            ConvKind::Pointwise => {
                let (cout, cin) = self.weight.dims2()?;
                if h * w >= SMALL_MAP {
                    let flat = x.reshape((n, cin, h * w))?;
                    self.weight
                        .broadcast_matmul(&flat)?
                        .reshape((n, cout, h, w))?
                } else {
                    // Small maps: one [Cout, Cin] × [Cin, N·H·W] product instead of N thin ones.
                    let cols = x.permute((1, 0, 2, 3))?.reshape((cin, n * h * w))?;
                    self.weight
                        .matmul(&cols)?
                        .reshape((cout, n, h, w))?
                        .permute((1, 0, 2, 3))?
                }
            }
            ConvKind::Depthwise => {
                let (pt, pb, pl, pr) = self.padding.resolve(h, w, self.kernel, self.stride);
                let params = DepthwiseParams {
                    stride: (self.stride, self.stride),
                    pad_top: pt,
                    pad_bottom: pb,
                    pad_left: pl,
                    pad_right: pr,
                };
                depthwise_conv2d(x, &self.weight, params)?
            }
            ConvKind::Dense => {
                let (pt, pb, pl, pr) = self.padding.resolve(h, w, self.kernel, self.stride);
                let (k, s) = (self.kernel, self.stride);
                // Rows (columns) past the last window, in padded coordinates.
                let unused_h = (h + pt + pb - k) % s;
                let unused_w = (w + pl + pr - k) % s;
                if pt == pb && pl == pr && pt == pl && unused_h == unused_w {
                    x.conv2d(&self.weight, pt, s, 1, 1)?
                } else {
                    // Pad by hand; drop the unused edge when the two sides differ, since
                    // candle's conv2d backward derives the output padding of its transposed
                    // convolution from the height alone (a gradient of the wrong width).
                    let padded =
                        x.pad_with_zeros(D::Minus2, pt, pb)?
                            .pad_with_zeros(D::Minus1, pl, pr)?;
                    let padded = if unused_h == unused_w {
                        padded
                    } else {
                        let (ph, pw) = (h + pt + pb - unused_h, w + pl + pr - unused_w);
                        padded.narrow(2, 0, ph)?.narrow(3, 0, pw)?
                    };
                    padded.conv2d(&self.weight, 0, s, 1, 1)?
                }
            }
        };
        bias_act(&y, &self.bias, self.relu6)
    }
}

/// An inverted-residual block (MobileNetV2's and EfficientNet's): its convolutions in order,
/// plus the input when the block keeps the shape (stride 1, same channels).
#[derive(Debug, Clone)]
pub struct ResidualChain {
    pub layers: Vec<ConvBn>,
    pub residual: bool,
}

impl Module for ResidualChain {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = layer.forward(&y)?;
        }
        if self.residual {
            y + x
        } else {
            Ok(y)
        }
    }
}

impl Tunable for ResidualChain {
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.make_trainable(vars))
    }

    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        self.layers.iter().try_for_each(|l| l.export(out))
    }
}

/// The convolutional trunk shared by MobileNetV2 and EfficientNet-Lite: a stem, the
/// inverted-residual blocks, a 1×1 head, then global average pooling.
#[derive(Debug, Clone)]
pub struct Trunk {
    pub stem: ConvBn,
    pub blocks: Vec<ResidualChain>,
    pub head: ConvBn,
}

impl Trunk {
    /// The pooled features `[N, C]` of images `[N, 3, H, W]`.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.stem.forward(x)?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        global_avg_pool(&self.head.forward(&y)?)
    }
}

impl Trunk {
    /// Trainable variables per block, in the order of [`Tunable::make_trainable`]: the stem,
    /// then each inverted-residual block (two per convolution); the 1×1 head after them is no
    /// block (`--freeze-blocks` never freezes it).
    pub fn block_var_counts(&self) -> Vec<usize> {
        std::iter::once(2)
            .chain(self.blocks.iter().map(|b| 2 * b.layers.len()))
            .collect()
    }
}

impl Tunable for Trunk {
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        self.stem.make_trainable(vars)?;
        self.blocks
            .iter_mut()
            .try_for_each(|b| b.make_trainable(vars))?;
        self.head.make_trainable(vars)
    }

    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        self.stem.export(out)?;
        self.blocks.iter().try_for_each(|b| b.export(out))?;
        self.head.export(out)
    }
}

/// Global average pool: [N, C, H, W] → [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff;

    #[test]
    fn tf_same_padding() {
        // 224 input, stride 2: 3×3 pads (0, 1), 5×5 pads (1, 2); stride 1 is symmetric.
        assert_eq!(Padding::TfSame.resolve(224, 224, 3, 2), (0, 1, 0, 1));
        assert_eq!(Padding::TfSame.resolve(224, 224, 5, 2), (1, 2, 1, 2));
        assert_eq!(Padding::TfSame.resolve(7, 7, 5, 1), (2, 2, 2, 2));
        assert_eq!(Padding::TfSame.resolve(7, 7, 3, 2), (1, 1, 1, 1));
    }

    #[test]
    fn folded_batch_norm_equals_conv_then_bn() {
        use candle_core::Device;
        use std::collections::HashMap;
        let dev = Device::Cpu;
        let (cin, cout) = (3, 4);
        let mut t = HashMap::new();
        t.insert(
            "c.weight".to_owned(),
            Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap(),
        );
        t.insert(
            "b.weight".to_owned(),
            Tensor::new(&[1f32, 2., 0.5, -1.], &dev).unwrap(),
        );
        t.insert(
            "b.bias".to_owned(),
            Tensor::new(&[0f32, 1., -1., 0.25], &dev).unwrap(),
        );
        t.insert(
            "b.running_mean".to_owned(),
            Tensor::new(&[0.1f32, -0.2, 0.3, 0.], &dev).unwrap(),
        );
        t.insert(
            "b.running_var".to_owned(),
            Tensor::new(&[1f32, 4., 0.25, 2.], &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(t.clone(), DType::F32, &dev);
        let spec = ConvSpec {
            in_channels: cin,
            out_channels: cout,
            kernel: 3,
            stride: 1,
            padding: Padding::Symmetric(1),
            kind: ConvKind::Dense,
            relu6: false,
            bn_eps: 1e-5,
        };
        let layer = ConvBn::load(
            spec,
            ConvBnNames {
                conv: vb.pp("c"),
                bn: vb.pp("b"),
            },
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1., (2, cin, 5, 5), &dev).unwrap();
        let conv = x.conv2d(&t["c.weight"], 1, 1, 1, 1).unwrap();
        let bn = candle_nn::BatchNorm::new(
            cout,
            t["b.running_mean"].clone(),
            t["b.running_var"].clone(),
            t["b.weight"].clone(),
            t["b.bias"].clone(),
            1e-5,
        )
        .unwrap();
        let expected = candle_nn::ModuleT::forward_t(&bn, &conv, false).unwrap();
        let got = layer.forward(&x).unwrap();
        let diff: f32 = max_abs_diff(&got, &expected);
        assert!(diff < 1e-5, "{diff}");

        // A wrong shape names the tensor and both shapes.
        let bad = ConvSpec {
            in_channels: 5,
            ..spec
        };
        let err = ConvBn::load(
            bad,
            ConvBnNames {
                conv: vb.pp("c"),
                bn: vb.pp("b"),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.weight")
                && err.contains("[4, 5, 3, 3]")
                && err.contains("[4, 3, 3, 3]"),
            "{err}"
        );
    }
}
