//! `bccp train`: the whole Monday → Tuesday run — split, embed (cached), user-feedback labels,
//! replay sampling, Bayesian cut-off, head training, evaluation, registration.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::backbone::layers::BnMode;
use crate::backbone::{limits, zoo, Backbone, EmbedStats, Embedder, EmbedderConfig};
use crate::cleanse::{cleanse, Method};
use crate::cleanse_features::for_cleansing;
use crate::config::{LabelSource, RunConfig};
use crate::data::{read_manifest_for, user_feedback_labels, Day, ImageList, Record};
use crate::progress::Progress;
use crate::registry::{Provenance, Registry, RunDir, RunMetrics, RunRecord, Split, StageSeconds};
use crate::rng::Rng;
use crate::sampling::{self, ReuseBuffer};
use crate::train::checkpoint::{
    Checkpoint, CheckpointError, Checkpointing, Fingerprint, TrainState,
};
use crate::train::eval::{detection, evaluate, roc_auc};
use crate::train::finetune::{embed_files, finetune, Finetune};
use crate::train::{train_head_recorded, Head, TestSet, TrainConfig};
use crate::verify::{self, VerifyPick};

/// Why a run failed; each layer's error as it reported it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{}", .0.for_flags())]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    #[error(transparent)]
    Cleanse(#[from] crate::cleanse::CleanseError),
    #[error(transparent)]
    Finetune(#[from] crate::train::finetune::FinetuneError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    #[error("--resume: another run of {name} is training and writing {dir}; wait for it to finish, or use another --model-name")]
    CheckpointBusy { name: String, dir: PathBuf },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("the cleansing method {method} removed all {candidates} candidate samples (with the bccp method, cutoff percentile {percentile} cuts every sample scored above that percentile); nothing is left to train on — raise --cutoff-percentile or use more data")]
    NothingLeft {
        candidates: usize,
        method: &'static str,
        percentile: String,
    },
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, PipelineError>;

impl From<CheckpointError> for PipelineError {
    fn from(e: CheckpointError) -> Self {
        Self::Checkpoint(Box::new(e))
    }
}

/// Where a run happens, as opposed to what it is ([`RunConfig`]): the device, the embedding
/// cache, hub access, the registry it is written to and whether its training continues from a
/// checkpoint.
#[derive(Debug, Clone)]
pub struct RunEnv {
    pub device: Device,
    /// `None` bypasses the embedding cache.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network for hub weights.
    pub offline: bool,
    pub registry: Registry,
    /// Continue the final training from the checkpoint of an interrupted run of the same
    /// name, settings and data (`bccp train --resume`); without it, a checkpoint left by an
    /// earlier run is discarded. Either way one is written after every epoch
    /// ([`Registry::checkpoint_dir`]) and removed once the run is registered.
    pub resume: bool,
}

/// Share of each day that is training data (the rest is test data).
pub const TRAIN_SHARE: f64 = 0.8;
/// The train/test split is fixed, whatever the run's seed, so runs compare on one test set.
pub const SPLIT_SEED: u64 = 0x5917;

/// The first `n` records (all when `None`), split 80/20 with the fixed split seed.
pub(crate) fn split_day(
    records: Vec<Record>,
    n: Option<usize>,
    stream: u64,
) -> (Vec<Record>, Vec<Record>) {
    let mut records = records;
    if let Some(n) = n {
        records.truncate(n);
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    Rng::derive(SPLIT_SEED, stream).shuffle(&mut order);
    let n_train = (records.len() as f64 * TRAIN_SHARE).round() as usize;
    let mut train: Vec<usize> = order[..n_train].to_vec();
    let mut test: Vec<usize> = order[n_train..].to_vec();
    train.sort_unstable();
    test.sort_unstable();
    (
        train.iter().map(|&i| records[i].clone()).collect(),
        test.iter().map(|&i| records[i].clone()).collect(),
    )
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run: RunDir,
    pub metrics: RunMetrics,
}

/// What every run on the same data shares: the day splits, the backbone and the embeddings
/// of every image (in the order Monday train, Monday test, Tuesday train, Tuesday test).
pub struct Embedded {
    pub classes: Vec<String>,
    pub mon_train: Vec<Record>,
    pub mon_test: Vec<Record>,
    pub tue_train: Vec<Record>,
    pub tue_test: Vec<Record>,
    /// The backbone, its preprocessing and weights.
    pub embedder: Embedder,
    pub monday_manifest_sha: String,
    pub tuesday_manifest_sha: Option<String>,
    /// `[all images, D]` on the run's device.
    pub features: Tensor,
    /// How the embedding went (cache hits, corrupt cache records discarded, …).
    pub embed_stats: EmbedStats,
    pub seconds: f64,
}

/// Images per forward pass when a run embeds its dataset (fewer when they would not fit in
/// memory: [`limits::fit_batch`]).
pub const EMBED_BATCH_SIZE: usize = 64;

fn manifest_sha(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|error| PipelineError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(crate::hash::sha256_hex(&bytes))
}

/// The embedder of a run: `cfg`'s backbone, weights and input size on `env`'s device and
/// cache, in batches of [`EMBED_BATCH_SIZE`] (fewer where a large image size would not fit in
/// memory: [`limits::fit_batch`]).
pub fn run_embedder(
    cfg: &RunConfig,
    env: &RunEnv,
) -> std::result::Result<Embedder, crate::backbone::BackboneError> {
    let pre = zoo::find(&cfg.backbone)?.preprocess_at(cfg.image_size)?;
    Embedder::new(&EmbedderConfig {
        backbone: cfg.backbone.clone(),
        weights: cfg.weights.clone(),
        image_size: cfg.image_size,
        offline: env.offline,
        device: env.device.clone(),
        cache_dir: env.cache_dir.clone(),
        batch_size: limits::fit_batch(&pre, EMBED_BATCH_SIZE, false),
        skip_bad: false,
        precision: cfg.precision,
    })
}

/// Splits the days and embeds every image `cfg` needs (cached). Depends only on the dataset,
/// `monday_num` / `tuesday_num`, the target day, the backbone, its weights and the input size.
pub fn embed_stage(cfg: &RunConfig, env: &RunEnv, progress: &Progress) -> Result<Embedded> {
    let started = Instant::now();
    let info = crate::data::prepare::read_dataset_info(&cfg.dataset)?;
    let monday = cfg.dataset.join("monday.jsonl");
    let tuesday = cfg.dataset.join("tuesday.jsonl");
    let classes = info.classes.len();
    let (mon_train, mon_test) = split_day(read_manifest_for(&monday, classes)?, cfg.monday_num, 0);
    let (tue_train, tue_test) = if cfg.target_day == Day::Tuesday {
        split_day(read_manifest_for(&tuesday, classes)?, cfg.tuesday_num, 1)
    } else {
        (Vec::new(), Vec::new())
    };
    let embedder = run_embedder(cfg, env)?;
    let all: Vec<Record> = mon_train
        .iter()
        .chain(&mon_test)
        .chain(&tue_train)
        .chain(&tue_test)
        .cloned()
        .collect();
    let list = ImageList::from_records(&cfg.dataset, &all, &info.classes);
    let (set, embed_stats) = embedder.embed(&list, progress)?;
    Ok(Embedded {
        classes: info.classes,
        features: set.embeddings.to_device(&env.device)?,
        monday_manifest_sha: manifest_sha(&monday)?,
        tuesday_manifest_sha: manifest_sha(&tuesday).ok(),
        mon_train,
        mon_test,
        tue_train,
        tue_test,
        embedder,
        embed_stats,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The rows of a reuse buffer (`features` [N, D], labels `targets`) that `cfg`'s sampling
/// replays, in the order it chose them.
pub fn replay_indices(cfg: &RunConfig, features: &Tensor, targets: &[u32]) -> Result<Vec<u32>> {
    let (_, dim) = features.dims2()?;
    let embeddings = features
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let targets: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let buffer = ReuseBuffer {
        embeddings: &embeddings,
        dim,
        targets: &targets,
    };
    let chosen = sampling::select(
        &buffer,
        cfg.sampling,
        cfg.replay_ratio(),
        cfg.sampling_mode,
        cfg.seed,
    )?;
    Ok(chosen.iter().map(|s| s.index as u32).collect())
}

/// The state to continue the final training from: with `resume`, the checkpoint's (a line
/// says from which epoch) or none (a line says training starts from scratch); without, none,
/// and an earlier checkpoint is removed.
fn open_checkpoint(
    checkpoint: &Checkpoint,
    resume: bool,
    epochs: usize,
) -> Result<Option<TrainState>> {
    if !resume {
        checkpoint.remove()?;
        return Ok(None);
    }
    let start = checkpoint.load()?;
    match &start {
        Some(s) => println!(
            "resuming from {}: {} of {epochs} epochs done",
            checkpoint.state_path().display(),
            s.epochs_done
        ),
        None => println!(
            "--resume: no checkpoint in {}; training from scratch",
            checkpoint.dir().display()
        ),
    }
    Ok(start)
}

/// Runs the whole pipeline and registers the result; `progress` shows each stage.
pub fn run(cfg: &RunConfig, env: &RunEnv, progress: &Progress) -> Result<RunOutcome> {
    cfg.validate_on(&env.device)?;
    let embedded = embed_stage(cfg, env, progress)?;
    run_embedded(cfg, env, &embedded, progress)
}

/// The stages after [`embed_stage`]: replay, cleansing, training, evaluation, registration.
/// `embedded` must come from a configuration with the same data settings as `cfg` (as the
/// cells of one experiment have), so runs can share it.
pub fn run_embedded(
    cfg: &RunConfig,
    env: &RunEnv,
    e: &Embedded,
    progress: &Progress,
) -> Result<RunOutcome> {
    cfg.validate_on(&env.device)?;
    let started = Instant::now();
    let mut seconds = StageSeconds {
        embed: e.seconds,
        ..StageSeconds::default()
    };
    let device = &env.device;
    let (classes, spec, pre) = (&e.classes, e.embedder.spec(), e.embedder.preprocess());
    let (mon_train, mon_test, tue_train, tue_test) =
        (&e.mon_train, &e.mon_test, &e.tue_train, &e.tue_test);
    let features = &e.features;
    let (n1, n2, n3) = (mon_train.len(), mon_test.len(), tue_train.len());
    let part = |start: usize, len: usize| features.narrow(0, start, len);

    // Training candidates: Tuesday (labels as users gave them) + replayed Monday images, or
    // Monday alone.
    let stage = Instant::now();
    let truth = |r: &[Record]| r.iter().map(|x| x.target as u32).collect::<Vec<u32>>();
    let files = |r: &[Record]| -> Vec<PathBuf> {
        r.iter().map(|x| cfg.dataset.join(&x.image_path)).collect()
    };
    let (mut x_train, mut given, mut true_labels, mut replayed) =
        (part(0, n1)?, truth(mon_train), truth(mon_train), 0usize);
    // The image of every training row (fine-tuning reads them again).
    let mut train_files = files(mon_train);
    if cfg.target_day == Day::Tuesday {
        let t_true = truth(tue_train);
        let t_given = match cfg.label {
            LabelSource::GroundTruth => t_true.clone(),
            LabelSource::UserFeedback => {
                let targets: Vec<usize> = t_true.iter().map(|&t| t as usize).collect();
                user_feedback_labels(&targets, classes.len(), cfg.user_accuracy, cfg.seed)?
                    .given
                    .iter()
                    .map(|&g| g as u32)
                    .collect()
            }
        };
        let idx = replay_indices(cfg, &part(0, n1)?, &truth(mon_train))?;
        replayed = idx.len();
        let replay_x = part(0, n1)?.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?;
        x_train = Tensor::cat(&[part(n1 + n2, n3)?, replay_x], 0)?;
        train_files = files(tue_train);
        train_files.extend(
            idx.iter()
                .map(|&i| cfg.dataset.join(&mon_train[i as usize].image_path)),
        );
        let replay_labels: Vec<u32> = idx
            .iter()
            .map(|&i| mon_train[i as usize].target as u32)
            .collect();
        given = t_given
            .into_iter()
            .chain(replay_labels.iter().copied())
            .collect();
        true_labels = t_true.into_iter().chain(replay_labels).collect();
    }
    seconds.sample = stage.elapsed().as_secs_f64();

    // Cleansing: the Bayesian cut-off, confident learning, or nothing.
    let stage = Instant::now();
    let mut metrics = RunMetrics::default();
    // Rows after the Tuesday candidates are replayed from the reuse buffer.
    let from_buffer: Vec<bool> = (0..given.len())
        .map(|i| cfg.target_day == Day::Tuesday && i >= n3)
        .collect();
    // The reuse buffer (Monday's training records) of a Tuesday run; a Monday run has none.
    let (buffer_files, buffer_labels) = if cfg.target_day == Day::Tuesday {
        (files(mon_train), truth(mon_train))
    } else {
        (Vec::new(), Vec::new())
    };
    let x_cleanse = for_cleansing(
        cfg,
        &x_train,
        &train_files,
        (&buffer_files, &buffer_labels),
        &e.embedder,
        classes.len(),
        progress,
    )?;
    let clean = |given: &[u32], trusted: &[bool]| {
        cleanse(
            &cfg.cleanse(),
            &x_cleanse,
            given,
            &from_buffer,
            trusted,
            classes.len(),
            &cfg.train(),
            progress,
        )
    };
    // The simulated review: verified labels become the truth and are trusted from here on.
    let mut trusted: Vec<bool> = Vec::new();
    if cfg.verify_budget > 0.0 {
        let count = verify::budget_count(n3, cfg.verify_budget);
        let first = match cfg.verify_pick {
            VerifyPick::Flagged => Some(clean(&given, &[])?),
            VerifyPick::Random => None,
        };
        let (flagged, scores) = first.map_or_else(Default::default, |c| {
            (c.flagged, c.scores.unwrap_or_default())
        });
        trusted = vec![false; given.len()];
        let mut corrected = 0;
        for i in verify::pick(cfg.verify_pick, n3, count, &flagged, &scores, cfg.seed) {
            corrected += usize::from(given[i] != true_labels[i]);
            given[i] = true_labels[i];
            trusted[i] = true;
        }
        metrics.verified = Some(count);
        metrics.corrected_by_review = Some(corrected);
    }
    let noisy: Vec<bool> = given
        .iter()
        .zip(&true_labels)
        .map(|(g, t)| g != t)
        .collect();
    let cleansed = clean(&given, &trusted)?;
    // Detection figures for the methods that flag samples, when some labels are wrong.
    if let (Some(scores), true) = (&cleansed.scores, noisy.contains(&true)) {
        let d = detection(&cleansed.flagged, &noisy);
        metrics.noise_precision = Some(d.precision);
        metrics.noise_recall = Some(d.recall);
        metrics.noise_f1 = Some(d.f1);
        metrics.noise_score_auc = Some(roc_auc(scores, &noisy));
    }
    if cfg.method == Method::Bccp {
        metrics.relabelled_by_cutoff = Some(cleansed.relabelled);
    }
    let removed = cleansed.removed;
    let (keep_idx, labels) = (cleansed.kept, cleansed.labels);
    if keep_idx.is_empty() {
        return Err(PipelineError::NothingLeft {
            candidates: given.len(),
            method: cfg.method.name(),
            percentile: cfg.cutoff_percentile.to_string(),
        });
    }
    seconds.cleanse = stage.elapsed().as_secs_f64();

    // Final head on the kept samples.
    let stage = Instant::now();
    let keep_t = Tensor::new(keep_idx.as_slice(), device)?;
    let x_final = x_train.index_select(&keep_t, 0)?;
    let y_final: Vec<u32> = keep_idx.iter().map(|&i| labels[i as usize]).collect();
    let final_cfg = TrainConfig {
        loss: cfg.final_loss(),
        ..cfg.train()
    };
    // What determines the final training, for its checkpoint: the settings, the backbone, the
    // kept samples (their features) and their labels; the test samples and their labels also
    // shape the recorded figures.
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let mut settings = serde_json::json!({
        "finetune": cfg.finetune.name(),
        "train": &final_cfg,
        "backbone_lr": (cfg.finetune == Finetune::Full).then_some(cfg.backbone_lr),
    });
    if cfg.bn == BnMode::Train {
        // Only when set, so that the checkpoints of runs before the setting stay valid.
        settings["bn"] = cfg.bn.name().into();
    }
    let mut fingerprint = Fingerprint::new()
        .with("training settings", settings.to_string())
        .with(
            "backbone",
            format!(
                "{} at {}×{}, weights sha256:{}",
                spec.name,
                pre.width,
                pre.height,
                e.embedder.weights_sha256()
            ),
        )
        .with_f32s("training samples", &host(&x_final)?)
        .with_u32s("training labels", &y_final);
    {
        let mut test_x = host(&part(n1, mon_test.len())?)?;
        let mut test_y = truth(mon_test);
        if cfg.target_day == Day::Tuesday {
            test_x.extend(host(&part(n1 + n2 + n3, tue_test.len())?)?);
            test_y.extend(truth(tue_test));
        }
        fingerprint = fingerprint
            .with_f32s("test samples", &test_x)
            .with_u32s("test labels", &test_y);
    }
    let checkpoint = Checkpoint::new(env.registry.checkpoint_dir(&cfg.model_name)?, fingerprint);
    // One run of a name writes its checkpoint; another of the same name training at the same
    // time (they get distinct versions) trains without.
    let lock = env
        .registry
        .try_lock_file(&cfg.model_name, crate::registry::CHECKPOINT_LOCK)?;
    let checkpointing = match &lock {
        Some(_) => Some(Checkpointing {
            checkpoint: &checkpoint,
            start: open_checkpoint(&checkpoint, env.resume, cfg.epochs)?,
            stop_after: None,
        }),
        None if env.resume => {
            return Err(PipelineError::CheckpointBusy {
                name: cfg.model_name.clone(),
                dir: checkpoint.dir().to_path_buf(),
            })
        }
        None => {
            println!(
                "another run of {} is writing {}: this one trains without checkpoints",
                cfg.model_name,
                checkpoint.dir().display()
            );
            None
        }
    };
    let (head, tuned, epochs): (Head, Option<Backbone>, _) = match cfg.finetune {
        Finetune::Head => {
            // Watched on the test split as the final evaluation reads it (Monday, then Tuesday).
            let mut parts = vec![part(n1, mon_test.len())?];
            let mut test_truth = truth(mon_test);
            if cfg.target_day == Day::Tuesday {
                parts.push(part(n1 + n2 + n3, tue_test.len())?);
                test_truth.extend(truth(tue_test));
            }
            let test = TestSet {
                parts: &parts,
                labels: &test_truth,
            };
            let (head, history) = train_head_recorded(
                &x_final,
                &y_final,
                classes.len(),
                &final_cfg,
                progress,
                Some(test),
                checkpointing,
            )?;
            (head, None, history)
        }
        Finetune::Full => {
            let (mut model, vars) =
                Backbone::load_trainable_bn(spec, e.embedder.weights(), device, cfg.bn)?;
            // On candle's autograd (the transformers, any network on a GPU) training runs in
            // the backbone's own precision; the CNNs' engine trainer takes its own from
            // `final_cfg`.
            if !spec.has_batch_norm() || !device.is_cpu() {
                model.set_precision(cfg.precision)?;
            }
            let kept_files: Vec<PathBuf> = keep_idx
                .iter()
                .map(|&i| train_files[i as usize].clone())
                .collect();
            // Watched on the test split as the final evaluation reads it (Monday, then Tuesday).
            let mut test_files = files(mon_test);
            let mut test_truth = truth(mon_test);
            if cfg.target_day == Day::Tuesday {
                test_files.extend(files(tue_test));
                test_truth.extend(truth(tue_test));
            }
            let (head, history) = finetune(
                &model,
                vars,
                &kept_files,
                &y_final,
                classes.len(),
                pre,
                &final_cfg,
                cfg.backbone_lr,
                cfg.cache_images_mib,
                Some((test_files.as_slice(), test_truth.as_slice())),
                device,
                progress,
                checkpointing,
            )?;
            model.refresh_channels_last()?;
            // Evaluated, and later served, in the run's precision.
            model.set_precision(cfg.precision)?;
            (head, Some(model), history)
        }
    };
    seconds.train = stage.elapsed().as_secs_f64();

    // Evaluation: Monday test, plus Tuesday test for a Tuesday run, on the cached features or,
    // after fine-tuning, on the tuned backbone's.
    let stage = Instant::now();
    let test_features = |start: usize, records: &[Record]| -> Result<Tensor> {
        match &tuned {
            None => Ok(part(start, records.len())?),
            Some(model) => Ok(embed_files(model, &files(records), pre, 64, device)?),
        }
    };
    let mon_pred = head.predict(&test_features(n1, mon_test)?)?;
    let mon_eval = evaluate(&mon_pred, &truth(mon_test), classes.len());
    let (overall, tue_acc) = if cfg.target_day == Day::Tuesday {
        let tue_pred = head.predict(&test_features(n1 + n2 + n3, tue_test)?)?;
        let tue_eval = evaluate(&tue_pred, &truth(tue_test), classes.len());
        let both: Vec<Record> = mon_test.iter().chain(tue_test).cloned().collect();
        let pred: Vec<u32> = [mon_pred, tue_pred].concat();
        (
            evaluate(&pred, &truth(&both), classes.len()),
            Some(tue_eval.accuracy),
        )
    } else {
        (mon_eval.clone(), None)
    };
    seconds.evaluate = stage.elapsed().as_secs_f64();
    // The total includes the embedding stage, also when it was shared with other runs.
    seconds.total = e.seconds + started.elapsed().as_secs_f64();
    metrics.test_accuracy = overall.accuracy;
    metrics.test_accuracy_monday = mon_eval.accuracy;
    metrics.test_accuracy_tuesday = tue_acc;
    metrics.per_class_accuracy = overall
        .per_class
        .iter()
        .map(|&a| a.is_finite().then_some(a))
        .collect();
    metrics.confusion = overall.confusion;
    metrics.train_size = keep_idx.len();
    metrics.removed_by_cutoff = removed;
    metrics.replayed = replayed;
    metrics.noisy_labels = noisy.iter().filter(|&&n| n).count();
    metrics.seconds = seconds;
    metrics.epochs = epochs;

    let ids = |r: &[Record]| r.iter().map(|x| x.id).collect::<Vec<u64>>();
    let record = RunRecord {
        params: cfg.clone(),
        provenance: Provenance {
            bccp_version: env!("CARGO_PKG_VERSION").to_owned(),
            weights: e.embedder.weights().display().to_string(),
            weights_sha256: e.embedder.weights_sha256().to_owned(),
            image_size: pre.width,
            monday_manifest_sha256: e.monday_manifest_sha.clone(),
            tuesday_manifest_sha256: e.tuesday_manifest_sha.clone(),
            // Filled in by the registry from the bytes it writes.
            model_sha256: String::new(),
        },
        metrics,
        labels: classes.clone(),
        split: Split {
            monday_train: ids(mon_train),
            monday_test: ids(mon_test),
            tuesday_train: ids(tue_train),
            tuesday_test: ids(tue_test),
            trained_on: Vec::new(),
        },
    };
    let mut tensors = head.tensors();
    if let Some(model) = &tuned {
        tensors.extend(model.export_tuned()?);
    }
    let run = env.registry.register(&cfg.model_name, &record, &tensors)?;
    if lock.is_some() {
        checkpoint.remove()?;
    }
    Ok(RunOutcome {
        run,
        metrics: record.metrics,
    })
}
