//! Token buckets, `Retry-After` pauses and retry backoff.
//!
//! One [`Limiter`] per remote host, shared by everything that talks to it, so the daemon stays
//! under the documented rate however many workers run: 429s become rare rather than routine.
//! A 429 pauses the whole host until its `Retry-After`, not just the request that got it.
//! The bucket is `governor`'s GCRA on tokio's clock ([`crate::clock::TokioClock`]); waiting is
//! done with tokio timers, so both run on a paused clock in tests.
//!
//! Backoff is `backon`'s exponential sequence (base 1 s, cap 10 min) with *full* jitter on
//! top: `backon`'s own jitter adds up to one delay to the delay, while full jitter draws the
//! whole delay from `[0, delay]`, which spreads a crowd of retries best.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::clock::TokioClock;

/// A direct (unkeyed) GCRA bucket on tokio's clock.
type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// A host's request budget.
pub struct Limiter {
    name: String,
    bucket: Bucket,
    paused_until: Mutex<Option<Instant>>,
}

impl Limiter {
    /// `rate` requests per `period`, `burst` at once. One request of the burst is kept in
    /// reserve: requests leave here exactly one interval apart but reach the server a few
    /// milliseconds closer or further, and a server bucket configured to the same numbers
    /// would refuse the early one. The reserve absorbs up to one interval of such jitter.
    pub fn new(name: impl Into<String>, rate: u32, period: Duration, burst: u32) -> Limiter {
        let rate = NonZeroU32::new(rate.max(1)).expect("max(1) is non-zero");
        let burst = NonZeroU32::new(burst.saturating_sub(1).max(1)).expect("max(1) is non-zero");
        let quota = Quota::with_period(period / rate.get())
            .unwrap_or_else(|| Quota::per_second(rate))
            .allow_burst(burst);
        Limiter {
            name: name.into(),
            bucket: RateLimiter::direct_with_clock(quota, TokioClock),
            paused_until: Mutex::new(None),
        }
    }

    /// `per_minute` requests a minute, `burst` at once (RevKeen's documented form).
    pub fn per_minute(name: impl Into<String>, per_minute: u32, burst: u32) -> Limiter {
        Limiter::new(name, per_minute, Duration::from_secs(60), burst)
    }

    /// `per_second` requests a second, `burst` at once (Wodify's documented form).
    pub fn per_second(name: impl Into<String>, per_second: u32, burst: u32) -> Limiter {
        Limiter::new(name, per_second, Duration::from_secs(1), burst)
    }

    /// Waits until the host is not paused and a token is available, then takes it.
    pub async fn acquire(&self) {
        loop {
            if let Some(wait) = self.paused_for() {
                tokio::time::sleep(wait).await;
                continue;
            }
            match self.bucket.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Pauses every request to the host for `wait` (a 429's `Retry-After`). A shorter pause
    /// never cuts a longer one short.
    pub fn pause(&self, wait: Duration) {
        // The wait is a server's number (capped by the caller); an instant past the clock's
        // range is as good as "for the rest of this process".
        let now = Instant::now();
        let until = now
            .checked_add(wait)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let mut paused = self.paused_until.lock().expect("limiter lock poisoned");
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
            tracing::warn!(host = %self.name, wait_ms = wait.as_millis() as u64, "Rate limited: pausing requests to this host.");
            metrics::counter!(crate::metrics::RATE_LIMITED, "target" => self.name.clone())
                .increment(1);
        }
    }

    /// How long the host stays paused, if it is.
    pub fn paused_for(&self) -> Option<Duration> {
        let paused = *self.paused_until.lock().expect("limiter lock poisoned");
        paused
            .map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|wait| !wait.is_zero())
    }
}

/// A pause at least this long is recorded in the state file, for `status`.
pub(crate) const REPORTED_PAUSE: Duration = Duration::from_secs(60);

/// Why a host is paused, in words for `status`: what it asked, and the cap when it applied.
pub(crate) fn pause_reason(api: &str, asked: Duration, wait: Duration, key: &str) -> String {
    if wait < asked {
        format!(
            "{api} answered 429 asking to wait {} s; waiting {} s ({key})",
            asked.as_secs(),
            wait.as_secs()
        )
    } else {
        format!("{api} answered 429 asking to wait {} s", asked.as_secs())
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    /// The failure policy's backoff (ARCHITECTURE.md): base 1 s, cap 10 min.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    fn exponential(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.cap)
            .with_factor(2.0)
            .without_max_times()
    }

    /// The delay before retry number `attempt` (0-based): uniform in `[0, min(cap, base·2^n)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .exponential()
            .build()
            .nth(attempt.min(64) as usize)
            .unwrap_or(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// A `backon` builder for in-process retry loops, at most `max_times` retries.
    pub fn builder(&self, max_times: usize) -> FullJitter {
        FullJitter {
            inner: self.exponential().with_max_times(max_times),
        }
    }
}

/// `backon`'s exponential sequence with each delay drawn uniformly from `[0, delay]`.
#[derive(Debug, Clone, Copy)]
pub struct FullJitter {
    inner: ExponentialBuilder,
}

impl BackoffBuilder for FullJitter {
    type Backoff =
        std::iter::Map<<ExponentialBuilder as BackoffBuilder>::Backoff, fn(Duration) -> Duration>;

    fn build(self) -> Self::Backoff {
        self.inner
            .build()
            .map((|delay: Duration| delay.mul_f64(fastrand::f64())) as fn(Duration) -> Duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_full_jitter() {
        let backoff = Backoff::default();
        for attempt in 0..40 {
            let ceiling = Duration::from_secs(1u64 << attempt.min(20)).min(backoff.cap);
            for _ in 0..20 {
                assert!(backoff.delay(attempt) <= ceiling, "attempt {attempt}");
            }
        }
        // Full jitter: early draws are spread over [0, ceiling], not bunched at the top.
        let draws: Vec<Duration> = (0..200).map(|_| backoff.delay(3)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(2)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(6)));
    }

    #[test]
    fn builder_stops_after_max_times() {
        let delays: Vec<Duration> = Backoff::default().builder(3).build().collect();
        assert_eq!(delays.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_is_immediate_then_the_rate_applies() {
        // Burst 6: five at once (one kept in reserve), then 20 a second.
        let limiter = Limiter::per_second("test", 20, 6);
        let started = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Then exactly one token every 50 ms.
        for n in 1..=40u32 {
            limiter.acquire().await;
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(50) * n,
                "token {n}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_rate_is_spread_evenly() {
        // RevKeen's form: 600 a minute, burst 20 (19 at once), then one every 100 ms.
        let limiter = Limiter::per_minute("revkeen", 600, 20);
        let started = Instant::now();
        for _ in 0..19 {
            limiter.acquire().await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        for _ in 0..600 {
            limiter.acquire().await;
        }
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request_and_a_shorter_one_never_cuts_it() {
        let limiter = Limiter::per_second("test", 1000, 1000);
        limiter.pause(Duration::from_millis(120));
        limiter.pause(Duration::from_millis(10));
        let started = Instant::now();
        limiter.acquire().await;
        assert_eq!(started.elapsed(), Duration::from_millis(120));
        assert!(limiter.paused_for().is_none());
    }
}
