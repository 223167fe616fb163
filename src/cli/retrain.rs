//! `bccp retrain`: one cycle of the self-cleansing loop over the data store — candidates since
//! the champion's data, replay from its training set, cleansing, challengers, the gate, and the
//! `champion` alias moved only when a challenger wins.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{CacheArgs, DbArgs, DeviceArgs, MlflowArgs, RegistryArgs};
use bccp::cleanse::Method;
use bccp::cleanse_features::CleanseFeatures;
use bccp::config::RunConfig;
use bccp::cutoff::{Action, Percentile, Scope, Score};
use bccp::pipeline::RunEnv;
use bccp::retrain::gate::GateRule;
use bccp::retrain::{CycleReport, CycleSummary, RetrainOptions};
use bccp::sampling::Sampling;

/// The loop's model and training settings (`bccp retrain` and `bccp up`).
#[derive(Args, Debug, Clone)]
pub struct LoopArgs {
    /// Registry name of the model the loop trains and promotes.
    #[arg(long, default_value = "bccp-loop")]
    pub model: String,
    /// Run a cycle only when at least this many new training samples arrived since the last.
    #[arg(long, default_value_t = 1)]
    pub min_new: usize,
    /// How much better (gate accuracy, 0–1) a challenger must be than the champion.
    #[arg(long, default_value_t = 0.005)]
    pub margin: f64,
    /// How much worse than the champion a challenger may be on any one day (source).
    #[arg(long, default_value_t = 0.03)]
    pub max_day_drop: f64,
    /// Challenger methods, trained side by side each cycle (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bccp")]
    pub method: Vec<Method>,
    /// What to replay from the champion's training set.
    #[arg(long, value_enum, default_value = "l2_norm")]
    pub sampling: Sampling,
    /// Share of the champion's training set to replay.
    #[arg(long, default_value_t = 0.5)]
    pub ratio: f64,
    /// Cut-off percentile of the bccp method (0–100, auto, joint: the confident joint's
    /// estimate of the noise, or mixture: a two-component mixture of the per-sample loss).
    #[arg(long, default_value_t = RunConfig::default().cutoff_percentile)]
    pub cutoff_percentile: Percentile,
    /// Folds of the out-of-sample cut-off scores (1: in sample).
    #[arg(long, default_value_t = RunConfig::default().cutoff_folds)]
    pub cutoff_folds: usize,
    /// Cut-off score of the bccp method (`bccp train --cutoff-score`).
    #[arg(long, value_enum, default_value_t = RunConfig::default().cutoff_score)]
    pub cutoff_score: Score,
    /// global or per_class cuts.
    #[arg(long, value_enum, default_value_t = RunConfig::default().cutoff_scope)]
    pub cutoff_scope: Scope,
    /// Rounds of the cut-off (each re-trains the scoring heads on the kept samples).
    #[arg(long, default_value_t = RunConfig::default().cutoff_rounds)]
    pub cutoff_rounds: usize,
    /// Never cut the replayed samples (the champion's training data).
    #[arg(long, default_value_t = RunConfig::default().cutoff_trust_replay, action = clap::ArgAction::Set)]
    pub cutoff_trust_replay: bool,
    /// What the bccp method does with the samples it cuts (drop, relabel, pseudo_label).
    #[arg(long, value_enum, default_value_t = RunConfig::default().cutoff_action)]
    pub cutoff_action: Action,
    /// The features the cleansing scores: pretrained, tuned (a copy of the backbone
    /// fine-tuned on the champion's training set each cycle; the first cycle, which has
    /// none, scores the pretrained ones) or auto (tuned and normalised for the bccp
    /// challenger of a convolutional backbone when there is a champion, pretrained
    /// otherwise).
    #[arg(long, value_enum, default_value_t = RunConfig::default().cleanse_features)]
    pub cleanse_features: CleanseFeatures,
    /// Epochs of that fine-tuning.
    #[arg(long, default_value_t = RunConfig::default().cleanse_tune_epochs)]
    pub cleanse_tune_epochs: usize,
    /// Images of the champion's training set that fine-tuning sees at most (a seeded random
    /// sample of them; 0: all).
    #[arg(long, default_value_t = RunConfig::default().cleanse_tune_max)]
    pub cleanse_tune_max: usize,
    /// Scale the cleansing's feature rows to one length.
    #[arg(long, default_value_t = RunConfig::default().cleanse_normalise, action = clap::ArgAction::Set)]
    pub cleanse_normalise: bool,
    /// Backbone from the zoo (`bccp models` lists them).
    #[arg(long, default_value = "mobilenet_v2")]
    pub backbone: String,
    /// Local backbone weights (.safetensors) instead of the zoo's source.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Input size override (e.g. 64 for 28×28 images).
    #[arg(long)]
    pub image_size: Option<u32>,
    #[arg(long, default_value_t = RunConfig::default().epochs)]
    pub epochs: usize,
    /// The backbone's products when embedding the cycle's samples: f32, or bf16 (bf16 operands
    /// summed in f32 on CPUs with AVX512-BF16; a cache of their own). Recorded with each
    /// version, which `serve` then runs in it.
    #[arg(long, value_enum, default_value_t = RunConfig::default().precision)]
    pub precision: bccp::ops::bf16_gemm::Precision,
    /// Seed of replay, dropout and initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Never touch the network for hub weights (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

impl LoopArgs {
    /// The cycle's options and where it runs.
    pub fn options(&self, trigger: &str) -> Result<(RetrainOptions, RunEnv)> {
        let run = RunConfig {
            sampling: self.sampling,
            ratio: Some(self.ratio),
            cutoff_percentile: self.cutoff_percentile,
            cutoff_folds: self.cutoff_folds,
            cutoff_score: self.cutoff_score,
            cutoff_scope: self.cutoff_scope,
            cutoff_rounds: self.cutoff_rounds,
            cutoff_trust_replay: self.cutoff_trust_replay,
            cutoff_action: self.cutoff_action,
            cleanse_features: self.cleanse_features,
            cleanse_tune_epochs: self.cleanse_tune_epochs,
            cleanse_tune_max: self.cleanse_tune_max,
            cleanse_normalise: self.cleanse_normalise,
            backbone: self.backbone.clone(),
            weights: self.weights.clone(),
            image_size: self.image_size,
            epochs: self.epochs,
            precision: self.precision,
            seed: self.seed,
            model_name: self.model.clone(),
            ..RunConfig::default()
        };
        run.validate_cleansing()?;
        let opts = RetrainOptions {
            model: self.model.clone(),
            min_new: self.min_new,
            rule: GateRule {
                margin: self.margin,
                max_day_drop: self.max_day_drop,
            },
            run,
            methods: self.method.clone(),
            trigger: trigger.to_owned(),
        };
        let env = RunEnv {
            device: self.device.device()?,
            cache_dir: self.cache.dir(),
            offline: self.offline,
            registry: self.registry.registry(),
            resume: false,
        };
        Ok((opts, env))
    }
}

#[derive(Args, Debug)]
pub struct RetrainArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    settings: LoopArgs,
    #[command(flatten)]
    mlflow: MlflowArgs,
    #[command(flatten)]
    artifacts: super::ArtifactsArgs,
}

