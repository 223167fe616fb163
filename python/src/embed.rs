//! `Embedder`: a backbone loaded once (the library's `Embedder`), embedding image files (cache
//! included, as `bccp embed`) or uint8 pixel arrays. A Ray actor holds one.

use std::path::{Path, PathBuf};

use bccp::backbone::{BackboneError, EmbedderConfig};
use bccp::data::decode::check_image_size;
use bccp::data::ImageList;
use bccp::progress::Progress;
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use numpy::{PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{to_matrix, to_vector};
use crate::errors::{compute, input_error, Failure};

/// Whether a backbone failure is the caller's (bad name, size, weights file) or not.
pub fn backbone_failure(e: BackboneError) -> Failure {
    match e {
        BackboneError::Io { .. }
        | BackboneError::Cache { .. }
        | BackboneError::NonFinite { .. }
        | BackboneError::Width { .. }
        | BackboneError::Tensor(_) => Failure::runtime(e),
        _ => Failure::input(e),
    }
}

/// The device named as `--device` names it.
pub fn device(name: &str) -> PyResult<Device> {
    bccp::device::parse_device(name).map_err(|e| Failure::input(e).into())
}

/// An embedder for `backbone` with the command line's options.
#[allow(clippy::too_many_arguments)]
fn config(
    backbone: &str,
    weights: Option<PathBuf>,
    image_size: Option<u32>,
    batch_size: usize,
    device_name: &str,
    cache_dir: Option<PathBuf>,
    offline: bool,
    skip_bad: bool,
) -> PyResult<EmbedderConfig> {
    if batch_size == 0 {
        return input_error("batch_size must be 1 or more");
    }
    Ok(EmbedderConfig {
        weights,
        image_size,
        offline,
        device: device(device_name)?,
        cache_dir,
        batch_size,
        skip_bad,
        ..EmbedderConfig::new(backbone)
    })
}

/// One pixel array as an image: [H, W] or [H, W, 1] grey, [H, W, 3] RGB, [H, W, 4] RGBA.
pub fn to_image(a: &PyReadonlyArrayDyn<'_, u8>, i: usize) -> PyResult<DynamicImage> {
    let shape = a.shape().to_vec();
    let bad = || {
        input_error(format!(
            "images[{i}] has shape {shape:?}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8"
        ))
    };
    let (h, w, c) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] if matches!(c, 1 | 3 | 4) => (*h, *w, *c),
        _ => return bad(),
    };
    let (Ok(hu), Ok(wu)) = (u32::try_from(h), u32::try_from(w)) else {
        return bad();
    };
    if h == 0 || w == 0 {
        return bad();
    }
    check_image_size(Path::new(&format!("images[{i}]")), wu, hu).map_err(Failure::input)?;
    let pixels = match a.as_slice() {
        Ok(p) => p.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    };
    let image = match c {
        1 => image::GrayImage::from_raw(wu, hu, pixels).map(DynamicImage::ImageLuma8),
        3 => image::RgbImage::from_raw(wu, hu, pixels).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(wu, hu, pixels).map(DynamicImage::ImageRgba8),
    };
    match image {
        Some(img) => Ok(img),
        None => bad(),
    }
}

/// A backbone of the zoo, resolved, hashed and loaded once, embedding batch after batch.
#[pyclass(module = "bccp", frozen)]
pub struct Embedder {
    inner: bccp::backbone::Embedder,
    batch_size: usize,
    device: Device,
}

