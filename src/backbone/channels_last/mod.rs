//! CPU inference of the convolutional backbones in channels-last layout: MobileNetV2 and
//! EfficientNet-Lite ([`ChannelsLastTrunk`]) and ResNet-18/34/50 ([`ChannelsLastResNet`]).
//!
//! candle runs these networks channels-first, one tensor op at a time, each op spreading
//! itself over the thread pool: at small maps the time goes to thin matrix products, per-plane
//! loops, fresh buffers and thread wake-ups, and every batch-norm, activation and residual add
//! is a pass of its own. Here a batch is split into chunks of images, one chunk per task; a task
//! runs the whole network on its chunk single-threaded, keeping activations channels-last
//! (`[pixels, channels]`) in a few reused buffers. A convolution is then one matrix product over
//! every pixel of the chunk (after im2col for k > 1), with the batch-norm folded in and the
//! bias and activation applied in one pass; the depthwise kernel vectorises across channels,
//! and a stem whose output channels fill vectors is a direct convolution ([`crate::ops::stem`]).
//! Same weights and arithmetic as the candle path (tested to agree within float tolerance).
//! [`EngineTrainer`] adds the backward pass for fine-tuning these networks.

mod aligned;
mod resnet;
mod train;
mod train_resnet;
mod train_trunk;
mod trunk;

pub use resnet::ChannelsLastResNet;
pub use train::{EngineTrainer, Forward, Gradients};
pub use trunk::{ChannelsLastTrunk, DEFAULT_BANDS};

use std::sync::Mutex;

use aligned::AlignedFloats;

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::layers::{ConvBn, ConvKind, Padding};
use crate::ops::bf16_gemm::{self, Epilogue, Lhs, PackedRhs, Precision, Rhs, Strided};
use crate::ops::nhwc::{self, Act, ConvGeometry, DepthwiseFn};
use crate::ops::packed_gemm::{self, PackedWeight};
use crate::ops::stem::{self, StemFn, StemWeight};
use crate::ops::winograd::{self, Role, WinogradWeight};

/// Most images per task: enough pixels at the 2×2 end of a 64×64 MobileNetV2 for a useful
/// matrix product (chunks of 4–32 measured within noise of each other).
const MAX_CHUNK: usize = 8;
/// Floats a chunk's largest buffer may take (16 MiB): bounds the buffers at large inputs,
/// e.g. three 224×224 images per MobileNetV2 task (its 112×112×96 map is 1.2 M floats).
const CHUNK_FLOATS: usize = 4 << 20;
/// Floats of a stem's im2col matrix built at a time (256 KiB: a block of output rows whose
/// matrix stays in a core's cache until the product reads it).
const STEM_BLOCK_FLOATS: usize = 64 << 10;

/// The activation buffers of one running task.
type Workspace = Vec<AlignedFloats>;

/// Buffers of finished tasks, reused by the next ones (at most one set per concurrent task;
/// freed with the network that owns the pool).
#[derive(Debug, Default)]
struct WorkspacePool(Mutex<Vec<Workspace>>);

impl WorkspacePool {
    /// Runs `chunk_fn(images, n, workspace, out)` over chunks of the images `x` `[N, C, H, W]`
    /// in parallel and returns the rows it writes, `[N, dim]`. Each workspace holds `buffers`
    /// buffers of `per_image` floats per image.
    fn run_chunked(
        &self,
        x: &Tensor,
        buffers: usize,
        per_image: usize,
        dim: usize,
        chunk_fn: impl Fn(&[f32], usize, &mut Workspace, &mut [f32]) -> Result<()> + Sync,
    ) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        // The images in place when they are a contiguous f32 tensor on the CPU (else a copy).
        let x = x
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let input = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((start, end))) => &cpu.as_slice::<f32>()?[start..end],
            _ => candle_core::bail!("channels-last: images not in host memory"),
        };
        let mut out = vec![0f32; n * dim];
        let image = c * h * w;
        // Chunks within the memory bound, and at least one per thread when the batch allows.
        let chunk = (CHUNK_FLOATS / per_image.max(1))
            .min(n.div_ceil(rayon::current_num_threads()))
            .clamp(1, MAX_CHUNK);
        out.par_chunks_mut(chunk * dim)
            .zip(input.par_chunks(chunk * image))
            .try_for_each(|(out, x)| {
                let mut ws = self.take();
                let m = x.len() / image;
                ws.resize_with(buffers.max(ws.len()), AlignedFloats::default);
                for buf in ws.iter_mut() {
                    if buf.len() < m * per_image {
                        buf.resize(m * per_image, 0.0);
                    }
                }
                let done = chunk_fn(x, m, &mut ws, out);
                self.give_back(ws);
                done
            })?;
        Tensor::from_vec(out, (n, dim), &Device::Cpu)
    }

    fn take(&self) -> Workspace {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    fn give_back(&self, ws: Workspace) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(ws);
    }
}

