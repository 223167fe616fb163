//! `bccp generate`: the reference's data generator, done right.
//!
//! The reference (`data_generate/data_generator_tuesday.py`) drops and re-creates its table,
//! inserts every Monday and Tuesday record with one commit each, then inserts one random record
//! per second, forever. Here:
//!
//! * the **bulk** phase inserts all records of the chosen day(s) in batched transactions, each
//!   keyed by the dataset and the record id, so running it again adds nothing;
//! * the **streaming** phase inserts records drawn at random (a seeded stream) at `rate` rows
//!   per second, on a fixed schedule (row `k` is due at `k / rate` s, late rows are caught up
//!   in one transaction), bounded by a duration and/or a count;
//! * labels: Monday's are the true ones; Tuesday's are user feedback, drawn once per record
//!   with [`user_feedback_labels`] (right with probability `user_accuracy`, else another class;
//!   the same seed gives the same labels), stored beside the true label;
//! * a deterministic share of the records (`gate_fraction`, per record id) is held out as the
//!   trusted gate set (split `gate`);
//! * the `stop` callback (SIGINT/SIGTERM in the command) is checked between transactions, so
//!   a stop leaves every committed row in place and ends normally.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::error::{Result, StoreError};
use super::{NewSample, SampleStatus, Split, Store};
use crate::data::prepare::{read_dataset_info, DATASET_INFO_FILE};
use crate::data::timestamp::{format_utc, parse_rfc3339};
use crate::data::{read_manifest_for, user_feedback_labels, Day, Record};
use crate::hash::sha256_hex;
use crate::rng::Rng;

/// How long the streaming phase runs; both `None`: until stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamBound {
    pub duration: Option<Duration>,
    pub limit: Option<u64>,
}

/// Parameters of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// A folder written by `bccp prepare`.
    pub dataset: PathBuf,
    /// The days whose records are generated, in order.
    pub days: Vec<Day>,
    /// Insert every record of the days first.
    pub bulk: bool,
    /// Then stream random records at this many rows per second.
    pub rate: Option<f64>,
    pub bound: StreamBound,
    /// Probability that a Tuesday user label is right.
    pub user_accuracy: f64,
    /// Share of the records held out as the gate set.
    pub gate_fraction: f64,
    pub seed: u64,
    /// Rows per transaction.
    pub batch_size: usize,
    /// Create the reference-compatible view with this name.
    pub view: Option<String>,
}

/// What [`generate`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateSummary {
    /// Rows the bulk phase inserted, per day.
    pub bulk: Vec<(Day, u64)>,
    /// Bulk records already in the store (from an earlier run), skipped.
    pub already_stored: u64,
    /// Rows the streaming phase committed.
    pub streamed: u64,
    /// The streaming rate asked for (rows/s).
    pub rate: Option<f64>,
    /// Seconds the streaming phase ran.
    pub stream_seconds: f64,
    /// Ended early by the stop callback.
    pub stopped: bool,
}

/// Parses `--rate`: rows per second as `N`, `N/s`, `N/min` or `N/h` (N may be fractional).
pub fn parse_rate(text: &str) -> Result<f64> {
    let bad = || {
        StoreError::invalid(
            "--rate",
            text,
            "a positive number of rows per time unit: N, N/s, N/min or N/h (e.g. 5/s)",
        )
    };
    let (number, per) = match text.split_once('/') {
        Some((n, unit)) => (
            n,
            match unit.trim() {
                "s" | "sec" => 1.0,
                "min" | "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            },
        ),
        None => (text, 1.0),
    };
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    let rate = n / per;
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(bad())
    }
}

/// Parses `--duration`: `500ms`, `10s`, `2m`, `1h`, a plain number of seconds, or `forever`
/// (`None`: until stopped).
pub fn parse_duration(text: &str) -> Result<Option<Duration>> {
    let bad = || {
        StoreError::invalid(
            "--duration",
            text,
            "a duration such as 500ms, 10s, 2m, 1h (plain numbers are seconds), or forever",
        )
    };
    let t = text.trim();
    if t == "forever" {
        return Ok(None);
    }
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(n * scale)
        .map(Some)
        .map_err(|_| bad())
}

