//! Source adapters and the poll loop they share.
//!
//! An adapter knows only its API: how to fetch the page after a cursor ([`Adapter::fetch`]) and
//! how to map one record to a customer ([`Adapter::map`]). [`poll`] owns everything else —
//! rate limiting, retries with backoff, change detection, the page transaction, metrics — as
//! vector's `http_client` source does. Adding a source is one file plus one [`AnySource`]
//! variant.
//!
//! A poll covers the whole listing once. A poll that starts where a crashed one stopped
//! resumes there and, for adapters whose listing is a full scan (Wodify), wraps around to the
//! start and stops where it began, so every record is read at least once per poll.

pub mod practicehub;
pub mod wodify;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use reqwest::{StatusCode, Url};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{SourceConfig, SourceKind};
use crate::http::send_measured;
use crate::limiter::{Backoff, Limiter};
use crate::store::{PageItem, PollStats, Store, StoreError};

/// One fetched page.
#[derive(Debug)]
pub struct Fetched<R> {
    pub records: Vec<R>,
    /// The cursor after this page (the start of a new pass when `pass_complete`).
    pub next: String,
    /// This page ended the listing.
    pub pass_complete: bool,
}

/// A record mapped for the outbox, with any fields that had to be left out.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub item: PageItem,
    /// Short names of fields dropped from the customer (`phone_unparseable`, …).
    pub warnings: Vec<&'static str>,
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// 401/403: the key is refused. Polling this source stops.
    #[error("API key refused: {0}")]
    AuthRefused(String),
    /// 429, with the wait the API asked for.
    #[error("rate limited")]
    RateLimited(Option<Duration>),
    /// 5xx, a timeout, a connection error, an error envelope carrying one: retried.
    #[error("{0}")]
    Transient(String),
    /// A request the API will never accept as sent (a wrong base URL, a bad query).
    #[error("{0}")]
    Permanent(String),
    /// 404 for a single record.
    #[error("not found")]
    NotFound,
}

impl SourceError {
    /// What `check-config --connect` reports for a probe's answer.
    pub fn probe<T>(answer: Result<T, SourceError>) -> crate::http::Probe {
        match answer {
            Ok(_) => crate::http::Probe::Ok,
            Err(SourceError::AuthRefused(e)) => crate::http::Probe::KeyRefused(e),
            Err(e) => crate::http::Probe::Unexpected(e.to_string()),
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::RateLimited(_) | SourceError::Transient(_)
        )
    }
}

/// A source API, as the poll loop sees it.
pub trait Adapter: Send + Sync + 'static {
    /// A record as the API returns it.
    type Record: Send + 'static;

    /// Whether a complete listing lists every record (a full scan), so that a record missing
    /// from one has vanished from the source.
    const FULL_SCAN: bool = false;

    /// The cursor at the start of a fresh listing.
    fn start_cursor(&self) -> String;

    /// Fetches the page after `cursor`. One request; the loop does limiting and retries.
    fn fetch(
        &self,
        cursor: &str,
    ) -> impl Future<Output = Result<Fetched<Self::Record>, SourceError>> + Send;

    /// Fetches one record by external id (a push event); `None` when the source has no such
    /// record. One request; the caller does limiting and retries.
    fn fetch_one(
        &self,
        external_id: &str,
    ) -> impl Future<Output = Result<Option<Self::Record>, SourceError>> + Send;

    /// Whether `external_id` can name a record of this source at all (push events are
    /// checked before they are accepted).
    fn valid_id(&self, external_id: &str) -> bool;

    /// Maps one record to what the outbox takes.
    fn map(&self, record: &Self::Record) -> Mapped;

    /// Whether a saved cursor stands in the middle of a listing (a poll stopped there), so the
    /// next poll resumes rather than starts. The default: any cursor but the start.
    fn mid_listing(&self, cursor: &str) -> bool {
        cursor != self.start_cursor()
    }

    /// For a poll that resumed at `resumed_at`: whether reaching `cursor` on the next pass
    /// covers what the crashed poll had read before it. The default (`true`) ends a resumed
    /// poll at the end of its listing.
    fn covers(&self, resumed_at: &str, cursor: &str) -> bool {
        let _ = (resumed_at, cursor);
        true
    }
}

/// Every kind of source, for dispatch without trait objects.
pub enum AnySource {
    Wodify(Arc<wodify::Wodify>),
    PracticeHub(Arc<practicehub::PracticeHub>),
}

