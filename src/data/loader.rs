//! Decode + preprocess images into NCHW f32 tensors, in parallel, one batch ahead of the model.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use rayon::prelude::*;

use super::decode::decode_image;
use super::error::{DataError, Result};
use super::resize::resize_normalised;

/// How an image becomes model input: RGB, resized to `width`×`height` (bilinear), scaled to
/// [0, 1], then normalised per channel with `mean` and `std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// ImageNet normalisation (torchvision's constants) at `size`×`size`.
    pub fn imagenet(size: u32) -> Self {
        Self {
            width: size,
            height: size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Values per image (3·H·W).
    pub fn len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// Always false: a preprocessed image has at least one pixel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the parameters: positive size and standard deviations.
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 {
            return Err(DataError::invalid(
                "input size",
                format!("{}x{}", self.width, self.height),
                "positive width and height",
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(DataError::invalid(
                "normalisation",
                format!("mean {:?} std {:?}", self.mean, self.std),
                "finite means and positive standard deviations",
            ));
        }
        Ok(())
    }

    /// Converts a decoded image into CHW floats (grey is expanded to RGB; an image with alpha
    /// is composited over white, as viewers show it — dropping alpha would turn a transparent
    /// background black, often the colour of the drawing's own outlines).
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = flatten_on_white(img);
        if rgb.dimensions() != (self.width, self.height) {
            let (w, h) = (self.width as usize, self.height as usize);
            return resize_normalised(&rgb, w, h, self.mean, self.std);
        }
        let plane = self.width as usize * self.height as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(p.0[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// The image as RGB, alpha (if any) composited over white.
pub fn flatten_on_white(img: &DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    image::RgbImage::from_fn(w, h, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = u32::from(a);
        let over = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([over(r), over(g), over(b)])
    })
}

/// A decoded batch in host memory.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// NCHW values of the images that decoded.
    pub pixels: Vec<f32>,
    /// Positions (in the loader's path list) of the images in `pixels`, in order.
    pub indices: Vec<usize>,
    /// Images skipped because they could not be decoded (only with `skip_bad`).
    pub skipped: Vec<(PathBuf, String)>,
}

impl HostBatch {
    /// The batch as an `[N, 3, H, W]` tensor on `device`.
    pub fn to_tensor(&self, pre: &Preprocess, device: &Device) -> candle_core::Result<Tensor> {
        let shape = (
            self.indices.len(),
            3,
            pre.height as usize,
            pre.width as usize,
        );
        Tensor::from_slice(&self.pixels, shape, &Device::Cpu)?.to_device(device)
    }
}

/// Where images are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeThreads {
    /// In parallel on rayon's pool (the default; best when the model runs on a GPU).
    Rayon,
    /// On the calling thread only. Use it when the model runs on candle's CPU ops: they
    /// synchronise their threads with spinning barriers, which decode threads competing for
    /// the same cores stall (measured: `bccp embed` on 2 cores, about 5% faster this way).
    Calling,
}

/// Decodes and preprocesses `paths[offset..offset + paths.len()]` in parallel with rayon.
pub fn load_batch(
    paths: &[PathBuf],
    offset: usize,
    pre: &Preprocess,
    skip_bad: bool,
) -> Result<HostBatch> {
    load_batch_on(paths, offset, pre, skip_bad, DecodeThreads::Rayon)
}

/// [`load_batch`] with the choice of threads.
pub fn load_batch_on(
    paths: &[PathBuf],
    offset: usize,
    pre: &Preprocess,
    skip_bad: bool,
    threads: DecodeThreads,
) -> Result<HostBatch> {
    let decode = |p: &PathBuf| decode_image(p).map(|img| pre.apply(&img));
    let decoded: Vec<Result<Vec<f32>>> = match threads {
        DecodeThreads::Rayon => paths.par_iter().map(decode).collect(),
        DecodeThreads::Calling => paths.iter().map(decode).collect(),
    };
    let mut batch = HostBatch {
        pixels: Vec::with_capacity(paths.len() * pre.len()),
        indices: Vec::with_capacity(paths.len()),
        skipped: Vec::new(),
    };
    for (k, (result, path)) in decoded.into_iter().zip(paths).enumerate() {
        match result {
            Ok(values) => {
                batch.pixels.extend_from_slice(&values);
                batch.indices.push(offset + k);
            }
            Err(e) if skip_bad && e.is_bad_image() => {
                batch.skipped.push((path.clone(), e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(batch)
}

/// Iterates over batches of images; a worker thread decodes the next batch while the caller
/// uses the current one. Stops after the first error.
pub struct BatchLoader {
    receiver: Option<Receiver<Result<HostBatch>>>,
    worker: Option<JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts decoding `paths` in batches of `batch_size` (at least 1), in parallel.
    pub fn new(
        paths: Vec<PathBuf>,
        batch_size: usize,
        pre: Preprocess,
        skip_bad: bool,
    ) -> Result<Self> {
        Self::with_threads(paths, batch_size, pre, skip_bad, DecodeThreads::Rayon)
    }

    /// [`BatchLoader::new`] with the choice of decode threads.
    pub fn with_threads(
        paths: Vec<PathBuf>,
        batch_size: usize,
        pre: Preprocess,
        skip_bad: bool,
        threads: DecodeThreads,
    ) -> Result<Self> {
        pre.validate()?;
        if batch_size == 0 {
            return Err(DataError::invalid(
                "--batch",
                0,
                "a batch size of 1 or more",
            ));
        }
        let (sender, receiver) = sync_channel(1);
        let worker = std::thread::spawn(move || {
            for (b, chunk) in paths.chunks(batch_size).enumerate() {
                let batch = load_batch_on(chunk, b * batch_size, &pre, skip_bad, threads);
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        Ok(Self {
            receiver: Some(receiver),
            worker: Some(worker),
        })
    }
}

impl Iterator for BatchLoader {
    type Item = Result<HostBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.receiver.as_ref()?.recv().ok();
        if item.is_none() {
            self.receiver = None;
            if let Some(worker) = self.worker.take() {
                let _ = worker.join();
            }
        }
        item
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Closing the channel makes the worker stop at its next send.
        self.receiver = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    #[test]
    fn alpha_is_composited_over_white() {
        // Opaque red, transparent black, half-transparent black, and grey with alpha 0.
        let rgba = image::RgbaImage::from_vec(
            4,
            1,
            vec![255, 0, 0, 255, 0, 0, 0, 0, 0, 0, 0, 128, 10, 20, 30, 0],
        )
        .unwrap();
        let flat = flatten_on_white(&DynamicImage::ImageRgba8(rgba));
        // 255·(255 − 128) / 255 = 127 (+ rounding: (32385 + 127) / 255 = 127).
        assert_eq!(
            flat.into_raw(),
            vec![255, 0, 0, 255, 255, 255, 127, 127, 127, 255, 255, 255]
        );
        let la = image::GrayAlphaImage::from_vec(1, 1, vec![0, 0]).unwrap();
        assert_eq!(
            flatten_on_white(&DynamicImage::ImageLumaA8(la)).into_raw(),
            vec![255, 255, 255]
        );
        // No alpha: unchanged.
        let rgb = RgbImage::from_vec(1, 1, vec![1, 2, 3]).unwrap();
        assert_eq!(
            flatten_on_white(&DynamicImage::ImageRgb8(rgb)).into_raw(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn normalises_exact_values_and_expands_grey() {
        let pre = Preprocess {
            width: 2,
            height: 1,
            mean: [0.5, 0.0, 0.25],
            std: [0.5, 1.0, 0.25],
        };
        let img = DynamicImage::ImageRgb8(
            RgbImage::from_vec(2, 1, vec![255, 0, 51, 0, 255, 102]).unwrap(),
        );
        let v = pre.apply(&img);
        // Channel-major: R of both pixels, then G, then B.
        let expect = [
            1.0,
            -1.0,
            0.0,
            1.0,
            (0.2 - 0.25) / 0.25,
            (0.4 - 0.25) / 0.25,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
        let grey = DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 1, Luma([255])));
        assert_eq!(pre.apply(&grey), vec![1.0, 1.0, 1.0, 1.0, 3.0, 3.0]);
    }

    #[test]
    fn resizes_bilinear() {
        let pre = Preprocess {
            width: 4,
            height: 4,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 2, Rgb([255, 255, 255])));
        assert!(pre.apply(&img).iter().all(|&v| (v - 1.0).abs() < 1e-6));
        let ramp =
            DynamicImage::ImageRgb8(RgbImage::from_fn(8, 1, |x, _| Rgb([x as u8 * 30, 0, 0])));
        let pre = Preprocess {
            width: 4,
            height: 1,
            ..pre
        };
        let r = &pre.apply(&ramp)[..4];
        assert!(r.windows(2).all(|w| w[0] < w[1]), "{r:?}");
    }

    fn write_pngs(dir: &std::path::Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{i}.png"));
                GrayImage::from_pixel(3, 3, Luma([i as u8 * 20]))
                    .save(&p)
                    .unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn batches_in_order_with_prefetch() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_pngs(dir.path(), 7);
        let pre = Preprocess {
            width: 3,
            height: 3,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let batches: Vec<_> = BatchLoader::new(paths, 3, pre, false)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let t = batches[1].to_tensor(&pre, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 3, 3, 3]);
        let first: f32 = t.get(0).unwrap().mean_all().unwrap().to_scalar().unwrap();
        assert!((first - 60.0 / 255.0).abs() < 1e-6);
        assert_eq!(batches[2].indices, vec![6]);
    }

    #[test]
    fn oversized_image_is_refused_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = write_pngs(dir.path(), 2);
        let bomb = dir.path().join("bomb.png");
        std::fs::write(
            &bomb,
            crate::data::decode::tests::png_declaring(16000, 14464),
        )
        .unwrap();
        paths.insert(1, bomb.clone());
        let pre = Preprocess::imagenet(4);
        for threads in [DecodeThreads::Rayon, DecodeThreads::Calling] {
            let err = load_batch_on(&paths, 0, &pre, false, threads).unwrap_err();
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
            let message = err.to_string();
            assert!(
                message.contains("bomb.png") && message.contains("MAX_IMAGE_PIXELS = 67108864"),
                "{message}"
            );
            let batch = load_batch_on(&paths, 10, &pre, true, threads).unwrap();
            assert_eq!(batch.indices, vec![10, 12]);
            assert_eq!(batch.skipped, vec![(bomb.clone(), message)]);
            assert_eq!(batch.pixels.len(), 2 * pre.len());
        }
    }

    #[test]
    fn bad_image_names_the_file_or_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = write_pngs(dir.path(), 4);
        let full = std::fs::read(&paths[0]).unwrap();
        let truncated = dir.path().join("truncated.png");
        std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
        let text = dir.path().join("text.png");
        std::fs::write(&text, b"hello").unwrap();
        paths.insert(1, truncated);
        paths.push(text);
        let pre = Preprocess::imagenet(4);
        let err = BatchLoader::new(paths.clone(), 2, pre, false)
            .unwrap()
            .find_map(|b| b.err())
            .unwrap()
            .to_string();
        assert!(err.contains("truncated.png"), "{err}");
        let batches: Vec<_> = BatchLoader::new(paths, 2, pre, true)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        let skipped: Vec<_> = batches
            .iter()
            .flat_map(|b| b.skipped.iter().map(|s| s.0.clone()))
            .collect();
        assert_eq!(skipped.len(), 2);
        assert!(skipped[1].ends_with("text.png"));
        let kept: Vec<_> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(kept, vec![0, 2, 3, 4]);
    }
}
