//! Reading IDX files (the MNIST / Fashion-MNIST format, raw or gzip) and importing them as an
//! image folder of PNGs.
//!
//! An IDX file is a big-endian header — two zero bytes, a type byte (0x08 = unsigned byte),
//! the number of dimensions — then one u32 per dimension, then the data in row-major order.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::ImageEncoder;
use rayon::prelude::*;

use super::error::{DataError, Result};
use crate::fsutil::{is_absent_or_empty, StagedDir};
use crate::progress::Progress;

/// An unsigned-byte IDX array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a file, un-gzipping it when it starts with the gzip magic bytes.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    super::decode::check_regular_file(path)?;
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Idx {
                path: path.to_path_buf(),
                message: format!("corrupt gzip data: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes; `path` is used in error messages.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    let error = |message: String| DataError::Idx {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(error(format!(
            "wrong magic number {:02x?}: an IDX file starts with 00 00 <type> <dims>",
            &bytes[..bytes.len().min(4)]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(error(format!(
            "element type 0x{:02x} is not supported (only 0x08, unsigned byte)",
            bytes[2]
        )));
    }
    let ndims = usize::from(bytes[3]);
    let header = 4 + 4 * ndims;
    if ndims == 0 || bytes.len() < header {
        return Err(error(format!("truncated header ({ndims} dimensions)")));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims.iter().product::<usize>();
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(error(format!(
            "dimensions {dims:?} need {expected} data bytes, found {}",
            data.len()
        )));
    }
    Ok(IdxArray {
        dims,
        data: data.to_vec(),
    })
}

/// Reads an IDX file (raw or gzip).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(&read_maybe_gzip(path)?, path)
}

/// Parameters of `bccp import idx`.
#[derive(Debug, Clone)]
pub struct IdxImport {
    pub images: PathBuf,
    pub labels: PathBuf,
    /// Class names in label order (label k → folder `classes[k]`).
    pub classes: Vec<String>,
    pub out: PathBuf,
    pub force: bool,
}

/// Checks that a class name can be a folder name.
fn check_class_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0']);
    if bad {
        return Err(DataError::invalid(
            "class name",
            format!("{name:?}"),
            "a non-empty folder name without '/', '\\' or a leading '.'",
        ));
    }
    Ok(())
}