#[pymethods]
impl Embedder {
    /// `bccp embed`'s options: the zoo backbone, local `weights`, the input `image_size`, the
    /// batch size, the device, the embedding cache folder (None: no cache), offline hub
    /// lookups, and skipping unreadable files.
    #[new]
    #[pyo3(signature = (backbone="mobilenet_v2", weights=None, image_size=None, batch_size=32, device="cpu", cache_dir=None, offline=false, skip_bad=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backbone: &str,
        weights: Option<PathBuf>,
        image_size: Option<u32>,
        batch_size: usize,
        device: &str,
        cache_dir: Option<PathBuf>,
        offline: bool,
        skip_bad: bool,
    ) -> PyResult<Self> {
        let cfg = config(
            backbone, weights, image_size, batch_size, device, cache_dir, offline, skip_bad,
        )?;
        let device = cfg.device.clone();
        let inner = compute(py, || {
            let e = bccp::backbone::Embedder::new(&cfg).map_err(backbone_failure)?;
            // Loaded now, once, rather than inside the first batch.
            e.backbone().map_err(backbone_failure)?;
            Ok(e)
        })?;
        Ok(Self {
            inner,
            batch_size,
            device,
        })
    }

    /// The zoo name of the backbone.
    #[getter]
    fn name(&self) -> String {
        self.inner.spec().name.clone()
    }

    /// Width of an embedding.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.spec().embedding_dim
    }

    /// SHA-256 of the weights file (recorded in `bccp embed`'s files).
    #[getter]
    fn weights_sha256(&self) -> String {
        self.inner.weights_sha256().to_owned()
    }

    /// Embeds image files: (embeddings float32 [n, D], positions int64 [n] of the files
    /// embedded: all of them unless `skip_bad` skipped some).
    #[allow(clippy::type_complexity)]
    fn embed_paths<'py>(
        &self,
        py: Python<'py>,
        paths: Vec<PathBuf>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, numpy::PyArray1<i64>>)> {
        if paths.is_empty() {
            return input_error("paths is empty: give at least one image");
        }
        let embedder = &self.inner;
        let (values, kept) = compute(py, move || {
            let list = ImageList {
                recorded_paths: paths.iter().map(|p| p.display().to_string()).collect(),
                targets: vec![0; paths.len()],
                ids: Some((0..paths.len() as i64).collect()),
                classes: Vec::new(),
                skipped: Vec::new(),
                files: paths,
            };
            let (set, _) = embedder
                .embed(&list, &Progress::hidden())
                .map_err(backbone_failure)?;
            let values = set
                .embeddings
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(Failure::runtime)?;
            Ok((values, set.ids.unwrap_or_default()))
        })?;
        let n = kept.len();
        Ok((to_matrix(py, values, n, self.dim())?, to_vector(py, kept)))
    }

    /// Embeds uint8 pixel arrays (each [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]) exactly as
    /// their decoded files would be, in batches: embeddings float32 [n, D].
    fn embed_arrays<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyArrayDyn<u8>>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if images.is_empty() {
            return input_error("images is empty: give at least one image");
        }
        let decoded = images
            .iter()
            .enumerate()
            .map(|(i, a)| to_image(&a.readonly(), i))
            .collect::<PyResult<Vec<_>>>()?;
        let (n, dim, batch) = (decoded.len(), self.dim(), self.batch_size);
        let (embedder, device) = (&self.inner, &self.device);
        let values = compute(py, move || {
            let net = embedder.backbone().map_err(backbone_failure)?;
            let pre = *embedder.preprocess();
            let mut values = Vec::with_capacity(n * dim);
            for chunk in decoded.chunks(batch) {
                let pixels: Vec<f32> = chunk.iter().flat_map(|img| pre.apply(img)).collect();
                let shape = (chunk.len(), 3, pre.height as usize, pre.width as usize);
                let y = Tensor::from_vec(pixels, shape, &Device::Cpu)
                    .and_then(|x| x.to_device(device))
                    .and_then(|x| net.embed(&x))
                    .and_then(|y| y.to_dtype(DType::F32))
                    .and_then(|y| y.flatten_all())
                    .and_then(|y| y.to_vec1::<f32>())
                    .map_err(Failure::runtime)?;
                if let Some(bad) = y.iter().position(|v| !v.is_finite()) {
                    return Err(Failure::runtime(format!(
                        "backbone {} produced a non-finite embedding (NaN or infinity) for images[{}]; the weights may be corrupt",
                        embedder.spec().name,
                        values.len() / dim + bad / dim
                    )));
                }
                values.extend(y);
            }
            Ok(values)
        })?;
        to_matrix(py, values, n, dim)
    }
}
