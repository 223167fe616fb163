//! One typed definition of a run's settings: [`RunConfig`]. The command line's flags, an
//! experiment file's `[run]` table, the HTTP API and the re-training loop all fill it;
//! `params.json` in the registry is its serialisation. Defaults live in [`RunConfig::default`]
//! and checks in [`RunConfig::validate`], nowhere else.

pub mod choice;

use std::path::PathBuf;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::backbone::layers::BnMode;
use crate::backbone::limits::{self, MAX_BATCH_SIZE, MAX_IMAGE_SIZE};
use crate::backbone::{zoo, BackboneError};
use crate::baselines::FilterBy;
use crate::cleanse::{CleanseConfig, Method};
use crate::cleanse_features::CleanseFeatures;
use crate::cutoff::{Action, Percentile, Scope, Score};
use crate::data::Day;
use crate::ops::bf16_gemm::Precision;
use crate::sampling::{PairMode, Sampling};
use crate::train::finetune::Finetune;
use crate::train::{Loss, LrSchedule, TrainConfig};
use crate::verify::VerifyPick;

/// Where training labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// The true labels.
    #[default]
    GroundTruth,
    /// Users right with probability `user_accuracy`, otherwise another class.
    UserFeedback,
}

impl LabelSource {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            LabelSource::GroundTruth => "ground_truth",
            LabelSource::UserFeedback => "user_feedback",
        }
    }
}

/// A setting that does not hold together with the others. The message marks setting names
/// with backticks; [`Display`](std::fmt::Display) writes them as in a file (`tuesday_num`) and
/// [`ConfigError::for_flags`] as on the command line (`--tuesday-num`), so it reads right from
/// either.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", render(.0, |name| name.to_owned()))]
pub struct ConfigError(pub String);

impl ConfigError {
    /// The message with setting names written as command-line flags.
    pub fn for_flags(&self) -> String {
        render(&self.0, |name| format!("--{}", name.replace('_', "-")))
    }
}

/// Replaces every `` `name` `` in `message` by `write(name)`.
fn render(message: &str, write: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str(&write(part));
        } else {
            out.push_str(part);
        }
    }
    out
}

