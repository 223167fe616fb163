//! The bearer token that guards every endpoint that writes, compared in constant time.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::config::MIN_TOKEN_LEN;
use super::error::{ApiError, ServeError};
use super::state::AppState;

/// A secret API token (never printed).
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A token of at least [`MIN_TOKEN_LEN`] characters (surrounding white space removed).
    pub fn new(text: &str) -> Result<Self, ServeError> {
        let text = text.trim();
        if text.chars().count() < MIN_TOKEN_LEN {
            return Err(ServeError::WeakToken {
                len: text.chars().count(),
                min: MIN_TOKEN_LEN,
            });
        }
        Ok(Self(text.to_owned()))
    }

    /// The token in `path` (its first line).
    pub fn from_file(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|error| ServeError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::new(text.lines().next().unwrap_or_default())
    }

    /// Whether `given` is the token; the time taken does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        self.0.as_bytes().ct_eq(given.as_bytes()).into()
    }
}

/// Lets a write through when no token is configured (loopback only, see
/// [`super::ServeConfig::check`]) or when `Authorization: Bearer TOKEN` matches; 401 otherwise,
/// before the body is read.
pub(crate) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.config.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if token.matches(given.trim()) => next.run(request).await,
        Some(_) => {
            state.metrics.count_auth_failure();
            ApiError::unauthorized("wrong API token").into_response()
        }
        None => {
            state.metrics.count_auth_failure();
            ApiError::unauthorized(
                "this endpoint writes: send the API token as `Authorization: Bearer TOKEN`",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly_and_short_ones_are_refused() {
        let t = Token::new("  correct-horse-battery-staple\n").unwrap();
        assert!(t.matches("correct-horse-battery-staple"));
        assert!(!t.matches("correct-horse-battery-stapl"));
        assert!(!t.matches("correct-horse-battery-staple!"));
        assert!(!t.matches(""));
        assert!(Token::new("short").is_err());
        assert_eq!(format!("{t:?}"), "Token(…)");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef\nignored\n").unwrap();
        assert!(Token::from_file(&path).unwrap().matches("0123456789abcdef"));
        assert!(Token::from_file(&dir.path().join("none")).is_err());
    }
}
