//! 3×3 convolutions of stride 1 and padding 1 on channels-last maps by Winograd's minimal
//! filtering F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016): each 2×2 output tile is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for its 4×4 input window `d`, so
//! the products over channels become 16 matrix products `[tiles, cin] × [cin, cout]`, one per
//! transformed position, with 16 multiplications per tile and channel pair instead of 36.
//! Forward, input gradient (the same convolution with the kernel flipped and the channels
//! swapped) and weight gradient (`Gᵀ [Σ_tiles (Bᵀ d B) ⊙ (A dy Aᵀ)] G`, the adjoint) share the
//! transforms. The transforms' coefficients are 0, ±1 and ±½, so small-integer convolutions
//! come out exact, and the f32 rounding stays near that of the direct sum.
//!
//! Tiles are taken in blocks whose transformed inputs and outputs stay near the cache while
//! the 16 products run ([`super::packed_gemm`] for them); each function is single-threaded
//! (the engine splits a batch over threads).

use super::bf16_gemm::Precision;
use super::nhwc::{Act, ConvGeometry};
use super::nhwc_grad;
use super::packed_gemm::{self, PackedWeight};

/// Positions of a transformed 4×4 tile.
const POSITIONS: usize = 16;
/// Channels per step of the transforms (one AVX-512 register of f32, one packed panel).
const LANES: usize = 16;
const _: () = assert!(LANES == packed_gemm::PANEL);
/// Floats of one block's transformed inputs and outputs (1 MiB).
const BLOCK_FLOATS: usize = 256 * 1024;
/// Fewest tiles per block: below this the products are too thin.
const MIN_BLOCK_TILES: usize = 96;

/// Whether the transforms run in AVX-512 code (else the baseline target's).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` function of the same
/// arguments) compiled for AVX-512 when the CPU has it: the transforms are written over
/// 16-lane arrays, which that target turns into one register each.
macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if avx512() {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns Winograd's products off (`false`) or back on for the layers of the channels-last
/// engine built or re-packed afterwards: the im2col path as the reference in benchmarks.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the engine's layers take Winograd's products ([`set_enabled`]; on by default).
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `g` is a convolution this module computes: 3×3, stride 1, padding 1 on each side.
pub fn applies(g: &ConvGeometry) -> bool {
    g.kernel == 3
        && g.stride == 1
        && g.pad_top == 1
        && g.pad_left == 1
        && g.out_h == g.h
        && g.out_w == g.w
}

/// Which convolution a [`WinogradWeight`] computes from a layer's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The layer's own: `cin` channels in, `cout` out.
    Forward,
    /// Its input gradient: the kernel flipped, `cout` channels in, `cin` out.
    InputGrad,
}

/// A 3×3 weight transformed for F(2×2, 3×3): `U_p = (G g Gᵀ)_p`, 16 matrices
/// `[outputs, inputs]`, packed for the fused product where the CPU has it.
#[derive(Debug, Clone)]
pub struct WinogradWeight {
    role: Role,
    /// `[16][outputs][inputs]`, where the products are not packed.
    u: Vec<f32>,
    /// The 16 matrices packed for the fused product (on CPUs with AVX-512F).
    packed: Vec<PackedWeight>,
    /// The products' bias (zero: the layer's is added after the output transform).
    zeros: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl WinogradWeight {
    /// Transforms `w`, a dense weight in the engine's layout `[cout, 3, 3, cin]`, for `role`.
    pub fn new(w: &[f32], cout: usize, cin: usize, role: Role) -> Self {
        let inputs = if role == Role::Forward { cin } else { cout };
        let packs = packed_gemm::fused_available() && inputs <= packed_gemm::MAX_K;
        Self::with_packing(w, (cout, cin), role, packs)
    }

    /// [`Self::new`], packed for the fused product or not (`packs` needs AVX-512F).
    fn with_packing(w: &[f32], (cout, cin): (usize, usize), role: Role, packs: bool) -> Self {
        let (inputs, outputs) = match role {
            Role::Forward => (cin, cout),
            Role::InputGrad => (cout, cin),
        };
        let mut weight = Self {
            role,
            u: if packs {
                Vec::new()
            } else {
                vec![0f32; POSITIONS * inputs * outputs]
            },
            packed: if packs {
                (0..POSITIONS)
                    .map(|_| PackedWeight::zeros(outputs, inputs))
                    .collect()
            } else {
                Vec::new()
            },
            zeros: vec![0f32; outputs],
            inputs,
            outputs,
        };
        weight.repack(w);
        weight
    }

    /// Transforms `w` (the same shape) again, after training changed it.
    pub fn repack(&mut self, w: &[f32]) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let shape = match self.role {
            Role::Forward => (outputs, inputs),
            Role::InputGrad => (inputs, outputs),
        };
        assert_eq!(
            w.len(),
            shape.0 * 9 * shape.1,
            "winograd: weight of {} floats",
            w.len()
        );
        transform_weight(w, shape, self.role, &mut self.u, &mut self.packed);
    }

