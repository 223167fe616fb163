//! MobileNetV2 / EfficientNet-Lite ([`Trunk`]) on the channels-last engine.

use candle_core::{Result, Tensor};

use super::{apply_in, apply_stem, global_avg_pool, input_size, Layer, WorkspacePool};
use super::{Act, ConvKind, DenseInput};
use crate::backbone::layers::{ConvBn, Trunk};
use crate::ops::bf16_gemm::Precision;
use crate::ops::nhwc::{self, DepthwiseFn};

/// Buffers of a task: block input, two scratch buffers, block output, im2col.
const X: usize = 0;
const E: usize = 1;
const D: usize = 2;
const P: usize = 3;
const C: usize = 4;
const BUFFERS: usize = 5;

/// An inverted-residual block.
#[derive(Debug, Clone)]
struct Block {
    layers: Vec<Layer>,
    residual: bool,
}

/// A [`Trunk`]'s weights laid out for channels-last CPU inference. Build it once per loaded
/// network; it does not follow later changes to the trunk's weights.
#[derive(Debug)]
pub struct ChannelsLastTrunk {
    stem: Layer,
    blocks: Vec<Block>,
    head: Layer,
    depthwise: DepthwiseFn,
    workspaces: WorkspacePool,
}

/// A trunk convolution on the engine (ReLU6 where the trunk has it).
pub(super) fn layer(conv: &ConvBn, input: DenseInput) -> Result<Layer> {
    let act = if conv.relu6 {
        Act::Relu6
    } else {
        Act::Identity
    };
    Layer::from_conv(conv, act, input)
}

impl ChannelsLastTrunk {
    /// Copies `trunk`'s weights; errors when its shape is not stem (dense) → blocks of
    /// pointwise/depthwise layers → pointwise head.
    pub fn new(trunk: &Trunk) -> Result<Self> {
        let stem = layer(&trunk.stem, DenseInput::Chw)?;
        let head = layer(&trunk.head, DenseInput::Hwc)?;
        let blocks = trunk
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    layers: b
                        .layers
                        .iter()
                        .map(|l| layer(l, DenseInput::Hwc))
                        .collect::<Result<_>>()?,
                    residual: b.residual,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let inner_ok = blocks
            .iter()
            .flat_map(|b| &b.layers)
            .all(|l| l.kind != ConvKind::Dense);
        if stem.kind != ConvKind::Dense || head.kind != ConvKind::Pointwise || !inner_ok {
            candle_core::bail!("channels-last: unsupported trunk layout");
        }
        Ok(Self {
            stem,
            blocks,
            head,
            depthwise: nhwc::depthwise_kernel(),
            workspaces: WorkspacePool::default(),
        })
    }

    /// Width of the embedding.
    pub fn dim(&self) -> usize {
        self.head.cout
    }

    /// Runs the dense and pointwise products in `precision` ([`Precision::Bf16`]: bf16
    /// operands, f32 sums and activations). Errors for bf16 on a CPU without AVX512-BF16.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        crate::ops::bf16_gemm::check(precision)?;
        let layers = self.blocks.iter_mut().flat_map(|b| b.layers.iter_mut());
        for layer in [&mut self.stem, &mut self.head].into_iter().chain(layers) {
            layer.set_precision(precision);
        }
        Ok(())
    }

    /// The largest buffer one image needs (activations and the stem's im2col matrix), in f32.
    fn per_image(&self, size: (usize, usize)) -> Result<usize> {
        let (mut most, mut size) = self.stem.footprint(size)?;
        for layer in self
            .blocks
            .iter()
            .flat_map(|b| &b.layers)
            .chain([&self.head])
        {
            let (floats, out) = layer.footprint(size)?;
            most = most.max(floats);
            size = out;
        }
        Ok(most)
    }

    /// Pooled features `[N, D]` of images `[N, C, H, W]` (f32, on the CPU).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w) = input_size(&self.stem, x)?;
        let per = self.per_image((h, w))?;
        self.workspaces
            .run_chunked(x, BUFFERS, per, self.dim(), |x, n, ws, out| {
                self.run_chunk(x, n, (h, w), ws, out)
            })
    }

    /// The whole network on `n` images `x` (`[n, C, H, W]`), pooled features into `out`.
    fn run_chunk(
        &self,
        x: &[f32],
        n: usize,
        size: (usize, usize),
        ws: &mut super::Workspace,
        out: &mut [f32],
    ) -> Result<()> {
        let dw = self.depthwise;
        let mut size = apply_stem(&self.stem, x, ws, (X, C), n, size, dw)?;
        for block in &self.blocks {
            let (mut src, in_size) = (X, size);
            let mut added = false;
            for (i, layer) in block.layers.iter().enumerate() {
                let last = i + 1 == block.layers.len();
                let dst = if last {
                    P
                } else if src == E {
                    D
                } else {
                    E
                };
                let out_size = layer.out_size(size)?;
                if last && block.residual && out_size != in_size {
                    candle_core::bail!("channels-last: a residual block changed the map size");
                }
                // The residual joins the block's last (pointwise) product in its epilogue.
                if last
                    && block.residual
                    && layer.kind == ConvKind::Pointwise
                    && layer.act == Act::Identity
                {
                    let x_buf = std::mem::take(&mut ws[X]);
                    let (s, d) = super::pair(ws, src, dst);
                    let done = layer.apply_residual(s, d, &x_buf, n, size);
                    ws[X] = x_buf;
                    done?;
                    added = true;
                } else {
                    apply_in(layer, ws, src, dst, C, n, size, dw)?;
                }
                size = out_size;
                src = dst;
            }
            let cout = block.layers.last().map_or(0, |l| l.cout);
            if block.residual && !added {
                let len = n * size.0 * size.1 * cout;
                let (x_buf, p_buf) = super::pair(ws, X, P);
                nhwc::add_act(&mut p_buf[..len], &x_buf[..len], Act::Identity);
            }
            if !block.layers.is_empty() {
                ws.swap(X, P);
            }
        }
        apply_in(&self.head, ws, X, E, C, n, size, dw)?;
        global_avg_pool(&ws[E], n, size.0 * size.1, self.head.cout, out);
        Ok(())
    }
}
