//! Decoding image files, with errors that name the file.
//!
//! Every image of the data layer is decoded here, under a size limit checked from the header
//! before any pixel buffer is allocated: a few-kilobyte file that declares 16000×14464 pixels
//! (a decompression bomb) is refused at the cost of reading its header.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::error::{DataError, Result};

/// The largest image decoded, in pixels (width × height): 64 megapixels, e.g. 8192×8192.
/// Larger images fail with [`DataError::ImageTooLarge`], which `skip_bad` skips like any
/// undecodable image.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

/// Decodes the image at `path`, detecting the format from its content (not its extension).
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_bytes(&bytes, path)
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
    if reader.format().is_none() {
        return Err(error("not an image (unrecognised content)".into()));
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
}