    /// Input channels of the convolution it computes.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output channels of the convolution it computes.
    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

dispatch! {
    /// The 16 matrices `[outputs][inputs]` from the dense weight `w` `[cout, 3, 3, cin]`
    /// for `role`, into `packed` when it holds them, else into `u`; over 16 of `w`'s input
    /// channels at a time (read contiguously; the rows written while `cout` runs stay in L1).
    fn transform_weight => transform_weight_body(
        w: &[f32],
        shape: (usize, usize),
        role: Role,
        u: &mut [f32],
        packed: &mut [PackedWeight],
    )
}

#[inline(always)]
fn transform_weight_body(
    w: &[f32],
    (cout, cin): (usize, usize),
    role: Role,
    u: &mut [f32],
    packed: &mut [PackedWeight],
) {
    let plane = cin * cout;
    let mut i0 = 0;
    while i0 < cin {
        let lanes = LANES.min(cin - i0);
        for o in 0..cout {
            let mut g = [[0f32; LANES]; 9];
            for (tap, g) in g.iter_mut().enumerate() {
                // The input gradient's kernel is flipped.
                let tap = if role == Role::Forward { tap } else { 8 - tap };
                *g = load(&w[(o * 9 + tap) * cin + i0..], lanes);
            }
            let mut t = [[0f32; LANES]; POSITIONS];
            for l in 0..LANES {
                let one = [
                    [g[0][l], g[1][l], g[2][l]],
                    [g[3][l], g[4][l], g[5][l]],
                    [g[6][l], g[7][l], g[8][l]],
                ];
                for (p, v) in kernel_transform(&one).into_iter().enumerate() {
                    t[p][l] = v;
                }
            }
            for (p, t) in t.iter().enumerate() {
                match (role, packed.get_mut(p)) {
                    // Outputs o, inputs i0 + l: lane l at depth i0 + l of o's panel.
                    (Role::Forward, Some(pw)) => {
                        for (l, v) in t.iter().enumerate().take(lanes) {
                            pw.panel_row_mut(o / LANES, i0 + l)[o % LANES] = *v;
                        }
                    }
                    // Outputs i0 + l (one whole panel), input o: one panel row.
                    (Role::InputGrad, Some(pw)) => {
                        store(pw.panel_row_mut(i0 / LANES, o), t, lanes);
                    }
                    (Role::Forward, None) => store(&mut u[p * plane + o * cin + i0..], t, lanes),
                    (Role::InputGrad, None) => {
                        for (l, v) in t.iter().enumerate().take(lanes) {
                            u[p * plane + (i0 + l) * cout + o] = *v;
                        }
                    }
                }
            }
        }
        i0 += lanes;
    }
}

/// `G g Gᵀ` for a 3×3 kernel `g`, row-major over the 4×4 positions.
#[inline(always)]
fn kernel_transform(g: &[[f32; 3]; 3]) -> [f32; POSITIONS] {
    // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
    let col = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let t: [[f32; 4]; 3] = std::array::from_fn(|ky| col(g[ky][0], g[ky][1], g[ky][2]));
    let mut u = [0f32; POSITIONS];
    for j in 0..4 {
        let c = col(t[0][j], t[1][j], t[2][j]);
        for i in 0..4 {
            u[i * 4 + j] = c[i];
        }
    }
    u
}

/// The tiles of `n` maps of `size`: 2×2 output pixels each, the last row / column of tiles
/// cut at an odd edge.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    total: usize,
}

impl Tiles {
    fn new(n: usize, (h, w): (usize, usize)) -> Self {
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        Self {
            h,
            w,
            th,
            tw,
            total: n * th * tw,
        }
    }

    /// (image, top output row, left output column) of tile `t`.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let per = self.th * self.tw;
        let (img, r) = (t / per, t % per);
        (img, 2 * (r / self.tw), 2 * (r % self.tw))
    }

    /// Tiles per block for products `[tiles, inputs] × [inputs, outputs]`.
    fn block(&self, inputs: usize, outputs: usize) -> usize {
        (BLOCK_FLOATS / (POSITIONS * (inputs + outputs)).max(1))
            .max(MIN_BLOCK_TILES)
            .min(self.total)
            .max(1)
    }
}

/// Scratch floats [`conv`] needs for `n` maps of `size`.
pub fn conv_scratch(wt: &WinogradWeight, n: usize, size: (usize, usize)) -> usize {
    let tiles = Tiles::new(n, size);
    POSITIONS * tiles.block(wt.inputs, wt.outputs) * (wt.inputs + wt.outputs)
}

