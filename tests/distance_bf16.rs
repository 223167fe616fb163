//! The bf16 pre-selection of the CPU search (issue 21, part 4): the same result as the f32
//! search, indices and bit-identical values, on random data at D = 512 and 1 280 (k = 1 and 5,
//! with and without the other-class rule) and on near-duplicates its bound cannot certify (the
//! f32 re-search is counted); bf16 rounding on hand-checked values; the error bound is above
//! the kernel's observed error on random and adversarial pairs, and close to it on the latter.

use bccp::distance::bf16_kernel::{self, from_bf16, pack_panel, pack_row, pairs, to_bf16, PANEL};
use bccp::distance::exact::bf16_dot_error;
use bccp::distance::{
    bf16, cpu, search_host, search_naive, take_rechecks, Metric, Neighbors, Precision, Search,
};
use bccp::rng::Rng;

/// Standard normal values (Box–Muller).
fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v) = (1.0 - rng.unit_f64(), rng.unit_f64());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same(got: &Neighbors, want: &Neighbors, ctx: &str) {
    assert_eq!(got.k, want.k, "{ctx}");
    assert_eq!(got.indices, want.indices, "{ctx}");
    assert_eq!(bits(&got.values), bits(&want.values), "{ctx}");
}

fn search<'a>(
    metric: Metric,
    k: usize,
    classes: Option<(&'a [i64], &'a [i64])>,
    p: Precision,
) -> Search<'a> {
    Search {
        metric,
        k,
        other_class: classes,
        precision: p,
    }
}

/// The bf16 pre-selection runs on this CPU when it has AVX512-BF16 (and its keys are not the
/// f32 ones: the rows were rounded), and not otherwise.
fn check_preselection_ran(q: &[f32], c: &[f32], dim: usize, metric: Metric) {
    let problem = cpu::Problem {
        queries: q,
        candidates: c,
        dim,
        k: 3,
        metric,
        classes: None,
    };
    let found = cpu::search_bf16(&problem);
    assert_eq!(found.is_some(), bf16::available());
    if let Some((keys, _)) = found {
        let (f32_keys, _) = cpu::search(&problem);
        assert_ne!(
            bits(&keys),
            bits(&f32_keys),
            "{metric:?}: bf16 keys equal f32 keys"
        );
    }
}

#[test]
fn bf16_search_equals_f32_search_on_random_data() {
    if !bf16::available() {
        eprintln!("this CPU has no AVX512-BF16: the bf16 search runs in f32 here");
    }
    let mut rng = Rng::new(21);
    let n = 6000;
    for dim in [512usize, 1280] {
        let c = randn(&mut rng, n * dim);
        let q = randn(&mut rng, 300 * dim);
        let nq = q.len() / dim;
        let qc: Vec<i64> = (0..nq as i64).map(|i| i % 3).collect();
        let cc: Vec<i64> = (0..n as i64).map(|i| i % 4).collect();
        for metric in [Metric::L2, Metric::Cosine] {
            check_preselection_ran(&q[..8 * dim], &c, dim, metric);
            for k in [1usize, 5] {
                for other in [false, true] {
                    let classes = other.then_some((&qc[..], &cc[..]));
                    let ctx = format!("{metric:?} D={dim} k={k} other={other}");
                    let want =
                        search_host(&q, &c, dim, &search(metric, k, classes, Precision::F32))
                            .unwrap();
                    let got =
                        search_host(&q, &c, dim, &search(metric, k, classes, Precision::Bf16))
                            .unwrap();
                    assert_same(&got, &want, &ctx);
                    // And the naive reference's, on a few queries.
                    let few = search_naive(
                        &q[..4 * dim],
                        &c,
                        dim,
                        &search(
                            metric,
                            k,
                            classes.map(|(a, b)| (&a[..4], b)),
                            Precision::F32,
                        ),
                    );
                    assert_eq!(few.indices, got.indices[..4 * k], "{ctx} naive");
                    assert_eq!(bits(&few.values), bits(&got.values[..4 * k]), "{ctx} naive");
                }
            }
        }
    }
}

