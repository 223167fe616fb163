//! The bytes of a Kafka record, both ways: the reference's JSON Connect envelope (what Kafka
//! Connect's `JsonConverter` with schemas writes for a JDBC source row) and plain JSON (the
//! payload alone, as `JsonConverter` writes with `schemas.enable=false`).
//!
//! A sample row is `{"id", "timestamp", "image_path", "target"}` (the reference's table
//! `{dataset}(id, timestamp, image_path, target)`); its timestamp is written
//! `yyyy-MM-dd HH:mm:ss.S` as the reference's connector does.

use serde_json::Value;

use crate::data::timestamp::{format_utc, parse_rfc3339};
use crate::store::{NewPrediction, Prediction, Sample};

/// How records are written and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `{"schema": {...}, "payload": {...}}`, the reference's connectors' format.
    ConnectJson,
    /// The payload object alone.
    Json,
}

/// A sample as a record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRecord {
    /// The row's id at its origin (not the id it gets in our store).
    pub id: Option<i64>,
    /// Stored form, `YYYY-MM-DDTHH:MM:SSZ`; `None` when the record had none.
    pub timestamp: Option<String>,
    pub image_path: String,
    /// The class index given.
    pub target: i64,
}

/// The Connect schema of a sample row; `name` is the source table (the dataset).
fn sample_schema(name: &str) -> String {
    format!(
        concat!(
            r#"{{"type":"struct","fields":["#,
            r#"{{"type":"int32","optional":false,"field":"id"}},"#,
            r#"{{"type":"string","optional":true,"field":"timestamp"}},"#,
            r#"{{"type":"string","optional":true,"field":"image_path"}},"#,
            r#"{{"type":"int32","optional":true,"field":"target"}}"#,
            r#"],"optional":false,"name":{}}}"#
        ),
        json_string(name)
    )
}

/// The Connect schema of a prediction row, `{dataset}_prediction(id, timestamp, target)` as
/// the reference's consumer writes it (id: the sample predicted, null when the request named
/// none).
fn prediction_schema(name: &str) -> String {
    format!(
        concat!(
            r#"{{"type":"struct","fields":["#,
            r#"{{"type":"int32","optional":true,"field":"id"}},"#,
            r#"{{"type":"string","optional":true,"field":"timestamp"}},"#,
            r#"{{"type":"int32","optional":true,"field":"target"}}"#,
            r#"],"optional":false,"name":{}}}"#
        ),
        json_string(name)
    )
}

fn json_string(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// `2024-01-01T09:00:00Z` → `2024-01-01 09:00:00.0` (Java's `yyyy-MM-dd HH:mm:ss.S`; our
/// timestamps have whole seconds). Text of another shape is kept as it is.
pub fn connect_timestamp(stored: &str) -> String {
    match parse_rfc3339(stored) {
        Some(secs) => {
            let t = format_utc(secs);
            format!("{} {}.0", &t[..10], &t[11..19])
        }
        None => stored.to_owned(),
    }
}

/// A record's timestamp in stored form: `yyyy-MM-dd HH:mm:ss[.S…]` (UTC, as the reference
/// writes it), RFC 3339, or milliseconds since the epoch (Connect's Timestamp type).
fn parse_timestamp(value: &Value) -> Result<Option<String>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .map(|ms| Some(format_utc(ms.div_euclid(1000))))
            .ok_or_else(|| format!("timestamp {n} is not whole milliseconds since 1970")),
        Value::String(text) => {
            let secs = parse_rfc3339(text).or_else(|| {
                (text.len() >= 19 && text.as_bytes()[10] == b' ')
                    .then(|| parse_rfc3339(&format!("{text}Z")))
                    .flatten()
            });
            secs.map(|s| Some(format_utc(s))).ok_or_else(|| {
                format!(
                    "timestamp {text:?} is neither yyyy-MM-dd HH:mm:ss.S nor RFC 3339 \
                     (e.g. 2024-01-01 09:00:00.0)"
                )
            })
        }
        other => Err(format!("timestamp {other} is not a string or a number")),
    }
}

fn int32(value: i64, what: &str) -> Result<i64, String> {
    if i32::try_from(value).is_ok() {
        Ok(value)
    } else {
        Err(format!("{what} {value} does not fit the schema's int32"))
    }
}

