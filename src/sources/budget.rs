//! A source's monthly request budget (`monthly_request_budget`), and a source whose own quota is
//! spent.
//!
//! Every request to a source passes [`Budget::admit`] before it is sent (the poll loop's
//! `with_retries` is the one door: scan pages, push fetches, retries and the hourly probe of a
//! spent quota). Requests are counted per calendar month in UTC, in the state file
//! (`request_budget`), so a restart or a `--once` never starts the month again. Once a month's
//! budget is spent nothing more is sent until the month turns.
//!
//! **Write cost and crash bound.** The count in the state file is a reservation: it is moved
//! [`RESERVE`] requests ahead of the requests sent (one small write per 20 requests, 4 s of
//! Wodify's 5/s), and set to the exact count when a poll ends. The file never shows fewer
//! requests than were sent, so a crash can never make the daemon overspend; it forgets at most
//! `RESERVE - 1` unspent requests of the month.
//!
//! **Pacing.** At a cron tick [`Budget::gate`] estimates a scan's cost from the last complete
//! poll's request count; when the schedule's remaining ticks this month would need more than
//! what is left, scans are spaced out evenly over the rest of the month (ticks are skipped
//! until the effective interval has passed), said once in the log and kept for `status`.
//!
//! **A spent quota.** An API may say its own quota is spent (Wodify's 429 `Limit Exceeded`):
//! the source is paused until the month turns, one request an hour at most (in case the quota
//! was raised), recorded for `status` and for the next process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};

use super::SourceError;
use crate::config::SourceConfig;
use crate::store::{BudgetMonth, Store};

/// Requests reserved in the state file ahead of those sent.
pub const RESERVE: u64 = 20;

/// How often a source whose quota is spent is tried again.
pub const PROBE_EVERY: Duration = Duration::from_secs(3600);

/// Firings of a schedule averaged to find its interval.
const INTERVAL_SAMPLE: u32 = 60;

/// The calendar month (UTC) of a Unix time in ms, `YYYY-MM`.
pub fn month_of(ms: i64) -> String {
    utc(ms).format("%Y-%m").to_string()
}

/// The first instant of the month after the one `ms` falls in (Unix ms).
pub fn month_end(ms: i64) -> i64 {
    let at = utc(ms);
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .map_or(i64::MAX, |t| t.timestamp_millis())
}

fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// `2027-01-01 00:00 UTC`.
fn moment(ms: i64) -> String {
    utc(ms).format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A span for people: `45 s`, `12 min`, `5 h 3 min`, `2 d 4 h`.
pub fn span(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// The average time between a schedule's firings after `now`.
pub fn schedule_interval(schedule: &str, now: DateTime<Utc>) -> Option<Duration> {
    let first = crate::schedule::next_after(schedule, now)?;
    let mut at = first;
    for _ in 0..INTERVAL_SAMPLE {
        at = crate::schedule::next_after(schedule, at)?;
    }
    (at - first).to_std().ok().map(|d| d / INTERVAL_SAMPLE)
}

/// What a schedule costs over the rest of a month: the firings left after `now` (this one
/// included) times a scan's cost; `None` without a known cost or interval.
pub fn month_cost(interval: Duration, scan_cost: u64, now_ms: i64) -> u64 {
    let left = u64::try_from(month_end(now_ms).saturating_sub(now_ms)).unwrap_or(0);
    let ticks = left / u64::try_from(interval.as_millis().max(1)).unwrap_or(u64::MAX);
    scan_cost.saturating_mul(ticks.saturating_add(1))
}

/// An average calendar month (365.2425 / 12 days).
const MONTH: Duration = Duration::from_secs(2_629_746);

/// What a source's schedule costs in an average month at `scan_cost` requests a scan:
/// `(scans, requests)`.
pub fn schedule_month_cost(interval: Duration, scan_cost: u64) -> (u64, u64) {
    let scans = u64::try_from(MONTH.as_millis() / interval.as_millis().max(1)).unwrap_or(u64::MAX);
    (scans, scans.saturating_mul(scan_cost))
}

/// When a paced source polls next: `remaining` requests, scans of `cost` each, spread evenly
/// from the last scan's start (`last`) to the month's end (`end`). The last of them may be cut
/// short by the budget; a Wodify scan resumes where it stopped.
fn paced_gap(remaining: u64, cost: u64, last: i64, end: i64) -> Duration {
    let scans = remaining.div_ceil(cost.max(1)).max(1);
    let left = u64::try_from(end.saturating_sub(last)).unwrap_or(0);
    Duration::from_millis(left / scans)
}

/// Whether a cron tick polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Poll,
    /// Skipped: the budget is spent, the quota is, or scans are spaced out.
    Skip,
}

/// A source's budget and quota state, shared by its polls and its push fetches.
pub struct Budget {
    source: String,
    limit: Option<u64>,
    store: Option<Store>,
    /// Whether counts are written (not for `--dry-run`, which writes nothing).
    persist: bool,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until the state file was read.
    month: Option<String>,
    /// Requests sent this month (as far as this process knows: the file's count at start).
    used: u64,
    /// The count in the state file: never below `used`.
    reserved: u64,
    recorded: BudgetMonth,
    /// When the last poll started (Unix ms), for pacing.
    last_started: Option<i64>,
    /// Whether polls are being spaced out (said once when it starts).
    paced: bool,
}

/// A source's month for `status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub used: u64,
    pub budget: u64,
}

