//! Hot reload: a thread follows the model spec (e.g. `NAME@champion`), checking every `poll`
//! (and on `POST /admin/reload`) which version it resolves to. When that moves, the new
//! version is loaded and self-tested off the request path, then swapped in atomically; requests
//! in flight finish on the model they started with. A version that fails to load or to pass
//! its self-test is not served: the old model stays, the failure is counted in
//! `bccp_model_reloads_total{result=…}`, and that version is not tried again until the alias
//! moves or a reload is forced.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Device;
use serde::Serialize;
use tokio::sync::oneshot;

use super::error::ServeError;
use super::metrics::{Metrics, Served};
use super::model::{self, LoadedModel, ModelSlot};
use crate::registry::Registry;
use crate::store::{SampleFilter, Store};

/// What a check did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// `unchanged`, `reloaded`, `failed` or `no_model` (the spec resolves to nothing yet).
    pub result: &'static str,
    /// The version served after the check.
    pub version: Option<u32>,
    pub message: Option<String>,
}

/// Asks the reload thread for a check now.
#[derive(Clone)]
pub(crate) struct Reloader {
    tx: Sender<oneshot::Sender<ReloadOutcome>>,
}

impl Reloader {
    /// A forced check; its outcome arrives on the returned receiver.
    pub fn force(&self) -> Option<oneshot::Receiver<ReloadOutcome>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).ok().map(|_| rx)
    }
}

/// What the reload thread works with.
pub(crate) struct Watch {
    pub registry: Registry,
    pub spec: String,
    pub device: Device,
    pub cache_dir: Option<PathBuf>,
    /// `None`: each version in the precision it was trained in.
    pub precision: Option<crate::ops::bf16_gemm::Precision>,
    pub slot: Arc<ModelSlot>,
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<Mutex<Box<dyn Store>>>>,
    pub self_test_images: usize,
    /// The last version that failed, not retried until the alias moves or a forced check.
    pub failed: Option<u32>,
    /// A remote source (MLflow alias, S3 run folder) synced into `registry` before each check.
    pub remote: Option<Arc<crate::tracking::remote::RemoteModel>>,
}

impl Watch {
    /// Stored images for a self-test: the first accepted samples whose files exist.
    fn test_images(&self) -> Vec<PathBuf> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        let filter = SampleFilter {
            accepted: Some(true),
            ..SampleFilter::default()
        };
        let rows = match store.lock() {
            Ok(mut s) => s
                .samples(&filter, self.self_test_images * 4)
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        rows.into_iter()
            .map(|s| PathBuf::from(s.image_path))
            .filter(|p| p.is_file())
            .take(self.self_test_images)
            .collect()
    }

    /// Syncs the remote source, if any, into the cache registry (the alias there follows the
    /// remote one; a failure leaves the cache as it was).
    pub fn sync(&self) -> Result<(), ServeError> {
        match &self.remote {
            None => Ok(()),
            Some(remote) => remote
                .sync(&self.registry)
                .map(drop)
                .map_err(|e| ServeError::Remote {
                    spec: remote.spec(),
                    message: e.to_string(),
                }),
        }
    }

    /// Loads and self-tests the spec's current version; on success it is served.
    pub fn load(&mut self) -> Result<Arc<LoadedModel>, (&'static str, ServeError)> {
        let started = std::time::Instant::now();
        let current = self.slot.current();
        let mut loaded = model::load(
            &self.registry,
            &self.spec,
            &self.device,
            self.cache_dir.as_deref(),
            current.as_deref(),
            self.precision,
        )
        .map_err(|e| ("load_failed", e))?;
        let images = self.test_images();
        model::self_test(&loaded, &images).map_err(|e| ("self_test_failed", e))?;
        // The backbone loads on its first batch: the self-test's.
        loaded.info.load_seconds = started.elapsed().as_secs_f64();
        if !loaded.info.backbone_reused {
            self.metrics.count_backbone_load();
        }
        let loaded = Arc::new(loaded);
        self.slot.swap(Arc::clone(&loaded));
        self.metrics.set_served(Served {
            model: loaded.info.name.clone(),
            version: loaded.info.version,
            alias: loaded.info.alias.clone().unwrap_or_default(),
            backbone: loaded.info.backbone.clone(),
            loaded_unix: loaded.info.loaded_unix,
        });
        self.metrics.count_reload("success");
        self.failed = None;
        Ok(loaded)
    }

