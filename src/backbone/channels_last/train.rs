//! Back-propagation on the channels-last engine ([`EngineTrainer`]): MobileNetV2 /
//! EfficientNet-Lite trunks ([`super::train_trunk`]) and ResNet-18/34/50
//! ([`super::train_resnet`]). The forward keeps every layer's output, the backward walks the
//! layers in reverse with the kernels of [`crate::ops::nhwc_grad`] (a dense convolution's
//! im2col matrix is rebuilt there rather than kept). Chunks of images run in parallel in both
//! directions, as in inference; each chunk's parameter gradients are summed in chunk order, so
//! a batch's gradients do not depend on thread timing. Batch-norm is folded and frozen: the
//! trained parameters are each convolution's folded weight and bias.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, Var};
use rayon::prelude::*;

use super::train_resnet::{ResBlock, ResNetTape};
use super::train_trunk::{TrunkBlock, TrunkTape};
use super::{ConvKind, DenseInput, Layer, MAX_CHUNK};
use crate::backbone::layers::Trunk;
use crate::backbone::resnet::ResNet;
use crate::backbone::Backbone;
use crate::ops::bf16_gemm::{self, Precision};
use crate::ops::nhwc::{self, Act, ConvGeometry, DepthwiseFn};
use crate::ops::nhwc_grad as grad;
use crate::ops::winograd;

/// A CNN's parameters on the host in the engine's layout, with a forward that records what
/// the backward needs and the backward itself.
#[derive(Debug, Clone)]
pub struct EngineTrainer {
    /// Every convolution in the order of the network's trainable variables
    /// ([`crate::backbone::layers::Tunable::make_trainable`]).
    pub(super) layers: Vec<Layer>,
    pub(super) graph: Graph,
    pub(super) depthwise: DepthwiseFn,
    /// Leading blocks (the stem first) that are not trained: the backward stops above them
    /// and their gradients stay zero.
    pub(super) frozen_blocks: usize,
    pub(super) buffers: Buffers,
    /// The arithmetic of every dense and pointwise product, forward and backward.
    precision: Precision,
}

/// Most buffers [`Buffers`] keeps.
const MAX_POOLED: usize = 256;

/// Host buffers reused from one training step to the next ([`EngineTrainer::recycle`]): a
/// step asks for the same sizes every time, and fresh allocations that large would be
/// page-faulted in again on every step. Clones of a trainer share them.
#[derive(Debug, Default, Clone)]
pub(super) struct Buffers {
    floats: Arc<Mutex<Vec<Vec<f32>>>>,
    /// im2col buffers, kept apart: each pass grows them to its largest layer.
    scratch: Arc<Mutex<Vec<Scratch>>>,
}

impl Buffers {
    /// A pooled buffer that fits `len` floats (the best fit, not one far larger), else a new one.
    fn take(&self, len: usize) -> Vec<f32> {
        let mut pool = self.floats.lock().unwrap_or_else(|e| e.into_inner());
        let most = len.saturating_mul(4).max(1 << 16);
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| (len..=most).contains(&v.capacity()))
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(len),
        }
    }

    /// `len` zeros.
    pub fn zeroed(&self, len: usize) -> Vec<f32> {
        let mut v = self.take(len);
        v.clear();
        v.resize(len, 0.0);
        v
    }

    /// `len` floats of unspecified value, for a caller that overwrites them all.
    pub fn scratch(&self, len: usize) -> Vec<f32> {
        let mut v = self.take(len);
        v.truncate(len);
        v.resize(len, 0.0);
        v
    }

    /// A copy of `src`.
    pub fn copy_of(&self, src: &[f32]) -> Vec<f32> {
        let mut v = self.take(src.len());
        v.clear();
        v.extend_from_slice(src);
        v
    }

    /// Keeps `buffers` for later steps (dropping the smallest beyond [`MAX_POOLED`]).
    pub fn give(&self, buffers: impl IntoIterator<Item = Vec<f32>>) {
        let mut pool = self.floats.lock().unwrap_or_else(|e| e.into_inner());
        pool.extend(buffers.into_iter().filter(|v| v.capacity() > 0));
        if pool.len() > MAX_POOLED {
            pool.sort_unstable_by_key(|v| std::cmp::Reverse(v.capacity()));
            pool.truncate(MAX_POOLED);
        }
    }
}

