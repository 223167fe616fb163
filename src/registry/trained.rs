//! A registered run rebuilt as a classifier: its head on its backbone (the fine-tuned one it
//! carries, or the pretrained weights it names), checked file by file before it predicts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::record::{files, RunRecord};
use super::{corrupt, io, Registry, RegistryError, RunDir};
use crate::backbone::cache::{hex, sha256};
use crate::backbone::{Backbone, Embedder, EmbedderConfig};
use crate::data::Preprocess;
use crate::ops::bf16_gemm::Precision;
use crate::train::Head;

/// One image's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Class index (the reference's `target`).
    pub target: usize,
    pub class: String,
    pub probability: f32,
    /// Every class's probability.
    pub probabilities: Vec<f32>,
}

/// A registered run loaded for prediction.
pub struct TrainedRun {
    pub run: RunDir,
    pub record: RunRecord,
    features: Features,
    pre: Preprocess,
    device: Device,
    head: Head,
    precision: Precision,
}

/// Where a run's features come from.
enum Features {
    /// The backbone fine-tuned with the run.
    Tuned(Box<Backbone>),
    /// The pretrained backbone the run names (shared with another run on the same weights and
    /// input size, see [`TrainedRun::load_reusing`]).
    Pretrained(Arc<Embedder>),
}

impl TrainedRun {
    /// Loads `spec` (`NAME`, `NAME:VERSION` or `NAME@ALIAS`) from `registry` onto `device`.
    /// Every file is checked: the JSON documents parse, `model.safetensors` has the checksum
    /// recorded at registration and a head whose class count matches `labels.json`, and the
    /// backbone weights are the ones the run was trained with.
    pub fn load(
        registry: &Registry,
        spec: &str,
        device: &Device,
        cache_dir: Option<&Path>,
    ) -> Result<Self, RegistryError> {
        Self::load_reusing(registry, spec, device, cache_dir, None, None)
    }

    /// [`Self::load`], keeping `previous`'s pretrained backbone when this run was trained on
    /// the same one (same zoo entry, weights SHA-256 and input size): a new head on the same
    /// features loads without reading or hashing the backbone weights again (what a prediction
    /// server does when only the head changed). The backbone's products run in `precision`
    /// ([`Backbone::set_precision`]: bf16 on a CUDA GPU or a CPU with AVX512-BF16, an error naming
    /// `--precision` elsewhere); by default in the one the run was trained in (its
    /// `params.json`), or f32 where this device cannot run that. A previous backbone is kept
    /// only in the same precision.
    pub fn load_reusing(
        registry: &Registry,
        spec: &str,
        device: &Device,
        cache_dir: Option<&Path>,
        previous: Option<&TrainedRun>,
        precision: Option<Precision>,
    ) -> Result<Self, RegistryError> {
        let run = registry.resolve(spec)?;
        let record = registry.read(&run)?;
        // By default the run's own precision, where this device can run it (else f32: a
        // bf16 run still serves on a GPU or an older CPU); asked for, it must run.
        let precision = precision.unwrap_or_else(|| match record.params.precision {
            Precision::Bf16
                if crate::ops::bf16_gemm::check_on(Precision::Bf16, device).is_err() =>
            {
                Precision::F32
            }
            recorded => recorded,
        });
        let model_path = run.path.join(files::MODEL);
        let bytes = std::fs::read(&model_path).map_err(io(&model_path))?;
        let sha = hex(&sha256(&bytes));
        if sha != record.provenance.model_sha256 {
            return Err(corrupt(
                &model_path,
                format!(
                    "its SHA-256 is {sha}, {} recorded {} at registration",
                    files::PROVENANCE,
                    record.provenance.model_sha256
                ),
            ));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| corrupt(&model_path, e))?;
        let head = head_of(&tensors, &model_path, &run.path, record.labels.len())?;
        let params = &record.params;
        let spec = crate::backbone::zoo::find(&params.backbone)?;
        let pre = spec.preprocess_at(Some(record.provenance.image_size))?;
        let reuse = previous.and_then(|p| match &p.features {
            Features::Pretrained(embedder)
                if p.device.same_device(device)
                    && p.record.params.backbone == params.backbone
                    && p.uses_features_of(
                        &record.provenance.weights_sha256,
                        record.provenance.image_size,
                        precision,
                    ) =>
            {
                Some(Arc::clone(embedder))
            }
            _ => None,
        });
        let features = match (Backbone::from_tuned(&spec, &tensors, device)?, reuse) {
            // The run carries its fine-tuned backbone: the pretrained weights are not needed.
            (Some(mut tuned), _) => {
                tuned.set_precision(precision)?;
                Features::Tuned(Box::new(tuned))
            }
            (None, Some(embedder)) => Features::Pretrained(embedder),
            (None, None) => {
                let embedder = Embedder::new(&EmbedderConfig {
                    weights: params.weights.clone(),
                    image_size: Some(record.provenance.image_size),
                    offline: true,
                    device: device.clone(),
                    cache_dir: cache_dir.map(Path::to_path_buf),
                    precision,
                    ..EmbedderConfig::new(&params.backbone)
                })?;
                if embedder.weights_sha256() != record.provenance.weights_sha256 {
                    return Err(RegistryError::WeightsChanged {
                        run: run.path.clone(),
                        detail: format!(
                            "with SHA-256 {} ({}), but {} has {}",
                            record.provenance.weights_sha256,
                            record.provenance.weights,
                            embedder.weights().display(),
                            embedder.weights_sha256()
                        ),
                    });
                }
                if !precision.is_f32() {
                    // The network loads on first use: a precision it cannot take fails here.
                    embedder.backbone()?;
                }
                Features::Pretrained(Arc::new(embedder))
            }
        };
        Ok(Self {
            run,
            record,
            features,
            pre,
            device: device.clone(),
            head,
            precision,
        })
    }

