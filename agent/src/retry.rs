//! Exponential backoff with jitter for failing sources.
//!
//! The one module that names the `backoff` crate (unmaintained; a later
//! swap to `backon` touches only this file). It only computes delays: the
//! caller sleeps, so retries never block other sources or the reconcile
//! loop.

use backoff::backoff::Backoff as _;
use std::time::Duration;

/// Delays between retries of one source: start at `initial`, multiply by
/// 2 per failure up to `max`, each randomised by ±50 % (jitter, so a fleet
/// does not hammer a recovering server in step). Never gives up.
#[derive(Debug)]
pub struct Backoff {
    inner: backoff::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// A backoff from `initial` to at most `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        let inner = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(initial)
            .with_max_interval(max)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            .with_max_elapsed_time(None)
            .build();
        Self { inner, max }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next_backoff().unwrap_or(self.max)
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// `base` randomised by ±`fraction` (e.g. 0.1 for ±10 %), so periodic polls
/// of many agents spread out.
pub fn jitter(base: Duration, fraction: f64) -> Duration {
    use rand::Rng;
    let f = fraction.clamp(0.0, 1.0);
    let factor = rand::rng().random_range((1.0 - f)..=(1.0 + f));
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(150), "{first:?}");
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(1500));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
        let j = jitter(Duration::from_secs(10), 0.1);
        assert!(j >= Duration::from_secs(9) && j <= Duration::from_secs(11));
    }
}
