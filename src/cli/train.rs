//! `bccp train`: the full run — embed, replay, cleanse, train, evaluate, register.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::{ArtifactsArgs, CacheArgs, DeviceArgs, MlflowArgs, RegistryArgs};
use bccp::backbone::layers::BnMode;
use bccp::cleanse::Method;
use bccp::config::RunConfig;
use bccp::pipeline::{self, RunEnv};
use bccp::registry::{metric, RunMetrics};
use bccp::train::finetune::Finetune;

/// `-b Y|N`, the reference's Bayesian cut-off switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum YesNo {
    #[value(name = "Y", alias = "y")]
    Yes,
    #[value(name = "N", alias = "n")]
    No,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    run: RunConfig,
    /// Bayesian cut-off: Y (the same as --method bccp) or N.
    #[arg(short = 'b', long, value_enum)]
    bayesian_cut_off: Option<YesNo>,
    /// Never touch the network for hub weights (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Continue an interrupted run of the same --model-name, settings and data from its last
    /// per-epoch checkpoint (REGISTRY/<model-name>/.checkpoint); without a checkpoint, train
    /// from scratch. Without --resume an existing checkpoint is discarded.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    mlflow: MlflowArgs,
    #[command(flatten)]
    artifacts: ArtifactsArgs,
}

/// The method from `-b` (the reference's flag) and `--method`, refusing contradictions.
fn with_cut_off(mut cfg: RunConfig, cut_off: Option<YesNo>) -> Result<RunConfig> {
    match (cut_off, cfg.method) {
        (Some(YesNo::Yes), Method::None | Method::Bccp) => cfg.method = Method::Bccp,
        (Some(YesNo::Yes), m) => bail!(
            "-b Y is the bccp method's cut-off; it cannot be combined with --method {}",
            m.name()
        ),
        (Some(YesNo::No), Method::Bccp) => {
            bail!("--method bccp is the Bayesian cut-off; it cannot be combined with -b N")
        }
        _ => {}
    }
    Ok(cfg)
}

fn print_config(cfg: &RunConfig, device: &candle_core::Device) {
    println!("==================== configuration ====================");
    println!("dataset            {}", cfg.dataset.display());
    println!("target day         {}", cfg.target_day.as_str());
    println!(
        "label              {} (user accuracy {})",
        cfg.label.name(),
        cfg.user_accuracy
    );
    println!("method             {}", cfg.method.name());
    println!(
        "bayesian cut-off   {} (score {}, percentile {} {}, action {}{}, {} passes, {} fold(s), {} round(s){})",
        if cfg.method == Method::Bccp { "Y" } else { "N" },
        cfg.cutoff_score.name(),
        cfg.cutoff_percentile,
        cfg.cutoff_scope.name(),
        cfg.cutoff_action.name(),
        if cfg.cutoff_action != bccp::cutoff::Action::Drop && cfg.relabel_confidence > 0.0 {
            format!(" if confidence ≥ {}", cfg.relabel_confidence)
        } else {
            String::new()
        },
        cfg.mc_passes,
        cfg.cutoff_folds,
        cfg.cutoff_rounds,
        if cfg.cutoff_trust_replay {
            ", replay trusted"
        } else {
            ""
        }
    );
    if cfg.method == Method::Cleanlab {
        println!(
            "confident learning filter_by {}, {}-fold probabilities",
            cfg.filter_by.name(),
            cfg.folds
        );
    }
    if cfg.verify_budget > 0.0 {
        println!(
            "simulated review   {} of the candidates verified ({}), answered with the true labels",
            cfg.verify_budget,
            cfg.verify_pick.name()
        );
    }
    println!(
        "sampling           {} ({}), ratio {}",
        cfg.sampling.name(),
        cfg.sampling_mode.name(),
        cfg.replay_ratio()
    );
    println!(
        "monday / tuesday   {:?} / {:?} records",
        cfg.monday_num, cfg.tuesday_num
    );
    println!(
        "backbone           {} (image size {:?}) on {:?}",
        cfg.backbone,
        cfg.image_size,
        device.location()
    );
    println!(
        "training           {} epochs, batch {}, lr {}, loss {}, seed {}",
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.final_loss().name(),
        cfg.seed
    );
    println!(
        "lr schedule        {} (lr decay {}), warm-up {} epochs",
        cfg.lr_schedule.name(),
        cfg.lr_decay,
        cfg.warmup_epochs
    );
    match cfg.finetune {
        Finetune::Head => println!("fine-tuning        head (linear probe on cached features)"),
        Finetune::Full => println!(
            "fine-tuning        full (backbone lr {}, batch-norm {}, first {} blocks frozen, {} batches per step, {} products)",
            cfg.backbone_lr,
            match cfg.bn {
                BnMode::Frozen => "statistics frozen",
                BnMode::Train => "in training mode",
            },
            cfg.freeze_blocks,
            cfg.accumulate,
            cfg.precision.name()
        ),
    }
    println!("=======================================================");
}

/// The closing table of a run's figures.
pub fn print_metrics(m: &RunMetrics) {
    println!("\n| metric | value |\n|---|---|");
    for name in metric::ALL {
        match m.scalar(name) {
            Some(v) if RunMetrics::is_count(name) => println!("| {name} | {} |", v as u64),
            Some(v) => println!("| {name} | {v:.4} |"),
            None => {}
        }
    }
    println!("| seconds | {:.1} |", m.seconds.total);
}

pub fn run(args: TrainArgs, quiet: bool) -> Result<()> {
    let cfg = with_cut_off(args.run, args.bayesian_cut_off)?;
    let device = args.device.device()?;
    cfg.validate_on(&device)
        .map_err(|e| anyhow::anyhow!(e.for_flags()))?;
    let mlflow = args.mlflow.target()?;
    let s3 = args.artifacts.target()?;
    let env = RunEnv {
        device,
        cache_dir: args.cache.dir(),
        offline: args.offline,
        registry: args.registry.registry(),
        resume: args.resume,
    };
    print_config(&cfg, &env.device);
    let progress = super::progress(quiet);
    let embedded = pipeline::embed_stage(&cfg, &env, &progress)?;
    super::print_cache_warning(&embedded.embed_stats);
    let outcome = pipeline::run_embedded(&cfg, &env, &embedded, &progress)?;
    print_metrics(&outcome.metrics);
    println!(
        "\nregistered {}:{} in {}",
        outcome.run.name,
        outcome.run.version,
        outcome.run.path.display()
    );
    if let Some(target) = &s3 {
        super::mirror_to_s3(target, &outcome.run)?;
    }
    if let Some(target) = mlflow {
        let mirrored = bccp::tracking::mirror_run(
            &target,
            &env.registry,
            &outcome.run,
            "bccp train",
            &[],
            &[],
        )
        .map_err(|e| local_kept(e, &outcome.run))?;
        super::print_mirrored(&target, &mirrored);
    }
    Ok(())
}

/// A mirroring error that says the local run is kept.
pub fn local_kept(e: bccp::tracking::TrackingError, run: &bccp::registry::RunDir) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}\n(the local run {}:{} in {} is complete and kept; mirror it again later)",
        run.name,
        run.version,
        run.path.display()
    )
}
