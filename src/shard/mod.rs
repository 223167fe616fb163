//! Sharding: deterministic parts of a row list, per-part ("partial") top-k searches with global
//! candidate ids, and their exact, order-independent merge.
//!
//! The contract, for any batch scheduler (and the Python/Ray bridge):
//! - [`ShardSpec`] `{ index, count }` (`I/N`) picks rows `[I·n/N, (I+1)·n/N)` of a list of n;
//! - [`search_shard`] finds every query's top-k among one part of the candidates and returns
//!   *global* candidate ids (a part with fewer than k eligible rows pads with the "none"
//!   marker: index −1, value +∞ for L1 / L2 and −∞ for cosine);
//! - a [`PartialTopK`] is that result with its [`TopKContext`] (k, metric, the queries' and the
//!   candidates' fingerprints), saved as a safetensors file ([`PartialTopK::save`]);
//! - [`merge_topk`] checks that the parts belong together (same context and shard count, every
//!   part exactly once) and merges them by (value, global id): the result does not depend on
//!   the order of the parts and equals the unsharded search bit for bit, ties included;
//! - per-sample scores of shards of samples are cut together by [`cut_shards`] (one pass over
//!   the small score arrays), and confident learning runs on per-shard probability files
//!   ([`crate::label_issues::masks_from_npy_shards`]).

mod file;
mod scores;
mod spec;
mod topk;

pub use scores::cut_shards;
pub use spec::ShardSpec;
pub use topk::{merge_topk, search_shard, search_shard_tensors, PartialTopK, TopKContext};

use std::path::PathBuf;

use crate::distance::DistanceError;

/// Why a shard spec, a partial result or a merge is refused; names the file (or part) and what
/// would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("invalid shard {0}")]
    BadSpec(String),
    #[error("nothing to merge: give at least one partial result")]
    NoParts,
    #[error(
        "{file} is shard {shard} of {count}, but {first} is of {first_count}: all parts must \
         come from the same split"
    )]
    CountMismatch {
        file: String,
        shard: ShardSpec,
        count: usize,
        first: String,
        first_count: usize,
    },
    #[error("{file} has {what} {found}, but {first} has {expected}: {why}")]
    Mismatch {
        file: String,
        first: String,
        what: &'static str,
        found: String,
        expected: String,
        why: &'static str,
    },
    #[error("{a} and {b} are both shard {shard}: each shard must be given once")]
    Overlap {
        shard: ShardSpec,
        a: String,
        b: String,
    },
    #[error("shard(s) {missing} of {count} missing: every shard 0..{count} must be given")]
    Missing { missing: String, count: usize },
    #[error("{file}: {message}")]
    BadPart { file: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Distance(#[from] DistanceError),
}
