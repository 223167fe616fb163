//! Exact duplicates (SHA-256 of the file bytes) and near-duplicates (nearest-neighbour distance
//! under a threshold calibrated on the data), grouped, with leaks across splits and days.

use std::collections::HashMap;

/// Groups of two or more samples with the same key (e.g. content hash), each sorted, in order
/// of their first member.
pub fn exact_groups(keys: &[String]) -> Vec<Vec<usize>> {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        by_key.entry(k.as_str()).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = by_key.into_values().filter(|g| g.len() > 1).collect();
    groups.sort_by_key(|g| g[0]);
    groups
}

/// The median of the positive values (0 when there are none).
pub fn median_positive(values: &[f32]) -> f32 {
    let mut v: Vec<f32> = values.iter().copied().filter(|&d| d > 0.0).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// The near-duplicate threshold: `factor` × the median distance of a sample to its nearest
/// other sample (exact copies, distance 0, left out of the median).
pub fn near_threshold(nearest: &[f32], factor: f32) -> f32 {
    factor * median_positive(nearest)
}

/// Union-find over `n` items.
struct Groups(Vec<usize>);

impl Groups {
    fn find(&mut self, i: usize) -> usize {
        let mut r = i;
        while self.0[r] != r {
            r = self.0[r];
        }
        let mut j = i;
        while self.0[j] != r {
            let next = self.0[j];
            self.0[j] = r;
            j = next;
        }
        r
    }
    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Near-duplicate groups: samples joined when one is among the other's neighbours at a
/// distance at most `threshold`. `neighbors[i]` lists (index, distance) of sample i's nearest
/// other samples. Groups of two or more, each sorted, in order of their first member.
pub fn near_groups(neighbors: &[Vec<(usize, f32)>], threshold: f32) -> Vec<Vec<usize>> {
    let n = neighbors.len();
    let mut g = Groups((0..n).collect());
    for (i, list) in neighbors.iter().enumerate() {
        for &(j, d) in list {
            if d <= threshold && j < n {
                g.join(i, j);
            }
        }
    }
    let mut by_root: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..n {
        let r = g.find(i);
        by_root.entry(r).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = by_root.into_values().filter(|v| v.len() > 1).collect();
    groups.sort_by_key(|v| v[0]);
    groups
}

/// For each sample, whether its group holds a sample of another `part` (split or day): the
/// group leaks across parts. Samples without a part (`None`) never leak.
pub fn leaks(groups: &[Vec<usize>], part: &[Option<String>]) -> Vec<bool> {
    let mut out = vec![false; part.len()];
    for g in groups {
        for &i in g {
            if let Some(p) = &part[i] {
                out[i] = g.iter().any(|&j| part[j].as_ref().is_some_and(|q| q != p));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_groups_by_key() {
        let keys: Vec<String> = ["a", "b", "a", "c", "b", "a"].map(String::from).to_vec();
        assert_eq!(exact_groups(&keys), vec![vec![0, 2, 5], vec![1, 4]]);
    }

    #[test]
    fn threshold_is_a_factor_of_the_median_nonzero_nearest_distance() {
        assert_eq!(median_positive(&[0.0, 3.0, 1.0, 2.0, 0.0]), 2.0);
        assert_eq!(near_threshold(&[0.0, 0.0], 0.5), 0.0);
        assert!((near_threshold(&[4.0, 1.0, 2.0], 0.25) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn near_groups_are_transitive_and_leaks_cross_parts() {
        // 0–1 close, 1–2 close, 3 far from all, 4–5 close.
        let nb = vec![
            vec![(1, 0.1), (2, 0.9)],
            vec![(0, 0.1), (2, 0.2)],
            vec![(1, 0.2)],
            vec![(0, 5.0)],
            vec![(5, 0.05)],
            vec![(4, 0.05)],
        ];
        let groups = near_groups(&nb, 0.3);
        assert_eq!(groups, vec![vec![0, 1, 2], vec![4, 5]]);
        let part = |s: &str| Some(s.to_string());
        let parts = vec![
            part("train"),
            part("train"),
            part("test"),
            part("test"),
            part("train"),
            None,
        ];
        assert_eq!(
            leaks(&groups, &parts),
            vec![true, true, true, false, false, false]
        );
    }
}
