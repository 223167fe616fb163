//! The model being served: a registered run loaded and self-tested, held in a slot that a
//! reload swaps atomically. A request takes its own `Arc` of the model when it starts, so a
//! swap never changes the model under a request in flight.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::error::ServeError;
use crate::ops::bf16_gemm::Precision;
use crate::registry::{Registry, TrainedRun};

/// A loaded run and what `/model` says about it.
pub struct LoadedModel {
    pub run: TrainedRun,
    pub info: ModelInfo,
}

/// What `GET /model` answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: u32,
    /// The spec followed (`NAME@ALIAS`, `NAME:VERSION` or `NAME`).
    pub spec: String,
    pub alias: Option<String>,
    pub backbone: String,
    /// The arithmetic of the backbone's products (`f32` or `bf16`).
    pub precision: &'static str,
    pub image_size: u32,
    pub classes: Vec<String>,
    /// When it was loaded (UTC).
    pub loaded_at: String,
    pub loaded_unix: f64,
    /// Load and self-test time.
    pub load_seconds: f64,
    /// The backbone of the model served before was kept (only the head changed).
    pub backbone_reused: bool,
    pub path: PathBuf,
}

/// Loads `spec` off the request path, keeping `previous`'s backbone when the new version was
/// trained on the same one.
pub(crate) fn load(
    registry: &Registry,
    spec: &str,
    device: &Device,
    cache_dir: Option<&std::path::Path>,
    previous: Option<&LoadedModel>,
    precision: Option<Precision>,
) -> Result<LoadedModel, ServeError> {
    let started = Instant::now();
    let run = TrainedRun::load_reusing(
        registry,
        spec,
        device,
        cache_dir,
        previous.map(|p| &p.run),
        precision,
    )
    .map_err(|error| ServeError::Model {
        spec: spec.to_owned(),
        error: Box::new(error),
    })?;
    let backbone_reused = previous.is_some_and(|p| run.shares_backbone_with(&p.run));
    let alias = crate::registry::parse_spec(spec)
        .ok()
        .and_then(|(_, v)| match v {
            crate::registry::VersionRef::Alias(a) => Some(a),
            _ => None,
        });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let info = ModelInfo {
        name: run.run.name.clone(),
        version: run.run.version,
        spec: spec.to_owned(),
        alias,
        backbone: run.record.params.backbone.clone(),
        precision: run.precision().name(),
        image_size: run.record.provenance.image_size,
        classes: run.classes().to_vec(),
        loaded_at: crate::store::now_utc(),
        loaded_unix: now,
        load_seconds: started.elapsed().as_secs_f64(),
        backbone_reused,
        path: run.run.path.clone(),
    };
    Ok(LoadedModel { run, info })
}

/// Runs the model on `images` (stored samples) and on one synthetic image: every answer must
/// be a probability distribution over the model's classes. Returns the number of images
/// predicted. A stored image that does not decode is skipped (the store may hold rejected or
/// moved files); the synthetic one always runs, so a model is never served untested.
pub(crate) fn self_test(model: &LoadedModel, images: &[PathBuf]) -> Result<usize, ServeError> {
    let pre = model.run.preprocess();
    let mut pixels = Vec::new();
    let mut n = 0;
    for path in images {
        if let Ok(img) = crate::data::decode::decode_image(path) {
            pixels.extend(pre.apply(&img));
            n += 1;
        }
    }
    let synthetic = image::RgbImage::from_fn(pre.width, pre.height, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    pixels.extend(pre.apply(&image::DynamicImage::ImageRgb8(synthetic)));
    n += 1;
    let fail = |message: String| ServeError::SelfTest {
        spec: format!("{}:{}", model.info.name, model.info.version),
        message,
    };
    let predictions = model
        .run
        .predict_pixels(&pixels, n)
        .map_err(|e| fail(e.to_string()))?;
    let classes = model.run.classes().len();
    for (i, p) in predictions.iter().enumerate() {
        let sum: f32 = p.probabilities.iter().sum();
        if p.probabilities.len() != classes
            || p.probabilities.iter().any(|v| !v.is_finite() || *v < 0.0)
            || (sum - 1.0).abs() > 1e-3
            || p.target >= classes
        {
            return Err(fail(format!(
                "image {i} of {n}: the output is not a distribution over the {classes} classes \
                 ({} values summing to {sum})",
                p.probabilities.len()
            )));
        }
    }
    if predictions.len() != n {
        return Err(fail(format!(
            "{} answers for {n} images",
            predictions.len()
        )));
    }
    Ok(n)
}

/// The slot holding the model served (none until the first load succeeds).
#[derive(Default)]
pub(crate) struct ModelSlot {
    current: RwLock<Option<Arc<LoadedModel>>>,
    /// Why no model is served, while none is.
    not_ready: RwLock<String>,
}

impl ModelSlot {
    /// The model served now, if any.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.read().ok().and_then(|m| m.clone())
    }

    /// Swaps `model` in; requests holding the previous one finish on it.
    pub fn swap(&self, model: Arc<LoadedModel>) {
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(model);
        }
    }

    /// Records why no model is served yet.
    pub fn set_not_ready(&self, reason: String) {
        if let Ok(mut r) = self.not_ready.write() {
            *r = reason;
        }
    }

    /// Why no model is served (empty when one is).
    pub fn not_ready(&self) -> String {
        if self.current().is_some() {
            return String::new();
        }
        self.not_ready.read().map(|r| r.clone()).unwrap_or_default()
    }
}
