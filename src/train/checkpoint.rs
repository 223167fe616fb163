//! Per-epoch training checkpoints, so that an interrupted run can continue (`bccp train
//! --resume`) and end with the very tensors and figures of an uninterrupted one.
//!
//! A checkpoint is a folder holding `epoch-K.safetensors` (the head's and every trained
//! backbone tensor's values, both Adam moments of every optimiser) and `checkpoint.json`
//! (the [`Fingerprint`] of what determines the training, the completed epochs K, the
//! optimisers' step counts and learning rates, the shuffle and dropout generators' states, the
//! per-epoch history so far, and the name and SHA-256 of the tensor file). Each file is
//! written through a temporary file and a rename, the tensors first: `checkpoint.json` is the
//! commit point, so a process killed mid-write leaves the previous checkpoint whole. Floats of
//! the JSON file are stored as their bits, so that a resumed history is bit-identical.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::adam::AdamState;
use super::EpochStats;
use crate::backbone::cache::{hex, sha256};
use crate::fsutil::write_atomic;
use crate::rng::Rng;

/// The file that commits a checkpoint.
pub const STATE_FILE: &str = "checkpoint.json";
const FORMAT: u32 = 1;

/// Why a checkpoint could not be written or read; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt or incomplete: {message}; remove {dir} to start over, or run without --resume")]
    Corrupt {
        path: PathBuf,
        dir: PathBuf,
        message: String,
    },
    #[error("checkpoint {path} was written by a training with different {what}; remove {dir} to start over, or run without --resume (which overwrites it)")]
    Mismatch {
        path: PathBuf,
        dir: PathBuf,
        what: String,
    },
    #[error("checkpoint {path}: {error}")]
    Tensor {
        path: PathBuf,
        error: candle_core::Error,
    },
}

type Result<T> = std::result::Result<T, CheckpointError>;

/// What determines a training's result, as named parts (settings as text, data as SHA-256
/// digests): a checkpoint is resumed only by a training with the same parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint(BTreeMap<String, String>);

impl Fingerprint {
    /// No parts yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds part `name` with a readable `value` (e.g. settings as JSON).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.to_owned(), value.into());
        self
    }

    /// Adds part `name` as the SHA-256 of `bytes`.
    pub fn with_digest(self, name: &str, bytes: &[u8]) -> Self {
        self.with(name, format!("sha256:{}", hex(&sha256(bytes))))
    }

    /// Adds part `name` as the SHA-256 of `values` (little-endian bytes).
    pub fn with_f32s(self, name: &str, values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.with_digest(name, &bytes)
    }

    /// Adds part `name` as the SHA-256 of `values` (little-endian bytes).
    pub fn with_u32s(self, name: &str, values: &[u32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.with_digest(name, &bytes)
    }

    /// The parts that differ from `saved`, each with both values.
    fn differences(&self, saved: &Fingerprint) -> String {
        let names: std::collections::BTreeSet<&String> =
            self.0.keys().chain(saved.0.keys()).collect();
        let none = String::from("(none)");
        names
            .into_iter()
            .filter(|n| self.0.get(*n) != saved.0.get(*n))
            .map(|n| {
                format!(
                    "{n} (checkpoint: {}; now: {})",
                    saved.0.get(n).unwrap_or(&none),
                    self.0.get(n).unwrap_or(&none)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A training loop's state after a completed epoch: what it needs to continue exactly.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// Completed epochs.
    pub epochs_done: usize,
    /// Their figures.
    pub history: Vec<EpochStats>,
    /// The order of the training samples after the last epoch's shuffle (each epoch shuffles
    /// the previous order).
    pub order: Vec<u32>,
    pub shuffle_rng: Rng,
    pub dropout_rng: Rng,
    /// The head's weight and bias.
    pub head: Vec<Tensor>,
    /// The trained backbone tensors (none for head-only training), in the loop's order.
    pub backbone: Vec<Tensor>,
    /// Every optimiser's state, in the loop's order (the head's first).
    pub optimisers: Vec<AdamState>,
}

/// One epoch of the history with its floats as bits.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedEpoch {
    epoch: usize,
    loss: u64,
    train_accuracy: u64,
    test_accuracy: Option<u64>,
}

/// An optimiser's scalars (its moments are tensors).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedAdam {
    step: usize,
    /// The learning rate's bits.
    lr: u64,
    /// Parameters (each with two moments).
    moments: usize,
}

/// `checkpoint.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: u32,
    fingerprint: Fingerprint,
    epochs_done: usize,
    history: Vec<SavedEpoch>,
    order: Vec<u32>,
    shuffle_rng: u64,
    dropout_rng: u64,
    head: usize,
    backbone: usize,
    optimisers: Vec<SavedAdam>,
    tensors: String,
    tensors_sha256: String,
}

/// The checkpoint folder of one training and the fingerprint of that training.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    fingerprint: Fingerprint,
}

