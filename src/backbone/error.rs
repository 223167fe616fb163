//! Errors of the backbone layer: the zoo, weights (local or hub), the networks, the embedding
//! cache and the embedder. Each names the backbone, file or tensor at fault.

use std::path::{Path, PathBuf};

use super::hub::HubError;
use crate::data::DataError;

/// What can go wrong between a backbone's name and an image's embedding.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("unknown backbone {name:?}; valid: {valid}")]
    Unknown { name: String, valid: String },
    #[error("image size {0} is too small; 32 or more")]
    ImageTooSmall(u32),
    #[error("image size {0} is too large; {max} or less", max = super::limits::MAX_IMAGE_SIZE)]
    ImageSizeTooLarge(u32),
    #[error("--weights {0}: no such file")]
    NoWeightsFile(PathBuf),
    #[error("weights of {name} not found: no {file} in the assets folder {dir} (to fix: run scripts/fetch-assets.sh, which installs them there; or set BCCP_ASSETS to the assets folder, or BCCP_HOME to the folder above it; or pass --weights FILE.safetensors)")]
    WeightsNotFound {
        name: String,
        file: String,
        dir: PathBuf,
    },
    #[error("cannot read weights {path}: {message}")]
    BadWeights { path: PathBuf, message: String },
    #[error("{what} do not fit backbone {name}: {message}")]
    Mismatch {
        what: String,
        name: String,
        message: String,
    },
    #[error("backbone {name} produced {found}-d embeddings, the zoo says {expected}")]
    Width {
        name: String,
        found: usize,
        expected: usize,
    },
    #[error("backbone {name} produced a non-finite embedding (NaN or infinity) for image {}; the weights may be corrupt", image.display())]
    NonFinite { name: String, image: PathBuf },
    #[error("--precision {precision}: {message}; valid: --precision f32")]
    Precision { precision: String, message: String },
    #[error("backbone {0} has no classifier head; classify needs one (e.g. efficientnet_lite0)")]
    NoClassifier(String),
    #[error("the batch size must be 1 or more")]
    BatchSize,
    #[error("the batch size {batch} is too large; {max} or less")]
    BatchTooLarge { batch: usize, max: usize },
    #[error(
        "a batch of {batch} images at {width}×{height} needs about {need} (input and \
         activations), over the budget of {budget} (half the machine's memory); lower the \
         batch size or the image size",
        need = super::limits::gib(need),
        budget = super::limits::gib(budget)
    )]
    BatchMemory {
        batch: usize,
        width: u32,
        height: u32,
        need: u64,
        budget: u64,
    },
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("embedding cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error(transparent)]
    Hub(Box<HubError>),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl BackboneError {
    /// An I/O error while doing `action` ("read", "write", …) on `path`.
    pub fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |error| Self::Io {
            action,
            path: path.to_path_buf(),
            error,
        }
    }
}

impl From<HubError> for BackboneError {
    fn from(e: HubError) -> Self {
        Self::Hub(Box::new(e))
    }
}

/// Result alias of the backbone layer.
pub type Result<T> = std::result::Result<T, BackboneError>;