/// Stream ids of the seeded random choices (independent of the label noise's stream).
const GATE_STREAM: u64 = 1 << 42;
const DRAW_STREAM: u64 = 1 << 43;

/// One record ready to store: the manifest record, its day, its labels and split.
struct Item<'a> {
    record: &'a Record,
    path: String,
    given: i64,
    truth: i64,
    split: Split,
}

/// The hex SHA-256 of an item's image: as `bccp prepare` recorded it in the manifest when it
/// wrote the file, else (a manifest of an older version) of the file as read now.
fn image_sha256(item: &Item) -> Result<String> {
    if let Some(hash) = &item.record.sha256 {
        return Ok(hash.clone());
    }
    let bytes = std::fs::read(&item.path).map_err(|e| StoreError::io(&item.path, e))?;
    Ok(sha256_hex(&bytes))
}

/// The number of streamed rows a bound allows at `rate`: rows are due at `k / rate` s, and
/// those due before the end of the duration are inserted.
pub fn stream_target(rate: f64, bound: StreamBound) -> u64 {
    let by_time = bound
        .duration
        .map(|d| (d.as_secs_f64() * rate).ceil().min(u64::MAX as f64) as u64);
    match (by_time, bound.limit) {
        (Some(t), Some(l)) => t.min(l),
        (Some(t), None) => t,
        (None, Some(l)) => l,
        (None, None) => u64::MAX,
    }
}

fn check(opts: &GenerateOptions) -> Result<()> {
    if !opts.bulk && opts.rate.is_none() {
        return Err(StoreError::invalid(
            "generate options",
            "neither --bulk nor --rate",
            "pass --bulk (insert every record), --rate N/s (stream), or both",
        ));
    }
    if let Some(rate) = opts.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(StoreError::invalid(
                "--rate",
                rate,
                "a positive number of rows per second",
            ));
        }
    } else if opts.bound != StreamBound::default() {
        return Err(StoreError::invalid(
            "--duration/--limit",
            "without --rate",
            "they bound the streaming phase; pass --rate N/s too",
        ));
    }
    if !(0.0..=1.0).contains(&opts.gate_fraction) {
        return Err(StoreError::invalid(
            "--gate-fraction",
            opts.gate_fraction,
            "a share in [0, 1]",
        ));
    }
    if opts.days.is_empty() {
        return Err(StoreError::invalid(
            "--day",
            "none",
            "monday, tuesday or both",
        ));
    }
    if opts.batch_size == 0 {
        return Err(StoreError::invalid("batch size", 0, "at least 1"));
    }
    Ok(())
}

/// The first 16 hex digits of the SHA-256 of the dataset's `dataset.json`: keys of generated
/// records, so the same dataset (wherever it lies) gives the same keys.
fn dataset_fingerprint(dataset: &Path) -> Result<String> {
    let path = dataset.join(DATASET_INFO_FILE);
    let bytes = std::fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
    Ok(sha256_hex(&bytes)[..16].to_owned())
}

/// What the generator reads from the prepared dataset before it touches a store (read while
/// the store is opened, see [`GenerateInput::read`]).
pub struct GenerateInput {
    classes: Vec<String>,
    /// The dataset folder, canonical, as UTF-8.
    root: String,
    fingerprint: String,
    /// The chosen days' manifests, each day once.
    per_day: Vec<(Day, Vec<Record>)>,
}

