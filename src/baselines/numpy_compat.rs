//! numpy's numerics where cleanlab's results depend on them: the element type ([`Prob`]),
//! pairwise summation and means, and the tie order of `np.argsort` on x86-64 with AVX-512.

use std::fmt;
use std::ops::{Add, Div, Neg, Sub};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The element type of `pred_probs` (`f32` or `f64`): arithmetic happens in this precision,
/// as numpy does on an array of that dtype.
pub trait Prob:
    sealed::Sealed
    + Copy
    + PartialOrd
    + fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// A Python float converted to this type (round to nearest).
    fn from_f64(x: f64) -> Self;
    /// Exact widening to `f64`.
    fn to_f64(self) -> f64;
    /// A count converted to this type.
    fn from_count(n: usize) -> Self;
}

impl Prob for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_count(n: usize) -> Self {
        n as f32
    }
}

impl Prob for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_count(n: usize) -> Self {
        n as f64
    }
}

/// numpy's pairwise summation (`np.sum` / `np.add.reduce` over a contiguous array): blocks of
/// up to 128 summed with 8 accumulators, halves (multiples of 8) summed recursively.
pub(crate) fn pairwise_sum<T: Prob>(a: &[T]) -> T {
    let n = a.len();
    if n < 8 {
        // numpy starts from -0.0 so that a sum of -0.0 stays -0.0.
        a.iter().fold(T::from_f64(-0.0), |s, &x| s + x)
    } else if n <= 128 {
        let mut r = [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]];
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc = *acc + a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[whole..] {
            res = res + x;
        }
        res
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
    }
}

/// `np.mean` of a non-empty array: the pairwise sum divided by the count, in `T`.
pub(crate) fn mean<T: Prob>(a: &[T]) -> T {
    pairwise_sum(a) / T::from_count(a.len())
}

/// numpy's `np.argsort` (default `kind="quicksort"`) as numpy 2.x computes it on x86-64 with
/// AVX-512 (Intel's x86-simd-sort, `avx512_argsort`), emulated lane by lane so that exactly
/// tied values come out in the same order. cleanlab's cut-offs (rounding residues, margins,
/// probabilities) are taken from such orders, and ties there are common (equal counts in a
/// row of the confident joint give equal residues).
///
/// The algorithm: an already sorted array is left as it is; up to 256 values go through a
/// bitonic network of 8-lane registers (a compare-exchange keeps its own index on a tie);
/// longer arrays are partitioned around the median of 8 samples, with libstdc++'s `std::sort`
/// once 2·log2(n) partition levels have not finished the job.
///
/// Values must not be NaN (numpy then takes another path). numpy on CPUs without AVX-512
/// (AVX2 networks, or its scalar introsort) may order ties differently.
pub fn numpy_argsort<T: Prob>(values: &[T]) -> Vec<usize> {
    let n = values.len();
    let mut arg: Vec<usize> = (0..n).collect();
    let sorted = values.windows(2).all(|w| w[0] <= w[1]); // no NaN: `!(w[1] < w[0])`
    if n > 1 && !sorted {
        let max_iters = 2 * (usize::BITS - 1 - n.leading_zeros()) as i64;
        npsort::quicksort(values, &mut arg, 0, n - 1, max_iters);
    }
    arg
}

/// The pieces of [`numpy_argsort`].
mod npsort {
    use super::Prob;

    const LANES: usize = 8;
    /// Padding index of partly filled registers (`UINT64_MAX`).
    const PAD: usize = usize::MAX;

    // Lane permutations `out[l] = in[P[l]]` of the 64-bit networks.
    const SWAP1: [usize; LANES] = [1, 0, 3, 2, 5, 4, 7, 6];
    const SWAP2: [usize; LANES] = [2, 3, 0, 1, 6, 7, 4, 5];
    const SWAP4: [usize; LANES] = [4, 5, 6, 7, 0, 1, 2, 3];
    const REV4: [usize; LANES] = [3, 2, 1, 0, 7, 6, 5, 4];
    const REV8: [usize; LANES] = [7, 6, 5, 4, 3, 2, 1, 0];

    /// A key register and its index register.
    #[derive(Clone, Copy)]
    struct Reg<T> {
        key: [T; LANES],
        idx: [usize; LANES],
    }

