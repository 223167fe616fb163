//! Back-propagation through a MobileNetV2 / EfficientNet-Lite [`Trunk`] on the channels-last
//! engine ([`TrunkTrainer`]): the forward keeps every layer's output (and the stem's im2col
//! matrix), the backward walks the layers in reverse with the kernels of
//! [`crate::ops::nhwc_grad`]. Chunks of images run in parallel in both directions, as in
//! inference; each chunk's parameter gradients are summed in chunk order, so a batch's
//! gradients do not depend on thread timing. Batch-norm is folded and frozen: the trained
//! parameters are each convolution's folded weight and bias.

use candle_core::{Result, Tensor, Var};
use rayon::prelude::*;

use super::{Act, ConvKind, DenseInput, Layer, MAX_CHUNK};
use crate::backbone::layers::{ConvBn, Trunk};
use crate::ops::nhwc::{self, DepthwiseFn};
use crate::ops::nhwc_grad as grad;

/// A [`Trunk`]'s parameters on the host in the engine's layout, with a forward that records
/// what the backward needs and the backward itself.
#[derive(Debug, Clone)]
pub struct TrunkTrainer {
    /// Stem, every block's layers in order, head: the order of the trunk's trainable
    /// variables ([`crate::backbone::layers::Tunable::make_trainable`]).
    layers: Vec<Layer>,
    /// Per block: its first layer's index, its number of layers, whether it adds its input.
    blocks: Vec<(usize, usize, bool)>,
    depthwise: DepthwiseFn,
    /// Leading blocks (the stem first) that are not trained: the backward stops above them
    /// and their gradients stay zero.
    frozen_blocks: usize,
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
struct Tape {
    n: usize,
    /// The stem's im2col matrix.
    cols: Vec<f32>,
    /// Each layer's output (after its activation), channels last.
    outs: Vec<Vec<f32>>,
    /// Each residual block's output (its last layer's plus its input).
    sums: Vec<Option<Vec<f32>>>,
    /// Each layer's input map size.
    sizes: Vec<(usize, usize)>,
}

/// Gradients of every parameter, in the order and layout of [`TrunkTrainer::param_lens`].
pub type Gradients = Vec<Vec<f32>>;

fn layer(conv: &ConvBn, input: DenseInput) -> Result<Layer> {
    let act = if conv.relu6 {
        Act::Relu6
    } else {
        Act::Identity
    };
    Layer::from_conv(conv, act, input)
}

impl TrunkTrainer {
    /// Copies `trunk`'s current weights; errors when its shape is not a dense stem, blocks of
    /// pointwise/depthwise layers and a pointwise head.
    pub fn new(trunk: &Trunk) -> Result<Self> {
        let mut layers = vec![layer(&trunk.stem, DenseInput::Chw)?];
        let mut blocks = Vec::with_capacity(trunk.blocks.len());
        for b in &trunk.blocks {
            if b.layers.is_empty() {
                candle_core::bail!("channels-last training: a block without layers");
            }
            blocks.push((layers.len(), b.layers.len(), b.residual));
            for l in &b.layers {
                layers.push(layer(l, DenseInput::Hwc)?);
            }
        }
        layers.push(layer(&trunk.head, DenseInput::Hwc)?);
        let (stem, head) = (&layers[0], &layers[layers.len() - 1]);
        let inner_dense = layers[1..].iter().any(|l| l.kind == ConvKind::Dense);
        if stem.kind != ConvKind::Dense || head.kind != ConvKind::Pointwise || inner_dense {
            candle_core::bail!("channels-last training: unsupported trunk layout");
        }
        Ok(Self {
            layers,
            blocks,
            depthwise: nhwc::depthwise_kernel(),
            frozen_blocks: 0,
        })
    }

