//! [`EngineTrainer`]'s forward and backward for ResNet-18/34/50: the stem (7×7 stride 2, ReLU)
//! and its 3×3 stride-2 max-pool, residual blocks (`relu(convs(x) + shortcut(x))`, the
//! shortcut a 1×1 projection where the shape changes), global average pooling. The max-pool's
//! gradient goes to the first maximum of each window, as PyTorch's.

use candle_core::Result;

use super::resnet::{resnet_layers, ChannelsLastResNet};
use super::train::{EngineTrainer, Gradients, Scratch};
use super::{Act, Layer};
use crate::backbone::resnet::ResNet;
use crate::ops::nhwc;
use crate::ops::nhwc_grad as grad;

/// One residual block: its convolutions are layers `first..first + convs`, its shortcut
/// projection (if any) the layer after them.
#[derive(Debug, Clone, Copy)]
pub(super) struct ResBlock {
    first: usize,
    convs: usize,
    downsample: Option<usize>,
}

impl ResBlock {
    /// Layers of the block, its projection included.
    pub fn layers(&self) -> usize {
        self.convs + usize::from(self.downsample.is_some())
    }
}

/// One chunk's recorded forward through a ResNet.
#[derive(Debug)]
pub(super) struct ResNetTape {
    pub n: usize,
    /// The chunk's images, channels first, and their size.
    images: Vec<f32>,
    size: (usize, usize),
    /// The stem's output (after ReLU) and its map size.
    stem: Vec<f32>,
    stem_size: (usize, usize),
    /// The max-pool's output, then each block's output (after the residual add and ReLU).
    maps: Vec<Vec<f32>>,
    map_sizes: Vec<(usize, usize)>,
    /// Per block, the outputs of its convolutions but the last (after ReLU).
    inner: Vec<Vec<Vec<f32>>>,
}

impl ResNetTape {
    pub fn into_buffers(self) -> Vec<Vec<f32>> {
        let mut out = vec![self.images, self.stem];
        out.extend(self.maps);
        out.extend(self.inner.into_iter().flatten());
        out
    }
}

/// `net`'s layers in the order of its trainable variables (stem, then per block its
/// convolutions and its projection) and its blocks.
pub(super) fn layout(net: &ResNet) -> Result<(Vec<Layer>, Vec<ResBlock>)> {
    let (stem, blocks) = resnet_layers(net)?;
    let mut layers = vec![stem];
    let mut out = Vec::with_capacity(blocks.len());
    for (convs, downsample) in blocks {
        if convs.is_empty() {
            candle_core::bail!("channels-last training: a residual block without convolutions");
        }
        let first = layers.len();
        let count = convs.len();
        layers.extend(convs);
        let downsample = downsample.map(|d| {
            layers.push(d);
            first + count
        });
        out.push(ResBlock {
            first,
            convs: count,
            downsample,
        });
    }
    Ok((layers, out))
}

impl EngineTrainer {
    pub(super) fn resnet_forward(
        &self,
        blocks: &[ResBlock],
        x: &[f32],
        n: usize,
        size: (usize, usize),
    ) -> Result<(ResNetTape, Vec<f32>)> {
        let mut scratch = Scratch::from(&self.buffers);
        let (stem, stem_size) = self.run_layer(0, x, n, size, &mut scratch)?;
        let c = self.layers[0].cout;
        let g = ChannelsLastResNet::pool_geometry(stem_size)?;
        let (inp, outp) = (stem_size.0 * stem_size.1 * c, g.out_h * g.out_w * c);
        let mut pooled = self.buffers.scratch(n * outp);
        for (x, y) in stem.chunks_exact(inp).zip(pooled.chunks_exact_mut(outp)) {
            nhwc::max_pool_hwc(x, c, &g, y);
        }
        let mut tape = ResNetTape {
            n,
            images: self.buffers.copy_of(x),
            size,
            stem,
            stem_size,
            maps: vec![pooled],
            map_sizes: vec![(g.out_h, g.out_w)],
            inner: Vec::with_capacity(blocks.len()),
        };
        for block in blocks {
            let (input, in_size) = (
                &tape.maps[tape.maps.len() - 1],
                tape.map_sizes[tape.map_sizes.len() - 1],
            );
            let mut inner: Vec<Vec<f32>> = Vec::with_capacity(block.convs);
            let mut map = in_size;
            for i in block.first..block.first + block.convs {
                let src = inner.last().map_or(&input[..], |v| &v[..]);
                let (out, out_size) = self.run_layer(i, src, n, map, &mut scratch)?;
                inner.push(out);
                map = out_size;
            }
            let mut y = inner.pop().unwrap_or_default();
            let projected = match block.downsample {
                Some(d) => self.run_layer(d, input, n, in_size, &mut scratch)?.0,
                None => Vec::new(),
            };
            let shortcut = match block.downsample {
                Some(_) => &projected[..],
                None => &input[..],
            };
            if shortcut.len() != y.len() {
                candle_core::bail!("channels-last: a residual block's shortcut does not fit");
            }
            nhwc::add_act(&mut y, shortcut, Act::Relu);
            self.buffers.give([projected]);
            tape.maps.push(y);
            tape.map_sizes.push(map);
            tape.inner.push(inner);
        }
        self.done_with(scratch);
        let (last, map) = (
            &tape.maps[tape.maps.len() - 1],
            tape.map_sizes[tape.map_sizes.len() - 1],
        );
        let mut features = vec![0f32; n * self.dim()];
        super::global_avg_pool(last, n, map.0 * map.1, self.dim(), &mut features);
        Ok((tape, features))
    }

