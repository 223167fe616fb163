//! Decoding image files, with errors that name the file.

use std::path::Path;

use image::{DynamicImage, ImageReader};

use super::error::{DataError, Result};

/// Decodes the image at `path`, detecting the format from its content (not its extension).
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// Decodes an image from bytes read from `path` (the path is used in error messages).
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let error = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| error(e.to_string()))?;
    if reader.format().is_none() {
        return Err(error("not an image (unrecognised content)".into()));
    }
    reader.decode().map_err(|e| error(e.to_string()))
}