/// How the layers connect.
#[derive(Debug, Clone)]
pub(super) enum Graph {
    /// Stem, inverted-residual blocks, pointwise head.
    Trunk(Vec<TrunkBlock>),
    /// Stem + max-pool, residual blocks.
    ResNet(Vec<ResBlock>),
}

/// What a forward pass over a batch leaves for the backward: per chunk of images, every
/// layer's output.
#[derive(Debug)]
pub struct Forward {
    /// Pooled features `[N, D]`.
    pub features: Vec<f32>,
    chunks: Vec<Tape>,
}

/// One chunk's recorded forward.
#[derive(Debug)]
pub(super) enum Tape {
    Trunk(TrunkTape),
    ResNet(ResNetTape),
}

impl Tape {
    fn images(&self) -> usize {
        match self {
            Tape::Trunk(t) => t.n,
            Tape::ResNet(t) => t.n,
        }
    }

    fn into_buffers(self) -> Vec<Vec<f32>> {
        match self {
            Tape::Trunk(t) => t.into_buffers(),
            Tape::ResNet(t) => t.into_buffers(),
        }
    }
}

/// Gradients of every parameter, in the order and layout of [`EngineTrainer::param_lens`].
pub type Gradients = Vec<Vec<f32>>;

/// Reusable im2col buffers of one chunk's pass.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    cols: Vec<f32>,
    dcols: Vec<f32>,
}

impl Scratch {
    /// A pass's buffers from the pool (given back by [`EngineTrainer::done_with`]).
    pub fn from(buffers: &Buffers) -> Self {
        let mut pool = buffers.scratch.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }
}

