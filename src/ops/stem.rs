//! A network's stem convolution done directly: channels-first images (as they arrive) into a
//! channels-last map, with bias and activation, and no im2col matrix.
//!
//! A stem has few input channels (3) and a strided kernel, so its im2col matrix is long and
//! thin (27 columns for 3×3 over RGB) and building it costs about what the product does. Here
//! each output pixel's channels are vectors of sums: every in-map tap broadcasts one input
//! float into all of them, and a strip of pixels shares each tap's weight vectors.

use std::ops::Range;

use super::nhwc::{act_bounds, lanes, lanes_mut, Act, ConvGeometry, LANES};

/// Output channels a strip's sums cover at once (two vectors: a 3×3 RGB stem's 32).
const BLOCK: usize = 2 * LANES;
/// Pixels of a row a strip computes at once.
const STRIP: usize = 8;

/// A stem's `[cout, cin, k, k]` weight laid out tap-major, `[cin · k · k, cout]`, for
/// [`StemFn`].
#[derive(Debug, Clone)]
pub struct StemWeight {
    taps: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
}

impl StemWeight {
    /// The layout of `weight` (`[cout, cin, k, k]`); `None` when `cout` is not a multiple of
    /// 16 or the lengths disagree (such a stem takes im2col and a product).
    pub fn new(weight: &[f32], cout: usize, cin: usize, kernel: usize) -> Option<Self> {
        let cols = cin * kernel * kernel;
        if cout == 0 || !cout.is_multiple_of(LANES) || cols == 0 || weight.len() != cout * cols {
            return None;
        }
        let mut taps = vec![0f32; cols * cout];
        for (o, row) in weight.chunks_exact(cols).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                taps[t * cout + o] = v;
            }
        }
        Some(Self {
            taps,
            cin,
            cout,
            kernel,
        })
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }
}

/// A stem over output rows `rows` of one image `x` (`[cin, h, w]`): `out` (from its start) is
/// `[rows.len() · out_w, cout]`, `act(bias + Σ w · x)` over the taps inside the map.
pub type StemFn = fn(&[f32], &StemWeight, &[f32], &ConvGeometry, Act, Range<usize>, &mut [f32]);

/// The fastest stem kernel this CPU runs (AVX-512, AVX2 + FMA, or portable code).
pub fn stem_kernel() -> StemFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return x86::stem_avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return x86::stem_avx2;
        }
    }
    stem_portable
}

/// The stem kernel in portable code (FMA where the target always has it).
pub fn stem_portable(
    x: &[f32],
    w: &StemWeight,
    bias: &[f32],
    g: &ConvGeometry,
    act: Act,
    rows: Range<usize>,
    out: &mut [f32],
) {
    type Lanes = [f32; LANES];
    const FMA: bool = cfg!(target_arch = "aarch64");
    stem_body(
        (x, w, bias, g, rows),
        (
            &|s: &Lanes| *s,
            &|v: f32| [v; LANES],
            &|acc: Lanes, w: Lanes, x: Lanes| {
                std::array::from_fn(|j| {
                    if FMA {
                        w[j].mul_add(x[j], acc[j])
                    } else {
                        acc[j] + w[j] * x[j]
                    }
                })
            },
            &|v: Lanes, o: &mut Lanes| {
                for j in 0..LANES {
                    o[j] = act.apply(v[j]);
                }
            },
        ),
        out,
    )
}

/// How a kernel loads a vector of [`LANES`] floats, broadcasts one float, multiply-adds
/// (`acc + w · x`) and stores a vector with the activation.
type StemOps<'a, L, B, F, S> = (&'a L, &'a B, &'a F, &'a S);

/// Inputs of [`stem_body`]: image, weight, bias, geometry, output rows.
type StemArgs<'a> = (
    &'a [f32],
    &'a StemWeight,
    &'a [f32],
    &'a ConvGeometry,
    Range<usize>,
);