    /// One check: reload when the spec resolves to another version than the one served.
    pub fn check(&mut self, forced: bool) -> ReloadOutcome {
        let current = self.slot.current();
        let served = current.as_ref().map(|m| m.info.version);
        if let Err(e) = self.sync() {
            // The remote version could not be brought in (unreachable, refused, artifacts
            // missing or corrupt): the model served, if any, stays.
            let message = e.to_string();
            eprintln!("[serve {}] warning: {message}", crate::store::now_utc());
            self.metrics.count_reload("sync_failed");
            if current.is_none() {
                self.slot.set_not_ready(message.clone());
            }
            return ReloadOutcome {
                result: if current.is_none() {
                    "no_model"
                } else {
                    "failed"
                },
                version: served,
                message: Some(message),
            };
        }
        let target = match self.registry.resolve(&self.spec) {
            Ok(run) => run.version,
            Err(e) => {
                let message = format!("model {}: {e}", self.spec);
                if current.is_none() {
                    self.slot.set_not_ready(message.clone());
                }
                return ReloadOutcome {
                    result: if current.is_none() {
                        "no_model"
                    } else {
                        "unchanged"
                    },
                    version: served,
                    message: Some(message),
                };
            }
        };
        if served == Some(target) {
            return ReloadOutcome {
                result: "unchanged",
                version: served,
                message: None,
            };
        }
        if !forced && self.failed == Some(target) {
            return ReloadOutcome {
                result: "failed",
                version: served,
                message: Some(format!(
                    "version {target} failed before; it is tried again when the alias moves or on POST /admin/reload"
                )),
            };
        }
        match self.load() {
            Ok(m) => {
                eprintln!(
                    "[serve {}] serving {}:{} ({}; loaded in {:.2} s{})",
                    crate::store::now_utc(),
                    m.info.name,
                    m.info.version,
                    self.spec,
                    m.info.load_seconds,
                    if m.info.backbone_reused {
                        ", backbone kept"
                    } else {
                        ""
                    }
                );
                ReloadOutcome {
                    result: "reloaded",
                    version: Some(m.info.version),
                    message: None,
                }
            }
            Err((kind, e)) => {
                self.metrics.count_reload(kind);
                self.failed = Some(target);
                let message = e.to_string();
                eprintln!(
                    "[serve {}] warning: version {target} of {} not served ({kind}): {message}",
                    crate::store::now_utc(),
                    self.spec
                );
                if current.is_none() {
                    self.slot.set_not_ready(message.clone());
                }
                ReloadOutcome {
                    result: "failed",
                    version: served,
                    message: Some(message),
                }
            }
        }
    }
}

/// Starts the reload thread: a check every `poll` and on each forced request; it ends when
/// every [`Reloader`] is dropped.
pub(crate) fn start(
    mut watch: Watch,
    poll: Duration,
) -> std::io::Result<(Reloader, JoinHandle<()>)> {
    let (tx, rx): (_, Receiver<oneshot::Sender<ReloadOutcome>>) = channel();
    let handle = std::thread::Builder::new()
        .name("bccp-reload".into())
        .spawn(move || loop {
            match rx.recv_timeout(poll) {
                Ok(reply) => {
                    let outcome = watch.check(true);
                    let _ = reply.send(outcome);
                }
                Err(RecvTimeoutError::Timeout) => {
                    watch.check(false);
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        })?;
    Ok((Reloader { tx }, handle))
}
