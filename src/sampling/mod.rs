//! Sampling from the reuse buffer (yesterday's clean training embeddings): no replay, random
//! replay, and closest-pair (CP) replay — the reference's procedure (`faithful`) and ours
//! (`buffer`), see DESIGN.md.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::distance::{search_host, Metric, Neighbors, Precision, Search};
use crate::rng::Rng;

/// What to replay from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// No replay.
    #[default]
    None,
    /// A uniform random share of the buffer.
    Random,
    /// Closest pairs under the L1 distance.
    L1Norm,
    /// Closest pairs under the L2 distance.
    L2Norm,
    /// Closest pairs under the cosine similarity.
    CosineSimilarity,
}

impl Sampling {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Sampling::None => "none",
            Sampling::Random => "random",
            Sampling::L1Norm => "l1_norm",
            Sampling::L2Norm => "l2_norm",
            Sampling::CosineSimilarity => "cosine_similarity",
        }
    }

    /// The metric of closest-pair replay (`None` for no or random replay).
    pub fn metric(self) -> Option<Metric> {
        match self {
            Sampling::None | Sampling::Random => None,
            Sampling::L1Norm => Some(Metric::L1),
            Sampling::L2Norm => Some(Metric::L2),
            Sampling::CosineSimilarity => Some(Metric::Cosine),
        }
    }

    /// Closest-pair replay under `metric`.
    pub fn closest_pair(metric: Metric) -> Self {
        match metric {
            Metric::L1 => Sampling::L1Norm,
            Metric::L2 => Sampling::L2Norm,
            Metric::Cosine => Sampling::CosineSimilarity,
        }
    }
}

/// How closest pairs are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum PairMode {
    /// The reference's procedure: per step, one image drawn from each class, a random anchor
    /// and its closest drawn image; every drawn image is used up.
    Faithful,
    /// Ours: every image's nearest other-class neighbour over the whole buffer, then the
    /// closest disjoint pairs until the budget is filled.
    #[default]
    Buffer,
}

impl PairMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            PairMode::Faithful => "faithful",
            PairMode::Buffer => "buffer",
        }
    }
}

/// Why a selection could not be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("--ratio {0} must lie in [0, 1]")]
    BadRatio(f64),
    #[error("ratio too high: after {pairs} of {wanted} pairs only {classes} class(es) still have unused images; the faithful procedure uses up one image per class per step, so it cannot select more than about {max_ratio:.3} of this buffer (try --sampling-mode buffer or a lower --ratio)")]
    RatioTooHigh {
        pairs: usize,
        wanted: usize,
        classes: usize,
        max_ratio: f64,
    },
    #[error("ratio too high for buffer mode: only {found} images form disjoint other-class pairs among the {neighbours} nearest neighbours, {wanted} wanted")]
    NotEnoughPairs {
        found: usize,
        wanted: usize,
        neighbours: usize,
    },
    #[error("closest pairs need at least two classes in the buffer")]
    OneClass,
    #[error("neighbour index {index} is outside the buffer of {n} images")]
    NeighbourOutOfRange { index: i64, n: usize },
    #[error("the buffer has {targets} targets for {rows} embeddings")]
    Shape { targets: usize, rows: usize },
    #[error(transparent)]
    Distance(#[from] crate::distance::DistanceError),
}

/// The reuse buffer: embeddings [N × dim] with their classes.
#[derive(Debug, Clone)]
pub struct ReuseBuffer<'a> {
    pub embeddings: &'a [f32],
    pub dim: usize,
    pub targets: &'a [i64],
}

impl ReuseBuffer<'_> {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True when the buffer holds no image.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    /// Buffer indices per class, classes in ascending order.
    fn by_class(&self) -> Vec<Vec<usize>> {
        let mut groups: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (i, &t) in self.targets.iter().enumerate() {
            groups.entry(t).or_default().push(i);
        }
        groups.into_values().collect()
    }

    /// Number of distinct classes.
    fn class_count(&self) -> usize {
        self.targets
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }
}

/// One replayed image; `partner` is the other image of its closest pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selected {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partner: Option<usize>,
    /// The pair's distance (L1, L2) or similarity (cosine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f32>,
}