/// `out = act(conv(x) + bias (+ residual))` for `n` channels-last maps `x` `[h, w, inputs]`
/// into `out` `[h, w, outputs]` (overwritten), the 3×3 convolution of stride 1 and padding 1
/// that `wt` holds; `scratch` takes at least [`conv_scratch`] floats.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    x: &[f32],
    n: usize,
    size: (usize, usize),
    wt: &WinogradWeight,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (ci, co) = (wt.inputs, wt.outputs);
    let tiles = Tiles::new(n, size);
    let pixels = n * size.0 * size.1;
    assert!(
        x.len() >= pixels * ci
            && out.len() >= pixels * co
            && residual.is_none_or(|r| r.len() >= pixels * co)
            && bias.is_none_or(|b| b.len() == co),
        "winograd conv: buffers too small for {n} maps of {size:?} × {ci} → {co}"
    );
    let block = tiles.block(ci, co);
    let (v, rest) = scratch.split_at_mut(POSITIONS * block * ci);
    let m = &mut rest[..POSITIONS * block * co];
    let mut t0 = 0;
    while t0 < tiles.total {
        let rows = block.min(tiles.total - t0);
        input_transform(x, ci, &tiles, t0..t0 + rows, v, block);
        for p in 0..POSITIONS {
            let a = &v[p * block * ci..][..rows * ci];
            let dst = &mut m[p * block * co..][..rows * co];
            match wt.packed.get(p) {
                Some(packed) => packed_gemm::packed_bias(a, rows, packed, &wt.zeros, dst),
                None => {
                    let u = &wt.u[p * ci * co..][..ci * co];
                    let zeros = &wt.zeros;
                    packed_gemm::dense_bias_act(a, rows, u, None, zeros, None, Act::Identity, dst)
                }
            }
        }
        output_transform(
            m,
            block,
            co,
            &tiles,
            t0..t0 + rows,
            bias,
            residual,
            act,
            out,
        );
        t0 += rows;
    }
}

/// Whether [`weight_grad_acc`] beats the im2col product for `n` maps of `size`: its fixed
/// cost (16 `[cout, cin]` sums read and written per block, and their adjoint) pays when there
/// are about as many tiles as channels (measured with `cargo bench --bench products`: 1.4×
/// faster for ResNet-18's layer1 and layer3 on 4 images, 0.6× for layer4's 7×7 maps).
pub fn weight_grad_pays(n: usize, size: (usize, usize), (cin, cout): (usize, usize)) -> bool {
    2 * Tiles::new(n, size).total >= cin.max(cout)
}

/// Scratch floats [`weight_grad_acc`] needs for `n` maps of `size`.
pub fn weight_grad_scratch((cin, cout): (usize, usize), n: usize, size: (usize, usize)) -> usize {
    let tiles = Tiles::new(n, size);
    POSITIONS * (tiles.block(cin, cout) * (cin + cout) + cin * cout)
}

/// `dw += ∂/∂w` of the 3×3 convolution (stride 1, padding 1) of `n` maps `x` `[h, w, cin]`
/// given the gradient `dy` `[h, w, cout]` of its output (before bias and activation); `dw` in
/// the engine's layout `[cout, 3, 3, cin]`; `scratch` takes at least [`weight_grad_scratch`].
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_acc(
    x: &[f32],
    dy: &[f32],
    n: usize,
    size: (usize, usize),
    (cin, cout): (usize, usize),
    dw: &mut [f32],
    scratch: &mut [f32],
) {
    let tiles = Tiles::new(n, size);
    let pixels = n * size.0 * size.1;
    assert!(
        x.len() >= pixels * cin && dy.len() >= pixels * cout && dw.len() == cout * 9 * cin,
        "winograd weight gradient: buffers too small for {n} maps of {size:?} × {cin} → {cout}"
    );
    let block = tiles.block(cin, cout);
    let (v, rest) = scratch.split_at_mut(POSITIONS * block * cin);
    let (d, s) = rest.split_at_mut(POSITIONS * block * cout);
    let s = &mut s[..POSITIONS * cin * cout];
    s.fill(0.0);
    let mut t0 = 0;
    while t0 < tiles.total {
        let rows = block.min(tiles.total - t0);
        input_transform(x, cin, &tiles, t0..t0 + rows, v, block);
        grad_transform(dy, cout, &tiles, t0..t0 + rows, d, block);
        for p in 0..POSITIONS {
            nhwc_grad::weight_grad_acc(
                Precision::F32,
                &d[p * block * cout..][..rows * cout],
                &v[p * block * cin..][..rows * cin],
                &mut s[p * cin * cout..][..cin * cout],
                (rows, cin, cout),
            );
        }
        t0 += rows;
    }
    adjoint_acc(s, cin, cout, dw);
}

/// `Gᵀ S G` for a 4×4 `S` (row-major), as 3×3 taps row-major.
#[inline(always)]
fn kernel_adjoint(s: &[f32; POSITIONS]) -> [f32; 9] {
    // Gᵀ's rows: [1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1].
    let row =
        |a: f32, b: f32, c: f32, d: f32| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
    let t: [[f32; 3]; 4] =
        std::array::from_fn(|i| row(s[i * 4], s[i * 4 + 1], s[i * 4 + 2], s[i * 4 + 3]));
    let mut r = [0f32; 9];
    for x in 0..3 {
        let c = row(t[0][x], t[1][x], t[2][x], t[3][x]);
        for y in 0..3 {
            r[y * 3 + x] = c[y];
        }
    }
    r
}

