//! Exponential back-off with jitter for transient database failures (a busy SQLite file, a
//! lost PostgreSQL connection), bounded by a total time.

use std::time::{Duration, Instant};

/// How long a transaction is retried before the error is returned.
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(30);

/// The waits between attempts: 10 ms doubling to 1 s, each with up to 50% jitter (so
/// processes that collided do not retry in step), until the window is spent.
pub(crate) struct Backoff {
    start: Instant,
    window: Duration,
    next: Duration,
    attempts: u32,
    jitter: crate::rng::Rng,
}

impl Backoff {
    pub fn new(window: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        Self {
            start: Instant::now(),
            window,
            next: Duration::from_millis(10),
            attempts: 1,
            jitter: crate::rng::Rng::new(seed),
        }
    }

    /// Waits before the next attempt and returns true, or returns false when the window is
    /// spent.
    pub fn wait(&mut self) -> bool {
        let elapsed = self.start.elapsed();
        if elapsed >= self.window {
            return false;
        }
        let jitter = 1.0 + 0.5 * self.jitter.unit_f64();
        let wait = self.next.mul_f64(jitter).min(self.window - elapsed);
        std::thread::sleep(wait);
        self.next = (self.next * 2).min(Duration::from_secs(1));
        self.attempts += 1;
        true
    }

    /// Attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Seconds since the first attempt.
    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_stop_at_the_window() {
        let mut b = Backoff::new(Duration::from_millis(200));
        let mut n = 0;
        while b.wait() {
            n += 1;
            assert!(n < 20, "the window must end the retries");
        }
        // 10 + 20 + 40 + 80 ms (with jitter up to ×1.5) reach 200 ms in 3 to 5 waits.
        assert!((3..=5).contains(&n), "{n} waits");
        assert_eq!(b.attempts(), n + 1);
        assert!(b.seconds() >= 0.2);
    }
}
