//! Errors of the data layer; each names the file or value at fault and what would be valid.

use std::path::PathBuf;

/// What can go wrong when reading, writing or preparing an image dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset folder {0} does not exist")]
    MissingRoot(PathBuf),
    #[error("{0} is not a folder")]
    NotADirectory(PathBuf),
    #[error("dataset folder {0} has no class folders (expected ROOT/<class>/<image file>)")]
    NoClasses(PathBuf),
    #[error("class folder {0} holds no images (accepted: {exts})", exts = crate::data::scan::IMAGE_EXTENSIONS.join(", "))]
    EmptyClass(PathBuf),
    #[error("cannot decode image {path}: {message}")]
    Decode { path: PathBuf, message: String },
    #[error(
        "image {path} is {width}×{height} = {pixels} pixels, over the limit \
         MAX_IMAGE_PIXELS = {max}; it may be a decompression bomb",
        pixels = u64::from(*.width) * u64::from(*.height),
        max = crate::data::decode::MAX_IMAGE_PIXELS
    )]
    ImageTooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path} is not a regular file but {kind}; only regular files are read as images")]
    NotAFile { path: PathBuf, kind: &'static str },
    /// A symbolic link whose target is missing or that loops; the OS error is in the message
    /// (not a `source`, so a chain printer shows it once).
    #[error("cannot read image {path}: broken symbolic link ({error})")]
    BrokenLink {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Manifest {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Idx { path: PathBuf, message: String },
    #[error("output folder {0} is not empty; pass --force to replace it")]
    OutputNotEmpty(PathBuf),
    #[error("invalid {name} {value}: {expected}")]
    InvalidValue {
        name: &'static str,
        value: String,
        expected: String,
    },
}

impl DataError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    /// True for an image that cannot be decoded, is over the size limit, is not a regular file
    /// or is a broken link: the errors that `skip_bad` skips.
    pub fn is_bad_image(&self) -> bool {
        matches!(
            self,
            Self::Decode { .. }
                | Self::ImageTooLarge { .. }
                | Self::NotAFile { .. }
                | Self::BrokenLink { .. }
        )
    }

    /// An invalid parameter value and what would be valid.
    pub fn invalid(name: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        Self::InvalidValue {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// Result alias of the data layer.
pub type Result<T> = std::result::Result<T, DataError>;