/// A sample's record bytes; `schema_name` names the Connect struct (the reference's dataset
/// table). Fails when the id or label does not fit the reference's int32 fields.
pub fn encode_sample(
    format: Format,
    schema_name: &str,
    sample: &Sample,
) -> Result<Vec<u8>, String> {
    let payload = format!(
        r#"{{"id":{},"timestamp":{},"image_path":{},"target":{}}}"#,
        int32(sample.id, "sample id")?,
        json_string(&connect_timestamp(&sample.timestamp)),
        json_string(&sample.image_path),
        int32(sample.label_given, "label")?,
    );
    Ok(match format {
        Format::ConnectJson => format!(
            r#"{{"schema":{},"payload":{payload}}}"#,
            sample_schema(schema_name)
        ),
        Format::Json => payload,
    }
    .into_bytes())
}

/// A prediction's record bytes. Connect JSON carries the reference's prediction row
/// `(id: the sample predicted, timestamp, target)`; plain JSON carries every field (`id`: the
/// prediction's id in the store, null when it was not stored).
pub fn encode_prediction(
    format: Format,
    schema_name: &str,
    id: Option<i64>,
    p: &NewPrediction,
) -> Result<Vec<u8>, String> {
    let opt = |v: Option<i64>| v.map_or("null".to_owned(), |v| v.to_string());
    Ok(match format {
        Format::ConnectJson => format!(
            r#"{{"schema":{},"payload":{{"id":{},"timestamp":{},"target":{}}}}}"#,
            prediction_schema(schema_name),
            opt(p.sample_id.map(|s| int32(s, "sample id")).transpose()?),
            json_string(&connect_timestamp(&p.timestamp)),
            int32(p.class, "class")?,
        ),
        Format::Json => serde_json::json!({
            "id": id,
            "sample_id": p.sample_id,
            "request_id": p.request_id,
            "timestamp": p.timestamp,
            "model": p.model,
            "version": p.version,
            "target": p.class,
            "probability": p.probability,
            "latency_ms": p.latency_ms,
        })
        .to_string(),
    }
    .into_bytes())
}

/// A stored prediction's record bytes ([`encode_prediction`]).
pub fn encode_stored_prediction(
    format: Format,
    schema_name: &str,
    p: &Prediction,
) -> Result<Vec<u8>, String> {
    encode_prediction(format, schema_name, Some(p.id), &p.prediction)
}

