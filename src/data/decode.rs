//! Decoding image files, with errors that name the file.
//!
//! Every image of the data layer is decoded here, under a size limit checked from the header
//! before any pixel buffer is allocated: a few-kilobyte file that declares 16000×14464 pixels
//! (a decompression bomb) is refused at the cost of reading its header.
//!
//! Only regular files are images ([`read_image_file`]): a FIFO, socket or device named like an
//! image would block or stream forever, so it is refused before it is opened. Decoding is
//! strict ([`decode_bytes`]): a JPEG or PNG whose data ends early (no end-of-image marker, no
//! `IEND` chunk) is refused, where the decoders would fill the missing rows with grey.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::error::{DataError, Result};

/// The largest image decoded, in pixels (width × height): 64 megapixels, e.g. 8192×8192.
/// Larger images fail with [`DataError::ImageTooLarge`], which `skip_bad` skips like any
/// undecodable image.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

/// Decodes the image at `path`, detecting the format from its content (not its extension).
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let bytes = read_image_file(path)?;
    decode_bytes(&bytes, path)
}

/// Refuses anything but a regular file (links are followed) before it is opened: a FIFO,
/// socket or device gives [`DataError::NotAFile`], a dangling or looping link
/// [`DataError::BrokenLink`] (both bad images, which `skip_bad` skips); another failure to
/// inspect the path (missing, no permission) is an I/O error.
pub fn check_regular_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) => Err(DataError::NotAFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        }),
        Err(error) => {
            let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if is_link {
                Err(DataError::BrokenLink {
                    path: path.to_path_buf(),
                    error,
                })
            } else {
                Err(DataError::io(path, error))
            }
        }
    }
}

/// The bytes of the image file at `path`, after [`check_regular_file`].
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    check_regular_file(path)?;
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// What a file that is not a regular file is, in words.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_char_device() {
            return "a character device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