dispatch! {
    /// `Bᵀ d B` of each tile in `range` into `v` `[16][block][c]` (tile `range.start` at row
    /// 0): the 4×4 window at (2·ty − 1, 2·tx − 1), zero outside the map.
    fn input_transform => input_transform_body(
        x: &[f32],
        c: usize,
        tiles: &Tiles,
        range: std::ops::Range<usize>,
        v: &mut [f32],
        block: usize,
    )
}

dispatch! {
    /// `A dy Aᵀ` of each tile's 2×2 output gradient in `range` into `d` `[16][block][c]`,
    /// zero for pixels past an odd edge.
    fn grad_transform => grad_transform_body(
        dy: &[f32],
        c: usize,
        tiles: &Tiles,
        range: std::ops::Range<usize>,
        d: &mut [f32],
        block: usize,
    )
}

dispatch! {
    /// `Aᵀ m A` of each tile in `range` with the bias, residual and activation, into the
    /// pixels of `out` the tile covers.
    fn output_transform => output_transform_body(
        m: &[f32],
        block: usize,
        c: usize,
        tiles: &Tiles,
        range: std::ops::Range<usize>,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        act: Act,
        out: &mut [f32],
    )
}

dispatch! {
    /// `dw += Gᵀ S_(o, i) G` for every channel pair, `s` `[16][cout][cin]`.
    fn adjoint_acc => adjoint_acc_body(s: &[f32], cin: usize, cout: usize, dw: &mut [f32])
}

/// `lanes` floats of `src` (zeros after them), as one 16-lane value.
#[inline(always)]
fn load(src: &[f32], lanes: usize) -> [f32; LANES] {
    let mut v = [0f32; LANES];
    if lanes == LANES {
        v.copy_from_slice(&src[..LANES]);
    } else {
        v[..lanes].copy_from_slice(&src[..lanes]);
    }
    v
}

/// The first `lanes` floats of `v` into `dst`.
#[inline(always)]
fn store(dst: &mut [f32], v: &[f32; LANES], lanes: usize) {
    if lanes == LANES {
        dst[..LANES].copy_from_slice(v);
    } else {
        dst[..lanes].copy_from_slice(&v[..lanes]);
    }
}

/// [`adjoint_acc`] over 16 input channels at a time.
#[inline(always)]
fn adjoint_acc_body(s: &[f32], cin: usize, cout: usize, dw: &mut [f32]) {
    let plane = cin * cout;
    for o in 0..cout {
        let mut i0 = 0;
        while i0 < cin {
            let lanes = LANES.min(cin - i0);
            let mut sp = [[0f32; LANES]; POSITIONS];
            for (p, sp) in sp.iter_mut().enumerate() {
                *sp = load(&s[p * plane + o * cin + i0..], lanes);
            }
            let mut r = [[0f32; LANES]; 9];
            for l in 0..LANES {
                let mut one = [0f32; POSITIONS];
                for (p, v) in one.iter_mut().enumerate() {
                    *v = sp[p][l];
                }
                for (tap, v) in kernel_adjoint(&one).into_iter().enumerate() {
                    r[tap][l] = v;
                }
            }
            for (tap, r) in r.iter().enumerate() {
                let at = (o * 9 + tap) * cin + i0;
                let mut sum = load(&dw[at..], lanes);
                sum.iter_mut().zip(r).for_each(|(d, v)| *d += v);
                store(&mut dw[at..], &sum, lanes);
            }
            i0 += lanes;
        }
    }
}

#[inline(always)]
fn input_transform_body(
    x: &[f32],
    c: usize,
    tiles: &Tiles,
    range: std::ops::Range<usize>,
    v: &mut [f32],
    block: usize,
) {
    let zeros = [0f32; LANES];
    let wide = avx512();
    for (j, t) in range.enumerate() {
        let (img, oy, ox) = tiles.origin(t);
        let map = &x[img * tiles.h * tiles.w * c..][..tiles.h * tiles.w * c];
        let inside = oy >= 1 && ox >= 1 && oy + 2 < tiles.h && ox + 2 < tiles.w;
        let mut c0 = 0;
        #[cfg(target_arch = "x86_64")]
        if wide && inside {
            let from = &map[((oy - 1) * tiles.w + ox - 1) * c..];
            let to = &mut v[j * c..];
            let full = c / LANES * LANES;
            assert!(from.len() >= (3 * tiles.w + 4) * c && to.len() >= (15 * block + 1) * c);
            while c0 < full {
                // SAFETY: AVX-512F is present (`wide`); the window's rows 0..4 and columns
                // 0..4 at channels c0..c0 + 16 lie in `from`, and the 16 positions' rows in
                // `to` (both asserted above, with c0 + 16 <= c).
                unsafe {
                    x86::input_tile(
                        from.as_ptr().add(c0),
                        tiles.w * c,
                        c,
                        to.as_mut_ptr().add(c0),
                        block * c,
                    )
                };
                c0 += LANES;
            }
        }
        while c0 < c {
            let lanes = LANES.min(c - c0);
            let mut d = [zeros; POSITIONS];
            for (q, d) in d.iter_mut().enumerate() {
                let (y, xx) = ((oy + q / 4).wrapping_sub(1), (ox + q % 4).wrapping_sub(1));
                if y < tiles.h && xx < tiles.w {
                    *d = load(&map[(y * tiles.w + xx) * c + c0..], lanes);
                }
            }
            let out = data_transform(&d);
            for (p, o) in out.iter().enumerate() {
                store(&mut v[(p * block + j) * c + c0..], o, lanes);
            }
            c0 += lanes;
        }
    }
}

