//! The server's settings, resolved once (flags, environment) into one typed struct with its
//! defaults here, and checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;

use super::auth::Token;
use super::error::ServeError;
use crate::ops::bf16_gemm::Precision;
use crate::store::DbUrl;

/// Everything `bccp serve` (or `bccp up`) needs to start a server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model followed: `NAME`, `NAME:VERSION` or `NAME@ALIAS` (e.g. `loop@champion`).
    pub model: String,
    /// The registry folder.
    pub runs_dir: PathBuf,
    /// Where `{"image_path": …}` requests may read; `None`: such requests are refused.
    pub image_root: Option<PathBuf>,
    /// The data store predictions and feedback go to; `None`: neither is recorded.
    pub db: Option<DbUrl>,
    pub bind: SocketAddr,
    pub device: Device,
    pub cache_dir: Option<PathBuf>,
    /// The arithmetic of the backbone's products (bf16: on CPUs with AVX512-BF16); `None`:
    /// each version in the precision it was trained in.
    pub precision: Option<Precision>,
    /// Most images in one backbone batch.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
    /// Largest request body (bytes).
    pub max_body_bytes: usize,
    /// Most images in one request (JSON batch, multipart).
    pub max_request_images: usize,
    /// Largest image accepted (width × height).
    pub max_image_pixels: u64,
    /// Classes listed in each answer's `top_k`.
    pub top_k: usize,
    /// How often the followed alias is checked.
    pub poll: Duration,
    /// Required for writes (`/samples`, `/admin/*`); mandatory off loopback.
    pub token: Option<Token>,
    /// Where uploaded feedback images are kept (by content hash).
    pub upload_dir: PathBuf,
    /// The `source` of feedback samples.
    pub feedback_source: String,
    /// Stored images the self-test of a new model predicts (besides a synthetic one).
    pub self_test_images: usize,
    /// Start without a model and serve 503 until the followed alias exists (`bccp up`);
    /// otherwise the first load must succeed.
    pub wait_for_model: bool,
    /// Images queued for the batcher before requests get 503.
    pub queue_capacity: usize,
    /// Predictions queued for the store writer before new ones are dropped (and counted).
    pub log_capacity: usize,
    /// Longest time to receive a request body.
    pub body_timeout: Duration,
    /// Every prediction published to this Kafka topic too (feature `kafka`).
    pub kafka: Option<KafkaTarget>,
    /// A `bccp audit --db` output folder whose label issues the review page shows; `None`:
    /// the flags of the latest retrain cycle.
    pub review_audit: Option<PathBuf>,
    /// Where the model comes from when it is not in `runs_dir` (`mlflow:NAME@ALIAS`,
    /// `s3://…`): synced into `runs_dir`, a cache registry, before every check; `model` is
    /// then its spec there.
    pub remote: Option<std::sync::Arc<crate::tracking::remote::RemoteModel>>,
}

/// Where `--kafka` publishes predictions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTarget {
    /// `HOST:PORT[,HOST:PORT…]`.
    pub brokers: String,
    pub topic: String,
    pub format: crate::stream::Format,
}

/// The topic `--kafka BROKERS` publishes to when none is named.
pub const DEFAULT_KAFKA_TOPIC: &str = "bccp-predictions";

impl KafkaTarget {
    /// `HOST:PORT[,HOST:PORT…][,TOPIC]`: the items with a `:` are brokers, a last item
    /// without one is the topic (default [`DEFAULT_KAFKA_TOPIC`]).
    pub fn parse(text: &str, format: crate::stream::Format) -> Result<Self, ServeError> {
        let mut items: Vec<&str> = text.split(',').collect();
        let topic = match items.last() {
            Some(last) if !last.contains(':') => items.pop().unwrap_or(DEFAULT_KAFKA_TOPIC),
            _ => DEFAULT_KAFKA_TOPIC,
        };
        if items.is_empty() || topic.is_empty() || items.iter().any(|b| b.is_empty()) {
            return Err(ServeError::invalid(
                "--kafka",
                text,
                "HOST:PORT[,HOST:PORT…][,TOPIC] (e.g. localhost:9092,predictions)",
            ));
        }
        Ok(Self {
            brokers: items.join(","),
            topic: topic.to_owned(),
            format,
        })
    }
}