impl AnySource {
    /// Builds the adapter a source's config asks for.
    pub fn new(config: &SourceConfig) -> Result<AnySource, reqwest::Error> {
        match config.kind {
            SourceKind::Wodify => Ok(AnySource::Wodify(Arc::new(wodify::Wodify::new(config)?))),
            SourceKind::PracticeHub => Ok(AnySource::PracticeHub(Arc::new(
                practicehub::PracticeHub::new(config)?,
            ))),
        }
    }
}

impl AnySource {
    /// One authenticated read, for `check-config --connect`.
    pub async fn probe(&self) -> crate::http::Probe {
        match self {
            AnySource::Wodify(adapter) => adapter.probe().await,
            AnySource::PracticeHub(adapter) => adapter.probe().await,
        }
    }
}

/// A saved cursor in words ("Wodify scan at client id 10500"), for `status`.
pub fn describe_cursor(kind: SourceKind, cursor: Option<(&str, i64)>) -> String {
    match (kind, cursor) {
        (_, None) => "not polled yet".to_string(),
        (SourceKind::Wodify, Some((cursor, passes))) => {
            wodify::Wodify::describe_cursor(cursor, passes)
        }
        (SourceKind::PracticeHub, Some((cursor, _))) => {
            practicehub::PracticeHub::describe_cursor(cursor)
        }
    }
}

/// Why a poll stopped before the end of its listing.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{0}")]
    AuthRefused(String),
    #[error("unavailable after retries: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
}

/// What a poll needs besides its adapter.
#[derive(Clone)]
pub struct PollContext {
    pub source: SourceConfig,
    pub store: Store,
    pub limiter: Arc<Limiter>,
    pub backoff: Backoff,
    /// Fetch attempts before the poll gives up on a page (it resumes there next time).
    pub max_attempts: u32,
    /// Woken whenever a page enqueued work.
    pub wake_worker: Arc<Notify>,
    pub cancel: CancellationToken,
    /// Send every record again (`--resync`).
    pub resync: bool,
    pub run_id: Option<i64>,
    /// Running totals of the current poll, for progress displays.
    pub progress: Option<Arc<std::sync::Mutex<PollStats>>>,
}

impl PollContext {
    /// A context for `source` with its own limiter and attempts, no resync, no run record and
    /// no progress display (callers set those when they need them).
    pub fn new(
        source: &SourceConfig,
        store: Store,
        backoff: Backoff,
        wake_worker: Arc<Notify>,
        cancel: CancellationToken,
    ) -> PollContext {
        PollContext {
            source: source.clone(),
            store,
            limiter: Arc::new(Limiter::per_second(
                source.name.clone(),
                source.requests_per_second,
                source.burst,
            )),
            backoff,
            max_attempts: source.max_attempts,
            wake_worker,
            cancel,
            resync: false,
            run_id: None,
            progress: None,
        }
    }
}

/// Records what a poll said about the source's key, for `status` and `/readyz`: a refusal
/// sets an auth halt, a completed poll clears one, any other failure says nothing about it.
pub async fn record_key_outcome(
    store: &Store,
    source: &str,
    result: &Result<PollStats, PollError>,
) -> Result<(), StoreError> {
    let name = source.to_string();
    match result {
        Err(PollError::AuthRefused(reason)) => {
            let reason = reason.clone();
            store
                .call(move |s| s.set_halt(&name, "auth_refused", &reason))
                .await
        }
        Ok(_) => store.call(move |s| s.clear_halt(&name)).await,
        Err(_) => Ok(()),
    }
}

/// Polls a source once through its whole listing.
pub async fn poll(source: &AnySource, ctx: &PollContext) -> Result<PollStats, PollError> {
    match source {
        AnySource::Wodify(adapter) => poll_with(adapter, ctx).await,
        AnySource::PracticeHub(adapter) => poll_with(adapter, ctx).await,
    }
}

/// Walks a source's whole listing from the start without touching the state file, handing
/// each mapped page to `on_page` (`--dry-run`).
pub async fn scan(
    source: &AnySource,
    ctx: &PollContext,
    on_page: impl FnMut(Vec<Mapped>),
) -> Result<PollStats, PollError> {
    match source {
        AnySource::Wodify(adapter) => scan_with(adapter.as_ref(), ctx, on_page).await,
        AnySource::PracticeHub(adapter) => scan_with(adapter.as_ref(), ctx, on_page).await,
    }
}

