//! Batched embedding of a dataset, with the cache, and the embedding file format:
//! a safetensors file holding `embeddings` (f32 [N, D]) and `targets` (i64 [N]) (plus `ids`
//! when the images came from a manifest), with the model, weights hash, classes and image
//! paths (in order) in its metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cache::{sha256, Digest32, EmbeddingCache};
use super::Backbone;
use crate::data::loader::DecodeThreads;
use crate::data::{BatchLoader, ImageFolder, Preprocess};
use crate::progress::Progress;

/// Images to embed: absolute paths, labels, and the paths to record (relative to the dataset).
#[derive(Debug, Clone, Default)]
pub struct ImageList {
    pub files: Vec<PathBuf>,
    pub recorded_paths: Vec<String>,
    pub targets: Vec<i64>,
    /// Manifest ids, when the list came from a manifest.
    pub ids: Option<Vec<i64>>,
    pub classes: Vec<String>,
}

impl ImageList {
    /// All images of an image folder, in scan order.
    pub fn from_folder(root: &Path) -> Result<Self> {
        let folder = ImageFolder::scan(root)?;
        Ok(Self {
            files: folder.items.iter().map(|i| root.join(&i.path)).collect(),
            recorded_paths: folder
                .items
                .iter()
                .map(|i| i.path.to_string_lossy().replace('\\', "/"))
                .collect(),
            targets: folder.items.iter().map(|i| i.target as i64).collect(),
            ids: None,
            classes: folder.classes,
        })
    }

    /// The records of a JSON Lines manifest; image paths are relative to the manifest's folder,
    /// class names come from `dataset.json` beside it when present.
    pub fn from_manifest(path: &Path) -> Result<Self> {
        let records = crate::data::read_manifest(path)?;
        let root = path.parent().unwrap_or(Path::new("."));
        let classes = crate::data::prepare::read_dataset_info(root)
            .map(|i| i.classes)
            .unwrap_or_default();
        Ok(Self {
            files: records.iter().map(|r| root.join(&r.image_path)).collect(),
            recorded_paths: records.iter().map(|r| r.image_path.clone()).collect(),
            targets: records.iter().map(|r| r.target as i64).collect(),
            ids: Some(records.iter().map(|r| r.id as i64).collect()),
            classes,
        })
    }

    /// A folder or a `.jsonl` manifest.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_file() {
            Self::from_manifest(path)
        } else {
            Self::from_folder(path)
        }
    }
}

/// Embeddings of a dataset, in the order of its image list (unreadable images skipped).
#[derive(Debug, Clone)]
pub struct EmbeddingSet {
    /// [N, D] f32 on the CPU.
    pub embeddings: Tensor,
    pub targets: Vec<i64>,
    pub ids: Option<Vec<i64>>,
    pub paths: Vec<String>,
    pub classes: Vec<String>,
    pub model: String,
    pub weights_sha256: String,
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
}

/// Options of [`embed_images`].
pub struct EmbedOptions<'a> {
    pub batch: usize,
    pub device: &'a Device,
    pub skip_bad: bool,
    /// `None` bypasses the cache.
    pub cache_dir: Option<&'a Path>,
    pub progress: &'a Progress,
}

/// Embeds `list` with the backbone `load_backbone` returns, which is only called when some
/// embedding is not in the cache (a full cache hit never loads the model).
pub fn embed_images(
    list: &ImageList,
    model: &str,
    weights_sha256: &str,
    pre: &Preprocess,
    dim: usize,
    load_backbone: impl FnOnce() -> Result<Backbone>,
    opts: &EmbedOptions,
) -> Result<(EmbeddingSet, EmbedStats)> {
    let digests: Vec<std::result::Result<Digest32, (PathBuf, String)>> = list
        .files
        .par_iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| sha256(&b))
                .map_err(|e| (p.clone(), e.to_string()))
        })
        .collect();
    let mut stats = EmbedStats::default();
    let mut cache = match opts.cache_dir {
        Some(dir) => Some(EmbeddingCache::open(dir, model, weights_sha256, pre, dim)?),
        None => None,
    };
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; list.files.len()];
    let mut missing = Vec::new();
    for (i, digest) in digests.iter().enumerate() {
        match digest {
            Ok(d) => match cache.as_ref().and_then(|c| c.get(d)) {
                Some(values) => {
                    rows[i] = Some(values.to_vec());
                    stats.cached += 1;
                }
                None => missing.push(i),
            },
            Err((path, why)) => bail!("cannot read image {}: {why}", path.display()),
        }
    }
    if !missing.is_empty() {
        let backbone = load_backbone()?;
        let paths: Vec<PathBuf> = missing.iter().map(|&i| list.files[i].clone()).collect();
        opts.progress.start(paths.len() as u64, "embedding");
        let mut fresh = Vec::with_capacity(missing.len());
        // candle's CPU ops synchronise their threads with spinning barriers that decode
        // threads would stall; the channels-last engine's tasks share the pool well (measured
        // on 2 cores, 3000 images at 64×64: 1.25 s → 1.18 s for the whole `bccp train`).
        let threads = if opts.device.is_cpu() && !backbone.runs_channels_last() {
            DecodeThreads::Calling
        } else {
            DecodeThreads::Rayon
        };
        for batch in BatchLoader::with_threads(paths, opts.batch, *pre, opts.skip_bad, threads)? {
            let batch = batch?;
            stats.skipped.extend(batch.skipped.iter().cloned());
            if !batch.indices.is_empty() {
                let x = batch.to_tensor(pre, opts.device)?;
                let y = backbone
                    .embed(&x)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                let (n, d) = y.dims2()?;
                if d != dim {
                    bail!("model {model} produced {d}-d embeddings, the zoo says {dim}");
                }
                let values = y.flatten_all()?.to_vec1::<f32>()?;
                for (k, &pos) in batch.indices.iter().enumerate().take(n) {
                    let i = missing[pos];
                    let row = values[k * d..(k + 1) * d].to_vec();
                    if let Ok(digest) = &digests[i] {
                        fresh.push((*digest, row.clone()));
                    }
                    rows[i] = Some(row);
                }
            }
            opts.progress
                .inc((batch.indices.len() + batch.skipped.len()) as u64);
        }
        opts.progress.finish();
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
    };
    Ok((set, stats))
}

