//! `bccp audit`: a data-quality report beyond labels — label issues, exact and near
//! duplicates (with leaks across splits and days), outliers, corrupted images and class
//! balance — per sample, from one embedding pass and one tiled k-NN search.

pub mod corruption;
pub mod duplicates;
pub mod outliers;
pub mod report_html;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::backbone::{EmbedStats, Embedder};
use crate::baselines::FilterBy;
use crate::baselines::{find_label_issues, kfold_pred_probs, self_confidence, suggested_labels};
use crate::data::{read_manifest_for, ImageList, Record};
use crate::distance::{Metric, Precision, Search};
use crate::fsutil::write_atomic;
use crate::progress::Progress;
use crate::train::TrainConfig;

/// Why an audit failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Backbone(#[from] crate::backbone::BackboneError),
    #[error(transparent)]
    Confident(#[from] crate::baselines::ConfidentError),
    #[error(transparent)]
    Distance(#[from] crate::distance::DistanceError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("cannot read image {path}: {error}")]
    Image { path: PathBuf, error: String },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, AuditError>;

/// The samples to audit: an image list, each sample's split and day when known, and the clean
/// original of each corrupted sample when known (`bccp prepare`'s Tuesday).
#[derive(Debug, Clone)]
pub struct AuditInput {
    pub list: ImageList,
    pub split: Vec<Option<String>>,
    pub day: Vec<Option<String>>,
    /// (sample, its clean original's file).
    pub originals: Vec<(usize, PathBuf)>,
}

impl AuditInput {
    /// An image folder `ROOT/<class>/<file>`: no splits, no days.
    pub fn folder(root: &Path) -> Result<Self> {
        let list = ImageList::from_folder(root)?;
        let n = list.len();
        Ok(Self {
            list,
            split: vec![None; n],
            day: vec![None; n],
            originals: Vec::new(),
        })
    }

    /// The samples of a data store, by id: the label audited is the one given, the split is
    /// the store's (train or gate), the day is the sample's source.
    pub fn store(store: &mut dyn crate::store::Store) -> Result<Self> {
        let classes = store
            .classes()
            .map_err(|e| AuditError::Input(format!("cannot read the store's classes: {e}")))?;
        let filter = crate::store::SampleFilter::default();
        let count = store
            .count_samples(&filter)
            .map_err(|e| AuditError::Input(format!("cannot count the store's samples: {e}")))?;
        let samples = store
            .samples(&filter, count as usize)
            .map_err(|e| AuditError::Input(format!("cannot read the store's samples: {e}")))?;
        if let Some(s) = samples
            .iter()
            .find(|s| s.label_given < 0 || s.label_given as usize >= classes.len())
        {
            return Err(AuditError::Input(format!(
                "sample {} of the store has label {}, not a class index in 0..{}",
                s.id,
                s.label_given,
                classes.len()
            )));
        }
        let files: Vec<PathBuf> = samples
            .iter()
            .map(|s| PathBuf::from(&s.image_path))
            .collect();
        let list = ImageList {
            recorded_paths: samples.iter().map(|s| s.image_path.clone()).collect(),
            targets: samples.iter().map(|s| s.label_given).collect(),
            ids: Some(samples.iter().map(|s| s.id).collect()),
            files,
            classes,
            ..ImageList::default()
        };
        Ok(Self {
            list,
            split: samples
                .iter()
                .map(|s| Some(s.split.as_str().to_string()))
                .collect(),
            day: samples.iter().map(|s| Some(s.source.clone())).collect(),
            originals: Vec::new(),
        })
    }

    /// A dataset made by `bccp prepare`: Monday and (when present) Tuesday, each split into
    /// train/test exactly as `bccp train` splits them.
    pub fn prepared(dir: &Path) -> Result<Self> {
        let info = crate::data::prepare::read_dataset_info(dir)?;
        let k = info.classes.len();
        let mut records: Vec<Record> = Vec::new();
        let (mut split, mut day) = (Vec::new(), Vec::new());
        for (stream, name) in ["monday", "tuesday"].into_iter().enumerate() {
            let manifest = dir.join(format!("{name}.jsonl"));
            if name == "tuesday" && !manifest.is_file() {
                continue;
            }
            let (train, test) =
                crate::pipeline::split_day(read_manifest_for(&manifest, k)?, None, stream as u64);
            for (part, rs) in [("train", train), ("test", test)] {
                split.extend(rs.iter().map(|_| Some(part.to_string())));
                day.extend(rs.iter().map(|_| Some(name.to_string())));
                records.extend(rs);
            }
        }
        let originals = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.original_path.as_ref().map(|o| (i, dir.join(o))))
            .collect();
        Ok(Self {
            list: ImageList::from_records(dir, &records, &info.classes),
            split,
            day,
            originals,
        })
    }
}

/// Settings of [`audit`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOptions {
    /// Neighbours per sample (k-NN label disagreement, outlier distance).
    pub k: usize,
    /// Near-duplicate threshold as a share of the median nearest-neighbour distance.
    pub near_factor: f32,
    /// Robust z-score above which a sample is an outlier.
    pub outlier_z: f32,
    /// Robust z-score of the corruption score above which an image is flagged corrupted.
    pub corrupt_z: f32,
    pub folds: usize,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            k: 5,
            near_factor: 0.3,
            outlier_z: 3.0,
            corrupt_z: 3.5,
            folds: 5,
            epochs: 15,
            seed: 42,
        }
    }
}

