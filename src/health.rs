//! Heartbeats of the daemon's loops, behind `/healthz` and the systemd watchdog.
//!
//! Each long-running loop beats when it makes progress (the worker once per iteration, at least
//! every second while it has work; the scheduler watchdog each time it looks at the sources). A
//! loop that stops beating is wedged, and only then does `/healthz` fail and the systemd
//! watchdog go unfed, so a restart happens for a real hang, never for a quiet hour. A worker
//! parked with nothing to do (waiting to be woken, no timer) is not wedged, nor is one stopped
//! on purpose by an auth halt: that shows in `/readyz`, not in liveness. The scheduler watchdog
//! sleeps until it next has something to look at (minutes, between polls) and says so when it
//! beats ([`Health::scheduler_sleeps`]): it is wedged only once it oversleeps that by the window.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Loop heartbeats.
pub struct Health {
    started: Instant,
    beat: Duration,
    worker: AtomicU64,
    /// Worker beats since start: how often its loop went round.
    worker_beats: AtomicU64,
    /// When the scheduler watchdog will beat again at the latest (milliseconds since start).
    scheduler: AtomicU64,
    worker_stopped: AtomicBool,
    /// The worker is parked: nothing queued or due, it waits to be woken.
    worker_parked: AtomicBool,
    /// Told each time the worker parks.
    parks: Notify,
    failed: AtomicBool,
}

/// While held, the worker is parked (see [`Health::worker_parked`]); dropping it un-parks the
/// worker and counts as a beat.
pub struct Parked<'a>(&'a Health);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.worker_parked.store(false, Ordering::Relaxed);
        self.0.beat_worker();
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::with_beat(Duration::from_secs(1))
    }
}

impl Health {
    /// Heartbeats that loops send at least every `beat` (a quarter of the systemd watchdog
    /// interval at most, so a healthy daemon is never judged stalled).
    pub fn with_beat(beat: Duration) -> Self {
        Health {
            started: Instant::now(),
            beat,
            worker: AtomicU64::new(0),
            worker_beats: AtomicU64::new(0),
            scheduler: AtomicU64::new(0),
            worker_stopped: AtomicBool::new(false),
            worker_parked: AtomicBool::new(false),
            parks: Notify::new(),
            failed: AtomicBool::new(false),
        }
    }

    /// How often loops must beat.
    pub fn beat(&self) -> Duration {
        self.beat
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The worker loop made progress.
    pub fn beat_worker(&self) {
        self.worker.store(self.now(), Ordering::Relaxed);
        self.worker_beats.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the worker loop went round since start.
    #[cfg(test)]
    pub(crate) fn worker_beats(&self) -> u64 {
        self.worker_beats.load(Ordering::Relaxed)
    }

    /// The scheduler loop made progress.
    pub fn beat_scheduler(&self) {
        self.scheduler_sleeps(Duration::ZERO);
    }

    /// The scheduler loop made progress and sleeps for `sleep` before it looks again: it is
    /// not wedged until that sleep is over by more than the window.
    pub fn scheduler_sleeps(&self, sleep: Duration) {
        let sleep = u64::try_from(sleep.as_millis()).unwrap_or(u64::MAX);
        self.scheduler
            .store(self.now().saturating_add(sleep), Ordering::Relaxed);
    }

    /// The worker waits to be woken with nothing queued or due: it need not beat until the
    /// returned guard is dropped.
    pub fn worker_parked(&self) -> Parked<'_> {
        self.worker_parked.store(true, Ordering::Relaxed);
        self.parks.notify_one();
        Parked(self)
    }

    /// Resolves when the worker parks (at once if it parked since the last call).
    pub async fn worker_parks(&self) {
        self.parks.notified().await;
    }

    /// Whether the worker has nothing to do: parked, or stopped on purpose.
    pub fn worker_idle(&self) -> bool {
        self.worker_parked.load(Ordering::Relaxed) || self.worker_stopped.load(Ordering::Relaxed)
    }

    /// The worker ended on purpose (auth halt): it no longer needs to beat.
    pub fn worker_stopped(&self) {
        self.worker_stopped.store(true, Ordering::Relaxed);
    }

    /// The worker runs again (a re-read key lifted its halt): its beats count again.
    pub fn worker_started(&self) {
        self.beat_worker();
        self.worker_stopped.store(false, Ordering::Relaxed);
    }

    /// A loop ended on an error it cannot recover from (the state file failed): the daemon is
    /// not alive, so `/healthz` fails and systemd or Kubernetes restarts it.
    pub fn failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Whether every loop beat within `window`.
    pub fn alive(&self, window: Duration) -> bool {
        if self.failed.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now();
        let window = window.as_millis() as u64;
        let fresh = |beat: &AtomicU64| now.saturating_sub(beat.load(Ordering::Relaxed)) <= window;
        (self.worker_stopped.load(Ordering::Relaxed)
            || self.worker_parked.load(Ordering::Relaxed)
            || fresh(&self.worker))
            // A beat is a time in the past; a promised next beat may be in the future.
            && fresh(&self.scheduler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_beating_is_not_alive() {
        let health = Health::default();
        health.beat_worker();
        health.beat_scheduler();
        assert!(health.alive(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            health.alive(Duration::from_secs(5)),
            "at the edge of the window"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        health.beat_scheduler();
        assert!(!health.alive(Duration::from_secs(5)), "the worker is stale");
        // A parked worker (nothing to do, waiting to be woken) does not need to beat; once
        // woken it beats again.
        let parked = health.worker_parked();
        assert!(health.alive(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        health.beat_scheduler();
        assert!(health.alive(Duration::from_secs(5)), "parked for a minute");
        drop(parked);
        assert!(health.alive(Duration::from_secs(5)), "woken: a fresh beat");
        tokio::time::sleep(Duration::from_secs(6)).await;
        health.beat_scheduler();
        assert!(
            !health.alive(Duration::from_secs(5)),
            "awake and not beating"
        );
        // A worker stopped on purpose (an auth halt) does not need to beat.
        health.worker_stopped();
        assert!(health.alive(Duration::from_secs(5)));
        // A scheduler that said it sleeps for ten minutes is alive for ten minutes and the
        // window, and not after.
        health.scheduler_sleeps(Duration::from_secs(600));
        tokio::time::sleep(Duration::from_secs(605)).await;
        assert!(health.alive(Duration::from_secs(5)), "asleep as announced");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!health.alive(Duration::from_secs(5)), "overslept: wedged");
        health.beat_scheduler();
        assert!(health.alive(Duration::from_secs(5)));
        // A loop that failed makes the daemon not alive, however fresh the beats.
        health.failed();
        health.beat_scheduler();
        assert!(!health.alive(Duration::from_secs(5)));
    }
}