    /// Parameters per block ([`Self::param_lens`] order): the stem, then each block; the
    /// head after them is no block.
    pub fn block_var_counts(&self) -> Vec<usize> {
        std::iter::once(2)
            .chain(self.blocks.iter().map(|&(_, len, _)| 2 * len))
            .collect()
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
    /// (depthwise weights tap-major); the order of the trunk's trainable variables.
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
        self.layers.iter_mut().for_each(Layer::repack);
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
    /// the layout of the trunk's variables (depthwise `[c, 1, k, k]`).
    pub fn to_checkpoint_layout(&self, values: &[Vec<f32>]) -> Vec<Vec<f32>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let l = &self.layers[i / 2];
                if i % 2 == 0 && l.kind == ConvKind::Depthwise {
                    let taps = l.kernel * l.kernel;
                    let mut out = vec![0f32; v.len()];
                    for t in 0..taps {
                        for ch in 0..l.cout {
                            out[ch * taps + t] = v[t * l.cout + ch];
                        }
                    }
                    out
                } else {
                    v.clone()
                }
            })
            .collect()
    }

    /// Writes the current parameters into the trunk's trainable variables `vars` (from
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
            .map(|x| self.forward_chunk(x, x.len() / image, size))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(Forward {
            features: features.concat(),
            chunks,
        })
    }

    /// The input of layer `i` (not the stem) in a chunk's tape.
    fn input_of<'a>(&self, tape: &'a Tape, i: usize) -> &'a [f32] {
        let block = self
            .blocks
            .iter()
            .position(|&(first, len, _)| i < first + len);
        match block {
            Some(b) if i != self.blocks[b].0 => &tape.outs[i - 1],
            Some(b) => self.block_output(tape, b.wrapping_sub(1)),
            None => self.block_output(tape, self.blocks.len().wrapping_sub(1)),
        }
    }

    /// The output of block `b` (`usize::MAX`: the stem's).
    fn block_output<'a>(&self, tape: &'a Tape, b: usize) -> &'a [f32] {
        match self.blocks.get(b) {
            None => &tape.outs[0],
            Some(&(first, len, _)) => match &tape.sums[b] {
                Some(sum) => sum,
                None => &tape.outs[first + len - 1],
            },
        }
    }

    fn forward_chunk(&self, x: &[f32], n: usize, size: (usize, usize)) -> Result<(Tape, Vec<f32>)> {
        let dw = self.depthwise;
        let stem = &self.layers[0];
        let g = stem.geometry(size)?;
        let mut cols = vec![0f32; n * g.out_h * g.out_w * stem.cin * stem.kernel * stem.kernel];
        let mut out = vec![0f32; n * g.out_h * g.out_w * stem.cout];
        stem.apply(x, &mut out, &mut cols, n, size, dw)?;
        let mut tape = Tape {
            n,
            cols,
            outs: vec![out],
            sums: Vec::with_capacity(self.blocks.len()),
            sizes: vec![size],
        };
        let mut size = (g.out_h, g.out_w);
        for (b, &(first, len, residual)) in self.blocks.iter().enumerate() {
            let in_size = size;
            for i in first..first + len {
                size = self.apply_recorded(&mut tape, i, size)?;
            }
            let sum = match residual {
                true if size != in_size => {
                    candle_core::bail!("channels-last: a residual block changed the map size")
                }
                true => {
                    let mut sum = tape.outs[first + len - 1].clone();
                    nhwc::add_act(
                        &mut sum,
                        self.block_output(&tape, b.wrapping_sub(1)),
                        Act::Identity,
                    );
                    Some(sum)
                }
                false => None,
            };
            tape.sums.push(sum);
        }
        let head = self.layers.len() - 1;
        let size = self.apply_recorded(&mut tape, head, size)?;
        let mut features = vec![0f32; n * self.dim()];
        super::global_avg_pool(
            &tape.outs[head],
            n,
            size.0 * size.1,
            self.dim(),
            &mut features,
        );
        Ok((tape, features))
    }

    /// Runs layer `i` (not the stem) on its input in `tape` at map `size`, recording its
    /// output; returns the output size.
    fn apply_recorded(
        &self,
        tape: &mut Tape,
        i: usize,
        size: (usize, usize),
    ) -> Result<(usize, usize)> {
        let l = &self.layers[i];
        let out_size = l.out_size(size)?;
        let mut out = vec![0f32; tape.n * out_size.0 * out_size.1 * l.cout];
        l.apply(
            self.input_of(tape, i),
            &mut out,
            &mut [],
            tape.n,
            size,
            self.depthwise,
        )?;
        tape.outs.push(out);
        tape.sizes.push(size);
        Ok(out_size)
    }

    /// Gradients of every parameter given the gradient of the pooled features `d_features`
    /// (`[N, D]`) for the batch of `fwd` (zero for the frozen blocks of [`Self::freeze`]).
    pub fn backward(&self, fwd: &Forward, d_features: &[f32]) -> Result<Gradients> {
        let dim = self.dim();
        let n: usize = fwd.chunks.iter().map(|t| t.n).sum();
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
                *at += t.n;
                Some(s)
            })
            .collect();
        let per_chunk = fwd
            .chunks
            .par_iter()
            .zip(starts)
            .map(|(tape, s)| self.backward_chunk(tape, &d_features[s * dim..][..tape.n * dim]))
            .collect::<Result<Vec<_>>>()?;
        let mut total = self.zero_gradients();
        total.par_iter_mut().enumerate().for_each(|(p, sum)| {
            for g in &per_chunk {
                sum.iter_mut().zip(&g[p]).for_each(|(s, v)| *s += v);
            }
        });
        Ok(total)
    }

    fn zero_gradients(&self) -> Gradients {
        self.layers
            .iter()
            .flat_map(|l| [vec![0f32; l.weight.len()], vec![0f32; l.bias.len()]])
            .collect()
    }

    fn backward_chunk(&self, tape: &Tape, d_features: &[f32]) -> Result<Gradients> {
        let mut grads = self.zero_gradients();
        let head = self.layers.len() - 1;
        let (h, w) = tape.sizes[head];
        let mut d = vec![0f32; tape.outs[head].len()];
        grad::global_avg_pool_grad(d_features, tape.n, h * w, self.dim(), &mut d);
        let mut d = self.layer_backward(tape, head, d, &mut grads)?;
        for (b, &(first, len, residual)) in self.blocks.iter().enumerate().rev() {
            // Block b is the (b + 2)-th block counting the stem.
            if b + 2 <= self.frozen_blocks {
                return Ok(grads);
            }
            let d_out = residual.then(|| d.clone());
            for i in (first..first + len).rev() {
                d = self.layer_backward(tape, i, d, &mut grads)?;
            }
            if let Some(d_out) = d_out {
                d.iter_mut().zip(&d_out).for_each(|(a, b)| *a += b);
            }
        }
        if self.frozen_blocks == 0 {
            self.layer_backward(tape, 0, d, &mut grads)?;
        }
        Ok(grads)
    }

    /// Back through layer `i`: from the gradient `dy` of its output, accumulates its weight
    /// and bias gradients and returns its input's gradient (empty for the stem).
    fn layer_backward(
        &self,
        tape: &Tape,
        i: usize,
        mut dy: Vec<f32>,
        grads: &mut Gradients,
    ) -> Result<Vec<f32>> {
        let l = &self.layers[i];
        let size = tape.sizes[i];
        grad::act_grad(&mut dy, &tape.outs[i], l.act);
        let (gw, gb) = grads.split_at_mut(2 * i + 1);
        let (gw, gb) = (&mut gw[2 * i], &mut gb[0]);
        grad::bias_grad_acc(&dy, gb);
        let n = tape.n;
        match l.kind {
            ConvKind::Dense => {
                let g = l.geometry(size)?;
                let (rows, cols) = (n * g.out_h * g.out_w, l.cin * l.kernel * l.kernel);
                grad::weight_grad_acc(&dy, &tape.cols, gw, rows, cols, l.cout);
                Ok(Vec::new())
            }
            ConvKind::Pointwise => {
                let x = self.input_of(tape, i);
                let m = n * size.0 * size.1;
                grad::weight_grad_acc(&dy, x, gw, m, l.cin, l.cout);
                let mut dx = vec![0f32; m * l.cin];
                grad::input_grad_acc(&dy, &l.weight, &mut dx, m, l.cin, l.cout);
                Ok(dx)
            }
            ConvKind::Depthwise => {
                let x = self.input_of(tape, i);
                let g = l.geometry(size)?;
                let (inp, outp) = (size.0 * size.1 * l.cin, g.out_h * g.out_w * l.cout);
                let mut dx = vec![0f32; n * inp];
                for ((x, dz), dx) in x
                    .chunks_exact(inp)
                    .zip(dy.chunks_exact(outp))
                    .zip(dx.chunks_exact_mut(inp))
                {
                    grad::depthwise_grad_acc(x, &l.weight, dz, &g, Some(dx), gw);
                }
                Ok(dx)
            }
        }
    }
}