async fn scan_with<A: Adapter>(
    adapter: &A,
    ctx: &PollContext,
    mut on_page: impl FnMut(Vec<Mapped>),
) -> Result<PollStats, PollError> {
    let mut stats = PollStats::default();
    let mut cursor = adapter.start_cursor();
    loop {
        if ctx.cancel.is_cancelled() {
            return Err(PollError::Cancelled);
        }
        let fetched = fetch_with_retry(adapter, ctx, &cursor)
            .await
            .map_err(poll_error)?;
        stats.pages += 1;
        stats.fetched += fetched.records.len() as u64;
        let mapped: Vec<Mapped> = fetched.records.iter().map(|r| adapter.map(r)).collect();
        stats.warnings += mapped.iter().map(|m| m.warnings.len() as u64).sum::<u64>();
        on_page(mapped);
        if fetched.pass_complete {
            return Ok(stats);
        }
        cursor = fetched.next;
    }
}

/// Sends one GET an adapter built (its URL and auth headers), reads the whole answer and records
/// the request's duration and status under `target`; `read` turns the status, body and
/// `Retry-After` into a value or an error.
async fn send_get<T>(
    request: reqwest::RequestBuilder,
    target: &'static str,
    read: impl FnOnce(StatusCode, &[u8], Option<Duration>) -> Result<T, SourceError>,
) -> Result<T, SourceError> {
    match send_measured(request, target, "read").await {
        Ok((status, retry_after, body)) => read(status, &body, retry_after),
        Err(transport) => Err(SourceError::Transient(transport)),
    }
}

/// `{base}/{collection}?page=1&page_size=1`: the one authenticated read of
/// `check-config --connect`.
fn probe_url(base: &Url, collection: &str) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push(collection);
    }
    url.query_pairs_mut()
        .append_pair("page", "1")
        .append_pair("page_size", "1");
    url
}

fn poll_error(error: SourceError) -> PollError {
    match error {
        SourceError::AuthRefused(e) => PollError::AuthRefused(e),
        SourceError::Permanent(e) => PollError::Failed(e),
        SourceError::NotFound => PollError::Failed(
            "the listing answered 404 Not Found: check the source's base_url".to_string(),
        ),
        other => PollError::Unavailable(other.to_string()),
    }
}

/// Fetches and maps one record for a push event; `None` when the source has no such record.
pub async fn fetch_one(
    source: &AnySource,
    ctx: &PollContext,
    external_id: &str,
) -> Result<Option<Mapped>, PollError> {
    match source {
        AnySource::Wodify(adapter) => fetch_one_with(adapter.as_ref(), ctx, external_id).await,
        AnySource::PracticeHub(adapter) => fetch_one_with(adapter.as_ref(), ctx, external_id).await,
    }
}

/// Whether an external id can name a record of this source.
pub fn valid_id(source: &AnySource, external_id: &str) -> bool {
    match source {
        AnySource::Wodify(adapter) => adapter.valid_id(external_id),
        AnySource::PracticeHub(adapter) => adapter.valid_id(external_id),
    }
}

async fn fetch_one_with<A: Adapter>(
    adapter: &A,
    ctx: &PollContext,
    external_id: &str,
) -> Result<Option<Mapped>, PollError> {
    match with_retries(ctx, || adapter.fetch_one(external_id)).await {
        Ok(record) => Ok(record.map(|r| adapter.map(&r))),
        Err(SourceError::NotFound) => Ok(None),
        Err(error) => Err(poll_error(error)),
    }
}

