//! The experiment file (`bccp experiment --config FILE.toml`) and its expansion into cells:
//! every `[[grid]]` table is a Cartesian product, settings a method ignores are collapsed, and
//! duplicate cells are run once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::Deserialize;

use super::error::{ensure_valid, ExperimentError, Result};
use crate::baselines::FilterBy;
use crate::cleanse::Method;
use crate::cleanse_features::CleanseFeatures;
use crate::config::{choice, RunConfig};
use crate::cutoff::{Action, Percentile, Scope, Score};
use crate::sampling::{PairMode, Sampling};
use crate::verify::VerifyPick;

/// The experiment file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    /// Output folder (results, plots, registry), relative to the working directory.
    pub out: Option<PathBuf>,
    /// `[run]`: the settings every run shares, named as `bccp train`'s flags and `params.json`
    /// (`dataset`, `tuesday_num`, `image_size`, `epochs`, …); the grid and the noise levels
    /// set the rest.
    pub run: RunConfig,
    /// auto, cpu, cuda, cuda:N or metal.
    #[serde(default = "default_device")]
    pub device: String,
    /// Embedding cache (default: the usual cache folder).
    pub cache_dir: Option<PathBuf>,
    /// Seeds every cell runs with (user labels, replay, dropout, initialisation).
    pub seeds: Vec<u64>,
    /// Users' label accuracies (noise levels).
    pub user_accuracy: Vec<f64>,
    /// Also train on the clean labels (method none), the ceiling of every table.
    #[serde(default = "yes")]
    pub ceiling: bool,
    #[serde(default)]
    pub grid: Vec<GridTable>,
}

fn yes() -> bool {
    true
}

fn default_device() -> String {
    "auto".into()
}

/// One `[[grid]]` table: lists of values, all combinations run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridTable {
    pub method: Vec<String>,
    #[serde(default = "default_sampling")]
    pub sampling: Vec<String>,
    #[serde(default = "default_mode")]
    pub sampling_mode: Vec<String>,
    #[serde(default)]
    pub ratio: Vec<f64>,
    #[serde(default = "default_score")]
    pub cutoff_score: Vec<String>,
    #[serde(default = "default_percentile")]
    pub cutoff_percentile: Vec<String>,
    #[serde(default = "default_action")]
    pub cutoff_action: Vec<String>,
    #[serde(default = "default_filter")]
    pub filter_by: Vec<String>,
    /// Folds of the out-of-sample cut-off (1: in sample, the reference's).
    #[serde(default = "default_cutoff_folds")]
    pub cutoff_folds: Vec<usize>,
    /// `global` or `per_class` cuts.
    #[serde(default = "default_scope")]
    pub cutoff_scope: Vec<String>,
    /// Rounds of the cut-off (1: one scoring, as before).
    #[serde(default = "default_rounds")]
    pub cutoff_rounds: Vec<usize>,
    /// Least MC-mean confidence to relabel a cut sample (with `relabel`; 0: always).
    #[serde(default = "default_relabel_confidence")]
    pub relabel_confidence: Vec<f64>,
    /// Never cut the replayed samples.
    #[serde(default = "default_trust")]
    pub cutoff_trust_replay: Vec<bool>,
    /// The features the cleansing scores (bccp and cleanlab): `pretrained` or `tuned`.
    #[serde(default = "default_cleanse_features")]
    pub cleanse_features: Vec<String>,
    /// Scale the cleansing's feature rows to one length (bccp and cleanlab).
    #[serde(default = "default_cleanse_normalise")]
    pub cleanse_normalise: Vec<bool>,
    /// Train on the true labels (once, not per noise level): the ceiling with this table's
    /// replay.
    #[serde(default)]
    pub clean: bool,
    /// Simulated review budgets: shares of the day's candidates whose labels are verified
    /// before the cut-off (0: no review).
    #[serde(default = "default_verify_budget")]
    pub verify_budget: Vec<f64>,
    /// Which samples the simulated review verifies: `flagged` or `random`.
    #[serde(default = "default_verify_pick")]
    pub verify_pick: Vec<String>,
}

fn default_cleanse_features() -> Vec<String> {
    vec!["pretrained".into()]
}
fn default_cleanse_normalise() -> Vec<bool> {
    vec![false]
}

