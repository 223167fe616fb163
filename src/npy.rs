//! NumPy `.npy` files (format versions 1–3, C order, little-endian): reading numeric arrays
//! as f64 and writing boolean masks, so `bccp label-issues` swaps in for cleanlab.

use std::path::Path;

use crate::fsutil::write_atomic;

/// Why a `.npy` file cannot be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {error}")]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a usable .npy file: {why}")]
    Format {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("cannot write a .npy array: {0}")]
    Write(String),
}

type Result<T> = std::result::Result<T, NpyError>;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A numeric array read from a `.npy` file, values widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// The value of `key` in the header dictionary, e.g. `'descr': '<f4'` → `'<f4'`.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

fn parse_shape(text: &str) -> Option<Vec<usize>> {
    text.trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// Reads a numeric or boolean `.npy` array; errors name the file and what is wrong.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|error| NpyError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let bad = |why: &str| NpyError::Format {
        path: path.to_path_buf(),
        why: why.to_owned(),
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("no NumPy magic header"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("format version {v} is not supported"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let descr = header_value(header, "descr")
        .map(|d| d.trim_matches(['\'', '"']))
        .ok_or_else(|| bad("no descr in the header"))?;
    if header_value(header, "fortran_order") != Some("False") {
        return Err(bad(
            "Fortran-ordered arrays are not supported (save with np.ascontiguousarray)",
        ));
    }
    let shape = header_value(header, "shape")
        .and_then(parse_shape)
        .ok_or_else(|| bad("no readable shape in the header"))?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    let width = match &descr[1..] {
        "f8" | "i8" | "u8" => 8,
        "f4" | "i4" | "u4" => 4,
        "i2" | "u2" => 2,
        "i1" | "u1" | "b1" => 1,
        _ => {
            return Err(bad(&format!(
                "dtype {descr} is not supported (use float32/float64 or an integer type)"
            )))
        }
    };
    if width > 1 && descr.starts_with('>') {
        return Err(bad("big-endian data is not supported"));
    }
    if data.len() < count * width {
        return Err(bad(&format!(
            "{} bytes of data for shape {shape:?} of {descr}",
            data.len()
        )));
    }
    let values = data[..count * width]
        .chunks_exact(width)
        .map(|c| match (&descr[1..], c) {
            ("f8", c) => f64::from_le_bytes(c.try_into().unwrap_or_default()),
            ("i8", c) => i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("u8", c) => u64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("f4", c) => f32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("i4", c) => i32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("u4", c) => u32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("i2", c) => i16::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("u2", c) => u16::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
            ("i1", c) => c[0] as i8 as f64,
            (_, c) => c[0] as f64,
        })
        .collect();
    Ok(Array { shape, values })
}

/// The bytes of a format-1.0 `.npy` file: header (padded with spaces to a multiple of 64
/// bytes, ending in a newline), then `data` in C order.
fn encode(descr: &str, shape: &[usize], data: &[u8]) -> Result<Vec<u8>> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    let header = format!("{dict}{}\n", " ".repeat((64 - unpadded % 64) % 64));
    let Ok(len) = u16::try_from(header.len()) else {
        return Err(NpyError::Write("header too long".into()));
    };
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes).map_err(|error| NpyError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Writes a 1-D boolean array (`dtype=bool`) atomically.
pub fn write_bool(path: &Path, mask: &[bool]) -> Result<()> {
    let data: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
    write(path, &encode("|b1", &[mask.len()], &data)?)
}

/// Writes a float64 array of `shape` (C order) atomically.
pub fn write_f64(path: &Path, shape: &[usize], values: &[f64]) -> Result<()> {
    if shape.iter().product::<usize>() != values.len() {
        return Err(NpyError::Write(format!(
            "{} values for shape {shape:?}",
            values.len()
        )));
    }
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, &encode("<f8", shape, &data)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 file as NumPy writes it.
    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
        let header = format!("{dict}{}\n", " ".repeat(pad));
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_floats_and_ints_and_round_trips_masks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<u8> = [0.25f32, 0.75, 1.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&p, npy("<f4", "(2, 2)", &data)).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 2]);
        assert_eq!(a.values, vec![0.25, 0.75, 1.0, 0.0]);

        let data: Vec<u8> = [3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, npy("<i8", "(2,)", &data)).unwrap();
        assert_eq!(read(&p).unwrap().values, vec![3.0, -1.0]);

        write_bool(&p, &[true, false, true]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 3) % 64, 0, "header padded to 64 bytes");
        let m = read(&p).unwrap();
        assert_eq!((m.shape, m.values), (vec![3], vec![1.0, 0.0, 1.0]));
    }

    #[test]
    fn bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.npy");
        std::fs::write(&p, b"hello").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("magic"));
        std::fs::write(&p, npy("<c8", "(1,)", &[0; 8])).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("dtype <c8"));
        std::fs::write(&p, npy("<f8", "(4,)", &[0; 8])).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("bytes of data"));
    }
}
