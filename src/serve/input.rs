//! Request bodies into images: the body read under its size limit and a deadline (JSON,
//! multipart or raw `image/*` bytes), `image_path`s confined to `--image-root`, and strict
//! decoding with the image-size bound, off the async runtime and in parallel.

use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use image::DynamicImage;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::state::AppState;

/// A request body, by its content type.
pub(crate) enum Body {
    Json(serde_json::Value),
    Multipart(Vec<Part>),
    /// Raw `image/*` bytes.
    Image(Bytes),
}

/// One part of a multipart body.
pub(crate) struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub bytes: Bytes,
}

impl Part {
    /// Whether the part carries a file (an image) rather than a form field.
    pub fn is_file(&self) -> bool {
        self.filename.is_some() || matches!(self.name.as_str(), "image" | "file" | "images")
    }
}

/// One image named by a request.
pub(crate) enum ImageInput {
    /// `image_path`, relative to `--image-root`.
    Path(String),
    /// Uploaded bytes (`name` for messages).
    Bytes { bytes: Bytes, name: String },
}

/// Reads the body: JSON (`application/json`), multipart (`multipart/form-data`) or raw bytes
/// (`image/*`); 415 for any other content type, 413 over the body limit, 408 when the client
/// sends it slower than the deadline, 400 for malformed JSON or multipart.
pub(crate) async fn read_body(state: &AppState, request: Request) -> Result<Body, ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let deadline = state.config.body_timeout;
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs()
            ),
        )
    };
    if content_type.starts_with("multipart/form-data") {
        let max_parts = state.config.max_request_images + 8;
        let read = async {
            let mut multipart = Multipart::from_request(request, state)
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
            let mut parts = Vec::new();
            loop {
                let field = multipart.next_field().await.map_err(multipart_error)?;
                let Some(field) = field else { break };
                if parts.len() >= max_parts {
                    return Err(ApiError::too_large(format!(
                        "more than {max_parts} multipart parts; at most {} images per request \
                         (--max-request-images)",
                        state.config.max_request_images
                    )));
                }
                let name = field.name().unwrap_or("").to_owned();
                let filename = field.file_name().map(str::to_owned);
                let bytes = field.bytes().await.map_err(multipart_error)?;
                parts.push(Part {
                    name,
                    filename,
                    bytes,
                });
            }
            Ok(Body::Multipart(parts))
        };
        return tokio::time::timeout(deadline, read)
            .await
            .map_err(|_| timed_out())?;
    }
    let is_json = content_type.starts_with("application/json");
    let is_image = content_type.starts_with("image/");
    if !is_json && !is_image {
        return Err(ApiError::not_an_image(format!(
            "content type {:?} is not accepted: send application/json, multipart/form-data or \
             image/* (raw image bytes)",
            if content_type.is_empty() {
                "none"
            } else {
                content_type.as_str()
            }
        )));
    }
    let bytes = tokio::time::timeout(deadline, Bytes::from_request(request, state))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!(
                    "the request body is over the limit of {} bytes (--max-body-mib)",
                    state.config.max_body_bytes
                ))
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
    if is_image {
        return Ok(Body::Image(bytes));
    }
    serde_json::from_slice(&bytes)
        .map(Body::Json)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(e.body_text())
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// `given` (an `image_path`) under `root`: a relative path without `..`, whose real location
/// (links followed) is inside the root. 400 for anything else, 404 when it does not exist.
pub(crate) fn resolve_under(root: Option<&Path>, given: &str) -> Result<PathBuf, ApiError> {
    let Some(root) = root else {
        return Err(ApiError::bad_request(
            "image_path requests need the server started with --image-root DIR",
        ));
    };
    if given.is_empty() || given.contains('\0') {
        return Err(ApiError::bad_request(
            "image_path must be a non-empty relative path",
        ));
    }
    let rel = Path::new(given);
    let plain = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if rel.is_absolute() || !plain {
        return Err(ApiError::bad_request(format!(
            "image_path {given:?} must be relative to the image root, without '..'"
        )));
    }
    let canonical = match root.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!(
                "no image {given:?} under the image root"
            )))
        }
        Err(e) => return Err(ApiError::bad_request(format!("image_path {given:?}: {e}"))),
    };
    if !canonical.starts_with(root) {
        return Err(ApiError::bad_request(format!(
            "image_path {given:?} leads outside the image root (through a symbolic link)"
        )));
    }
    Ok(canonical)
}

/// The bytes of an input and the path it is known by (for messages and the store).
pub(crate) fn input_bytes(
    input: &ImageInput,
    root: Option<&Path>,
) -> Result<(Bytes, PathBuf), ApiError> {
    match input {
        ImageInput::Path(given) => {
            let path = resolve_under(root, given)?;
            let bytes = crate::data::decode::read_image_file(&path)?;
            Ok((Bytes::from(bytes), path))
        }
        ImageInput::Bytes { bytes, name } => Ok((bytes.clone(), PathBuf::from(name))),
    }
}

/// Strict decoding (truncated files refused) with the server's bound on width × height,
/// checked from the header before any pixel buffer is allocated.
pub(crate) fn decode_checked(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::not_an_image(format!(
            "{}: empty (0 bytes), not an image",
            path.display()
        )));
    }
    let dims = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    if let Some((w, h)) = dims {
        let pixels = u64::from(w) * u64::from(h);
        if pixels > max_pixels {
            return Err(ApiError::too_large(format!(
                "image {} is {w}×{h} = {pixels} pixels, over the limit of {max_pixels} \
                 (--max-image-pixels); it may be a decompression bomb",
                path.display()
            )));
        }
    }
    Ok(crate::data::decode::decode_bytes(bytes, path)?)
}

/// Runs `f` on the server's own thread pool (decoding in parallel, off the async runtime) and
/// awaits it.
pub(crate) async fn on_pool<T: Send + 'static>(
    pool: &rayon::ThreadPool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    pool.spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(result);
    });
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        _ => Err(ApiError::internal("a decoding task failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/x.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.png"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("out.png")).unwrap();
        let root = root.canonicalize().unwrap();
        let ok = resolve_under(Some(&root), "a/x.png").unwrap();
        assert_eq!(ok, root.join("a/x.png"));
        assert!(resolve_under(Some(&root), "./a/x.png").is_ok());
        for bad in [
            "../secret.png",
            "a/../../secret.png",
            "/etc/passwd",
            "",
            "a/\0x",
        ] {
            let e = resolve_under(Some(&root), bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}: {e}");
        }
        let e = resolve_under(Some(&root), "out.png").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("outside"), "{e}");
        let e = resolve_under(Some(&root), "a/missing.png").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = resolve_under(None, "a/x.png").unwrap_err();
        assert!(e.message.contains("--image-root"), "{e}");
    }

    #[test]
    fn bad_bytes_get_their_status() {
        let p = Path::new("upload");
        assert_eq!(
            decode_checked(b"", p, 100).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            decode_checked(b"hello, not a png", p, 100)
                .unwrap_err()
                .status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let bomb = crate::data::decode::tests::png_declaring(16000, 14464);
        assert_eq!(
            decode_checked(&bomb, p, 1 << 24).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let png = crate::data::decode::tests::encoded(image::ImageFormat::Png);
        assert!(decode_checked(&png, p, 1 << 24).is_ok());
        assert_eq!(
            decode_checked(&png[..png.len() / 2], p, 1 << 24)
                .unwrap_err()
                .status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // 64×48 over a bound of 1000 pixels.
        assert_eq!(
            decode_checked(&png, p, 1000).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
