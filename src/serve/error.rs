//! Errors of the server: [`ServeError`] when it cannot start (a caller may match on them), and
//! [`ApiError`], one HTTP status and a JSON message per thing a request can get wrong.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {addr}: it is not a loopback address and no API token is set; \
         every endpoint that writes (/samples, /admin/*) needs one there: pass --token-file FILE \
         or set BCCP_API_TOKEN (at least {min} characters), or bind to 127.0.0.1"
    )]
    NoToken { addr: SocketAddr, min: usize },
    #[error("the API token is {len} characters long; use at least {min} (a random secret)")]
    WeakToken { len: usize, min: usize },
    #[error("invalid {name} {value}: {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: String,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start the server's {what}: {error}")]
    Runtime {
        what: &'static str,
        error: std::io::Error,
    },
    #[error("model {spec}: {error}")]
    Model {
        spec: String,
        error: Box<crate::registry::RegistryError>,
    },
    #[error("model {spec} failed its self-test: {message}")]
    SelfTest { spec: String, message: String },
    #[error("model {spec}: {message}")]
    Remote { spec: String, message: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the server stopped with an error: {0}")]
    Stopped(String),
}

impl ServeError {
    /// An invalid setting.
    pub fn invalid(name: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        Self::Invalid {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// An error answered to a request: a status code and a message, as JSON
/// `{"status": 415, "error": "not_an_image", "message": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// A short machine-readable kind.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: a write without the right bearer token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404: the image named does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413: a body, batch or image over its limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 415: not an image (or not a content type the endpoint takes).
    pub fn not_an_image(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_an_image", message)
    }

    /// 422: a well-formed request with a value out of range (a label).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
    }

    /// 503: no model loaded yet, the queue is full, or no store.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500: a failure of the server itself (the model, the store).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "status": self.status.as_u16(),
            "error": self.code,
            "message": self.message,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A bad image as an API error: missing → 404, over the pixel limit → 413, undecodable → 415,
/// not a regular file → 400.
impl From<crate::data::DataError> for ApiError {
    fn from(e: crate::data::DataError) -> Self {
        use crate::data::DataError;
        match &e {
            DataError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                ApiError::not_found(e.to_string())
            }
            DataError::BrokenLink { .. } => ApiError::not_found(e.to_string()),
            DataError::ImageTooLarge { .. } => ApiError::too_large(e.to_string()),
            DataError::Decode { .. } => ApiError::not_an_image(e.to_string()),
            DataError::NotAFile { .. } => ApiError::bad_request(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(format!("data store: {e}"))
    }
}
