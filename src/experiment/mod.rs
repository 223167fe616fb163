//! `bccp experiment`: a grid of `bccp train` runs (methods, replay, cut-off settings, noise
//! levels, seeds) in one process on cached embeddings, resumable, reported as `results.csv`,
//! `results.md` and PNG charts.

pub mod config;
mod error;
pub mod plot;
pub mod report;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backbone::cache::default_cache_dir;
use crate::cleanse_features::CleanseFeatures;
use crate::config::{LabelSource, RunConfig};
use crate::cutoff::{Action, Percentile, Score};
use crate::data::Day;
use crate::fsutil::write_atomic;
use crate::pipeline::{self, PipelineError, RunEnv};
use crate::progress::Progress;
use crate::registry::{metric, Registry, RunMetrics};
use crate::sampling::{PairMode, SamplingError};

pub use config::{Cell, ExperimentFile};
pub use error::{ExperimentError, Result};
use report::{Row, COLUMNS};

/// The files an experiment writes into its output folder.
pub const RESULTS_CSV: &str = "results.csv";
pub const RESULTS_MD: &str = "results.md";
pub const ACCURACY_PNG: &str = "accuracy.png";
pub const DETECTION_PNG: &str = "detection.png";

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Runs in the grid (cells × seeds).
    pub total: usize,
    /// Runs done in this call.
    pub ran: usize,
    /// Runs found finished in `results.csv` and skipped.
    pub skipped: usize,
    /// The registry the runs went to (`out/registry`) and the runs registered in this call.
    pub registry: Registry,
    pub registered: Vec<crate::registry::RunDir>,
}

/// The `bccp train` settings of one cell and seed: the file's `[run]` table with the cell's
/// choices on top.
fn run_config(file: &ExperimentFile, cell: &Cell, seed: u64) -> RunConfig {
    let (score, percentile, action) =
        cell.cutoff
            .unwrap_or((Score::LabelProbMean, Percentile::Fixed(90.0), Action::Drop));
    let more = cell.cutoff_more.unwrap_or_default();
    RunConfig {
        target_day: Day::Tuesday,
        label: match cell.user_accuracy {
            None => LabelSource::GroundTruth,
            Some(_) => LabelSource::UserFeedback,
        },
        user_accuracy: cell.user_accuracy.unwrap_or(1.0),
        method: cell.method,
        sampling: cell.sampling,
        sampling_mode: cell.sampling_mode.unwrap_or(PairMode::Buffer),
        ratio: cell.ratio,
        cutoff_score: score,
        cutoff_percentile: percentile,
        cutoff_action: action,
        cutoff_folds: cell.cutoff_folds.unwrap_or(1),
        cutoff_scope: more.scope,
        cutoff_rounds: more.rounds,
        relabel_confidence: more.relabel_confidence,
        cutoff_trust_replay: more.trust_replay,
        cleanse_features: cell.cleanse_on.map_or(CleanseFeatures::Pretrained, |o| o.0),
        cleanse_normalise: cell.cleanse_on.is_some_and(|o| o.1),
        filter_by: cell.filter_by.unwrap_or_default(),
        verify_budget: cell.verify.map_or(0.0, |v| v.0),
        verify_pick: cell.verify.map(|v| v.1).unwrap_or_default(),
        seed,
        model_name: "experiment".into(),
        ..file.run.clone()
    }
}

/// Where the runs of an experiment happen: the file's device and cache, offline, registered
/// under `out/registry`.
fn run_env(file: &ExperimentFile, out: &Path) -> Result<RunEnv> {
    Ok(RunEnv {
        device: crate::device::parse_device(&file.device)?,
        cache_dir: Some(file.cache_dir.clone().unwrap_or_else(default_cache_dir)),
        offline: true,
        registry: Registry::open(out.join("registry")),
        resume: false,
    })
}

/// The CSV row of a finished (or refused) run.
fn row(cell: &Cell, seed: u64, metrics: Option<&RunMetrics>, error: &str) -> Row {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let (score, percentile, action) = match cell.cutoff {
        Some((s, p, a)) => (s.name().to_owned(), p.to_string(), a.name().to_owned()),
        None => Default::default(),
    };
    // Counts print as integers, rates with serde_json's shortest round-trip form.
    let value = |k: &str| -> String {
        match metrics.and_then(|m| m.scalar(k)) {
            Some(v) if RunMetrics::is_count(k) => format!("{}", v as u64),
            Some(v) => serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string()),
            None => String::new(),
        }
    };
    let seconds = metrics
        .map(|m| m.seconds.total - m.seconds.embed)
        .map_or_else(String::new, |s| format!("{s:.3}"));
    let values: Vec<String> = COLUMNS
        .iter()
        .map(|&c| match c {
            "config" => cell.config(),
            "family" => cell.family().to_owned(),
            "user_accuracy" => cell.noise(),
            "seed" => seed.to_string(),
            "method" => cell.method.name().to_owned(),
            "sampling" => cell.sampling.name().to_owned(),
            "sampling_mode" => opt(cell.sampling_mode.map(|m| m.name().to_owned())),
            "ratio" => opt(cell.ratio.map(|r| r.to_string())),
            "cutoff_score" => score.clone(),
            "cutoff_percentile" => percentile.clone(),
            "cutoff_action" => action.clone(),
            "cutoff_folds" => opt(cell.cutoff_folds.map(|k| k.to_string())),
            "cutoff_scope" => opt(cell.cutoff_more.map(|m| m.scope.name().to_owned())),
            "cutoff_rounds" => opt(cell.cutoff_more.map(|m| m.rounds.to_string())),
            "relabel_confidence" => opt(cell.cutoff_more.map(|m| m.relabel_confidence.to_string())),
            "cutoff_trust_replay" => opt(cell.cutoff_more.map(|m| m.trust_replay.to_string())),
            "cleanse_features" => opt(cell.cleanse_on.map(|o| o.0.name().to_owned())),
            "cleanse_normalise" => opt(cell.cleanse_on.map(|o| o.1.to_string())),
            "filter_by" => opt(cell.filter_by.map(|f| f.name().to_owned())),
            "verify_budget" => opt(cell.verify.map(|v| v.0.to_string())),
            "verify_pick" => opt(cell.verify.map(|v| v.1.name().to_owned())),
            report::REMOVED => value(metric::REMOVED_BY_CUTOFF),
            "seconds" => seconds.clone(),
            "error" => error.to_owned(),
            other => value(other),
        })
        .collect();
    Row(values)
}

