//! Building blocks of the convolutional backbones written here: a convolution with its
//! batch-norm folded in, in three flavours — dense, depthwise, pointwise — and the
//! [`Tunable`] interface that fine-tuning uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

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
    /// As [`Self::make_trainable`] with every batch-norm in training mode ([`BnMode::Train`])
    /// while `training` is set: per convolution its weight, γ and β. Errors for a network
    /// without batch-norms.
    fn make_trainable_bn(&mut self, _vars: &mut Vec<Var>, _training: &Training) -> Result<()> {
        candle_core::bail!("this network has no batch-norm to train")
    }
    /// The parameters under their checkpoint names, loadable by the same network's `load`.
    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()>;
    /// Every convolution + batch-norm, in the order of [`Self::make_trainable`] (none for a
    /// network without batch-norms).
    fn conv_bns(&self) -> Vec<&ConvBn> {
        Vec::new()
    }
}

/// How fine-tuning treats the batch-norms of the CNNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BnMode {
    /// Folded into the convolutions with their pretrained statistics (the default; γ and β
    /// train through the folded bias and scale).
    #[default]
    Frozen,
    /// Normalised by each training batch's statistics, which update the running ones
    /// (momentum 0.1, PyTorch's); evaluation and the exported model use the running ones.
    Train,
}

impl BnMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            BnMode::Frozen => "frozen",
            BnMode::Train => "train",
        }
    }
}

/// Whether a network's training-mode batch-norms ([`BnMode::Train`]) use the batch's
/// statistics (a training step) or the running ones (evaluation). Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct Training(Arc<AtomicBool>);

impl Training {
    /// Switches training mode on or off.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }

