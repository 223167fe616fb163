//! The server's counters, gauges and histograms, rendered in the Prometheus text format
//! (version 0.0.4) by `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bucket bounds of the request latency histogram (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of the batch size histogram (images).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A histogram with fixed buckets.
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of the observations, in millionths.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of the observations.
    pub(crate) fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {total}", self.sum());
    }
}

/// A counter with labels (the label values joined in a fixed order).
#[derive(Default)]
struct Family(Mutex<BTreeMap<Vec<String>, u64>>);

impl Family {
    fn add(&self, labels: &[&str], n: u64) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(labels.iter().map(|s| (*s).to_owned()).collect())
                .or_default() += n;
        }
    }

    fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        self.0
            .lock()
            .map(|m| m.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, kind: &str, names: &[&str]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        if let Ok(map) = self.0.lock() {
            for (values, n) in map.iter() {
                let labels: Vec<String> = names
                    .iter()
                    .zip(values)
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
            }
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The model being served, for the info gauge.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Served {
    pub model: String,
    pub version: u32,
    pub alias: String,
    pub backbone: String,
    pub loaded_unix: f64,
}

/// Every metric of the server.
pub(crate) struct Metrics {
    requests: Family,
    predictions: Family,
    reloads: Family,
    samples: Family,
    kafka: Family,
    pub(crate) latency: Histogram,
    pub(crate) batch_size: Histogram,
    served: Mutex<Option<Served>>,
    log_written: AtomicU64,
    log_dropped: AtomicU64,
    log_failed: AtomicU64,
    auth_failures: AtomicU64,
    queued: AtomicI64,
    backbone_loads: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        // The outcomes known in advance start at 0, so their series exist from the start.
        let reloads = Family::default();
        for result in ["success", "load_failed", "self_test_failed"] {
            reloads.add(&[result], 0);
        }
        let samples = Family::default();
        for result in ["accepted", "duplicate", "rejected"] {
            samples.add(&[result], 0);
        }
        let kafka = Family::default();
        for result in ["delivered", "dropped", "failed"] {
            kafka.add(&[result], 0);
        }
        Self {
            requests: Family::default(),
            kafka,
            predictions: Family::default(),
            reloads,
            samples,
            latency: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            served: Mutex::new(None),
            log_written: AtomicU64::new(0),
            log_dropped: AtomicU64::new(0),
            log_failed: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            queued: AtomicI64::new(0),
            backbone_loads: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// One answered request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests.add(&[endpoint, &status.to_string()], 1);
    }

    /// One image predicted as `class` (status `ok`), or refused (status = the error kind).
    pub fn count_prediction(&self, class: &str, status: &str) {
        self.predictions.add(&[class, status], 1);
    }

    /// A reload attempt's result (`success`, `load_failed`, `self_test_failed`).
    pub fn count_reload(&self, result: &str) {
        self.reloads.add(&[result], 1);
    }

    pub fn reloads(&self, result: &str) -> u64 {
        self.reloads.get(&[result])
    }

    /// A feedback sample's outcome (`accepted`, `duplicate`, `rejected`).
    pub fn count_sample(&self, result: &str) {
        self.samples.add(&[result], 1);
    }

    pub fn samples(&self, result: &str) -> u64 {
        self.samples.get(&[result])
    }

    /// Predictions of `--kafka` by outcome (`delivered`, `dropped`: queue full, `failed`).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn count_kafka(&self, result: &str, n: u64) {
        if n > 0 {
            self.kafka.add(&[result], n);
        }
    }

    pub fn set_served(&self, served: Served) {
        if let Ok(mut s) = self.served.lock() {
            *s = Some(served);
        }
    }

    pub fn count_log_written(&self, n: u64) {
        self.log_written.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_log_dropped(&self) {
        self.log_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_log_failed(&self, n: u64) {
        self.log_failed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn log_written(&self) -> u64 {
        self.log_written.load(Ordering::Relaxed)
    }

    pub fn log_dropped(&self) -> u64 {
        self.log_dropped.load(Ordering::Relaxed)
    }

    pub fn count_auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Images waiting for or in a batch (+n queued, −n answered).
    pub fn add_queued(&self, n: i64) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_backbone_load(&self) {
        self.backbone_loads.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered with a status of 500 or more (but `/readyz`'s 503, which reports
    /// that no model is served yet).
    pub fn server_errors(&self) -> u64 {
        self.requests
            .0
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        k.first().is_some_and(|e| e != "/readyz")
                            && k.get(1).is_some_and(|s| s.starts_with('5'))
                    })
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Images that went through a backbone batch.
    pub fn batch_size_sum(&self) -> u64 {
        self.batch_size.sum().round() as u64
    }

    /// Total requests answered.
    pub fn total_requests(&self) -> u64 {
        self.requests
            .0
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.requests.render(
            &mut out,
            "bccp_http_requests_total",
            "HTTP requests answered, by endpoint and status code.",
            "counter",
            &["endpoint", "status"],
        );
        self.predictions.render(
            &mut out,
            "bccp_predictions_total",
            "Images predicted, by predicted class (status ok) or refused (class none, status the error kind).",
            "counter",
            &["class", "status"],
        );
        self.latency.render(
            &mut out,
            "bccp_predict_duration_seconds",
            "Time to answer a POST /predict request, body received to answer.",
        );
        self.batch_size
            .render(&mut out, "bccp_batch_size", "Images per backbone batch.");
        let _ = writeln!(
            out,
            "# HELP bccp_model_version The version of the model served (0: none yet).\n\
             # TYPE bccp_model_version gauge"
        );
        let served = self.served.lock().ok().and_then(|s| s.clone());
        match &served {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "bccp_model_version{{model=\"{}\"}} {}",
                    escape(&s.model),
                    s.version
                );
                let _ = writeln!(
                    out,
                    "# HELP bccp_model_info The model served.\n# TYPE bccp_model_info gauge\n\
                     bccp_model_info{{model=\"{}\",version=\"{}\",alias=\"{}\",backbone=\"{}\"}} 1\n\
                     # HELP bccp_model_loaded_timestamp_seconds When the model served was loaded.\n\
                     # TYPE bccp_model_loaded_timestamp_seconds gauge\n\
                     bccp_model_loaded_timestamp_seconds {}",
                    escape(&s.model),
                    s.version,
                    escape(&s.alias),
                    escape(&s.backbone),
                    s.loaded_unix
                );
            }
            None => {
                let _ = writeln!(out, "bccp_model_version 0");
            }
        }
        self.reloads.render(
            &mut out,
            "bccp_model_reloads_total",
            "Model loads after the followed alias moved (or at start), by result.",
            "counter",
            &["result"],
        );
        let _ = writeln!(
            out,
            "# HELP bccp_backbone_loads_total Backbones loaded (a new head on the same backbone loads none).\n\
             # TYPE bccp_backbone_loads_total counter\nbccp_backbone_loads_total {}",
            self.backbone_loads.load(Ordering::Relaxed)
        );
        self.samples.render(
            &mut out,
            "bccp_samples_ingested_total",
            "Feedback samples received by POST /samples, by result.",
            "counter",
            &["result"],
        );
        self.kafka.render(
            &mut out,
            "bccp_kafka_predictions_total",
            "Predictions published to Kafka (--kafka), by result: delivered, dropped (queue full), failed.",
            "counter",
            &["result"],
        );
        let simple = [
            (
                "bccp_prediction_log_written_total",
                "Predictions written to the data store.",
                "counter",
                self.log_written.load(Ordering::Relaxed) as i64,
            ),
            (
                "bccp_prediction_log_dropped_total",
                "Predictions not logged because the writer's queue was full.",
                "counter",
                self.log_dropped.load(Ordering::Relaxed) as i64,
            ),
            (
                "bccp_prediction_log_failed_total",
                "Predictions the data store refused.",
                "counter",
                self.log_failed.load(Ordering::Relaxed) as i64,
            ),
            (
                "bccp_auth_failures_total",
                "Writes refused for a missing or wrong API token.",
                "counter",
                self.auth_failures.load(Ordering::Relaxed) as i64,
            ),
            (
                "bccp_queued_images",
                "Images waiting for or in a backbone batch.",
                "gauge",
                self.queued.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, kind, v) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.count_request("/predict", 200);
        m.count_request("/predict", 200);
        m.count_request("/predict", 415);
        m.count_request("/readyz", 503);
        m.count_prediction("coat \"x\"", "ok");
        m.latency.observe(0.003);
        m.latency.observe(0.2);
        m.batch_size.observe(3.0);
        m.count_reload("load_failed");
        let text = m.render();
        assert!(text.contains("bccp_http_requests_total{endpoint=\"/predict\",status=\"200\"} 2"));
        assert!(text.contains("bccp_http_requests_total{endpoint=\"/predict\",status=\"415\"} 1"));
        assert!(text.contains("bccp_predictions_total{class=\"coat \\\"x\\\"\",status=\"ok\"} 1"));
        assert!(text.contains("bccp_predict_duration_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("bccp_predict_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("bccp_predict_duration_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("bccp_predict_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("bccp_predict_duration_seconds_count 2"));
        assert!(text.contains("bccp_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("bccp_model_reloads_total{result=\"load_failed\"} 1"));
        assert!(text.contains("bccp_model_reloads_total{result=\"success\"} 0"));
        assert!(text.contains("bccp_samples_ingested_total{result=\"duplicate\"} 0"));
        assert!(text.contains("bccp_model_version 0"));
        assert_eq!(m.reloads("load_failed"), 1);
        assert_eq!(m.server_errors(), 0);
        assert_eq!(m.total_requests(), 4);
    }
}
