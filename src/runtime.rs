//! Process set-up for fast CPU tensor work; call [`init`] first thing in `main`.

/// Tunes the allocator ([`crate::alloc::tune_for_tensors`]) and fixes the worker-thread count.
///
/// candle asks for its thread count on every CPU op; without `RAYON_NUM_THREADS` it counts
/// physical cores by parsing `/proc/cpuinfo` each time, which showed up in profiles of
/// `bccp embed`. We compute the count once (candle's own default) and export it, so rayon and
/// candle agree and the lookup is a cheap environment read. Must run before any thread starts.
pub fn init() {
    crate::alloc::tune_for_tensors();
    clean_up_on_signals();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Single-threaded at this point (start of main), as `set_var` requires.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// The signal being handled (0: none).
static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether a SIGINT or SIGTERM is being handled: the clean-up thread removes the temporaries
/// and ends the process, so the caller should not exit first (call [`await_exit`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) != 0
}

/// Guards that asked for a graceful stop (see [`graceful_stop`]).
static GRACEFUL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The signal that asked a graceful stop (0: none).
static STOP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// While the returned guard lives, the first SIGINT or SIGTERM does not end the process: it
/// only sets [`stop_requested`], for a long-running command (a generator, an ingest) to finish
/// its current transaction and return normally. A second signal ends the process as usual.
pub fn graceful_stop() -> GracefulStop {
    GRACEFUL.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    GracefulStop(())
}

/// See [`graceful_stop`].
#[must_use = "the graceful stop lasts as long as the guard"]
pub struct GracefulStop(());

impl Drop for GracefulStop {
    fn drop(&mut self) {
        GRACEFUL.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The signal that asked a graceful stop, if one did.
pub fn stop_requested() -> Option<i32> {
    match STOP.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Blocks while the signal clean-up finishes and ends the process (it exits with 128 + the
/// signal); returns only if no signal is being handled.
pub fn await_exit() {
    while interrupted() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// On SIGINT or SIGTERM, removes this process's temporary files and staging folders
/// ([`crate::fsutil::remove_in_flight`]) and exits with 128 + the signal number, as a shell
/// reports it. The signals are blocked in every thread (threads started later inherit the
/// mask) and received by one thread with `sigwait`, so the clean-up runs as ordinary code, not
/// in a signal handler. Linux (glibc) only; elsewhere the default disposition stays.
fn clean_up_on_signals() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only
        // changes this thread's mask (no other thread runs yet at the start of main).
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return;
            }
            set
        };
        let spawned = std::thread::Builder::new()
            .name("bccp-signals".into())
            .spawn(move || {
                use std::sync::atomic::Ordering::SeqCst;
                loop {
                    let mut signal: libc::c_int = 0;
                    // SAFETY: `set` is a valid, initialised signal set; `signal` is written by
                    // sigwait.
                    if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                        return;
                    }
                    // A graceful stop asked for and not yet signalled: only note it.
                    if GRACEFUL.load(SeqCst) > 0 && STOP.swap(signal, SeqCst) == 0 {
                        continue;
                    }
                    INTERRUPTED.store(signal, SeqCst);
                    crate::fsutil::remove_in_flight();
                    std::process::exit(128 + signal);
                }
            });
        if spawned.is_err() {
            // No thread to receive them: let the signals act as before.
            // SAFETY: as above, on this thread's own mask.
            unsafe {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
    }
}