fn default_verify_budget() -> Vec<f64> {
    vec![0.0]
}
fn default_verify_pick() -> Vec<String> {
    vec!["flagged".into()]
}

fn default_scope() -> Vec<String> {
    vec!["global".into()]
}
fn default_rounds() -> Vec<usize> {
    vec![1]
}
fn default_relabel_confidence() -> Vec<f64> {
    vec![0.0]
}
fn default_trust() -> Vec<bool> {
    vec![false]
}

fn default_cutoff_folds() -> Vec<usize> {
    vec![1]
}

fn default_sampling() -> Vec<String> {
    vec!["none".into()]
}
fn default_mode() -> Vec<String> {
    vec!["buffer".into()]
}
fn default_score() -> Vec<String> {
    vec!["label_prob_mean".into()]
}
fn default_percentile() -> Vec<String> {
    vec!["90".into()]
}
fn default_action() -> Vec<String> {
    vec!["drop".into()]
}
fn default_filter() -> Vec<String> {
    vec!["prune_by_noise_rate".into()]
}

/// One configuration of the grid (without seed): settings a method ignores are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub method: Method,
    pub sampling: Sampling,
    pub sampling_mode: Option<PairMode>,
    pub ratio: Option<f64>,
    pub cutoff: Option<(Score, Percentile, Action)>,
    pub filter_by: Option<FilterBy>,
    /// Folds of the cut-off's scoring heads (bccp only).
    pub cutoff_folds: Option<usize>,
    /// The cut-off's further settings (bccp only).
    pub cutoff_more: Option<CutoffMore>,
    /// The features the cleansing scores and whether their rows are normalised (bccp and
    /// cleanlab).
    pub cleanse_on: Option<(CleanseFeatures, bool)>,
    /// `None`: the clean labels (ground truth).
    pub user_accuracy: Option<f64>,
    /// The simulated review's budget and pick (`None`: no review).
    pub verify: Option<(f64, VerifyPick)>,
}

/// The cut-off's settings beyond score, percentile, action and folds; the defaults are the
/// behaviour before they existed and are left out of a configuration's name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CutoffMore {
    pub scope: Scope,
    pub rounds: usize,
    /// Only with `relabel`.
    pub relabel_confidence: f64,
    /// Only with replay.
    pub trust_replay: bool,
}

impl Default for CutoffMore {
    fn default() -> Self {
        Self {
            scope: Scope::Global,
            rounds: 1,
            relabel_confidence: 0.0,
            trust_replay: false,
        }
    }
}

impl CutoffMore {
    /// The name's suffix: `,per_class,3 rounds,relabel≥0.9,trust replay` for what differs
    /// from the defaults.
    fn suffix(&self) -> String {
        let mut s = String::new();
        if self.scope != Scope::Global {
            s.push_str(&format!(",{}", self.scope.name()));
        }
        if self.rounds > 1 {
            s.push_str(&format!(",{} rounds", self.rounds));
        }
        if self.relabel_confidence > 0.0 {
            s.push_str(&format!(",relabel≥{}", self.relabel_confidence));
        }
        if self.trust_replay {
            s.push_str(",trust replay");
        }
        s
    }
}

/// The text of a percentile setting (`90`, `auto`, `joint`, `mixture`).
pub fn percentile_name(p: Percentile) -> String {
    p.to_string()
}

