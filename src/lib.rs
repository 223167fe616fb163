//! bccp: self-cleansing of noisy real-time image data before a classifier is re-trained.
//!
//! The method (Bayesian cut-off + closest-pair replay) and the architecture are described in
//! `DESIGN.md`; data flows `data` → `backbone` → `sampling` / `cutoff` → `train` → `registry`.

pub mod alloc;
pub mod audit;
pub mod backbone;
pub mod baselines;
pub mod cleanse;
pub mod cleanse_features;
pub mod config;
pub mod cutoff;
pub mod data;
pub mod device;
pub mod distance;
pub mod embeddings;
pub mod experiment;
pub mod fsutil;
pub mod hash;
pub mod label_issues;
pub mod npy;
pub mod ops;
pub mod paths;
pub mod pipeline;
pub mod progress;
pub mod registry;
pub mod retrain;
pub mod rng;
pub mod runtime;
pub mod s3;
pub mod sampling;
pub mod serve;
pub mod shard;
pub mod store;
pub mod stream;
pub mod tracking;
pub mod train;
pub mod verify;

#[cfg(test)]
mod testutil;
