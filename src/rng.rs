//! A small, version-stable pseudo-random generator.
//!
//! Every random choice in bccp takes a seed, and the same seed must give the same bytes on every
//! machine and every release. We therefore own the generator (SplitMix64, Steele et al. 2014)
//! instead of depending on a crate whose streams may change between versions. Independent
//! streams (one per class, one per image) are derived from a seed and a stream id, so parallel
//! work stays deterministic whatever order it runs in.

/// SplitMix64: 64 bits of state, full period, passes BigCrush; plenty for sampling decisions.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: mix(seed) }
    }

    /// An independent generator for stream `stream` of `seed` (e.g. one per image).
    pub fn derive(seed: u64, stream: u64) -> Self {
        Self::new(mix(seed ^ mix(stream.wrapping_add(GOLDEN))))
    }

    /// The generator's whole state (to save it, e.g. in a training checkpoint).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator continuing from a [`Self::state`].
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `[0, n)`, without modulo bias (Lemire's method). `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// Uniform integer in `[lo, hi]` (inclusive); `lo` when `hi < lo`.
    pub fn range_inclusive(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.unit_f64() < p
    }

    /// Fisher–Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_streams_differ() {
        let (mut r1, mut r2) = (Rng::new(7), Rng::new(7));
        let a: Vec<u64> = (0..5).map(|_| r1.next_u64()).collect();
        let b: Vec<u64> = (0..5).map(|_| r2.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(Rng::derive(7, 0).next_u64(), Rng::derive(7, 1).next_u64());
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    #[test]
    fn saved_state_continues_the_stream() {
        let mut r = Rng::new(9);
        r.next_u64();
        let mut copy = Rng::from_state(r.state());
        assert_eq!(
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>(),
            (0..4).map(|_| copy.next_u64()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn splitmix_known_value() {
        // First output of the reference SplitMix64 for state 0 after one increment.
        let mut r = Rng { state: 0 };
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn below_is_uniform() {
        let mut r = Rng::new(1);
        let mut counts = [0u32; 6];
        let n = 60_000;
        for _ in 0..n {
            counts[r.below(6) as usize] += 1;
        }
        // Chi-square with 5 degrees of freedom; 20.5 is the 0.999 quantile.
        let expected = n as f64 / 6.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 20.5, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn range_and_shuffle() {
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            let v = r.range_inclusive(10, 20);
            assert!((10..=20).contains(&v));
        }
        assert_eq!(r.range_inclusive(5, 5), 5);
        let mut v: Vec<u32> = (0..100).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