/// One line of `report.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub index: usize,
    /// The sample's id where the input has ids (a store's sample id, a manifest's id).
    pub id: Option<i64>,
    pub path: String,
    pub split: Option<String>,
    pub day: Option<String>,
    pub given_label: String,
    pub suggested_label: String,
    /// 1 − the out-of-sample probability of the given label (confident learning).
    pub label_score: f32,
    /// Share of the k nearest neighbours with another label (BCCP's k-NN disagreement).
    pub knn_disagreement: f32,
    pub label_issue: bool,
    pub sha256: String,
    pub exact_duplicate_group: Option<usize>,
    /// Distance to the nearest other sample (unit-normalised embeddings, L2).
    pub nearest_distance: f32,
    /// Distance to the nearest other sample's pixel vector ([`pixel_vector`]).
    pub pixel_nearest_distance: f32,
    pub near_duplicate_group: Option<usize>,
    pub near_duplicate: bool,
    /// A duplicate (exact or near) of a sample of the other split.
    pub split_leak: bool,
    /// A duplicate (exact or near) of a sample of another day.
    pub day_leak: bool,
    /// Distance to the k-th nearest other sample (embeddings).
    pub outlier_distance: f32,
    /// The larger robust z-score of the k-th neighbour distance, embeddings or pixels.
    pub outlier_score: f32,
    pub outlier: bool,
    pub corruption: corruption::CorruptionStats,
    pub corruption_score: f32,
    pub corrupted: bool,
}

/// Per-class counts of `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ClassRates {
    pub class: String,
    pub samples: usize,
    pub share: f64,
    pub label_issues: usize,
    pub exact_duplicates: usize,
    pub near_duplicates: usize,
    pub outliers: usize,
    pub corrupted: usize,
}