/// `Bᵀ d B` over 16 lanes: Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
#[inline(always)]
fn data_transform(d: &[[f32; LANES]; POSITIONS]) -> [[f32; LANES]; POSITIONS] {
    let mut t = [[0f32; LANES]; POSITIONS];
    for col in 0..4 {
        for l in 0..LANES {
            let (a, b, c, e) = (d[col][l], d[4 + col][l], d[8 + col][l], d[12 + col][l]);
            t[col][l] = a - c;
            t[4 + col][l] = b + c;
            t[8 + col][l] = c - b;
            t[12 + col][l] = b - e;
        }
    }
    let mut out = [[0f32; LANES]; POSITIONS];
    for row in 0..4 {
        let r = row * 4;
        for l in 0..LANES {
            let (a, b, c, e) = (t[r][l], t[r + 1][l], t[r + 2][l], t[r + 3][l]);
            out[r][l] = a - c;
            out[r + 1][l] = b + c;
            out[r + 2][l] = c - b;
            out[r + 3][l] = b - e;
        }
    }
    out
}

/// A = [[1, 0], [1, 1], [1, −1], [0, −1]].
#[inline(always)]
fn grad_transform_body(
    dy: &[f32],
    c: usize,
    tiles: &Tiles,
    range: std::ops::Range<usize>,
    d: &mut [f32],
    block: usize,
) {
    let zeros = [0f32; LANES];
    for (j, t) in range.enumerate() {
        let (img, oy, ox) = tiles.origin(t);
        let map = &dy[img * tiles.h * tiles.w * c..][..tiles.h * tiles.w * c];
        let mut c0 = 0;
        while c0 < c {
            let lanes = LANES.min(c - c0);
            let mut g = [zeros; 4];
            for (q, g) in g.iter_mut().enumerate() {
                let (y, x) = (oy + q / 2, ox + q % 2);
                if y < tiles.h && x < tiles.w {
                    *g = load(&map[(y * tiles.w + x) * c + c0..], lanes);
                }
            }
            let mut rows = [[0f32; LANES]; 8];
            for col in 0..2 {
                for l in 0..LANES {
                    let (a, b) = (g[col][l], g[2 + col][l]);
                    rows[col][l] = a;
                    rows[2 + col][l] = a + b;
                    rows[4 + col][l] = a - b;
                    rows[6 + col][l] = -b;
                }
            }
            for i in 0..4 {
                let mut out = [[0f32; LANES]; 4];
                for l in 0..LANES {
                    let (a, b) = (rows[2 * i][l], rows[2 * i + 1][l]);
                    out[0][l] = a;
                    out[1][l] = a + b;
                    out[2][l] = a - b;
                    out[3][l] = -b;
                }
                for (k, o) in out.iter().enumerate() {
                    let p = i * 4 + k;
                    store(&mut d[(p * block + j) * c + c0..], o, lanes);
                }
            }
            c0 += lanes;
        }
    }
}

/// Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]; tile `j` of the block is row `j` of `m`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_transform_body(
    m: &[f32],
    block: usize,
    c: usize,
    tiles: &Tiles,
    range: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
) {
    let map_len = tiles.h * tiles.w * c;
    let (lo, hi) = match act {
        Act::Identity => (f32::NEG_INFINITY, f32::INFINITY),
        Act::Relu => (0.0, f32::INFINITY),
        Act::Relu6 => (0.0, 6.0),
    };
    let wide = avx512();
    for (j, t) in range.enumerate() {
        let (img, oy, ox) = tiles.origin(t);
        let mut c0 = 0;
        #[cfg(target_arch = "x86_64")]
        if wide && oy + 1 < tiles.h && ox + 1 < tiles.w {
            let full = c / LANES * LANES;
            let at = img * map_len + (oy * tiles.w + ox) * c;
            let dst = &mut out[at..];
            let res = residual.map(|r| &r[at..]);
            let from = &m[j * c..];
            assert!(
                dst.len() >= (tiles.w + 2) * c
                    && res.is_none_or(|r| r.len() >= (tiles.w + 2) * c)
                    && from.len() >= (15 * block + 1) * c
                    && bias.is_none_or(|b| b.len() >= c)
            );
            while c0 < full {
                // SAFETY: AVX-512F is present (`wide`); the tile's 2×2 pixels at channels
                // c0..c0 + 16 lie in `dst` (and `res`), its 16 positions' rows in `from`, and
                // the bias covers c0 + 16 <= c (all asserted above).
                unsafe {
                    x86::output_tile(
                        from.as_ptr().add(c0),
                        block * c,
                        bias.map(|b| b.as_ptr().add(c0)),
                        res.map(|r| r.as_ptr().add(c0)),
                        (lo, hi),
                        dst.as_mut_ptr().add(c0),
                        (tiles.w * c, c),
                    )
                };
                c0 += LANES;
            }
        }
        while c0 < c {
            let lanes = LANES.min(c - c0);
            let mut s = [[0f32; LANES]; POSITIONS];
            for (p, s) in s.iter_mut().enumerate() {
                *s = load(&m[(p * block + j) * c + c0..], lanes);
            }
            let mut rows = [[0f32; LANES]; 8];
            for col in 0..4 {
                for l in 0..LANES {
                    let (a, b, cc, e) = (s[col][l], s[4 + col][l], s[8 + col][l], s[12 + col][l]);
                    rows[col][l] = a + b + cc;
                    rows[4 + col][l] = b - cc - e;
                }
            }
            let lane_bias = bias.map_or([0f32; LANES], |b| load(&b[c0..], lanes));
            for i in 0..2 {
                let y = oy + i;
                if y >= tiles.h {
                    break;
                }
                let r = &rows[i * 4..][..4];
                for k in 0..2 {
                    let x = ox + k;
                    if x >= tiles.w {
                        break;
                    }
                    let at = img * map_len + (y * tiles.w + x) * c + c0;
                    let mut o = [0f32; LANES];
                    for l in 0..LANES {
                        o[l] = if k == 0 {
                            r[0][l] + r[1][l] + r[2][l]
                        } else {
                            r[1][l] - r[2][l] - r[3][l]
                        } + lane_bias[l];
                    }
                    if let Some(res) = residual {
                        let res = load(&res[at..], lanes);
                        o.iter_mut().zip(&res).for_each(|(o, v)| *o += v);
                    }
                    o.iter_mut().for_each(|v| *v = v.max(lo).min(hi));
                    store(&mut out[at..], &o, lanes);
                }
            }
            c0 += lanes;
        }
    }
}

