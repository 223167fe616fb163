//! One [`Embedder`] owns everything between a backbone's name and a dataset's embeddings:
//! the zoo entry, the preprocessing (with the `image_size` override), the weights file and its
//! hash, the device, and the embedding cache. Every command that embeds images goes through it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cache::{sha256, weights_hash, Digest32, EmbeddingCache};
use super::error::{BackboneError, Result};
use super::zoo::{self, BackboneSpec};
use super::{resolve_weights, Backbone};
use crate::data::decode::read_image_file;
use crate::data::loader::DecodeThreads;
use crate::data::{BatchLoader, DataError, ImageList, Preprocess};
use crate::embeddings::EmbeddingSet;
use crate::ops::bf16_gemm::Precision;
use crate::progress::Progress;

/// What an [`Embedder`] is built from.
#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    /// A backbone of the zoo.
    pub backbone: String,
    /// Local weights instead of the zoo's source.
    pub weights: Option<PathBuf>,
    /// Input size instead of the backbone's (e.g. 64 for 28×28 images).
    pub image_size: Option<u32>,
    /// Never touch the network for hub weights.
    pub offline: bool,
    pub device: Device,
    /// The embedding cache folder; `None` bypasses the cache.
    pub cache_dir: Option<PathBuf>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Skip images that cannot be decoded instead of failing.
    pub skip_bad: bool,
    /// The arithmetic of the channels-last engine's products ([`Backbone::set_precision`]).
    pub precision: Precision,
}

impl EmbedderConfig {
    /// `backbone` with its defaults: zoo weights, the backbone's input size, the CPU, no cache,
    /// batches of 64.
    pub fn new(backbone: &str) -> Self {
        Self {
            backbone: backbone.to_owned(),
            weights: None,
            image_size: None,
            offline: false,
            device: Device::Cpu,
            cache_dir: None,
            batch_size: 64,
            skip_bad: false,
            precision: Precision::F32,
        }
    }
}

/// A backbone ready to embed: resolved, hashed, loaded on first use.
pub struct Embedder {
    config: EmbedderConfig,
    spec: BackboneSpec,
    pre: Preprocess,
    weights: PathBuf,
    weights_sha256: String,
    backbone: OnceLock<Backbone>,
}

impl Embedder {
    /// Resolves the backbone, its preprocessing and its weights (hub or local), and hashes the
    /// weights (memoised in the cache folder). The network itself loads on first use.
    pub fn new(config: &EmbedderConfig) -> Result<Self> {
        let spec = zoo::find(&config.backbone)?;
        let pre = spec.preprocess_at(config.image_size)?;
        super::limits::check_batch(&pre, config.batch_size, false)?;
        let weights = resolve_weights(&spec, config.weights.as_deref(), config.offline)?;
        let weights_sha256 = weights_hash(config.cache_dir.as_deref(), &weights)?;
        Ok(Self {
            config: config.clone(),
            spec,
            pre,
            weights,
            weights_sha256,
            backbone: OnceLock::new(),
        })
    }

    /// The zoo entry.
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    /// The preprocessing images go through.
    pub fn preprocess(&self) -> &Preprocess {
        &self.pre
    }

    /// The weights file.
    pub fn weights(&self) -> &Path {
        &self.weights
    }

    /// SHA-256 of the weights file.
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.config.device
    }

    /// The arithmetic of the network's products.
    pub fn precision(&self) -> Precision {
        self.config.precision
    }

    /// The network, loaded on the first call.
    pub fn backbone(&self) -> Result<&Backbone> {
        if let Some(b) = self.backbone.get() {
            return Ok(b);
        }
        let mut loaded = Backbone::load(&self.spec, &self.weights, &self.config.device)?;
        loaded.set_precision(self.config.precision)?;
        Ok(self.backbone.get_or_init(|| loaded))
    }

    /// Softmax over the ImageNet classes of the backbone's own classifier, per image (all
    /// must decode); an error for backbones without one.
    pub fn imagenet_probs(&self, images: &[PathBuf]) -> Result<Vec<Vec<f32>>> {
        let batch = crate::data::loader::load_batch(images, 0, &self.pre, false)?;
        let x = batch.to_tensor(&self.pre, &self.config.device)?;
        let Some(logits) = self.backbone()?.logits(&x)? else {
            return Err(BackboneError::NoClassifier(self.spec.name.clone()));
        };
        Ok(candle_nn::ops::softmax_last_dim(&logits)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?)
    }

    /// Embeds `list` (through the cache when there is one); the network is only loaded when
    /// some embedding is not cached.
    pub fn embed(
        &self,
        list: &ImageList,
        progress: &Progress,
    ) -> Result<(EmbeddingSet, EmbedStats)> {
        embed_images(self, list, progress)
    }
}

/// How an embedding run went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbedStats {
    /// Embeddings served by the cache.
    pub cached: usize,
    /// Embeddings computed by the model.
    pub computed: usize,
    /// Unreadable images skipped (with `skip_bad`), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// The cache file read and appended to (`None` without a cache).
    pub cache_file: Option<PathBuf>,
    /// Corrupt records of the cache file (failed checksum, non-finite values) that were
    /// discarded; their images, when needed, were computed again.
    pub discarded: usize,
    /// Each returned row's position in the image list (all of them unless some were skipped).
    pub kept: Vec<usize>,
}

