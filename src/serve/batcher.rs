//! Dynamic batching: every decoded image of every request goes through one queue to a
//! dedicated thread, which gathers up to `max_batch` of them (waiting at most `max_wait` after
//! the first) and runs them through the backbone as one batch. Images are grouped by the model
//! their request started with, so a swap never mixes models in a batch and a request in flight
//! finishes on the model it started with. Only decoded images are queued: a bad image is
//! answered before it reaches a batch and never fails the others.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::model::LoadedModel;
use crate::registry::Prediction;

/// One image to predict.
pub(crate) struct Job {
    pub model: Arc<LoadedModel>,
    /// The image preprocessed with `model`'s preprocessing (CHW).
    pub pixels: Vec<f32>,
    pub reply: oneshot::Sender<Result<Prediction, String>>,
}

/// The queue's sending side.
#[derive(Clone)]
pub(crate) struct Batcher {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

/// The queue is full: the server is overloaded.
pub(crate) struct Overloaded;

impl Batcher {
    /// Starts the batching thread; it ends when every [`Batcher`] is dropped.
    /// Batches run on `pool`'s threads.
    pub fn start(
        max_batch: usize,
        max_wait: Duration,
        capacity: usize,
        metrics: Arc<Metrics>,
        pool: Arc<rayon::ThreadPool>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(capacity);
        let m = Arc::clone(&metrics);
        let handle = std::thread::Builder::new()
            .name("bccp-batcher".into())
            .spawn(move || run(rx, max_batch, max_wait, &m, &pool))?;
        Ok((Self { tx, metrics }, handle))
    }

    /// Queues `job` without waiting; [`Overloaded`] when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Overloaded> {
        self.metrics.add_queued(1);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.add_queued(-1);
                Err(Overloaded)
            }
        }
    }
}

fn run(
    rx: Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
    pool: &rayon::ThreadPool,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + max_wait;
        while jobs.len() < max_batch {
            // Whatever is already queued joins at once; then wait up to the deadline.
            match rx.try_recv() {
                Ok(job) => {
                    jobs.push(job);
                    continue;
                }
                Err(_) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(job) => jobs.push(job),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        let n = jobs.len() as i64;
        for group in by_model(jobs) {
            pool.install(|| predict(group, metrics));
        }
        metrics.add_queued(-n);
    }
}

/// Splits jobs by the model they were decoded for (almost always one group).
fn by_model(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g[0].model, &job.model))
        {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// Runs one group as a batch and answers each job (a job whose request went away is skipped).
fn predict(group: Vec<Job>, metrics: &Metrics) {
    let model = Arc::clone(&group[0].model);
    let n = group.len();
    metrics.batch_size.observe(n as f64);
    let mut pixels = Vec::with_capacity(n * group[0].pixels.len());
    for job in &group {
        pixels.extend_from_slice(&job.pixels);
    }
    match model.run.predict_pixels(&pixels, n) {
        Ok(predictions) if predictions.len() == n => {
            for (job, p) in group.into_iter().zip(predictions) {
                let _ = job.reply.send(Ok(p));
            }
        }
        Ok(predictions) => {
            let message = format!("the model answered {} of {n} images", predictions.len());
            for job in group {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for job in group {
                let _ = job.reply.send(Err(message.clone()));
            }
        }
    }
}
