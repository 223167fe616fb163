//! CPU inference of a [`Trunk`] (MobileNetV2, EfficientNet-Lite) in channels-last layout.
//!
//! candle runs these networks channels-first, one tensor op at a time, each op spreading
//! itself over the thread pool: at small inputs (64×64, late maps of 2×2 pixels) the time goes
//! to thin matrix products, per-plane depthwise loops, fresh buffers and thread wake-ups. Here
//! a batch is split into chunks of images, one chunk per task; a task runs the whole network on
//! its chunk single-threaded, keeping activations channels-last (`[pixels, channels]`) in four
//! reused buffers. A 1×1 convolution is then one matrix product over every pixel of the chunk,
//! and the depthwise kernel vectorises across channels. Same weights and arithmetic as the
//! candle path (tested to agree within float tolerance); inference only.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::layers::{ConvBn, ConvKind, Padding, Trunk};
use crate::ops::nhwc::{self, ConvGeometry, DepthwiseFn};

/// Most images per task: enough pixels at the 2×2 end of a 64×64 input for a useful matrix
/// product (chunks of 4–32 measured within noise of each other).
const MAX_CHUNK: usize = 8;
/// Floats a chunk's largest activation may take (16 MiB): bounds the buffers at large inputs,
/// e.g. one 224×224 image per task (its 112×112×96 map is 1.2 M floats).
const CHUNK_FLOATS: usize = 4 << 20;

/// The four activation buffers of a task: block input, two scratch buffers, block output.
const X: usize = 0;
const E: usize = 1;
const D: usize = 2;
const P: usize = 3;

/// The activation buffers of one running task.
type Workspace = [Vec<f32>; 4];

/// One convolution with its folded batch-norm, weights on the host.
#[derive(Debug, Clone)]
struct Layer {
    kind: ConvKind,
    /// Pointwise `[cout, cin]`; depthwise tap-major `[k·k, c]`; dense `[cout, cin·k·k]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
    relu6: bool,
}

impl Layer {
    fn from_conv(conv: &ConvBn) -> Result<Self> {
        let w = conv.weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let bias = conv.bias.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let bias = bias.to_vec1::<f32>()?;
        let cout = bias.len();
        let flat = w.flatten_all()?.to_vec1::<f32>()?;
        let (cin, weight) = match conv.kind {
            ConvKind::Pointwise => (w.dim(1)?, flat),
            ConvKind::Depthwise => (cout, nhwc::depthwise_taps_major(&flat, cout, conv.kernel)),
            ConvKind::Dense => (w.dim(1)?, flat),
        };
        let k2 = conv.kernel * conv.kernel;
        let expected = match conv.kind {
            ConvKind::Depthwise => k2 * cout,
            _ => cout * cin * k2,
        };
        if weight.len() != expected {
            candle_core::bail!("channels-last: weight {:?} for {cout} outputs", w.dims());
        }
        Ok(Self {
            kind: conv.kind,
            weight,
            bias,
            cin,
            cout,
            kernel: conv.kernel,
            stride: conv.stride,
            padding: conv.padding,
            relu6: conv.relu6,
        })
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

    /// Applies a pointwise or depthwise layer to `n` images of `size`, channels last.
    fn apply(
        &self,
        src: &[f32],
        dst: &mut [f32],
        n: usize,
        size: (usize, usize),
        depthwise: DepthwiseFn,
    ) -> Result<()> {
        let pixels = size.0 * size.1;
        match self.kind {
            ConvKind::Pointwise => {
                let m = n * pixels;
                let out = &mut dst[..m * self.cout];
                nhwc::matmul_wt(src, &self.weight, out, m, self.cin, self.cout);
                nhwc::bias_act_rows(out, &self.bias, self.relu6);
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
                        self.relu6,
                        &mut dst[i * outp..][..outp],
                    );
                }
            }
            ConvKind::Dense => {
                candle_core::bail!("channels-last: a dense convolution after the stem")
            }
        }
        Ok(())
    }
}

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
    /// Buffers of finished tasks, reused by the next ones (at most one per concurrent task;
    /// freed with the network).
    workspaces: Mutex<Vec<Workspace>>,
}

