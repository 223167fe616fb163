//! Random checkpoints of the zoo's networks, for tests that need their shapes but not trained
//! weights (the hub is not reachable from the tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bccp::backbone::{zoo, Backbone};
use candle_core::{DType, Device, Tensor};

/// Writes `name`'s checkpoint with random weights under its own tensor names to
/// `dir/<name>.safetensors`: batch-norm statistics away from the identity (so that folding is
/// exercised), convolution and linear weights of variance 1 / fan-in, norms' scales in
/// [0.5, 1.5], biases in ±0.2; any other tensor (class token, position embeddings, layer
/// scales) uniform in `others` when given, else the builder's zeros. Drawn in name order, so
/// the weights depend on `seed` alone.
pub fn random_checkpoint(name: &str, seed: u64, dir: &Path, others: Option<(f64, f64)>) -> PathBuf {
    let spec = zoo::find(name).unwrap();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Backbone::from_var_builder(&spec, vb).unwrap();
    let mut rng = bccp::rng::Rng::new(seed);
    let data = varmap.data().lock().unwrap();
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    let mut tensors = HashMap::new();
    for key in keys {
        let t = data[key].as_tensor().detach();
        let dims = t.dims().to_vec();
        let range = match key.rsplit('.').next() {
            Some("running_var") => Some((0.5, 2.0)),
            Some("running_mean") | Some("bias") => Some((-0.2, 0.2)),
            Some("weight") if dims.len() == 1 => Some((0.5, 1.5)),
            Some("weight") => {
                let a = (3.0 / (t.elem_count() / dims[0]) as f64).sqrt();
                Some((-a, a))
            }
            _ => others,
        };
        let t = match range {
            Some((lo, hi)) => {
                let v: Vec<f32> = (0..t.elem_count())
                    .map(|_| (lo + (hi - lo) * rng.unit_f64()) as f32)
                    .collect();
                Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
            }
            None => t,
        };
        tensors.insert(key.clone(), t);
    }
    let file = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&tensors, &file).unwrap();
    file
}
