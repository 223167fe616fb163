//! Outliers: the distance of a sample to its k-th nearest other sample, as a robust z-score
//! (median and median absolute deviation over the whole dataset).

/// Median of `values` (0 for none).
pub fn median(values: &[f32]) -> f32 {
    let mut v = values.to_vec();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Robust z-scores: (x − median) / (1.4826 · MAD), the scale floored at `min_scale` so a
/// dataset of equal values does not divide by zero.
pub fn robust_z(values: &[f32], min_scale: f32) -> Vec<f32> {
    let m = median(values);
    let dev: Vec<f32> = values.iter().map(|v| (v - m).abs()).collect();
    let scale = (1.4826 * median(&dev)).max(min_scale);
    values.iter().map(|v| (v - m) / scale).collect()
}

/// The distance to the k-th nearest other sample (1-based `k`) from each sample's sorted
/// neighbour distances; the farthest one listed when fewer are listed, +∞ when none.
pub fn kth_distance(neighbor_distances: &[Vec<f32>], k: usize) -> Vec<f32> {
    neighbor_distances
        .iter()
        .map(|d| {
            d.get(k.saturating_sub(1))
                .or(d.last())
                .copied()
                .unwrap_or(f32::INFINITY)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_z_of_a_hand_checked_case() {
        // median 2, |dev| = [1, 0, 0, 1, 8] → MAD 1, scale 1.4826.
        let z = robust_z(&[1.0, 2.0, 2.0, 3.0, 10.0], 1e-6);
        assert!((z[4] - 8.0 / 1.4826).abs() < 1e-5, "{z:?}");
        assert!((z[0] + 1.0 / 1.4826).abs() < 1e-5);
        // All equal: the floor keeps it finite.
        assert_eq!(robust_z(&[5.0, 5.0], 0.5), vec![0.0, 0.0]);
    }

    #[test]
    fn kth_distance_picks_the_kth_or_the_last() {
        let d = vec![vec![0.1, 0.2, 0.3], vec![0.5], vec![]];
        assert_eq!(kth_distance(&d, 2), vec![0.2, 0.5, f32::INFINITY]);
    }
}