/// The corrupted-image detector measured against the clean originals of the audited
/// corrupted samples.
#[derive(Debug, Clone, Serialize)]
pub struct CorruptionCheck {
    pub corrupted: usize,
    pub originals: usize,
    /// ROC AUC of the score, corrupted (positive) against originals (negative).
    pub roc_auc: f64,
    /// The same over the corrupted images whose pixels differ from their original.
    pub changed: usize,
    pub roc_auc_changed: Option<f64>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditSummary {
    pub samples: usize,
    pub classes: Vec<ClassRates>,
    /// Largest class over smallest class.
    pub imbalance_ratio: f64,
    pub label_issues: usize,
    pub exact_duplicate_groups: usize,
    pub near_duplicate_groups: usize,
    /// On embeddings (unit-normalised, L2).
    pub near_duplicate_threshold: f32,
    /// On pixel vectors.
    pub pixel_near_duplicate_threshold: f32,
    pub split_leaks: usize,
    pub day_leaks: usize,
    pub outliers: usize,
    pub corrupted: usize,
    pub corruption_check: Option<CorruptionCheck>,
    pub options: AuditOptionsOut,
}

/// The settings as written into the summary.
#[derive(Debug, Clone, Serialize)]
pub struct AuditOptionsOut {
    pub k: usize,
    pub near_factor: f32,
    pub outlier_z: f32,
    pub corrupt_z: f32,
    pub folds: usize,
    pub backbone: String,
}

/// An audit's results.
#[derive(Debug, Clone)]
pub struct Audit {
    pub records: Vec<AuditRecord>,
    pub summary: AuditSummary,
    pub near_groups: Vec<Vec<usize>>,
    pub exact_groups: Vec<Vec<usize>>,
    /// Image files, by sample.
    pub files: Vec<PathBuf>,
    pub embed_stats: EmbedStats,
}

/// Side of the pixel vector: the luma resized to PIXEL_SIDE² (Triangle filter), centred and
/// scaled to unit norm, a resize- and re-encoding-tolerant view of an image.
pub const PIXEL_SIDE: u32 = 16;

/// The pixel vector of a greyscale image ([`PIXEL_SIDE`]², unit norm; zeros for a flat image).
pub fn pixel_vector(img: &image::GrayImage) -> Vec<f32> {
    let small = image::imageops::resize(
        img,
        PIXEL_SIDE,
        PIXEL_SIDE,
        image::imageops::FilterType::Triangle,
    );
    let v: Vec<f32> = small.pixels().map(|p| f32::from(p.0[0])).collect();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let centred: Vec<f32> = v.iter().map(|x| x - mean).collect();
    let norm = centred.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        centred.iter().map(|x| x / norm).collect()
    } else {
        centred.iter().map(|_| 0.0).collect()
    }
}

/// The `k` nearest other rows of every row of `unit` (row-major, `dim` columns), by L2,
/// through the tiled search: (index, distance), nearest first.
fn nearest_others(unit: &[f32], dim: usize, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    let rows = unit.len() / dim;
    let want = (k + 1).min(rows);
    let found = crate::distance::search_host(
        unit,
        unit,
        dim,
        &Search {
            metric: Metric::L2,
            k: want,
            other_class: None,
            precision: Precision::F32,
        },
    )?;
    Ok((0..rows)
        .map(|i| {
            let mut v: Vec<(usize, f32)> = (0..want)
                .map(|s| (found.indices[i * want + s], found.values[i * want + s]))
                .filter(|&(j, _)| j >= 0 && j as usize != i)
                .map(|(j, d)| (j as usize, d))
                .collect();
            v.truncate(k);
            v
        })
        .collect())
}