async fn poll_with<A: Adapter>(
    adapter: &Arc<A>,
    ctx: &PollContext,
) -> Result<PollStats, PollError> {
    let name = ctx.source.name.clone();
    let store = ctx.store.clone();
    let poll_id = {
        let (run_id, name) = (ctx.run_id, name.clone());
        store.call(move |s| s.begin_poll(run_id, &name)).await?
    };
    let mut stats = PollStats::default();
    let result = poll_pages(adapter, ctx, &mut stats, poll_id).await;
    let (outcome, error) = match &result {
        Ok(()) => ("ok", None),
        Err(PollError::Cancelled) => ("cancelled", None),
        Err(PollError::AuthRefused(e)) => ("auth_refused", Some(e.clone())),
        Err(e) => ("failed", Some(e.to_string())),
    };
    {
        let stats = stats;
        store
            .call(move |s| s.update_poll(poll_id, &stats, Some(outcome), error.as_deref()))
            .await?;
    }
    match &result {
        Ok(()) => tracing::info!(
            source = %name,
            pages = stats.pages,
            fetched = stats.fetched,
            enqueued = stats.enqueued,
            unchanged = stats.unchanged,
            rejected = stats.rejected,
            warnings = stats.warnings,
            "Poll finished."
        ),
        Err(PollError::Cancelled) => {
            tracing::info!(source = %name, pages = stats.pages, "Poll stopped early.")
        }
        Err(error) => tracing::error!(source = %name, %error, "Poll failed."),
    }
    result.map(|()| stats)
}

async fn poll_pages<A: Adapter>(
    adapter: &Arc<A>,
    ctx: &PollContext,
    stats: &mut PollStats,
    poll_id: i64,
) -> Result<(), PollError> {
    let name = ctx.source.name.as_str();
    let saved = {
        let name = name.to_string();
        ctx.store.call(move |s| s.cursor(&name)).await?
    };
    let start = adapter.start_cursor();
    let mut cursor = saved.map(|(c, _)| c).unwrap_or_else(|| start.clone());
    let resumed_at = adapter.mid_listing(&cursor).then(|| cursor.clone());
    if let Some(at) = &resumed_at {
        tracing::info!(source = %name, cursor = %at, "Resuming the listing where the last poll stopped.");
    }
    let mut wrapped = false;
    let mut commit: Option<tokio::task::JoinHandle<Result<CommitDone, StoreError>>> = None;
    loop {
        if ctx.cancel.is_cancelled() {
            finish_commit(commit.take(), ctx, stats, poll_id).await?;
            return Err(PollError::Cancelled);
        }
        // Fetch the next page while the previous one commits.
        let fetch = fetch_with_retry(adapter.as_ref(), ctx, &cursor);
        let previous = finish_commit(commit.take(), ctx, stats, poll_id);
        let (fetched, committed) = tokio::select! {
            both = async { tokio::join!(fetch, previous) } => both,
            () = ctx.cancel.cancelled() => {
                return Err(PollError::Cancelled);
            }
        };
        committed?;
        let fetched = fetched.map_err(poll_error)?;
        let stop = if fetched.pass_complete {
            match &resumed_at {
                Some(at) if !wrapped && !adapter.covers(at, &fetched.next) => {
                    wrapped = true;
                    false
                }
                _ => true,
            }
        } else {
            wrapped
                && resumed_at
                    .as_deref()
                    .is_some_and(|at| adapter.covers(at, &fetched.next))
        };
        let fetched_count = fetched.records.len();
        let next = fetched.next;
        let pass_complete = fetched.pass_complete;
        let records = fetched.records;
        let store = ctx.store.clone();
        let adapter = adapter.clone();
        let (source, revkeen_source, resync) = (
            name.to_string(),
            ctx.source.revkeen_source.clone(),
            ctx.resync,
        );
        let cursor_value = next.clone();
        // Mapping (normalization, phone parsing, hashing) and the transaction run on a blocking
        // thread while this task fetches the next page.
        commit = Some(tokio::task::spawn_blocking(move || {
            let mut items = Vec::with_capacity(records.len());
            let mut warnings = 0u64;
            for record in &records {
                let mapped = adapter.map(record);
                for warning in &mapped.warnings {
                    metrics::counter!("sync_daemon_normalization_warnings_total",
                        "source" => source.clone(), "warning" => *warning)
                    .increment(1);
                }
                warnings += mapped.warnings.len() as u64;
                items.push(mapped.item);
            }
            drop(records);
            let page = store.commit_page(
                &source,
                &revkeen_source,
                &items,
                Some(&cursor_value),
                pass_complete,
                resync,
            )?;
            Ok(CommitDone {
                fetched: fetched_count,
                warnings,
                page,
            })
        }));
        cursor = next;
        if pass_complete && A::FULL_SCAN {
            finish_commit(commit.take(), ctx, stats, poll_id).await?;
            report_vanished(ctx, stats).await?;
        }
        if stop {
            finish_commit(commit.take(), ctx, stats, poll_id).await?;
            return Ok(());
        }
    }
}