impl EmbedStats {
    /// The one warning line a command shows when corrupt cache records were discarded.
    pub fn cache_warning(&self) -> Option<String> {
        let file = self.cache_file.as_ref().filter(|_| self.discarded > 0)?;
        let n = self.discarded;
        Some(format!(
            "warning: embedding cache {}: {n} corrupt record{} discarded and recomputed",
            file.display(),
            if n == 1 { "" } else { "s" }
        ))
    }
}

/// Embeds `list` with `embedder`; a full cache hit never loads the network.
fn embed_images(
    embedder: &Embedder,
    list: &ImageList,
    progress: &Progress,
) -> Result<(EmbeddingSet, EmbedStats)> {
    let (model, weights_sha256, pre, dim) = (
        embedder.spec.name.as_str(),
        embedder.weights_sha256.as_str(),
        &embedder.pre,
        embedder.spec.embedding_dim,
    );
    let cfg = &embedder.config;
    // Only regular files are read (a FIFO would block forever): `read_image_file` refuses
    // the rest as bad images, which `skip_bad` skips.
    let reads: Vec<std::result::Result<Digest32, DataError>> = list
        .files
        .par_iter()
        .map(|p| read_image_file(p).map(|b| sha256(&b)))
        .collect();
    let mut stats = EmbedStats::default();
    let mut cache = match &cfg.cache_dir {
        Some(dir) => Some(EmbeddingCache::open(
            dir,
            model,
            weights_sha256,
            pre,
            dim,
            cfg.precision,
        )?),
        None => None,
    };
    if let Some(cache) = &cache {
        stats.cache_file = Some(cache.path().to_path_buf());
        stats.discarded = cache.discarded();
    }
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; list.files.len()];
    let mut digests: Vec<Option<Digest32>> = Vec::with_capacity(list.files.len());
    let mut missing = Vec::new();
    for (i, read) in reads.into_iter().enumerate() {
        match read {
            Ok(d) => {
                match cache.as_ref().and_then(|c| c.get(&d)) {
                    Some(values) => {
                        rows[i] = Some(values.to_vec());
                        stats.cached += 1;
                    }
                    None => missing.push(i),
                }
                digests.push(Some(d));
            }
            Err(e) if cfg.skip_bad && e.is_bad_image() => {
                stats.skipped.push((list.files[i].clone(), e.to_string()));
                digests.push(None);
            }
            Err(DataError::Io { path, error }) => {
                return Err(BackboneError::Io {
                    action: "read image",
                    path,
                    error,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !missing.is_empty() {
        let backbone = embedder.backbone()?;
        let paths: Vec<PathBuf> = missing.iter().map(|&i| list.files[i].clone()).collect();
        progress.start(paths.len() as u64, "embedding");
        let mut fresh = Vec::with_capacity(missing.len());
        // candle's CPU ops synchronise their threads with spinning barriers that decode
        // threads would stall; the channels-last engine's tasks share the pool well (measured
        // on 2 cores, 3000 images at 64×64: 1.25 s → 1.18 s for the whole `bccp train`).
        let threads = if cfg.device.is_cpu() && !backbone.runs_channels_last() {
            DecodeThreads::Calling
        } else {
            DecodeThreads::Rayon
        };
        for batch in BatchLoader::with_threads(paths, cfg.batch_size, *pre, cfg.skip_bad, threads)?
        {
            let batch = batch?;
            stats.skipped.extend(batch.skipped.iter().cloned());
            if !batch.indices.is_empty() {
                let x = batch.to_tensor(pre, &cfg.device)?;
                let y = backbone
                    .embed(&x)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                let (n, d) = y.dims2()?;
                if d != dim {
                    return Err(BackboneError::Width {
                        name: model.to_owned(),
                        found: d,
                        expected: dim,
                    });
                }
                let values = y.flatten_all()?.to_vec1::<f32>()?;
                for (k, &pos) in batch.indices.iter().enumerate().take(n) {
                    let i = missing[pos];
                    let row = values[k * d..(k + 1) * d].to_vec();
                    // Never cached nor returned: a NaN would poison every later run.
                    if !row.iter().all(|v| v.is_finite()) {
                        return Err(BackboneError::NonFinite {
                            name: model.to_owned(),
                            image: list.files[i].clone(),
                        });
                    }
                    if let Some(digest) = &digests[i] {
                        fresh.push((*digest, row.clone()));
                    }
                    rows[i] = Some(row);
                }
            }
            progress.inc((batch.indices.len() + batch.skipped.len()) as u64);
        }
        progress.finish();
        stats.computed = fresh.len();
        if let Some(cache) = cache.as_mut() {
            cache.append(&fresh)?;
        }
    }
    let kept: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].is_some()).collect();
    let mut flat = Vec::with_capacity(kept.len() * dim);
    for &i in &kept {
        flat.extend_from_slice(rows[i].as_deref().unwrap_or_default());
    }
    let set = EmbeddingSet {
        embeddings: Tensor::from_vec(flat, (kept.len(), dim), &Device::Cpu)?,
        targets: kept.iter().map(|&i| list.targets[i]).collect(),
        ids: list
            .ids
            .as_ref()
            .map(|ids| kept.iter().map(|&i| ids[i]).collect()),
        paths: kept
            .iter()
            .map(|&i| list.recorded_paths[i].clone())
            .collect(),
        classes: list.classes.clone(),
        model: model.to_owned(),
        weights_sha256: weights_sha256.to_owned(),
        list_sha256: list.fingerprint(),
        shard: None,
    };
    stats.kept = kept;
    Ok((set, stats))
}
