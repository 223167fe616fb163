//! MobileNetV2 / EfficientNet-Lite ([`Trunk`]) on the channels-last engine.

use candle_core::{Result, Tensor};

use super::{apply_in, apply_stem, global_avg_pool, input_size, Layer, WorkspacePool};
use super::{Act, ConvKind, DenseInput};
use crate::backbone::layers::{ConvBn, Padding, Trunk};
use crate::ops::bf16_gemm::Precision;
use crate::ops::nhwc::{self, DepthwiseFn};

/// Buffers of a task: block input, two scratch buffers, block output, im2col.
const X: usize = 0;
const E: usize = 1;
const D: usize = 2;
const P: usize = 3;
const C: usize = 4;
const BUFFERS: usize = 5;

/// Floats of one image's expanded map above which an inverted-residual block runs in bands
/// of rows ([`ChannelsLastTrunk::run_banded`]), and floats a band's expanded rows and
/// depthwise output take at most (within a core's L2 cache). Measured on MobileNetV2, batches
/// of 32 on 2 cores: 13–17% faster at 224×224, 5–8% at 256×256, unchanged at 64×64.
pub const DEFAULT_BANDS: (usize, usize) = (64 * 1024, 192 * 1024);

/// An inverted-residual block.
#[derive(Debug, Clone)]
struct Block {
    layers: Vec<Layer>,
    residual: bool,
}