    pub(super) fn resnet_backward(
        &self,
        blocks: &[ResBlock],
        tape: &ResNetTape,
        d_features: &[f32],
    ) -> Result<Gradients> {
        let mut grads = self.zero_gradients();
        let mut scratch = Scratch::from(&self.buffers);
        let done = self.resnet_backward_into(blocks, tape, d_features, &mut grads, &mut scratch);
        self.done_with(scratch);
        done.map(|()| grads)
    }

    fn resnet_backward_into(
        &self,
        blocks: &[ResBlock],
        tape: &ResNetTape,
        d_features: &[f32],
        grads: &mut Gradients,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let n = tape.n;
        let (h, w) = tape.map_sizes[blocks.len()];
        let mut d = self.buffers.scratch(tape.maps[blocks.len()].len());
        grad::global_avg_pool_grad(d_features, n, h * w, self.dim(), &mut d);
        for (b, block) in blocks.iter().enumerate().rev() {
            // Block b is the (b + 2)-th block counting the stem; its input's gradient is
            // needed when the block before it (the stem for b = 0) trains.
            if b + 2 <= self.frozen_blocks {
                return Ok(());
            }
            let input_grad = b + 1 > self.frozen_blocks;
            grad::act_grad(&mut d, &tape.maps[b + 1], Act::Relu);
            let (input, in_size) = (&tape.maps[b][..], tape.map_sizes[b]);
            let d_shortcut = match block.downsample {
                Some(i) => self.layer_backward(
                    i,
                    (input, &[]),
                    self.buffers.copy_of(&d),
                    n,
                    in_size,
                    input_grad,
                    grads,
                    scratch,
                )?,
                None if input_grad => self.buffers.copy_of(&d),
                None => Vec::new(),
            };
            let mut sizes = vec![in_size];
            for i in block.first..block.first + block.convs - 1 {
                let at = sizes[sizes.len() - 1];
                sizes.push(self.layers[i].out_size(at)?);
            }
            let inner = &tape.inner[b];
            for j in (0..block.convs).rev() {
                let x = if j == 0 { input } else { &inner[j - 1][..] };
                let y = inner.get(j).map_or(&[][..], |v| &v[..]);
                let wants = j > 0 || input_grad;
                d = self.layer_backward(
                    block.first + j,
                    (x, y),
                    d,
                    n,
                    sizes[j],
                    wants,
                    grads,
                    scratch,
                )?;
            }
            if !input_grad {
                return Ok(());
            }
            d.iter_mut().zip(&d_shortcut).for_each(|(a, s)| *a += s);
            self.buffers.give([d_shortcut]);
        }
        if self.frozen_blocks > 0 {
            return Ok(());
        }
        let c = self.layers[0].cout;
        let g = ChannelsLastResNet::pool_geometry(tape.stem_size)?;
        let (inp, outp) = (
            tape.stem_size.0 * tape.stem_size.1 * c,
            g.out_h * g.out_w * c,
        );
        let mut d_stem = self.buffers.zeroed(tape.stem.len());
        for (((x, y), dy), dx) in tape
            .stem
            .chunks_exact(inp)
            .zip(tape.maps[0].chunks_exact(outp))
            .zip(d.chunks_exact(outp))
            .zip(d_stem.chunks_exact_mut(inp))
        {
            grad::max_pool_grad_acc(x, y, dy, c, &g, dx);
        }
        let ends = (&tape.images[..], &tape.stem[..]);
        self.buffers.give([d]);
        self.layer_backward(0, ends, d_stem, n, tape.size, false, grads, scratch)?;
        Ok(())
    }
}
