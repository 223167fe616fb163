//! The dashboard's numbers: the store's recent predictions bucketed in time (predictions per
//! second by class, latency p50/p95, the version served), and each retrain cycle's gate
//! accuracy per day with its decision and the share the cut-off dropped or relabelled.

use std::collections::BTreeSet;

use crate::data::timestamp::parse_rfc3339;
use crate::store::{Prediction, Retrain};

/// At most this many time buckets per chart.
const MAX_BUCKETS: i64 = 60;

/// Predictions bucketed in time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Timeline {
    /// Start of each bucket (Unix seconds).
    pub starts: Vec<i64>,
    /// Bucket width in seconds.
    pub width: i64,
    /// Class indexes present, ascending.
    pub classes: Vec<i64>,
    /// `rate[c][b]`: predictions per second of `classes[c]` in bucket `b`.
    pub rate: Vec<Vec<f64>>,
    /// Latency percentiles (ms) per bucket; `None` where the bucket is empty.
    pub p50: Vec<Option<f64>>,
    pub p95: Vec<Option<f64>>,
    /// The highest version that answered in each bucket.
    pub version: Vec<Option<i64>>,
}

/// The `q`-quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Timeline {
    /// Buckets `rows` (by increasing id); `None` when there is nothing to chart.
    pub fn of(rows: &[Prediction]) -> Option<Self> {
        let points: Vec<(i64, &Prediction)> = rows
            .iter()
            .filter_map(|p| Some((parse_rfc3339(&p.prediction.timestamp)?, p)))
            .collect();
        let first = points.iter().map(|(t, _)| *t).min()?;
        let last = points.iter().map(|(t, _)| *t).max()?;
        let span = last - first + 1;
        let width = ((span + MAX_BUCKETS - 1) / MAX_BUCKETS).max(1);
        let n = ((span + width - 1) / width) as usize;
        let classes: Vec<i64> = points
            .iter()
            .map(|(_, p)| p.prediction.class)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut counts = vec![vec![0u64; n]; classes.len()];
        let mut latencies = vec![Vec::new(); n];
        let mut version = vec![None; n];
        for (t, p) in &points {
            let b = ((t - first) / width) as usize;
            if let Ok(c) = classes.binary_search(&p.prediction.class) {
                counts[c][b] += 1;
            }
            latencies[b].push(p.prediction.latency_ms);
            version[b] = version[b].max(Some(p.prediction.version));
        }
        let (mut p50, mut p95) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for l in &mut latencies {
            l.sort_by(f64::total_cmp);
            p50.push(quantile(l, 0.5));
            p95.push(quantile(l, 0.95));
        }
        Some(Self {
            starts: (0..n as i64).map(|b| first + b * width).collect(),
            width,
            classes,
            rate: counts
                .into_iter()
                .map(|row| row.into_iter().map(|c| c as f64 / width as f64).collect())
                .collect(),
            p50,
            p95,
            version,
        })
    }
}

/// One challenger of one retrain cycle.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CycleRow {
    pub cycle: i64,
    pub started: String,
    pub trigger: String,
    pub challenger: String,
    pub method: String,
    /// Gate accuracy per day (source), in the order of [`Cycles::days`].
    pub per_day: Vec<Option<f64>>,
    pub gate: Option<f64>,
    /// Share of the cleansing's samples the cut-off dropped or relabelled.
    pub cut_share: Option<f64>,
    pub decision: String,
}

/// The retrain cycles, one row per challenger.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Cycles {
    pub days: Vec<String>,
    pub rows: Vec<CycleRow>,
}

