//! MobileNetV2 / EfficientNet-Lite ([`Trunk`]) on the channels-last engine.

use candle_core::{Result, Tensor};

use super::{apply_in, apply_stem, global_avg_pool, input_size, Layer, WorkspacePool};
use super::{Act, ConvKind, DenseInput};
use crate::backbone::layers::{ConvBn, Padding, Trunk};
use crate::ops::bf16_gemm::Precision;
use crate::ops::nhwc::{self, ConvGeometry, DepthwiseFn};

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
    /// Its (expand →) depthwise → project layers when it can run in bands of rows: an
    /// optional pointwise expand layer, depthwise with the same padding on every side, linear
    /// pointwise.
    fn bandable(&self) -> Option<(Option<&Layer>, &Layer, &Layer)> {
        let (e, d, p) = match self.layers.as_slice() {
            [e, d, p] if e.kind == ConvKind::Pointwise => (Some(e), d, p),
            [d, p] => (None, d, p),
            _ => return None,
        };
        (d.kind == ConvKind::Depthwise
            && matches!(d.padding, Padding::Symmetric(_))
            && p.kind == ConvKind::Pointwise
            && p.act == Act::Identity)
            .then_some((e, d, p))
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
        let e = e?;
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
        let (mut size, skip) = match self.run_stem_banded(x, ws, n, size)? {
            Some(out) => (out, 1),
            None => (apply_stem(&self.stem, x, ws, (X, C), n, size, dw)?, 0),
        };
        for block in &self.blocks[skip..] {
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
    /// by image in bands of output rows, from buffer `X` into `P` ([`Self::run_bands`]).
    /// `None` when the block is not run this way.
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
        let x_buf = std::mem::take(&mut ws[X]);
        let mut p_buf = std::mem::take(&mut ws[P]);
        let residual = block.residual.then_some(&x_buf[..]);
        let source = Rows::Expand(e, &x_buf);
        let done = self.run_bands(
            source,
            (d, p),
            residual,
            ws,
            n,
            size,
            band_floats,
            &mut p_buf,
        );
        ws[X] = x_buf;
        ws[P] = p_buf;
        done.map(Some)
    }

    /// The stem and the first block together, in bands of rows, from the images `x` (as they
    /// arrive, `[n, C, H, W]`) into buffer `X`, when the first block has no expand layer
    /// (MobileNetV2's: depthwise → linear pointwise, no residual), the stem takes the direct
    /// kernel and its map is larger than the band limit: neither the stem's map nor the
    /// depthwise output is written whole. Returns the block's output size; `None` when the
    /// two do not run this way.
    fn run_stem_banded(
        &self,
        x: &[f32],
        ws: &mut super::Workspace,
        n: usize,
        image: (usize, usize),
    ) -> Result<Option<(usize, usize)>> {
        let (Some((above, band_floats)), Some(first)) = (self.bands, self.blocks.first()) else {
            return Ok(None);
        };
        let (d, p) = match first.bandable() {
            Some((None, d, p)) if d.cin == self.stem.cout && p.cin == d.cout && !first.residual => {
                (d, p)
            }
            _ => return Ok(None),
        };
        let size = self.stem.out_size(image)?;
        if self.stem.direct_stem.is_none() || size.0 * size.1 * self.stem.cout <= above {
            return Ok(None);
        }
        let mut out = std::mem::take(&mut ws[X]);
        let source = Rows::Stem(&self.stem, x, image);
        let done = self.run_bands(source, (d, p), None, ws, n, size, band_floats, &mut out);
        ws[X] = out;
        done.map(Some)
    }

    /// A block's depthwise and project layers `(d, p)` on `n` images, image by image in bands
    /// of output rows, into `out`: each band's rows of the depthwise layer's input map (of
    /// `size`) are made by `source` (the block's expand layer, or the stem), convolved
    /// depthwise and projected while they are still in cache, instead of each layer
    /// streaming the whole map through memory; `residual` (the block's input) is added in the
    /// projection's epilogue. The depthwise convolution of a band runs on the band's input
    /// rows as a map of its own, padded only where it meets the image's edges, so its
    /// outputs are exactly the band's rows. The input rows two bands share are moved, not
    /// made again. The same products and sums as on whole maps, to the bit. A band's input
    /// rows and depthwise output take at most `band_floats` floats (buffers `E` and `D`).
    #[allow(clippy::too_many_arguments)]
    fn run_bands(
        &self,
        source: Rows,
        (d, p): (&Layer, &Layer),
        residual: Option<&[f32]>,
        ws: &mut super::Workspace,
        n: usize,
        size: (usize, usize),
        band_floats: usize,
        out: &mut [f32],
    ) -> Result<(usize, usize)> {
        let (h, w) = size;
        let (hid, cout) = (d.cin, p.cout);
        let g = d.geometry(size)?;
        let (oh, ow) = (g.out_h, g.out_w);
        let (k, s) = (d.kernel, d.stride);
        let Padding::Symmetric(pad) = d.padding else {
            candle_core::bail!("channels-last: a banded depthwise layer pads unevenly");
        };
        if residual.is_some() && (s != 1 || (oh, ow) != size || p.cout != source.cin()) {
            candle_core::bail!("channels-last: a residual block changed the map size");
        }
        let (row_in, row_out) = (w * hid, ow * hid);
        // Output rows per band: its input rows (plus the rows it shares with the next band)
        // and its depthwise output within the limit.
        let fits = |b: usize| (b * s + k) * row_in + b * row_out <= band_floats;
        let mut band = 1;
        while band < oh && fits(band + 1) {
            band += 1;
        }
        let e_len = (band * s + k).min(h) * row_in;
        let d_len = band * row_out;
        for (i, len) in [(E, e_len), (D, d_len)] {
            if ws[i].len() < len {
                ws[i].resize(len, 0.0);
            }
        }
        let dw = self.depthwise;
        let mut e_buf = std::mem::take(&mut ws[E]);
        let mut d_buf = std::mem::take(&mut ws[D]);
        let mut run = || -> Result<()> {
            for img in 0..n {
                let out = &mut out[img * oh * ow * cout..][..oh * ow * cout];
                // Image rows [lo, hi) of the input map at the front of `e_buf`.
                let mut held: Option<(usize, usize)> = None;
                for r0 in (0..oh).step_by(band) {
                    let r1 = (r0 + band).min(oh);
                    // Input rows of the band's sub-map: from the first row its first output
                    // reads to the last row its last output reads.
                    let a = (r0 * s).saturating_sub(pad);
                    let b = ((r1 - 1) * s + k).saturating_sub(pad).min(h);
                    let fresh = match held {
                        Some((lo, hi)) if lo <= a && a < hi && hi <= b => {
                            e_buf.copy_within((a - lo) * row_in..(hi - lo) * row_in, 0);
                            hi
                        }
                        _ => a,
                    };
                    if fresh < b {
                        let dst = &mut e_buf[(fresh - a) * row_in..(b - a) * row_in];
                        source.rows(img, fresh..b, size, dst, dw)?;
                    }
                    held = Some((a, b));
                    let top = (pad + a).saturating_sub(r0 * s);
                    let bottom = ((r1 - 1) * s + k).saturating_sub(pad + h);
                    let sg = ConvGeometry::new(b - a, w, k, s, (top, bottom, pad, pad))
                        .filter(|sg| sg.out_h == r1 - r0 && sg.out_w == ow)
                        .ok_or_else(|| {
                            candle_core::Error::Msg(
                                "channels-last: a band does not cover its rows".into(),
                            )
                        })?;
                    let kept = &mut d_buf[..(r1 - r0) * row_out];
                    let input = &e_buf[..(b - a) * row_in];
                    dw(input, &d.weight, &d.bias, &sg, d.act, kept);
                    let kept = &*kept;
                    let dst = &mut out[r0 * ow * cout..r1 * ow * cout];
                    let rows = (r1 - r0, ow);
                    match residual {
                        Some(x) => {
                            let x = &x[(img * oh * ow + r0 * ow) * cout..][..(r1 - r0) * ow * cout];
                            p.apply_residual(kept, dst, x, 1, rows)?
                        }
                        None => p.apply(kept, dst, &mut [], 1, rows, dw)?,
                    }
                }
            }
            Ok(())
        };
        let done = run();
        ws[E] = e_buf;
        ws[D] = d_buf;
        done?;
        Ok((oh, ow))
    }
}