/// `buf` with at least `len` floats (grown, never shrunk; contents unspecified).
pub(super) fn at_least(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl EngineTrainer {
    /// The trainer for `backbone`'s current weights: MobileNetV2, EfficientNet-Lite and the
    /// ResNets; `None` for the vision transformers.
    pub fn for_backbone(backbone: &Backbone) -> Result<Option<Self>> {
        if let Some(trunk) = backbone.trunk() {
            return Self::trunk(trunk).map(Some);
        }
        backbone.resnet().map(Self::resnet).transpose()
    }

    /// Copies `trunk`'s current weights; errors when its shape is not a dense stem, blocks of
    /// pointwise/depthwise layers and a pointwise head.
    pub fn trunk(trunk: &Trunk) -> Result<Self> {
        let (layers, blocks) = super::train_trunk::layout(trunk)?;
        Ok(Self::with(layers, Graph::Trunk(blocks)))
    }

    /// Copies `net`'s current weights (ResNet-18/34/50, batch-norms folded).
    pub fn resnet(net: &ResNet) -> Result<Self> {
        let (layers, blocks) = super::train_resnet::layout(net)?;
        Ok(Self::with(layers, Graph::ResNet(blocks)))
    }

    fn with(mut layers: Vec<Layer>, graph: Graph) -> Self {
        layers.par_iter_mut().for_each(|l| {
            l.trains = true;
            l.repack();
        });
        Self {
            layers,
            graph,
            depthwise: nhwc::depthwise_kernel(),
            frozen_blocks: 0,
            buffers: Buffers::default(),
            precision: Precision::F32,
        }
    }

    /// Runs every dense and pointwise product, forward and backward, in `precision`
    /// ([`Precision::Bf16`]: bf16 operands, f32 sums; the parameters and gradients stay f32).
    /// Errors for bf16 on a CPU without AVX512-BF16.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        crate::ops::bf16_gemm::check(precision)?;
        self.precision = precision;
        self.layers
            .par_iter_mut()
            .for_each(|l| l.set_precision(precision));
        Ok(())
    }

    /// Parameters per block ([`Self::param_lens`] order): the stem, then each block (a
    /// MobileNetV2 / EfficientNet head after them is no block).
    pub fn block_var_counts(&self) -> Vec<usize> {
        let blocks: Vec<usize> = match &self.graph {
            Graph::Trunk(b) => b.iter().map(|b| 2 * b.len).collect(),
            Graph::ResNet(b) => b.iter().map(|b| 2 * b.layers()).collect(),
        };
        std::iter::once(2).chain(blocks).collect()
    }

    /// Freezes the first `blocks` blocks (the stem first; 0: none): [`Self::backward`] no
    /// longer reaches them and leaves their gradients zero. Returns how many leading
    /// parameters of [`Self::param_lens`] are frozen; errors when there are fewer blocks.
    pub fn freeze(&mut self, blocks: usize) -> Result<usize> {
        let counts = self.block_var_counts();
        if blocks > counts.len() {
            candle_core::bail!(
                "channels-last training: {blocks} blocks to freeze of {}",
                counts.len()
            );
        }
        self.frozen_blocks = blocks;
        Ok(counts[..blocks].iter().sum())
    }

    /// Width of the pooled features.
    pub fn dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.cout)
    }

    /// The length of every parameter, weight then bias per layer, in the engine's layout
    /// (depthwise weights tap-major, dense ones over channels-last maps `[cout, k, k, cin]`);
    /// the order of the network's trainable variables.
    pub fn param_lens(&self) -> Vec<usize> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.len(), l.bias.len()])
            .collect()
    }

    /// Changes the parameters through `f`, which gets each of them (order and layout of
    /// [`Self::param_lens`]) as a mutable buffer; the forward pass uses the new values.
    pub fn update<R>(&mut self, f: impl FnOnce(Vec<&mut Vec<f32>>) -> R) -> R {
        let params = self
            .layers
            .iter_mut()
            .flat_map(|l| [&mut l.weight, &mut l.bias])
            .collect();
        let out = f(params);
        self.layers.par_iter_mut().for_each(Layer::repack);
        out
    }

    /// The parameters after the first `skip` (order and layout of [`Self::param_lens`]), as
    /// 1-D tensors on the CPU: a training checkpoint's copy.
    pub fn params_after(&self, skip: usize) -> Result<Vec<Tensor>> {
        self.layers
            .iter()
            .flat_map(|l| [&l.weight, &l.bias])
            .skip(skip)
            .map(|p| Tensor::from_slice(p, p.len(), &candle_core::Device::Cpu))
            .collect()
    }

    /// Sets the parameters after the first `skip` to `saved` (from [`Self::params_after`]).
    pub fn set_params(&mut self, skip: usize, saved: &[Tensor]) -> Result<()> {
        let values = saved
            .iter()
            .map(|t| t.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<Vec<_>>>()?;
        let lens: Vec<usize> = self.param_lens().into_iter().skip(skip).collect();
        let saved_lens: Vec<usize> = values.iter().map(Vec::len).collect();
        if lens != saved_lens {
            candle_core::bail!(
                "channels-last training: {} saved parameters of lengths {:?}… for {} of lengths {:?}…",
                saved_lens.len(),
                &saved_lens[..saved_lens.len().min(4)],
                lens.len(),
                &lens[..lens.len().min(4)]
            );
        }
        self.update(|params| {
            for (p, v) in params.into_iter().skip(skip).zip(values) {
                *p = v;
            }
        });
        Ok(())
    }

    /// Parameters or gradients in the engine's layout (as [`Self::param_lens`]) turned into
    /// the layout of the network's variables (depthwise `[c, 1, k, k]`, dense
    /// `[cout, cin, k, k]`).
    pub fn to_checkpoint_layout(&self, values: &[Vec<f32>]) -> Vec<Vec<f32>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let l = &self.layers[i / 2];
                let (k, taps) = (l.kernel, l.kernel * l.kernel);
                match (i % 2, l.kind, l.input) {
                    (0, ConvKind::Depthwise, _) => {
                        let mut out = vec![0f32; v.len()];
                        for t in 0..taps {
                            for ch in 0..l.cout {
                                out[ch * taps + t] = v[t * l.cout + ch];
                            }
                        }
                        out
                    }
                    (0, ConvKind::Dense, DenseInput::Hwc) if k > 1 => {
                        let mut out = vec![0f32; v.len()];
                        for o in 0..l.cout {
                            for t in 0..taps {
                                for ci in 0..l.cin {
                                    out[(o * l.cin + ci) * taps + t] =
                                        v[(o * taps + t) * l.cin + ci];
                                }
                            }
                        }
                        out
                    }
                    _ => v.clone(),
                }
            })
            .collect()
    }

    /// Writes the current parameters into the network's trainable variables `vars` (from
    /// [`crate::backbone::Backbone::load_trainable`], same order), so that the candle network
    /// and its export hold the trained weights.
    pub fn write_to(&self, vars: &[Var]) -> Result<()> {
        let params: Vec<Vec<f32>> = self
            .layers
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone()])
            .collect();
        if vars.len() != params.len() {
            candle_core::bail!(
                "channels-last training: {} variables for {} parameters",
                vars.len(),
                params.len()
            );
        }
        for (var, values) in vars.iter().zip(self.to_checkpoint_layout(&params)) {
            let shape = var.as_tensor().shape().clone();
            let device = var.as_tensor().device().clone();
            var.set(&Tensor::from_vec(values, shape, &device)?)?;
        }
        Ok(())
    }

    /// Keeps a forward's record, once [`Self::backward`] is done with it, for the buffers of
    /// the next steps.
    pub fn recycle(&self, fwd: Forward) {
        self.buffers
            .give(fwd.chunks.into_iter().flat_map(Tape::into_buffers));
    }

    /// Keeps gradients the optimiser is done with, for the buffers of the next steps.
    pub fn recycle_gradients(&self, grads: Gradients) {
        self.buffers.give(grads);
    }

    /// Gives a pass's scratch buffers back.
    pub(super) fn done_with(&self, scratch: Scratch) {
        let mut pool = self
            .buffers
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pool.push(scratch);
    }

    /// Images per chunk for a batch of `n`: one chunk per thread at least, each at most
    /// [`MAX_CHUNK`] images.
    fn chunk(n: usize) -> usize {
        n.div_ceil(rayon::current_num_threads()).clamp(1, MAX_CHUNK)
    }

    /// The forward pass over `n` images `x` (`[n, C, H, W]` as a flat slice), recording what
    /// [`Self::backward`] needs.
    pub fn forward(&self, x: &[f32], n: usize, size: (usize, usize)) -> Result<Forward> {
        let stem = &self.layers[0];
        let image = stem.cin * size.0 * size.1;
        if n == 0 || x.len() != n * image {
            candle_core::bail!(
                "channels-last training: {} floats for {n} images of {}×{}×{}",
                x.len(),
                stem.cin,
                size.0,
                size.1
            );
        }
        let chunk = Self::chunk(n);
        let (chunks, features): (Vec<Tape>, Vec<Vec<f32>>) = x
            .par_chunks(chunk * image)
            .map(|x| {
                let n = x.len() / image;
                match &self.graph {
                    Graph::Trunk(blocks) => self
                        .trunk_forward(blocks, x, n, size)
                        .map(|(t, f)| (Tape::Trunk(t), f)),
                    Graph::ResNet(blocks) => self
                        .resnet_forward(blocks, x, n, size)
                        .map(|(t, f)| (Tape::ResNet(t), f)),
                }
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(Forward {
            features: features.concat(),
            chunks,
        })
    }

    /// Gradients of every parameter given the gradient of the pooled features `d_features`
    /// (`[N, D]`) for the batch of `fwd` (zero for the frozen blocks of [`Self::freeze`]).
    pub fn backward(&self, fwd: &Forward, d_features: &[f32]) -> Result<Gradients> {
        let dim = self.dim();
        let n: usize = fwd.chunks.iter().map(Tape::images).sum();
        if d_features.len() != n * dim {
            candle_core::bail!(
                "channels-last training: {} feature gradients for {n} × {dim} features",
                d_features.len()
            );
        }
        let starts: Vec<usize> = fwd
            .chunks
            .iter()
            .scan(0, |at, t| {
                let s = *at;
                *at += t.images();
                Some(s)
            })
            .collect();
        let per_chunk = fwd
            .chunks
            .par_iter()
            .zip(starts)
            .map(|(tape, s)| {
                let d = &d_features[s * dim..][..tape.images() * dim];
                match (&self.graph, tape) {
                    (Graph::Trunk(blocks), Tape::Trunk(t)) => self.trunk_backward(blocks, t, d),
                    (Graph::ResNet(blocks), Tape::ResNet(t)) => self.resnet_backward(blocks, t, d),
                    _ => candle_core::bail!("channels-last training: a forward of another network"),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let mut total = self.zero_gradients();
        total.par_iter_mut().enumerate().for_each(|(p, sum)| {
            for g in &per_chunk {
                sum.iter_mut().zip(&g[p]).for_each(|(s, v)| *s += v);
            }
        });
        self.buffers.give(per_chunk.into_iter().flatten());
        Ok(total)
    }

    pub(super) fn zero_gradients(&self) -> Gradients {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.len(), l.bias.len()])
            .map(|len| self.buffers.zeroed(len))
            .collect()
    }

    /// Runs layer `i` on `n` images `src` of map `size` (channels last; channels first for a
    /// [`DenseInput::Chw`] stem); returns its output and the output size.
    pub(super) fn run_layer(
        &self,
        i: usize,
        src: &[f32],
        n: usize,
        size: (usize, usize),
        scratch: &mut Scratch,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        let l = &self.layers[i];
        let out = l.out_size(size)?;
        let mut dst = self.buffers.scratch(n * out.0 * out.1 * l.cout);
        let cols = l.scratch_len(n, size)?;
        l.apply(
            src,
            &mut dst,
            at_least(&mut scratch.cols, cols),
            n,
            size,
            self.depthwise,
        )?;
        Ok((dst, out))
    }

    /// Back through layer `i` on `n` images: from the gradient `dy` of its output and its
    /// output `y` (for the activation's mask) and input `x` at map `size`, accumulates its
    /// weight and bias gradients into `grads` and returns its input's gradient when
    /// `input_grad` (else an empty vector).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_backward(
        &self,
        i: usize,
        (x, y): (&[f32], &[f32]),
        mut dy: Vec<f32>,
        n: usize,
        size: (usize, usize),
        input_grad: bool,
        grads: &mut Gradients,
        scratch: &mut Scratch,
    ) -> Result<Vec<f32>> {
        let l = &self.layers[i];
        grad::act_grad(&mut dy, y, l.act);
        let (gw, gb) = grads.split_at_mut(2 * i + 1);
        let (gw, gb) = (&mut gw[2 * i], &mut gb[0]);
        grad::bias_grad_acc(&dy, gb);
        let pixels = size.0 * size.1;
        match l.kind {
            ConvKind::Pointwise => {
                let m = n * pixels;
                grad::weight_grad_acc(self.precision, &dy, x, gw, (m, l.cin, l.cout));
                if !input_grad {
                    self.buffers.give([dy]);
                    return Ok(Vec::new());
                }
                let mut dx = self.buffers.scratch(m * l.cin);
                grad::input_grad(self.precision, &dy, &l.weight, &mut dx, (m, l.cin, l.cout));
                self.buffers.give([dy]);
                Ok(dx)
            }
            ConvKind::Depthwise => {
                let g = l.geometry(size)?;
                let (inp, outp) = (pixels * l.cin, g.out_h * g.out_w * l.cout);
                let mut dx = self.buffers.zeroed(if input_grad { n * inp } else { 0 });
                for (img, (x, dz)) in x.chunks_exact(inp).zip(dy.chunks_exact(outp)).enumerate() {
                    let dx = input_grad.then(|| &mut dx[img * inp..][..inp]);
                    grad::depthwise_grad_acc(x, &l.weight, dz, &g, dx, gw);
                }
                self.buffers.give([dy]);
                Ok(dx)
            }
            ConvKind::Dense => {
                let g = l.geometry(size)?;
                let (rows, width) = (g.out_h * g.out_w, l.cin * l.kernel * l.kernel);
                let (image, m) = (pixels * l.cin, n * rows);
                let winograd = l.winograd_grad_for(&g);
                let channels = (l.cin, l.cout);
                if winograd.is_some() && winograd::weight_grad_pays(n, size, channels) {
                    let len = winograd::weight_grad_scratch(channels, n, size);
                    let s = at_least(&mut scratch.cols, len);
                    winograd::weight_grad_acc(x, &dy, n, size, channels, gw, s);
                } else {
                    self.im2col_weight_grad(l, &g, x, &dy, n, gw, scratch);
                }
                if !input_grad {
                    self.buffers.give([dy]);
                    return Ok(Vec::new());
                }
                if l.input == DenseInput::Chw {
                    candle_core::bail!("channels-last training: no input gradient for a stem");
                }
                if let Some(back) = winograd {
                    // The input gradient of a size-keeping 3×3 convolution is the flipped one.
                    let s = at_least(&mut scratch.dcols, winograd::conv_scratch(back, n, size));
                    let mut dx = self.buffers.scratch(n * image);
                    winograd::conv(&dy, n, size, back, None, None, Act::Identity, &mut dx, s);
                    self.buffers.give([dy]);
                    return Ok(dx);
                }
                let dcols = at_least(&mut scratch.dcols, m * width);
                grad::input_grad(self.precision, &dy, &l.weight, dcols, (m, width, l.cout));
                let mut dx = self.buffers.zeroed(n * image);
                for (dx, dcols) in dx
                    .chunks_exact_mut(image)
                    .zip(dcols.chunks_exact(rows * width))
                {
                    grad::col2im_hwc_acc(dcols, l.cin, &g, dx);
                }
                self.buffers.give([dy]);
                Ok(dx)
            }
        }
    }

    /// A dense layer's weight gradient through its input's im2col matrix (bf16 pairs with
    /// bf16 products).
    #[allow(clippy::too_many_arguments)]
    fn im2col_weight_grad(
        &self,
        l: &Layer,
        g: &ConvGeometry,
        x: &[f32],
        dy: &[f32],
        n: usize,
        gw: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let (rows, width) = (g.out_h * g.out_w, l.cin * l.kernel * l.kernel);
        let (image, m) = (g.h * g.w * l.cin, n * rows);
        let cols = at_least(&mut scratch.cols, m * width);
        if self.precision == Precision::Bf16
            && l.input == DenseInput::Hwc
            && l.cin.is_multiple_of(2)
        {
            // im2col straight into bf16 pairs, the weight gradient's right operand.
            let words = super::cast_words(&mut cols[..m * width / 2]);
            for (x, pairs) in x
                .chunks_exact(image)
                .zip(words.chunks_exact_mut(rows * width / 2))
            {
                bf16_gemm::im2col_hwc_pairs(x, l.cin, g, pairs);
            }
            grad::weight_grad_acc_bf16(dy, words, gw, (m, width, l.cout));
        } else {
            for (img, x) in x.chunks_exact(image).take(n).enumerate() {
                let dst = &mut cols[img * rows * width..][..rows * width];
                match l.input {
                    DenseInput::Chw => nhwc::im2col_chw(x, l.cin, g, dst),
                    DenseInput::Hwc => nhwc::im2col_hwc(x, l.cin, g, dst),
                }
            }
            grad::weight_grad_acc(self.precision, dy, cols, gw, (m, width, l.cout));
        }
    }
}
