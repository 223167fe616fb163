//! [`EngineTrainer`]'s forward and backward for MobileNetV2 / EfficientNet-Lite trunks: a dense
//! stem, blocks of pointwise and depthwise layers (some adding their input), a pointwise head,
//! global average pooling.

use candle_core::Result;

use super::train::{EngineTrainer, Gradients, Scratch};
use super::trunk::layer;
use super::{Act, ConvKind, DenseInput, Layer};
use crate::backbone::layers::Trunk;
use crate::ops::nhwc;
use crate::ops::nhwc_grad as grad;

/// One block of a trunk: its first layer's index, its number of layers, whether it adds its
/// input.
#[derive(Debug, Clone, Copy)]
pub(super) struct TrunkBlock {
    pub first: usize,
    pub len: usize,
    pub residual: bool,
}

/// One chunk's recorded forward through a trunk.
#[derive(Debug)]
pub(super) struct TrunkTape {
    pub n: usize,
    /// The chunk's images, channels first (the stem's im2col is rebuilt from them).
    images: Vec<f32>,
    /// Each layer's output (after its activation), channels last.
    outs: Vec<Vec<f32>>,
    /// Each residual block's output (its last layer's plus its input).
    sums: Vec<Option<Vec<f32>>>,
    /// Each layer's input map size.
    sizes: Vec<(usize, usize)>,
}

impl TrunkTape {
    pub fn into_buffers(self) -> Vec<Vec<f32>> {
        let mut out = vec![self.images];
        out.extend(self.outs);
        out.extend(self.sums.into_iter().flatten());
        out
    }
}

/// `trunk`'s layers (stem, every block's layers in order, head) and blocks; errors when its
/// shape is not a dense stem, blocks of pointwise/depthwise layers and a pointwise head.
pub(super) fn layout(trunk: &Trunk) -> Result<(Vec<Layer>, Vec<TrunkBlock>)> {
    let mut layers = vec![layer(&trunk.stem, DenseInput::Chw)?];
    let mut blocks = Vec::with_capacity(trunk.blocks.len());
    for b in &trunk.blocks {
        if b.layers.is_empty() {
            candle_core::bail!("channels-last training: a block without layers");
        }
        blocks.push(TrunkBlock {
            first: layers.len(),
            len: b.layers.len(),
            residual: b.residual,
        });
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
    Ok((layers, blocks))
}

impl EngineTrainer {
    /// The input of layer `i` (not the stem) in a chunk's tape.
    fn trunk_input<'a>(&self, blocks: &[TrunkBlock], tape: &'a TrunkTape, i: usize) -> &'a [f32] {
        let block = blocks.iter().position(|b| i < b.first + b.len);
        match block {
            Some(b) if i != blocks[b].first => &tape.outs[i - 1],
            Some(b) => block_output(blocks, tape, b.wrapping_sub(1)),
            None => block_output(blocks, tape, blocks.len().wrapping_sub(1)),
        }
    }

    pub(super) fn trunk_forward(
        &self,
        blocks: &[TrunkBlock],
        x: &[f32],
        n: usize,
        size: (usize, usize),
    ) -> Result<(TrunkTape, Vec<f32>)> {
        let mut scratch = Scratch::from(&self.buffers);
        let (out, mut map) = self.run_layer(0, x, n, size, &mut scratch)?;
        let mut tape = TrunkTape {
            n,
            images: self.buffers.copy_of(x),
            outs: vec![out],
            sums: Vec::with_capacity(blocks.len()),
            sizes: vec![size],
        };
        for (b, block) in blocks.iter().enumerate() {
            let in_size = map;
            for i in block.first..block.first + block.len {
                map = self.record(blocks, &mut tape, i, map, &mut scratch)?;
            }
            let sum = match block.residual {
                true if map != in_size => {
                    candle_core::bail!("channels-last: a residual block changed the map size")
                }
                true => {
                    let mut sum = self
                        .buffers
                        .copy_of(&tape.outs[block.first + block.len - 1]);
                    let input = block_output(blocks, &tape, b.wrapping_sub(1));
                    nhwc::add_act(&mut sum, input, Act::Identity);
                    Some(sum)
                }
                false => None,
            };
            tape.sums.push(sum);
        }
        let head = self.layers.len() - 1;
        let map = self.record(blocks, &mut tape, head, map, &mut scratch)?;
        self.done_with(scratch);
        let mut features = vec![0f32; n * self.dim()];
        super::global_avg_pool(
            &tape.outs[head],
            n,
            map.0 * map.1,
            self.dim(),
            &mut features,
        );
        Ok((tape, features))
    }

    /// Runs layer `i` (not the stem) on its input in `tape` at map `size`, recording its
    /// output; returns the output size.
    fn record(
        &self,
        blocks: &[TrunkBlock],
        tape: &mut TrunkTape,
        i: usize,
        size: (usize, usize),
        scratch: &mut Scratch,
    ) -> Result<(usize, usize)> {
        let input = self.trunk_input(blocks, tape, i);
        let (out, out_size) = self.run_layer(i, input, tape.n, size, scratch)?;
        tape.outs.push(out);
        tape.sizes.push(size);
        Ok(out_size)
    }

    pub(super) fn trunk_backward(
        &self,
        blocks: &[TrunkBlock],
        tape: &TrunkTape,
        d_features: &[f32],
    ) -> Result<Gradients> {
        let mut grads = self.zero_gradients();
        let mut scratch = Scratch::from(&self.buffers);
        let done = self.trunk_backward_into(blocks, tape, d_features, &mut grads, &mut scratch);
        self.done_with(scratch);
        done.map(|()| grads)
    }

    fn trunk_backward_into(
        &self,
        blocks: &[TrunkBlock],
        tape: &TrunkTape,
        d_features: &[f32],
        grads: &mut Gradients,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let head = self.layers.len() - 1;
        let (h, w) = tape.sizes[head];
        let mut d = self.buffers.scratch(tape.outs[head].len());
        grad::global_avg_pool_grad(d_features, tape.n, h * w, self.dim(), &mut d);
        let mut back = |i: usize, d: Vec<f32>, grads: &mut Gradients| {
            let input = match i {
                0 => &tape.images[..],
                _ => self.trunk_input(blocks, tape, i),
            };
            let ends = (input, &tape.outs[i][..]);
            self.layer_backward(i, ends, d, tape.n, tape.sizes[i], i > 0, grads, scratch)
        };
        d = back(head, d, grads)?;
        for (b, block) in blocks.iter().enumerate().rev() {
            // Block b is the (b + 2)-th block counting the stem.
            if b + 2 <= self.frozen_blocks {
                self.buffers.give([d]);
                return Ok(());
            }
            let d_out = block.residual.then(|| self.buffers.copy_of(&d));
            for i in (block.first..block.first + block.len).rev() {
                d = back(i, d, grads)?;
            }
            if let Some(d_out) = d_out {
                d.iter_mut().zip(&d_out).for_each(|(a, b)| *a += b);
                self.buffers.give([d_out]);
            }
        }
        if self.frozen_blocks == 0 {
            back(0, d, grads)?;
        } else {
            self.buffers.give([d]);
        }
        Ok(())
    }
}

/// The output of block `b` (`usize::MAX`: the stem's).
fn block_output<'a>(blocks: &[TrunkBlock], tape: &'a TrunkTape, b: usize) -> &'a [f32] {
    match blocks.get(b) {
        None => &tape.outs[0],
        Some(block) => match &tape.sums[b] {
            Some(sum) => sum,
            None => &tape.outs[block.first + block.len - 1],
        },
    }
}