impl Cycles {
    /// The last `limit` challengers of `retrains` (cycles without one get a row of their own).
    pub fn of(retrains: &[Retrain], limit: usize) -> Self {
        let mut days = BTreeSet::new();
        for r in retrains {
            for c in r.reasons["challengers"].as_array().into_iter().flatten() {
                if let Some(per) = c["gate"]["per_source"].as_object() {
                    days.extend(per.keys().cloned());
                }
            }
        }
        let days: Vec<String> = days.into_iter().collect();
        let mut rows = Vec::new();
        for r in retrains {
            let challengers = r.reasons["challengers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if challengers.is_empty() {
                rows.push(CycleRow {
                    cycle: r.id,
                    started: r.started.clone(),
                    trigger: r.trigger.clone(),
                    challenger: r.challenger.clone().unwrap_or_else(|| "–".into()),
                    method: "–".into(),
                    per_day: vec![None; days.len()],
                    gate: None,
                    cut_share: None,
                    decision: r.decision.clone(),
                });
            }
            for c in challengers {
                let dropped = c["dropped"].as_f64();
                let kept = c["trained_on"].as_f64();
                // Cycles recorded before the relabelled count existed relabelled nothing.
                let relabelled = c["relabelled"].as_f64().unwrap_or(0.0);
                let cut_share = match (dropped, kept) {
                    (Some(d), Some(k)) if d + k > 0.0 => Some((d + relabelled) / (d + k)),
                    _ => None,
                };
                rows.push(CycleRow {
                    cycle: r.id,
                    started: r.started.clone(),
                    trigger: r.trigger.clone(),
                    challenger: c["version"].as_str().unwrap_or("?").to_owned(),
                    method: c["method"].as_str().unwrap_or("?").to_owned(),
                    per_day: days
                        .iter()
                        .map(|d| c["gate"]["per_source"][d][0].as_f64())
                        .collect(),
                    gate: c["gate"]["accuracy"].as_f64(),
                    cut_share,
                    decision: if c["promoted"].as_bool() == Some(true) {
                        "promoted".into()
                    } else {
                        c["reason"].as_str().unwrap_or(&r.decision).to_owned()
                    },
                });
            }
        }
        let skip = rows.len().saturating_sub(limit);
        Self {
            days,
            rows: rows.into_iter().skip(skip).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewPrediction;

    fn p(id: i64, t: &str, class: i64, version: i64, latency_ms: f64) -> Prediction {
        Prediction {
            id,
            prediction: NewPrediction {
                timestamp: t.into(),
                sample_id: None,
                request_id: None,
                model: "m".into(),
                version,
                class,
                probability: 0.9,
                latency_ms,
            },
        }
    }

    #[test]
    fn buckets_rates_percentiles_and_versions() {
        let rows = [
            p(1, "2024-01-01T00:00:00Z", 0, 1, 10.0),
            p(2, "2024-01-01T00:00:00Z", 1, 1, 20.0),
            p(3, "2024-01-01T00:00:02Z", 0, 2, 30.0),
            p(4, "2024-01-01T00:00:02Z", 0, 2, 40.0),
        ];
        let t = Timeline::of(&rows).unwrap();
        assert_eq!(t.width, 1);
        assert_eq!(t.starts.len(), 3);
        assert_eq!(t.classes, [0, 1]);
        assert_eq!(t.rate[0], [1.0, 0.0, 2.0]);
        assert_eq!(t.rate[1], [1.0, 0.0, 0.0]);
        assert_eq!(t.p50, [Some(10.0), None, Some(30.0)]);
        assert_eq!(t.p95, [Some(20.0), None, Some(40.0)]);
        assert_eq!(t.version, [Some(1), None, Some(2)]);
        // Two hours of data: 60 buckets of 2 minutes.
        let long = [
            p(1, "2024-01-01T00:00:00Z", 0, 1, 1.0),
            p(2, "2024-01-01T01:59:59Z", 0, 1, 1.0),
        ];
        let t = Timeline::of(&long).unwrap();
        assert_eq!((t.width, t.starts.len()), (120, 60));
        assert_eq!(t.rate[0][0], 1.0 / 120.0);
        assert!(Timeline::of(&[]).is_none());
    }

    #[test]
    fn cycles_per_challenger() {
        let r = Retrain {
            id: 2,
            started: "2024-01-02T00:00:00Z".into(),
            finished: None,
            trigger: "tuesday arrived".into(),
            challenger: None,
            champion: None,
            decision: "promoted".into(),
            reasons: serde_json::json!({"challengers": [
                {"version": "m:3", "method": "none", "dropped": 0, "trained_on": 100,
                 "gate": {"accuracy": 0.7, "per_source": {"monday": [0.8, 10], "tuesday": [0.6, 10]}},
                 "promoted": false, "reason": "rejected: monday dropped"},
                {"version": "m:4", "method": "bccp", "dropped": 25, "relabelled": 15, "trained_on": 75,
                 "gate": {"accuracy": 0.8, "per_source": {"monday": [0.85, 10], "tuesday": [0.75, 10]}},
                 "promoted": true, "reason": null},
            ]}),
            watermark: None,
        };
        let c = Cycles::of(&[r], 10);
        assert_eq!(c.days, ["monday", "tuesday"]);
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[0].decision, "rejected: monday dropped");
        assert_eq!(c.rows[1].decision, "promoted");
        assert_eq!(c.rows[1].per_day, [Some(0.85), Some(0.75)]);
        assert_eq!(c.rows[1].cut_share, Some(0.4));
        assert_eq!(c.rows[0].cut_share, Some(0.0));
        assert_eq!(Cycles::of(&[], 10), Cycles::default());
    }
}
