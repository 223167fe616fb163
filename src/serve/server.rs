//! Starting and stopping the server: the model loaded (or awaited), the batching, logging and
//! reload threads, the routes, and axum on a tokio runtime of its own thread; a handle that
//! stops it gracefully.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use super::batcher::Batcher;
use super::config::ServeConfig;
use super::error::{ApiError, ServeError};
use super::kafkalog::KafkaLog;
use super::metrics::Metrics;
use super::model::{ModelInfo, ModelSlot};
use super::predlog::PredictionLog;
use super::reload::{self, Watch};
use super::state::AppState;
use super::{auth, dashboard, predict, review, samples, status};
use crate::registry::Registry;

/// How long a stop waits for requests in flight before it drops them.
const GRACE: Duration = Duration::from_secs(5);

/// A running server; dropping it stops it too.
pub struct Server {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<Result<(), String>>>,
    slot: Arc<ModelSlot>,
}

impl Server {
    /// The address it listens on (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `/model` says now (`None` while no model is served).
    pub fn model(&self) -> Option<ModelInfo> {
        self.slot.current().map(|m| m.info.clone())
    }

    /// Stops accepting connections, lets requests in flight finish (up to a few seconds),
    /// flushes the prediction log and stops every thread.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(ServeError::Stopped(e)),
            Some(Err(_)) => Err(ServeError::Stopped("the server thread panicked".into())),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Answers unknown paths with a JSON 404.
async fn no_route() -> axum::response::Response {
    ApiError::not_found(
        "no such endpoint; see /predict, /samples, /healthz, /readyz, /model, /metrics, \
         /dashboard, /review, /admin/reload",
    )
    .into_response()
}

fn router(state: AppState, max_body: usize) -> Router {
    let writes = Router::new()
        .route("/samples", post(samples::samples))
        .route("/admin/reload", post(status::reload))
        .route("/review/{id}", post(review::answer))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/predict", post(predict::predict))
        .route("/healthz", get(status::healthz))
        .route("/readyz", get(status::readyz))
        .route("/model", get(status::model))
        .route("/metrics", get(status::metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/review", get(review::gallery))
        .route("/review/items", get(review::items))
        .route("/review/image/{id}", get(review::image))
        .merge(writes)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Starts a server for `config`: checks the settings (refusing a non-loopback address without
/// a token), opens the store, loads and self-tests the model (or, with `wait_for_model`,
/// serves 503 until it appears), and listens.
pub fn start(config: ServeConfig) -> Result<Server, ServeError> {
    config.check()?;
    let image_root = match &config.image_root {
        Some(root) => {
            let canonical = root.canonicalize().map_err(|error| ServeError::Io {
                path: root.clone(),
                error,
            })?;
            if !canonical.is_dir() {
                return Err(ServeError::invalid(
                    "--image-root",
                    root.display(),
                    "a folder",
                ));
            }
            Some(canonical)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let slot = Arc::new(ModelSlot::default());
    let runtime_error = |what| move |error| ServeError::Runtime { what, error };
    let (store, log, log_thread) = match &config.db {
        Some(url) => {
            let shared = crate::store::open(url)?;
            let writer = crate::store::open(url)?;
            let (log, handle) =
                PredictionLog::start(writer, config.log_capacity, Arc::clone(&metrics))
                    .map_err(runtime_error("prediction log thread"))?;
            (Some(Arc::new(Mutex::new(shared))), Some(log), Some(handle))
        }
        None => (None, None, None),
    };
    let (kafka, kafka_thread) = match &config.kafka {
        Some(target) => {
            let (log, handle) = KafkaLog::start(target, config.log_capacity, Arc::clone(&metrics))
                .map_err(|message| ServeError::invalid("--kafka", &target.brokers, message))?;
            (Some(log), Some(handle))
        }
        None => (None, None),
    };
    let review_audit = match (&config.review_audit, &store) {
        (Some(dir), Some(store)) => {
            let mut store = store
                .lock()
                .map_err(|_| ServeError::Stopped("the store connection is poisoned".into()))?;
            Some(Arc::new(review::load_audit(dir, store.as_mut())?))
        }
        (Some(dir), None) => {
            return Err(ServeError::invalid(
                "--review-audit",
                dir.display(),
                "needs the data store the audit read (--db); answers are stored there",
            ))
        }
        (None, _) => None,
    };
    let mut watch = Watch {
        registry: Registry::open(&config.runs_dir),
        spec: config.model.clone(),
        device: config.device.clone(),
        cache_dir: config.cache_dir.clone(),
        precision: config.precision,
        slot: Arc::clone(&slot),
        metrics: Arc::clone(&metrics),
        store: store.clone(),
        self_test_images: config.self_test_images,
        failed: None,
        remote: config.remote.clone(),
    };
    if config.wait_for_model {
        watch.check(false);
    } else {
        watch.sync()?;
        watch.load().map_err(|(_, e)| e)?;
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bccp-serve-{i}"))
            .build()
            .map_err(|e| ServeError::Runtime {
                what: "thread pool",
                error: std::io::Error::other(e),
            })?,
    );
    let (batcher, batch_thread) = Batcher::start(
        config.max_batch,
        config.max_wait,
        config.queue_capacity,
        Arc::clone(&metrics),
        Arc::clone(&pool),
    )
    .map_err(runtime_error("batching thread"))?;
    let (reloader, reload_thread) =
        reload::start(watch, config.poll).map_err(runtime_error("reload thread"))?;
    let listener = std::net::TcpListener::bind(config.bind).map_err(|error| ServeError::Bind {
        addr: config.bind,
        error,
    })?;
    let addr = listener.local_addr().map_err(|error| ServeError::Bind {
        addr: config.bind,
        error,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(runtime_error("listener"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bccp-http")
        .build()
        .map_err(runtime_error("async runtime"))?;
    let max_body = config.max_body_bytes;
    let state = AppState::new(
        config,
        image_root,
        Arc::clone(&slot),
        metrics,
        batcher,
        log,
        kafka,
        store,
        reloader,
        pool,
        review_audit,
    );
    let app = router(state, max_body);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("bccp-serve".into())
        .spawn(move || {
            let result = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| format!("listener: {e}"))?;
                let mut graceful = stopped.clone();
                let serve = tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = graceful.wait_for(|s| *s).await;
                        })
                        .await
                });
                let mut stopped = stopped;
                let _ = stopped.wait_for(|s| *s).await;
                match tokio::time::timeout(GRACE, serve).await {
                    Ok(Ok(Ok(()))) | Err(_) => Ok(()),
                    Ok(Ok(Err(e))) => Err(format!("serving: {e}")),
                    Ok(Err(e)) => Err(format!("serving task: {e}")),
                }
            });
            // Drops every task still holding the state, so the threads below see their
            // queues close.
            runtime.shutdown_timeout(Duration::from_secs(1));
            for handle in [
                Some(batch_thread),
                Some(reload_thread),
                log_thread,
                kafka_thread,
            ]
            .into_iter()
            .flatten()
            {
                let _ = handle.join();
            }
            result
        })
        .map_err(runtime_error("server thread"))?;
    Ok(Server {
        addr,
        stop,
        thread: Some(thread),
        slot,
    })
}
