//! `POST /predict`: the reference's `{"image_path": …}`, a JSON batch
//! `{"batch": [{"image_path": …}, …]}`, a multipart upload (one or more files) or raw `image/*`
//! bytes. Each image is decoded in parallel, queued for the batcher and answered with
//! `{target, class, probability, top_k, model, version, request_id}`; in a batch each image
//! has its own answer or error, so one bad image never fails the others.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use super::batcher::Job;
use super::error::ApiError;
use super::input::{self, Body, ImageInput};
use super::model::LoadedModel;
use super::state::AppState;
use crate::registry::Prediction;
use crate::store::NewPrediction;

/// One class and its probability.
#[derive(Debug, Serialize)]
pub(crate) struct ClassProbability {
    pub target: usize,
    pub class: String,
    pub probability: f32,
}

/// One image's answer.
#[derive(Debug, Serialize)]
pub(crate) struct Answer {
    /// The class index (the reference's name for it).
    pub target: usize,
    pub class: String,
    pub probability: f32,
    pub top_k: Vec<ClassProbability>,
    pub model: String,
    pub version: u32,
    pub request_id: String,
}

/// The request id a client sent (`X-Request-Id`, printable, at most 128 characters), or a new
/// one.
pub(crate) fn request_id(state: &AppState, headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| state.next_request_id())
}

pub(crate) async fn predict(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let id = request_id(&state, request.headers());
    let response = match answer(&state, request, &id, started).await {
        Ok(response) => response,
        Err(e) => {
            state.metrics.count_prediction("none", e.code);
            e.into_response()
        }
    };
    state
        .metrics
        .count_request("/predict", response.status().as_u16());
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The images a request names, and whether it is a batch (answered as a list).
fn images_of(
    body: Body,
    max: usize,
) -> Result<(Vec<Result<ImageInput, ApiError>>, bool), ApiError> {
    let too_many = |n: usize| {
        ApiError::too_large(format!(
            "{n} images in one request, over the limit of {max} (--max-request-images)"
        ))
    };
    match body {
        Body::Json(Value::Object(o)) if o.contains_key("image_path") => match &o["image_path"] {
            Value::String(s) => Ok((vec![Ok(ImageInput::Path(s.clone()))], false)),
            other => Err(ApiError::bad_request(format!(
                "image_path must be a string, not {other}"
            ))),
        },
        Body::Json(Value::Object(o)) if o.contains_key("batch") => {
            let Value::Array(items) = &o["batch"] else {
                return Err(ApiError::bad_request(
                    "batch must be a list of {\"image_path\": \"…\"} objects",
                ));
            };
            if items.is_empty() {
                return Err(ApiError::bad_request("batch is empty"));
            }
            if items.len() > max {
                return Err(too_many(items.len()));
            }
            let inputs = items
                .iter()
                .enumerate()
                .map(|(i, item)| match item.get("image_path") {
                    Some(Value::String(s)) => Ok(ImageInput::Path(s.clone())),
                    _ => Err(ApiError::bad_request(format!(
                        "batch item {i}: expected {{\"image_path\": \"…\"}}"
                    ))),
                })
                .collect();
            Ok((inputs, true))
        }
        Body::Json(_) => Err(ApiError::bad_request(
            "expected {\"image_path\": \"…\"} or {\"batch\": [{\"image_path\": \"…\"}, …]}",
        )),
        Body::Multipart(parts) => {
            let files: Vec<_> = parts.into_iter().filter(|p| p.is_file()).collect();
            if files.is_empty() {
                return Err(ApiError::bad_request(
                    "the multipart body has no file part (name it `image` or give a filename)",
                ));
            }
            if files.len() > max {
                return Err(too_many(files.len()));
            }
            let batch = files.len() > 1;
            let inputs = files
                .into_iter()
                .map(|p| {
                    Ok(ImageInput::Bytes {
                        name: p.filename.unwrap_or(p.name),
                        bytes: p.bytes,
                    })
                })
                .collect();
            Ok((inputs, batch))
        }
        Body::Image(bytes) => Ok((
            vec![Ok(ImageInput::Bytes {
                bytes,
                name: "upload".into(),
            })],
            false,
        )),
    }
}

/// Reads, decodes (in parallel) and preprocesses every image for `model`.
async fn decode_all(
    state: &AppState,
    model: &LoadedModel,
    inputs: Vec<Result<ImageInput, ApiError>>,
) -> Result<Vec<Result<Vec<f32>, ApiError>>, ApiError> {
    let pre = *model.run.preprocess();
    let root = state.image_root.clone();
    let max_pixels = state.config.max_image_pixels;
    input::on_pool(&state.pool, move || {
        inputs
            .into_par_iter()
            .map(|i| {
                let input = i?;
                let (bytes, path) = input::input_bytes(&input, root.as_deref())?;
                // Messages name the image as the client did, not where it lives here.
                let shown = match &input {
                    ImageInput::Path(given) => std::path::PathBuf::from(given),
                    ImageInput::Bytes { .. } => path,
                };
                let img = input::decode_checked(&bytes, &shown, max_pixels)?;
                Ok(pre.apply(&img))
            })
            .collect()
    })
    .await
}

async fn answer(
    state: &AppState,
    request: Request,
    id: &str,
    started: Instant,
) -> Result<Response, ApiError> {
    let model = state.model.current().ok_or_else(|| {
        ApiError::unavailable(format!(
            "no model is served yet: {}",
            state.model.not_ready()
        ))
    })?;
    let body = input::read_body(state, request).await?;
    let (inputs, batch) = images_of(body, state.config.max_request_images)?;
    let decoded = decode_all(state, &model, inputs).await?;
    let mut pending = Vec::with_capacity(decoded.len());
    for d in decoded {
        pending.push(match d {
            Ok(pixels) => {
                let (reply, rx) = oneshot::channel();
                let job = Job {
                    model: model.clone(),
                    pixels,
                    reply,
                };
                match state.batcher.submit(job) {
                    Ok(()) => Ok(rx),
                    Err(_) => Err(ApiError::unavailable(
                        "the server is overloaded (prediction queue full); retry later",
                    )),
                }
            }
            Err(e) => Err(e),
        });
    }
    let mut results = Vec::with_capacity(pending.len());
    for p in pending {
        let result = match p {
            Ok(rx) => match rx.await {
                Ok(Ok(prediction)) => Ok(prediction),
                Ok(Err(message)) => Err(ApiError::internal(format!("the model failed: {message}"))),
                Err(_) => Err(ApiError::unavailable("the server is shutting down")),
            },
            Err(e) => Err(e),
        };
        results.push(result);
    }
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let answers: Vec<Result<Answer, ApiError>> = results
        .into_iter()
        .map(|r| {
            r.map(|p| {
                record(state, &model, &p, id, latency_ms);
                to_answer(&model, p, state.config.top_k, id)
            })
            .inspect_err(|e| state.metrics.count_prediction("none", e.code))
        })
        .collect();
    if !batch {
        return match answers.into_iter().next() {
            Some(Ok(a)) => Ok(Json(a).into_response()),
            Some(Err(e)) => Ok(e.into_response()),
            None => Err(ApiError::internal("no answer")),
        };
    }
    let results: Vec<Value> = answers
        .into_iter()
        .map(|a| match a {
            Ok(a) => serde_json::to_value(a).unwrap_or(Value::Null),
            Err(e) => e.body(),
        })
        .collect();
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({
            "model": model.info.name,
            "version": model.info.version,
            "request_id": id,
            "results": results,
        })),
    )
        .into_response())
}