impl Cell {
    /// The configuration without its noise level, e.g. `bccp(label_prob_mean,auto,relabel)
    /// + l2_norm/buffer@0.2`; equal for the same method at every user accuracy.
    pub fn config(&self) -> String {
        let mut s = match (self.method, self.user_accuracy) {
            (Method::None, None) => "clean labels".to_owned(),
            (Method::Bccp, _) => match self.cutoff {
                Some((score, p, a)) => {
                    let folds = match self.cutoff_folds {
                        Some(k) if k > 1 => format!(",{k}-fold"),
                        _ => String::new(),
                    };
                    let more = self.cutoff_more.unwrap_or_default().suffix();
                    format!(
                        "bccp({},{},{}{folds}{more})",
                        score.name(),
                        percentile_name(p),
                        a.name()
                    )
                }
                None => "bccp".into(),
            },
            (Method::Cleanlab, _) => match self.filter_by {
                Some(f) => format!("cleanlab({})", f.name()),
                None => "cleanlab".into(),
            },
            (m, _) => m.name().to_owned(),
        };
        match self.cleanse_on {
            Some((CleanseFeatures::Tuned, true)) => s.push_str(" on tuned normalised features"),
            Some((CleanseFeatures::Tuned, false)) => s.push_str(" on tuned features"),
            Some((CleanseFeatures::Pretrained, true)) => s.push_str(" on normalised features"),
            Some((CleanseFeatures::Auto, normalise)) => s.push_str(if normalise {
                " on auto normalised features"
            } else {
                " on auto features"
            }),
            _ => {}
        }
        if self.sampling != Sampling::None {
            s.push_str(" + ");
            s.push_str(self.sampling.name());
            if let Some(mode) = self.sampling_mode {
                s.push('/');
                s.push_str(mode.name());
            }
            if let Some(r) = self.ratio {
                s.push_str(&format!("@{r}"));
            }
        }
        if let Some((budget, pick)) = self.verify {
            s.push_str(&format!(" + review {}@{budget}", pick.name()));
        }
        s
    }

    /// The cell with the settings its method ignores cleared, so equal runs compare equal.
    fn canonical(mut self) -> Self {
        let replay = self.sampling != Sampling::None;
        if !replay || self.sampling == Sampling::Random {
            self.sampling_mode = None;
        }
        if !replay {
            self.ratio = None;
        }
        if self.method != Method::Bccp {
            self.cutoff = None;
            self.cutoff_folds = None;
            self.cutoff_more = None;
        }
        if let (Some(more), Some((_, _, action))) = (self.cutoff_more.as_mut(), self.cutoff) {
            if action == Action::Drop {
                more.relabel_confidence = 0.0;
            }
            if !replay {
                more.trust_replay = false;
            }
        }
        if self.method != Method::Cleanlab {
            self.filter_by = None;
        }
        if !matches!(self.method, Method::Bccp | Method::Cleanlab) || self.user_accuracy.is_none() {
            self.cleanse_on = None;
        }
        if self.user_accuracy.is_none() {
            self.verify = None;
        }
        self
    }

    /// The noise level as written in reports: the user accuracy, or `clean`.
    pub fn noise(&self) -> String {
        self.user_accuracy
            .map_or_else(|| "clean".to_owned(), |a| format!("{a}"))
    }

    /// A unique key of the cell (configuration and noise level).
    pub fn key(&self) -> String {
        format!("{} | {}", self.config(), self.noise())
    }

    /// The family of methods the cell belongs to, for plots.
    pub fn family(&self) -> &'static str {
        let replay = self.sampling != Sampling::None;
        let pairs = replay && self.sampling != Sampling::Random;
        match (self.method, self.user_accuracy) {
            (_, None) => "clean labels",
            (Method::None, _) if pairs => "closest-pair replay",
            (Method::None, _) if replay => "random replay",
            (Method::None, _) => "no cleansing",
            (Method::Bccp, _) if pairs => "BCCP (cut-off + CP)",
            (Method::Bccp, _) => "cut-off",
            (Method::Cleanlab, _) => "cleanlab",
            (Method::AnlCe, _) => "ANL-CE",
        }
    }
}

/// Every cell of `cells` once per value, with `set` applied (outer axes vary slowest).
fn expand<T: Copy>(cells: Vec<Cell>, values: &[T], set: impl Fn(&mut Cell, T)) -> Vec<Cell> {
    cells
        .iter()
        .flat_map(|cell| {
            values.iter().map(|&v| {
                let mut c = cell.clone();
                set(&mut c, v);
                c
            })
        })
        .collect()
}

/// Changes the cut-off settings (score, percentile, action) of a cell.
fn set_cutoff(cell: &mut Cell, change: impl FnOnce(&mut (Score, Percentile, Action))) {
    if let Some(t) = cell.cutoff.as_mut() {
        change(t);
    }
}

