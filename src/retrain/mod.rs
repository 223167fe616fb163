//! One cycle of the self-cleansing loop (`bccp retrain`; `bccp up` runs them on a schedule).
//!
//! * Candidates: the accepted training samples that arrived since the data the champion was
//!   trained on (the consumer offset `retrain:<model>`), labels as users gave them.
//! * Reuse buffer: the champion's cleaned training set (`split.json`'s `trained_on`).
//! * Each challenger method replays the buffer, cleanses and trains a head through the same
//!   library calls as `bccp train`; embeddings come from the content-addressed cache, so a
//!   sample is embedded once in its life.
//! * The gate ([`gate`]) compares every challenger with the champion on the trusted gate set
//!   (held-out samples with true or verified labels), per day; at most one is promoted.
//! * Verified labels (a person's answers on the review page) are trusted. A verified sample
//!   that this cycle trains on (a candidate, or a row replayed from the champion's training
//!   set) trains with its verified label and is never flagged, cut or relabelled by the
//!   cleansing. Every other verified sample the champion was not trained on either (typically
//!   one an earlier cycle cut, then a person checked) joins the gate set, so the gate never
//!   scores a model on a sample it learned.
//! * What the recorded challenger (promoted, else the last) flagged among the candidates is
//!   kept in the store ([`Store::record_flags`]) with its score and suggested label: the review
//!   page's gallery.
//!
//! Crash safety: challengers are registered first (a version is complete or absent); then the
//! decision and the moved offset commit in one store transaction; then the `champion` alias
//! follows. A cycle killed before the commit leaves the offset and the alias where they were
//! (its registered versions are simply never promoted); one killed after it has its alias move
//! repaired by the next cycle, which also marks a dead `running` row `abandoned`. Cycles of one
//! model are serialised by a lock file in the registry.

pub mod gate;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use serde_json::json;