impl EmbeddingSet {
    /// Writes the set as safetensors (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = vec![
            ("embeddings".to_owned(), self.embeddings.clone()),
            (
                "targets".to_owned(),
                Tensor::new(self.targets.as_slice(), &Device::Cpu)?,
            ),
        ];
        if let Some(ids) = &self.ids {
            tensors.push(("ids".to_owned(), Tensor::new(ids.as_slice(), &Device::Cpu)?));
        }
        let metadata: BTreeMap<&str, String> = [
            ("model", self.model.clone()),
            ("weights_sha256", self.weights_sha256.clone()),
            ("paths", serde_json::to_string(&self.paths)?),
            ("classes", serde_json::to_string(&self.classes)?),
        ]
        .into_iter()
        .collect();
        let bytes = serialize_safetensors(&tensors, &metadata)?;
        crate::fsutil::write_atomic(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads an embedding file written by [`EmbeddingSet::save`] (or any safetensors file with
    /// `embeddings` f32 [N, D] and `targets` i64 [N]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("cannot read tensors of {}", path.display()))?;
        let get = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .with_context(|| format!("{} has no `{name}` tensor", path.display()))
        };
        let embeddings = get("embeddings")?;
        let (n, _) = embeddings.dims2().with_context(|| {
            format!(
                "{}: `embeddings` must be [N, D], found {:?}",
                path.display(),
                embeddings.dims()
            )
        })?;
        if embeddings.dtype() != DType::F32 {
            bail!(
                "{}: `embeddings` must be f32, found {:?}",
                path.display(),
                embeddings.dtype()
            );
        }
        let targets = get("targets")?;
        if targets.dims() != [n] || targets.dtype() != DType::I64 {
            bail!(
                "{}: `targets` must be i64 [{n}], found {:?} {:?}",
                path.display(),
                targets.dtype(),
                targets.dims()
            );
        }
        let ids = match tensors.get("ids") {
            Some(t) => Some(t.to_vec1::<i64>()?),
            None => None,
        };
        let meta = meta.metadata().clone().unwrap_or_default();
        let json_list = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(text) => serde_json::from_str(text).with_context(|| {
                    format!("{}: metadata `{key}` is not a JSON list", path.display())
                }),
                None => Ok(Vec::new()),
            }
        };
        Ok(Self {
            embeddings,
            targets: targets.to_vec1::<i64>()?,
            ids,
            paths: json_list("paths")?,
            classes: json_list("classes")?,
            model: meta.get("model").cloned().unwrap_or_default(),
            weights_sha256: meta.get("weights_sha256").cloned().unwrap_or_default(),
        })
    }
}

/// Serialises tensors (in the given order) and metadata (sorted by key) as safetensors, so
/// equal contents give equal bytes (the `safetensors` crate takes metadata as a `HashMap`,
/// whose order varies between runs).
fn serialize_safetensors(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<&str, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut data = Vec::new();
    for (name, tensor) in tensors {
        let (dtype, bytes) = match tensor.dtype() {
            DType::F32 => (
                "F32",
                tensor
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            DType::I64 => (
                "I64",
                tensor
                    .flatten_all()?
                    .to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => bail!("cannot write {other:?} tensor {name}"),
        };
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": tensor.dims(), "data_offsets": [data.len(), data.len() + bytes.len()] }),
        );
        data.extend_from_slice(&bytes);
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}