    fn min<T: Prob>(a: T, b: T) -> T {
        // _mm512_min_pd: the second operand unless the first is smaller.
        if a < b {
            a
        } else {
            b
        }
    }

    fn max<T: Prob>(a: T, b: T) -> T {
        if a > b {
            a
        } else {
            b
        }
    }

    /// `cmp_merge`: every lane meets lane `perm[l]`, takes the max where `mask` has a bit and
    /// the min elsewhere, and keeps its index if its key did not change.
    fn cmp_merge<T: Prob>(r: &mut Reg<T>, perm: &[usize; LANES], mask: u8) {
        let (key, idx) = (r.key, r.idx);
        for l in 0..LANES {
            let (k2, i2) = (key[perm[l]], idx[perm[l]]);
            let t = if mask >> l & 1 == 1 {
                max(k2, key[l])
            } else {
                min(k2, key[l])
            };
            r.key[l] = t;
            r.idx[l] = if t == key[l] { idx[l] } else { i2 };
        }
    }

    /// `sort_zmm_64bit`: sorts one register.
    fn sort_reg<T: Prob>(r: &mut Reg<T>) {
        for (perm, mask) in [
            (&SWAP1, 0xAA),
            (&REV4, 0xCC),
            (&SWAP1, 0xAA),
            (&REV8, 0xF0),
            (&SWAP2, 0xCC),
            (&SWAP1, 0xAA),
        ] {
            cmp_merge(r, perm, mask);
        }
    }

    /// `bitonic_merge_zmm_64bit`: sorts a bitonic register.
    fn merge_reg<T: Prob>(r: &mut Reg<T>) {
        for (perm, mask) in [(&SWAP4, 0xF0), (&SWAP2, 0xCC), (&SWAP1, 0xAA)] {
            cmp_merge(r, perm, mask);
        }
    }

    fn reverse<T: Prob>(r: &mut Reg<T>) {
        r.key.reverse();
        r.idx.reverse();
    }

    /// `COEX` of registers `a` and `b`: lane-wise min into `a`, max into `b`; indices swap
    /// only where `a`'s key changed.
    fn coex<T: Prob>(regs: &mut [Reg<T>], a: usize, b: usize) {
        let (ra, rb) = (regs[a], regs[b]);
        for l in 0..LANES {
            let (k1, k2) = (ra.key[l], rb.key[l]);
            let lo = min(k1, k2);
            let keep = lo == k1;
            regs[a].key[l] = lo;
            regs[b].key[l] = max(k1, k2);
            regs[a].idx[l] = if keep { ra.idx[l] } else { rb.idx[l] };
            regs[b].idx[l] = if keep { rb.idx[l] } else { ra.idx[l] };
        }
    }

    /// `bitonic_merge_n_vec` of the `n` sorted registers from `off`.
    fn merge_regs<T: Prob>(regs: &mut [Reg<T>], off: usize, n: usize) {
        for i in 0..n / 2 {
            let b = off + n - i - 1;
            reverse(&mut regs[b]);
            coex(regs, off + i, b);
            reverse(&mut regs[b]);
        }
        let mut num = n / 2;
        while num >= 2 {
            for j in (0..n).step_by(num) {
                for i in 0..num / 2 {
                    coex(regs, off + i + j, off + i + j + num / 2);
                }
            }
            num /= 2;
        }
        for r in &mut regs[off..off + n] {
            merge_reg(r);
        }
    }

    /// `argsort_n<256>`: the bitonic network for up to 256 values.
    fn network<T: Prob>(values: &[T], arg: &mut [usize]) {
        let n = arg.len();
        let mut regs_n = 32;
        while regs_n > 1 && n * 2 <= regs_n * LANES {
            regs_n /= 2;
        }
        let pad = T::from_f64(f64::INFINITY);
        let mut regs: Vec<Reg<T>> = (0..regs_n)
            .map(|r| {
                let mut reg = Reg {
                    key: [pad; LANES],
                    idx: [PAD; LANES],
                };
                for l in 0..LANES {
                    if let Some(&i) = arg.get(r * LANES + l) {
                        reg.idx[l] = i;
                        reg.key[l] = values[i];
                    }
                }
                reg
            })
            .collect();
        for r in &mut regs {
            sort_reg(r);
        }
        let mut per = 2;
        while per <= regs_n {
            for g in 0..regs_n / per {
                merge_regs(&mut regs, g * per, per);
            }
            per *= 2;
        }
        for (slot, i) in arg.iter_mut().zip(regs.iter().flat_map(|r| r.idx)) {
            *slot = i;
        }
    }