/// How a dense layer's input is laid out, which fixes its weight's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseInput {
    /// Images as they arrive, channels first (a stem).
    Chw,
    /// Activations, channels last.
    Hwc,
}

/// One convolution with its folded batch-norm, weights on the host.
#[derive(Debug, Clone)]
struct Layer {
    kind: ConvKind,
    /// Pointwise `[cout, cin]`; depthwise tap-major `[k·k, c]`; dense `[cout, cin·k·k]` in the
    /// column order of its input's im2col.
    weight: Vec<f32>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
    act: Act,
    input: DenseInput,
    /// `weight` packed for the fused AVX-512 product (pointwise and dense layers on CPUs that
    /// have it); rebuilt by [`Layer::repack`] whenever `weight` changes.
    packed: Option<PackedWeight>,
    /// The products' arithmetic: [`Precision::Bf16`] when a trainer or
    /// [`crate::backbone::Backbone::set_precision`] asks for it.
    precision: Precision,
    /// With bf16 products, `weight` transposed and packed as bf16 pairs ([`Layer::repack`]).
    packed_bf16: Option<PackedRhs>,
    /// A 3×3 stride-1 layer over channels-last maps on an AVX-512 CPU: its weight
    /// transformed for Winograd's F(2×2, 3×3) ([`winograd`], f32 products), used where the
    /// map's padding keeps its size ([`winograd::applies`]).
    winograd: Option<Box<WinogradWeight>>,
    /// In a trainer, the same for the input gradient (the flipped convolution).
    winograd_grad: Option<Box<WinogradWeight>>,
    /// Whether the layer belongs to a trainer (which also needs `winograd_grad`).
    trains: bool,
    /// A stem (dense over channels-first images) whose output channels fill vectors: its
    /// weight for the direct kernel ([`stem`]), which then replaces im2col and the product.
    direct_stem: Option<(StemWeight, StemFn)>,
}

impl Layer {
    /// The layer of `conv`, with activation `act`; `input` matters for dense layers only.
    fn from_conv(conv: &ConvBn, act: Act, input: DenseInput) -> Result<Self> {
        let (weight, bias) = conv.folded()?;
        let w = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let bias = bias.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let bias = bias.to_vec1::<f32>()?;
        let cout = bias.len();
        let flat = w.flatten_all()?.to_vec1::<f32>()?;
        let k = conv.kernel;
        let (cin, weight) = match conv.kind {
            ConvKind::Pointwise => (w.dim(1)?, flat),
            ConvKind::Depthwise => (cout, nhwc::depthwise_taps_major(&flat, cout, k)),
            ConvKind::Dense => {
                let cin = w.dim(1)?;
                match input {
                    DenseInput::Chw => (cin, flat),
                    DenseInput::Hwc => (cin, nhwc::weight_hwc(&flat, cout, cin, k)),
                }
            }
        };
        let expected = match conv.kind {
            ConvKind::Depthwise => k * k * cout,
            _ => cout * cin * k * k,
        };
        if weight.len() != expected {
            candle_core::bail!("channels-last: weight {:?} for {cout} outputs", w.dims());
        }
        let mut layer = Self {
            kind: conv.kind,
            weight,
            bias,
            cin,
            cout,
            kernel: k,
            stride: conv.stride,
            padding: conv.padding,
            act,
            input,
            packed: None,
            precision: Precision::F32,
            packed_bf16: None,
            winograd: None,
            winograd_grad: None,
            trains: false,
            direct_stem: None,
        };
        layer.repack();
        Ok(layer)
    }

    /// Whether the layer's products may run through Winograd's transforms: a 3×3 stride-1
    /// convolution over channels-last maps on an AVX-512 CPU. Under bf16 products only the
    /// backward takes them (in f32): there they beat bf16 products through im2col, in the
    /// forward they do not (`cargo bench --bench products`).
    fn takes_winograd(&self) -> bool {
        self.kind == ConvKind::Dense
            && self.input == DenseInput::Hwc
            && self.kernel == 3
            && self.stride == 1
            && packed_gemm::fused_available()
            && winograd::enabled()
    }

    /// The Winograd weight of the forward for a map of geometry `g`, when it applies.
    fn winograd_for(&self, g: &ConvGeometry) -> Option<&WinogradWeight> {
        self.winograd.as_deref().filter(|_| winograd::applies(g))
    }