/// The stem loop over vectors `V`: for each output row, blocks of [`BLOCK`] channels (or one
/// vector for the last 16 when `cout` is not a multiple of 32); the row's pixels whose taps
/// all land inside the row [`STRIP`] at a time, the others one at a time with their in-map
/// taps. Every sum starts from the bias and adds the in-map taps in weight order.
#[inline(always)]
fn stem_body<V, L, B, F, S>(
    (x, w, bias, g, rows): StemArgs,
    ops: StemOps<L, B, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    B: Fn(f32) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let (k, cout) = (w.kernel, w.cout);
    assert!(
        g.kernel == k
            && x.len() >= w.cin * g.h * g.w
            && bias.len() >= cout
            && rows.end <= g.out_h
            && out.len() >= rows.len() * g.out_w * cout,
        "stem: buffers do not fit the geometry"
    );
    // Output columns whose taps all land inside the row: ox·s ≥ pad and ox·s − pad + k ≤ w.
    let (lo, _) = g.inside(0, g.pad_left, g.w, g.out_w);
    let (_, hi) = g.inside(k - 1, g.pad_left, g.w, g.out_w);
    let hi = hi.max(lo);
    let first = rows.start;
    for oy in rows {
        let out = &mut out[(oy - first) * g.out_w * cout..][..g.out_w * cout];
        let taps_y = g.taps(oy, g.pad_top, g.h);
        let mut c0 = 0;
        while c0 < cout {
            let args = (x, w, bias, g, oy, taps_y, c0);
            if cout - c0 >= BLOCK {
                stem_row::<V, L, B, F, S, 2>(args, (lo, hi), ops, out);
                c0 += BLOCK;
            } else {
                stem_row::<V, L, B, F, S, 1>(args, (lo, hi), ops, out);
                c0 += LANES;
            }
        }
    }
}

/// Inputs of [`stem_row`] and [`stem_pixels`]: image, weight, bias, geometry, output row, its
/// in-map tap rows, first output channel.
type RowArgs<'a> = (
    &'a [f32],
    &'a StemWeight,
    &'a [f32],
    &'a ConvGeometry,
    usize,
    (usize, usize),
    usize,
);

/// One output row's `NV` vectors of channels from `c0`: interior pixels in strips, the rest
/// one at a time.
#[inline(always)]
fn stem_row<V, L, B, F, S, const NV: usize>(
    args: RowArgs,
    (lo, hi): (usize, usize),
    ops: StemOps<L, B, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    B: Fn(f32) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let g = args.3;
    let k = g.kernel;
    for ox in (0..lo).chain(hi..g.out_w) {
        stem_pixels::<V, L, B, F, S, NV, 1>(args, ox, g.taps(ox, g.pad_left, g.w), ops, out);
    }
    if hi - lo < STRIP {
        for ox in lo..hi {
            stem_pixels::<V, L, B, F, S, NV, 1>(args, ox, (0, k), ops, out);
        }
        return;
    }
    // Strips from `lo`, the last one ending at `hi` (it may overlap the one before: a pixel's
    // sum is the same whichever strip computes it).
    let mut ox = lo;
    loop {
        stem_pixels::<V, L, B, F, S, NV, STRIP>(args, ox.min(hi - STRIP), (0, k), ops, out);
        ox += STRIP;
        if ox >= hi {
            break;
        }
    }
}