/// Writes `OUT/<class>/<index>.png` for every image (index zero-padded, 0-based in file
/// order). Returns the number of images per class.
pub fn import_idx(opts: &IdxImport, progress: &Progress) -> Result<Vec<usize>> {
    let images = read_idx(&opts.images)?;
    let labels = read_idx(&opts.labels)?;
    if images.dims.len() != 3 {
        return Err(DataError::Idx {
            path: opts.images.clone(),
            message: format!(
                "expected 3 dimensions (count, rows, columns), found {:?}",
                images.dims
            ),
        });
    }
    if labels.dims.len() != 1 {
        return Err(DataError::Idx {
            path: opts.labels.clone(),
            message: format!("expected 1 dimension (count), found {:?}", labels.dims),
        });
    }
    let (count, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    if rows == 0 || cols == 0 {
        return Err(DataError::Idx {
            path: opts.images.clone(),
            message: format!("its images are {rows}×{cols} pixels; both sides must be 1 or more"),
        });
    }
    if labels.dims[0] != count {
        return Err(DataError::invalid(
            "--labels",
            opts.labels.display(),
            format!(
                "it holds {} labels but --images holds {count} images",
                labels.dims[0]
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for name in &opts.classes {
        check_class_name(name)?;
        if !seen.insert(name) {
            return Err(DataError::invalid(
                "--classes",
                name,
                "class names must be distinct",
            ));
        }
    }
    let max_label = labels.data.iter().copied().max().map_or(0, usize::from);
    if max_label + 1 != opts.classes.len() {
        return Err(DataError::invalid(
            "--classes",
            format!("({} names)", opts.classes.len()),
            format!(
                "the labels take the values 0..={max_label}, so exactly {} names are needed",
                max_label + 1
            ),
        ));
    }
    if !opts.force && !is_absent_or_empty(&opts.out).map_err(|e| DataError::io(&opts.out, e))? {
        return Err(DataError::OutputNotEmpty(opts.out.clone()));
    }
    let staged = StagedDir::create(&opts.out).map_err(|e| DataError::io(&opts.out, e))?;
    for name in &opts.classes {
        let dir = staged.path().join(name);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    }
    let width = count.saturating_sub(1).to_string().len().max(5);
    let pixels = rows * cols;
    progress.start(count as u64, "importing");
    (0..count).into_par_iter().try_for_each(|i| -> Result<()> {
        let class = &opts.classes[usize::from(labels.data[i])];
        let path = staged.path().join(class).join(format!("{i:0width$}.png"));
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(
                &images.data[i * pixels..(i + 1) * pixels],
                cols as u32,
                rows as u32,
                image::ExtendedColorType::L8,
            )
            .map_err(|e| DataError::Decode {
                path: path.clone(),
                message: format!("cannot encode: {e}"),
            })?;
        std::fs::write(&path, png).map_err(|e| DataError::io(&path, e))?;
        progress.inc(1);
        Ok(())
    })?;
    progress.finish();
    staged.commit().map_err(|e| DataError::io(&opts.out, e))?;
    let mut per_class = vec![0; opts.classes.len()];
    for &l in &labels.data {
        per_class[usize::from(l)] += 1;
    }
    Ok(per_class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("f.idx");
        let a = parse_idx(&idx_bytes(&[2, 1, 3], &[1, 2, 3, 4, 5, 6]), p).unwrap();
        assert_eq!(a.dims, vec![2, 1, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let err = parse_idx(&[0x1f, 0, 8, 1, 0, 0, 0, 0], p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.idx") && err.contains("magic"), "{err}");
        let err = parse_idx(&idx_bytes(&[4], &[1, 2]), p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("need 4 data bytes, found 2"), "{err}");
        let mut float = idx_bytes(&[1], &[0, 0, 0, 0]);
        float[2] = 0x0d;
        assert!(parse_idx(&float, p)
            .unwrap_err()
            .to_string()
            .contains("0x0d"));
    }

    #[test]
    fn imports_gzip_and_checks_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("img.idx.gz");
        let labels = dir.path().join("lab.idx");
        let pixels: Vec<u8> = (0..3 * 2 * 2).map(|v| v as u8 * 10).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &idx_bytes(&[3, 2, 2], &pixels)).unwrap();
        std::fs::write(&images, gz.finish().unwrap()).unwrap();
        std::fs::write(&labels, idx_bytes(&[3], &[1, 0, 1])).unwrap();
        let out = dir.path().join("out");
        let opts = IdxImport {
            images: images.clone(),
            labels: labels.clone(),
            classes: vec!["b".into(), "a".into()],
            out: out.clone(),
            force: false,
        };
        assert_eq!(import_idx(&opts, &Progress::hidden()).unwrap(), vec![1, 2]);
        let img = image::open(out.join("a/00002.png")).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(img.as_raw(), &vec![80, 90, 100, 110]);
        assert!(out.join("b/00001.png").exists());

        // Not empty without --force.
        assert!(import_idx(&opts, &Progress::hidden())
            .unwrap_err()
            .to_string()
            .contains("--force"));
        let wrong_classes = IdxImport {
            classes: vec!["only".into()],
            force: true,
            ..opts.clone()
        };
        assert!(import_idx(&wrong_classes, &Progress::hidden())
            .unwrap_err()
            .to_string()
            .contains("exactly 2 names are needed"));
        std::fs::write(&labels, idx_bytes(&[2], &[1, 0])).unwrap();
        let err = import_idx(
            &IdxImport {
                force: true,
                ..opts
            },
            &Progress::hidden(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("2 labels but --images holds 3"), "{err}");
    }
}