/// Where a training loop saves a checkpoint after every epoch, the state it continues from
/// (`None`: from scratch) and, optionally, the epoch after whose checkpoint it stops (what is
/// returned then is the training so far; resuming from the checkpoint finishes it).
pub struct Checkpointing<'a> {
    pub checkpoint: &'a Checkpoint,
    pub start: Option<TrainState>,
    pub stop_after: Option<usize>,
}

fn tensor_file(epochs: usize) -> String {
    format!("epoch-{epochs}.safetensors")
}

impl Checkpoint {
    /// The checkpoint in folder `dir` of a training with `fingerprint`.
    pub fn new(dir: impl Into<PathBuf>, fingerprint: Fingerprint) -> Self {
        Self {
            dir: dir.into(),
            fingerprint,
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that commits it (`checkpoint.json`).
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn corrupt(&self, path: &Path, message: impl ToString) -> CheckpointError {
        CheckpointError::Corrupt {
            path: path.to_path_buf(),
            dir: self.dir.clone(),
            message: message.to_string(),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
        move |error| CheckpointError::Io {
            path: path.to_path_buf(),
            error,
        }
    }

    /// Writes `state` as the checkpoint (replacing the previous one).
    pub fn save(&self, state: &TrainState) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let name = tensor_file(state.epochs_done);
        let path = self.dir.join(&name);
        let tensor_err = |error| CheckpointError::Tensor {
            path: path.clone(),
            error,
        };
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).map_err(tensor_err);
        for (i, t) in state.head.iter().enumerate() {
            map.insert(format!("head.{i}"), cpu(t)?);
        }
        for (i, t) in state.backbone.iter().enumerate() {
            map.insert(format!("backbone.{i}"), cpu(t)?);
        }
        for (k, opt) in state.optimisers.iter().enumerate() {
            if opt.m.len() != opt.v.len() {
                return Err(self.corrupt(&path, "an optimiser with unequal moment counts"));
            }
            for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
                map.insert(format!("opt.{k}.m.{i}"), cpu(m)?);
                map.insert(format!("opt.{k}.v.{i}"), cpu(v)?);
            }
        }
        let bytes = safetensors::serialize(&map, None).map_err(|e| self.corrupt(&path, e))?;
        write_atomic(&path, &bytes).map_err(Self::io(&path))?;
        let bits = |x: f64| x.to_bits();
        let meta = Meta {
            format: FORMAT,
            fingerprint: self.fingerprint.clone(),
            epochs_done: state.epochs_done,
            history: state
                .history
                .iter()
                .map(|e| SavedEpoch {
                    epoch: e.epoch,
                    loss: bits(e.loss),
                    train_accuracy: bits(e.train_accuracy),
                    test_accuracy: e.test_accuracy.map(bits),
                })
                .collect(),
            order: state.order.clone(),
            shuffle_rng: state.shuffle_rng.state(),
            dropout_rng: state.dropout_rng.state(),
            head: state.head.len(),
            backbone: state.backbone.len(),
            optimisers: state
                .optimisers
                .iter()
                .map(|o| SavedAdam {
                    step: o.step,
                    lr: bits(o.lr),
                    moments: o.m.len(),
                })
                .collect(),
            tensors: name.clone(),
            tensors_sha256: hex(&sha256(&bytes)),
        };
        let json_path = self.state_path();
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| self.corrupt(&json_path, e))?;
        write_atomic(&json_path, &json).map_err(Self::io(&json_path))?;
        // Older tensor files are no longer referenced.
        let entries = std::fs::read_dir(&self.dir).map_err(Self::io(&self.dir))?;
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.starts_with("epoch-") && file.ends_with(".safetensors") && *file != name {
                let old = entry.path();
                std::fs::remove_file(&old).map_err(Self::io(&old))?;
            }
        }
        Ok(())
    }

    /// The saved state, when a checkpoint exists; an error naming the file when it cannot be
    /// read whole, or naming what differs when another training wrote it.
    pub fn load(&self) -> Result<Option<TrainState>> {
        let json_path = self.state_path();
        let text = match std::fs::read(&json_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&json_path)(e)),
        };
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| self.corrupt(&json_path, e))?;
        if meta.format != FORMAT {
            return Err(self.corrupt(
                &json_path,
                format!("format {} (this bccp reads {FORMAT})", meta.format),
            ));
        }
        if meta.fingerprint != self.fingerprint {
            return Err(CheckpointError::Mismatch {
                path: json_path,
                dir: self.dir.clone(),
                what: self.fingerprint.differences(&meta.fingerprint),
            });
        }
        if meta.tensors != tensor_file(meta.epochs_done) {
            return Err(self.corrupt(
                &json_path,
                format!("unexpected tensor file {:?}", meta.tensors),
            ));
        }
        let path = self.dir.join(&meta.tensors);
        let bytes = std::fs::read(&path).map_err(|e| self.corrupt(&path, e))?;
        let digest = hex(&sha256(&bytes));
        if digest != meta.tensors_sha256 {
            return Err(self.corrupt(
                &path,
                format!(
                    "SHA-256 {digest} of its {} bytes is not {STATE_FILE}'s {} (truncated or changed)",
                    bytes.len(),
                    meta.tensors_sha256
                ),
            ));
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| self.corrupt(&path, e))?;
        let mut take = |name: String| {
            tensors
                .remove(&name)
                .ok_or_else(|| self.corrupt(&path, format!("no tensor {name}")))
        };
        let head = (0..meta.head)
            .map(|i| take(format!("head.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let backbone = (0..meta.backbone)
            .map(|i| take(format!("backbone.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut optimisers = Vec::with_capacity(meta.optimisers.len());
        for (k, o) in meta.optimisers.iter().enumerate() {
            let (mut m, mut v) = (Vec::new(), Vec::new());
            for i in 0..o.moments {
                m.push(take(format!("opt.{k}.m.{i}"))?);
                v.push(take(format!("opt.{k}.v.{i}"))?);
            }
            optimisers.push(AdamState {
                step: o.step,
                lr: f64::from_bits(o.lr),
                m,
                v,
            });
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(self.corrupt(&path, format!("unexpected tensor {extra}")));
        }
        let float = f64::from_bits;
        Ok(Some(TrainState {
            epochs_done: meta.epochs_done,
            history: meta
                .history
                .iter()
                .map(|e| EpochStats {
                    epoch: e.epoch,
                    loss: float(e.loss),
                    train_accuracy: float(e.train_accuracy),
                    test_accuracy: e.test_accuracy.map(float),
                })
                .collect(),
            order: meta.order,
            shuffle_rng: Rng::from_state(meta.shuffle_rng),
            dropout_rng: Rng::from_state(meta.dropout_rng),
            head,
            backbone,
            optimisers,
        }))
    }

    /// Removes the checkpoint folder (nothing to do when there is none).
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Self::io(&self.dir)(e)),
            _ => Ok(()),
        }
    }
}

/// Wraps a checkpoint error as a tensor error (for loops returning candle's results).
pub(crate) fn as_candle(e: CheckpointError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epochs: usize) -> TrainState {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &dev).unwrap();
        TrainState {
            epochs_done: epochs,
            history: (1..=epochs)
                .map(|e| EpochStats {
                    epoch: e,
                    loss: 0.1 + 1.0 / (3.0 * e as f64),
                    train_accuracy: 2.0 / 3.0,
                    test_accuracy: (e % 2 == 0).then_some(0.1 + 0.2),
                })
                .collect(),
            order: vec![2, 0, 3, 1],
            shuffle_rng: Rng::new(5),
            dropout_rng: Rng::derive(5, 7),
            head: vec![t(&[3, 4]), t(&[3])],
            backbone: vec![t(&[7])],
            optimisers: vec![
                AdamState {
                    step: 9,
                    lr: 1e-3 * 0.95f64.powi(3),
                    m: vec![t(&[3, 4]), t(&[3])],
                    v: vec![t(&[3, 4]), t(&[3])],
                },
                AdamState {
                    step: 9,
                    lr: 1e-4,
                    m: vec![t(&[7])],
                    v: vec![t(&[7])],
                },
            ],
        }
    }

    fn bits(ts: &[Tensor]) -> Vec<Vec<u32>> {
        ts.iter()
            .map(|t| {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    }

    fn fingerprint(lr: &str) -> Fingerprint {
        Fingerprint::new()
            .with("training settings", format!("{{\"lr\":{lr}}}"))
            .with_f32s("training samples", &[1.0, 2.5])
            .with_u32s("training labels", &[0, 1])
    }

    #[test]
    fn saves_and_loads_every_part_bit_for_bit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let c = Checkpoint::new(&dir, fingerprint("0.001"));
        assert!(c.load().unwrap().is_none(), "no checkpoint yet");
        c.save(&state(1)).unwrap();
        let saved = state(2);
        c.save(&saved).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["checkpoint.json", "epoch-2.safetensors"],
            "older tensors removed"
        );
        let got = c.load().unwrap().expect("a checkpoint");
        assert_eq!(got.epochs_done, 2);
        assert_eq!(got.history, saved.history);
        assert_eq!(got.order, saved.order);
        assert_eq!(got.shuffle_rng.state(), saved.shuffle_rng.state());
        assert_eq!(got.dropout_rng.state(), saved.dropout_rng.state());
        assert_eq!(bits(&got.head), bits(&saved.head));
        assert_eq!(bits(&got.backbone), bits(&saved.backbone));
        assert_eq!(got.optimisers.len(), 2);
        for (a, b) in got.optimisers.iter().zip(&saved.optimisers) {
            assert_eq!((a.step, a.lr.to_bits()), (b.step, b.lr.to_bits()));
            assert_eq!(bits(&a.m), bits(&b.m));
            assert_eq!(bits(&a.v), bits(&b.v));
        }
        c.remove().unwrap();
        assert!(!dir.exists());
        c.remove().unwrap();
    }

    #[test]
    fn a_different_training_is_refused_naming_what_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        Checkpoint::new(&dir, fingerprint("0.001"))
            .save(&state(1))
            .unwrap();
        let other = fingerprint("0.01").with("backbone", "resnet18");
        let err = Checkpoint::new(&dir, other).load().unwrap_err().to_string();
        let json = dir.join(STATE_FILE);
        assert!(err.contains(&json.display().to_string()), "{err}");
        assert!(
            err.contains("training settings (checkpoint: {\"lr\":0.001}; now: {\"lr\":0.01})"),
            "{err}"
        );
        assert!(
            err.contains("backbone (checkpoint: (none); now: resnet18)"),
            "{err}"
        );
        assert!(!err.contains("training samples"), "{err}");
        assert!(err.contains("run without --resume"), "{err}");
    }

    #[test]
    fn corrupt_or_truncated_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let c = Checkpoint::new(&dir, fingerprint("0.001"));
        c.save(&state(3)).unwrap();
        // A truncated tensor file.
        let tensors = dir.join("epoch-3.safetensors");
        let bytes = std::fs::read(&tensors).unwrap();
        std::fs::write(&tensors, &bytes[..bytes.len() / 2]).unwrap();
        let err = c.load().unwrap_err().to_string();
        assert!(err.contains(&tensors.display().to_string()), "{err}");
        assert!(err.contains("truncated or changed"), "{err}");
        // A missing one.
        std::fs::remove_file(&tensors).unwrap();
        let err = c.load().unwrap_err().to_string();
        assert!(err.contains(&tensors.display().to_string()), "{err}");
        // A truncated state file.
        c.save(&state(3)).unwrap();
        let json = dir.join(STATE_FILE);
        let text = std::fs::read(&json).unwrap();
        std::fs::write(&json, &text[..text.len() - 10]).unwrap();
        let err = c.load().unwrap_err().to_string();
        assert!(err.contains(&json.display().to_string()), "{err}");
        assert!(err.contains("corrupt or incomplete"), "{err}");
        assert!(err.contains(&format!("remove {}", dir.display())), "{err}");
    }
}