/// The replay budget: ⌊`ratio`·`n`⌋ images (closest pairs: half as many pairs), `ratio` in
/// [0, 1].
pub fn budget(ratio: f64, n: usize) -> Result<usize, SamplingError> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(SamplingError::BadRatio(ratio));
    }
    Ok((ratio * n as f64).floor() as usize)
}

/// Selects replay images from `buffer` with `ratio` of its size as the budget.
pub fn select(
    buffer: &ReuseBuffer,
    sampling: Sampling,
    ratio: f64,
    mode: PairMode,
    seed: u64,
) -> Result<Vec<Selected>, SamplingError> {
    if buffer.embeddings.len() != buffer.len() * buffer.dim {
        return Err(SamplingError::Shape {
            targets: buffer.len(),
            rows: buffer.embeddings.len() / buffer.dim.max(1),
        });
    }
    let budget = budget(ratio, buffer.len())?;
    match (sampling, sampling.metric()) {
        (_, Some(metric)) => match mode {
            PairMode::Faithful => faithful_pairs(buffer, metric, budget / 2, seed),
            PairMode::Buffer => buffer_pairs(buffer, metric, budget / 2),
        },
        (Sampling::Random, None) => {
            let mut order: Vec<usize> = (0..buffer.len()).collect();
            Rng::new(seed).shuffle(&mut order);
            order.truncate(budget);
            order.sort_unstable();
            Ok(order
                .into_iter()
                .map(|index| Selected {
                    index,
                    partner: None,
                    value: None,
                })
                .collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// The reference's procedure, `pairs` steps.
fn faithful_pairs(
    buffer: &ReuseBuffer,
    metric: Metric,
    pairs: usize,
    seed: u64,
) -> Result<Vec<Selected>, SamplingError> {
    let mut rng = Rng::new(seed);
    let mut pools = buffer.by_class();
    if pools.len() < 2 && pairs > 0 {
        return Err(SamplingError::OneClass);
    }
    let smallest_but_one = {
        let mut sizes: Vec<usize> = pools.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        sizes
            .get(sizes.len().saturating_sub(2))
            .copied()
            .unwrap_or(0)
    };
    for pool in &mut pools {
        rng.shuffle(pool);
    }
    let mut out = Vec::with_capacity(2 * pairs);
    for step in 0..pairs {
        // One unused image from each class that still has one (taken from its shuffled pool).
        let drawn: Vec<usize> = pools.iter_mut().filter_map(Vec::pop).collect();
        if drawn.len() < 2 {
            return Err(SamplingError::RatioTooHigh {
                pairs: step,
                wanted: pairs,
                classes: drawn.len(),
                max_ratio: 2.0 * smallest_but_one as f64 / buffer.len() as f64,
            });
        }
        let anchor = drawn[rng.below(drawn.len() as u64) as usize];
        let mut best: Option<(f32, usize)> = None;
        for &other in drawn.iter().filter(|&&o| o != anchor) {
            let v = metric.value(buffer.row(anchor), buffer.row(other));
            let key = if metric == Metric::Cosine { -v } else { v };
            if best.is_none_or(|(b, _)| key < b) {
                best = Some((key, other));
            }
        }
        let (key, partner) = best.expect("at least two drawn images");
        let value = if metric == Metric::Cosine { -key } else { key };
        out.push(Selected {
            index: anchor,
            partner: Some(partner),
            value: Some(value),
        });
        out.push(Selected {
            index: partner,
            partner: Some(anchor),
            value: Some(value),
        });
    }
    Ok(out)
}

/// Neighbours per image considered when pairing in buffer mode.
const BUFFER_NEIGHBOURS: usize = 8;

/// How many nearest other-class neighbours of each image buffer mode pairs from, for a buffer
/// of `n` images (the `k` of the search that [`pairs_from_neighbors`] expects).
pub fn buffer_neighbours(n: usize) -> usize {
    BUFFER_NEIGHBOURS.min(n.saturating_sub(1)).max(1)
}

/// Ours: nearest other-class neighbours over the whole buffer, then the closest disjoint pairs.
fn buffer_pairs(
    buffer: &ReuseBuffer,
    metric: Metric,
    pairs: usize,
) -> Result<Vec<Selected>, SamplingError> {
    if pairs == 0 {
        return Ok(Vec::new());
    }
    if buffer.class_count() < 2 {
        return Err(SamplingError::OneClass);
    }
    let k = buffer_neighbours(buffer.len());
    let search = Search {
        metric,
        k,
        other_class: Some((buffer.targets, buffer.targets)),
        precision: Precision::F32,
    };
    let nn = search_host(buffer.embeddings, buffer.embeddings, buffer.dim, &search)?;
    pairs_from_neighbors(&nn, metric, pairs)
}

/// The closest disjoint pairs among each buffer image's nearest other-class neighbours `nn`
/// (every image of the buffer a query, in order, searched against the whole buffer), greedily,
/// closest first, until `pairs` pairs are found: the second half of `--sampling-mode buffer`,
/// for neighbours found elsewhere (a sharded search merged with `merge_topk`).
pub fn pairs_from_neighbors(
    nn: &Neighbors,
    metric: Metric,
    pairs: usize,
) -> Result<Vec<Selected>, SamplingError> {
    let (n, k) = (nn.len(), nn.k);
    if pairs == 0 {
        return Ok(Vec::new());
    }
    if let Some(&index) = nn.indices.iter().find(|&&i| i >= n as i64 || i < -1) {
        return Err(SamplingError::NeighbourOutOfRange { index, n });
    }
    // Candidate pairs, closest first (for cosine, largest similarity first); ties by indices.
    let mut candidates: Vec<(f32, usize, usize)> = Vec::with_capacity(n * k);
    for anchor in 0..n {
        for j in 0..k {
            let partner = nn.indices[anchor * k + j];
            if partner >= 0 {
                let v = nn.values[anchor * k + j];
                let key = if metric == Metric::Cosine { -v } else { v };
                let (a, b) = (anchor.min(partner as usize), anchor.max(partner as usize));
                candidates.push((key, a, b));
            }
        }
    }
    candidates.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let mut used = vec![false; n];
    let mut out = Vec::with_capacity(2 * pairs);
    for (key, a, b) in candidates {
        if out.len() == 2 * pairs {
            break;
        }
        if used[a] || used[b] {
            continue;
        }
        used[a] = true;
        used[b] = true;
        let value = if metric == Metric::Cosine { -key } else { key };
        out.push(Selected {
            index: a,
            partner: Some(b),
            value: Some(value),
        });
        out.push(Selected {
            index: b,
            partner: Some(a),
            value: Some(value),
        });
    }
    if out.len() < 2 * pairs {
        return Err(SamplingError::NotEnoughPairs {
            found: out.len(),
            wanted: 2 * pairs,
            neighbours: k,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six 2-D points in three classes: class 0 at x≈0, class 1 at x≈1, class 2 at x≈10.
    fn toy() -> (Vec<f32>, Vec<i64>) {
        let points = [
            [0.0, 0.0],
            [0.1, 0.0],
            [1.0, 0.0],
            [1.2, 0.0],
            [10.0, 0.0],
            [10.5, 0.0],
        ];
        (
            points.iter().flatten().copied().collect(),
            vec![0, 0, 1, 1, 2, 2],
        )
    }

    #[test]
    fn budgets_none_and_random() {
        let (e, t) = toy();
        let b = ReuseBuffer {
            embeddings: &e,
            dim: 2,
            targets: &t,
        };
        assert!(select(&b, Sampling::None, 0.5, PairMode::Buffer, 0)
            .unwrap()
            .is_empty());
        let r = select(&b, Sampling::Random, 0.5, PairMode::Buffer, 3).unwrap();
        assert_eq!(r.len(), 3);
        let again = select(&b, Sampling::Random, 0.5, PairMode::Buffer, 3).unwrap();
        assert_eq!(r, again);
        assert_eq!(
            select(&b, Sampling::Random, 0.34, PairMode::Buffer, 3)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            select(&b, Sampling::Random, 1.5, PairMode::Buffer, 3),
            Err(SamplingError::BadRatio(1.5))
        );
    }

    #[test]
    fn faithful_picks_the_closest_drawn_image() {
        // With one image per class, every step draws all three: whichever anchor is drawn, its
        // partner is the closest of the other two (0 ↔ 1 are close, 2 is far from both).
        let e = vec![0.0f32, 0.0, 1.0, 0.0, 10.0, 0.0];
        let t = vec![0, 1, 2];
        let b = ReuseBuffer {
            embeddings: &e,
            dim: 2,
            targets: &t,
        };
        for seed in 0..20 {
            let s = select(&b, Sampling::L2Norm, 0.67, PairMode::Faithful, seed).unwrap();
            assert_eq!(s.len(), 2);
            let (a, p) = (s[0].index, s[0].partner.unwrap());
            let expected = match a {
                0 => 1,
                1 => 0,
                _ => 1, // from 2: class 1 at distance 9 beats class 0 at 10
            };
            assert_eq!(p, expected, "seed {seed}: anchor {a}");
            assert_eq!(
                s[0].value,
                Some(Metric::L2.value(&e[a * 2..a * 2 + 2], &e[p * 2..p * 2 + 2]))
            );
        }
    }

    #[test]
    fn faithful_ratio_too_high() {
        let (e, t) = toy();
        let b = ReuseBuffer {
            embeddings: &e,
            dim: 2,
            targets: &t,
        };
        // Two images per class: at most two steps (4 images = 0.67 of the buffer).
        assert_eq!(
            select(&b, Sampling::L1Norm, 0.67, PairMode::Faithful, 1)
                .unwrap()
                .len(),
            4
        );
        let err = select(&b, Sampling::L1Norm, 1.0, PairMode::Faithful, 1).unwrap_err();
        assert!(
            matches!(
                err,
                SamplingError::RatioTooHigh {
                    pairs: 2,
                    wanted: 3,
                    classes: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("ratio too high"));
    }

    #[test]
    fn buffer_pairs_are_other_class_disjoint_and_closest_first() {
        let (e, t) = toy();
        let b = ReuseBuffer {
            embeddings: &e,
            dim: 2,
            targets: &t,
        };
        let s = select(&b, Sampling::L2Norm, 0.34, PairMode::Buffer, 0).unwrap();
        // The closest other-class pair is 1 (x=0.1) ↔ 2 (x=1.0).
        assert_eq!((s[0].index, s[0].partner), (1, Some(2)));
        let all = select(&b, Sampling::L2Norm, 0.67, PairMode::Buffer, 0).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!((all[2].index, all[2].partner), (0, Some(3)));
        // Both class-2 images are far from everything and cannot pair with each other once
        // the others are used: a full buffer cannot be paired.
        let err = select(&b, Sampling::L2Norm, 1.0, PairMode::Buffer, 0).unwrap_err();
        assert!(
            matches!(
                err,
                SamplingError::NotEnoughPairs {
                    found: 4,
                    wanted: 6,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut seen = std::collections::HashSet::new();
        for x in &all {
            assert!(seen.insert(x.index), "image {} repeats", x.index);
            assert_ne!(t[x.index], t[x.partner.unwrap()]);
        }
    }

    #[test]
    fn buffer_pairs_on_random_data() {
        let mut rng = Rng::new(4);
        let (n, d) = (300, 16);
        let e: Vec<f32> = (0..n * d).map(|_| rng.unit_f64() as f32).collect();
        let t: Vec<i64> = (0..n).map(|i| (i % 5) as i64).collect();
        let b = ReuseBuffer {
            embeddings: &e,
            dim: d,
            targets: &t,
        };
        for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
            let s = select(&b, Sampling::closest_pair(metric), 0.5, PairMode::Buffer, 0).unwrap();
            assert_eq!(s.len(), 150);
            let unique: std::collections::HashSet<_> = s.iter().map(|x| x.index).collect();
            assert_eq!(unique.len(), 150);
            assert!(s.iter().all(|x| t[x.index] != t[x.partner.unwrap()]));
            assert_eq!(
                s,
                select(&b, Sampling::closest_pair(metric), 0.5, PairMode::Buffer, 9).unwrap()
            );
        }
    }
}
