//! L1 (sum of absolute differences) of one query against four candidates at a time, with
//! explicit SIMD chosen at run time: AVX-512F, else AVX2, else portable scalar code (which the
//! compiler vectorises for the baseline target, NEON on Arm).
//!
//! Four candidates share each query load, and two independent accumulators per candidate hide
//! the add latency. Lanes are summed in a fixed order, so results do not depend on the thread
//! schedule.

/// `l1(q, x[0..4])` for four candidates of the same length as `q`.
pub type L1x4 = fn(&[f32], [&[f32]; 4]) -> [f32; 4];

/// `l1(q[a], x[c])` for two queries and four candidates: each candidate load serves two
/// queries and each query load four candidates.
pub type L1x2x4 = fn([&[f32]; 2], [&[f32]; 4]) -> [[f32; 4]; 2];

/// The fastest two-query kernel this CPU supports.
pub fn select_2x4() -> L1x2x4 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return avx512::l1x2x4;
        }
    }
    |q, x| [select()(q[0], x), select()(q[1], x)]
}

/// The fastest kernel this CPU supports.
pub fn select() -> L1x4 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return avx512::l1x4;
        }
        if std::is_x86_feature_detected!("avx2") {
            return avx2::l1x4;
        }
    }
    scalar_l1x4
}

/// Name of the kernel [`select`] picks (for benchmarks and logs).
pub fn selected_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "scalar"
}