/// One line per challenger and the decision.
pub fn print_cycle(s: &CycleSummary) {
    println!(
        "cycle {}: {} candidates, gate {} samples, champion {}{} ({:.1} s)",
        s.retrain_id,
        s.candidates,
        s.gate_samples,
        s.champion_before.as_deref().unwrap_or("none"),
        s.champion_gate
            .as_ref()
            .map(|g| format!(" at {:.4}", g.accuracy))
            .unwrap_or_default(),
        s.seconds
    );
    println!(
        "  verified labels: {} trained on (never cut), {} in the gate; {} candidates flagged for review (GET /review)",
        s.verified_trained, s.verified_gate, s.flagged
    );
    for c in &s.challengers {
        let days: Vec<String> = c
            .gate
            .per_source
            .iter()
            .map(|(d, (a, _))| format!("{d} {a:.4}"))
            .collect();
        println!(
            "  {} {:<8} replayed {:>5}, dropped {:>5}, relabelled {:>5}, trained on {:>5}; gate {:.4} ({}): {} — {}",
            c.version,
            c.method.name(),
            c.replayed,
            c.dropped,
            c.relabelled,
            c.trained_on,
            c.gate.accuracy,
            days.join(", "),
            if c.promoted {
                "PROMOTED"
            } else {
                "not promoted"
            },
            c.reason
        );
    }
}

pub fn run(args: RetrainArgs, quiet: bool) -> Result<()> {
    let (opts, env) = args.settings.options("manual")?;
    let mlflow = args.mlflow.target()?;
    let s3 = args.artifacts.target()?;
    let mut db = args.db.open()?;
    let progress = super::progress(quiet);
    match bccp::retrain::run_cycle(db.as_mut(), &env, &opts, &progress)? {
        CycleReport::Skipped { new, min_new } => println!(
            "no cycle: {new} new training samples in {}, fewer than --min-new {min_new}",
            db.location()
        ),
        CycleReport::Done(summary) => {
            print_cycle(&summary);
            if let Some(target) = &s3 {
                for c in &summary.challengers {
                    super::mirror_to_s3(target, &env.registry.resolve(&c.version)?)?;
                }
            }
            if let Some(target) = mlflow {
                mirror_cycle(&target, &env.registry, &summary)?;
            }
        }
    }
    Ok(())
}

/// Mirrors every challenger of a cycle to MLflow (with its gate accuracies as metrics), then,
/// only when all of them are there, moves MLflow's `champion` alias to the promoted one.
pub fn mirror_cycle(
    target: &bccp::tracking::MlflowTarget,
    registry: &bccp::registry::Registry,
    summary: &CycleSummary,
) -> Result<()> {
    let mut promoted = None;
    for c in &summary.challengers {
        let run = registry.resolve(&c.version)?;
        let mut gate = vec![("gate_accuracy".to_owned(), c.gate.accuracy)];
        gate.extend(
            c.gate
                .per_source
                .iter()
                .map(|(day, (acc, _))| (format!("gate_accuracy.{day}"), *acc)),
        );
        let mirrored =
            bccp::tracking::mirror_run(target, registry, &run, "bccp retrain", &gate, &[])
                .map_err(|e| super::train::local_kept(e, &run))?;
        super::print_mirrored(target, &mirrored);
        if c.promoted {
            promoted = Some((run, mirrored));
        }
    }
    if let Some((run, m)) = promoted {
        target
            .client
            .set_alias(&m.model, bccp::retrain::CHAMPION, &m.model_version)
            .map_err(|e| super::train::local_kept(e, &run))?;
        println!(
            "MLflow alias {}@{} → version {} ({}:{})",
            m.model,
            bccp::retrain::CHAMPION,
            m.model_version,
            run.name,
            run.version
        );
    }
    Ok(())
}