impl Budget {
    /// The budget of `source`, counted in `store` (none: in memory only); `persist` false
    /// reads the state file but never writes it.
    pub fn new(source: &SourceConfig, store: Option<Store>, persist: bool) -> Arc<Budget> {
        Arc::new(Budget {
            source: source.name.clone(),
            limit: source.monthly_request_budget,
            store,
            persist,
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    /// The month's usage (`None`: no budget), read from the state file when not yet known.
    pub async fn usage(&self) -> Option<Usage> {
        let limit = self.limit?;
        let mut state = self.state.lock().await;
        let _ = self.roll(&mut state, crate::clock::now_ms()).await;
        Some(Usage {
            month: state.month.clone().unwrap_or_default(),
            used: state.used,
            budget: limit,
        })
    }

    /// Sets the gauges of `/metrics` from the state file (the daemon, at start).
    pub async fn publish(&self) {
        if let Some(usage) = self.usage().await {
            self.gauges(usage.used);
        }
    }

    fn gauges(&self, used: u64) {
        let Some(limit) = self.limit else { return };
        let source = self.source.clone();
        metrics::gauge!(crate::metrics::REQUESTS_THIS_MONTH, "source" => source.clone())
            .set(used as f64);
        metrics::gauge!(crate::metrics::MONTHLY_REQUEST_BUDGET, "source" => source)
            .set(limit as f64);
    }

    /// Reads the month from the state file on first use and starts a new one when it turns.
    async fn roll(&self, state: &mut State, now: i64) -> Result<(), SourceError> {
        let month = month_of(now);
        if state.month.as_deref() == Some(month.as_str()) {
            return Ok(());
        }
        let turned = state.month.is_some();
        let recorded = match &self.store {
            Some(store) => {
                let (source, at) = (self.source.clone(), month.clone());
                store
                    .call(move |s| s.budget_month(&source, &at))
                    .await
                    .map_err(|e| {
                        SourceError::Transient(format!("cannot read the request count: {e}"))
                    })?
            }
            None => BudgetMonth::default(),
        };
        if turned {
            tracing::info!(source = %self.source, %month, "A new month: the request budget starts again.");
        }
        state.used = recorded.used;
        state.reserved = recorded.used;
        state.last_started = recorded.scan_started_at.or(state.last_started);
        state.paced = recorded.note.is_some();
        state.recorded = recorded;
        state.month = Some(month);
        self.gauges(state.used);
        Ok(())
    }

    /// Counts one request about to be sent, or refuses it: the month's budget is spent, or the
    /// source's quota is and the hourly probe is not due.
    pub async fn admit(&self) -> Result<(), SourceError> {
        let now = crate::clock::now_ms();
        let mut state = self.state.lock().await;
        self.roll(&mut state, now).await?;
        let month = state.month.clone().unwrap_or_default();
        if let Some(spent) = state.recorded.quota_spent_at {
            if now < spent.saturating_add(PROBE_EVERY.as_millis() as i64) {
                return Err(SourceError::QuotaSpent(self.quota_message(now)));
            }
            // The probe: one an hour, whatever else asks meanwhile.
            state.recorded.quota_spent_at = Some(now);
            self.write(move |s, source| s.set_quota_spent(source, &month, Some(now)))
                .await?;
        }
        let month = state.month.clone().unwrap_or_default();
        if let Some(limit) = self.limit
            && state.used >= limit
        {
            return Err(SourceError::QuotaSpent(
                self.spent_message(&state, limit, now),
            ));
        }
        if state.used >= state.reserved {
            let reserved = state
                .used
                .saturating_add(RESERVE)
                .min(self.limit.unwrap_or(u64::MAX));
            self.write(move |s, source| s.set_budget_used(source, &month, reserved))
                .await?;
            state.reserved = reserved;
        }
        state.used += 1;
        self.gauges(state.used);
        Ok(())
    }

    /// Looks at the answer to an admitted request: the source saying its quota is spent pauses
    /// it until the month turns (the error then says until when); any answer after that lifts
    /// the pause.
    pub async fn answered<T>(&self, answer: Result<T, SourceError>) -> Result<T, SourceError> {
        let now = crate::clock::now_ms();
        let spent = matches!(answer, Err(SourceError::QuotaSpent(_)));
        let mut state = self.state.lock().await;
        let month = state.month.clone().unwrap_or_else(|| month_of(now));
        let was = state.recorded.quota_spent_at;
        match (&answer, was) {
            (Err(SourceError::QuotaSpent(said)), _) => {
                if was.is_none() {
                    tracing::error!(source = %self.source, reset = %moment(month_end(now)), "{said}; polling pauses until the month turns (one probe an hour in case the quota was raised).");
                }
                state.recorded.quota_spent_at = Some(now);
                let at = month.clone();
                self.write(move |s, source| s.set_quota_spent(source, &at, Some(now)))
                    .await?;
            }
            (Ok(_) | Err(_), Some(_))
                if !matches!(
                    answer,
                    Err(SourceError::Transient(_) | SourceError::RateLimited(_))
                ) =>
            {
                tracing::info!(source = %self.source, "The source answers again: its quota is no longer spent.");
                state.recorded.quota_spent_at = None;
                self.write(move |s, source| s.set_quota_spent(source, &month, None))
                    .await?;
            }
            _ => {}
        }
        drop(state);
        match answer {
            Err(SourceError::QuotaSpent(said)) if spent => Err(SourceError::QuotaSpent(format!(
                "{said}; it resets when the month turns ({}): source {:?} pauses until then, \
                 trying once an hour in case the quota was raised",
                moment(month_end(now)),
                self.source
            ))),
            other => other,
        }
    }

    /// A poll that sent `requests` and started at `started_at` ended: the exact count is
    /// written, and for a complete one what it cost (the pacing's estimate of a scan).
    pub async fn finish_poll(&self, requests: u64, started_at: i64, complete: bool) {
        let mut state = self.state.lock().await;
        let Some(month) = state.month.clone() else {
            return;
        };
        let used = state.used;
        let result = if complete {
            state.recorded.scan_requests = Some(requests);
            state.recorded.scan_started_at = Some(started_at);
            let at = month.clone();
            self.write(move |s, source| s.set_budget_scan(source, &at, used, requests, started_at))
                .await
        } else {
            self.write(move |s, source| s.set_budget_used(source, &month, used))
                .await
        };
        match result {
            Ok(()) => state.reserved = used,
            Err(error) => {
                tracing::warn!(source = %self.source, %error, "Cannot record the month's request count; the reservation stands.")
            }
        }
    }

    /// Whether a cron tick of `schedule` polls now: not while the source's quota is spent
    /// (but for the hourly probe), not once the budget is spent, and, when the schedule would
    /// outspend what is left, only once the effective interval has passed since the last poll.
    pub async fn gate(&self, schedule: &str) -> Gate {
        let now = crate::clock::now_ms();
        let mut state = self.state.lock().await;
        if self.roll(&mut state, now).await.is_err() {
            // The state file cannot be read: the poll would fail on it too, and says so.
            return Gate::Poll;
        }
        if let Some(spent) = state.recorded.quota_spent_at {
            if now < spent.saturating_add(PROBE_EVERY.as_millis() as i64) {
                return Gate::Skip;
            }
            return self.started(&mut state, now);
        }
        let Some(limit) = self.limit else {
            return self.started(&mut state, now);
        };
        if state.used >= limit {
            let note = self.spent_message(&state, limit, now);
            self.note(&mut state, Some(note), true).await;
            return Gate::Skip;
        }
        let interval = schedule_interval(schedule, utc(now));
        let (Some(cost), Some(interval)) = (state.recorded.scan_requests, interval) else {
            self.note(&mut state, None, false).await;
            return self.started(&mut state, now);
        };
        let remaining = limit - state.used;
        let need = month_cost(interval, cost, now);
        if need <= remaining {
            self.note(&mut state, None, false).await;
            return self.started(&mut state, now);
        }
        let end = month_end(now);
        let last = state.last_started.unwrap_or(now);
        let gap = paced_gap(remaining, cost, last, end).max(interval);
        // Stable between scans (no figure that moves with every tick), so it is written once
        // a scan, not once a tick.
        let note = format!(
            "scans spaced out to every {} (the schedule fires every {}): at the last complete \
             scan's {cost} requests the schedule would need more than the {remaining} requests \
             of the monthly_request_budget of {limit} left until {}",
            span(gap),
            span(interval),
            moment(end)
        );
        self.note(&mut state, Some(note), false).await;
        let due = last.saturating_add(i64::try_from(gap.as_millis()).unwrap_or(i64::MAX));
        if state.last_started.is_none() || now >= due {
            self.started(&mut state, now)
        } else {
            Gate::Skip
        }
    }

    fn started(&self, state: &mut State, now: i64) -> Gate {
        state.last_started = Some(now);
        Gate::Poll
    }

    /// Keeps `note` for `status` and logs it when it starts being true (once, not per tick).
    async fn note(&self, state: &mut State, note: Option<String>, spent: bool) {
        let starts = note.is_some() && !state.paced;
        if starts {
            if spent {
                tracing::warn!(source = %self.source, "Polling stops until the month turns: {}.", note.as_deref().unwrap_or(""));
            } else {
                tracing::warn!(source = %self.source, "The monthly request budget would not last the month: {}.", note.as_deref().unwrap_or(""));
            }
        } else if note.is_none() && state.paced {
            tracing::info!(source = %self.source, "Scans follow the schedule again: the monthly request budget lasts the month.");
        }
        state.paced = note.is_some();
        if state.recorded.note == note {
            return;
        }
        // Rewritten only when the figures moved by a scan, not on every tick.
        state.recorded.note = note.clone();
        let month = state.month.clone().unwrap_or_default();
        if let Err(error) = self
            .write(move |s, source| s.set_budget_note(source, &month, note.as_deref()))
            .await
        {
            tracing::warn!(source = %self.source, %error, "Cannot record the pacing for `status`.");
        }
    }

    fn spent_message(&self, state: &State, limit: u64, now: i64) -> String {
        format!(
            "source {:?} has spent its monthly_request_budget ({} of {limit} requests in {}); \
             polling resumes when the month turns ({}). The API key's quota is shared with the \
             account's other integrations: raise the budget only if they leave room",
            self.source,
            state.used,
            state.month.as_deref().unwrap_or(""),
            moment(month_end(now))
        )
    }

    fn quota_message(&self, now: i64) -> String {
        format!(
            "the monthly request quota of source {:?}'s API key is spent (the API answered 429 \
             Limit Exceeded); it resets when the month turns ({}): nothing is sent until then \
             but one try an hour, in case the quota was raised",
            self.source,
            moment(month_end(now))
        )
    }

    /// Runs a write of this source's figures, unless this budget writes nothing.
    async fn write(
        &self,
        f: impl Fn(&Store, &str) -> Result<(), crate::store::StoreError> + Send + Sync + 'static,
    ) -> Result<(), SourceError> {
        let Some(store) = self.store.as_ref().filter(|_| self.persist) else {
            return Ok(());
        };
        let source = self.source.clone();
        store
            .call(move |s| f(s, &source))
            .await
            .map_err(|e| SourceError::Transient(format!("cannot record the request count: {e}")))
    }
}

/// Requests sent by one poll.
pub type Counter = Arc<AtomicU64>;

/// Adds one to a poll's counter.
pub fn count(counter: &Option<Counter>) {
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};
    use crate::store::test_support::temp_store;

    fn source(extra: &str) -> SourceConfig {
        let config = Config::from_toml(
            &format!(
                "[revkeen]\napi_key='k'\n[[sources]]\nname='gym'\nkind='wodify'\n\
                 base_url='https://api.wodify.com/v1'\napi_key='w'\n{extra}\n"
            ),
            &Environment::default(),
            &crate::sources::config_kinds(),
        )
        .expect("config");
        config.sources[0].clone()
    }

    /// Whether the month turned while a test advanced the clock (it then proves nothing).
    fn same_month(start: &str) -> bool {
        month_of(crate::clock::now_ms()) == start
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_is_never_overspent_and_the_file_never_shows_fewer_than_were_sent() {
        let (store, _dir) = temp_store();
        let gym = source("monthly_request_budget = 30");
        let month = month_of(crate::clock::now_ms());
        let budget = Budget::new(&gym, Some(store.clone()), true);
        budget.admit().await.expect("first");
        // Reserved ahead: a crash now leaves 20 in the file, never fewer than were sent.
        assert_eq!(store.budget_month("gym", &month).expect("read").used, 20);
        for _ in 1..30 {
            budget.admit().await.expect("within the budget");
        }
        let refused = budget.admit().await.expect_err("the 31st");
        assert!(
            matches!(&refused, SourceError::QuotaSpent(m) if m.contains("30 of 30")),
            "{refused:?}"
        );
        // A process started after a crash reads the reservation and sends nothing more.
        let restarted = Budget::new(&gym, Some(store.clone()), true);
        assert!(restarted.admit().await.is_err());
        assert_eq!(
            restarted.usage().await.map(|u| (u.used, u.budget)),
            Some((30, 30))
        );
        // Unlimited: counted, never refused.
        let unlimited = Budget::new(&source("monthly_request_budget = 0"), None, false);
        for _ in 0..100 {
            unlimited.admit().await.expect("unlimited");
        }
        assert_eq!(unlimited.usage().await, None, "no budget, nothing to show");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_quota_is_probed_once_an_hour_and_lifted_by_an_answer() {
        let (store, _dir) = temp_store();
        let gym = source("");
        let start = month_of(crate::clock::now_ms());
        let budget = Budget::new(&gym, Some(store.clone()), true);
        budget.admit().await.expect("admitted");
        let said = budget
            .answered::<()>(Err(SourceError::QuotaSpent("Wodify answered 429".into())))
            .await
            .expect_err("spent");
        assert!(
            matches!(&said, SourceError::QuotaSpent(m) if m.contains("resets when the month turns")),
            "{said:?}"
        );
        assert!(budget.admit().await.is_err(), "nothing sent meanwhile");
        assert_eq!(budget.gate("* * * * * *").await, Gate::Skip);
        // Another process within the hour knows it too.
        let other = Budget::new(&gym, Some(store.clone()), true);
        assert!(other.admit().await.is_err());
        tokio::time::advance(Duration::from_secs(59 * 60)).await;
        if !same_month(&start) {
            return;
        }
        assert!(budget.admit().await.is_err());
        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        if !same_month(&start) {
            return;
        }
        assert_eq!(
            budget.gate("* * * * * *").await,
            Gate::Poll,
            "the probe is due"
        );
        budget.admit().await.expect("the hourly probe");
        assert!(budget.admit().await.is_err(), "one probe an hour");
        budget.answered(Ok(())).await.expect("answered");
        budget.admit().await.expect("the quota answers again");
        assert_eq!(
            store
                .budget_month("gym", &start)
                .expect("read")
                .quota_spent_at,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_are_skipped_until_an_even_share_of_the_month_has_passed() {
        let (store, _dir) = temp_store();
        let gym = source("monthly_request_budget = 1000");
        let start = month_of(crate::clock::now_ms());
        let budget = Budget::new(&gym, Some(store), true);
        let every_second = "* * * * * *";
        let t0 = crate::clock::now_ms();
        // No scan measured yet: the tick polls.
        assert_eq!(budget.gate(every_second).await, Gate::Poll);
        for _ in 0..100 {
            budget.admit().await.expect("admitted");
        }
        budget.finish_poll(100, t0, true).await;
        // 900 left at 100 a scan: 9 scans over the rest of the month.
        let gap = paced_gap(900, 100, t0, month_end(t0));
        assert_eq!(budget.gate(every_second).await, Gate::Skip);
        tokio::time::advance(gap - Duration::from_secs(5)).await;
        if !same_month(&start) {
            return;
        }
        assert_eq!(budget.gate(every_second).await, Gate::Skip);
        tokio::time::advance(Duration::from_secs(10)).await;
        if !same_month(&start) {
            return;
        }
        assert_eq!(budget.gate(every_second).await, Gate::Poll);
        // A schedule the budget covers is not paced.
        let hourly = Budget::new(&source("monthly_request_budget = 250000"), None, false);
        for _ in 0..3 {
            assert_eq!(hourly.gate("0 0 * * * *").await, Gate::Poll);
        }
    }

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .timestamp_millis()
    }

    #[test]
    fn months_turn_at_midnight_utc() {
        assert_eq!(month_of(ms("2026-12-31T23:59:59Z")), "2026-12");
        assert_eq!(
            month_end(ms("2026-12-15T10:00:00Z")),
            ms("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            month_end(ms("2026-02-01T00:00:00Z")),
            ms("2026-03-01T00:00:00Z")
        );
    }

    #[test]
    fn a_schedule_costs_its_ticks_left_times_a_scan() {
        let now = ms("2026-12-31T23:00:00Z");
        // An hour left: 4 quarter-hour ticks and this one.
        assert_eq!(month_cost(Duration::from_secs(900), 101, now), 505);
        let interval = schedule_interval("0 */15 * * * *", utc(now)).expect("fires");
        assert_eq!(interval, Duration::from_secs(900));
        assert_eq!(
            schedule_interval("* * * * * *", utc(now)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn paced_scans_share_what_remains_evenly() {
        let last = ms("2026-12-01T00:00:00Z");
        let end = month_end(last);
        // 31 days, 1,000 requests, 100 a scan: one scan every 3.1 days.
        let gap = paced_gap(1_000, 100, last, end);
        assert_eq!(gap, Duration::from_secs(31 * 86_400 / 10));
        // Less than a scan left: one more (cut short) before the month ends.
        assert_eq!(
            paced_gap(30, 100, last, end),
            Duration::from_secs(31 * 86_400)
        );
        assert_eq!(span(gap), "3 d 2 h");
    }
}
