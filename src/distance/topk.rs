//! Running top-k per query: the k smallest keys seen so far, ties broken to the lower index.

/// The k best (smallest key) candidates of one query, sorted best first. Unfilled slots have
/// index −1 and key +∞.
#[derive(Debug)]
pub struct RunningTopK<'a> {
    keys: &'a mut [f32],
    indices: &'a mut [i64],
}

/// True when (key a, index ia) ranks before (key b, index ib).
#[inline]
fn better(a: f32, ia: i64, b: f32, ib: i64) -> bool {
    a < b || (a == b && (ib < 0 || ia < ib))
}

impl<'a> RunningTopK<'a> {
    /// Starts an empty top-k over the given slices (both of length k).
    pub fn new(keys: &'a mut [f32], indices: &'a mut [i64]) -> Self {
        keys.fill(f32::INFINITY);
        indices.fill(-1);
        Self { keys, indices }
    }

    /// Wraps slices that already hold a valid sorted top-k.
    pub fn resume(keys: &'a mut [f32], indices: &'a mut [i64]) -> Self {
        Self { keys, indices }
    }

    /// The key a candidate must beat (or tie with a lower index) to enter.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.keys[self.keys.len() - 1]
    }

    /// Offers candidate `index` with `key`.
    #[inline]
    pub fn push(&mut self, key: f32, index: i64) {
        let k = self.keys.len();
        if !better(key, index, self.keys[k - 1], self.indices[k - 1]) {
            return;
        }
        let mut pos = k - 1;
        while pos > 0 && better(key, index, self.keys[pos - 1], self.indices[pos - 1]) {
            self.keys[pos] = self.keys[pos - 1];
            self.indices[pos] = self.indices[pos - 1];
            pos -= 1;
        }
        self.keys[pos] = key;
        self.indices[pos] = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_k_smallest_with_index_tie_break() {
        let (mut keys, mut idx) = (vec![0f32; 3], vec![0i64; 3]);
        let mut top = RunningTopK::new(&mut keys, &mut idx);
        for (key, i) in [
            (5.0, 0),
            (1.0, 1),
            (3.0, 2),
            (1.0, 3),
            (0.5, 4),
            (3.0, 5),
            (1.0, 0),
        ] {
            top.push(key, i);
        }
        assert_eq!(keys, vec![0.5, 1.0, 1.0]);
        assert_eq!(idx, vec![4, 0, 1]);
    }

    #[test]
    fn unfilled_slots() {
        let (mut keys, mut idx) = (vec![0f32; 3], vec![0i64; 3]);
        let mut top = RunningTopK::new(&mut keys, &mut idx);
        top.push(2.0, 7);
        assert_eq!(idx, vec![7, -1, -1]);
        assert_eq!(keys[1], f32::INFINITY);
    }
}