    /// The Winograd weight of the input gradient (a trainer's) for a map of geometry `g`,
    /// when it applies: the backward then takes Winograd's products.
    fn winograd_grad_for(&self, g: &ConvGeometry) -> Option<&WinogradWeight> {
        self.winograd_grad
            .as_deref()
            .filter(|_| winograd::applies(g))
    }

    /// Scratch floats [`Self::apply`] needs for `n` images of `size` (a dense layer's im2col
    /// matrix or Winograd's transformed tiles).
    fn scratch_len(&self, n: usize, size: (usize, usize)) -> Result<usize> {
        if self.kind != ConvKind::Dense || self.direct_stem.is_some() {
            return Ok(0);
        }
        let g = self.geometry(size)?;
        let cols = n * g.out_h * g.out_w * self.cin * self.kernel * self.kernel;
        Ok(match self.winograd_for(&g) {
            Some(w) => cols.max(winograd::conv_scratch(w, n, size)),
            None => cols,
        })
    }

    /// Switches the products to `precision` and packs the weights for it.
    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        self.repack();
    }

    /// Packs `weight` again for the fused product (after training changed it).
    fn repack(&mut self) {
        let k = self.weight.len() / self.cout.max(1);
        self.direct_stem = (self.kind == ConvKind::Dense && self.input == DenseInput::Chw)
            .then(|| StemWeight::new(&self.weight, self.cout, self.cin, self.kernel))
            .flatten()
            .map(|w| (w, stem::stem_kernel()));
        if self.direct_stem.is_some() {
            // The direct kernel replaces the product: no packed weight to keep.
            (self.packed, self.packed_bf16) = (None, None);
            return;
        }
        self.repack_winograd();
        if self.winograd.is_some() && self.padding == Padding::Symmetric(1) {
            // Every map keeps its size: Winograd's products always apply, im2col's never.
            (self.packed, self.packed_bf16) = (None, None);
            return;
        }
        if self.precision == Precision::Bf16 && self.kind != ConvKind::Depthwise {
            let w = Strided::transposed(&self.weight, k);
            match &mut self.packed_bf16 {
                Some(p) => p.repack(w, k, self.cout),
                None => self.packed_bf16 = Some(PackedRhs::new(w, k, self.cout)),
            }
            self.packed = None;
            return;
        }
        self.packed_bf16 = None;
        match &mut self.packed {
            Some(p) if p.n() == self.cout && p.k() == k => p.repack(&self.weight),
            _ => {
                self.packed = (self.kind != ConvKind::Depthwise && packed_gemm::fused_available())
                    .then(|| PackedWeight::new(&self.weight, self.cout, k));
            }
        }
    }

    /// Transforms `weight` again for Winograd's products where the layer takes them: bf16
    /// forwards run through im2col (bf16 products beat Winograd's f32 ones there); a
    /// trainer's backward takes Winograd's in either precision.
    fn repack_winograd(&mut self) {
        let takes = self.takes_winograd();
        let forward = takes && self.precision == Precision::F32;
        let grad = takes && self.trains;
        let (w, shape) = (&self.weight, (self.cout, self.cin));
        refresh_winograd(
            &mut self.winograd,
            forward.then_some(Role::Forward),
            w,
            shape,
        );
        refresh_winograd(
            &mut self.winograd_grad,
            grad.then_some(Role::InputGrad),
            w,
            shape,
        );
    }

    /// `dst = act(src · weightᵀ + bias [+ residual])` over `m` rows of `src`.
    fn product(&self, src: &[f32], m: usize, residual: Option<&[f32]>, dst: &mut [f32]) {
        if let Some(w) = &self.packed_bf16 {
            let k = w.k();
            let epilogue = Epilogue {
                bias: &self.bias,
                residual,
                act: self.act,
            };
            bf16_gemm::gemm(
                (m, self.cout, k),
                &mut dst[..m * self.cout],
                false,
                Lhs::View(Strided::rows(src, k)),
                Rhs::Packed(w),
                Some(epilogue),
            );
            return;
        }
        packed_gemm::dense_bias_act(
            src,
            m,
            &self.weight,
            self.packed.as_ref(),
            &self.bias,
            residual,
            self.act,
            &mut dst[..m * self.cout],
        );
    }

    /// A pointwise layer on `n` images of `size` with a residual added before its activation:
    /// `dst = act(conv(src) + residual)`, in one pass.
    fn apply_residual(
        &self,
        src: &[f32],
        dst: &mut [f32],
        residual: &[f32],
        n: usize,
        size: (usize, usize),
    ) -> Result<()> {
        let m = n * size.0 * size.1;
        if self.kind != ConvKind::Pointwise || residual.len() < m * self.cout {
            candle_core::bail!("channels-last: a fused residual needs a pointwise layer");
        }
        self.product(src, m, Some(&residual[..m * self.cout]), dst);
        Ok(())
    }

    fn geometry(&self, (h, w): (usize, usize)) -> Result<ConvGeometry> {
        let pads = self.padding.resolve(h, w, self.kernel, self.stride);
        ConvGeometry::new(h, w, self.kernel, self.stride, pads).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "a {k}×{k} convolution does not fit a {h}×{w} map",
                k = self.kernel
            ))
        })
    }

    /// Output map size for an input map.
    fn out_size(&self, size: (usize, usize)) -> Result<(usize, usize)> {
        match self.kind {
            ConvKind::Pointwise => Ok(size),
            _ => {
                let g = self.geometry(size)?;
                Ok((g.out_h, g.out_w))
            }
        }
    }

    /// Floats one image needs for this layer's output and its scratch (a dense layer's
    /// im2col matrix or Winograd's tiles); with the output size.
    fn footprint(&self, size: (usize, usize)) -> Result<(usize, (usize, usize))> {
        let out = self.out_size(size)?;
        let floats = (out.0 * out.1 * self.cout).max(self.scratch_len(1, size)?);
        Ok((floats, out))
    }

    /// Applies the layer to `n` images of `size` in `src` (channels last; channels first for a
    /// [`DenseInput::Chw`] stem) into `dst`; dense layers build their im2col in `scratch`.
    fn apply(
        &self,
        src: &[f32],
        dst: &mut [f32],
        scratch: &mut [f32],
        n: usize,
        size: (usize, usize),
        depthwise: DepthwiseFn,
    ) -> Result<()> {
        let pixels = size.0 * size.1;
        match self.kind {
            ConvKind::Pointwise => {
                self.product(src, n * pixels, None, dst);
            }
            ConvKind::Depthwise => {
                let g = self.geometry(size)?;
                let (inp, outp) = (pixels * self.cin, g.out_h * g.out_w * self.cout);
                for i in 0..n {
                    depthwise(
                        &src[i * inp..][..inp],
                        &self.weight,
                        &self.bias,
                        &g,
                        self.act,
                        &mut dst[i * outp..][..outp],
                    );
                }
            }
            ConvKind::Dense => {
                let g = self.geometry(size)?;
                if let Some(w) = self.winograd_for(&g) {
                    let scratch = &mut scratch[..winograd::conv_scratch(w, n, size)];
                    let dst = &mut dst[..n * pixels * self.cout];
                    let bias = Some(&self.bias[..]);
                    winograd::conv(src, n, size, w, bias, None, self.act, dst, scratch);
                    return Ok(());
                }
                let (rows, cols) = (g.out_h * g.out_w, self.cin * self.kernel * self.kernel);
                let image = pixels * self.cin;
                if let (Some(w), DenseInput::Hwc, 0) = (&self.packed_bf16, self.input, self.cin % 2)
                {
                    // bf16 products: im2col straight into the pairs the product reads.
                    let words = cast_words(&mut scratch[..n * rows * cols / 2]);
                    for (x, pairs) in src
                        .chunks_exact(image)
                        .zip(words.chunks_exact_mut(rows * cols / 2))
                    {
                        bf16_gemm::im2col_hwc_pairs(x, self.cin, &g, pairs);
                    }
                    let epilogue = Epilogue {
                        bias: &self.bias,
                        residual: None,
                        act: self.act,
                    };
                    let m = n * rows;
                    let dst = &mut dst[..m * self.cout];
                    bf16_gemm::gemm(
                        (m, self.cout, cols),
                        dst,
                        false,
                        Lhs::Pairs(words),
                        Rhs::Packed(w),
                        Some(epilogue),
                    );
                    return Ok(());
                }
                if let Some((w, kernel)) = &self.direct_stem {
                    for (x, out) in src
                        .chunks_exact(image)
                        .zip(dst.chunks_exact_mut(rows * self.cout))
                        .take(n)
                    {
                        kernel(x, w, &self.bias, &g, self.act, 0..g.out_h, out);
                    }
                    return Ok(());
                }
                if self.input == DenseInput::Chw {
                    // A stem: im2col and product a block of output rows at a time, so the
                    // block's matrix is read back from cache, not memory (each row's sums
                    // are the same whatever the block).
                    let block = (STEM_BLOCK_FLOATS / (g.out_w * cols)).clamp(1, g.out_h);
                    for (x, out) in src
                        .chunks_exact(image)
                        .zip(dst.chunks_exact_mut(rows * self.cout))
                        .take(n)
                    {
                        for oy in (0..g.out_h).step_by(block) {
                            let oys = oy..(oy + block).min(g.out_h);
                            let m = oys.len() * g.out_w;
                            nhwc::im2col_chw_range(x, self.cin, &g, oys, scratch);
                            let out = &mut out[oy * g.out_w * self.cout..][..m * self.cout];
                            self.product(scratch, m, None, out);
                        }
                    }
                    return Ok(());
                }
                for i in 0..n {
                    let (x, m) = (&src[i * image..][..image], &mut scratch[i * rows * cols..]);
                    nhwc::im2col_hwc(x, self.cin, &g, m);
                }
                self.product(scratch, n * rows, None, dst);
            }
        }
        Ok(())
    }
}