impl GenerateInput {
    /// Checks `opts` and reads the dataset's class list and the chosen days' manifests.
    pub fn read(opts: &GenerateOptions) -> Result<Self> {
        check(opts)?;
        let info = read_dataset_info(&opts.dataset)?;
        let classes = info.classes.len();
        let root =
            std::fs::canonicalize(&opts.dataset).map_err(|e| StoreError::io(&opts.dataset, e))?;
        let root = root
            .to_str()
            .ok_or_else(|| StoreError::invalid("--dataset", root.display(), "a UTF-8 path"))?
            .to_owned();
        let fingerprint = dataset_fingerprint(&opts.dataset)?;
        let mut days: Vec<Day> = Vec::new();
        for &day in &opts.days {
            if !days.contains(&day) {
                days.push(day);
            }
        }
        // The days' manifests are read (and parsed) side by side.
        let per_day = days
            .into_par_iter()
            .map(|day| {
                let path = opts.dataset.join(format!("{}.jsonl", day.as_str()));
                Ok((day, read_manifest_for(&path, classes)?))
            })
            .collect::<std::result::Result<_, crate::data::DataError>>()?;
        Ok(Self {
            classes: info.classes,
            root,
            fingerprint,
            per_day,
        })
    }
}

/// Runs the generator into `store`; `stop` is checked between transactions, `log` gets one
/// line per phase.
pub fn generate(
    store: &mut dyn Store,
    opts: &GenerateOptions,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<GenerateSummary> {
    let input = GenerateInput::read(opts)?;
    generate_from(store, opts, &input, stop, log)
}

/// [`generate`] with its input already read (by [`GenerateInput::read`] with the same `opts`).
pub fn generate_from(
    store: &mut dyn Store,
    opts: &GenerateOptions,
    input: &GenerateInput,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<GenerateSummary> {
    let GenerateInput {
        classes,
        root: root_str,
        fingerprint,
        per_day,
    } = input;
    let class_idx = store.ensure_classes(classes)?;
    let classes = classes.len();
    let mut items = Vec::new();
    for (day, records) in per_day {
        // Tuesday's user labels are drawn over the whole manifest, so a record's label does
        // not depend on which records are generated.
        let given: Vec<usize> = if *day == Day::Tuesday {
            let targets: Vec<usize> = records.iter().map(|r| r.target).collect();
            user_feedback_labels(&targets, classes, opts.user_accuracy, opts.seed)?.given
        } else {
            records.iter().map(|r| r.target).collect()
        };
        for (record, g) in records.iter().zip(given) {
            let gate =
                Rng::derive(opts.seed, GATE_STREAM + record.id).bernoulli(opts.gate_fraction);
            items.push((
                *day,
                Item {
                    record,
                    path: format!("{root_str}/{}", record.image_path),
                    given: class_idx[g],
                    truth: class_idx[record.target],
                    split: if gate { Split::Gate } else { Split::Train },
                },
            ));
        }
    }
    let row = |day: Day, item: &Item, key: String, timestamp: String, sha256: String| NewSample {
        key,
        timestamp,
        image_path: item.path.clone(),
        sha256: Some(sha256),
        label_given: item.given,
        label_true: Some(item.truth),
        source: day.as_str().to_owned(),
        split: item.split,
        status: SampleStatus::Accepted,
    };

    let mut summary = GenerateSummary {
        rate: opts.rate,
        ..GenerateSummary::default()
    };
    if let Some(view) = &opts.view {
        store.create_reference_view(view)?;
    }

    // Bulk: every record, in batches; into an empty store, its indexes built at the end.
    if opts.bulk {
        super::bulk_load(store, |store| -> Result<()> {
            for &(day, _) in per_day {
                let day_items: Vec<&Item> = items
                    .iter()
                    .filter(|(d, _)| *d == day)
                    .map(|(_, i)| i)
                    .collect();
                let mut inserted = 0u64;
                // The rows are made (and files without a recorded hash hashed) one batch ahead
                // of the database writes, on all cores.
                super::ahead::one_chunk_ahead(
                    &day_items,
                    opts.batch_size,
                    |item| -> Result<NewSample> {
                        let hash = image_sha256(item)?;
                        let ts = parse_rfc3339(&item.record.timestamp)
                            .map(format_utc)
                            .unwrap_or_else(super::now_utc);
                        let key = format!("manifest:{fingerprint}:{}", item.record.id);
                        Ok(row(day, item, key, ts, hash))
                    },
                    |_, rows| -> Result<bool> {
                        if stop() {
                            summary.stopped = true;
                            return Ok(false);
                        }
                        let rows = rows.into_iter().collect::<Result<Vec<NewSample>>>()?;
                        let ids = store.insert_samples(&rows)?;
                        let new = ids.iter().filter(|id| id.is_some()).count() as u64;
                        inserted += new;
                        summary.already_stored += rows.len() as u64 - new;
                        Ok(true)
                    },
                )?;
                summary.bulk.push((day, inserted));
                log(&format!("bulk {}: {inserted} rows inserted", day.as_str()));
                if summary.stopped {
                    return Ok(());
                }
            }
            Ok(())
        })?;
        if summary.stopped {
            return Ok(summary);
        }
        if summary.already_stored > 0 {
            log(&format!(
                "bulk: {} records were already stored (skipped)",
                summary.already_stored
            ));
        }
    }

    // Streaming: random records on a fixed schedule.
    let Some(rate) = opts.rate else {
        return Ok(summary);
    };
    if items.is_empty() {
        return Err(StoreError::invalid(
            "--day",
            "the days chosen",
            "days with records to stream",
        ));
    }
    let target = stream_target(rate, opts.bound);
    let run_id = format!(
        "{:016x}",
        Rng::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ (u64::from(std::process::id()) << 32)
        )
        .next_u64()
    );
    let mut draws = Rng::derive(opts.seed, DRAW_STREAM);
    let mut hashes: HashMap<usize, String> = HashMap::new();
    let start = Instant::now();
    let mut seq = 0u64;
    log(&format!(
        "streaming at {rate} rows/s{}",
        match target {
            u64::MAX => " until stopped".to_owned(),
            t => format!(", {t} rows"),
        }
    ));
    while seq < target {
        if stop() {
            summary.stopped = true;
            break;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * rate).floor() as u64)
            .saturating_add(1)
            .min(target);
        if due <= seq {
            let wait = (seq as f64 / rate - elapsed).clamp(0.001, 0.05);
            std::thread::sleep(Duration::from_secs_f64(wait));
            continue;
        }
        let n = (due - seq).min(opts.batch_size as u64);
        let mut rows = Vec::with_capacity(n as usize);
        for k in 0..n {
            let pick = draws.below(items.len() as u64) as usize;
            let (day, item) = &items[pick];
            let hash = match hashes.get(&pick) {
                Some(h) => h.clone(),
                None => {
                    let h = image_sha256(item)?;
                    hashes.insert(pick, h.clone());
                    h
                }
            };
            let key = format!("stream:{run_id}:{}", seq + k);
            rows.push(row(*day, item, key, super::now_utc(), hash));
        }
        store.insert_samples(&rows)?;
        seq += n;
    }
    summary.streamed = seq;
    summary.stream_seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_targets() {
        let d = |s: f64| Some(Duration::from_secs_f64(s));
        let b = |duration, limit| StreamBound { duration, limit };
        assert_eq!(stream_target(20.0, b(d(2.0), None)), 40);
        assert_eq!(stream_target(3.0, b(d(1.1), None)), 4);
        assert_eq!(stream_target(20.0, b(d(2.0), Some(7))), 7);
        assert_eq!(stream_target(20.0, b(None, Some(7))), 7);
        assert_eq!(stream_target(20.0, b(None, None)), u64::MAX);
        assert_eq!(stream_target(20.0, b(d(0.0), None)), 0);
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(parse_rate("5").unwrap(), 5.0);
        assert_eq!(parse_rate("5/s").unwrap(), 5.0);
        assert_eq!(parse_rate("120/min").unwrap(), 2.0);
        assert_eq!(parse_rate("0.5/s").unwrap(), 0.5);
        for bad in ["0", "-1/s", "x", "5/day", "inf"] {
            assert!(
                parse_rate(bad).unwrap_err().to_string().contains("--rate"),
                "{bad}"
            );
        }
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("10"), Some(Duration::from_secs(10)));
        assert_eq!(d("10s"), Some(Duration::from_secs(10)));
        assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("forever"), None);
        for bad in ["", "-1s", "10 days", "s"] {
            assert!(
                parse_duration(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("--duration"),
                "{bad}"
            );
        }
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