/// Parses the names of one grid axis (`what` is `grid[i].field`).
fn parse_all<T: ValueEnum>(values: &[String], what: &str) -> Result<Vec<T>> {
    let setting = what.rsplit('.').next().unwrap_or(what).replace('_', " ");
    parse_axis(values, what, |v| choice::parse::<T>(&setting, v))
}

/// Parses the percentiles of the grid (numbers or `auto`).
fn parse_percentiles(values: &[String], what: &str) -> Result<Vec<Percentile>> {
    parse_axis(values, what, str::parse::<Percentile>)
}

/// Parses every value of one grid axis with `parse`; errors name the axis (`grid[i].field`).
fn parse_axis<T>(
    values: &[String],
    what: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    ensure_valid!(!values.is_empty(), "{what} is empty");
    values
        .iter()
        .map(|v| parse(v).map_err(|e| ExperimentError::Invalid(format!("{what}: {e}"))))
        .collect()
}

impl ExperimentFile {
    /// Reads and checks an experiment file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(ExperimentError::io("read experiment file", path))?;
        let file: ExperimentFile = toml::from_str(&text).map_err(|e| ExperimentError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(file)
    }

    /// Every cell, in file order, without duplicates. Errors name the table and the field.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        ensure_valid!(
            !self.grid.is_empty(),
            "empty grid: the experiment file has no [[grid]] table"
        );
        ensure_valid!(!self.seeds.is_empty(), "seeds is empty; give at least one");
        ensure_valid!(
            !self.user_accuracy.is_empty(),
            "user_accuracy is empty; give at least one level, e.g. [0.7]"
        );
        for &a in &self.user_accuracy {
            ensure_valid!(
                (0.0..=1.0).contains(&a),
                "user_accuracy {a} must lie in [0, 1]"
            );
        }
        let mut cells = Vec::new();
        // Every axis starts at its default; `canonical` then clears what a method ignores.
        let base = Cell {
            method: Method::None,
            sampling: Sampling::None,
            sampling_mode: Some(PairMode::Buffer),
            ratio: None,
            cutoff: Some((Score::LabelProbMean, Percentile::Fixed(90.0), Action::Drop)),
            filter_by: Some(FilterBy::default()),
            cutoff_folds: Some(1),
            cutoff_more: Some(CutoffMore::default()),
            cleanse_on: Some((CleanseFeatures::Pretrained, false)),
            user_accuracy: None,
            verify: None,
        };
        if self.ceiling {
            cells.push(base.clone().canonical());
        }
        for (g, table) in self.grid.iter().enumerate() {
            let at = |field: &str| format!("grid[{g}].{field}");
            let methods: Vec<Method> = parse_all(&table.method, &at("method"))?;
            let samplings: Vec<Sampling> = parse_all(&table.sampling, &at("sampling"))?;
            let modes: Vec<PairMode> = parse_all(&table.sampling_mode, &at("sampling_mode"))?;
            let scores: Vec<Score> = parse_all(&table.cutoff_score, &at("cutoff_score"))?;
            let percentiles =
                parse_percentiles(&table.cutoff_percentile, &at("cutoff_percentile"))?;
            let actions: Vec<Action> = parse_all(&table.cutoff_action, &at("cutoff_action"))?;
            let filters: Vec<FilterBy> = parse_all(&table.filter_by, &at("filter_by"))?;
            let scopes: Vec<Scope> = parse_all(&table.cutoff_scope, &at("cutoff_scope"))?;
            let features: Vec<CleanseFeatures> =
                parse_all(&table.cleanse_features, &at("cleanse_features"))?;
            ensure_valid!(
                !table.cleanse_normalise.is_empty(),
                "{} is empty",
                at("cleanse_normalise")
            );
            ensure_valid!(
                !table.cutoff_rounds.is_empty(),
                "{} is empty",
                at("cutoff_rounds")
            );
            for &r in &table.cutoff_rounds {
                ensure_valid!(
                    (1..=crate::config::MAX_CUTOFF_ROUNDS).contains(&r),
                    "{} {r}: 1 to {}",
                    at("cutoff_rounds"),
                    crate::config::MAX_CUTOFF_ROUNDS
                );
            }
            ensure_valid!(
                !table.relabel_confidence.is_empty(),
                "{} is empty",
                at("relabel_confidence")
            );
            for &c in &table.relabel_confidence {
                ensure_valid!(
                    (0.0..=1.0).contains(&c),
                    "{} {c} must lie in [0, 1]",
                    at("relabel_confidence")
                );
            }
            ensure_valid!(
                !table.cutoff_trust_replay.is_empty(),
                "{} is empty",
                at("cutoff_trust_replay")
            );
            ensure_valid!(
                !table.cutoff_folds.is_empty(),
                "{} is empty",
                at("cutoff_folds")
            );
            if let Some(&k) = table.cutoff_folds.iter().find(|&&k| k == 0) {
                return Err(ExperimentError::Invalid(format!(
                    "{} {k}: 1 (in sample) or more",
                    at("cutoff_folds")
                )));
            }
            if samplings.iter().any(|&s| s != Sampling::None) && table.ratio.is_empty() {
                return Err(ExperimentError::Invalid(format!(
                    "{}: replay needs ratio = [...]",
                    at("sampling")
                )));
            }
            for &r in &table.ratio {
                ensure_valid!(
                    (0.0..=1.0).contains(&r),
                    "{} {r} must lie in [0, 1]",
                    at("ratio")
                );
            }
            let ratios: Vec<Option<f64>> = if table.ratio.is_empty() {
                vec![None]
            } else {
                table.ratio.iter().map(|&r| Some(r)).collect()
            };
            let picks: Vec<VerifyPick> = parse_all(&table.verify_pick, &at("verify_pick"))?;
            ensure_valid!(
                !table.verify_budget.is_empty(),
                "{} is empty",
                at("verify_budget")
            );
            let mut reviews: Vec<Option<(f64, VerifyPick)>> = Vec::new();
            for &b in &table.verify_budget {
                ensure_valid!(
                    (0.0..=1.0).contains(&b),
                    "{} {b} must lie in [0, 1]",
                    at("verify_budget")
                );
                if b == 0.0 {
                    reviews.push(None);
                } else {
                    reviews.extend(picks.iter().map(|&p| Some((b, p))));
                }
            }
            let mut grid = vec![base.clone()];
            grid = expand(grid, &methods, |c, m| c.method = m);
            grid = expand(grid, &samplings, |c, v| c.sampling = v);
            grid = expand(grid, &modes, |c, m| c.sampling_mode = Some(m));
            grid = expand(grid, &ratios, |c, r| c.ratio = r);
            grid = expand(grid, &scores, |c, v| set_cutoff(c, |t| t.0 = v));
            grid = expand(grid, &percentiles, |c, v| set_cutoff(c, |t| t.1 = v));
            grid = expand(grid, &actions, |c, v| set_cutoff(c, |t| t.2 = v));
            grid = expand(grid, &filters, |c, f| c.filter_by = Some(f));
            grid = expand(grid, &table.cutoff_folds, |c, k| c.cutoff_folds = Some(k));
            let more = |c: &mut Cell, change: &dyn Fn(&mut CutoffMore)| {
                if let Some(m) = c.cutoff_more.as_mut() {
                    change(m);
                }
            };
            grid = expand(grid, &scopes, |c, v| more(c, &|m| m.scope = v));
            grid = expand(grid, &table.cutoff_rounds, |c, v| {
                more(c, &|m| m.rounds = v)
            });
            grid = expand(grid, &table.relabel_confidence, |c, v| {
                more(c, &|m| m.relabel_confidence = v)
            });
            grid = expand(grid, &table.cutoff_trust_replay, |c, v| {
                more(c, &|m| m.trust_replay = v)
            });
            let on = |c: &mut Cell, change: &dyn Fn(&mut (CleanseFeatures, bool))| {
                if let Some(o) = c.cleanse_on.as_mut() {
                    change(o);
                }
            };
            grid = expand(grid, &features, |c, v| on(c, &|o| o.0 = v));
            grid = expand(grid, &table.cleanse_normalise, |c, v| on(c, &|o| o.1 = v));
            grid = expand(grid, &reviews, |c, v| c.verify = v);
            if !table.clean {
                grid = expand(grid, &self.user_accuracy, |c, a| c.user_accuracy = Some(a));
            }
            cells.extend(grid.into_iter().map(Cell::canonical));
        }
        let mut seen = BTreeSet::new();
        cells.retain(|c| seen.insert(c.key()));
        Ok(cells)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(grid: &str) -> ExperimentFile {
        let text = format!(
            "seeds = [1, 2, 3]\nuser_accuracy = [0.5, 0.7]\n[run]\ndataset = \"d\"\ntuesday_num = 10\n{grid}"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn cleansing_features_name_the_methods_that_cleanse_only() {
        let f = file(
            "[[grid]]\nmethod = [\"none\", \"cleanlab\", \"bccp\"]\n\
             cleanse_features = [\"pretrained\", \"tuned\"]\ncleanse_normalise = [true]\n",
        );
        let keys: Vec<String> = f.cells().unwrap().iter().map(Cell::key).collect();
        assert!(keys.contains(&"none | 0.7".to_owned()), "{keys:#?}");
        assert!(keys.contains(
            &"cleanlab(prune_by_noise_rate) on tuned normalised features | 0.7".to_owned()
        ));
        assert!(
            keys.contains(&"bccp(label_prob_mean,90,drop) on normalised features | 0.5".to_owned())
        );
        // none once per level (the features collapse), the other two twice: 2 × (1 + 2 + 2),
        // and the ceiling.
        assert_eq!(keys.len(), 1 + 10, "{keys:#?}");
        let bad = file("[[grid]]\nmethod = [\"bccp\"]\ncleanse_features = [\"finetuned\"]\n");
        let err = bad.cells().unwrap_err().to_string();
        assert!(
            err.contains("grid[0].cleanse_features") && err.contains("tuned"),
            "{err}"
        );
    }

    #[test]
    fn grid_expands_collapses_and_dedupes() {
        let f = file(
            "[[grid]]\nmethod = [\"none\", \"cleanlab\"]\ncutoff_score = [\"label_prob_mean\", \"entropy\"]\n\
             [[grid]]\nmethod = [\"bccp\", \"none\"]\nsampling = [\"none\", \"random\", \"l2_norm\"]\n\
             sampling_mode = [\"faithful\", \"buffer\"]\nratio = [0.1]\n",
        );
        let cells = f.cells().unwrap();
        let keys: Vec<String> = cells.iter().map(Cell::key).collect();
        // Ceiling (1) + table 0: none, cleanlab × 2 levels (the scores collapse) = 4;
        // table 1: 2 methods × (none + random + l2 × 2 modes) × 2 levels = 16, of which
        // none/no-replay × 2 levels are duplicates of table 0 → 14.
        assert_eq!(cells.len(), 1 + 4 + 14, "{keys:#?}");
        assert_eq!(keys[0], "clean labels | clean");
        assert!(keys.contains(&"cleanlab(prune_by_noise_rate) | 0.5".to_owned()));
        assert!(
            keys.contains(&"bccp(label_prob_mean,90,drop) + l2_norm/faithful@0.1 | 0.7".to_owned())
        );
        assert!(keys.contains(&"none + random@0.1 | 0.5".to_owned()));
        let families: BTreeSet<&str> = cells.iter().map(Cell::family).collect();
        assert_eq!(families.len(), 7, "{families:?}");
    }

    #[test]
    fn bad_grids_name_the_field() {
        let cases = [
            ("", "empty grid"),
            (
                "[[grid]]\nmethod = [\"magic\"]\n",
                "grid[0].method: unknown method \"magic\"",
            ),
            ("[[grid]]\nmethod = []\n", "grid[0].method is empty"),
            (
                "[[grid]]\nmethod = [\"none\"]\nsampling = [\"random\"]\n",
                "replay needs ratio",
            ),
            (
                "[[grid]]\nmethod = [\"bccp\"]\ncutoff_percentile = [\"120\"]\n",
                "grid[0].cutoff_percentile",
            ),
        ];
        for (grid, needle) in cases {
            let err = file(grid).cells().unwrap_err().to_string();
            assert!(err.contains(needle), "{grid:?}: {err}");
        }
        let unknown: std::result::Result<ExperimentFile, _> =
            toml::from_str("seeds = [1]\nuser_accuracy = [0.7]\ncolour = 1\n[run]\ndataset = \"d\"\ntuesday_num = 1\n");
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn cutoff_axes_name_what_differs_and_clean_tables_run_once() {
        let f = file(
            "[[grid]]\nmethod = [\"bccp\"]\nsampling = [\"l2_norm\"]\nratio = [0.5]\n\
             cutoff_percentile = [\"joint\"]\ncutoff_action = [\"relabel\"]\n\
             cutoff_scope = [\"global\", \"per_class\"]\ncutoff_rounds = [2]\n\
             relabel_confidence = [0.9]\ncutoff_trust_replay = [true]\n\
             [[grid]]\nmethod = [\"none\"]\nsampling = [\"l2_norm\"]\nratio = [0.5]\nclean = true\n\
             [[grid]]\nmethod = [\"bccp\"]\ncutoff_action = [\"drop\"]\nrelabel_confidence = [0.9]\n\
             cutoff_trust_replay = [true]\n",
        );
        let keys: Vec<String> = f.cells().unwrap().iter().map(Cell::key).collect();
        assert_eq!(
            keys,
            vec![
                "clean labels | clean",
                "bccp(label_prob_mean,joint,relabel,2 rounds,relabel≥0.9,trust replay) + l2_norm/buffer@0.5 | 0.5",
                "bccp(label_prob_mean,joint,relabel,2 rounds,relabel≥0.9,trust replay) + l2_norm/buffer@0.5 | 0.7",
                "bccp(label_prob_mean,joint,relabel,per_class,2 rounds,relabel≥0.9,trust replay) + l2_norm/buffer@0.5 | 0.5",
                "bccp(label_prob_mean,joint,relabel,per_class,2 rounds,relabel≥0.9,trust replay) + l2_norm/buffer@0.5 | 0.7",
                "clean labels + l2_norm/buffer@0.5 | clean",
                // Drop ignores the relabel threshold, no replay ignores trust.
                "bccp(label_prob_mean,90,drop) | 0.5",
                "bccp(label_prob_mean,90,drop) | 0.7",
            ],
        );
        let err = file("[[grid]]\nmethod = [\"bccp\"]\ncutoff_rounds = [0]\n")
            .cells()
            .unwrap_err()
            .to_string();
        assert!(err.contains("grid[0].cutoff_rounds 0"), "{err}");
    }

    #[test]
    fn review_axes_expand_budget_by_pick_and_skip_clean_labels() {
        let f = file(
            "[[grid]]\nmethod = [\"bccp\"]\nverify_budget = [0, 0.05]\n\
             verify_pick = [\"flagged\", \"random\"]\n\
             [[grid]]\nmethod = [\"none\"]\nverify_budget = [0.01]\nverify_pick = [\"random\"]\nclean = true\n",
        );
        let cells = f.cells().unwrap();
        let keys: Vec<String> = cells.iter().map(Cell::key).collect();
        assert_eq!(
            keys,
            vec![
                "clean labels | clean",
                "bccp(label_prob_mean,90,drop) | 0.5",
                "bccp(label_prob_mean,90,drop) | 0.7",
                "bccp(label_prob_mean,90,drop) + review flagged@0.05 | 0.5",
                "bccp(label_prob_mean,90,drop) + review flagged@0.05 | 0.7",
                "bccp(label_prob_mean,90,drop) + review random@0.05 | 0.5",
                "bccp(label_prob_mean,90,drop) + review random@0.05 | 0.7",
                // True labels have nothing to review: the clean table collapses to the ceiling.
            ],
        );
        assert_eq!(cells[3].verify, Some((0.05, VerifyPick::Flagged)));
        for (grid, needle) in [
            (
                "[[grid]]\nmethod = [\"bccp\"]\nverify_budget = [1.5]\n",
                "grid[0].verify_budget 1.5",
            ),
            (
                "[[grid]]\nmethod = [\"bccp\"]\nverify_budget = [0.1]\nverify_pick = [\"best\"]\n",
                "grid[0].verify_pick",
            ),
        ] {
            let err = file(grid).cells().unwrap_err().to_string();
            assert!(err.contains(needle), "{grid:?}: {err}");
        }
    }
}
