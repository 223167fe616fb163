//! `POST /samples`: a user's label for an image, written to the store as a new training
//! candidate for the next retrain cycle (the real-time data path of the loop). The image is an
//! `image_path` under `--image-root` (JSON `{"image_path": …, "label": …}`), an upload
//! (multipart: a file part and a `label` field) or raw `image/*` bytes with `?label=`. It is
//! hashed and strictly decoded as `bccp ingest` does; content already stored is a duplicate
//! (nothing written); an upload is kept under `--upload-dir` by its hash. The label is a class
//! index of the model served (its `target`) or a class name: anything else is 422.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::input::{self, Body, ImageInput};
use super::state::AppState;
use crate::store::{NewSample, SampleStatus, Split};

/// A label as sent.
pub(crate) enum Label {
    Index(i64),
    Name(String),
}

pub(crate) fn label_of(value: Option<&Value>) -> Result<Label, ApiError> {
    match value {
        Some(Value::Number(n)) => n.as_i64().map(Label::Index).ok_or_else(|| {
            ApiError::unprocessable(format!("label {n} is not a whole class index"))
        }),
        Some(Value::String(s)) => Ok(text_label(s)),
        Some(other) => Err(ApiError::unprocessable(format!(
            "label must be a class index or name, not {other}"
        ))),
        None => Err(ApiError::bad_request(
            "a sample needs a label (a class index or name)",
        )),
    }
}

/// A label given as text: a number is an index, anything else a name.
fn text_label(s: &str) -> Label {
    match s.trim().parse::<i64>() {
        Ok(i) => Label::Index(i),
        Err(_) => Label::Name(s.trim().to_owned()),
    }
}

pub(crate) async fn samples(State(state): State<AppState>, request: Request) -> Response {
    let response = match ingest(&state, request).await {
        Ok(r) => r,
        Err(e) => {
            if e.status != StatusCode::SERVICE_UNAVAILABLE && !e.status.is_server_error() {
                state.metrics.count_sample("rejected");
            }
            e.into_response()
        }
    };
    state
        .metrics
        .count_request("/samples", response.status().as_u16());
    response
}