    /// `argpartition_unrolled<4>` of `arg[left..right]` around `pivot`: returns the first
    /// position of the values `>= pivot`.
    fn partition<T: Prob>(
        values: &[T],
        arg: &mut [usize],
        mut left: usize,
        mut right: usize,
        pivot: T,
    ) -> usize {
        const UNROLL: usize = 4;
        const BLOCK: usize = UNROLL * LANES;
        for _ in 0..(right - left) % BLOCK {
            if values[arg[left]] >= pivot {
                right -= 1;
                arg.swap(left, right);
            } else {
                left += 1;
            }
        }
        if left == right {
            return left;
        }
        let load = |arg: &[usize], pos: usize| -> [usize; LANES] {
            let mut v = [0; LANES];
            v.copy_from_slice(&arg[pos..pos + LANES]);
            v
        };
        // Compress-stores the lanes below the pivot at `lo`, the others just below `hi`.
        let store = |arg: &mut [usize], lo: usize, hi: usize, v: &[usize; LANES]| -> usize {
            let high = v.iter().filter(|&&i| values[i] >= pivot).count();
            let (mut l, mut h) = (lo, hi - high);
            for &i in v {
                if values[i] >= pivot {
                    arg[h] = i;
                    h += 1;
                } else {
                    arg[l] = i;
                    l += 1;
                }
            }
            high
        };
        let first: Vec<[usize; LANES]> = (0..UNROLL)
            .map(|u| load(arg, left + LANES * u))
            .chain((0..UNROLL).map(|u| load(arg, right - LANES * (UNROLL - u))))
            .collect();
        let mut r_store = right - LANES;
        let mut l_store = left;
        left += BLOCK;
        right -= BLOCK;
        while right != left {
            let at = if r_store.wrapping_add(LANES).wrapping_sub(right) < left - l_store {
                right -= BLOCK;
                right
            } else {
                left += BLOCK;
                left - BLOCK
            };
            let block: Vec<[usize; LANES]> =
                (0..UNROLL).map(|u| load(arg, at + u * LANES)).collect();
            for v in &block {
                let high = store(arg, l_store, r_store.wrapping_add(LANES), v);
                l_store += LANES - high;
                r_store = r_store.wrapping_sub(high);
            }
        }
        for v in &first {
            let high = store(arg, l_store, r_store.wrapping_add(LANES), v);
            l_store += LANES - high;
            // Unsigned as in C++: may wrap below zero on the last register.
            r_store = r_store.wrapping_sub(high);
        }
        l_store
    }

    /// `argsort_` on `arg[left..=right]`.
    pub(super) fn quicksort<T: Prob>(
        values: &[T],
        arg: &mut [usize],
        left: usize,
        right: usize,
        iters: i64,
    ) {
        if iters <= 0 {
            std_sort(values, &mut arg[left..=right]);
            return;
        }
        if right + 1 - left <= 256 {
            network(values, &mut arg[left..=right]);
            return;
        }
        let step = (right - left) / 8;
        let mut sample: Vec<T> = (1..=8).map(|s| values[arg[left + s * step]]).collect();
        sample.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let pivot = sample[4];
        let range = arg[left..=right].iter().map(|&i| values[i]);
        let smallest = range.clone().fold(pivot, min);
        let biggest = range.fold(pivot, max);
        let split = partition(values, arg, left, right + 1, pivot);
        if pivot != smallest {
            quicksort(values, arg, left, split - 1, iters - 1);
        }
        if pivot != biggest {
            quicksort(values, arg, split, right, iters - 1);
        }
    }

