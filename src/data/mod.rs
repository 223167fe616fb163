//! Datasets: image-folder scanning, manifests, decoding and preprocessing, the Monday/Tuesday
//! preparation with its corruptions, IDX import and user-feedback label noise.
//! This layer knows nothing about models.

pub mod corrupt;
pub mod decode;
pub mod error;
pub mod idx;
pub mod image_list;
pub mod loader;
pub mod manifest;
pub mod noise;
pub mod prepare;
pub mod resize;
pub mod scan;
pub mod summary;
pub mod timestamp;

pub use corrupt::Corruption;
pub use decode::MAX_IMAGE_PIXELS;
pub use error::{DataError, Result};
pub use image_list::ImageList;
pub use loader::{BatchLoader, HostBatch, Preprocess};
pub use manifest::{read_manifest, read_manifest_for, write_manifest, Day, Record};
pub use noise::{user_feedback_labels, NoisyLabels};
pub use prepare::{prepare, DatasetInfo, PrepareOptions, PrepareSummary};
pub use scan::{ImageFolder, ImageItem, SkipCount, SkipReason, SkippedEntry};
pub use summary::DatasetSummary;