async fn ingest(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let store = state
        .store
        .clone()
        .ok_or_else(|| ApiError::unavailable("the server has no data store (--db)"))?;
    let query_label = request.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "label")
            .map(|(_, v)| v.to_owned())
    });
    let body = input::read_body(state, request).await?;
    let (image, label) = match body {
        Body::Json(Value::Object(o)) => {
            let path = match o.get("image_path") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(ApiError::bad_request(
                        "expected {\"image_path\": \"…\", \"label\": …}",
                    ))
                }
            };
            (ImageInput::Path(path), label_of(o.get("label"))?)
        }
        Body::Json(_) => {
            return Err(ApiError::bad_request(
                "expected {\"image_path\": \"…\", \"label\": …}",
            ))
        }
        Body::Multipart(parts) => {
            let label = parts
                .iter()
                .find(|p| p.name == "label" && p.filename.is_none())
                .map(|p| text_label(&String::from_utf8_lossy(&p.bytes)))
                .ok_or_else(|| ApiError::bad_request("the multipart body has no `label` field"))?;
            let mut files = parts.into_iter().filter(|p| p.is_file());
            let (Some(file), None) = (files.next(), files.next()) else {
                return Err(ApiError::bad_request(
                    "a sample is one image: send exactly one file part",
                ));
            };
            let name = file.filename.unwrap_or(file.name);
            (
                ImageInput::Bytes {
                    bytes: file.bytes,
                    name,
                },
                label,
            )
        }
        Body::Image(bytes) => {
            let label = query_label
                .map(|v| text_label(&v))
                .ok_or_else(|| ApiError::bad_request("raw image bytes need ?label=CLASS"))?;
            (
                ImageInput::Bytes {
                    bytes,
                    name: "upload".into(),
                },
                label,
            )
        }
    };

    // The label space: the served model's classes (what /predict's `target` indexes), else the
    // store's.
    let classes = match state.model.current() {
        Some(m) => m.info.classes.clone(),
        None => {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                store
                    .lock()
                    .map_err(|_| ApiError::internal("the store connection is poisoned"))?
                    .classes()
                    .map_err(ApiError::from)
            })
            .await
            .map_err(|_| ApiError::internal("the store task failed"))??
        }
    };
    if classes.is_empty() {
        return Err(ApiError::unavailable(
            "no classes known yet (no model served and none in the store)",
        ));
    }
    let class = match label {
        Label::Index(i) if i >= 0 && (i as u64) < classes.len() as u64 => {
            classes[i as usize].clone()
        }
        Label::Index(i) => {
            return Err(ApiError::unprocessable(format!(
                "label {i} is out of range: the model has {} classes (0 to {})",
                classes.len(),
                classes.len() - 1
            )))
        }
        Label::Name(n) if classes.contains(&n) => n,
        Label::Name(n) => {
            return Err(ApiError::unprocessable(format!(
                "label {n:?} is not a class of the model ({})",
                classes.join(", ")
            )))
        }
    };

    // Read, hash and strictly decode, off the runtime.
    let root = state.image_root.clone();
    let max_pixels = state.config.max_image_pixels;
    let is_upload = matches!(image, ImageInput::Bytes { .. });
    let (bytes, path, sha, ext) = input::on_pool(&state.pool, move || {
        let (bytes, path) = input::input_bytes(&image, root.as_deref())?;
        let shown = match &image {
            ImageInput::Path(given) => std::path::PathBuf::from(given),
            ImageInput::Bytes { .. } => path.clone(),
        };
        input::decode_checked(&bytes, &shown, max_pixels)?;
        let sha = crate::hash::sha256_hex(&bytes);
        let ext = image::guess_format(&bytes)
            .ok()
            .and_then(|f| f.extensions_str().first().copied())
            .unwrap_or("img");
        Ok::<_, ApiError>((bytes, path, sha, ext))
    })
    .await??;

    let upload_dir = state.config.upload_dir.clone();
    let source = state.config.feedback_source.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut store = store
            .lock()
            .map_err(|_| ApiError::internal("the store connection is poisoned"))?;
        if store.known_hashes(std::slice::from_ref(&sha))?.contains(&sha) {
            return Ok::<_, ApiError>((
                "duplicate",
                json!({"status": "duplicate", "sha256": sha, "class": class}),
            ));
        }
        let image_path = if is_upload {
            let dir = upload_dir.join(&sha[..2]);
            let file = dir.join(format!("{sha}.{ext}"));
            std::fs::create_dir_all(&dir)
                .and_then(|_| crate::fsutil::write_atomic(&file, &bytes))
                .map_err(|e| ApiError::internal(format!("{}: {e}", file.display())))?;
            file
        } else {
            path
        };
        // The whole label space, in order: a fresh store gets the model's indexes.
        let indexes = store.ensure_classes(&classes)?;
        let label = classes
            .iter()
            .position(|c| *c == class)
            .and_then(|i| indexes.get(i).copied())
            .ok_or_else(|| ApiError::internal(format!("class {class:?} has no index")))?;
        let ids = store.insert_samples(&[NewSample {
            key: format!("content:{sha}"),
            timestamp: crate::store::now_utc(),
            image_path: image_path.to_string_lossy().into_owned(),
            sha256: Some(sha.clone()),
            label_given: label,
            label_true: None,
            source,
            split: Split::Train,
            status: SampleStatus::Accepted,
        }])?;
        Ok(match ids.first().copied().flatten() {
            Some(id) => (
                "accepted",
                json!({"status": "accepted", "id": id, "label": label, "class": class, "sha256": sha}),
            ),
            // Stored meanwhile by another request with the same content.
            None => (
                "duplicate",
                json!({"status": "duplicate", "sha256": sha, "class": class}),
            ),
        })
    })
    .await
    .map_err(|_| ApiError::internal("the store task failed"))??;
    state.metrics.count_sample(status);
    let code = if status == "accepted" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(body)).into_response())
}