/// Hash and corruption statistics of a file.
fn read_image(path: &Path) -> Result<(String, image::GrayImage)> {
    let bytes = std::fs::read(path).map_err(|e| AuditError::Image {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| AuditError::Image {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    Ok((crate::hash::sha256_hex(&bytes), img.to_luma8()))
}

/// Audits `input`: embeds it once with `embedder`, searches the k nearest neighbours of every
/// sample through the tiled distance kernels, and scores every issue type.
pub fn audit(
    input: &AuditInput,
    embedder: &Embedder,
    opts: &AuditOptions,
    progress: &Progress,
) -> Result<Audit> {
    let n = input.list.len();
    let classes = &input.list.classes;
    if classes.len() < 2 {
        return Err(AuditError::Input(format!(
            "the dataset has {} class(es); an audit of labels needs two or more",
            classes.len()
        )));
    }
    if n <= opts.k.max(opts.folds) {
        return Err(AuditError::Input(format!(
            "the dataset holds {n} images; k = {} neighbours and {} folds need more",
            opts.k, opts.folds
        )));
    }
    if !(opts.near_factor >= 0.0 && opts.near_factor.is_finite()) {
        return Err(AuditError::Input(format!(
            "the near-duplicate factor {} must be 0 or more",
            opts.near_factor
        )));
    }
    // Pixels: content hash and corruption statistics, in parallel.
    progress.start(n as u64, "reading");
    let pixels: Vec<(String, corruption::CorruptionStats, Vec<f32>)> = input
        .list
        .files
        .par_iter()
        .map(|f| {
            let (hash, img) = read_image(f)?;
            progress.inc(1);
            Ok((hash, corruption::stats(&img), pixel_vector(&img)))
        })
        .collect::<Result<_>>()?;
    progress.finish();

    // One embedding pass (cached).
    let (set, embed_stats) = embedder.embed(&input.list, progress)?;
    let labels: Vec<u32> = set.targets.iter().map(|&t| t as u32).collect();
    let k_classes = classes.len();

    // Label issues: K-fold out-of-sample probabilities of a linear head.
    let cfg = TrainConfig {
        epochs: opts.epochs,
        seed: opts.seed,
        ..Default::default()
    };
    let features = set.embeddings.to_device(embedder.device())?;
    let probs = kfold_pred_probs(&features, &labels, k_classes, opts.folds, &cfg, progress)?;
    let mask = find_label_issues(&probs.probs, &labels, k_classes, FilterBy::PruneByNoiseRate)?;
    let confidence = self_confidence(&probs.probs, &labels, k_classes)?;
    let suggested = suggested_labels(&probs.probs, &labels, k_classes)?;

    // k nearest other samples of every sample, unit-normalised embeddings, tiled search.
    let (_, dim) = set.embeddings.dims2()?;
    let flat = set.embeddings.flatten_all()?.to_vec1::<f32>()?;
    let unit = crate::distance::cpu::normalise_rows(&flat, dim);
    let neighbors = nearest_others(&unit, dim, opts.k)?;
    // The same in pixel space (resized, re-encoded copies are close there).
    let pixel_flat: Vec<f32> = pixels.iter().flat_map(|p| p.2.iter().copied()).collect();
    let pixel_neighbors = nearest_others(&pixel_flat, (PIXEL_SIDE * PIXEL_SIDE) as usize, opts.k)?;
    let nearest: Vec<f32> = neighbors
        .iter()
        .map(|v| v.first().map_or(f32::INFINITY, |p| p.1))
        .collect();
    let knn_disagreement: Vec<f32> = neighbors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let other = v.iter().filter(|&&(j, _)| labels[j] != labels[i]).count();
            other as f32 / v.len().max(1) as f32
        })
        .collect();

    // Duplicates and leaks.
    let hashes: Vec<String> = pixels.iter().map(|p| p.0.clone()).collect();
    let exact_groups = duplicates::exact_groups(&hashes);
    let pixel_nearest: Vec<f32> = pixel_neighbors
        .iter()
        .map(|v| v.first().map_or(f32::INFINITY, |p| p.1))
        .collect();
    let threshold = duplicates::near_threshold(&nearest, opts.near_factor);
    let pixel_threshold = duplicates::near_threshold(&pixel_nearest, opts.near_factor);
    let close: Vec<Vec<(usize, f32)>> = neighbors
        .iter()
        .zip(&pixel_neighbors)
        .map(|(e, p)| {
            e.iter()
                .filter(|x| x.1 <= threshold)
                .chain(p.iter().filter(|x| x.1 <= pixel_threshold))
                .map(|&(j, _)| (j, 0.0))
                .collect()
        })
        .collect();
    let near_groups = duplicates::near_groups(&close, 0.0);
    let all_groups: Vec<Vec<usize>> = exact_groups.iter().chain(&near_groups).cloned().collect();
    let split_leak = duplicates::leaks(&all_groups, &input.split);
    let day_leak = duplicates::leaks(&all_groups, &input.day);
    let group_of = |groups: &[Vec<usize>]| {
        let mut g = vec![None; n];
        for (gi, members) in groups.iter().enumerate() {
            for &i in members {
                g[i] = Some(gi);
            }
        }
        g
    };
    let exact_of = group_of(&exact_groups);
    let near_of = group_of(&near_groups);

    // Outliers: distance to the k-th neighbour as a robust z-score.
    let kth: Vec<f32> = outliers::kth_distance(
        &neighbors
            .iter()
            .map(|v| v.iter().map(|p| p.1).collect())
            .collect::<Vec<_>>(),
        opts.k,
    );
    let pixel_kth: Vec<f32> = outliers::kth_distance(
        &pixel_neighbors
            .iter()
            .map(|v| v.iter().map(|p| p.1).collect())
            .collect::<Vec<_>>(),
        opts.k,
    );
    let outlier_z: Vec<f32> = outliers::robust_z(&kth, 1e-6)
        .into_iter()
        .zip(outliers::robust_z(&pixel_kth, 1e-6))
        .map(|(a, b)| a.max(b))
        .collect();

    // Corruption: the pixel score as a robust z-score.
    let corruption_scores: Vec<f32> = pixels.iter().map(|p| p.1.score()).collect();
    let corruption_z = outliers::robust_z(&corruption_scores, 0.01);

    let records: Vec<AuditRecord> = (0..n)
        .map(|i| AuditRecord {
            index: i,
            id: input.list.ids.as_ref().and_then(|ids| ids.get(i).copied()),
            path: set.paths[i].clone(),
            split: input.split[i].clone(),
            day: input.day[i].clone(),
            given_label: classes[labels[i] as usize].clone(),
            suggested_label: classes[suggested[i] as usize].clone(),
            label_score: (1.0 - confidence[i]) as f32,
            knn_disagreement: knn_disagreement[i],
            label_issue: mask[i],
            sha256: hashes[i].clone(),
            exact_duplicate_group: exact_of[i],
            nearest_distance: nearest[i],
            pixel_nearest_distance: pixel_nearest[i],
            near_duplicate_group: near_of[i],
            near_duplicate: near_of[i].is_some(),
            split_leak: split_leak[i],
            day_leak: day_leak[i],
            outlier_distance: kth[i],
            outlier_score: outlier_z[i],
            outlier: outlier_z[i] > opts.outlier_z,
            corruption: pixels[i].1,
            corruption_score: corruption_scores[i],
            corrupted: corruption_z[i] > opts.corrupt_z,
        })
        .collect();

    let corruption_check = check_corruption(input, &records, progress)?;
    let summary = summarise(
        &records,
        classes,
        &labels,
        (threshold, pixel_threshold),
        exact_groups.len(),
        near_groups.len(),
        corruption_check,
        opts,
        &embedder.spec().name,
    );
    Ok(Audit {
        records,
        summary,
        near_groups,
        exact_groups,
        files: input.list.files.clone(),
        embed_stats,
    })
}

/// The corrupted-image score of the corrupted samples against their clean originals.
fn check_corruption(
    input: &AuditInput,
    records: &[AuditRecord],
    progress: &Progress,
) -> Result<Option<CorruptionCheck>> {
    if input.originals.is_empty() {
        return Ok(None);
    }
    progress.start(input.originals.len() as u64, "originals");
    let pairs: Vec<(f32, bool)> = input
        .originals
        .par_iter()
        .map(|(i, orig)| {
            let (_, clean) = read_image(orig)?;
            let (_, dirty) = read_image(&input.list.files[*i])?;
            progress.inc(1);
            Ok((corruption::stats(&clean).score(), clean != dirty))
        })
        .collect::<Result<_>>()?;
    progress.finish();
    let auc = |changed_only: bool| {
        let mut score = Vec::new();
        let mut positive = Vec::new();
        for ((i, _), &(clean, changed)) in input.originals.iter().zip(&pairs) {
            score.push(clean);
            positive.push(false);
            if changed || !changed_only {
                score.push(records[*i].corruption_score);
                positive.push(true);
            }
        }
        crate::train::eval::roc_auc(&score, &positive)
    };
    Ok(Some(CorruptionCheck {
        corrupted: pairs.len(),
        originals: pairs.len(),
        roc_auc: auc(false),
        changed: pairs.iter().filter(|p| p.1).count(),
        roc_auc_changed: pairs.iter().any(|p| p.1).then(|| auc(true)),
    }))
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    records: &[AuditRecord],
    classes: &[String],
    labels: &[u32],
    (threshold, pixel_threshold): (f32, f32),
    exact_groups: usize,
    near_groups: usize,
    corruption_check: Option<CorruptionCheck>,
    opts: &AuditOptions,
    backbone: &str,
) -> AuditSummary {
    let n = records.len();
    let per_class: Vec<ClassRates> = classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let rs: Vec<&AuditRecord> = records
                .iter()
                .filter(|r| labels[r.index] as usize == c)
                .collect();
            let count = |f: fn(&AuditRecord) -> bool| rs.iter().filter(|r| f(r)).count();
            ClassRates {
                class: name.clone(),
                samples: rs.len(),
                share: rs.len() as f64 / n.max(1) as f64,
                label_issues: count(|r| r.label_issue),
                exact_duplicates: count(|r| r.exact_duplicate_group.is_some()),
                near_duplicates: count(|r| r.near_duplicate),
                outliers: count(|r| r.outlier),
                corrupted: count(|r| r.corrupted),
            }
        })
        .collect();
    let max = per_class.iter().map(|c| c.samples).max().unwrap_or(0);
    let min = per_class.iter().map(|c| c.samples).min().unwrap_or(0);
    let count = |f: fn(&AuditRecord) -> bool| records.iter().filter(|r| f(r)).count();
    AuditSummary {
        samples: n,
        imbalance_ratio: if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        },
        classes: per_class,
        label_issues: count(|r| r.label_issue),
        exact_duplicate_groups: exact_groups,
        near_duplicate_groups: near_groups,
        near_duplicate_threshold: threshold,
        pixel_near_duplicate_threshold: pixel_threshold,
        split_leaks: count(|r| r.split_leak),
        day_leaks: count(|r| r.day_leak),
        outliers: count(|r| r.outlier),
        corrupted: count(|r| r.corrupted),
        corruption_check,
        options: AuditOptionsOut {
            k: opts.k,
            near_factor: opts.near_factor,
            outlier_z: opts.outlier_z,
            corrupt_z: opts.corrupt_z,
            folds: opts.folds,
            backbone: backbone.to_string(),
        },
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |error| AuditError::Write {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes `report.jsonl`, `summary.json`, `report.html` and its thumbnails under `out`, each
/// file atomically.
pub fn write_outputs(audit: &Audit, out: &Path, page_size: usize) -> Result<()> {
    std::fs::create_dir_all(out).map_err(write_error(out))?;
    let jsonl = out.join("report.jsonl");
    let mut text = Vec::new();
    for r in &audit.records {
        serde_json::to_writer(&mut text, r)
            .map_err(|e| write_error(&jsonl)(std::io::Error::other(e)))?;
        text.push(b'\n');
    }
    write_atomic(&jsonl, &text).map_err(write_error(&jsonl))?;
    let summary = out.join("summary.json");
    let body = serde_json::to_string_pretty(&audit.summary)
        .map_err(|e| write_error(&summary)(std::io::Error::other(e)))?
        + "\n";
    write_atomic(&summary, body.as_bytes()).map_err(write_error(&summary))?;
    report_html::write(audit, out, page_size)
}