impl ChannelsLastTrunk {
    /// Copies `trunk`'s weights; errors when its shape is not stem (dense) → blocks of
    /// pointwise/depthwise layers → pointwise head.
    pub fn new(trunk: &Trunk) -> Result<Self> {
        let stem = Layer::from_conv(&trunk.stem)?;
        let head = Layer::from_conv(&trunk.head)?;
        let blocks = trunk
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    layers: b
                        .layers
                        .iter()
                        .map(Layer::from_conv)
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
            workspaces: Mutex::new(Vec::new()),
        })
    }

    /// Width of the embedding.
    pub fn dim(&self) -> usize {
        self.head.cout
    }

    /// The largest buffer one image needs (activations and the stem's im2col matrix), in f32.
    fn per_image(&self, size: (usize, usize)) -> Result<usize> {
        let g = self.stem.geometry(size)?;
        let mut size = (g.out_h, g.out_w);
        let mut most =
            (g.out_h * g.out_w) * (self.stem.cin * g.kernel * g.kernel).max(self.stem.cout);
        for layer in self
            .blocks
            .iter()
            .flat_map(|b| &b.layers)
            .chain([&self.head])
        {
            size = layer.out_size(size)?;
            most = most.max(size.0 * size.1 * layer.cout);
        }
        Ok(most)
    }

    /// Pooled features `[N, D]` of images `[N, C, H, W]` (f32, on the CPU).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.stem.cin {
            candle_core::bail!(
                "channels-last: {c}-channel images for a {}-channel stem",
                self.stem.cin
            );
        }
        let per = self.per_image((h, w))?;
        let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dim = self.dim();
        let mut out = vec![0f32; n * dim];
        let image = c * h * w;
        // Chunks within the memory bound, and at least one per thread when the batch allows.
        let chunk = (CHUNK_FLOATS / per.max(1))
            .min(n.div_ceil(rayon::current_num_threads()))
            .clamp(1, MAX_CHUNK);
        out.par_chunks_mut(chunk * dim)
            .zip(input.par_chunks(chunk * image))
            .try_for_each(|(out, x)| {
                let mut ws = self.take_workspace();
                let m = x.len() / image;
                for buf in ws.iter_mut() {
                    if buf.len() < m * per {
                        buf.resize(m * per, 0.0);
                    }
                }
                let done = self.run_chunk(x, m, (h, w), &mut ws, out);
                self.return_workspace(ws);
                done
            })?;
        Tensor::from_vec(out, (n, dim), &Device::Cpu)
    }

    fn take_workspace(&self) -> Workspace {
        let mut pool = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    fn return_workspace(&self, ws: Workspace) {
        let mut pool = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(ws);
    }

    /// The whole network on `n` images `x` (`[n, C, H, W]`), pooled features into `out`.
    fn run_chunk(
        &self,
        x: &[f32],
        n: usize,
        size: (usize, usize),
        ws: &mut Workspace,
        out: &mut [f32],
    ) -> Result<()> {
        // Stem: im2col of each image, then one product over the chunk's pixels.
        let g = self.stem.geometry(size)?;
        let (rows, cols) = (g.out_h * g.out_w, self.stem.cin * g.kernel * g.kernel);
        let image = self.stem.cin * size.0 * size.1;
        {
            let (lo, hi) = ws.split_at_mut(E);
            let cols_buf = &mut hi[0];
            for i in 0..n {
                nhwc::im2col_chw(
                    &x[i * image..][..image],
                    self.stem.cin,
                    &g,
                    &mut cols_buf[i * rows * cols..][..rows * cols],
                );
            }
            let stem_out = &mut lo[X][..n * rows * self.stem.cout];
            nhwc::matmul_wt(
                cols_buf,
                &self.stem.weight,
                stem_out,
                n * rows,
                cols,
                self.stem.cout,
            );
            nhwc::bias_act_rows(stem_out, &self.stem.bias, self.stem.relu6);
        }
        let mut size = (g.out_h, g.out_w);
        for block in &self.blocks {
            let (mut src, in_size) = (X, size);
            for (i, layer) in block.layers.iter().enumerate() {
                let dst = if i + 1 == block.layers.len() {
                    P
                } else if src == E {
                    D
                } else {
                    E
                };
                let (s, d) = pair(ws, src, dst);
                layer.apply(s, d, n, size, self.depthwise)?;
                size = layer.out_size(size)?;
                src = dst;
            }
            let cout = block.layers.last().map_or(0, |l| l.cout);
            if block.residual {
                if size != in_size {
                    candle_core::bail!("channels-last: a residual block changed the map size");
                }
                let len = n * size.0 * size.1 * cout;
                let (x_buf, p_buf) = pair(ws, X, P);
                p_buf[..len]
                    .iter_mut()
                    .zip(&x_buf[..len])
                    .for_each(|(p, x)| *p += x);
            }
            if !block.layers.is_empty() {
                ws.swap(X, P);
            }
        }
        let (s, d) = pair(ws, X, E);
        self.head.apply(s, d, n, size, self.depthwise)?;
        // Global average pool of each image's pixels.
        let (pixels, dim) = (size.0 * size.1, self.head.cout);
        let scale = 1.0 / pixels as f32;
        for (i, o) in out.chunks_exact_mut(dim).enumerate().take(n) {
            o.fill(0.0);
            for row in d[i * pixels * dim..][..pixels * dim].chunks_exact(dim) {
                o.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            o.iter_mut().for_each(|o| *o *= scale);
        }
        Ok(())
    }
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