    /// libstdc++'s `std::sort` (introsort, then insertion sort) of indices by value.
    fn std_sort<T: Prob>(values: &[T], a: &mut [usize]) {
        let less = |x: usize, y: usize| values[x] < values[y];
        let n = a.len();
        if n < 2 {
            return;
        }
        introsort_loop(a, 0, n, 2 * (usize::BITS - 1 - n.leading_zeros()), &less);
        if n > 16 {
            insertion_sort(a, 0, 16, &less);
            for i in 16..n {
                linear_insert(a, i, &less);
            }
        } else {
            insertion_sort(a, 0, n, &less);
        }
    }

    fn introsort_loop(
        a: &mut [usize],
        first: usize,
        mut last: usize,
        mut depth: u32,
        less: &impl Fn(usize, usize) -> bool,
    ) {
        while last - first > 16 {
            if depth == 0 {
                heap_sort(&mut a[first..last], less);
                return;
            }
            depth -= 1;
            let mid = first + (last - first) / 2;
            move_median_to_first(a, first, first + 1, mid, last - 1, less);
            let cut = unguarded_partition(a, first + 1, last, first, less);
            introsort_loop(a, cut, last, depth, less);
            last = cut;
        }
    }

    fn move_median_to_first(
        a: &mut [usize],
        result: usize,
        x: usize,
        y: usize,
        z: usize,
        less: &impl Fn(usize, usize) -> bool,
    ) {
        let c = |p: usize, q: usize| less(a[p], a[q]);
        let median = if c(x, y) {
            if c(y, z) {
                y
            } else if c(x, z) {
                z
            } else {
                x
            }
        } else if c(x, z) {
            x
        } else if c(y, z) {
            z
        } else {
            y
        };
        a.swap(result, median);
    }

    fn unguarded_partition(
        a: &mut [usize],
        mut first: usize,
        mut last: usize,
        pivot: usize,
        less: &impl Fn(usize, usize) -> bool,
    ) -> usize {
        loop {
            while less(a[first], a[pivot]) {
                first += 1;
            }
            last -= 1;
            while less(a[pivot], a[last]) {
                last -= 1;
            }
            if first >= last {
                return first;
            }
            a.swap(first, last);
            first += 1;
        }
    }

    fn insertion_sort(
        a: &mut [usize],
        first: usize,
        last: usize,
        less: &impl Fn(usize, usize) -> bool,
    ) {
        for i in first + 1..last {
            if less(a[i], a[first]) {
                a[first..=i].rotate_right(1);
            } else {
                linear_insert(a, i, less);
            }
        }
    }

    fn linear_insert(a: &mut [usize], mut i: usize, less: &impl Fn(usize, usize) -> bool) {
        let v = a[i];
        while less(v, a[i - 1]) {
            a[i] = a[i - 1];
            i -= 1;
        }
        a[i] = v;
    }

    /// `std::__partial_sort(first, last, last)`: make_heap, then sort_heap.
    fn heap_sort(a: &mut [usize], less: &impl Fn(usize, usize) -> bool) {
        let len = a.len();
        if len >= 2 {
            let mut parent = (len - 2) / 2;
            loop {
                let v = a[parent];
                adjust_heap(a, parent, len, v, less);
                if parent == 0 {
                    break;
                }
                parent -= 1;
            }
        }
        let mut last = len;
        while last > 1 {
            last -= 1;
            let v = a[last];
            a[last] = a[0];
            adjust_heap(a, 0, last, v, less);
        }
    }

    fn adjust_heap(
        a: &mut [usize],
        mut hole: usize,
        len: usize,
        value: usize,
        less: &impl Fn(usize, usize) -> bool,
    ) {
        let top = hole;
        let mut child = hole;
        while child < (len.saturating_sub(1)) / 2 {
            child = 2 * (child + 1);
            if less(a[child], a[child - 1]) {
                child -= 1;
            }
            a[hole] = a[child];
            hole = child;
        }
        if len.is_multiple_of(2) && len >= 2 && child == (len - 2) / 2 {
            child = 2 * (child + 1);
            a[hole] = a[child - 1];
            hole = child - 1;
        }
        while hole > top {
            let parent = (hole - 1) / 2;
            if !less(a[parent], value) {
                break;
            }
            a[hole] = a[parent];
            hole = parent;
        }
        a[hole] = value;
    }
}