    /// Whether training mode is on.
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The momentum of the running statistics of a batch-norm in training mode (PyTorch's).
pub const BN_MOMENTUM: f64 = 0.1;

/// A batch-norm's affine parameters and running statistics (`[C]` each).
#[derive(Debug, Clone)]
pub struct BnStats {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
}

/// A [`ConvBn`] whose batch-norm trains ([`BnMode::Train`]): the unfolded convolution weight,
/// γ and β (trainable), the running statistics (updated by each training forward).
#[derive(Debug, Clone)]
struct BnTraining {
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running: Arc<Mutex<(Tensor, Tensor)>>,
    training: Training,
    /// Set for a frozen block's batch-norm: always the running statistics, never updated.
    held: Arc<AtomicBool>,
}

/// Conv → batch-norm (→ ReLU6), with the batch-norm folded into the convolution's weight and
/// bias when loaded: `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`. Fine-tuning trains `w'` and
/// `b'`, i.e. the batch-norm statistics stay frozen (its affine part is trained), unless the
/// batch-norm is made to train ([`Tunable::make_trainable_bn`]).
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// The batch-norm as loaded (to unfold it for [`BnMode::Train`]).
    stats: BnStats,
    /// Set by [`Tunable::make_trainable_bn`].
    bn_training: Option<BnTraining>,
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
        let stats = BnStats {
            gamma,
            beta,
            mean,
            var,
        };
        let (weight, bias) = fold(&weight, &stats, spec.bn_eps)?;
        let weight = match spec.kind {
            ConvKind::Pointwise => weight.reshape((spec.out_channels, spec.in_channels))?,
            _ => weight,
        };
        Ok(Self {
            weight,
            bias,
            stats,
            bn_training: None,
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

/// `w' = w·γ/√(σ²+ε)` (`w` `[C, …]`, any rank) and `b' = β − μ·γ/√(σ²+ε)`.
fn fold(weight: &Tensor, bn: &BnStats, eps: f64) -> Result<(Tensor, Tensor)> {
    let scale = bn.gamma.div(&(&bn.var + eps)?.sqrt()?)?;
    let mut shape = vec![1; weight.rank()];
    shape[0] = scale.dim(0)?;
    let weight = weight.broadcast_mul(&scale.reshape(shape)?)?;
    let bias = (&bn.beta - bn.mean.mul(&scale)?)?;
    Ok((weight, bias))
}

impl ConvBn {
    /// The folded weight and bias in use: the trained ones, or for a training batch-norm its
    /// weight folded with the running statistics (evaluation).
    pub(crate) fn folded(&self) -> Result<(Tensor, Tensor)> {
        match &self.bn_training {
            None => Ok((self.weight.clone(), self.bias.clone())),
            Some(t) => {
                let running = t.running.lock().unwrap_or_else(|e| e.into_inner());
                let stats = BnStats {
                    gamma: t.gamma.clone(),
                    beta: t.beta.clone(),
                    mean: running.0.clone(),
                    var: running.1.clone(),
                };
                fold(&t.weight, &stats, self.bn_eps)
            }
        }
    }

    /// The batch-norm of a training step over the convolution's output `z` `[N, C, H, W]`:
    /// normalised by the batch's mean and (biased) variance, scaled by γ; the running
    /// statistics move towards the batch's (unbiased variance) by [`BN_MOMENTUM`]. β is added
    /// by the caller.
    fn batch_norm_train(&self, t: &BnTraining, z: &Tensor) -> Result<Tensor> {
        let dtype = z.dtype();
        let z = &z.to_dtype(DType::F32)?;
        let (n, c, h, w) = z.dims4()?;
        let count = n * h * w;
        let per_channel =
            |v: &Tensor| -> Result<Tensor> { v.transpose(0, 1)?.reshape((c, count))?.mean(1) };
        let mean = per_channel(z)?;
        let centred = z.broadcast_sub(&mean.reshape((1, c, 1, 1))?)?;
        let var = per_channel(&centred.sqr()?)?;
        let inv = (&var + self.bn_eps)?.sqrt()?.recip()?;
        let scale = (inv * &t.gamma)?.reshape((1, c, 1, 1))?;
        let y = centred.broadcast_mul(&scale)?;
        let unbiased = count as f64 / (count.max(2) - 1) as f64;
        let mut running = t.running.lock().unwrap_or_else(|e| e.into_inner());
        let m = BN_MOMENTUM;
        let new_mean = ((&running.0 * (1.0 - m))? + (mean.detach() * m)?)?;
        let new_var = ((&running.1 * (1.0 - m))? + (var.detach() * (m * unbiased))?)?;
        *running = (new_mean, new_var);
        y.to_dtype(dtype)
    }
}

impl ConvBn {
    /// The running mean and variance of a training batch-norm (`None` when frozen).
    pub fn running_stats(&self) -> Option<(Tensor, Tensor)> {
        let t = self.bn_training.as_ref()?;
        let running = t.running.lock().unwrap_or_else(|e| e.into_inner());
        Some(running.clone())
    }

    /// Keeps a training batch-norm in evaluation mode (a frozen block's): its running
    /// statistics normalise and never change.
    pub fn hold(&self) {
        if let Some(t) = &self.bn_training {
            t.held.store(true, Ordering::SeqCst);
        }
    }

    /// Sets a training batch-norm's running statistics (a checkpoint's); errors when the
    /// batch-norm is frozen or the shapes differ.
    pub fn set_running_stats(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let Some(t) = &self.bn_training else {
            candle_core::bail!("running statistics for a frozen batch-norm");
        };
        let mut running = t.running.lock().unwrap_or_else(|e| e.into_inner());
        if mean.shape() != running.0.shape() || var.shape() != running.1.shape() {
            candle_core::bail!(
                "running statistics {:?} / {:?} for a batch-norm of {:?}",
                mean.shape(),
                var.shape(),
                running.0.shape()
            );
        }
        let device = running.0.device().clone();
        *running = (mean.to_device(&device)?, var.to_device(&device)?);
        Ok(())
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

    /// The unfolded weight (`w'·√(σ²+ε)/γ`, zero where γ is), γ and β as variables.
    fn make_trainable_bn(&mut self, vars: &mut Vec<Var>, training: &Training) -> Result<()> {
        let s = &self.stats;
        let scale = s.gamma.div(&(&s.var + self.bn_eps)?.sqrt()?)?;
        let safe = scale.abs()?.ge(f64::MIN_POSITIVE)?;
        let inv = safe.where_cond(&scale.recip()?, &scale.zeros_like()?)?;
        let mut shape = vec![1; self.weight.rank()];
        shape[0] = inv.dim(0)?;
        let weight = self.weight.broadcast_mul(&inv.reshape(shape)?)?;
        let mut trained = Vec::with_capacity(3);
        for t in [weight, s.gamma.clone(), s.beta.clone()] {
            let var = Var::from_tensor(&t)?;
            trained.push(var.as_tensor().clone());
            vars.push(var);
        }
        let [weight, gamma, beta]: [Tensor; 3] = trained
            .try_into()
            .map_err(|_| candle_core::Error::Msg("three batch-norm variables".into()))?;
        self.bn_training = Some(BnTraining {
            weight,
            gamma,
            beta,
            running: Arc::new(Mutex::new((s.mean.clone(), s.var.clone()))),
            training: training.clone(),
            held: Arc::default(),
        });
        Ok(())
    }

    /// The folded weight as the convolution and an identity batch-norm (γ = √(1+ε), β = b',
    /// μ = 0, σ² = 1), so that loading folds it back to exactly `w'` and `b'` (a training
    /// batch-norm folded with its running statistics).
    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let (weight, bias) = self.folded()?;
        let c = bias.dim(0)?;
        let weight = match self.kind {
            ConvKind::Pointwise => {
                let (cout, cin) = weight.dims2()?;
                weight.reshape((cout, cin, 1, 1))?
            }
            _ => weight,
        };
        let ones = Tensor::ones(c, DType::F32, bias.device())?;
        let key = |prefix: &str, name: &str| format!("{prefix}.{name}");
        out.push((key(&self.conv_name, "weight"), weight.detach()));
        out.push((key(&self.bn_name, "weight"), (&ones + self.bn_eps)?.sqrt()?));
        out.push((key(&self.bn_name, "bias"), bias.detach()));
        out.push((key(&self.bn_name, "running_mean"), ones.zeros_like()?));
        out.push((key(&self.bn_name, "running_var"), ones));
        Ok(())
    }
}

impl Module for ConvBn {
    /// Runs in `x`'s dtype: f32, or bf16 for mixed precision on a GPU (the f32 weights cast
    /// for the product, so their gradients stay f32; the batch statistics of a training
    /// batch-norm in f32).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(t) = &self.bn_training else {
            return bias_act(&self.convolve(x, &self.weight)?, &self.bias, self.relu6);
        };
        if t.training.is_on() && !t.held.load(Ordering::SeqCst) {
            let z = self.convolve(x, &t.weight)?;
            return bias_act(&self.batch_norm_train(t, &z)?, &t.beta, self.relu6);
        }
        let (weight, bias) = self.folded()?;
        bias_act(&self.convolve(x, &weight)?, &bias, self.relu6)
    }
}

impl ConvBn {
    /// The convolution of `x` by `weight` (this layer's kind, stride and padding), no bias, in
    /// `x`'s dtype: the f32 weight is cast to it (bf16 products, f32 sums on a GPU); the
    /// depthwise op, f32 only, runs on `x` cast to f32 and back.
    fn convolve(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let weight = &weight.to_dtype(x.dtype())?;
        if self.kind == ConvKind::Depthwise && x.dtype() != DType::F32 {
            let y = self.convolve(&x.to_dtype(DType::F32)?, &weight.to_dtype(DType::F32)?)?;
            return y.to_dtype(x.dtype());
        }
        let (n, _c, h, w) = x.dims4()?;
        let y = match self.kind {
            ConvKind::Pointwise => {
                let (cout, cin) = weight.dims2()?;
                if h * w >= SMALL_MAP {
                    let flat = x.reshape((n, cin, h * w))?;
                    weight.broadcast_matmul(&flat)?.reshape((n, cout, h, w))?
                } else {
                    // Small maps: one [Cout, Cin] × [Cin, N·H·W] product instead of N thin ones.
                    let cols = x.permute((1, 0, 2, 3))?.reshape((cin, n * h * w))?;
                    weight
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
                depthwise_conv2d(x, weight, params)?
            }
            ConvKind::Dense => {
                let (pt, pb, pl, pr) = self.padding.resolve(h, w, self.kernel, self.stride);
                let (k, s) = (self.kernel, self.stride);
                // Rows (columns) past the last window, in padded coordinates.
                let unused_h = (h + pt + pb - k) % s;
                let unused_w = (w + pl + pr - k) % s;
                if pt == pb && pl == pr && pt == pl && unused_h == unused_w {
                    x.conv2d(weight, pt, s, 1, 1)?
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
                    padded.conv2d(weight, 0, s, 1, 1)?
                }
            }
        };
        Ok(y)
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

    fn make_trainable_bn(&mut self, vars: &mut Vec<Var>, training: &Training) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.make_trainable_bn(vars, training))
    }

    fn conv_bns(&self) -> Vec<&ConvBn> {
        self.layers.iter().collect()
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
    /// Convolutions per block, in the order of [`Tunable::make_trainable`]: the stem, then
    /// each inverted-residual block; the 1×1 head after them is no block (`--freeze-blocks`
    /// never freezes it).
    pub fn block_conv_counts(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(self.blocks.iter().map(|b| b.layers.len()))
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

    fn make_trainable_bn(&mut self, vars: &mut Vec<Var>, training: &Training) -> Result<()> {
        self.stem.make_trainable_bn(vars, training)?;
        self.blocks
            .iter_mut()
            .try_for_each(|b| b.make_trainable_bn(vars, training))?;
        self.head.make_trainable_bn(vars, training)
    }

    fn conv_bns(&self) -> Vec<&ConvBn> {
        let blocks = self.blocks.iter().flat_map(|b| b.layers.iter());
        std::iter::once(&self.stem)
            .chain(blocks)
            .chain(std::iter::once(&self.head))
            .collect()
    }

    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        self.stem.export(out)?;
        self.blocks.iter().try_for_each(|b| b.export(out))?;
        self.head.export(out)
    }
}

/// Global average pool: [N, C, H, W] → [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.mean(D::Minus1)?.mean(D::Minus1)
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
        let spec = dense_3x3(cin, cout);
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

    /// A 3×3, stride-1, padded dense convolution with batch-norm (ε 1e-5).
    fn dense_3x3(cin: usize, cout: usize) -> ConvSpec {
        ConvSpec {
            in_channels: cin,
            out_channels: cout,
            kernel: 3,
            stride: 1,
            padding: Padding::Symmetric(1),
            kind: ConvKind::Dense,
            relu6: false,
            bn_eps: 1e-5,
        }
    }

    #[test]
    fn training_batch_norm_uses_the_batch_and_updates_its_running_statistics() {
        use candle_core::Device;
        use std::collections::HashMap;
        let dev = Device::Cpu;
        let (cin, cout) = (2, 3);
        let conv_w = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
        let (gamma, beta) = ([1.5f32, 0.5, -2.0], [0.1f32, -0.3, 0.2]);
        let (mean0, var0) = ([0.2f32, -0.1, 0.0], [2.0f32, 0.5, 1.0]);
        let mut t = HashMap::new();
        t.insert("c.weight".to_owned(), conv_w.clone());
        for (name, v) in [
            ("weight", gamma),
            ("bias", beta),
            ("running_mean", mean0),
            ("running_var", var0),
        ] {
            t.insert(format!("b.{name}"), Tensor::new(&v, &dev).unwrap());
        }
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        let spec = dense_3x3(cin, cout);
        let names = ConvBnNames {
            conv: vb.pp("c"),
            bn: vb.pp("b"),
        };
        let mut layer = ConvBn::load(spec, names).unwrap();
        let training = Training::default();
        let mut vars = Vec::new();
        layer.make_trainable_bn(&mut vars, &training).unwrap();
        assert_eq!(vars.len(), 3, "weight, gamma, beta");
        // The unfolded weight is the checkpoint's convolution.
        assert!(max_abs_diff(vars[0].as_tensor(), &conv_w) < 1e-5);

        // A training step: the batch's statistics, by hand.
        let (n, h, w) = (4usize, 5usize, 5usize);
        let x = Tensor::randn(0f32, 1., (n, cin, h, w), &dev).unwrap();
        let z = x.conv2d(&conv_w, 1, 1, 1, 1).unwrap();
        let zs: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
        let count = (n * h * w) as f64;
        let channel = |c: usize| -> Vec<f64> {
            (0..n)
                .flat_map(|i| (0..h * w).map(move |p| (i, p)))
                .map(|(i, p)| zs[(i * cout + c) * h * w + p] as f64)
                .collect()
        };
        let stats: Vec<(f64, f64)> = (0..cout)
            .map(|c| {
                let v = channel(c);
                let m = v.iter().sum::<f64>() / count;
                (m, v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / count)
            })
            .collect();
        training.set(true);
        let y = layer.forward(&x).unwrap();
        let ys: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let mut worst = 0f64;
        for (i, (&yv, &zv)) in ys.iter().zip(&zs).enumerate() {
            let c = i / (h * w) % cout;
            let (m, v) = stats[c];
            let want = (zv as f64 - m) / (v + 1e-5).sqrt() * gamma[c] as f64 + beta[c] as f64;
            worst = worst.max((yv as f64 - want).abs());
        }
        assert!(worst < 1e-4, "training output off by {worst}");
        // Running statistics moved by the momentum, the variance unbiased.
        let (rm, rv) = layer.running_stats().unwrap();
        let (rm, rv): (Vec<f32>, Vec<f32>) = (rm.to_vec1().unwrap(), rv.to_vec1().unwrap());
        for c in 0..cout {
            let (m, v) = stats[c];
            let want_m = 0.9 * mean0[c] as f64 + 0.1 * m;
            let want_v = 0.9 * var0[c] as f64 + 0.1 * v * count / (count - 1.0);
            assert!((rm[c] as f64 - want_m).abs() < 1e-5, "mean {c}");
            assert!((rv[c] as f64 - want_v).abs() < 1e-4, "var {c}");
        }

        // Every trained tensor gets a gradient through the batch statistics; γ's matches a
        // central difference of the training output.
        let probe = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        let loss = |l: &ConvBn| -> f64 {
            let out = l.forward(&x).unwrap();
            (out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in &vars {
            assert!(grads.get(v.as_tensor()).is_some());
        }
        let g_gamma: Vec<f32> = grads.get(vars[1].as_tensor()).unwrap().to_vec1().unwrap();
        for c in 0..cout {
            let step = 1e-2f32;
            let mut shifted = gamma;
            shifted[c] += step;
            vars[1].set(&Tensor::new(&shifted, &dev).unwrap()).unwrap();
            let up = loss(&layer);
            shifted[c] -= 2.0 * step;
            vars[1].set(&Tensor::new(&shifted, &dev).unwrap()).unwrap();
            let down = loss(&layer);
            let fd = (up - down) / (2.0 * step as f64);
            assert!(
                (fd - g_gamma[c] as f64).abs() < 1e-2 * fd.abs().max(1.0),
                "γ {c}"
            );
        }
        vars[1].set(&Tensor::new(&gamma, &dev).unwrap()).unwrap();

        // Evaluation: the running statistics, and the export loads back to the same layer.
        training.set(false);
        layer
            .set_running_stats(
                &Tensor::new(&[0.5f32, 0.0, -0.5], &dev).unwrap(),
                &Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap(),
            )
            .unwrap();
        let eval = layer.forward(&x).unwrap();
        let bn = candle_nn::BatchNorm::new(
            cout,
            Tensor::new(&[0.5f32, 0.0, -0.5], &dev).unwrap(),
            Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap(),
            Tensor::new(&gamma, &dev).unwrap(),
            Tensor::new(&beta, &dev).unwrap(),
            1e-5,
        )
        .unwrap();
        let want = candle_nn::ModuleT::forward_t(&bn, &z, false).unwrap();
        assert!(max_abs_diff(&eval, &want) < 1e-4);
        let mut exported = Vec::new();
        layer.export(&mut exported).unwrap();
        let vb = VarBuilder::from_tensors(exported.into_iter().collect(), DType::F32, &dev);
        let names = ConvBnNames {
            conv: vb.pp("c"),
            bn: vb.pp("b"),
        };
        let reloaded = ConvBn::load(spec, names).unwrap();
        assert!(max_abs_diff(&reloaded.forward(&x).unwrap(), &eval) < 1e-4);
    }
}