/// The most MC-dropout passes (`mc_passes`).
pub const MAX_MC_PASSES: usize = 1000;
/// The most cross-validation folds (`folds`, `cutoff_folds`); each is also bounded by the
/// number of samples when the run starts.
pub const MAX_FOLDS: usize = 100;
/// The most cut-off rounds (`cutoff_rounds`).
pub const MAX_CUTOFF_ROUNDS: usize = 10;
/// The most batches accumulated into one step (`accumulate`).
pub const MAX_ACCUMULATE: usize = 65_536;
/// The most training epochs (`epochs`).
pub const MAX_EPOCHS: usize = 100_000;

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// Every setting of a run (the reference's flags plus ours), flat, named as the command-line
/// flags (`--cutoff-score` ⇔ `cutoff_score`). Deriving clap's `Args` here makes `bccp train`'s
/// flags this very struct; every default comes from [`RunConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// A folder made by `bccp prepare`.
    #[arg(short = 'd', long)]
    pub dataset: PathBuf,
    /// monday (train and test on Monday) or tuesday (train on Tuesday + replay, test on both).
    #[arg(short = 't', long, default_value_t = d().target_day, value_enum)]
    pub target_day: Day,
    /// Where training labels come from (user_feedback: Tuesday's labels right with probability
    /// --user-accuracy).
    #[arg(short = 'l', long, default_value_t = d().label, value_enum)]
    pub label: LabelSource,
    /// Probability that a user's label is right.
    #[arg(long, default_value_t = d().user_accuracy)]
    pub user_accuracy: f64,
    /// Use the first N records of Monday's manifest.
    #[arg(long)]
    pub monday_num: Option<usize>,
    /// Use the first N records of Tuesday's manifest (required for --target-day tuesday).
    #[arg(long)]
    pub tuesday_num: Option<usize>,
    /// Noisy-label handling.
    #[arg(long, default_value_t = d().method, value_enum)]
    pub method: Method,
    /// What to replay from the reuse buffer (Monday's training data).
    #[arg(short = 's', long, alias = "sampling-type", default_value_t = d().sampling, value_enum)]
    pub sampling: Sampling,
    /// How closest pairs are found: faithful (the reference's procedure) or buffer (ours).
    #[arg(long, default_value_t = d().sampling_mode, value_enum)]
    pub sampling_mode: PairMode,
    /// Share of the reuse buffer to replay, in [0, 1] (required when --sampling is not none).
    #[arg(short = 'r', long)]
    pub ratio: Option<f64>,
    /// Backbone from the zoo (`bccp models` lists them).
    #[arg(long, default_value_t = d().backbone)]
    pub backbone: String,
    /// Local backbone weights (.safetensors) instead of the zoo's source.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Input size override (e.g. 64 for 28×28 images; 32 or more).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Cut-off score (label_prob_mean is the default; logit_sum_var is the reference's).
    #[arg(long, default_value_t = d().cutoff_score, value_enum)]
    pub cutoff_score: Score,
    /// Percentile above which samples are cut (0–100); auto (as many as the MC-mean
    /// prediction disagrees with); joint (as many as the confident joint of the MC-mean
    /// probabilities estimates are wrong); mixture (as many as a two-component mixture of the
    /// per-sample loss puts in its high-loss component).
    #[arg(long, default_value_t = d().cutoff_percentile)]
    pub cutoff_percentile: Percentile,
    /// global (one ranking of all samples) or per_class (the percentile, or the estimated
    /// noise, of each given class cut within that class).
    #[arg(long, default_value_t = d().cutoff_scope, value_enum)]
    pub cutoff_scope: Scope,
    /// Rounds of the cut-off: each round after the first trains the scoring heads again on
    /// the samples the previous round kept, then scores and cuts every sample again.
    #[arg(long, default_value_t = d().cutoff_rounds)]
    pub cutoff_rounds: usize,
    /// With --cutoff-action relabel or pseudo_label: relabel a cut sample only when the
    /// prediction's probability (the MC mean's, or the teacher's trained on the kept samples)
    /// is at least this, drop it otherwise (0: relabel every cut sample).
    #[arg(long, default_value_t = d().relabel_confidence)]
    pub relabel_confidence: f64,
    /// Never cut replayed samples (the reuse buffer is yesterday's cleansed data) and leave
    /// them out of the estimated noise; they still train the scoring heads.
    #[arg(long, default_value_t = d().cutoff_trust_replay, action = clap::ArgAction::Set)]
    pub cutoff_trust_replay: bool,
    /// What to do with the cut samples.
    #[arg(long, default_value_t = d().cutoff_action, value_enum)]
    pub cutoff_action: Action,
    /// The features the cleansing stage scores: pretrained (the backbone's, as the final head
    /// sees them), tuned (a copy of the backbone fine-tuned on the reuse buffer, yesterday's
    /// trusted data; Tuesday runs) or auto (tuned and normalised for --method bccp on a run
    /// with a reuse buffer and a convolutional backbone, pretrained otherwise).
    #[arg(long, default_value_t = d().cleanse_features, value_enum)]
    pub cleanse_features: CleanseFeatures,
    /// Epochs of the reuse-buffer fine-tuning with tuned features.
    #[arg(long, default_value_t = d().cleanse_tune_epochs)]
    pub cleanse_tune_epochs: usize,
    /// Images of the reuse buffer the fine-tuning sees at most: a seeded random sample of
    /// them when the buffer holds more (0: the whole buffer).
    #[arg(long, default_value_t = d().cleanse_tune_max)]
    pub cleanse_tune_max: usize,
    /// Scale every feature row the cleansing stage scores to one length (L2 norm 10), so the
    /// scoring heads compare directions, as the k-NN score does (implied by auto features
    /// when they are tuned).
    #[arg(long, default_value_t = d().cleanse_normalise, action = clap::ArgAction::Set)]
    pub cleanse_normalise: bool,
    /// MC-dropout passes.
    #[arg(long, default_value_t = d().mc_passes)]
    pub mc_passes: usize,
    /// 1: score samples with the MC-dropout head trained on them (the reference's); K ≥ 2: out
    /// of sample, each fold scored by a head trained on the other K − 1.
    #[arg(long, default_value_t = d().cutoff_folds)]
    pub cutoff_folds: usize,
    /// Confident learning's filter (cleanlab's filter_by).
    #[arg(long, default_value_t = d().filter_by, value_enum)]
    pub filter_by: FilterBy,
    /// Folds of confident learning's cross-validated probabilities.
    #[arg(long, default_value_t = d().folds)]
    pub folds: usize,
    /// Simulated review, for experiments: the share of Tuesday's candidates (0–1) whose labels
    /// a person verifies before the cut-off, answered with the true labels and then trusted as
    /// the review page's answers are (0: none).
    #[arg(long, default_value_t = d().verify_budget)]
    pub verify_budget: f64,
    /// With --verify-budget: flagged (the most suspicious samples of a first cleansing pass)
    /// or random (samples drawn at random).
    #[arg(long, default_value_t = d().verify_pick, value_enum)]
    pub verify_pick: VerifyPick,
    /// head (a linear probe on frozen, cached features) or full (back-propagate through the
    /// backbone).
    #[arg(long, default_value_t = d().finetune, value_enum)]
    pub finetune: Finetune,
    /// Learning rate of the backbone with --finetune full.
    #[arg(long, default_value_t = d().backbone_lr)]
    pub backbone_lr: f64,
    /// With --finetune full: keep the decoded training images in memory across epochs when
    /// they fit in this many MiB (else decode them every epoch).
    #[arg(long, default_value_t = d().cache_images_mib)]
    pub cache_images_mib: usize,
    #[arg(long, default_value_t = d().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = d().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = d().lr)]
    pub lr: f64,
    /// Multiplies the learning rate after every epoch.
    #[arg(long, default_value_t = d().lr_decay)]
    pub lr_decay: f64,
    /// The learning rate over the epochs (head and backbone alike): decay (× lr_decay after
    /// every epoch) or cosine (half a cosine towards zero), after the warm-up.
    #[arg(long, default_value_t = d().lr_schedule, value_enum)]
    pub lr_schedule: LrSchedule,
    /// Epochs of linear learning-rate warm-up (epoch e of W at lr × e / W), before the
    /// schedule; fewer than the epochs.
    #[arg(long, default_value_t = d().warmup_epochs)]
    pub warmup_epochs: usize,
    /// With --finetune full: the first N blocks of the backbone are not trained (the stem
    /// counts as the first; 0: all trained).
    #[arg(long, default_value_t = d().freeze_blocks)]
    pub freeze_blocks: usize,
    /// With --finetune full: sum the gradients of K batches into one step (an effective batch
    /// of K × batch size; 1: a step per batch).
    #[arg(long, default_value_t = d().accumulate)]
    pub accumulate: usize,
    /// With --finetune full on a CNN: frozen (batch-norms folded with their pretrained
    /// statistics) or train (normalised by each batch, running statistics updated; trains on
    /// candle's autograd, not the channels-last engine).
    #[arg(long, default_value_t = d().bn, value_enum)]
    pub bn: BnMode,
    /// The backbone's products in the embedding stage and in --finetune full, f32 or bf16
    /// (bf16 operands, f32 sums, on the CPU with AVX512-BF16: the CNNs on the channels-last
    /// engine with --bn frozen, the transformers' linear layers). Recorded with the run, whose
    /// predictions then use it.
    #[arg(long, default_value_t = d().precision, value_enum)]
    pub precision: Precision,
    /// The training loss (methods may override it: anl_ce trains with ANL-CE).
    #[arg(long, default_value_t = d().loss, value_enum)]
    pub loss: Loss,
    /// Seed of every random choice (user labels, replay, dropout, initialisation).
    #[arg(long, default_value_t = d().seed)]
    pub seed: u64,
    /// Name of the run in the registry.
    #[arg(long, default_value_t = d().model_name)]
    pub model_name: String,
}

