//! Predictions logged to the data store by one writer thread behind a bounded queue: a request
//! only queues its rows (never waits for the database), SQLite keeps a single writer for them,
//! and rows are written in batched transactions. When the queue is full a row is dropped and
//! counted, never blocking a request.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::metrics::Metrics;
use crate::store::{NewPrediction, Store};

/// Rows per transaction, at most.
const BATCH: usize = 512;

/// The queue's sending side.
#[derive(Clone)]
pub(crate) struct PredictionLog {
    tx: SyncSender<NewPrediction>,
    metrics: Arc<Metrics>,
}

impl PredictionLog {
    /// Starts the writer on its own connection; it drains the queue and ends when every
    /// [`PredictionLog`] is dropped.
    pub fn start(
        store: Box<dyn Store>,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(capacity);
        let m = Arc::clone(&metrics);
        let handle = std::thread::Builder::new()
            .name("bccp-prediction-log".into())
            .spawn(move || write(rx, store, &m))?;
        Ok((Self { tx, metrics }, handle))
    }

    /// Queues a row; when the queue is full it is dropped and counted.
    pub fn log(&self, row: NewPrediction) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(row) {
            self.metrics.count_log_dropped();
        }
    }
}

fn write(rx: Receiver<NewPrediction>, mut store: Box<dyn Store>, metrics: &Metrics) {
    while let Ok(first) = rx.recv() {
        let mut rows = vec![first];
        while rows.len() < BATCH {
            match rx.try_recv() {
                Ok(row) => rows.push(row),
                Err(_) => break,
            }
        }
        match store.insert_predictions(&rows) {
            Ok(_) => metrics.count_log_written(rows.len() as u64),
            Err(e) => {
                metrics.count_log_failed(rows.len() as u64);
                eprintln!(
                    "warning: {} predictions not logged to {}: {e}",
                    rows.len(),
                    store.location()
                );
            }
        }
    }
}