/// Reads a sample record; the error says what is wrong (for the log line of a malformed
/// message).
pub fn decode_sample(format: Format, bytes: &[u8]) -> Result<SampleRecord, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let payload = match (format, value) {
        (Format::ConnectJson, Value::Object(mut envelope)) => match envelope.remove("payload") {
            Some(Value::Object(payload)) => payload,
            _ => return Err("no \"payload\" object (expected a Connect JSON envelope)".into()),
        },
        (Format::Json, Value::Object(payload)) => {
            if payload.contains_key("schema") && payload.contains_key("payload") {
                return Err("a Connect JSON envelope (use --format connect-json)".into());
            }
            payload
        }
        (_, other) => return Err(format!("not a JSON object: {}", kind(&other))),
    };
    let field = |name: &str| payload.get(name).unwrap_or(&Value::Null);
    let id = match field("id") {
        Value::Null => None,
        v => Some(
            v.as_i64()
                .ok_or_else(|| format!("id {v} is not an integer"))?,
        ),
    };
    let image_path = match field("image_path") {
        Value::String(p) if !p.is_empty() => p.clone(),
        v => return Err(format!("image_path {v} is not a non-empty string")),
    };
    let target = match field("target").as_i64() {
        Some(t) if t >= 0 => t,
        _ => {
            return Err(format!(
                "target {} is not a class index (an integer ≥ 0)",
                field("target")
            ))
        }
    };
    Ok(SampleRecord {
        id,
        timestamp: parse_timestamp(field("timestamp"))?,
        image_path,
        target,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SampleStatus, Split};

    fn sample() -> Sample {
        Sample {
            id: 7,
            key: "k".into(),
            timestamp: "2024-03-05T09:08:07Z".into(),
            image_path: "/data/a \"b\".png".into(),
            sha256: None,
            label_given: 3,
            label_true: None,
            label_verified: None,
            source: "monday".into(),
            split: Split::Train,
            status: SampleStatus::Accepted,
        }
    }

    #[test]
    fn connect_envelope_exact_bytes() {
        let bytes = encode_sample(Format::ConnectJson, "fashion_mnist", &sample()).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"schema":{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"},{"type":"string","optional":true,"field":"timestamp"},{"type":"string","optional":true,"field":"image_path"},{"type":"int32","optional":true,"field":"target"}],"optional":false,"name":"fashion_mnist"},"payload":{"id":7,"timestamp":"2024-03-05 09:08:07.0","image_path":"/data/a \"b\".png","target":3}}"#
        );
        let plain = encode_sample(Format::Json, "x", &sample()).unwrap();
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            r#"{"id":7,"timestamp":"2024-03-05 09:08:07.0","image_path":"/data/a \"b\".png","target":3}"#
        );
    }

    #[test]
    fn round_trip_both_formats() {
        for format in [Format::ConnectJson, Format::Json] {
            let bytes = encode_sample(format, "d", &sample()).unwrap();
            assert_eq!(
                decode_sample(format, &bytes).unwrap(),
                SampleRecord {
                    id: Some(7),
                    timestamp: Some("2024-03-05T09:08:07Z".into()),
                    image_path: "/data/a \"b\".png".into(),
                    target: 3,
                }
            );
        }
    }

    #[test]
    fn timestamps_of_every_shape() {
        let ts = |v: Value| parse_timestamp(&v);
        let want = Ok(Some("2024-03-05T09:08:07Z".to_owned()));
        assert_eq!(ts(Value::from("2024-03-05 09:08:07.123")), want);
        assert_eq!(ts(Value::from("2024-03-05 09:08:07")), want);
        assert_eq!(ts(Value::from("2024-03-05T10:08:07+01:00")), want);
        assert_eq!(ts(Value::from(1_709_629_687_500_i64)), want);
        assert_eq!(ts(Value::Null), Ok(None));
        assert!(ts(Value::from("yesterday"))
            .unwrap_err()
            .contains("yesterday"));
    }

    #[test]
    fn malformed_records_say_why() {
        let err = |f, text: &str| decode_sample(f, text.as_bytes()).unwrap_err();
        assert!(err(Format::Json, "{oops").starts_with("not JSON"));
        assert!(err(Format::Json, "[1]").contains("not a JSON object: an array"));
        assert!(err(Format::ConnectJson, r#"{"id":1}"#).contains("payload"));
        assert!(err(Format::Json, r#"{"schema":{},"payload":{}}"#).contains("connect-json"));
        assert!(err(Format::Json, r#"{"image_path":"a.png","target":-1}"#).contains("target -1"));
        assert!(err(Format::Json, r#"{"image_path":"","target":1}"#).contains("image_path"));
        assert!(err(Format::Json, r#"{"image_path":"a","target":1,"id":"x"}"#).contains("id"));
    }

    #[test]
    fn values_beyond_int32_are_refused() {
        let mut s = sample();
        s.id = i64::from(i32::MAX) + 1;
        assert!(encode_sample(Format::Json, "d", &s)
            .unwrap_err()
            .contains("int32"));
    }

    #[test]
    fn prediction_envelope_exact_bytes() {
        let p = NewPrediction {
            timestamp: "2024-03-05T09:08:07Z".into(),
            sample_id: Some(12),
            request_id: Some("r-1".into()),
            model: "m".into(),
            version: 2,
            class: 4,
            probability: 0.5,
            latency_ms: 1.25,
        };
        let bytes = encode_prediction(Format::ConnectJson, "d_prediction", Some(3), &p).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"schema":{"type":"struct","fields":[{"type":"int32","optional":true,"field":"id"},{"type":"string","optional":true,"field":"timestamp"},{"type":"int32","optional":true,"field":"target"}],"optional":false,"name":"d_prediction"},"payload":{"id":12,"timestamp":"2024-03-05 09:08:07.0","target":4}}"#
        );
        let plain: Value =
            serde_json::from_slice(&encode_prediction(Format::Json, "d", Some(3), &p).unwrap())
                .unwrap();
        assert_eq!(plain["id"], 3);
        assert_eq!(plain["sample_id"], 12);
        assert_eq!(plain["target"], 4);
        assert_eq!(plain["probability"], 0.5);
    }
}