/// `slot` holding `w` (`[cout, 3, 3, cin]`) transformed for `role`, or nothing without one.
fn refresh_winograd(
    slot: &mut Option<Box<WinogradWeight>>,
    role: Option<Role>,
    w: &[f32],
    (cout, cin): (usize, usize),
) {
    match (slot.as_mut(), role) {
        (_, None) => *slot = None,
        (Some(t), Some(_)) => t.repack(w),
        (None, Some(role)) => *slot = Some(Box::new(WinogradWeight::new(w, cout, cin, role))),
    }
}

/// A float buffer's memory as 32-bit words (bf16 pairs), for the scratch of a bf16 product.
pub(super) fn cast_words(floats: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment, every bit pattern is valid for
    // both, and the borrow of `floats` is handed on whole.
    unsafe { std::slice::from_raw_parts_mut(floats.as_mut_ptr().cast::<u32>(), floats.len()) }
}

/// The `(h, w)` of images `x` `[N, C, H, W]`, checking `C` against the stem's input channels.
fn input_size(stem: &Layer, x: &Tensor) -> Result<(usize, usize)> {
    let (_, c, h, w) = x.dims4()?;
    if c != stem.cin {
        candle_core::bail!(
            "channels-last: {c}-channel images for a {}-channel stem",
            stem.cin
        );
    }
    Ok((h, w))
}