/// Portable version: eight partial sums per candidate, combined pairwise.
pub fn scalar_l1x4(q: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let mut out = [0f32; 4];
    for (o, xs) in out.iter_mut().zip(x) {
        let mut acc = [0f32; 8];
        let chunks = q.len() / 8 * 8;
        for (qc, xc) in q[..chunks]
            .chunks_exact(8)
            .zip(xs[..chunks].chunks_exact(8))
        {
            for l in 0..8 {
                acc[l] += (qc[l] - xc[l]).abs();
            }
        }
        let mut tail = 0f32;
        for (a, b) in q[chunks..].iter().zip(&xs[chunks..]) {
            tail += (a - b).abs();
        }
        *o = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
            + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
            + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn l1x4(q: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        assert!(x.iter().all(|c| c.len() == q.len()));
        // SAFETY: `select` returns this kernel only when AVX-512F is available; the slices all
        // have q.len() elements, and every load below stays within that length.
        unsafe { kernel(q, x) }
    }

    pub fn l1x2x4(q: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        assert!(q[1].len() == q[0].len() && x.iter().all(|c| c.len() == q[0].len()));
        // SAFETY: as for `l1x4`: AVX-512F is available and all slices have the same length.
        unsafe { kernel_2x4(q, x) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_2x4(q: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = q[0].len();
        let (q0p, q1p) = (q[0].as_ptr(), q[1].as_ptr());
        let p = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
        let mut a = [[_mm512_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 16 <= n {
            let qa = _mm512_loadu_ps(q0p.add(i));
            let qb = _mm512_loadu_ps(q1p.add(i));
            for c in 0..4 {
                let xc = _mm512_loadu_ps(p[c].add(i));
                a[0][c] = _mm512_add_ps(a[0][c], _mm512_abs_ps(_mm512_sub_ps(qa, xc)));
                a[1][c] = _mm512_add_ps(a[1][c], _mm512_abs_ps(_mm512_sub_ps(qb, xc)));
            }
            i += 16;
        }
        let mut out = [[0f32; 4]; 2];
        for (r, qp) in [q0p, q1p].into_iter().enumerate() {
            for c in 0..4 {
                let mut s = _mm512_reduce_add_ps(a[r][c]);
                for j in i..n {
                    s += (*qp.add(j) - *p[c].add(j)).abs();
                }
                out[r][c] = s;
            }
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(q: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len();
        let (qp, p) = (
            q.as_ptr(),
            [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()],
        );
        let mut a = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i + 32 <= n {
            let q0 = _mm512_loadu_ps(qp.add(i));
            let q1 = _mm512_loadu_ps(qp.add(i + 16));
            for c in 0..4 {
                let d0 = _mm512_sub_ps(q0, _mm512_loadu_ps(p[c].add(i)));
                let d1 = _mm512_sub_ps(q1, _mm512_loadu_ps(p[c].add(i + 16)));
                a[c] = _mm512_add_ps(a[c], _mm512_abs_ps(d0));
                a[c + 4] = _mm512_add_ps(a[c + 4], _mm512_abs_ps(d1));
            }
            i += 32;
        }
        while i + 16 <= n {
            let q0 = _mm512_loadu_ps(qp.add(i));
            for c in 0..4 {
                let d0 = _mm512_sub_ps(q0, _mm512_loadu_ps(p[c].add(i)));
                a[c] = _mm512_add_ps(a[c], _mm512_abs_ps(d0));
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for c in 0..4 {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a[c], a[c + 4]));
            for j in i..n {
                s += (*qp.add(j) - *p[c].add(j)).abs();
            }
            out[c] = s;
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub fn l1x4(q: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        assert!(x.iter().all(|c| c.len() == q.len()));
        // SAFETY: `select` returns this kernel only when AVX2 is available; the slices all have
        // q.len() elements, and every load below stays within that length.
        unsafe { kernel(q, x) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn kernel(q: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len();
        let (qp, p) = (
            q.as_ptr(),
            [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()],
        );
        let sign = _mm256_set1_ps(-0.0);
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 16 <= n {
            let q0 = _mm256_loadu_ps(qp.add(i));
            let q1 = _mm256_loadu_ps(qp.add(i + 8));
            for c in 0..4 {
                let d0 = _mm256_sub_ps(q0, _mm256_loadu_ps(p[c].add(i)));
                let d1 = _mm256_sub_ps(q1, _mm256_loadu_ps(p[c].add(i + 8)));
                a[c] = _mm256_add_ps(a[c], _mm256_andnot_ps(sign, d0));
                a[c + 4] = _mm256_add_ps(a[c + 4], _mm256_andnot_ps(sign, d1));
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for c in 0..4 {
            let v = _mm256_add_ps(a[c], a[c + 4]);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for j in i..n {
                s += (*qp.add(j) - *p[c].add(j)).abs();
            }
            out[c] = s;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(q: &[f32], x: &[f32]) -> f32 {
        q.iter().zip(x).map(|(a, b)| (a - b).abs()).sum()
    }

    #[test]
    fn every_kernel_matches_naive() {
        let mut rng = Rng::new(5);
        let mut kernels: Vec<(&str, L1x4)> = vec![("scalar", scalar_l1x4)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                kernels.push(("avx2", avx2::l1x4));
            }
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", avx512::l1x4));
            }
        }
        for d in [1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100, 512, 1280] {
            let v: Vec<f32> = (0..5 * d)
                .map(|_| rng.unit_f64() as f32 * 4.0 - 2.0)
                .collect();
            let q = &v[..d];
            let x = [
                &v[d..2 * d],
                &v[2 * d..3 * d],
                &v[3 * d..4 * d],
                &v[4 * d..],
            ];
            for (name, kernel) in &kernels {
                let got = kernel(q, x);
                for c in 0..4 {
                    let want = naive(q, x[c]);
                    assert!(
                        (got[c] - want).abs() <= 1e-5 * want.max(1.0),
                        "{name} d={d}: {} vs {want}",
                        got[c]
                    );
                }
            }
        }
        assert_eq!(
            scalar_l1x4(
                &[1.0, -2.0],
                [&[0.0, 0.0], &[1.0, -2.0], &[-1.0, 2.0], &[3.0, 0.0]]
            ),
            [3.0, 0.0, 6.0, 4.0]
        );
    }
}
