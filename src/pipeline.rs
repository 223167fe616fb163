//! `bccp train`: the whole Monday → Tuesday run — split, embed (cached), user-feedback labels,
//! replay sampling, Bayesian cut-off, head training, evaluation, registration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::backbone::embed::{embed_images, EmbedOptions, ImageList};
use crate::backbone::{cache, resolve_weights, zoo, Backbone};
use crate::cleanse::{cleanse, CleanseConfig, Method};
use crate::cutoff::Percentile;
use crate::data::{read_manifest, user_feedback_labels, Day, Preprocess, Record};
use crate::progress::Progress;
use crate::registry;
use crate::rng::Rng;
use crate::sampling::{self, PairMode, ReuseBuffer, Sampling};
use crate::train::eval::{detection, evaluate, roc_auc};
use crate::train::finetune::{embed_files, finetune, Finetune};
use crate::train::{train_head, Head, TrainConfig};

/// Where training labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelSource {
    GroundTruth,
    /// Users right with probability `--user-accuracy`, otherwise another class.
    UserFeedback,
}

/// Every setting of a run (the reference's flags plus ours).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub dataset: PathBuf,
    pub target_day: Day,
    pub label: LabelSource,
    pub user_accuracy: f64,
    pub sampling: Sampling,
    pub sampling_mode: PairMode,
    pub ratio: f64,
    pub monday_num: Option<usize>,
    pub tuesday_num: Option<usize>,
    pub model_name: String,
    pub backbone: String,
    pub weights: Option<PathBuf>,
    pub image_size: Option<u32>,
    /// The cleansing method and its settings (cut-off, confident learning).
    pub cleanse: CleanseConfig,
    /// Head only (cached features) or the whole backbone.
    pub finetune: Finetune,
    /// Learning rate of the backbone with [`Finetune::Full`].
    pub backbone_lr: f64,
    pub train: TrainConfig,
    pub device: Device,
    pub cache_dir: Option<PathBuf>,
    pub runs_dir: PathBuf,
    pub offline: bool,
}

/// Share of each day that is training data (the rest is test data).
pub const TRAIN_SHARE: f64 = 0.8;
/// The train/test split is fixed, whatever the run's seed, so runs compare on one test set.
pub const SPLIT_SEED: u64 = 0x5917;

