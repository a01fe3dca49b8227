//! The one clock every timing decision reads: backoff and retry times stored in the outbox,
//! rate limits, `Retry-After` pauses, liveness, the scheduler watchdog.
//!
//! Waiting is always tokio's (`tokio::time::sleep`), and so is every monotonic instant here
//! ([`instant`], the rate limiters' [`TokioClock`]), which is what lets a test pause time and
//! advance it (`tokio::time::pause`, `start_paused = true`) instead of sleeping. Wall-clock
//! times (the Unix milliseconds stored in the state file, `status`'s timestamps) come from
//! [`now_ms`]: the system clock in the daemon; in the crate's own unit tests, the system clock
//! at the first reading plus tokio's elapsed time, so that a paused test's stored retry times
//! move exactly as its timers do.

use chrono::{DateTime, Utc};

/// Wall-clock milliseconds since the Unix epoch: the time unit of every column in the state
/// file.
pub fn now_ms() -> i64 {
    #[cfg(not(test))]
    {
        system_ms()
    }
    #[cfg(test)]
    {
        follows_tokio::now_ms()
    }
}

/// Now, as a UTC date and time (from [`now_ms`]).
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(now_ms()).unwrap_or_default()
}

/// A monotonic instant on tokio's clock.
pub fn instant() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// governor's clock on tokio time, so token buckets run on a paused clock in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl governor::clock::Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod follows_tokio {
    use std::sync::OnceLock;

    /// The system clock and tokio's instant, read together once.
    static BASE: OnceLock<(i64, std::time::Instant)> = OnceLock::new();

    pub(super) fn now_ms() -> i64 {
        let (wall, at) = *BASE.get_or_init(|| (super::system_ms(), std::time::Instant::now()));
        let now = tokio::time::Instant::now().into_std();
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        match now.checked_duration_since(at) {
            Some(ahead) => wall.saturating_add(ms(ahead)),
            None => wall.saturating_sub(ms(at.duration_since(now))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stored_times_move_with_a_paused_clock() {
        let before = now_ms();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let after = now_ms();
        assert!(
            (after - before - 3_600_000).abs() < 50,
            "{}",
            after - before
        );
    }
}