/// Checks everything a grid needs before any run: the cells, the dataset, every run's flags.
pub fn plan(file: &ExperimentFile) -> Result<Vec<(Cell, u64, RunConfig)>> {
    let cells = file.cells()?;
    error::ensure_valid!(
        file.run.dataset.join("tuesday.jsonl").is_file(),
        "run.dataset {} is not a prepared dataset (no tuesday.jsonl); make one with bccp prepare",
        file.run.dataset.display()
    );
    let mut runs = Vec::new();
    for cell in cells {
        for &seed in &file.seeds {
            let cfg = run_config(file, &cell, seed);
            cfg.validate().map_err(|e| ExperimentError::Cell {
                cell: cell.key(),
                message: e.to_string(),
            })?;
            runs.push((cell.clone(), seed, cfg));
        }
    }
    Ok(runs)
}

/// Runs every cell × seed not yet in `out/results.csv`, rewriting it after each run, then
/// writes `results.md` and the charts. The embeddings are computed (or read from the cache)
/// once for all runs. `log` receives one line per run.
pub fn run(file: &ExperimentFile, out: &Path, mut log: impl FnMut(&str)) -> Result<Summary> {
    let runs = plan(file)?;
    let env = run_env(file, out)?;
    std::fs::create_dir_all(out).map_err(ExperimentError::io("create", out))?;
    let csv = out.join(RESULTS_CSV);
    let mut rows = report::read_csv(&csv)?;
    let done: BTreeSet<(String, String, String)> = rows.iter().map(Row::run_key).collect();
    // Every cell shares the [dataset] section, hence the splits and the embeddings: once.
    let mut embedded: Option<pipeline::Embedded> = None;
    let mut summary = Summary {
        total: runs.len(),
        ran: 0,
        skipped: 0,
        registry: env.registry.clone(),
        registered: Vec::new(),
    };
    for (i, (cell, seed, cfg)) in runs.iter().enumerate() {
        let key = (cell.config(), cell.noise(), seed.to_string());
        if done.contains(&key) {
            summary.skipped += 1;
            continue;
        }
        let started = Instant::now();
        if embedded.is_none() {
            let shared = pipeline::embed_stage(cfg, &env, &Progress::hidden()).map_err(Box::new)?;
            if let Some(warning) = shared.embed_stats.cache_warning() {
                log(&warning);
            }
            embedded = Some(shared);
        }
        let Some(shared) = embedded.as_ref() else {
            continue;
        };
        let new_row = match pipeline::run_embedded(cfg, &env, shared, &Progress::hidden()) {
            Ok(outcome) => {
                let acc = outcome.metrics.test_accuracy;
                log(&format!(
                    "[{}/{}] {} seed {seed}: test accuracy {acc:.4} ({:.1} s)",
                    i + 1,
                    runs.len(),
                    cell.key(),
                    started.elapsed().as_secs_f64()
                ));
                let row = row(cell, *seed, Some(&outcome.metrics), "");
                summary.registered.push(outcome.run);
                row
            }
            Err(PipelineError::Sampling(SamplingError::RatioTooHigh { .. })) => {
                log(&format!(
                    "[{}/{}] {} seed {seed}: ratio too high",
                    i + 1,
                    runs.len(),
                    cell.key()
                ));
                row(cell, *seed, None, "ratio too high")
            }
            Err(e) => {
                return Err(ExperimentError::Run {
                    cell: cell.key(),
                    seed: *seed,
                    source: Box::new(e),
                });
            }
        };
        rows.push(new_row);
        write_atomic(&csv, report::to_csv(&rows).as_bytes())
            .map_err(ExperimentError::io("write", &csv))?;
        summary.ran += 1;
    }
    write_reports(&rows, out)?;
    Ok(summary)
}

/// Writes `results.md` and the two charts from `rows`.
pub fn write_reports(rows: &[Row], out: &Path) -> Result<()> {
    let md = out.join(RESULTS_MD);
    write_atomic(&md, report::markdown(rows).as_bytes())
        .map_err(ExperimentError::io("write", &md))?;
    plot::accuracy_chart(rows, &out.join(ACCURACY_PNG))?;
    plot::detection_chart(rows, &out.join(DETECTION_PNG))
}

/// The output folder: `--out` when given, else the file's `out`, else `runs/experiments/<stem>`.
pub fn output_dir(file: &ExperimentFile, config_path: &Path, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| file.out.clone())
        .unwrap_or_else(|| {
            let stem = config_path
                .file_stem()
                .map_or_else(|| "experiment".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("runs/experiments").join(stem)
        })
}