/// After a complete full scan: counts and logs records that the previous scan listed and this
/// one did not. They are not deleted in RevKeen (the source may have archived them).
async fn report_vanished(ctx: &PollContext, stats: &mut PollStats) -> Result<(), PollError> {
    let name = ctx.source.name.clone();
    let (new, total) = {
        let name = name.clone();
        ctx.store
            .call(move |s| {
                let pass = s.cursor(&name)?.map(|(_, passes)| passes).unwrap_or(0);
                if pass < 2 {
                    return Ok((Vec::new(), 0));
                }
                s.clear_vanished_rejections(&name, pass)?;
                s.vanished(&name, pass)
            })
            .await?
    };
    stats.vanished = total;
    metrics::gauge!("sync_daemon_vanished_records", "source" => name.clone()).set(total as f64);
    if !new.is_empty() {
        let shown: Vec<&str> = new.iter().take(50).map(String::as_str).collect();
        let more = if new.len() > shown.len() {
            format!(" and {} more", new.len() - shown.len())
        } else {
            String::new()
        };
        tracing::warn!(
            source = %name,
            vanished = new.len(),
            total_vanished = total,
            "Records vanished from the source since the last complete scan; they stay in RevKeen: {}{more}.",
            shown.join(", ")
        );
    }
    Ok(())
}

struct CommitDone {
    fetched: usize,
    warnings: u64,
    page: crate::store::PageOutcome,
}

async fn finish_commit(
    commit: Option<tokio::task::JoinHandle<Result<CommitDone, StoreError>>>,
    ctx: &PollContext,
    stats: &mut PollStats,
    poll_id: i64,
) -> Result<(), PollError> {
    let Some(commit) = commit else {
        return Ok(());
    };
    let done = match commit.await {
        Ok(done) => done?,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => return Err(PollError::Cancelled),
    };
    stats.add_page(done.fetched, &done.page);
    stats.warnings += done.warnings;
    if let Some(progress) = &ctx.progress {
        *progress.lock().expect("progress lock poisoned") = *stats;
    }
    // `status` shows a running poll's progress.
    let running = *stats;
    ctx.store
        .call(move |s| s.update_poll(poll_id, &running, None, None))
        .await?;
    let name = ctx.source.name.clone();
    metrics::counter!("sync_daemon_fetched_total", "source" => name.clone())
        .increment(done.fetched as u64);
    metrics::counter!("sync_daemon_enqueued_total", "source" => name.clone())
        .increment(done.page.enqueued);
    metrics::counter!("sync_daemon_unchanged_total", "source" => name.clone())
        .increment(done.page.unchanged);
    metrics::counter!("sync_daemon_skipped_total", "source" => name.clone())
        .increment(done.page.skipped);
    metrics::counter!("sync_daemon_rejected_total", "source" => name).increment(done.page.rejected);
    if done.page.enqueued > 0 {
        ctx.wake_worker.notify_one();
    }
    Ok(())
}

async fn fetch_with_retry<A: Adapter>(
    adapter: &A,
    ctx: &PollContext,
    cursor: &str,
) -> Result<Fetched<A::Record>, SourceError> {
    with_retries(ctx, || adapter.fetch(cursor)).await
}

/// Sends `request` through the source's rate limiter, retrying what can be retried with
/// backoff, up to the source's `max_attempts`.
async fn with_retries<T, F, Fut>(ctx: &PollContext, mut request: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let name = ctx.source.name.as_str();
    let limiter = &ctx.limiter;
    let attempt = || {
        let answer = request();
        async move {
            limiter.acquire().await;
            let result = answer.await;
            if let Err(SourceError::RateLimited(Some(wait))) = &result {
                // Every request to the host waits, not just this one.
                limiter.pause(*wait);
            }
            result
        }
    };
    attempt
        .retry(ctx.backoff.builder(ctx.max_attempts.saturating_sub(1) as usize))
        .sleep(tokio::time::sleep)
        .when(SourceError::is_retryable)
        .adjust(|error, delay| match error {
            // The pause already holds the limiter; retry as soon as it lifts.
            SourceError::RateLimited(Some(_)) => delay.map(|_| Duration::ZERO),
            _ => delay,
        })
        .notify(|error, delay| {
            tracing::warn!(source = %name, %error, retry_in_ms = delay.as_millis() as u64, "Fetch failed; retrying.");
        })
        .await
}
