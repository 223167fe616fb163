//! `bccp experiment`: a grid of `bccp train` runs (methods, replay, cut-off settings, noise
//! levels, seeds) in one process on cached embeddings, resumable, reported as `results.csv`,
//! `results.md` and PNG charts.

pub mod config;
pub mod plot;
pub mod report;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::backbone::cache::default_cache_dir;
use crate::cleanse::CleanseConfig;
use crate::cutoff::{Action, Percentile, Score};
use crate::data::Day;
use crate::fsutil::write_atomic;
use crate::pipeline::{self, LabelSource, RunConfig};
use crate::progress::Progress;
use crate::sampling::{PairMode, SamplingError};
use crate::train::finetune::Finetune;
use crate::train::TrainConfig;

pub use config::{Cell, ExperimentFile};
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
}

/// The `bccp train` settings of one cell and seed.
fn run_config(file: &ExperimentFile, cell: &Cell, seed: u64, out: &Path) -> Result<RunConfig> {
    let d = &file.dataset;
    let (score, percentile, action) =
        cell.cutoff
            .unwrap_or((Score::LabelProbMean, Percentile::Fixed(90.0), Action::Drop));
    Ok(RunConfig {
        dataset: d.path.clone(),
        target_day: Day::Tuesday,
        label: match cell.user_accuracy {
            None => LabelSource::GroundTruth,
            Some(_) => LabelSource::UserFeedback,
        },
        user_accuracy: cell.user_accuracy.unwrap_or(1.0),
        sampling: cell.sampling,
        sampling_mode: cell.sampling_mode.unwrap_or(PairMode::Buffer),
        ratio: cell.ratio.unwrap_or(0.0),
        monday_num: d.monday_num,
        tuesday_num: Some(d.tuesday_num),
        model_name: "experiment".into(),
        backbone: d.backbone.clone(),
        weights: d.weights.clone(),
        image_size: d.image_size,
        cleanse: CleanseConfig {
            method: cell.method,
            cutoff_score: score,
            cutoff_percentile: percentile,
            cutoff_action: action,
            mc_passes: file.train.mc_passes,
            cutoff_folds: cell.cutoff_folds.unwrap_or(1),
            filter_by: cell.filter_by.unwrap_or_default(),
            folds: file.train.folds,
        },
        finetune: Finetune::Head,
        backbone_lr: 1e-4,
        train: TrainConfig {
            epochs: file.train.epochs,
            batch_size: file.train.batch_size,
            lr: file.train.lr,
            seed,
            ..Default::default()
        },
        device: crate::device::parse_device(&d.device)?,
        cache_dir: Some(d.cache_dir.clone().unwrap_or_else(default_cache_dir)),
        runs_dir: out.join("registry"),
        offline: true,
    })
}

/// The CSV row of a finished (or refused) run.
fn row(cell: &Cell, seed: u64, metrics: Option<&serde_json::Value>, error: &str) -> Row {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let (score, percentile, action) = match cell.cutoff {
        Some((s, p, a)) => (
            s.name().to_owned(),
            config::percentile_name(p),
            a.name().to_owned(),
        ),
        None => Default::default(),
    };
    let metric = |k: &str| -> String {
        metrics
            .and_then(|m| m.get(k))
            .map(|v| match v {
                serde_json::Value::Number(n) => n.to_string(),
                _ => String::new(),
            })
            .unwrap_or_default()
    };
    let seconds = metrics
        .and_then(|m| Some(m["seconds"]["total"].as_f64()? - m["seconds"]["embed"].as_f64()?))
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
            "filter_by" => opt(cell.filter_by.map(|f| f.name().to_owned())),
            "removed" => metric("removed_by_cutoff"),
            "seconds" => seconds.clone(),
            "error" => error.to_owned(),
            other => metric(other),
        })
        .collect();
    Row(values)
}

/// Checks everything a grid needs before any run: the cells, the dataset, every run's flags.
pub fn plan(file: &ExperimentFile, out: &Path) -> Result<Vec<(Cell, u64, RunConfig)>> {
    let cells = file.cells()?;
    anyhow::ensure!(
        file.dataset.path.join("tuesday.jsonl").is_file(),
        "dataset.path {} is not a prepared dataset (no tuesday.jsonl); make one with bccp prepare",
        file.dataset.path.display()
    );
    let mut runs = Vec::new();
    for cell in cells {
        for &seed in &file.seeds {
            let cfg = run_config(file, &cell, seed, out)?;
            pipeline::validate(&cfg).with_context(|| format!("cell {}", cell.key()))?;
            runs.push((cell.clone(), seed, cfg));
        }
    }
    Ok(runs)
}

/// Runs every cell × seed not yet in `out/results.csv`, rewriting it after each run, then
/// writes `results.md` and the charts. The embeddings are computed (or read from the cache)
/// once for all runs. `log` receives one line per run.
pub fn run(file: &ExperimentFile, out: &Path, mut log: impl FnMut(&str)) -> Result<Summary> {
    let runs = plan(file, out)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let csv = out.join(RESULTS_CSV);
    let mut rows = report::read_csv(&csv)?;
    let done: BTreeSet<(String, String, String)> = rows.iter().map(Row::run_key).collect();
    // Every cell shares the [dataset] section, hence the splits and the embeddings: once.
    let mut embedded: Option<pipeline::Embedded> = None;
    let mut summary = Summary {
        total: runs.len(),
        ran: 0,
        skipped: 0,
    };
    for (i, (cell, seed, cfg)) in runs.iter().enumerate() {
        let key = (cell.config(), cell.noise(), seed.to_string());
        if done.contains(&key) {
            summary.skipped += 1;
            continue;
        }
        let started = Instant::now();
        if embedded.is_none() {
            embedded = Some(pipeline::embed_stage(cfg, &Progress::hidden())?);
        }
        let shared = embedded.as_ref().context("embeddings computed above")?;
        let new_row = match pipeline::run_embedded(cfg, shared, &Progress::hidden()) {
            Ok(outcome) => {
                let acc = outcome.metrics["test_accuracy"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                log(&format!(
                    "[{}/{}] {} seed {seed}: test accuracy {acc:.4} ({:.1} s)",
                    i + 1,
                    runs.len(),
                    cell.key(),
                    started.elapsed().as_secs_f64()
                ));
                row(cell, *seed, Some(&outcome.metrics), "")
            }
            Err(e)
                if e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<SamplingError>(),
                        Some(SamplingError::RatioTooHigh { .. })
                    )
                }) =>
            {
                log(&format!(
                    "[{}/{}] {} seed {seed}: ratio too high",
                    i + 1,
                    runs.len(),
                    cell.key()
                ));
                row(cell, *seed, None, "ratio too high")
            }
            Err(e) => {
                return Err(e.context(format!("cell {} seed {seed}", cell.key())));
            }
        };
        rows.push(new_row);
        write_atomic(&csv, report::to_csv(&rows).as_bytes())
            .with_context(|| format!("cannot write {}", csv.display()))?;
        summary.ran += 1;
    }
    write_reports(&rows, out)?;
    Ok(summary)
}

/// Writes `results.md` and the two charts from `rows`.
pub fn write_reports(rows: &[Row], out: &Path) -> Result<()> {
    let md = out.join(RESULTS_MD);
    write_atomic(&md, report::markdown(rows).as_bytes())
        .with_context(|| format!("cannot write {}", md.display()))?;
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