/// The first `n` records (all when `None`), split 80/20 with the fixed split seed.
fn split_day(records: Vec<Record>, n: Option<usize>, stream: u64) -> (Vec<Record>, Vec<Record>) {
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

fn image_list(root: &Path, records: &[Record], classes: &[String]) -> ImageList {
    ImageList {
        files: records.iter().map(|r| root.join(&r.image_path)).collect(),
        recorded_paths: records.iter().map(|r| r.image_path.clone()).collect(),
        targets: records.iter().map(|r| r.target as i64).collect(),
        ids: Some(records.iter().map(|r| r.id as i64).collect()),
        classes: classes.to_vec(),
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run: registry::RunDir,
    pub metrics: serde_json::Value,
}

/// Checks flag combinations before any work starts (the reference's rules and ours).
pub fn validate(cfg: &RunConfig) -> Result<()> {
    if cfg.target_day == Day::Tuesday && cfg.tuesday_num.is_none() {
        bail!("--tuesday-num is required when --target-day is tuesday");
    }
    if cfg.sampling != Sampling::None && cfg.target_day == Day::Monday {
        bail!("--sampling-type {} replays Monday data into Tuesday training; it needs --target-day tuesday", cfg.sampling.name());
    }
    if cfg.label == LabelSource::UserFeedback && cfg.target_day == Day::Monday {
        bail!("--label user_feedback applies to Tuesday's labels; it needs --target-day tuesday");
    }
    ensure!(
        (0.0..=1.0).contains(&cfg.user_accuracy),
        "--user-accuracy {} must lie in [0, 1]",
        cfg.user_accuracy
    );
    ensure!(
        (0.0..=1.0).contains(&cfg.ratio),
        "--ratio {} must lie in [0, 1]",
        cfg.ratio
    );
    ensure!(
        cfg.cleanse.mc_passes >= 2,
        "--mc-passes must be 2 or more (variances need two passes)"
    );
    ensure!(
        cfg.cleanse.cutoff_folds >= 1,
        "--cutoff-folds must be 1 (in sample) or more"
    );
    if cfg.cleanse.method == Method::Cleanlab {
        ensure!(
            cfg.cleanse.folds >= 2,
            "--folds {} must be 2 or more for --method cleanlab",
            cfg.cleanse.folds
        );
    }
    ensure!(cfg.train.epochs >= 1, "--epochs must be 1 or more");
    ensure!(cfg.train.batch_size >= 1, "--batch-size must be 1 or more");
    ensure!(
        cfg.train.lr > 0.0 && cfg.train.lr.is_finite(),
        "--lr must be a positive number"
    );
    if cfg.monday_num == Some(0) || cfg.tuesday_num == Some(0) {
        bail!("--monday-num and --tuesday-num must be 1 or more");
    }
    let spec = zoo::find(&cfg.backbone)?;
    spec.preprocess_at(cfg.image_size)?;
    if cfg.finetune == Finetune::Full {
        if let Some(why) = Backbone::finetune_blocker(spec.architecture) {
            bail!(
                "--finetune full is not supported for --backbone {} yet: {why}; use mobilenet_v2 or efficientnet_lite0, or --finetune head",
                spec.name
            );
        }
        ensure!(
            cfg.backbone_lr > 0.0 && cfg.backbone_lr.is_finite(),
            "--backbone-lr must be a positive number"
        );
    }
    ensure!(
        cfg.dataset.join("monday.jsonl").is_file(),
        "{} is not a prepared dataset (no monday.jsonl); make one with bccp prepare",
        cfg.dataset.display()
    );
    Ok(())
}

/// What every run on the same data shares: the day splits, the backbone and the embeddings
/// of every image (in the order Monday train, Monday test, Tuesday train, Tuesday test).
pub struct Embedded {
    pub classes: Vec<String>,
    pub mon_train: Vec<Record>,
    pub mon_test: Vec<Record>,
    pub tue_train: Vec<Record>,
    pub tue_test: Vec<Record>,
    pub spec: zoo::BackboneSpec,
    pub pre: Preprocess,
    pub weights: PathBuf,
    pub weights_sha: String,
    pub monday_manifest_sha: String,
    pub tuesday_manifest_sha: Option<String>,
    /// `[all images, D]` on the run's device.
    pub features: Tensor,
    pub seconds: f64,
}

fn manifest_sha(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(cache::hex(&cache::sha256(&bytes)))
}

/// Splits the days and embeds every image `cfg` needs (cached). Depends only on the dataset,
/// `monday_num` / `tuesday_num`, the target day, the backbone, its weights and the input size.
pub fn embed_stage(cfg: &RunConfig, progress: &Progress) -> Result<Embedded> {
    let started = Instant::now();
    let info = crate::data::prepare::read_dataset_info(&cfg.dataset)?;
    let monday = cfg.dataset.join("monday.jsonl");
    let tuesday = cfg.dataset.join("tuesday.jsonl");
    let (mon_train, mon_test) = split_day(read_manifest(&monday)?, cfg.monday_num, 0);
    let (tue_train, tue_test) = if cfg.target_day == Day::Tuesday {
        split_day(read_manifest(&tuesday)?, cfg.tuesday_num, 1)
    } else {
        (Vec::new(), Vec::new())
    };
    let spec = zoo::find(&cfg.backbone)?;
    let pre = spec.preprocess_at(cfg.image_size)?;
    let weights = resolve_weights(&spec, cfg.weights.as_deref(), cfg.offline)?;
    let weights_sha = cache::weights_hash(cfg.cache_dir.as_deref(), &weights)?;
    let all: Vec<Record> = mon_train
        .iter()
        .chain(&mon_test)
        .chain(&tue_train)
        .chain(&tue_test)
        .cloned()
        .collect();
    let list = image_list(&cfg.dataset, &all, &info.classes);
    let opts = EmbedOptions {
        batch: 64,
        device: &cfg.device,
        skip_bad: false,
        cache_dir: cfg.cache_dir.as_deref(),
        progress,
    };
    let (set, _) = embed_images(
        &list,
        &spec.name,
        &weights_sha,
        &pre,
        spec.embedding_dim,
        || Backbone::load(&spec, &weights, &cfg.device),
        &opts,
    )?;
    Ok(Embedded {
        classes: info.classes,
        features: set.embeddings.to_device(&cfg.device)?,
        monday_manifest_sha: manifest_sha(&monday)?,
        tuesday_manifest_sha: manifest_sha(&tuesday).ok(),
        mon_train,
        mon_test,
        tue_train,
        tue_test,
        spec,
        pre,
        weights,
        weights_sha,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs the whole pipeline and registers the result; `progress` shows each stage.
pub fn run(cfg: &RunConfig, progress: &Progress) -> Result<RunOutcome> {
    validate(cfg)?;
    let embedded = embed_stage(cfg, progress)?;
    run_embedded(cfg, &embedded, progress)
}

/// The stages after [`embed_stage`]: replay, cleansing, training, evaluation, registration.
/// `embedded` must come from a configuration with the same data settings as `cfg` (as the
/// cells of one experiment have), so runs can share it.
pub fn run_embedded(cfg: &RunConfig, e: &Embedded, progress: &Progress) -> Result<RunOutcome> {
    validate(cfg)?;
    let started = Instant::now();
    let mut seconds = BTreeMap::from([("embed", e.seconds)]);
    let (classes, spec, pre) = (&e.classes, &e.spec, &e.pre);
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
                user_feedback_labels(&targets, classes.len(), cfg.user_accuracy, cfg.train.seed)?
                    .given
                    .iter()
                    .map(|&g| g as u32)
                    .collect()
            }
        };
        let buffer_emb = part(0, n1)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let buffer_targets: Vec<i64> = mon_train.iter().map(|r| r.target as i64).collect();
        let buffer = ReuseBuffer {
            embeddings: &buffer_emb,
            dim: spec.embedding_dim,
            targets: &buffer_targets,
        };
        let chosen = sampling::select(
            &buffer,
            cfg.sampling,
            cfg.ratio,
            cfg.sampling_mode,
            cfg.train.seed,
        )?;
        replayed = chosen.len();
        let idx: Vec<u32> = chosen.iter().map(|s| s.index as u32).collect();
        let replay_x = part(0, n1)?.index_select(&Tensor::new(idx.as_slice(), &cfg.device)?, 0)?;
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
    seconds.insert("sample", stage.elapsed().as_secs_f64());

    // Cleansing: the Bayesian cut-off, confident learning, or nothing.
    let stage = Instant::now();
    let noisy: Vec<bool> = given
        .iter()
        .zip(&true_labels)
        .map(|(g, t)| g != t)
        .collect();
    let mut metrics = serde_json::Map::new();
    let cleansed = cleanse(
        &cfg.cleanse,
        &x_train,
        &given,
        classes.len(),
        &cfg.train,
        progress,
    )?;
    // Detection figures for the methods that flag samples, when some labels are wrong.
    if let (Some(scores), true) = (&cleansed.scores, noisy.contains(&true)) {
        let d = detection(&cleansed.flagged, &noisy);
        metrics.insert("noise_precision".into(), json!(d.precision));
        metrics.insert("noise_recall".into(), json!(d.recall));
        metrics.insert("noise_f1".into(), json!(d.f1));
        metrics.insert("noise_score_auc".into(), json!(roc_auc(scores, &noisy)));
    }
    if cfg.cleanse.method == Method::Bccp {
        metrics.insert("relabelled_by_cutoff".into(), json!(cleansed.relabelled));
    }
    let removed = cleansed.removed;
    let (keep_idx, labels) = (cleansed.kept, cleansed.labels);
    seconds.insert("cleanse", stage.elapsed().as_secs_f64());

    // Final head on the kept samples.
    let stage = Instant::now();
    let keep_t = Tensor::new(keep_idx.as_slice(), &cfg.device)?;
    let x_final = x_train.index_select(&keep_t, 0)?;
    let y_final: Vec<u32> = keep_idx.iter().map(|&i| labels[i as usize]).collect();
    let final_cfg = TrainConfig {
        loss: cfg.cleanse.method.loss(cfg.train.loss),
        ..cfg.train.clone()
    };
    let (head, tuned): (Head, Option<Backbone>) = match cfg.finetune {
        Finetune::Head => (
            train_head(&x_final, &y_final, classes.len(), &final_cfg, progress)?,
            None,
        ),
        Finetune::Full => {
            let (model, vars) = Backbone::load_trainable(spec, &e.weights, &cfg.device)?;
            let kept_files: Vec<PathBuf> = keep_idx
                .iter()
                .map(|&i| train_files[i as usize].clone())
                .collect();
            let head = finetune(
                &model,
                vars,
                &kept_files,
                &y_final,
                classes.len(),
                pre,
                &final_cfg,
                cfg.backbone_lr,
                &cfg.device,
                progress,
            )?;
            (head, Some(model))
        }
    };
    seconds.insert("train", stage.elapsed().as_secs_f64());

    // Evaluation: Monday test, plus Tuesday test for a Tuesday run, on the cached features or,
    // after fine-tuning, on the tuned backbone's.
    let stage = Instant::now();
    let test_features = |start: usize, records: &[Record]| -> Result<Tensor> {
        match &tuned {
            None => Ok(part(start, records.len())?),
            Some(model) => embed_files(model, &files(records), pre, 64, &cfg.device),
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
    seconds.insert("evaluate", stage.elapsed().as_secs_f64());
    // The total includes the embedding stage, also when it was shared with other runs.
    seconds.insert("total", e.seconds + started.elapsed().as_secs_f64());
    metrics.insert("test_accuracy".into(), json!(overall.accuracy));
    metrics.insert("test_accuracy_monday".into(), json!(mon_eval.accuracy));
    if let Some(a) = tue_acc {
        metrics.insert("test_accuracy_tuesday".into(), json!(a));
    }
    metrics.insert("per_class_accuracy".into(), json!(overall.per_class));
    metrics.insert("confusion".into(), json!(overall.confusion));
    metrics.insert("train_size".into(), json!(keep_idx.len()));
    metrics.insert("removed_by_cutoff".into(), json!(removed));
    metrics.insert("replayed".into(), json!(replayed));
    metrics.insert(
        "noisy_labels".into(),
        json!(noisy.iter().filter(|&&n| n).count()),
    );
    metrics.insert("seconds".into(), json!(seconds));
    let metrics = serde_json::Value::Object(metrics);

    let params = json!({
        "dataset": cfg.dataset.display().to_string(),
        "monday_manifest_sha256": e.monday_manifest_sha,
        "tuesday_manifest_sha256": e.tuesday_manifest_sha,
        "target_day": cfg.target_day.as_str(),
        "label": match cfg.label { LabelSource::GroundTruth => "ground_truth", LabelSource::UserFeedback => "user_feedback" },
        "user_accuracy": cfg.user_accuracy,
        "method": cfg.cleanse.method.name(),
        "bayesian_cut_off": cfg.cleanse.method == Method::Bccp,
        "sampling_type": cfg.sampling.name(),
        "sampling_mode": cfg.sampling_mode.name(),
        "ratio": cfg.ratio,
        "monday_num": cfg.monday_num,
        "tuesday_num": cfg.tuesday_num,
        "backbone": spec.name,
        "weights": e.weights.display().to_string(),
        "weights_sha256": e.weights_sha,
        "image_size": pre.width,
        "cutoff_score": cfg.cleanse.cutoff_score.name(),
        "cutoff_percentile": match cfg.cleanse.cutoff_percentile { Percentile::Auto => json!("auto"), Percentile::Fixed(p) => json!(p) },
        "cutoff_action": cfg.cleanse.cutoff_action.name(),
        "mc_passes": cfg.cleanse.mc_passes,
        "cutoff_folds": cfg.cleanse.cutoff_folds,
        "filter_by": cfg.cleanse.filter_by.name(),
        "folds": cfg.cleanse.folds,
        "finetune": cfg.finetune.name(),
        "backbone_lr": (cfg.finetune == Finetune::Full).then_some(cfg.backbone_lr),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "lr_decay": cfg.train.lr_decay,
        "loss": cfg.cleanse.method.loss(cfg.train.loss).name(),
        "seed": cfg.train.seed,
    });
    let ids = |r: &[Record]| r.iter().map(|x| x.id).collect::<Vec<u64>>();
    let split = json!({
        "monday_train": ids(mon_train),
        "monday_test": ids(mon_test),
        "tuesday_train": ids(tue_train),
        "tuesday_test": ids(tue_test),
    });
    let docs = BTreeMap::from([
        ("params.json", params),
        ("metrics.json", metrics.clone()),
        ("labels.json", json!(classes)),
        ("split.json", split),
    ]);
    let mut tensors = head.tensors();
    if let Some(model) = &tuned {
        tensors.extend(model.export_tuned()?);
    }
    let run = registry::register(&cfg.runs_dir, &cfg.model_name, &docs, &tensors)?;
    Ok(RunOutcome { run, metrics })
}