/// The stem on `n` images as they arrive (channels first, not in a buffer) into buffer `dst`,
/// its im2col in buffer `scratch`; returns the output map size.
fn apply_stem(
    stem: &Layer,
    images: &[f32],
    ws: &mut Workspace,
    (dst, scratch): (usize, usize),
    n: usize,
    size: (usize, usize),
    depthwise: DepthwiseFn,
) -> Result<(usize, usize)> {
    let mut cols = std::mem::take(&mut ws[scratch]);
    let done = stem.apply(images, &mut ws[dst], &mut cols, n, size, depthwise);
    ws[scratch] = cols;
    done?;
    stem.out_size(size)
}

/// Buffer `src` to read and buffer `dst` to write (distinct).
fn pair(ws: &mut Workspace, src: usize, dst: usize) -> (&[f32], &mut [f32]) {
    debug_assert_ne!(src, dst);
    if src < dst {
        let (lo, hi) = ws.split_at_mut(dst);
        (&lo[src], &mut hi[0])
    } else {
        let (lo, hi) = ws.split_at_mut(src);
        (&hi[0], &mut lo[dst])
    }
}

/// `layer` from buffer `src` into buffer `dst`, with buffer `scratch` for its im2col.
#[allow(clippy::too_many_arguments)]
fn apply_in(
    layer: &Layer,
    ws: &mut Workspace,
    src: usize,
    dst: usize,
    scratch: usize,
    n: usize,
    size: (usize, usize),
    depthwise: DepthwiseFn,
) -> Result<()> {
    let mut cols = std::mem::take(&mut ws[scratch]);
    let (s, d) = pair(ws, src, dst);
    let done = layer.apply(s, d, &mut cols, n, size, depthwise);
    ws[scratch] = cols;
    done
}

/// The mean over each image's `pixels` rows of `x` (`[n · pixels, dim]`) into `out` `[n, dim]`.
fn global_avg_pool(x: &[f32], n: usize, pixels: usize, dim: usize, out: &mut [f32]) {
    let scale = 1.0 / pixels as f32;
    for (i, o) in out.chunks_exact_mut(dim).enumerate().take(n) {
        o.fill(0.0);
        for row in x[i * pixels * dim..][..pixels * dim].chunks_exact(dim) {
            o.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        o.iter_mut().for_each(|o| *o *= scale);
    }
}
