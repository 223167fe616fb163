//! Process set-up for fast CPU tensor work; call [`init`] first thing in `main`.

/// Tunes the allocator ([`crate::alloc::tune_for_tensors`]) and fixes the worker-thread count.
///
/// candle asks for its thread count on every CPU op; without `RAYON_NUM_THREADS` it counts
/// physical cores by parsing `/proc/cpuinfo` each time, which showed up in profiles of
/// `bccp embed`. We compute the count once (candle's own default) and export it, so rayon and
/// candle agree and the lookup is a cheap environment read. Must run before any thread starts.
pub fn init() {
    crate::alloc::tune_for_tensors();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Single-threaded at this point (start of main), as `set_var` requires.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