/// True when a JPEG's marker structure reaches its end-of-image marker (0xFFD9): segments are
/// skipped by their lengths (so an embedded EXIF thumbnail's marker does not count) and
/// entropy-coded data up to the next marker. Bytes after the marker (padding, an appended
/// video) are allowed.
fn jpeg_reaches_end(b: &[u8]) -> bool {
    let mut pos = 2; // after SOI (0xFFD8), which the format guess has seen
    loop {
        // The next marker: 0xFF (any fill bytes), then its code.
        while pos < b.len() && b[pos] != 0xFF {
            pos += 1;
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&code) = b.get(pos) else {
            return false;
        };
        pos += 1;
        match code {
            0xD9 => return true,
            // Markers without a length: SOI, TEM, RSTn; a stuffed zero outside a scan.
            0xD8 | 0x01 | 0xD0..=0xD7 | 0x00 => continue,
            _ => {}
        }
        let Some(len) = b.get(pos..pos + 2) else {
            return false;
        };
        pos += usize::from(u16::from_be_bytes([len[0], len[1]]));
        if pos > b.len() {
            return false;
        }
        if code == 0xDA {
            // Entropy-coded data: up to a 0xFF that is not a stuffed zero or a restart marker.
            loop {
                let Some(k) = b[pos..].iter().position(|&v| v == 0xFF) else {
                    return false;
                };
                pos += k;
                match b.get(pos + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => pos += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// True when a PNG's chunks reach `IEND` (the whole chunk, CRC included); chunks are skipped
/// by their lengths, bytes after `IEND` are allowed.
fn png_reaches_end(b: &[u8]) -> bool {
    let mut pos = 8usize; // after the signature
    while let Some(header) = b.get(pos..pos + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let Some(next) = pos.checked_add(12).and_then(|p| p.checked_add(len)) else {
            return false;
        };
        if next > b.len() {
            return false;
        }
        if &header[4..8] == b"IEND" {
            return true;
        }
        pos = next;
    }
    false
}

/// Refuses dimensions over [`MAX_IMAGE_PIXELS`].
pub fn check_image_size(path: &Path, width: u32, height: u32) -> Result<()> {
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(DataError::ImageTooLarge {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    Ok(())
}

/// Decodes an image from bytes read from `path` (the path is used in error messages).
/// The dimensions are read from the header and checked with [`check_image_size`] first.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let error = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| error(e.to_string()))?;
    let complete = match reader.format() {
        None => return Err(error("not an image (unrecognised content)".into())),
        Some(image::ImageFormat::Jpeg) => jpeg_reaches_end(bytes),
        Some(image::ImageFormat::Png) => png_reaches_end(bytes),
        Some(_) => true,
    };
    if !complete {
        return Err(error(format!(
            "the data ends early ({} bytes, no end-of-image marker): the file is truncated",
            bytes.len()
        )));
    }
    // Building the decoder reads the header only.
    let decoder = reader.into_decoder().map_err(|e| error(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    check_image_size(path, width, height)?;
    // What `ImageReader::decode` also checks: the output buffer within the default allocation
    // limit (512 MiB; reached under the pixel limit only by 16- and 32-bit-per-channel images).
    Limits::default()
        .reserve(decoder.total_bytes())
        .map_err(|e| error(e.to_string()))?;
    DynamicImage::from_decoder(decoder).map_err(|e| error(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{ImageEncoder, Luma};

    /// A valid 1×1 grey PNG whose header then claims `width`×`height` pixels (CRC fixed up),
    /// as a decompression bomb would: tiny file, huge declared image.
    pub(crate) fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[0], 1, 1, image::ExtendedColorType::L8)
            .unwrap();
        // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), ... CRC at 29..33.
        assert_eq!(&png[12..16], b"IHDR");
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        png
    }

    #[test]
    fn refuses_images_over_the_pixel_limit_from_the_header() {
        let bomb = png_declaring(16000, 14464);
        assert!(bomb.len() < 100, "{} bytes", bomb.len());
        let path = Path::new("cat/bomb.png");
        let err = decode_bytes(&bomb, path).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ImageTooLarge {
                    width: 16000,
                    height: 14464,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "image cat/bomb.png is 16000×14464 = 231424000 pixels, over the limit \
             MAX_IMAGE_PIXELS = 67108864; it may be a decompression bomb"
        );
        assert!(err.is_bad_image());
    }

    #[test]
    fn limit_is_inclusive_and_small_images_decode() {
        let path = Path::new("x.png");
        assert!(check_image_size(path, 8192, 8192).is_ok());
        assert!(check_image_size(path, 1, 67_108_864).is_ok());
        assert!(check_image_size(path, 8193, 8192).is_err());
        assert!(check_image_size(path, u32::MAX, u32::MAX).is_err());
        let mut png = Vec::new();
        image::GrayImage::from_pixel(3, 2, Luma([7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let img = decode_bytes(&png, path).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (3, 2));
        assert!(img.pixels().all(|p| p.0 == [7]));
        // A header within the limit but no pixel data is an ordinary decode error.
        let err = decode_bytes(&png_declaring(100, 100), path).unwrap_err();
        assert!(matches!(err, DataError::Decode { .. }), "{err:?}");
    }

    /// A 64×48 colour pattern encoded as JPEG (with an EXIF-like APP1 segment holding a fake
    /// end-of-image marker, which must not count) or PNG.
    pub(crate) fn encoded(format: image::ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
        });
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), format)
            .unwrap();
        if format == image::ImageFormat::Jpeg {
            let app1 = [0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0xFF, 0xD9];
            out.splice(2..2, app1);
        }
        out
    }

    #[test]
    fn truncated_jpeg_and_png_are_refused() {
        let path = Path::new("cat/cut.jpg");
        for format in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
            let full = encoded(format);
            let img = decode_bytes(&full, path).unwrap();
            assert_eq!((img.width(), img.height()), (64, 48), "{format:?}");
            // Padding or an appended file after the end marker is fine.
            let mut padded = full.clone();
            padded.extend_from_slice(&[0; 100]);
            padded.extend_from_slice(b"trailing data");
            assert!(decode_bytes(&padded, path).is_ok(), "{format:?}");
            // Cut anywhere after the header, the end marker included: refused.
            for cut in [
                full.len() / 2,
                full.len() - 12,
                full.len() - 2,
                full.len() - 1,
            ] {
                let err = decode_bytes(&full[..cut], path).unwrap_err();
                assert!(
                    matches!(err, DataError::Decode { .. }),
                    "{format:?} {err:?}"
                );
                assert!(err.is_bad_image());
                let message = err.to_string();
                assert!(
                    message.contains("cat/cut.jpg") && message.contains("ends early"),
                    "{format:?} cut at {cut}: {message}"
                );
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.png");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let err = decode_image(&fifo).unwrap_err();
        assert!(matches!(err, DataError::NotAFile { .. }), "{err:?}");
        assert!(err.is_bad_image());
        let message = err.to_string();
        assert!(
            message.contains("f.png") && message.contains("FIFO"),
            "{message}"
        );
        assert!(read_image_file(dir.path()).is_err());
        // Manifests and IDX files are refused the same way.
        let err = crate::data::read_manifest(&fifo).unwrap_err();
        assert!(matches!(err, DataError::NotAFile { .. }), "{err:?}");

        let dangling = dir.path().join("gone.png");
        std::os::unix::fs::symlink(dir.path().join("missing.png"), &dangling).unwrap();
        let looping = dir.path().join("loop.png");
        std::os::unix::fs::symlink(&looping, &looping).unwrap();
        for link in [&dangling, &looping] {
            let err = decode_image(link).unwrap_err();
            assert!(matches!(err, DataError::BrokenLink { .. }), "{err:?}");
            assert!(err.is_bad_image());
            // The OS error is in the message, not repeated as a source.
            assert!(std::error::Error::source(&err).is_none());
            assert!(err.to_string().contains("os error"), "{err}");
        }
        // A missing file (not a link) stays an I/O error, which `skip_bad` does not skip.
        let err = decode_image(&dir.path().join("none.png")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }) && !err.is_bad_image());
        let good = dir.path().join("good.png");
        std::fs::write(&good, encoded(image::ImageFormat::Png)).unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(decode_image(&link).is_ok());
    }
}