/// The transforms of one whole tile over 16 channels in AVX-512 registers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `Bᵀ d B` of the 4×4 window at `from` (rows `row` floats apart, pixels `pixel` apart)
    /// into the 16 positions at `to` (`pos` floats apart).
    ///
    /// # Safety
    /// AVX-512F; 16 floats readable at `from + i·row + j·pixel` (i, j < 4) and writable at
    /// `to + p·pos` (p < 16).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_tile(from: *const f32, row: usize, pixel: usize, to: *mut f32, pos: usize) {
        unsafe {
            let ld = |i: usize, j: usize| _mm512_loadu_ps(from.add(i * row + j * pixel));
            let column = |j: usize| {
                let (a, b, c, d) = (ld(0, j), ld(1, j), ld(2, j), ld(3, j));
                [
                    _mm512_sub_ps(a, c),
                    _mm512_add_ps(b, c),
                    _mm512_sub_ps(c, b),
                    _mm512_sub_ps(b, d),
                ]
            };
            let cols = [column(0), column(1), column(2), column(3)];
            let t: [[__m512; 4]; 4] = std::array::from_fn(|i| cols.map(|c| c[i]));
            for (i, t) in t.iter().enumerate() {
                let st = |k: usize, v| _mm512_storeu_ps(to.add((i * 4 + k) * pos), v);
                st(0, _mm512_sub_ps(t[0], t[2]));
                st(1, _mm512_add_ps(t[1], t[2]));
                st(2, _mm512_sub_ps(t[2], t[1]));
                st(3, _mm512_sub_ps(t[1], t[3]));
            }
        }
    }

    /// `Aᵀ m A` of the 16 positions at `from` (`pos` floats apart) plus the bias, the residual
    /// and the clamp to `[lo, hi]`, into the 2×2 pixels at `to` (`(row, pixel)` floats apart;
    /// the residual laid out as `to`).
    ///
    /// # Safety
    /// AVX-512F; 16 floats readable at `from + p·pos`, at `bias` and `residual` (+ the pixel
    /// offsets), writable at the four pixels of `to`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_tile(
        from: *const f32,
        pos: usize,
        bias: Option<*const f32>,
        residual: Option<*const f32>,
        (lo, hi): (f32, f32),
        to: *mut f32,
        (row, pixel): (usize, usize),
    ) {
        unsafe {
            let ld = |p: usize| _mm512_loadu_ps(from.add(p * pos));
            let column = |j: usize| {
                let (a, b, c, d) = (ld(j), ld(4 + j), ld(8 + j), ld(12 + j));
                (
                    _mm512_add_ps(_mm512_add_ps(a, b), c),
                    _mm512_sub_ps(_mm512_sub_ps(b, c), d),
                )
            };
            let cols = [column(0), column(1), column(2), column(3)];
            let r = [cols.map(|c| c.0), cols.map(|c| c.1)];
            let b = bias.map_or(_mm512_setzero_ps(), |b| _mm512_loadu_ps(b));
            let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
            for (i, r) in r.iter().enumerate() {
                let y = [
                    _mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]),
                    _mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]),
                ];
                for (k, y) in y.into_iter().enumerate() {
                    let at = i * row + k * pixel;
                    let mut v = _mm512_add_ps(y, b);
                    if let Some(res) = residual {
                        v = _mm512_add_ps(v, _mm512_loadu_ps(res.add(at)));
                    }
                    _mm512_storeu_ps(to.add(at), _mm512_min_ps(_mm512_max_ps(v, lo), hi));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::nhwc::im2col_hwc;
    use crate::rng::Rng;

    /// The direct convolution through im2col, in f64: `[n, h, w, cin]` → `[n, h, w, cout]`.
    fn direct(x: &[f32], w: &[f32], n: usize, (h, wd): (usize, usize), cin: usize) -> Vec<f64> {
        let cout = w.len() / (9 * cin);
        let g = ConvGeometry::new(h, wd, 3, 1, (1, 1, 1, 1)).unwrap();
        let mut out = Vec::new();
        for img in x.chunks_exact(h * wd * cin).take(n) {
            let mut cols = vec![0f32; h * wd * 9 * cin];
            im2col_hwc(img, cin, &g, &mut cols);
            for row in cols.chunks_exact(9 * cin) {
                for o in 0..cout {
                    let wo = &w[o * 9 * cin..][..9 * cin];
                    out.push(row.iter().zip(wo).map(|(a, b)| *a as f64 * *b as f64).sum());
                }
            }
        }
        out
    }

    fn ints(len: usize, rng: &mut Rng, span: u64) -> Vec<f32> {
        (0..len)
            .map(|_| rng.below(2 * span + 1) as f32 - span as f32)
            .collect()
    }

    #[test]
    fn kernel_transform_and_adjoint_are_transposes() {
        // ⟨G g Gᵀ, S⟩ = ⟨g, Gᵀ S G⟩ for any g and S.
        let mut rng = Rng::new(1);
        let g: [[f32; 3]; 3] =
            std::array::from_fn(|_| std::array::from_fn(|_| rng.below(7) as f32 - 3.0));
        let s: [f32; 16] = std::array::from_fn(|_| rng.below(9) as f32 - 4.0);
        let u = kernel_transform(&g);
        let r = kernel_adjoint(&s);
        let lhs: f32 = u.iter().zip(&s).map(|(a, b)| a * b).sum();
        let rhs: f32 = (0..9).map(|t| g[t / 3][t % 3] * r[t]).sum();
        assert_eq!(lhs, rhs);
    }

    #[test]
    fn small_integer_convolutions_are_exact() {
        let mut rng = Rng::new(2);
        // Edge tiles only, odd edges, channel tails; interior tiles with whole 16-channel
        // groups and a tail (the AVX-512 paths).
        for (n, h, w, cin, cout) in [
            (1, 1, 1, 1, 1),
            (2, 5, 7, 3, 5),
            (1, 4, 4, 17, 33),
            (3, 6, 3, 16, 16),
            (1, 8, 9, 32, 48),
            (2, 7, 6, 20, 18),
        ] {
            let x = ints(n * h * w * cin, &mut rng, 3);
            let wt = ints(cout * 9 * cin, &mut rng, 2);
            let bias = ints(cout, &mut rng, 4);
            let want = direct(&x, &wt, n, (h, w), cin);
            for packs in packings() {
                let weight = WinogradWeight::with_packing(&wt, (cout, cin), Role::Forward, packs);
                let mut out = vec![f32::NAN; n * h * w * cout];
                let mut scratch = vec![0f32; conv_scratch(&weight, n, (h, w))];
                conv(
                    &x,
                    n,
                    (h, w),
                    &weight,
                    Some(&bias),
                    None,
                    Act::Identity,
                    &mut out,
                    &mut scratch,
                );
                for (i, (o, e)) in out.iter().zip(&want).enumerate() {
                    assert_eq!(
                        *o as f64,
                        e + bias[i % cout] as f64,
                        "{n}×{h}×{w}×{cin}→{cout} at {i}, packed: {packs}"
                    );
                }
            }
        }
    }

    /// Both layouts of the transformed weight where the CPU runs the packed one.
    fn packings() -> Vec<bool> {
        if packed_gemm::fused_available() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn random_convolutions_match_the_direct_sum_with_their_epilogue() {
        let mut rng = Rng::new(3);
        let mut uniform = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.unit_f64() as f32 * 2.0 - 1.0)
                .collect()
        };
        for (n, h, w, cin, cout) in [(2, 9, 8, 24, 40), (1, 14, 14, 64, 64), (2, 3, 2, 130, 20)] {
            let (x, wt, bias, res) = (
                uniform(n * h * w * cin),
                uniform(cout * 9 * cin),
                uniform(cout),
                uniform(n * h * w * cout),
            );
            let want = direct(&x, &wt, n, (h, w), cin);
            let weight = WinogradWeight::new(&wt, cout, cin, Role::Forward);
            let mut out = vec![0f32; n * h * w * cout];
            let mut scratch = vec![0f32; conv_scratch(&weight, n, (h, w))];
            conv(
                &x,
                n,
                (h, w),
                &weight,
                Some(&bias),
                Some(&res),
                Act::Relu6,
                &mut out,
                &mut scratch,
            );
            // Each output sums 9·cin products of magnitude ≤ 1; the transforms add a few
            // roundings of sums of that size.
            let tol = 1e-6 * (9 * cin) as f64;
            for (i, (o, e)) in out.iter().zip(&want).enumerate() {
                let e = (e + bias[i % cout] as f64 + res[i] as f64).clamp(0.0, 6.0);
                assert!(
                    (*o as f64 - e).abs() <= tol,
                    "{n}×{h}×{w}×{cin}→{cout} at {i}: {o} vs {e}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_the_direct_adjoints() {
        let mut rng = Rng::new(4);
        for (n, h, w, cin, cout) in [(2, 5, 7, 3, 5), (1, 8, 6, 20, 17)] {
            let x = ints(n * h * w * cin, &mut rng, 3);
            let wt = ints(cout * 9 * cin, &mut rng, 2);
            let dy = ints(n * h * w * cout, &mut rng, 3);
            // Input gradient: dx[p, ci] = Σ_{q, o, tap} dy[q, o]·w[o, tap, ci] over the taps
            // that read p, via im2col's adjoint.
            let g = ConvGeometry::new(h, w, 3, 1, (1, 1, 1, 1)).unwrap();
            let mut want_dx = vec![0f32; n * h * w * cin];
            let mut want_dw = vec![0f32; cout * 9 * cin];
            for img in 0..n {
                let xi = &x[img * h * w * cin..][..h * w * cin];
                let dyi = &dy[img * h * w * cout..][..h * w * cout];
                let mut cols = vec![0f32; h * w * 9 * cin];
                im2col_hwc(xi, cin, &g, &mut cols);
                let mut dcols = vec![0f32; h * w * 9 * cin];
                for (q, row) in dcols.chunks_exact_mut(9 * cin).enumerate() {
                    for o in 0..cout {
                        let d = dyi[q * cout + o];
                        for (r, wv) in row.iter_mut().zip(&wt[o * 9 * cin..][..9 * cin]) {
                            *r += d * wv;
                        }
                        for (dw, xv) in want_dw[o * 9 * cin..][..9 * cin]
                            .iter_mut()
                            .zip(&cols[q * 9 * cin..][..9 * cin])
                        {
                            *dw += d * xv;
                        }
                    }
                }
                nhwc_grad::col2im_hwc_acc(
                    &dcols,
                    cin,
                    &g,
                    &mut want_dx[img * h * w * cin..][..h * w * cin],
                );
            }
            for packs in packings() {
                let back = WinogradWeight::with_packing(&wt, (cout, cin), Role::InputGrad, packs);
                assert_eq!((back.inputs(), back.outputs()), (cout, cin));
                let mut dx = vec![f32::NAN; n * h * w * cin];
                let mut scratch = vec![0f32; conv_scratch(&back, n, (h, w))];
                conv(
                    &dy,
                    n,
                    (h, w),
                    &back,
                    None,
                    None,
                    Act::Identity,
                    &mut dx,
                    &mut scratch,
                );
                assert_eq!(
                    dx, want_dx,
                    "input gradient {n}×{h}×{w}×{cin}→{cout}, packed: {packs}"
                );
            }
            let mut dw = vec![1f32; cout * 9 * cin];
            let mut scratch = vec![f32::NAN; weight_grad_scratch((cin, cout), n, (h, w))];
            weight_grad_acc(&x, &dy, n, (h, w), (cin, cout), &mut dw, &mut scratch);
            let want: Vec<f32> = want_dw.iter().map(|v| v + 1.0).collect();
            assert_eq!(dw, want, "weight gradient {n}×{h}×{w}×{cin}→{cout}");
        }
    }

    #[test]
    fn only_same_size_3x3_convolutions_apply() {
        let g = |h, k, s, p| ConvGeometry::new(h, h, k, s, (p, p, p, p)).unwrap();
        assert!(applies(&g(7, 3, 1, 1)));
        assert!(!applies(&g(7, 3, 2, 1)));
        assert!(!applies(&g(7, 3, 1, 0)));
        assert!(!applies(&g(7, 1, 1, 0)));
    }
}