/// `Q` neighbouring pixels from `ox` (all with in-map column taps `kx0..kx1`), `NV` vectors
/// of channels each.
#[inline(always)]
fn stem_pixels<V, L, B, F, S, const NV: usize, const Q: usize>(
    (x, w, bias, g, oy, (ky0, ky1), c0): RowArgs,
    ox: usize,
    (kx0, kx1): (usize, usize),
    (load, splat, fma, store): StemOps<L, B, F, S>,
    out: &mut [f32],
) where
    V: Copy,
    L: Fn(&[f32; LANES]) -> V,
    B: Fn(f32) -> V,
    F: Fn(V, V, V) -> V,
    S: Fn(V, &mut [f32; LANES]),
{
    let (k, s, cout) = (g.kernel, g.stride, w.cout);
    let b = vectors::<V, L, NV>(load, &bias[c0..]);
    let mut acc = [b; Q];
    // Every tap's vectors `c0 .. c0 + NV·16` lie inside the weight (checked once).
    assert!(
        w.taps.len() >= w.cin * k * k * cout && c0 + NV * LANES <= cout,
        "stem: weight does not fit the geometry"
    );
    for ci in 0..w.cin {
        for ky in ky0..ky1 {
            let iy = oy * s + ky - g.pad_top;
            // The inputs the pixels read in this row: pixel p's tap kx at p·s + kx − kx0.
            let row = &x[(ci * g.h + iy) * g.w + ox * s + kx0 - g.pad_left..];
            let span = &row[..(Q - 1) * s + kx1 - kx0];
            for kx in kx0..kx1 {
                let t = (ci * k + ky) * k + kx;
                // SAFETY: t < cin·k·k, so the NV vectors from t·cout + c0 are inside the
                // weight (asserted above); unchecked so the loop is loads and multiply-adds.
                let wv = vectors::<V, L, NV>(load, unsafe {
                    w.taps
                        .get_unchecked(t * cout + c0..t * cout + c0 + NV * LANES)
                });
                for (p, a) in acc.iter_mut().enumerate() {
                    // SAFETY: p < Q and kx < kx1, so the offset is below `span.len()`;
                    // unchecked so the strip is loads and multiply-adds only.
                    let v = splat(unsafe { *span.get_unchecked(p * s + kx - kx0) });
                    for j in 0..NV {
                        a[j] = fma(a[j], wv[j], v);
                    }
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        for (j, v) in a.iter().enumerate() {
            store(*v, lanes_mut(out, (ox + p) * cout + c0 + j * LANES));
        }
    }
}

/// `NV` vectors from the start of `at`, without `array::from_fn` (whose closure the compiler
/// left as a call outside the caller's target features: vectors through memory and a
/// `vzeroupper` per strip).
#[inline(always)]
fn vectors<V: Copy, L: Fn(&[f32; LANES]) -> V, const NV: usize>(load: &L, at: &[f32]) -> [V; NV] {
    let mut v = [load(lanes(at, 0)); NV];
    for (j, v) in v.iter_mut().enumerate() {
        *v = load(lanes(at, j * LANES));
    }
    v
}

/// The stem kernel with explicit AVX-512 and AVX2 vectors.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // intrinsics are safe in a `target_feature` context on newer compilers
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{act_bounds, stem_body, Act, ConvGeometry, StemArgs, StemWeight, LANES};

    type Lanes = [f32; LANES];

    #[target_feature(enable = "avx512f")]
    fn avx512(args: StemArgs, act: Act, o: &mut [f32]) {
        let (lo, hi) = act_bounds(act);
        let (lo, hi) = unsafe { (_mm512_set1_ps(lo), _mm512_set1_ps(hi)) };
        stem_body(
            args,
            (
                // SAFETY: each pointer comes from a reference to 16 floats.
                &|s: &Lanes| unsafe { _mm512_loadu_ps(s.as_ptr()) },
                &|v: f32| unsafe { _mm512_set1_ps(v) },
                &|acc, w, x| unsafe { _mm512_fmadd_ps(w, x, acc) },
                &|v, d: &mut Lanes| unsafe {
                    // NaN as the second operand comes through, as in `f32::clamp`.
                    let v = match act {
                        Act::Identity => v,
                        _ => _mm512_min_ps(hi, _mm512_max_ps(lo, v)),
                    };
                    _mm512_storeu_ps(d.as_mut_ptr(), v)
                },
            ),
            o,
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2(args: StemArgs, act: Act, o: &mut [f32]) {
        let (lo, hi) = act_bounds(act);
        let (lo, hi) = unsafe { (_mm256_set1_ps(lo), _mm256_set1_ps(hi)) };
        stem_body(
            args,
            (
                // SAFETY: each pointer comes from a reference to 16 floats; the halves are 8.
                &|s: &Lanes| unsafe {
                    (
                        _mm256_loadu_ps(s.as_ptr()),
                        _mm256_loadu_ps(s[8..].as_ptr()),
                    )
                },
                &|v: f32| unsafe { (_mm256_set1_ps(v), _mm256_set1_ps(v)) },
                &|acc: (__m256, __m256), w: (__m256, __m256), x: (__m256, __m256)| unsafe {
                    (
                        _mm256_fmadd_ps(w.0, x.0, acc.0),
                        _mm256_fmadd_ps(w.1, x.1, acc.1),
                    )
                },
                &|v: (__m256, __m256), d: &mut Lanes| unsafe {
                    let clamp = |v| match act {
                        Act::Identity => v,
                        _ => _mm256_min_ps(hi, _mm256_max_ps(lo, v)),
                    };
                    _mm256_storeu_ps(d.as_mut_ptr(), clamp(v.0));
                    _mm256_storeu_ps(d[8..].as_mut_ptr(), clamp(v.1));
                },
            ),
            o,
        )
    }

    pub fn stem_avx512(
        x: &[f32],
        w: &StemWeight,
        b: &[f32],
        g: &ConvGeometry,
        act: Act,
        rows: Range<usize>,
        o: &mut [f32],
    ) {
        // SAFETY: only handed out by `stem_kernel` after detecting AVX-512F.
        unsafe { avx512((x, w, b, g, rows), act, o) }
    }

    pub fn stem_avx2(
        x: &[f32],
        w: &StemWeight,
        b: &[f32],
        g: &ConvGeometry,
        act: Act,
        rows: Range<usize>,
        o: &mut [f32],
    ) {
        // SAFETY: only handed out by `stem_kernel` after detecting AVX2 and FMA.
        unsafe { avx2((x, w, b, g, rows), act, o) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU runs.
    fn kernels() -> Vec<(&'static str, StemFn)> {
        let mut all: Vec<(&'static str, StemFn)> = vec![("portable", stem_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                all.push(("avx512", x86::stem_avx512));
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                all.push(("avx2", x86::stem_avx2));
            }
        }
        all
    }

    /// The convolution by its definition, in f64.
    fn naive(
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        cin: usize,
        g: &ConvGeometry,
        act: Act,
    ) -> Vec<f64> {
        let (k, cout) = (g.kernel, bias.len());
        let mut out = vec![0f64; g.out_h * g.out_w * cout];
        for oy in 0..g.out_h {
            for ox in 0..g.out_w {
                for o in 0..cout {
                    let mut sum = bias[o] as f64;
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xv = x[(ci * g.h + iy as usize) * g.w + ix as usize];
                                let wv = weight[((o * cin + ci) * k + ky) * k + kx];
                                sum += xv as f64 * wv as f64;
                            }
                        }
                    }
                    let v = match act {
                        Act::Identity => sum,
                        Act::Relu => sum.max(0.0),
                        Act::Relu6 => sum.clamp(0.0, 6.0),
                    };
                    out[(oy * g.out_w + ox) * cout + o] = v;
                }
            }
        }
        out
    }

    /// Every kernel against the definition: 3×3 and 7×7 stems, strides 1 and 2, symmetric and
    /// one-sided padding, maps narrower than a strip, 16, 32 and 48 output channels; every
    /// block of rows gives the whole map's values.
    #[test]
    fn stems_match_the_definition() {
        let mut rng = crate::rng::Rng::new(7);
        let cases = [
            // (cin, h, w, k, stride, pads (t, b, l, r), cout, act)
            (3, 17, 23, 3, 2, (1, 1, 1, 1), 32, Act::Relu6),
            (3, 16, 16, 3, 2, (0, 1, 0, 1), 32, Act::Relu6),
            (3, 9, 40, 3, 1, (1, 1, 1, 1), 48, Act::Identity),
            (3, 30, 31, 7, 2, (3, 3, 3, 3), 64, Act::Relu),
            (1, 5, 4, 3, 2, (1, 1, 1, 1), 16, Act::Relu6),
            (2, 3, 3, 3, 1, (0, 0, 0, 0), 32, Act::Identity),
        ];
        for (cin, h, w, k, s, pads, cout, act) in cases {
            let g = ConvGeometry::new(h, w, k, s, pads).unwrap();
            let x: Vec<f32> = (0..cin * h * w)
                .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
                .collect();
            let weight: Vec<f32> = (0..cout * cin * k * k)
                .map(|_| rng.unit_f64() as f32 - 0.5)
                .collect();
            let bias: Vec<f32> = (0..cout).map(|_| rng.unit_f64() as f32 - 0.5).collect();
            let sw = StemWeight::new(&weight, cout, cin, k).unwrap();
            let want = naive(&x, &weight, &bias, cin, &g, act);
            let row = g.out_w * cout;
            for (name, kernel) in kernels() {
                let mut whole = vec![f32::NAN; g.out_h * row];
                kernel(&x, &sw, &bias, &g, act, 0..g.out_h, &mut whole);
                for (i, (&got, &want)) in whole.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{name} {cin}×{h}×{w} k{k} s{s} {pads:?}: [{i}] {got} vs {want}"
                    );
                }
                for block in [1, 2, 3] {
                    for r0 in (0..g.out_h).step_by(block) {
                        let r1 = (r0 + block).min(g.out_h);
                        let mut part = vec![f32::NAN; (r1 - r0) * row];
                        kernel(&x, &sw, &bias, &g, act, r0..r1, &mut part);
                        assert_eq!(part, whole[r0 * row..r1 * row], "{name} rows {r0}..{r1}");
                    }
                }
            }
        }
    }

    #[test]
    fn weights_that_do_not_fit_a_vector_take_no_direct_kernel() {
        assert!(StemWeight::new(&[0.0; 24 * 27], 24, 3, 3).is_none());
        assert!(StemWeight::new(&[0.0; 32 * 27], 32, 3, 2).is_none());
        assert!(StemWeight::new(&[], 0, 3, 3).is_none());
        let w: Vec<f32> = (0..16 * 12).map(|i| i as f32).collect();
        let sw = StemWeight::new(&w, 16, 3, 2).unwrap();
        // Tap t of output o sits at t · cout + o.
        assert_eq!(sw.taps[5 * 16 + 7], w[7 * 12 + 5]);
        assert_eq!(sw.cout(), 16);
    }
}