/// The defaults, for clap's `default_value_t`.
fn d() -> RunConfig {
    RunConfig::default()
}

impl Default for RunConfig {
    fn default() -> Self {
        let train = TrainConfig::default();
        Self {
            dataset: PathBuf::new(),
            target_day: Day::Monday,
            label: LabelSource::GroundTruth,
            user_accuracy: 0.7,
            monday_num: None,
            tuesday_num: None,
            method: Method::None,
            sampling: Sampling::None,
            sampling_mode: PairMode::Buffer,
            ratio: None,
            backbone: "mobilenet_v2".into(),
            weights: None,
            image_size: None,
            // The cleansing that won the cleansing grids overall (README, "Cleansing
            // quality"): the combined score, out of sample, the confident joint's estimate of
            // each class's noise cut within that class, the replayed rows trusted, the cut
            // samples relabelled with the MC-mean prediction, scored on features tuned on the
            // reuse buffer (`cleanse_features` auto). The reference's cut-off is
            // `--cutoff-score logit_sum_var --cutoff-percentile 90 --cutoff-scope global
            // --cutoff-folds 1 --cutoff-trust-replay false --cutoff-action drop
            // --cleanse-features pretrained`.
            cutoff_score: Score::Combined,
            cutoff_percentile: Percentile::Joint,
            cutoff_action: Action::Relabel,
            cutoff_scope: Scope::PerClass,
            cutoff_rounds: 1,
            relabel_confidence: 0.0,
            cutoff_trust_replay: true,
            cleanse_features: CleanseFeatures::Auto,
            cleanse_tune_epochs: 5,
            cleanse_tune_max: 3000,
            cleanse_normalise: false,
            mc_passes: 10,
            cutoff_folds: 5,
            filter_by: FilterBy::PruneByNoiseRate,
            folds: 5,
            verify_budget: 0.0,
            verify_pick: VerifyPick::Flagged,
            finetune: Finetune::Head,
            backbone_lr: 1e-4,
            cache_images_mib: crate::train::finetune::DEFAULT_CACHE_IMAGES_MIB,
            epochs: train.epochs,
            batch_size: train.batch_size,
            lr: train.lr,
            lr_decay: train.lr_decay,
            lr_schedule: train.lr_schedule,
            warmup_epochs: train.warmup_epochs,
            freeze_blocks: train.freeze_blocks,
            accumulate: train.accumulate,
            bn: BnMode::Frozen,
            precision: train.precision,
            loss: train.loss,
            seed: train.seed,
            model_name: "bccp".into(),
        }
    }
}