#[test]
fn near_duplicates_beyond_the_bound_fall_back_to_f32_and_stay_exact() {
    // 30 centres, 2000 candidates: each centre's ~67 copies differ by at most 1e-4 per value,
    // far below bf16's rounding, so the kept k + MARGIN copies cannot be told from the rest.
    let mut rng = Rng::new(7);
    let (dim, n, nq, centres) = (512usize, 2000usize, 64usize, 30usize);
    let base = randn(&mut rng, centres * dim);
    let jittered = |rng: &mut Rng, rows: usize| -> Vec<f32> {
        (0..rows)
            .flat_map(|i| {
                let centre = &base[(i % centres) * dim..(i % centres + 1) * dim];
                centre
                    .iter()
                    .map(|&v| v + ((rng.unit_f64() * 2.0 - 1.0) * 1e-4) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let c = jittered(&mut rng, n);
    let q = jittered(&mut rng, nq);
    let qc: Vec<i64> = (0..nq as i64).map(|i| i % 2).collect();
    let cc: Vec<i64> = (0..n as i64).map(|i| i % 5).collect();
    for metric in [Metric::L2, Metric::Cosine] {
        for k in [1usize, 5] {
            for other in [false, true] {
                let classes = other.then_some((&qc[..], &cc[..]));
                let ctx = format!("{metric:?} k={k} other={other}");
                let want =
                    search_host(&q, &c, dim, &search(metric, k, classes, Precision::F32)).unwrap();
                let _ = take_rechecks();
                let got =
                    search_host(&q, &c, dim, &search(metric, k, classes, Precision::Bf16)).unwrap();
                let rechecks = take_rechecks();
                assert_same(&got, &want, &ctx);
                assert_same(
                    &got,
                    &search_naive(&q, &c, dim, &search(metric, k, classes, Precision::F32)),
                    &format!("{ctx} naive"),
                );
                if bf16::available() {
                    assert!(
                        rechecks.host_f32 > 0,
                        "{ctx}: nothing fell back: {rechecks:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    // (value, bf16 bits): exact values, halfway cases to the even neighbour, just past halfway.
    let one_plus = |eps: f64| (1.0 + eps) as f32;
    for (v, want) in [
        (1.0f32, 0x3f80u16),
        (-2.5, 0xc020),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (one_plus(2f64.powi(-8)), 0x3f80), // halfway, down to even
        (one_plus(3.0 * 2f64.powi(-8)), 0x3f82), // halfway, up to even
        (one_plus(2f64.powi(-8) + 2f64.powi(-20)), 0x3f81), // just above halfway
        (one_plus(2f64.powi(-8) - 2f64.powi(-20)), 0x3f80), // just below halfway
        (std::f32::consts::PI, 0x4049),    // 3.140625
        (1e-3, 0x3a83),                    // 0.00100326538
        (f32::from_bits(0x3fff_8000), 0x4000), // carry into the exponent
        (f32::MAX, 0x7f80),                // past the largest: infinity
    ] {
        assert_eq!(to_bf16(v), want, "{v:e} ({:#010x})", v.to_bits());
    }
    assert_eq!(from_bf16(0x4049), 3.140625);
    // Rows pack as pairs, element 2p in the low half; an odd dimension pads with zero.
    let mut words = vec![0u32; pairs(3)];
    pack_row(&[1.0, -2.5, 1.0], &mut words);
    assert_eq!(words, vec![0xc020_3f80, 0x0000_3f80]);
    // A panel is pair-major: word p·PANEL + c is pair p of row c.
    let mut panel = vec![0u32; pairs(3) * PANEL];
    pack_panel(&[1.0, -2.5, 1.0, 0.0, 0.0, -2.5], 3, &mut panel);
    assert_eq!(
        (panel[0], panel[1], panel[PANEL], panel[PANEL + 1]),
        (0xc020_3f80, 0, 0x3f80, 0xc020)
    );
    assert!(panel[2..PANEL].iter().all(|&w| w == 0));
}

/// The kernel's dot product of two rows (one query, the candidate in slot 5 of a panel).
#[cfg(target_arch = "x86_64")]
fn kernel_dot(q: &[f32], x: &[f32]) -> f32 {
    let dim = q.len();
    let mut qw = vec![0u32; pairs(dim)];
    pack_row(q, &mut qw);
    let mut rows = vec![1f32; 6 * dim];
    rows[5 * dim..].copy_from_slice(x);
    let mut panel = vec![0u32; pairs(dim) * PANEL];
    pack_panel(&rows, dim, &mut panel);
    let mut out = vec![0f32; PANEL];
    // SAFETY: the callers checked `available()`; sizes are one row and one panel.
    unsafe { bf16_kernel::dots(&qw, 1, &panel, 1, pairs(dim), &mut out, PANEL) };
    out[5]
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt()
}

fn exact_dot(q: &[f32], x: &[f32]) -> f64 {
    q.iter()
        .zip(x)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_bound_covers_the_kernels_error() {
    if !bf16::available() {
        eprintln!("this CPU has no AVX512-BF16: no kernel to check");
        return;
    }
    let mut rng = Rng::new(4);
    let mut worst = 0f64;
    for case in 0..3000 {
        let dim = 1 + rng.below(1400) as usize;
        // Scales from 1e-30 to 1e15, some rows mixed with subnormal-range values.
        let scale = 10f64.powf(rng.unit_f64() * 45.0 - 30.0) as f32;
        let row = |rng: &mut Rng| -> Vec<f32> {
            randn(rng, dim)
                .into_iter()
                .map(|v| match case % 4 {
                    0 => v * scale * 1e-8,
                    _ => v * scale,
                })
                .collect()
        };
        let (q, x) = (row(&mut rng), row(&mut rng));
        let err = (f64::from(kernel_dot(&q, &x)) - exact_dot(&q, &x)).abs();
        let bound = bf16_dot_error(dim, norm(&q), norm(&x));
        assert!(
            err <= bound,
            "case {case}: D={dim} scale {scale:e}: error {err:e} over the bound {bound:e}"
        );
        worst = worst.max(err / bound);
    }
    assert!(
        worst > 1e-3,
        "random errors stay far below the bound: {worst}"
    );
    // Adversarial: every value just under 1 + 2⁻⁸ rounds down to 1, all errors of one sign;
    // the observed error is then almost the whole bound.
    let v = f32::from_bits(1.0f32.to_bits() + (1 << 15) - 1);
    assert_eq!(to_bf16(v), 0x3f80);
    for dim in [1usize, 2, 511, 512, 1280] {
        let q = vec![v; dim];
        let err = (f64::from(kernel_dot(&q, &q)) - exact_dot(&q, &q)).abs();
        let bound = bf16_dot_error(dim, norm(&q), norm(&q));
        assert!(
            err <= bound,
            "D={dim}: error {err:e} over the bound {bound:e}"
        );
        assert!(
            err > 0.9 * bound,
            "D={dim}: bound {bound:e} loose against {err:e}"
        );
    }
}

#[test]
fn interleaved_values_equal_the_reference_bit_for_bit() {
    // The re-ranking computes four candidates' values at a time; each must be Metric::value's.
    let mut rng = Rng::new(9);
    for dim in [1usize, 3, 8, 511, 1280] {
        let q = randn(&mut rng, dim);
        for n in [1usize, 4, 7, 13] {
            let mut xs = randn(&mut rng, n * dim);
            // Signed zeros and exact copies of the query among the candidates.
            xs[0] = -0.0;
            if n > 2 {
                xs[2 * dim..3 * dim].copy_from_slice(&q);
            }
            let rows: Vec<&[f32]> = xs.chunks(dim).collect();
            for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
                let got = metric.values(&q, &rows);
                let want: Vec<f32> = rows.iter().map(|x| metric.value(&q, x)).collect();
                assert_eq!(bits(&got), bits(&want), "{metric:?} D={dim} n={n}");
            }
        }
    }
}
