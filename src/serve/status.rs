//! The read-only status endpoints (`/healthz`, `/readyz`, `/model`, `/metrics`) and
//! `POST /admin/reload`.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::state::AppState;

/// The process is up.
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    state.metrics.count_request("/healthz", 200);
    Json(json!({"status": "ok"})).into_response()
}

/// A model is loaded and passed its self-test (503 with the reason otherwise).
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let response = match state.model.current() {
        Some(m) => Json(json!({
            "ready": true,
            "model": m.info.name,
            "version": m.info.version,
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "status": 503,
                "error": "unavailable",
                "message": format!("no model is served yet: {}", state.model.not_ready()),
            })),
        )
            .into_response(),
    };
    state
        .metrics
        .count_request("/readyz", response.status().as_u16());
    response
}

/// The model served: name, version, alias, backbone, classes, when it was loaded.
pub(crate) async fn model(State(state): State<AppState>) -> Response {
    let response = match state.model.current() {
        Some(m) => Json(&m.info).into_response(),
        None => ApiError::unavailable(format!(
            "no model is served yet: {}",
            state.model.not_ready()
        ))
        .into_response(),
    };
    state
        .metrics
        .count_request("/model", response.status().as_u16());
    response
}

/// The Prometheus exposition.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.count_request("/metrics", 200);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// Checks the followed alias now (and retries a version that failed before).
pub(crate) async fn reload(State(state): State<AppState>) -> Response {
    let response = match state.reloader.force() {
        Some(rx) => match rx.await {
            Ok(outcome) => {
                let code = if outcome.result == "failed" {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                (code, Json(outcome)).into_response()
            }
            Err(_) => ApiError::unavailable("the reload thread stopped").into_response(),
        },
        None => ApiError::unavailable("the reload thread stopped").into_response(),
    };
    state
        .metrics
        .count_request("/admin/reload", response.status().as_u16());
    response
}