impl RunConfig {
    /// The replay share (0 without replay).
    pub fn replay_ratio(&self) -> f64 {
        self.ratio.unwrap_or(0.0)
    }

    /// The cleansing method's settings.
    pub fn cleanse(&self) -> CleanseConfig {
        CleanseConfig {
            method: self.method,
            cutoff_score: self.cutoff_score,
            cutoff_percentile: self.cutoff_percentile,
            cutoff_action: self.cutoff_action,
            mc_passes: self.mc_passes,
            cutoff_folds: self.cutoff_folds,
            filter_by: self.filter_by,
            folds: self.folds,
            cutoff_scope: self.cutoff_scope,
            cutoff_rounds: self.cutoff_rounds,
            relabel_confidence: self.relabel_confidence,
            cutoff_trust_replay: self.cutoff_trust_replay,
        }
    }

    /// Head-training settings (the loss as asked; the method may override it).
    pub fn train(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            lr_decay: self.lr_decay,
            lr_schedule: self.lr_schedule,
            warmup_epochs: self.warmup_epochs,
            freeze_blocks: self.freeze_blocks,
            accumulate: self.accumulate,
            precision: self.precision,
            loss: self.loss,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }

    /// The loss the final training uses (ANL-CE for that method, else `loss`).
    pub fn final_loss(&self) -> Loss {
        self.method.loss(self.loss)
    }