/// Where the rows of a banded block's depthwise input come from.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// The block's expand layer (pointwise) over its input `[n, h, w, cin]`.
    Expand(&'a Layer, &'a [f32]),
    /// The network's stem (direct kernel) over images `[n, C, H, W]` of the given size.
    Stem(&'a Layer, &'a [f32], (usize, usize)),
}

impl Rows<'_> {
    /// Channels per pixel of what the source reads (the block's input, for its residual).
    fn cin(&self) -> usize {
        match self {
            Rows::Expand(e, _) => e.cin,
            Rows::Stem(stem, _, _) => stem.cin,
        }
    }

    /// Rows `rows` of image `img`'s map (`size`, channels last) into `dst`.
    fn rows(
        &self,
        img: usize,
        rows: std::ops::Range<usize>,
        (h, w): (usize, usize),
        dst: &mut [f32],
        dw: DepthwiseFn,
    ) -> Result<()> {
        match *self {
            Rows::Expand(e, x) => {
                let x = &x[img * h * w * e.cin..][..h * w * e.cin];
                let lines = (rows.len(), w);
                e.apply(
                    &x[rows.start * w * e.cin..rows.end * w * e.cin],
                    dst,
                    &mut [],
                    1,
                    lines,
                    dw,
                )
            }
            Rows::Stem(stem, images, image) => {
                let Some((weight, kernel)) = &stem.direct_stem else {
                    candle_core::bail!("channels-last: a banded stem needs the direct kernel");
                };
                let g = stem.geometry(image)?;
                let len = stem.cin * image.0 * image.1;
                let x = &images[img * len..][..len];
                kernel(x, weight, &stem.bias, &g, stem.act, rows, dst);
                Ok(())
            }
        }
    }
}
