//! ResNet-18/34/50 (torchvision / timm layout, as candle-transformers loads them) on the
//! channels-last engine: the stem (7×7 stride 2, batch-norm, ReLU, 3×3 stride-2 max-pool), then
//! basic or bottleneck blocks with the batch-norms folded into the convolutions and the
//! residual add and ReLU in one pass; global average pooling.

use candle_core::{Result, Tensor};

use super::{apply_in, apply_stem, global_avg_pool, input_size, pair, Layer, WorkspacePool};
use super::{Act, DenseInput};
use crate::backbone::resnet::ResNet;
use crate::ops::bf16_gemm::Precision;
use crate::ops::nhwc::{self, ConvGeometry, DepthwiseFn};

/// Buffers of a task: block input, two intermediates, shortcut, im2col.
const X: usize = 0;
const A: usize = 1;
const B: usize = 2;
const S: usize = 3;
const C: usize = 4;
const BUFFERS: usize = 5;
/// Stem width.
const STEM: usize = 64;

/// One residual block: its convolutions in order (the last without activation) and the
/// projection of the shortcut when the shape changes.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Layer>,
    downsample: Option<Layer>,
}

/// A ResNet's weights laid out for channels-last CPU inference.
#[derive(Debug)]
pub struct ChannelsLastResNet {
    stem: Layer,
    blocks: Vec<Block>,
    dim: usize,
    depthwise: DepthwiseFn,
    workspaces: WorkspacePool,
}

/// A ResNet's layers on the engine: the stem (ReLU), then per residual block its
/// convolutions (ReLU after all but the last) and its shortcut projection.
pub(super) type ResNetLayers = (Layer, Vec<(Vec<Layer>, Option<Layer>)>);

/// `net`'s current weights laid out for the engine.
pub(super) fn resnet_layers(net: &ResNet) -> Result<ResNetLayers> {
    let hwc = DenseInput::Hwc;
    let (stem, blocks) = net.parts();
    let stem = Layer::from_conv(stem, Act::Relu, DenseInput::Chw)?;
    let blocks = blocks
        .map(|(convs, downsample)| {
            let last = convs.len().saturating_sub(1);
            let convs = convs
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let act = if j < last { Act::Relu } else { Act::Identity };
                    Layer::from_conv(c, act, hwc)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = downsample
                .map(|d| Layer::from_conv(d, Act::Identity, hwc))
                .transpose()?;
            Ok((convs, downsample))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((stem, blocks))
}

impl ChannelsLastResNet {
    /// `net` (ResNet-18/34/50, batch-norms folded) with its current weights, for the engine.
    pub fn new(net: &ResNet) -> Result<Self> {
        let (stem, blocks) = resnet_layers(net)?;
        if stem.cout != STEM {
            candle_core::bail!("channels-last ResNet: a {}-channel stem", stem.cout);
        }
        let blocks: Vec<Block> = blocks
            .into_iter()
            .map(|(convs, downsample)| Block { convs, downsample })
            .collect();
        let dim = blocks
            .last()
            .and_then(|b| b.convs.last())
            .map_or(STEM, |l| l.cout);
        Ok(Self {
            stem,
            blocks,
            dim,
            depthwise: nhwc::depthwise_kernel(),
            workspaces: WorkspacePool::default(),
        })
    }

    /// Width of the embedding (512, or 2048 for ResNet-50).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Runs the dense and pointwise products in `precision` ([`Precision::Bf16`]: bf16
    /// operands, f32 sums and activations). Errors for bf16 on a CPU without AVX512-BF16.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        crate::ops::bf16_gemm::check(precision)?;
        let layers = self
            .blocks
            .iter_mut()
            .flat_map(|b| b.convs.iter_mut().chain(b.downsample.as_mut()));
        for layer in std::iter::once(&mut self.stem).chain(layers) {
            layer.set_precision(precision);
        }
        Ok(())
    }

    /// The stem's max-pool: 3×3, stride 2, padding 1.
    pub(super) fn pool_geometry(size: (usize, usize)) -> Result<ConvGeometry> {
        ConvGeometry::new(size.0, size.1, 3, 2, (1, 1, 1, 1)).ok_or_else(|| {
            candle_core::Error::Msg(format!("a {}×{} map is too small", size.0, size.1))
        })
    }

    /// The largest buffer one image needs, in f32.
    fn per_image(&self, size: (usize, usize)) -> Result<usize> {
        let (mut most, size) = self.stem.footprint(size)?;
        let g = Self::pool_geometry(size)?;
        let mut size = (g.out_h, g.out_w);
        for block in &self.blocks {
            let input = size;
            for conv in &block.convs {
                let (floats, out) = conv.footprint(size)?;
                most = most.max(floats);
                size = out;
            }
            if let Some(d) = &block.downsample {
                most = most.max(d.footprint(input)?.0);
            }
        }
        Ok(most)
    }

    /// Pooled features `[N, D]` of images `[N, 3, H, W]` (f32, on the CPU).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w) = input_size(&self.stem, x)?;
        let per = self.per_image((h, w))?;
        self.workspaces
            .run_chunked(x, BUFFERS, per, self.dim, |x, n, ws, out| {
                self.run_chunk(x, n, (h, w), ws, out)
            })
    }

    fn run_chunk(
        &self,
        x: &[f32],
        n: usize,
        size: (usize, usize),
        ws: &mut super::Workspace,
        out: &mut [f32],
    ) -> Result<()> {
        let dw = self.depthwise;
        let size = apply_stem(&self.stem, x, ws, (A, C), n, size, dw)?;
        let g = Self::pool_geometry(size)?;
        let (inp, outp) = (size.0 * size.1 * STEM, g.out_h * g.out_w * STEM);
        {
            let (a, x_buf) = pair(ws, A, X);
            for i in 0..n {
                nhwc::max_pool_hwc(
                    &a[i * inp..][..inp],
                    STEM,
                    &g,
                    &mut x_buf[i * outp..][..outp],
                );
            }
        }
        let mut size = (g.out_h, g.out_w);
        for block in &self.blocks {
            let input = size;
            let mut src = X;
            for conv in &block.convs {
                let dst = if src == A { B } else { A };
                apply_in(conv, ws, src, dst, C, n, size, dw)?;
                size = conv.out_size(size)?;
                src = dst;
            }
            let cout = block.convs.last().map_or(0, |l| l.cout);
            let shortcut = match &block.downsample {
                Some(d) => {
                    apply_in(d, ws, X, S, C, n, input, dw)?;
                    S
                }
                None => X,
            };
            let len = n * size.0 * size.1 * cout;
            let (sc, y) = pair(ws, shortcut, src);
            nhwc::add_act(&mut y[..len], &sc[..len], Act::Relu);
            ws.swap(X, src);
        }
        global_avg_pool(&ws[X], n, size.0 * size.1, self.dim, out);
        Ok(())
    }
}
