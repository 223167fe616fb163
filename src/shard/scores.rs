//! The global cut over per-shard score arrays: each shard of samples is scored on its own
//! (cut-off scores, any per-sample score), then one pass over all the (small) score arrays
//! draws the percentile cut exactly as over the unsharded array.

use super::ShardError;
use crate::cutoff::{select, Amount, Scope};

/// For each shard of samples (in shard order: together they are the whole list), which samples
/// the cut removes: the highest `100 − percentile` % of all scores (`Global`) or of each given
/// class's scores (`PerClass`, which needs the labels), ties to the lower global index — the
/// marks [`crate::cutoff::select`] gives on the concatenated arrays.
pub fn cut_shards(
    scores: &[Vec<f32>],
    labels: Option<&[Vec<u32>]>,
    percentile: f64,
    scope: Scope,
) -> Result<Vec<Vec<bool>>, ShardError> {
    if !(0.0..=100.0).contains(&percentile) {
        return Err(ShardError::BadSpec(format!(
            "percentile {percentile}: expected a number in [0, 100]"
        )));
    }
    let all: Vec<f32> = scores.iter().flatten().copied().collect();
    if let Some(j) = scores.iter().position(|s| s.iter().any(|v| v.is_nan())) {
        return Err(ShardError::BadPart {
            file: format!("scores of shard {j}"),
            message: "a score is NaN".into(),
        });
    }
    let given: Vec<u32> = match labels {
        Some(l) => {
            if let Some(j) =
                (0..scores.len()).find(|&j| l.get(j).map(Vec::len) != Some(scores[j].len()))
            {
                return Err(ShardError::BadPart {
                    file: format!("labels of shard {j}"),
                    message: format!(
                        "{} labels for {} scores",
                        l.get(j).map_or(0, Vec::len),
                        scores[j].len()
                    ),
                });
            }
            l.iter().flatten().copied().collect()
        }
        None if scope == Scope::PerClass => {
            return Err(ShardError::BadSpec(
                "a per-class cut needs the labels of every shard".into(),
            ))
        }
        None => vec![0; all.len()],
    };
    let classes = given.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
    let eligible = vec![true; all.len()];
    let amount = Amount::Share(1.0 - percentile / 100.0);
    let marks = select(&all, &given, classes, &eligible, scope, &amount);
    let mut out = Vec::with_capacity(scores.len());
    let mut at = 0;
    for s in scores {
        out.push(marks[at..at + s.len()].to_vec());
        at += s.len();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_cut_equals_the_whole_cut() {
        let scores: Vec<f32> = (0..23).map(|i| ((i * 7) % 5) as f32).collect();
        let labels: Vec<u32> = (0..23).map(|i| i % 3).collect();
        for scope in [Scope::Global, Scope::PerClass] {
            for q in [50.0, 90.0, 100.0] {
                let whole = cut_shards(&[scores.clone()], Some(&[labels.clone()]), q, scope)
                    .unwrap()
                    .remove(0);
                let cuts = [0usize, 4, 11, 23];
                let parts: Vec<Vec<f32>> = cuts
                    .windows(2)
                    .map(|w| scores[w[0]..w[1]].to_vec())
                    .collect();
                let lparts: Vec<Vec<u32>> = cuts
                    .windows(2)
                    .map(|w| labels[w[0]..w[1]].to_vec())
                    .collect();
                let sharded = cut_shards(&parts, Some(&lparts), q, scope).unwrap();
                assert_eq!(sharded.concat(), whole, "{scope:?} {q}");
            }
        }
        // 90th percentile of 23 scores: ⌊2.3⌉ = 2 cut among the highest (4.0 at 2, 7, 12, …;
        // ties to the lower index).
        let m = cut_shards(&[scores.clone()], None, 90.0, Scope::Global).unwrap();
        let cut: Vec<usize> = (0..23).filter(|&i| m[0][i]).collect();
        assert_eq!(cut, vec![2, 7]);
        assert!(cut_shards(&[scores], None, 90.0, Scope::PerClass).is_err());
    }
}
