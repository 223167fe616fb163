//! Errors of `bccp experiment`: a bad experiment file (naming the table and field), a cell
//! whose settings do not hold together, a failed run (naming the cell and seed), and the
//! results' files.

use std::path::PathBuf;

use crate::pipeline::PipelineError;

/// What can go wrong in an experiment.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// A setting of the experiment file, named as in the file (`grid[0].method: …`).
    #[error("{0}")]
    Invalid(String),
    #[error("{path} is not a valid experiment file: {message}")]
    File { path: PathBuf, message: String },
    #[error("cell {cell}: {message}")]
    Cell { cell: String, message: String },
    #[error("cell {cell} seed {seed}")]
    Run {
        cell: String,
        seed: u64,
        #[source]
        source: Box<PipelineError>,
    },
    #[error(transparent)]
    Pipeline(#[from] Box<PipelineError>),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Results { path: PathBuf, message: String },
    #[error("drawing a chart failed: {0}")]
    Plot(String),
}

impl ExperimentError {
    /// An I/O error while doing `action` on `path`.
    pub fn io(action: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |error| Self::Io {
            action,
            path,
            error,
        }
    }
}

/// Result alias of the experiment runner.
pub type Result<T> = std::result::Result<T, ExperimentError>;

/// `ensure!` for experiment files: an [`ExperimentError::Invalid`] with the formatted message.
macro_rules! ensure_valid {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err($crate::experiment::ExperimentError::Invalid(format!($($fmt)*)));
        }
    };
}
pub(crate) use ensure_valid;