/// Counts and logs one prediction.
fn record(state: &AppState, model: &LoadedModel, p: &Prediction, id: &str, latency_ms: f64) {
    state.metrics.count_prediction(&p.class, "ok");
    if state.log.is_none() && state.kafka.is_none() {
        return;
    }
    let row = NewPrediction {
        timestamp: crate::store::now_utc(),
        sample_id: None,
        request_id: Some(id.to_owned()),
        model: model.info.name.clone(),
        version: i64::from(model.info.version),
        class: p.target as i64,
        probability: f64::from(p.probability),
        latency_ms,
    };
    if let Some(kafka) = &state.kafka {
        kafka.log(&row);
    }
    if let Some(log) = &state.log {
        log.log(row);
    }
}

fn to_answer(model: &LoadedModel, p: Prediction, k: usize, id: &str) -> Answer {
    let mut order: Vec<usize> = (0..p.probabilities.len()).collect();
    order.sort_by(|&a, &b| p.probabilities[b].total_cmp(&p.probabilities[a]));
    let classes = model.run.classes();
    Answer {
        top_k: order
            .into_iter()
            .take(k)
            .map(|t| ClassProbability {
                target: t,
                class: classes.get(t).cloned().unwrap_or_default(),
                probability: p.probabilities[t],
            })
            .collect(),
        target: p.target,
        class: p.class,
        probability: p.probability,
        model: model.info.name.clone(),
        version: model.info.version,
        request_id: id.to_owned(),
    }
}
