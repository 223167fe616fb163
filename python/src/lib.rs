//! `bccp._bccp`: the native part of the Python package `bccp`, built from the same crate as
//! the command line with pyo3 + maturin (abi3). Each module wraps one library entry point:
//! numpy arrays in and out (borrowed when contiguous, returned without copying the result),
//! the GIL released while the library computes, every library error raised as a
//! `bccp.BccpError` with the library's own message.

mod arrays;
mod confident;
mod cutoff;
mod embed;
mod errors;
mod files;
mod run;
mod sampling;
mod search;
mod shard;

use pyo3::prelude::*;

#[pymodule]
fn _bccp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(search::closest, m)?)?;
    m.add_function(wrap_pyfunction!(confident::find_label_issues, m)?)?;
    m.add_function(wrap_pyfunction!(cutoff::cutoff_scores, m)?)?;
    m.add_class::<embed::Embedder>()?;
    m.add_function(wrap_pyfunction!(files::load_embeddings, m)?)?;
    m.add_function(wrap_pyfunction!(files::image_list, m)?)?;
    m.add_function(wrap_pyfunction!(sampling::replay_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(sampling::buffer_neighbours, m)?)?;
    m.add_function(wrap_pyfunction!(shard::shard_range, m)?)?;
    m.add_function(wrap_pyfunction!(shard::search_shard, m)?)?;
    m.add_function(wrap_pyfunction!(shard::merge_topk, m)?)?;
    m.add_function(wrap_pyfunction!(shard::load_topk, m)?)?;
    m.add_function(wrap_pyfunction!(shard::save_topk, m)?)?;
    m.add_class::<run::Run>()?;
    Ok(())
}