    /// The arithmetic of the backbone's products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The class names, in head order.
    pub fn classes(&self) -> &[String] {
        &self.record.labels
    }

    /// The classification head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Whether the run's features are the pretrained backbone's with weights `weights_sha256`
    /// at `image_size` in `precision` (so features computed elsewhere with those can go
    /// straight to [`Self::head`]).
    pub fn uses_features_of(
        &self,
        weights_sha256: &str,
        image_size: u32,
        precision: Precision,
    ) -> bool {
        matches!(self.features, Features::Pretrained(_))
            && self.precision == precision
            && self.record.provenance.weights_sha256 == weights_sha256
            && self.record.provenance.image_size == image_size
    }

    /// How images are turned into this run's input (size, normalisation).
    pub fn preprocess(&self) -> &Preprocess {
        &self.pre
    }

    /// Whether this run and `other` use the very same loaded backbone (one was loaded with
    /// [`Self::load_reusing`] from the other).
    pub fn shares_backbone_with(&self, other: &TrainedRun) -> bool {
        match (&self.features, &other.features) {
            (Features::Pretrained(a), Features::Pretrained(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Predicts every image (all must decode).
    pub fn predict(&self, images: &[PathBuf]) -> Result<Vec<Prediction>, RegistryError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let batch = crate::data::loader::load_batch(images, 0, &self.pre, false)?;
        self.predict_pixels(&batch.pixels, batch.indices.len())
    }

    /// Predicts `n` images already decoded and preprocessed with [`Self::preprocess`]
    /// (`pixels`: `n` CHW images one after the other, as [`Preprocess::apply`] writes them).
    pub fn predict_pixels(
        &self,
        pixels: &[f32],
        n: usize,
    ) -> Result<Vec<Prediction>, RegistryError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let shape = (n, 3, self.pre.height as usize, self.pre.width as usize);
        let x = Tensor::from_slice(pixels, shape, &Device::Cpu)?.to_device(&self.device)?;
        let features = match &self.features {
            Features::Tuned(model) => model.embed(&x)?,
            Features::Pretrained(embedder) => embedder.backbone()?.embed(&x)?,
        };
        let probs = candle_nn::ops::softmax_last_dim(&self.head.logits(&features)?)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|row| {
                let (target, probability) =
                    row.iter()
                        .copied()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |best, (k, p)| {
                            if p > best.1 {
                                (k, p)
                            } else {
                                best
                            }
                        });
                Prediction {
                    target,
                    class: self.record.labels.get(target).cloned().unwrap_or_default(),
                    probability,
                    probabilities: row,
                }
            })
            .collect())
    }
}

/// The head in a run's tensors, checked against the class count of `labels.json`.
fn head_of(
    tensors: &HashMap<String, Tensor>,
    model_path: &Path,
    run_path: &Path,
    classes: usize,
) -> Result<Head, RegistryError> {
    let get = |k: &str| {
        tensors
            .get(k)
            .cloned()
            .ok_or_else(|| corrupt(model_path, format!("no `{k}` tensor")))
    };
    let (weight, bias) = (get("head.weight")?, get("head.bias")?);
    for (name, t) in [("head.weight", &weight), ("head.bias", &bias)] {
        let values = t
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(corrupt(
                model_path,
                format!("`{name}` holds a NaN or infinite value (element {i})"),
            ));
        }
    }
    let (rows, _) = weight
        .dims2()
        .map_err(|_| corrupt(model_path, "`head.weight` is not a matrix"))?;
    if rows != classes || bias.dims() != [rows] {
        return Err(corrupt(
            &run_path.join(files::LABELS),
            format!(
                "it names {classes} classes but the head in {} has {rows} outputs (bias {:?})",
                files::MODEL,
                bias.dims()
            ),
        ));
    }
    Ok(Head::from_tensors(weight, bias)?)
}