    /// The checks of [`Self::validate`] on the cleansing and head-training settings alone
    /// (MC passes, folds, rounds, epochs, batch size, learning rate): what a caller that brings
    /// its own features (the Python package's `cutoff_scores`) needs.
    pub fn validate_cleansing(&self) -> Result<(), ConfigError> {
        at_least("mc_passes", self.mc_passes, 2, "variances need two passes")?;
        at_most("mc_passes", self.mc_passes, MAX_MC_PASSES)?;
        at_least("cutoff_folds", self.cutoff_folds, 1, "1 scores in sample")?;
        at_most("cutoff_folds", self.cutoff_folds, MAX_FOLDS)?;
        at_least("cutoff_rounds", self.cutoff_rounds, 1, "")?;
        at_most("cutoff_rounds", self.cutoff_rounds, MAX_CUTOFF_ROUNDS)?;
        unit_interval("relabel_confidence", self.relabel_confidence)?;
        at_least(
            "cleanse_tune_epochs",
            self.cleanse_tune_epochs,
            1,
            "the buffer fine-tuning needs an epoch",
        )?;
        at_most("cleanse_tune_epochs", self.cleanse_tune_epochs, MAX_EPOCHS)?;
        if self.method == Method::Cleanlab {
            at_least("folds", self.folds, 2, "confident learning cross-validates")?;
        }
        at_most("folds", self.folds, MAX_FOLDS)?;
        at_least("epochs", self.epochs, 1, "")?;
        at_most("epochs", self.epochs, MAX_EPOCHS)?;
        at_least("batch_size", self.batch_size, 1, "")?;
        at_most("batch_size", self.batch_size, MAX_BATCH_SIZE)?;
        positive("lr", self.lr)?;
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return Err(invalid(format!(
                "`lr_decay` {} must lie in (0, 1]",
                self.lr_decay
            )));
        }
        if self.warmup_epochs >= self.epochs {
            return Err(invalid(format!(
                "`warmup_epochs` {} must be below `epochs` {} (the warm-up leaves at least one epoch at the full rate)",
                self.warmup_epochs, self.epochs
            )));
        }
        Ok(())
    }

    /// The simulated review's checks: a budget in [0, 1], on users' Tuesday labels, and a
    /// flagged pick only after a method that flags.
    fn validate_review(&self, tuesday: bool) -> Result<(), ConfigError> {
        unit_interval("verify_budget", self.verify_budget)?;
        if self.verify_budget == 0.0 {
            return Ok(());
        }
        if !tuesday || self.label != LabelSource::UserFeedback {
            return Err(invalid(
                "`verify_budget` simulates a review of users' labels; it needs `target_day` tuesday and `label` user_feedback",
            ));
        }
        if self.verify_pick == VerifyPick::Flagged
            && !matches!(self.method, Method::Bccp | Method::Cleanlab)
        {
            return Err(invalid(format!(
                "`verify_pick` flagged verifies what the cleansing flags, and `method` {} flags nothing; use `method` bccp or cleanlab, or `verify_pick` random",
                self.method.name()
            )));
        }
        Ok(())
    }

    /// Checks that the settings hold together (the reference's rules and ours), before any
    /// work. Looks the backbone up in the zoo and the dataset up on disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tuesday = self.target_day == Day::Tuesday;
        if tuesday && self.tuesday_num.is_none() {
            return Err(invalid(
                "`tuesday_num` is required when `target_day` is tuesday (how many Tuesday records to use)",
            ));
        }
        if self.sampling != Sampling::None && !tuesday {
            return Err(invalid(format!(
                "`sampling` {} replays Monday data into Tuesday training; it needs `target_day` tuesday",
                self.sampling.name()
            )));
        }
        if self.label == LabelSource::UserFeedback && !tuesday {
            return Err(invalid(
                "`label` user_feedback applies to Tuesday's labels; it needs `target_day` tuesday",
            ));
        }
        unit_interval("user_accuracy", self.user_accuracy)?;
        match self.ratio {
            None if self.sampling != Sampling::None => {
                return Err(invalid(
                    "`ratio` is required when `sampling` is not none (the share of the reuse buffer to replay)",
                ))
            }
            Some(r) => unit_interval("ratio", r)?,
            None => {}
        }
        self.validate_cleansing()?;
        if self.cleanse_features == CleanseFeatures::Tuned && !tuesday {
            return Err(invalid(
                "`cleanse_features` tuned fine-tunes on the reuse buffer (Monday) to score Tuesday's candidates; it needs `target_day` tuesday",
            ));
        }
        self.validate_review(tuesday)?;
        if self.monday_num == Some(0) || self.tuesday_num == Some(0) {
            return Err(invalid("`monday_num` and `tuesday_num` must be 1 or more"));
        }
        let spec = zoo::find(&self.backbone).map_err(|e| invalid(e.to_string()))?;
        let pre = spec.preprocess_at(self.image_size).map_err(|e| match e {
            BackboneError::ImageTooSmall(size) => {
                invalid(format!("`image_size` {size} is too small; 32 or more"))
            }
            BackboneError::ImageSizeTooLarge(size) => invalid(format!(
                "`image_size` {size} is too large; {MAX_IMAGE_SIZE} or less"
            )),
            e => invalid(e.to_string()),
        })?;
        // Embedding lowers its batch to fit the memory budget (`limits::fit_batch`), down to
        // one image, which must fit; full fine-tuning back-propagates batches of `batch_size`
        // images through the backbone.
        let batch_memory = |e: BackboneError| invalid(e.to_string());
        limits::check_batch(&pre, 1, false).map_err(batch_memory)?;
        if self.finetune == Finetune::Full {
            limits::check_batch(&pre, self.batch_size, true).map_err(batch_memory)?;
        }
        if self.finetune == Finetune::Full {
            positive("backbone_lr", self.backbone_lr)?;
        } else if self.freeze_blocks > 0 {
            return Err(invalid(format!(
                "`freeze_blocks` {} freezes blocks of the backbone, which only `finetune` full trains",
                self.freeze_blocks
            )));
        } else if self.bn == BnMode::Train {
            return Err(invalid(
                "`bn` train trains the backbone's batch-norms, which only `finetune` full trains",
            ));
        } else if self.accumulate != 1 {
            return Err(invalid(format!(
                "`accumulate` {} accumulates the gradients of `finetune` full; head training takes a step per batch",
                self.accumulate
            )));
        }
        if self.bn == BnMode::Train && !spec.has_batch_norm() {
            return Err(invalid(format!(
                "`bn` train: {} has no batch-norm (layer-norms only); it takes `bn` frozen",
                spec.name
            )));
        }
        at_least("accumulate", self.accumulate, 1, "1 takes a step per batch")?;
        at_most("accumulate", self.accumulate, MAX_ACCUMULATE)?;
        if self.dataset.as_os_str().is_empty() {
            return Err(invalid(
                "`dataset` is not set: give a folder made by bccp prepare",
            ));
        }
        if !self.dataset.join("monday.jsonl").is_file() {
            return Err(invalid(format!(
                "`dataset` {} is not a prepared dataset (no monday.jsonl); make one with bccp prepare",
                self.dataset.display()
            )));
        }
        crate::registry::check_name(&self.model_name).map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }

    /// [`Self::validate`] and the settings that depend on the `device` the run uses:
    /// `precision` bf16 runs on a CUDA GPU (mixed precision on candle's ops, `bn` train
    /// included) or on a CPU with AVX512-BF16 (the channels-last engine, which keeps the
    /// batch-norms folded, and the transformers' linear layers).
    pub fn validate_on(&self, device: &candle_core::Device) -> Result<(), ConfigError> {
        crate::ops::bf16_gemm::check_on(self.precision, device).map_err(|e| {
            invalid(format!(
                "`precision` {}: {e}; use `precision` f32",
                self.precision.name()
            ))
        })?;
        let has_batch_norm = zoo::find(&self.backbone).is_ok_and(|spec| spec.has_batch_norm());
        if self.precision == Precision::Bf16
            && device.is_cpu()
            && self.bn == BnMode::Train
            && has_batch_norm
        {
            return Err(invalid(
                "`precision` bf16 runs on the channels-last engine on the CPU, which keeps the batch-norms folded: use `bn` frozen, `precision` f32 with `bn` train, or a CUDA GPU",
            ));
        }
        self.validate()
    }
}