use crate::backbone::Embedder;
use crate::cleanse::{cleanse, Method};
use crate::cleanse_features::for_cleansing;
use crate::config::RunConfig;
use crate::data::ImageList;
use crate::pipeline::{replay_indices, run_embedder, RunEnv};
use crate::progress::Progress;
use crate::registry::{
    Provenance, Registry, RunMetrics, RunRecord, Split, TrainedRun, TrainedSample,
};
use crate::store::{self, Flag, NewRetrain, RetrainOutcome, Sample, SampleFilter, Store, RUNNING};
use crate::train::eval::{detection, roc_auc};
use crate::train::{train_head_recorded, TrainConfig};
use gate::{decide, GateRule, GateScore};

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
    #[error(transparent)]
    Cleanse(#[from] crate::cleanse::CleanseError),
    #[error(transparent)]
    Finetune(#[from] crate::train::finetune::FinetuneError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, RetrainError>;

/// The lock file, in the model's registry folder, that serialises its cycles.
const CYCLE_LOCK: &str = ".retrain.lock";

/// The alias the loop promotes.
pub const CHAMPION: &str = "champion";

/// What one cycle does.
#[derive(Debug, Clone)]
pub struct RetrainOptions {
    /// Registry name of the model.
    pub model: String,
    /// Run a cycle only when at least this many training samples arrived since the last one.
    pub min_new: usize,
    pub rule: GateRule,
    /// Training settings (`finetune` must be `head`); `method` is replaced by each challenger's.
    pub run: RunConfig,
    /// One challenger per method, in order.
    pub methods: Vec<Method>,
    /// What started the cycle (recorded).
    pub trigger: String,
}

/// One challenger's result.
#[derive(Debug, Clone)]
pub struct ChallengerReport {
    pub method: Method,
    /// `name:version` in the registry.
    pub version: String,
    pub replayed: usize,
    /// Candidates and replayed samples the cleansing dropped.
    pub dropped: usize,
    /// Samples the cleansing relabelled (and kept).
    pub relabelled: usize,
    pub trained_on: usize,
    pub gate: GateScore,
    pub promoted: bool,
    pub reason: String,
}

/// What a cycle did.
#[derive(Debug, Clone)]
pub enum CycleReport {
    /// Too few new samples; nothing was recorded.
    Skipped {
        new: u64,
        min_new: usize,
    },
    Done(Box<CycleSummary>),
}

/// A completed cycle.
#[derive(Debug, Clone)]
pub struct CycleSummary {
    pub retrain_id: i64,
    pub candidates: usize,
    /// The last sample id this cycle saw.
    pub seen_up_to: i64,
    pub champion_before: Option<String>,
    /// The champion's gate score (absent on the first cycle).
    pub champion_gate: Option<GateScore>,
    pub gate_samples: usize,
    /// Verified samples the challengers trained on (never cut), and those the gate used.
    pub verified_trained: usize,
    pub verified_gate: usize,
    /// Candidates the recorded challenger flagged (kept for review).
    pub flagged: usize,
    pub challengers: Vec<ChallengerReport>,
    /// The new champion, when one was promoted.
    pub promoted: Option<String>,
    pub seconds: f64,
}

/// The consumer offset of the data a model's champion has been trained on.
pub fn offset_name(model: &str) -> String {
    format!("retrain:{model}")
}

/// Runs one cycle (waiting for a cycle of the same model in another process to finish first).
pub fn run_cycle(
    store: &mut dyn Store,
    env: &RunEnv,
    opts: &RetrainOptions,
    progress: &Progress,
) -> Result<CycleReport> {
    check(opts)?;
    crate::registry::check_name(&opts.model)?;
    let _lock = env.registry.lock_file(&opts.model, CYCLE_LOCK)?;
    repair(store, &env.registry, &opts.model)?;
    let seen_before = store
        .retrains()?
        .iter()
        .filter(|r| r.decision != RUNNING && r.champion_model() == Some(opts.model.as_str()))
        .filter_map(|r| r.watermark)
        .max()
        .unwrap_or(0);
    let top = store.max_sample_id()?;
    let new = store.count_samples(&SampleFilter {
        after_id: seen_before,
        up_to_id: Some(top),
        split: Some(store::Split::Train),
        accepted: Some(true),
        ..SampleFilter::default()
    })?;
    if new < opts.min_new as u64 || new == 0 {
        return Ok(CycleReport::Skipped {
            new,
            min_new: opts.min_new,
        });
    }
    let champion = env.registry.aliases(&opts.model)?.get(CHAMPION).copied();
    let champion_spec = champion.map(|v| format!("{}:{v}", opts.model));
    let id = store.start_retrain(&NewRetrain {
        started: store::now_utc(),
        trigger: opts.trigger.clone(),
        champion: champion_spec.clone(),
    })?;
    match cycle(store, env, opts, progress, id, top, champion_spec.clone()) {
        Ok(summary) => Ok(CycleReport::Done(Box::new(summary))),
        Err(e) => {
            // Recorded as failed; the offset and the alias stay where they were.
            let _ = store.finish_retrain(
                id,
                &RetrainOutcome {
                    finished: store::now_utc(),
                    challenger: None,
                    champion: champion_spec,
                    decision: "failed".into(),
                    reasons: json!({ "error": e.to_string() }),
                    watermark: None,
                },
                &[],
            );
            Err(e)
        }
    }
}

fn check(opts: &RetrainOptions) -> Result<()> {
    let bad = |m: String| Err(RetrainError::Invalid(m));
    if opts.methods.is_empty() {
        return bad("--method needs at least one challenger method".into());
    }
    if opts.run.finetune != crate::train::finetune::Finetune::Head {
        return bad("--finetune full is not supported by the loop yet; use head".into());
    }
    for (flag, v) in [
        ("--margin", opts.rule.margin),
        ("--max-day-drop", opts.rule.max_day_drop),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return bad(format!(
                "{flag} {v} must be in [0, 1] (a share of accuracy)"
            ));
        }
    }
    if !(0.0..=1.0).contains(&opts.run.replay_ratio()) {
        return bad(format!(
            "--ratio {} must be in [0, 1]",
            opts.run.replay_ratio()
        ));
    }
    Ok(())
}

/// Completes what a killed cycle left: `running` rows become `abandoned`, and the champion
/// alias follows the last promotion the store committed.
fn repair(store: &mut dyn Store, registry: &Registry, model: &str) -> Result<()> {
    let rows = store.retrains()?;
    for r in rows.iter().filter(|r| r.decision == RUNNING) {
        if r.champion_model().is_some_and(|m| m != model) {
            continue;
        }
        store.finish_retrain(
            r.id,
            &RetrainOutcome {
                finished: store::now_utc(),
                challenger: r.challenger.clone(),
                champion: r.champion.clone(),
                decision: "abandoned".into(),
                reasons: json!({ "why": "the cycle stopped before it finished (killed or crashed)" }),
                watermark: None,
            },
            &[],
        )?;
    }
    let promoted = rows
        .iter()
        .rev()
        .filter(|r| r.decision == "promoted")
        .filter_map(|r| r.champion.as_deref()?.split_once(':'))
        .find(|(name, _)| *name == model);
    if let Some((_, version)) = promoted {
        let version: u32 = version
            .parse()
            .map_err(|_| RetrainError::Invalid(format!("bad champion version `{version}`")))?;
        if registry.aliases(model)?.get(CHAMPION) != Some(&version) {
            registry.set_alias(model, CHAMPION, version)?;
        }
    }
    Ok(())
}

trait ChampionModel {
    fn champion_model(&self) -> Option<&str>;
}

impl ChampionModel for store::Retrain {
    /// The model name of the row's champion or challenger (`name:version`).
    fn champion_model(&self) -> Option<&str> {
        self.champion
            .as_deref()
            .or(self.challenger.as_deref())
            .and_then(|s| s.split_once(':'))
            .map(|(name, _)| name)
    }
}

/// Everything of one cycle between its `running` row and its outcome.
fn cycle(
    store: &mut dyn Store,
    env: &RunEnv,
    opts: &RetrainOptions,
    progress: &Progress,
    id: i64,
    top: i64,
    champion_spec: Option<String>,
) -> Result<CycleSummary> {
    let started = Instant::now();
    let classes = store.classes()?;
    if classes.len() < 2 {
        return Err(RetrainError::Invalid(format!(
            "the store {} knows {} class(es); training needs two or more",
            store.location(),
            classes.len()
        )));
    }
    let consumed = store.offset(&offset_name(&opts.model))?.unwrap_or(0);
    let candidates = store.samples(
        &SampleFilter {
            after_id: consumed,
            up_to_id: Some(top),
            split: Some(store::Split::Train),
            accepted: Some(true),
            ..SampleFilter::default()
        },
        usize::MAX,
    )?;
    let mut gate_set = store.samples(
        &SampleFilter {
            up_to_id: Some(top),
            ..SampleFilter::gate(None)
        },
        usize::MAX,
    )?;
    let verified = store.samples(
        &SampleFilter {
            up_to_id: Some(top),
            accepted: Some(true),
            verified: true,
            ..SampleFilter::default()
        },
        usize::MAX,
    )?;
    let verified_labels: HashMap<i64, i64> = verified
        .iter()
        .filter_map(|s| Some((s.id, s.label_verified?)))
        .collect();
    let champion = match &champion_spec {
        Some(spec) => Some(TrainedRun::load(
            &env.registry,
            spec,
            &env.device,
            env.cache_dir.as_deref(),
        )?),
        None => None,
    };
    let buffer: Vec<TrainedSample> = champion
        .as_ref()
        .map(|c| c.record.split.trained_on.clone())
        .unwrap_or_default();
    // Verified samples that neither the champion nor this cycle's challengers train on
    // join the gate (split gate ones are in it already).
    let learned: HashSet<i64> = candidates
        .iter()
        .map(|s| s.id)
        .chain(buffer.iter().map(|b| b.id))
        .collect();
    let verified_gate = verified
        .into_iter()
        .filter(|s| s.split == store::Split::Train && !learned.contains(&s.id))
        .collect::<Vec<_>>();
    let verified_gate_count = verified_gate.len()
        + gate_set
            .iter()
            .filter(|s| s.label_verified.is_some())
            .count();
    gate_set.extend(verified_gate);
    let verified_trained = candidates
        .iter()
        .map(|s| s.id)
        .chain(buffer.iter().map(|b| b.id))
        .filter(|id| verified_labels.contains_key(id))
        .count();
    if gate_set.is_empty() {
        return Err(RetrainError::Invalid(format!(
            "the store {} has no trusted gate samples (split gate with a true or verified label, or verified samples no model trained on); the gate cannot decide",
            store.location()
        )));
    }

    // One embedding pass (cached by content) over candidates, buffer and gate set.
    let cfg = &opts.run;
    let embedder = run_embedder(cfg, env)?;
    let pre = embedder.preprocess();
    let paths: Vec<PathBuf> = candidates
        .iter()
        .map(|s| PathBuf::from(&s.image_path))
        .chain(buffer.iter().map(|b| PathBuf::from(&b.image_path)))
        .chain(gate_set.iter().map(|s| PathBuf::from(&s.image_path)))
        .collect();
    let list = ImageList {
        recorded_paths: paths.iter().map(|p| p.display().to_string()).collect(),
        targets: vec![0; paths.len()],
        files: paths,
        classes: classes.clone(),
        ..ImageList::default()
    };
    let (set, _) = embedder.embed(&list, progress)?;
    let features = set.embeddings.to_device(&env.device)?;
    let (nc, nb, ng) = (candidates.len(), buffer.len(), gate_set.len());
    let x_new = features.narrow(0, 0, nc)?;
    let x_buffer = features.narrow(0, nc, nb)?;
    let x_gate = features.narrow(0, nc + nb, ng)?;
    let gate_truth: Vec<u32> = gate_set.iter().map(|s| s.best_label() as u32).collect();
    let gate_sources: Vec<String> = gate_set.iter().map(|s| s.source.clone()).collect();

    let champion_gate = match &champion {
        Some(c) => {
            let predicted =
                if c.uses_features_of(embedder.weights_sha256(), pre.width, embedder.precision()) {
                    c.head().predict(&x_gate)?
                } else {
                    let files: Vec<PathBuf> = gate_set
                        .iter()
                        .map(|s| s.image_path.clone().into())
                        .collect();
                    c.predict(&files)?.iter().map(|p| p.target as u32).collect()
                };
            Some(GateScore::of(&predicted, &gate_truth, &gate_sources))
        }
        None => None,
    };

    let mut trained = Vec::new();
    for &method in &opts.methods {
        let run = RunConfig {
            method,
            model_name: opts.model.clone(),
            dataset: PathBuf::from(store.location()),
            ..cfg.clone()
        };
        let c = train_challenger(
            &run,
            &candidates,
            &buffer,
            &verified_labels,
            (&x_new, &x_buffer),
            &embedder,
            classes.len(),
            progress,
        )?;
        let predicted = c.head.predict(&x_gate)?;
        let gate = GateScore::of(&predicted, &gate_truth, &gate_sources);
        trained.push((run, c, gate));
    }

    // The majority-class baseline of the first cycle: always answer the most common label.
    let mut counts = vec![0usize; classes.len()];
    for s in &candidates {
        if let Some(c) = counts.get_mut(s.label_given as usize) {
            *c += 1;
        }
    }
    let majority = counts
        .iter()
        .enumerate()
        .max_by_key(|&(_, n)| *n)
        .map_or(0, |(k, _)| k);
    let baseline = gate_truth
        .iter()
        .filter(|&&t| t as usize == majority)
        .count() as f64
        / ng as f64;
    let scores: Vec<&GateScore> = trained.iter().map(|(_, _, g)| g).collect();
    let verdicts = decide(champion_gate.as_ref(), baseline, &scores, opts.rule);

    // Register every challenger (complete versions or none), then commit the decision.
    let mut reports = Vec::new();
    let mut promoted = None;
    let mut flags = Vec::new();
    for ((run, c, gate), verdict) in trained.into_iter().zip(verdicts) {
        let record = loop_record(&run, &embedder, pre, &c, &gate, &classes);
        let dir = env
            .registry
            .register(&opts.model, &record, &c.head.tensors())?;
        let version = format!("{}:{}", dir.name, dir.version);
        if promoted.is_none() {
            // The recorded challenger's flags: the promoted one's, else the last one's.
            flags = c.flags.clone();
        }
        if verdict.promote {
            promoted = Some((dir.version, version.clone()));
        }
        reports.push(ChallengerReport {
            method: run.method,
            version,
            replayed: c.replayed,
            dropped: c.dropped,
            relabelled: c.relabelled,
            trained_on: c.trained_on.len(),
            gate,
            promoted: verdict.promote,
            reason: verdict.reason,
        });
    }
    let new_champion = promoted
        .as_ref()
        .map(|(_, s)| s.clone())
        .or(champion_spec.clone());
    let reasons = json!({
        "candidates": nc,
        "gate_samples": ng,
        "verified_trained": verified_trained,
        "verified_gate": verified_gate_count,
        "flagged": flags.len(),
        "majority_baseline": baseline,
        "champion_gate": champion_gate,
        "challengers": reports.iter().map(|r| json!({
            "version": r.version,
            "method": r.method.name(),
            "replayed": r.replayed,
            "dropped": r.dropped,
            "relabelled": r.relabelled,
            "trained_on": r.trained_on,
            "gate": r.gate,
            "promoted": r.promoted,
            "reason": r.reason,
        })).collect::<Vec<_>>(),
    });
    let offsets: Vec<(String, i64)> = match promoted {
        Some(_) => vec![(offset_name(&opts.model), top)],
        None => Vec::new(),
    };
    let offsets: Vec<(&str, i64)> = offsets.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    store.record_flags(id, &flags)?;
    store.finish_retrain(
        id,
        &RetrainOutcome {
            finished: store::now_utc(),
            challenger: reports
                .iter()
                .find(|r| r.promoted)
                .or(reports.last())
                .map(|r| r.version.clone()),
            champion: new_champion,
            decision: if promoted.is_some() {
                "promoted"
            } else {
                "rejected"
            }
            .into(),
            reasons,
            watermark: Some(top),
        },
        &offsets,
    )?;
    if let Some((version, _)) = &promoted {
        env.registry.set_alias(&opts.model, CHAMPION, *version)?;
    }
    Ok(CycleSummary {
        retrain_id: id,
        candidates: nc,
        seen_up_to: top,
        champion_before: champion_spec,
        champion_gate,
        gate_samples: ng,
        verified_trained,
        verified_gate: verified_gate_count,
        flagged: flags.len(),
        challengers: reports,
        promoted: promoted.map(|(_, s)| s),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A challenger's training result.
struct Challenger {
    head: crate::train::Head,
    replayed: usize,
    dropped: usize,
    relabelled: usize,
    trained_on: Vec<TrainedSample>,
    /// The candidates the cleansing flagged.
    flags: Vec<Flag>,
    /// Noise detection against the true labels, when the candidates have them.
    detection: Option<(f64, f64, f64, Option<f64>)>,
    noisy: usize,
    /// The head's training, epoch by epoch (loss and training accuracy; the gate scores it
    /// afterwards).
    epochs: Vec<crate::train::EpochStats>,
}

/// Replay from the buffer, cleansing and the head, as `bccp train` does them; a row with a
/// verified label (`verified`: sample id → label) trains with it and is never cut.
#[allow(clippy::too_many_arguments)]
fn train_challenger(
    cfg: &RunConfig,
    candidates: &[Sample],
    buffer: &[TrainedSample],
    verified: &HashMap<i64, i64>,
    (x_new, x_buffer): (&Tensor, &Tensor),
    embedder: &Embedder,
    classes: usize,
    progress: &Progress,
) -> Result<Challenger> {
    let buffer_labels: Vec<u32> = buffer.iter().map(|b| b.label).collect();
    let replay = if buffer.is_empty() || cfg.sampling == crate::sampling::Sampling::None {
        Vec::new()
    } else {
        replay_indices(cfg, x_buffer, &buffer_labels)?
    };
    let x_train = if replay.is_empty() {
        x_new.clone()
    } else {
        let idx = Tensor::new(replay.as_slice(), x_new.device())?;
        Tensor::cat(&[x_new, &x_buffer.index_select(&idx, 0)?], 0)?
    };
    // Who each training row is, and its label as given (or as a person verified it).
    let rows: Vec<TrainedSample> = candidates
        .iter()
        .map(|s| TrainedSample {
            id: s.id,
            image_path: s.image_path.clone(),
            label: s.label_given as u32,
        })
        .chain(replay.iter().map(|&i| buffer[i as usize].clone()))
        .map(|r| match verified.get(&r.id) {
            Some(&label) => TrainedSample {
                label: label as u32,
                ..r
            },
            None => r,
        })
        .collect();
    let given: Vec<u32> = rows.iter().map(|r| r.label).collect();
    let from_buffer: Vec<bool> = (0..rows.len()).map(|i| i >= candidates.len()).collect();
    let trusted: Vec<bool> = rows.iter().map(|r| verified.contains_key(&r.id)).collect();
    let train_files: Vec<PathBuf> = rows.iter().map(|r| r.image_path.clone().into()).collect();
    let buffer_files: Vec<PathBuf> = buffer.iter().map(|b| b.image_path.clone().into()).collect();
    let x_cleanse = for_cleansing(
        cfg,
        &x_train,
        &train_files,
        (&buffer_files, &buffer_labels),
        embedder,
        classes,
        progress,
    )?;
    let cleansed = cleanse(
        &cfg.cleanse(),
        &x_cleanse,
        &given,
        &from_buffer,
        &trusted,
        classes,
        &cfg.train(),
        progress,
    )?;
    if cleansed.kept.is_empty() {
        return Err(RetrainError::Invalid(format!(
            "cleansing ({}) removed all {} training samples",
            cfg.method.name(),
            rows.len()
        )));
    }
    let keep = Tensor::new(cleansed.kept.as_slice(), x_new.device())?;
    let labels: Vec<u32> = cleansed
        .kept
        .iter()
        .map(|&i| cleansed.labels[i as usize])
        .collect();
    let (head, epochs) = train_head_recorded(
        &x_train.index_select(&keep, 0)?,
        &labels,
        classes,
        &TrainConfig {
            loss: cfg.final_loss(),
            ..cfg.train()
        },
        progress,
        None,
        None,
    )?;
    // Noise detection on the candidates whose true label is known (generated data).
    let truth: Vec<Option<i64>> = candidates
        .iter()
        .map(|s| s.label_verified.or(s.label_true))
        .chain(replay.iter().map(|_| None))
        .collect();
    let known: Vec<usize> = (0..rows.len()).filter(|&i| truth[i].is_some()).collect();
    let noisy: Vec<bool> = known
        .iter()
        .map(|&i| truth[i] != Some(i64::from(given[i])))
        .collect();
    let detection = (noisy.contains(&true) && cleansed.scores.is_some()).then(|| {
        let flagged: Vec<bool> = known.iter().map(|&i| cleansed.flagged[i]).collect();
        let d = detection(&flagged, &noisy);
        let auc = cleansed.scores.as_ref().map(|s| {
            let s: Vec<f32> = known.iter().map(|&i| s[i]).collect();
            roc_auc(&s, &noisy)
        });
        (d.precision, d.recall, d.f1, auc)
    });
    let flags = (0..candidates.len())
        .filter(|&i| cleansed.flagged[i])
        .map(|i| Flag {
            sample_id: rows[i].id,
            score: cleansed.scores.as_ref().map_or(0.0, |s| f64::from(s[i])),
            suggested: cleansed
                .predicted
                .as_ref()
                .map(|p| i64::from(p[i]))
                .or_else(|| {
                    (cleansed.labels[i] != given[i]).then(|| i64::from(cleansed.labels[i]))
                }),
        })
        .collect();
    Ok(Challenger {
        flags,
        head,
        replayed: replay.len(),
        dropped: cleansed.removed,
        relabelled: cleansed.relabelled,
        trained_on: cleansed
            .kept
            .iter()
            .zip(&labels)
            .map(|(&i, &label)| TrainedSample {
                label,
                ..rows[i as usize].clone()
            })
            .collect(),
        detection,
        noisy: noisy.iter().filter(|&&n| n).count(),
        epochs,
    })
}

/// The registry record of a loop challenger: its settings, the gate as its test figures and
/// the samples it was trained on.
fn loop_record(
    run: &RunConfig,
    embedder: &Embedder,
    pre: &crate::data::Preprocess,
    c: &Challenger,
    gate: &GateScore,
    classes: &[String],
) -> RunRecord {
    let mut metrics = RunMetrics {
        test_accuracy: gate.accuracy,
        test_accuracy_monday: gate.per_source.get("monday").map_or(0.0, |s| s.0),
        test_accuracy_tuesday: gate.per_source.get("tuesday").map(|s| s.0),
        train_size: c.trained_on.len(),
        removed_by_cutoff: c.dropped,
        replayed: c.replayed,
        noisy_labels: c.noisy,
        epochs: c.epochs.clone(),
        ..RunMetrics::default()
    };
    if run.method == Method::Bccp {
        metrics.relabelled_by_cutoff = Some(c.relabelled);
    }
    if let Some((p, r, f1, auc)) = c.detection {
        metrics.noise_precision = Some(p);
        metrics.noise_recall = Some(r);
        metrics.noise_f1 = Some(f1);
        metrics.noise_score_auc = auc;
    }
    RunRecord {
        params: run.clone(),
        provenance: Provenance {
            bccp_version: env!("CARGO_PKG_VERSION").to_owned(),
            weights: embedder.weights().display().to_string(),
            weights_sha256: embedder.weights_sha256().to_owned(),
            image_size: pre.width,
            monday_manifest_sha256: String::new(),
            tuesday_manifest_sha256: None,
            model_sha256: String::new(),
        },
        metrics,
        labels: classes.to_vec(),
        split: Split {
            trained_on: c.trained_on.clone(),
            ..Split::default()
        },
    }
}