/// The shortest API token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl ServeConfig {
    /// The defaults around the required settings.
    pub fn new(model: &str, runs_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.to_owned(),
            runs_dir: runs_dir.into(),
            image_root: None,
            db: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            device: Device::Cpu,
            cache_dir: None,
            precision: None,
            max_batch: 16,
            max_wait: Duration::from_millis(2),
            max_body_bytes: 16 << 20,
            max_request_images: 64,
            max_image_pixels: 4096 * 4096,
            top_k: 5,
            poll: Duration::from_millis(500),
            token: None,
            upload_dir: crate::paths::bccp_home().join("uploads"),
            feedback_source: "feedback".into(),
            self_test_images: 4,
            wait_for_model: false,
            queue_capacity: 4096,
            log_capacity: 65536,
            body_timeout: Duration::from_secs(30),
            kafka: None,
            review_audit: None,
            remote: None,
        }
    }

    /// Checks the settings: the security rule (no non-loopback address without a token) and
    /// every bound.
    pub fn check(&self) -> Result<(), ServeError> {
        if !self.bind.ip().is_loopback() && self.token.is_none() {
            return Err(ServeError::NoToken {
                addr: self.bind,
                min: MIN_TOKEN_LEN,
            });
        }
        crate::registry::parse_spec(&self.model).map_err(|error| ServeError::Model {
            spec: self.model.clone(),
            error: Box::new(error),
        })?;
        let range = |name: &'static str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ServeError::invalid(name, v, format!("{lo} to {hi}")))
            }
        };
        if let Some(precision) = self.precision {
            crate::ops::bf16_gemm::check_on(precision, &self.device)
                .map_err(|e| ServeError::invalid("--precision", "bf16", format!("f32 ({e})")))?;
        }
        range("--max-batch", self.max_batch, 1, 1024)?;
        range("--max-request-images", self.max_request_images, 1, 4096)?;
        range("--top-k", self.top_k, 1, 1000)?;
        range("--max-body-bytes", self.max_body_bytes, 1024, 1 << 30)?;
        range("queue capacity", self.queue_capacity, 1, 1 << 20)?;
        range("log capacity", self.log_capacity, 1, 1 << 24)?;
        if self.max_wait > Duration::from_secs(10) {
            return Err(ServeError::invalid(
                "--max-wait-ms",
                self.max_wait.as_millis(),
                "at most 10000",
            ));
        }
        if self.poll < Duration::from_millis(10) {
            return Err(ServeError::invalid(
                "--poll-ms",
                self.poll.as_millis(),
                "at least 10",
            ));
        }
        if self.max_image_pixels == 0 || self.max_image_pixels > crate::data::MAX_IMAGE_PIXELS {
            return Err(ServeError::invalid(
                "--max-image-pixels",
                self.max_image_pixels,
                format!("1 to {} (MAX_IMAGE_PIXELS)", crate::data::MAX_IMAGE_PIXELS),
            ));
        }
        crate::store::check_identifier(&self.feedback_source.replace('-', "_")).map_err(|_| {
            ServeError::invalid(
                "feedback source",
                &self.feedback_source,
                "letters, digits, '-' and '_'",
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_targets() {
        use crate::stream::Format::ConnectJson;
        let t = KafkaTarget::parse("a:1,b:2,preds", ConnectJson).unwrap();
        assert_eq!((t.brokers.as_str(), t.topic.as_str()), ("a:1,b:2", "preds"));
        let t = KafkaTarget::parse("localhost:9092", ConnectJson).unwrap();
        assert_eq!(t.topic, DEFAULT_KAFKA_TOPIC);
        for bad in ["", "preds", "a:1,,t", ","] {
            let err = KafkaTarget::parse(bad, ConnectJson)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--kafka"), "{bad}: {err}");
        }
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let mut c = ServeConfig::new("m@champion", "runs");
        assert!(c.check().is_ok());
        c.bind = "0.0.0.0:8000".parse().unwrap();
        let err = c.check().unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:8000") && err.contains("BCCP_API_TOKEN"),
            "{err}"
        );
        c.token = Some(Token::new("0123456789abcdef0123").unwrap());
        assert!(c.check().is_ok());
        c.bind = "[::1]:8000".parse().unwrap();
        c.token = None;
        assert!(c.check().is_ok(), "IPv6 loopback");
    }

    #[test]
    fn bounds_are_checked() {
        let mut c = ServeConfig::new("m@champion", "runs");
        c.max_batch = 0;
        assert!(c.check().unwrap_err().to_string().contains("--max-batch"));
        let mut c = ServeConfig::new("bad name!", "runs");
        assert!(c.check().is_err());
        c.model = "m".into();
        c.max_image_pixels = u64::MAX;
        assert!(c.check().is_err());
    }
}