fn unit_interval(name: &str, v: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(format!("`{name}` {v} must lie in [0, 1]")))
    }
}

fn at_least(name: &str, v: usize, min: usize, why: &str) -> Result<(), ConfigError> {
    if v >= min {
        return Ok(());
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    Err(invalid(format!("`{name}` {v} must be {min} or more{why}")))
}

fn at_most(name: &str, v: usize, max: usize) -> Result<(), ConfigError> {
    if v <= max {
        Ok(())
    } else {
        Err(invalid(format!("`{name}` {v} is too large; {max} or less")))
    }
}

fn positive(name: &str, v: f64) -> Result<(), ConfigError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(invalid(format!("`{name}` {v} must be a positive number")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `bccp train`'s settings as the command line parses them.
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        run: RunConfig,
    }

    fn parse(args: &[&str]) -> RunConfig {
        let argv = std::iter::once("bccp").chain(args.iter().copied());
        Flags::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn flag_defaults_are_the_struct_defaults() {
        let cfg = parse(&["-d", "days"]);
        assert_eq!(
            cfg,
            RunConfig {
                dataset: "days".into(),
                ..RunConfig::default()
            }
        );
        assert_eq!(cfg.train(), TrainConfig::default());
    }

    #[test]
    fn flags_to_params_json_and_back() {
        let cfg = parse(&[
            "-d",
            "days",
            "-t",
            "tuesday",
            "--tuesday-num",
            "300",
            "-l",
            "user_feedback",
            "--user-accuracy",
            "0.6",
            "--method",
            "bccp",
            "--sampling-type",
            "l2_norm",
            "--sampling-mode",
            "faithful",
            "-r",
            "0.25",
            "--cutoff-score",
            "knn_disagreement",
            "--cutoff-percentile",
            "auto",
            "--cutoff-action",
            "relabel",
            "--cutoff-folds",
            "5",
            "--cutoff-scope",
            "per_class",
            "--cutoff-rounds",
            "2",
            "--relabel-confidence",
            "0.9",
            "--cutoff-trust-replay",
            "true",
            "--filter-by",
            "both",
            "--loss",
            "anl_ce",
            "--image-size",
            "64",
            "--seed",
            "7",
            "--lr-schedule",
            "cosine",
            "--warmup-epochs",
            "2",
        ]);
        assert_eq!(cfg.sampling, Sampling::L2Norm);
        assert_eq!(
            (cfg.lr_schedule, cfg.warmup_epochs),
            (LrSchedule::Cosine, 2)
        );
        assert_eq!(cfg.train().schedule().kind, LrSchedule::Cosine);
        assert_eq!(cfg.sampling_mode, PairMode::Faithful);
        assert_eq!(cfg.cutoff_percentile, Percentile::Auto);
        assert_eq!(cfg.cutoff_scope, Scope::PerClass);
        assert_eq!((cfg.cutoff_rounds, cfg.relabel_confidence), (2, 0.9));
        assert!(cfg.cutoff_trust_replay);
        assert_eq!(cfg.ratio, Some(0.25));
        assert_eq!(cfg.loss, Loss::AnlCe);
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        assert!(json.contains("\"sampling\": \"l2_norm\""), "{json}");
        assert!(json.contains("\"cutoff_percentile\": \"auto\""), "{json}");
        let back: RunConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        // A fixed percentile is a number in JSON and TOML.
        let fixed = parse(&["-d", "x", "--cutoff-percentile", "97.5"]);
        let json = serde_json::to_value(&fixed).unwrap();
        assert_eq!(json["cutoff_percentile"], serde_json::json!(97.5));
        assert_eq!(serde_json::from_value::<RunConfig>(json).unwrap(), fixed);
    }

    #[test]
    fn toml_fills_the_same_struct() {
        let text = r#"
            dataset = "days"
            target_day = "tuesday"
            tuesday_num = 300
            label = "user_feedback"
            method = "cleanlab"
            sampling = "cosine_similarity"
            ratio = 0.5
            cutoff_percentile = 75
            epochs = 3
        "#;
        let cfg: RunConfig = toml::from_str(text).unwrap();
        let flags = parse(&[
            "-d",
            "days",
            "-t",
            "tuesday",
            "--tuesday-num",
            "300",
            "-l",
            "user_feedback",
            "--method",
            "cleanlab",
            "-s",
            "cosine_similarity",
            "-r",
            "0.5",
            "--cutoff-percentile",
            "75",
            "--epochs",
            "3",
        ]);
        assert_eq!(cfg, flags);
        let err = toml::from_str::<RunConfig>("method = \"magic\"").unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        let err = toml::from_str::<RunConfig>("colour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = toml::from_str::<RunConfig>("cutoff_percentile = 120").unwrap_err();
        assert!(err.to_string().contains("[0, 100]"), "{err}");
    }

    #[test]
    fn validation_names_the_setting_as_flag_or_key() {
        let cfg = RunConfig {
            dataset: "days".into(),
            target_day: Day::Tuesday,
            ..RunConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("tuesday_num is required when target_day is tuesday"),
            "{err}"
        );
        assert!(
            err.for_flags()
                .starts_with("--tuesday-num is required when --target-day is tuesday"),
            "{}",
            err.for_flags()
        );
        let cfg = RunConfig {
            user_accuracy: 1.5,
            ..cfg
        };
        let cfg = RunConfig {
            tuesday_num: Some(3),
            ..cfg
        };
        assert_eq!(
            cfg.validate().unwrap_err().for_flags(),
            "--user-accuracy 1.5 must lie in [0, 1]"
        );
        let cfg = RunConfig {
            user_accuracy: 0.7,
            sampling: Sampling::Random,
            ..cfg
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("ratio is required"));
        let cfg = RunConfig {
            sampling: Sampling::None,
            mc_passes: 1,
            ..cfg
        };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "mc_passes 1 must be 2 or more (variances need two passes)"
        );
    }

    #[test]
    fn a_simulated_review_needs_users_labels_and_a_method_that_flags() {
        let tuesday = RunConfig {
            dataset: "no-such-days".into(),
            target_day: Day::Tuesday,
            tuesday_num: Some(3),
            label: LabelSource::UserFeedback,
            method: Method::Bccp,
            verify_budget: 0.05,
            ..RunConfig::default()
        };
        // Valid as far as the dataset.
        let err = tuesday.validate().unwrap_err().to_string();
        assert!(err.contains("not a prepared dataset"), "{err}");
        let cases = [
            (
                RunConfig {
                    verify_budget: 1.5,
                    ..tuesday.clone()
                },
                "--verify-budget 1.5 must lie in [0, 1]",
            ),
            (
                RunConfig {
                    label: LabelSource::GroundTruth,
                    ..tuesday.clone()
                },
                "--verify-budget simulates a review of users' labels; it needs --target-day tuesday and --label user_feedback",
            ),
            (
                RunConfig {
                    method: Method::None,
                    ..tuesday.clone()
                },
                "--verify-pick flagged verifies what the cleansing flags, and --method none flags nothing; use --method bccp or cleanlab, or --verify-pick random",
            ),
        ];
        for (cfg, message) in cases {
            assert_eq!(cfg.validate().unwrap_err().for_flags(), message);
        }
        let random = RunConfig {
            method: Method::None,
            verify_pick: VerifyPick::Random,
            ..tuesday
        };
        let err = random.validate().unwrap_err().to_string();
        assert!(err.contains("not a prepared dataset"), "{err}");
    }

    #[test]
    fn every_enum_has_one_spelling() {
        choice::assert_names_agree(|v: &LabelSource| v.name());
        choice::assert_names_agree(|v: &Sampling| v.name());
        choice::assert_names_agree(|v: &PairMode| v.name());
        choice::assert_names_agree(|v: &Score| v.name());
        choice::assert_names_agree(|v: &Action| v.name());
        choice::assert_names_agree(|v: &Scope| v.name());
        choice::assert_names_agree(|v: &Finetune| v.name());
        choice::assert_names_agree(|v: &Day| v.as_str());
        choice::assert_names_agree(|v: &VerifyPick| v.name());
    }

    #[test]
    fn size_settings_are_bounded() {
        let base = RunConfig {
            dataset: "no-such-days".into(),
            ..RunConfig::default()
        };
        // Within every bound, validation gets as far as the dataset.
        let at_limits = RunConfig {
            mc_passes: MAX_MC_PASSES,
            cutoff_folds: MAX_FOLDS,
            folds: MAX_FOLDS,
            epochs: MAX_EPOCHS,
            batch_size: MAX_BATCH_SIZE,
            image_size: Some(1024),
            ..base.clone()
        };
        let err = at_limits.validate().unwrap_err().to_string();
        assert!(err.contains("not a prepared dataset"), "{err}");
        let cases = [
            (
                RunConfig {
                    image_size: Some(100_000),
                    ..base.clone()
                },
                "--image-size 100000 is too large; 4096 or less",
            ),
            (
                RunConfig {
                    batch_size: 1_000_000,
                    ..base.clone()
                },
                "--batch-size 1000000 is too large; 65536 or less",
            ),
            (
                RunConfig {
                    mc_passes: 1001,
                    ..base.clone()
                },
                "--mc-passes 1001 is too large; 1000 or less",
            ),
            (
                RunConfig {
                    folds: 101,
                    ..base.clone()
                },
                "--folds 101 is too large; 100 or less",
            ),
            (
                RunConfig {
                    cutoff_folds: 101,
                    ..base.clone()
                },
                "--cutoff-folds 101 is too large; 100 or less",
            ),
            (
                RunConfig {
                    epochs: 100_001,
                    ..base.clone()
                },
                "--epochs 100001 is too large; 100000 or less",
            ),
            (
                RunConfig {
                    epochs: 3,
                    warmup_epochs: 3,
                    ..base.clone()
                },
                "--warmup-epochs 3 must be below --epochs 3 (the warm-up leaves at least one epoch at the full rate)",
            ),
            (
                RunConfig {
                    freeze_blocks: 2,
                    ..base.clone()
                },
                "--freeze-blocks 2 freezes blocks of the backbone, which only --finetune full trains",
            ),
            (
                RunConfig {
                    bn: BnMode::Train,
                    ..base.clone()
                },
                "--bn train trains the backbone's batch-norms, which only --finetune full trains",
            ),
            (
                RunConfig {
                    finetune: Finetune::Full,
                    bn: BnMode::Train,
                    backbone: "vit_base_patch16_224".into(),
                    ..base.clone()
                },
                "--bn train: vit_base_patch16_224 has no batch-norm (layer-norms only); it takes --bn frozen",
            ),
            (
                RunConfig {
                    accumulate: 2,
                    ..base.clone()
                },
                "--accumulate 2 accumulates the gradients of --finetune full; head training takes a step per batch",
            ),
            (
                RunConfig {
                    finetune: Finetune::Full,
                    accumulate: 0,
                    ..base.clone()
                },
                "--accumulate 0 must be 1 or more (1 takes a step per batch)",
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(cfg.validate().unwrap_err().for_flags(), want);
        }
        let spec = zoo::find("mobilenet_v2").unwrap();
        assert!(spec.preprocess_at(Some(MAX_IMAGE_SIZE)).is_ok());
        let err = spec.preprocess_at(Some(MAX_IMAGE_SIZE + 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image size 4097 is too large; 4096 or less"
        );
        // Full fine-tuning of batches of 65536 images at 4096×4096: over any memory budget.
        let err = RunConfig {
            finetune: Finetune::Full,
            batch_size: MAX_BATCH_SIZE,
            image_size: Some(MAX_IMAGE_SIZE),
            ..base
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("65536 images at 4096×4096") && err.contains("budget"),
            "{err}"
        );
    }
}
