//! ResNet-18/34/50 (torchvision / timm layout, as candle-transformers loads them) on the
//! channels-last engine: the stem (7×7 stride 2, batch-norm, ReLU, 3×3 stride-2 max-pool), then
//! basic or bottleneck blocks with the batch-norms folded into the convolutions and the
//! residual add and ReLU in one pass; global average pooling.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::{apply_in, apply_stem, global_avg_pool, input_size, pair, Layer, WorkspacePool};
use super::{Act, ConvKind, DenseInput, Padding};
use crate::backbone::layers::{ConvBn, ConvBnNames, ConvSpec};
use crate::ops::nhwc::{self, ConvGeometry, DepthwiseFn};

/// Buffers of a task: block input, two intermediates, shortcut, im2col.
const X: usize = 0;
const A: usize = 1;
const B: usize = 2;
const S: usize = 3;
const C: usize = 4;
const BUFFERS: usize = 5;
const BN_EPS: f64 = 1e-5;
/// Stem width, then the width of each stage.
const STEM: usize = 64;
const WIDTHS: [usize; 4] = [64, 128, 256, 512];

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

/// A convolution + batch-norm of the checkpoint (`conv`, `bn` prefixes) with activation `act`.
fn conv_bn(
    conv: VarBuilder,
    bn: VarBuilder,
    (cin, cout, kernel, stride): (usize, usize, usize, usize),
    act: Act,
    input: DenseInput,
) -> Result<Layer> {
    let spec = ConvSpec {
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride,
        padding: Padding::Symmetric(kernel / 2),
        kind: if kernel == 1 && stride == 1 {
            ConvKind::Pointwise
        } else {
            ConvKind::Dense
        },
        relu6: false,
        bn_eps: BN_EPS,
    };
    Layer::from_conv(&ConvBn::load(spec, ConvBnNames { conv, bn })?, act, input)
}

impl ChannelsLastResNet {
    /// Loads ResNet-`depth` (18, 34 or 50) from checkpoint tensors named as torchvision's
    /// (`conv1`, `bn1`, `layerL.I.convJ`, `layerL.I.downsample.{0,1}`); `fc` is ignored.
    pub fn load(depth: usize, vb: VarBuilder) -> Result<Self> {
        let (counts, bottleneck) = match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            _ => candle_core::bail!("ResNet-{depth}: only 18, 34 and 50 are supported"),
        };
        let hwc = DenseInput::Hwc;
        let stem = conv_bn(
            vb.pp("conv1"),
            vb.pp("bn1"),
            (3, STEM, 7, 2),
            Act::Relu,
            DenseInput::Chw,
        )?;
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (stage, (&count, &width)) in counts.iter().zip(&WIDTHS).enumerate() {
            let lvb = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let bvb = lvb.pp(i);
                let cv = |j: usize, shape, act| {
                    conv_bn(
                        bvb.pp(format!("conv{j}")),
                        bvb.pp(format!("bn{j}")),
                        shape,
                        act,
                        hwc,
                    )
                };
                let (convs, cout) = if bottleneck {
                    let out = width * 4;
                    (
                        vec![
                            cv(1, (cin, width, 1, 1), Act::Relu)?,
                            cv(2, (width, width, 3, stride), Act::Relu)?,
                            cv(3, (width, out, 1, 1), Act::Identity)?,
                        ],
                        out,
                    )
                } else {
                    (
                        vec![
                            cv(1, (cin, width, 3, stride), Act::Relu)?,
                            cv(2, (width, width, 3, 1), Act::Identity)?,
                        ],
                        width,
                    )
                };
                let downsample = if stride != 1 || cin != cout {
                    let dvb = bvb.pp("downsample");
                    let shape = (cin, cout, 1, stride);
                    Some(conv_bn(dvb.pp(0), dvb.pp(1), shape, Act::Identity, hwc)?)
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                cin = cout;
            }
        }
        Ok(Self {
            stem,
            blocks,
            dim: cin,
            depthwise: nhwc::depthwise_kernel(),
            workspaces: WorkspacePool::default(),
        })
    }

    /// Width of the embedding (512, or 2048 for ResNet-50).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The stem's max-pool: 3×3, stride 2, padding 1.
    fn pool_geometry(size: (usize, usize)) -> Result<ConvGeometry> {
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
