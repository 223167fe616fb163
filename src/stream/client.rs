//! The librdkafka settings bccp uses, and the context that reports broker trouble: errors
//! are counted and logged at most once every few seconds (a broker that is down reports one
//! per reconnect attempt; librdkafka itself reconnects with exponential back-off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

/// Shortest pause between two logged broker errors.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Counts broker errors and failed deliveries; logs the first of each burst.
#[derive(Default)]
pub struct Context {
    errors: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl Context {
    /// Broker errors reported so far (connection lost, all brokers down, …).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Records the broker acknowledged (producers).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Records that could not be delivered (producers).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn log(&self, message: std::fmt::Arguments) {
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            eprintln!("warning: kafka: {message}");
        }
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.log(format_args!("{error} ({reason}); retrying"));
    }
}

impl ConsumerContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.log(format_args!("record not delivered: {error}"));
            }
        }
    }
}

/// Checks a `--brokers` list: `HOST:PORT[,HOST:PORT…]`.
pub fn check_brokers(brokers: &str) -> Result<(), String> {
    let ok = !brokers.is_empty()
        && brokers.split(',').all(|b| {
            b.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--brokers {brokers:?}: expected HOST:PORT[,HOST:PORT…] (e.g. localhost:9092)"
        ))
    }
}

/// Settings common to consumers and producers: the bootstrap list and reconnect back-off
/// (100 ms doubling to 5 s).
pub fn base_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "bccp")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "5000")
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "5000")
        .set("log_level", "3");
    config
}

/// A producer's settings: a bounded queue of `queue_records` records, every record
/// acknowledged by the partition leader, given up after `timeout`.
pub fn producer_config(brokers: &str, queue_records: usize, timeout: Duration) -> ClientConfig {
    let mut config = base_config(brokers);
    config
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", queue_records.to_string())
        .set("message.timeout.ms", timeout.as_millis().to_string());
    config
}

/// Back-off between retries of a failed step: doubles from 200 ms to 10 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(200))
    }
}

impl Backoff {
    /// Sleeps the current pause (in slices, returning early when `stop` says so) and doubles it.
    pub fn wait(&mut self, stop: &dyn Fn() -> bool) {
        let until = Instant::now() + self.0;
        while Instant::now() < until && !stop() {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
    }

    /// Back to the shortest pause after a success.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists() {
        assert!(check_brokers("localhost:9092").is_ok());
        assert!(check_brokers("a:1,b.example:65535").is_ok());
        for bad in ["", "localhost", "a:1,", ":9092", "a:99999"] {
            assert!(
                check_brokers(bad).unwrap_err().contains("--brokers"),
                "{bad}"
            );
        }
    }
}
