//! The partial top-k file: safetensors with `indices` (i64 [Q, k], global candidate ids, −1 =
//! none) and `values` (f32 [Q, k]; +∞ for L1 / L2 and −∞ for cosine in a "none" slot), and the
//! shard and [`TopKContext`] in its metadata (`format` = `bccp-topk/1`). `bccp closest` writes
//! it (a whole search is shard `0/1`), `bccp merge-topk` reads and writes it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{PartialTopK, ShardError, ShardSpec, TopKContext};
use crate::distance::Metric;

/// The `format` metadata value of a partial top-k file.
pub const FORMAT: &str = "bccp-topk/1";

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::L1 => "l1",
        Metric::L2 => "l2",
        Metric::Cosine => "cosine",
    }
}

impl PartialTopK {
    /// Writes the part (temporary file, then rename); equal parts give equal bytes.
    pub fn save(&self, path: &Path) -> Result<(), ShardError> {
        let err = |message: String| ShardError::File {
            path: path.to_path_buf(),
            message,
        };
        let (k, c) = (self.context.k, &self.context);
        let shape = (c.queries, k);
        let tensors = vec![
            (
                "indices".to_owned(),
                Tensor::from_slice(&self.indices, shape, &Device::Cpu)
                    .map_err(|e| err(e.to_string()))?,
            ),
            (
                "values".to_owned(),
                Tensor::from_slice(&self.values, shape, &Device::Cpu)
                    .map_err(|e| err(e.to_string()))?,
            ),
        ];
        let metadata: BTreeMap<&str, String> = [
            ("format", FORMAT.to_owned()),
            ("shard", self.shard.to_string()),
            ("k", k.to_string()),
            ("metric", metric_name(c.metric).to_owned()),
            ("other_class", c.other_class.to_string()),
            ("queries", c.queries.to_string()),
            ("queries_sha256", c.queries_sha256.clone()),
            ("candidate_rows", c.candidate_rows.to_string()),
            ("candidates_list_sha256", c.candidates_list_sha256.clone()),
            ("weights_sha256", c.weights_sha256.clone()),
        ]
        .into_iter()
        .collect();
        let bytes = crate::embeddings::serialize_safetensors(&tensors, &metadata).map_err(err)?;
        crate::fsutil::write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
    }

    /// Reads a part written by [`PartialTopK::save`].
    pub fn load(path: &Path) -> Result<Self, ShardError> {
        let err = |message: String| ShardError::File {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not a safetensors file ({e})")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key).cloned().ok_or_else(|| {
                err(format!(
                    "no `{key}` in its metadata: not a partial top-k file ({FORMAT}) of `bccp closest`"
                ))
            })
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(err(format!("format {format:?}, expected {FORMAT:?}")));
        }
        let number = |key: &str| -> Result<usize, ShardError> {
            let text = get(key)?;
            text.parse()
                .map_err(|_| err(format!("metadata `{key}` = {text:?} is not a count")))
        };
        let metric = match get("metric")?.as_str() {
            "l1" => Metric::L1,
            "l2" => Metric::L2,
            "cosine" => Metric::Cosine,
            other => return Err(err(format!("unknown metric {other:?} (l1, l2, cosine)"))),
        };
        let other_class = match get("other_class")?.as_str() {
            "true" => true,
            "false" => false,
            other => return Err(err(format!("metadata `other_class` = {other:?}"))),
        };
        let shard: ShardSpec = get("shard")?
            .parse()
            .map_err(|e: ShardError| err(e.to_string()))?;
        let context = TopKContext {
            k: number("k")?,
            metric,
            other_class,
            queries: number("queries")?,
            queries_sha256: get("queries_sha256")?,
            candidate_rows: number("candidate_rows")?,
            candidates_list_sha256: get("candidates_list_sha256")?,
            weights_sha256: get("weights_sha256")?,
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| err(format!("cannot read its tensors ({e})")))?;
        let shape = [context.queries, context.k];
        let tensor = |name: &str, dtype: DType| -> Result<Tensor, ShardError> {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(format!("no `{name}` tensor")))?;
            if t.dims() != shape || t.dtype() != dtype {
                return Err(err(format!(
                    "`{name}` must be {dtype:?} {shape:?}, found {:?} {:?}",
                    t.dtype(),
                    t.dims()
                )));
            }
            t.flatten_all().map_err(|e| err(e.to_string()))
        };
        let indices = tensor("indices", DType::I64)?
            .to_vec1::<i64>()
            .map_err(|e| err(e.to_string()))?;
        let values = tensor("values", DType::F32)?
            .to_vec1::<f32>()
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            shard,
            context,
            indices,
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let part = PartialTopK {
            shard: ShardSpec::new(1, 3).unwrap(),
            context: TopKContext {
                k: 2,
                metric: Metric::Cosine,
                other_class: true,
                queries: 2,
                queries_sha256: "ab".into(),
                candidate_rows: 9,
                candidates_list_sha256: "cd".into(),
                weights_sha256: "ef".into(),
            },
            indices: vec![3, -1, 5, 4],
            values: vec![0.5, f32::NEG_INFINITY, 0.25, 0.125],
        };
        let path = dir.path().join("p.safetensors");
        part.save(&path).unwrap();
        assert_eq!(PartialTopK::load(&path).unwrap(), part);
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = PartialTopK::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("p.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
    }
}