impl Block {
    /// Its expand → depthwise → project layers when it can run in bands of rows: pointwise,
    /// depthwise with the same padding on every side, linear pointwise.
    fn bandable(&self) -> Option<(&Layer, &Layer, &Layer)> {
        match self.layers.as_slice() {
            [e, d, p]
                if e.kind == ConvKind::Pointwise
                    && d.kind == ConvKind::Depthwise
                    && matches!(d.padding, Padding::Symmetric(_))
                    && p.kind == ConvKind::Pointwise
                    && p.act == Act::Identity =>
            {
                Some((e, d, p))
            }
            _ => None,
        }
    }
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
    /// Band limits ([`DEFAULT_BANDS`]); `None`: every block on whole maps.
    bands: Option<(usize, usize)>,
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
            bands: Some(DEFAULT_BANDS),
        })
    }

    /// How blocks whose expanded map outgrows a core's cache run: `Some((above, floats))`
    /// runs blocks whose expanded map (one image) has more than `above` floats in bands of
    /// rows of at most `floats` floats ([`DEFAULT_BANDS`] by default); `None` runs every
    /// block on whole maps. The arithmetic is the same either way; tests force small bands.
    pub fn set_bands(&mut self, bands: Option<(usize, usize)>) {
        self.bands = bands;
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
    /// A block run in bands holds only its output whole (its bands' buffers are sized when it
    /// runs), so a chunk can take more images.
    fn per_image(&self, size: (usize, usize)) -> Result<usize> {
        let (mut most, mut size) = self.stem.footprint(size)?;
        for block in &self.blocks {
            if self.banded(block, size).is_some() {
                let out = block.layers.iter().try_fold(size, |s, l| l.out_size(s))?;
                let cout = block.layers.last().map_or(0, |l| l.cout);
                most = most.max(out.0 * out.1 * cout);
                size = out;
                continue;
            }
            for layer in &block.layers {
                let (floats, out) = layer.footprint(size)?;
                most = most.max(floats);
                size = out;
            }
        }
        Ok(most.max(self.head.footprint(size)?.0))
    }

    /// The expand, depthwise and project layers and the band limit of `block` when it runs
    /// in bands on maps of `size` ([`Self::run_banded`]).
    fn banded<'a>(
        &self,
        block: &'a Block,
        (h, w): (usize, usize),
    ) -> Option<(&'a Layer, &'a Layer, &'a Layer, usize)> {
        let (above, band_floats) = self.bands?;
        let (e, d, p) = block.bandable()?;
        (h * w * e.cout > above && d.cin == e.cout && p.cin == e.cout).then_some((
            e,
            d,
            p,
            band_floats,
        ))
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
            if let Some(out) = self.run_banded(block, ws, n, size)? {
                ws.swap(X, P);
                size = out;
                continue;
            }
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

    /// An inverted-residual block whose expanded map is larger than the band limit, run image
    /// by image in bands of output rows, from buffer `X` into `P`: each band's input rows are
    /// expanded, convolved depthwise and projected while they are still in cache, instead of
    /// each layer streaming the whole map through memory. The depthwise convolution of a band
    /// runs on the band's expanded rows as a map of its own: rows of its output that would see
    /// that map's edge are not kept, except at the image's real edges, where its padding is
    /// the image's. The expanded rows two bands share are moved, not computed again. The
    /// same products and sums as on whole maps, to the bit. `None` when the block is not run
    /// this way.
    fn run_banded(
        &self,
        block: &Block,
        ws: &mut super::Workspace,
        n: usize,
        size: (usize, usize),
    ) -> Result<Option<(usize, usize)>> {
        let Some((e, d, p, band_floats)) = self.banded(block, size) else {
            return Ok(None);
        };
        let (h, w) = size;
        let (cin, hid, cout) = (e.cin, e.cout, p.cout);
        let g = d.geometry(size)?;
        let (oh, ow) = (g.out_h, g.out_w);
        let (k, s) = (d.kernel, d.stride);
        let Padding::Symmetric(pad) = d.padding else {
            return Ok(None);
        };
        if block.residual && (s != 1 || (oh, ow) != size || cin != cout) {
            candle_core::bail!("channels-last: a residual block changed the map size");
        }
        let (row_in, row_out) = (w * hid, ow * hid);
        // Output rows per band: its expanded rows (plus the rows it shares with the next
        // band) and its depthwise output (plus the rows not kept) within the limit.
        let fits = |b: usize| (b * s + k) * row_in + (b + k) * row_out <= band_floats;
        let mut band = 1;
        while band < oh && fits(band + 1) {
            band += 1;
        }
        let e_len = (band * s + k).min(h) * row_in;
        let d_len = (band + k) * row_out;
        for (i, len) in [(E, e_len), (D, d_len)] {
            if ws[i].len() < len {
                ws[i].resize(len, 0.0);
            }
        }
        let dw = self.depthwise;
        let x_buf = std::mem::take(&mut ws[X]);
        let mut p_buf = std::mem::take(&mut ws[P]);
        let mut e_buf = std::mem::take(&mut ws[E]);
        let mut d_buf = std::mem::take(&mut ws[D]);
        let mut run = || -> Result<()> {
            for img in 0..n {
                let x = &x_buf[img * h * w * cin..][..h * w * cin];
                let out = &mut p_buf[img * oh * ow * cout..][..oh * ow * cout];
                // Image rows [lo, hi) expanded at the front of `e_buf`.
                let mut held: Option<(usize, usize)> = None;
                for r0 in (0..oh).step_by(band) {
                    let r1 = (r0 + band).min(oh);
                    // Input rows of the band's sub-map: from a multiple of the stride, so that
                    // its output rows fall on the image's, to the last row the band reads.
                    let a = (r0 * s).saturating_sub(pad) / s * s;
                    let b = ((r1 - 1) * s + k).saturating_sub(pad).min(h);
                    let fresh = match held {
                        Some((lo, hi)) if lo <= a && a < hi && hi <= b => {
                            e_buf.copy_within((a - lo) * row_in..(hi - lo) * row_in, 0);
                            hi
                        }
                        _ => a,
                    };
                    if fresh < b {
                        e.apply(
                            &x[fresh * w * cin..b * w * cin],
                            &mut e_buf[(fresh - a) * row_in..(b - a) * row_in],
                            &mut [],
                            1,
                            (b - fresh, w),
                            dw,
                        )?;
                    }
                    held = Some((a, b));
                    let sub = (b - a, w);
                    let sg = d.geometry(sub)?;
                    let first = r0 - a / s;
                    if first + (r1 - r0) > sg.out_h || sg.out_w != ow {
                        candle_core::bail!("channels-last: a band does not cover its rows");
                    }
                    d.apply(
                        &e_buf[..(b - a) * row_in],
                        &mut d_buf[..sg.out_h * row_out],
                        &mut [],
                        1,
                        sub,
                        dw,
                    )?;
                    let kept = &d_buf[first * row_out..(first + r1 - r0) * row_out];
                    let dst = &mut out[r0 * ow * cout..r1 * ow * cout];
                    let rows = (r1 - r0, ow);
                    if block.residual {
                        p.apply_residual(kept, dst, &x[r0 * ow * cin..r1 * ow * cin], 1, rows)?;
                    } else {
                        p.apply(kept, dst, &mut [], 1, rows, dw)?;
                    }
                }
            }
            Ok(())
        };
        let done = run();
        ws[X] = x_buf;
        ws[P] = p_buf;
        ws[E] = e_buf;
        ws[D] = d_buf;
        done?;
        Ok(Some((oh, ow)))
    }
}
