//! What every handler shares, behind one `Arc`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::batcher::Batcher;
use super::config::ServeConfig;
use super::kafkalog::KafkaLog;
use super::metrics::Metrics;
use super::model::ModelSlot;
use super::predlog::PredictionLog;
use super::reload::Reloader;
use crate::store::Store;

/// The server's shared state (cheap to clone).
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub config: ServeConfig,
    /// `--image-root`, canonical.
    pub image_root: Option<PathBuf>,
    pub model: Arc<ModelSlot>,
    pub metrics: Arc<Metrics>,
    pub batcher: Batcher,
    pub log: Option<PredictionLog>,
    /// `--kafka`: every prediction published to a topic too.
    pub kafka: Option<KafkaLog>,
    /// A connection for feedback writes and dashboard reads (the prediction log has its own).
    pub store: Option<Arc<Mutex<Box<dyn Store>>>>,
    pub reloader: Reloader,
    /// Where images are decoded and batches run: the server's own threads, so work of the
    /// same process on rayon's global pool (a retrain cycle in `bccp up`) does not queue
    /// requests behind it.
    pub pool: Arc<rayon::ThreadPool>,
    /// `--review-audit`: the audit whose label issues `/review` shows (else the latest
    /// cycle's flags).
    pub review_audit: Option<Arc<super::review::AuditEntries>>,
    requests: AtomicU64,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ServeConfig,
        image_root: Option<PathBuf>,
        model: Arc<ModelSlot>,
        metrics: Arc<Metrics>,
        batcher: Batcher,
        log: Option<PredictionLog>,
        kafka: Option<KafkaLog>,
        store: Option<Arc<Mutex<Box<dyn Store>>>>,
        reloader: Reloader,
        pool: Arc<rayon::ThreadPool>,
        review_audit: Option<Arc<super::review::AuditEntries>>,
    ) -> Self {
        Self(Arc::new(Inner {
            config,
            image_root,
            model,
            metrics,
            batcher,
            log,
            kafka,
            store,
            reloader,
            pool,
            review_audit,
            requests: AtomicU64::new(0),
        }))
    }

    /// A fresh request id (`r-<process>-<n>`), for requests that bring none.
    pub fn next_request_id(&self) -> String {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        format!("r-{}-{n}", std::process::id())
    }
}
