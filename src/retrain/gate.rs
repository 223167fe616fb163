//! The promotion gate: a challenger replaces the champion only if it is better on the trusted
//! gate set by a margin and no day (source) gets worse by more than an allowed drop.

use std::collections::BTreeMap;

use serde::Serialize;

/// Accuracy on the gate set, overall and per source (day).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateScore {
    pub accuracy: f64,
    /// Source → (accuracy, samples).
    pub per_source: BTreeMap<String, (f64, usize)>,
}

impl GateScore {
    /// Scores predictions against the trusted labels; `sources[i]` is sample i's source.
    pub fn of(predicted: &[u32], truth: &[u32], sources: &[String]) -> Self {
        let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut right = 0;
        for ((p, t), s) in predicted.iter().zip(truth).zip(sources) {
            let e = per.entry(s.clone()).or_default();
            e.1 += 1;
            if p == t {
                e.0 += 1;
                right += 1;
            }
        }
        let share = |r: usize, n: usize| if n == 0 { 0.0 } else { r as f64 / n as f64 };
        Self {
            accuracy: share(right, truth.len()),
            per_source: per
                .into_iter()
                .map(|(s, (r, n))| (s, (share(r, n), n)))
                .collect(),
        }
    }
}

/// The gate's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateRule {
    /// How much better (overall gate accuracy) a challenger must be than the champion.
    pub margin: f64,
    /// How much worse than the champion a challenger may be on any one source.
    pub max_day_drop: f64,
}

/// What the gate decided for one challenger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub promote: bool,
    /// Why, in words.
    pub reason: String,
}

/// The gate for each challenger (in order) against the champion's score, or, on the first
/// cycle, against the majority-class baseline's gate accuracy. At most one is promoted: the
/// eligible challenger with the best gate accuracy (the earlier one on a tie).
pub fn decide(
    champion: Option<&GateScore>,
    majority_baseline: f64,
    challengers: &[&GateScore],
    rule: GateRule,
) -> Vec<Verdict> {
    let verdicts: Vec<Verdict> = challengers
        .iter()
        .map(|c| match champion {
            None if c.accuracy > majority_baseline => Verdict {
                promote: true,
                reason: format!(
                    "first model: gate accuracy {:.4} beats the majority-class baseline {:.4}",
                    c.accuracy, majority_baseline
                ),
            },
            None => Verdict {
                promote: false,
                reason: format!(
                    "first model: gate accuracy {:.4} does not beat the majority-class baseline {:.4}",
                    c.accuracy, majority_baseline
                ),
            },
            Some(champ) => against_champion(c, champ, rule),
        })
        .collect();
    let best = verdicts
        .iter()
        .zip(challengers)
        .enumerate()
        .filter(|(_, (v, _))| v.promote)
        .fold(None::<(usize, f64)>, |best, (i, (_, c))| match best {
            Some((_, acc)) if acc >= c.accuracy => best,
            _ => Some((i, c.accuracy)),
        });
    verdicts
        .into_iter()
        .enumerate()
        .map(|(i, v)| match best {
            Some((b, acc)) if v.promote && i != b => Verdict {
                promote: false,
                reason: if challengers[i].accuracy < acc {
                    format!(
                        "passed the gate, but another challenger did better ({:.4} against {acc:.4})",
                        challengers[i].accuracy
                    )
                } else {
                    format!("passed the gate, tied ({acc:.4}) with an earlier challenger, which is promoted")
                },
            },
            _ => v,
        })
        .collect()
}

fn against_champion(c: &GateScore, champ: &GateScore, rule: GateRule) -> Verdict {
    let gain = c.accuracy - champ.accuracy;
    let drops: Vec<String> = champ
        .per_source
        .iter()
        .filter_map(|(source, &(before, _))| {
            let (after, _) = c.per_source.get(source)?;
            (before - after > rule.max_day_drop).then(|| {
                format!(
                    "{source} dropped from {before:.4} to {after:.4} (more than {:.4})",
                    rule.max_day_drop
                )
            })
        })
        .collect();
    if !drops.is_empty() {
        return Verdict {
            promote: false,
            reason: format!("rejected: {}", drops.join("; ")),
        };
    }
    if gain < rule.margin {
        return Verdict {
            promote: false,
            reason: format!(
                "rejected: gate accuracy {:.4} against the champion's {:.4} (a gain of {gain:+.4}, under the margin {:.4})",
                c.accuracy, champ.accuracy, rule.margin
            ),
        };
    }
    Verdict {
        promote: true,
        reason: format!(
            "gate accuracy {:.4} against the champion's {:.4} ({gain:+.4}, margin {:.4}); no day dropped more than {:.4}",
            c.accuracy, champ.accuracy, rule.margin, rule.max_day_drop
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(acc: f64, days: &[(&str, f64)]) -> GateScore {
        GateScore {
            accuracy: acc,
            per_source: days
                .iter()
                .map(|&(d, a)| (d.to_owned(), (a, 100)))
                .collect(),
        }
    }

    const RULE: GateRule = GateRule {
        margin: 0.01,
        max_day_drop: 0.05,
    };

    #[test]
    fn scores_per_source() {
        let s = GateScore::of(
            &[0, 1, 1, 2],
            &[0, 1, 0, 2],
            &[
                "monday".into(),
                "monday".into(),
                "tuesday".into(),
                "tuesday".into(),
            ],
        );
        assert_eq!(s.accuracy, 0.75);
        assert_eq!(s.per_source["monday"], (1.0, 2));
        assert_eq!(s.per_source["tuesday"], (0.5, 2));
    }

    #[test]
    fn first_cycle_against_the_majority_baseline() {
        let v = decide(None, 0.3, &[&score(0.8, &[])], RULE);
        assert!(v[0].promote, "{}", v[0].reason);
        let v = decide(None, 0.3, &[&score(0.2, &[])], RULE);
        assert!(!v[0].promote);
    }

    #[test]
    fn margin_day_drop_and_best_of_several() {
        let champ = score(0.70, &[("monday", 0.90), ("tuesday", 0.50)]);
        // Better overall but Monday drops by 0.10: rejected, naming the day.
        let forgetful = score(0.75, &[("monday", 0.80), ("tuesday", 0.70)]);
        // Under the margin.
        let same = score(0.705, &[("monday", 0.90), ("tuesday", 0.51)]);
        let good = score(0.78, &[("monday", 0.88), ("tuesday", 0.68)]);
        let better = score(0.80, &[("monday", 0.89), ("tuesday", 0.71)]);
        let v = decide(
            Some(&champ),
            0.1,
            &[&forgetful, &same, &good, &better],
            RULE,
        );
        assert!(!v[0].promote && v[0].reason.contains("monday dropped from 0.9000 to 0.8000"));
        assert!(!v[1].promote && v[1].reason.contains("under the margin"));
        assert!(!v[2].promote && v[2].reason.contains("another challenger did better"));
        assert!(v[3].promote, "{}", v[3].reason);
        // A tie goes to the earlier challenger, and says so.
        let v = decide(Some(&champ), 0.1, &[&better, &better.clone()], RULE);
        assert!(v[0].promote);
        assert!(
            v[1].reason
                .contains("tied (0.8000) with an earlier challenger"),
            "{}",
            v[1].reason
        );
    }
}
