//! The poll loop every adapter shares: a whole listing, page by page, through the source's rate
//! limiter and retries, each page mapped and committed with its cursor in one transaction.
//!
//! A poll covers the whole listing once. A poll that starts where a crashed one stopped
//! resumes there and, for adapters whose listing is a full scan (Wodify), wraps around to the
//! start and stops where it began, so every record is read at least once per poll. The next
//! page is fetched while the previous one is mapped and committed on a blocking thread.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::budget::{self, Budget, Counter};
use super::{Mapped, Page, Source, SourceError, kind_of};
use crate::config::SourceConfig;
use crate::limiter::{Backoff, Limiter};
use crate::store::{CursorSave, PageOutcome, PollStats, SeenIds, Store, StoreError};

/// Why a poll stopped before the end of its listing.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The source refused its key.
    #[error("{0}")]
    AuthRefused(String),
    /// The source stayed unavailable through every retry.
    #[error("unavailable after retries: {0}")]
    Unavailable(SourceError),
    /// The source answered in a way no retry changes (a wrong base URL, a bad request).
    #[error("{0}")]
    Failed(SourceError),
    /// The month's requests are spent (the source's quota or its `monthly_request_budget`):
    /// nothing is sent until the month turns.
    #[error("{0}")]
    QuotaSpent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
}

impl PollError {
    /// The exit code of a run that this failure ended (one mapping for `--once` and
    /// `--dry-run`).
    pub fn exit_status(&self) -> crate::exit::ExitStatus {
        use crate::exit::ExitStatus;
        match self {
            PollError::AuthRefused(_) => ExitStatus::AuthRefused,
            PollError::Unavailable(_) | PollError::QuotaSpent(_) => ExitStatus::Unavailable,
            PollError::Failed(_) | PollError::Store(_) | PollError::Cancelled => {
                ExitStatus::Failure
            }
        }
    }
}

impl From<SourceError> for PollError {
    fn from(error: SourceError) -> PollError {
        match error {
            SourceError::AuthRefused(e) => PollError::AuthRefused(e),
            SourceError::Permanent(_) => PollError::Failed(error),
            SourceError::NotFound => PollError::Failed(SourceError::Permanent(
                "the listing answered 404 Not Found: check the source's base_url".to_string(),
            )),
            // Not retried, but an upstream problem like one that stayed down (exit 69).
            SourceError::Misdirected(_) => PollError::Unavailable(error),
            SourceError::Pagination(_) => PollError::Failed(error),
            SourceError::QuotaSpent(message) => PollError::QuotaSpent(message),
            other => PollError::Unavailable(other),
        }
    }
}

/// What fetching from a source needs: its name, rate limiter, retry policy and cancellation.
#[derive(Clone)]
pub struct FetchContext {
    /// The source's configured name, for logs and metrics.
    pub source: String,
    pub limiter: Arc<Limiter>,
    pub backoff: Backoff,
    /// Fetch attempts before a request is given up on.
    pub max_attempts: u32,
    /// The longest a 429 pauses requests to the source (`max_retry_after_secs`).
    pub max_pause: Duration,
    /// Where a long pause is recorded for `status` (none for a dry run, which writes nothing).
    pub pauses: Option<Store>,
    pub cancel: CancellationToken,
    /// The source's monthly request budget: every request passes it (shared by the source's
    /// polls and push fetches).
    pub budget: Arc<Budget>,
    /// The requests of the poll this context belongs to.
    pub requests: Option<Counter>,
}

impl FetchContext {
    /// A context for `source` with its own limiter and attempts.
    pub fn new(source: &SourceConfig, backoff: Backoff, cancel: CancellationToken) -> Self {
        FetchContext {
            source: source.name.clone(),
            limiter: Arc::new(Limiter::per_second(
                source.name.clone(),
                source.requests_per_second,
                source.burst,
            )),
            backoff,
            max_attempts: source.max_attempts,
            max_pause: Duration::from_secs(source.max_retry_after_secs),
            pauses: None,
            cancel,
            // Counted in memory only; a context with a state file counts there.
            budget: Budget::new(source, None, false),
            requests: None,
        }
    }
}

/// What a poll needs besides its adapter.
#[derive(Clone)]
pub struct PollContext {
    pub fetch: FetchContext,
    pub source: SourceConfig,
    pub store: Store,
    /// Woken whenever a page enqueued work.
    pub wake_worker: Arc<Notify>,
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
            fetch: FetchContext {
                pauses: Some(store.clone()),
                budget: Budget::new(source, Some(store.clone()), true),
                ..FetchContext::new(source, backoff, cancel)
            },
            source: source.clone(),
            store,
            wake_worker,
            resync: false,
            run_id: None,
            progress: None,
        }
    }

    fn name(&self) -> &str {
        &self.source.name
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

/// Walks a source's whole listing from the start without touching the state file, handing
/// each mapped page to `on_page` (`--dry-run`).
pub async fn scan(
    source: &dyn Source,
    ctx: &FetchContext,
    mut on_page: impl FnMut(Vec<Mapped>),
) -> Result<PollStats, PollError> {
    let mut stats = PollStats::default();
    let mut cursor = source.start_cursor();
    let mut progress = Progress::new(FIRST_LISTING_PAGES);
    loop {
        if ctx.cancel.is_cancelled() {
            return Err(PollError::Cancelled);
        }
        let page = with_retries(ctx, || source.fetch(&cursor)).await?;
        progress.check(&ctx.source, &cursor, &page)?;
        stats.pages += 1;
        stats.fetched += page.records.len() as u64;
        let mapped = map_records(source, &page);
        stats.warnings += mapped.iter().map(|m| m.warnings.len() as u64).sum::<u64>();
        on_page(mapped);
        if page.pass_complete {
            return Ok(stats);
        }
        cursor = page.next;
    }
}

/// Fetches and maps one record for a push event; `None` when the source has no such record.
pub async fn fetch_one(
    source: &dyn Source,
    ctx: &FetchContext,
    external_id: &str,
) -> Result<Option<Mapped>, PollError> {
    match with_retries(ctx, || source.fetch_one(external_id)).await {
        Ok(record) => Ok(record.map(|r| source.map(&r))),
        Err(SourceError::NotFound) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Polls a source once through its whole listing, recording the poll for `status`.
pub async fn poll(source: &Arc<dyn Source>, ctx: &PollContext) -> Result<PollStats, PollError> {
    let requests = Counter::default();
    let ctx = &PollContext {
        fetch: FetchContext {
            requests: Some(requests.clone()),
            ..ctx.fetch.clone()
        },
        ..ctx.clone()
    };
    let started_at = crate::clock::now_ms();
    let name = ctx.name().to_string();
    let store = ctx.store.clone();
    let poll_id = {
        let (run_id, name) = (ctx.run_id, name.clone());
        store.call(move |s| s.begin_poll(run_id, &name)).await?
    };
    let mut stats = PollStats::default();
    let result = poll_pages(source, ctx, &mut stats, poll_id).await;
    let (outcome, error) = match &result {
        Ok(()) => ("ok", None),
        Err(PollError::Cancelled) => ("cancelled", None),
        Err(PollError::AuthRefused(e)) => ("auth_refused", Some(e.clone())),
        Err(e) => ("failed", Some(e.to_string())),
    };
    // Counted before it is recorded: a poll that failed on the state file is counted even
    // when recording it fails too.
    count_poll(&name, &result);
    ctx.fetch
        .budget
        .finish_poll(
            requests.load(std::sync::atomic::Ordering::Relaxed),
            started_at,
            result.is_ok(),
        )
        .await;
    store
        .call(move |s| s.update_poll(poll_id, &stats, Some(outcome), error.as_deref()))
        .await?;
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

/// Counts a finished poll in `sync_daemon_polls_total` by outcome (a poll stopped by a
/// shutdown is not counted); a complete one, changes or not, also moves the last successful
/// poll's time.
fn count_poll(source: &str, result: &Result<(), PollError>) {
    use crate::metrics::{POLL_AUTH_REFUSED, POLL_FAILED, POLL_OK, POLL_UNAVAILABLE, POLLS};
    let outcome = match result {
        Ok(()) => POLL_OK,
        Err(PollError::Cancelled) => return,
        Err(PollError::AuthRefused(_)) => POLL_AUTH_REFUSED,
        Err(PollError::Unavailable(_) | PollError::QuotaSpent(_)) => POLL_UNAVAILABLE,
        Err(PollError::Failed(_) | PollError::Store(_)) => POLL_FAILED,
    };
    metrics::counter!(POLLS, "source" => source.to_string(), "outcome" => outcome).increment(1);
    if result.is_ok() {
        crate::metrics::poll_succeeded_at(source, crate::clock::now_ms());
    }
}

/// How many pages a first listing may take (no earlier listing to measure by): 2 million
/// records. Progress checks stop any loop long before; this stops whatever they cannot see.
const FIRST_LISTING_PAGES: u64 = 20_000;

/// The most pages a poll may read: three times the largest of its source's recent complete
/// polls (a resumed poll reads a listing and a bit), and never fewer than 200.
async fn page_cap(ctx: &PollContext) -> Result<u64, PollError> {
    let name = ctx.name().to_string();
    let recent = ctx.store.call(move |s| s.recent_max_pages(&name)).await?;
    Ok(match recent {
        None => FIRST_LISTING_PAGES,
        Some(pages) => pages.saturating_mul(3).saturating_add(10).max(200),
    })
}

/// Proof that a listing moves: every page must lead somewhere new. A cursor that does not
/// change, one already visited in this pass, the same records twice in a row, or more pages
/// than the cap end the poll with an error that says which (the next poll resumes at the last
/// committed page, so nothing is lost).
struct Progress {
    visited: std::collections::HashSet<String>,
    previous: Vec<Option<String>>,
    pages: u64,
    cap: u64,
}

impl Progress {
    fn new(cap: u64) -> Progress {
        Progress {
            visited: std::collections::HashSet::new(),
            previous: Vec::new(),
            pages: 0,
            cap,
        }
    }

    fn check(&mut self, source: &str, cursor: &str, page: &Page) -> Result<(), SourceError> {
        self.pages += 1;
        let pages = self.pages;
        let stuck = |why: String| {
            SourceError::Pagination(format!(
                "{source}'s listing does not advance: {why}; stopped after {pages} pages (the \
                 next poll resumes at the last page committed)"
            ))
        };
        if self.pages > self.cap {
            return Err(stuck(format!(
                "more than {} pages in one poll, three times its largest recent listing",
                self.cap
            )));
        }
        if page.ids.iter().any(Option::is_some) && page.ids == self.previous {
            return Err(stuck(
                "it returned the same records twice in a row".to_string(),
            ));
        }
        if page.pass_complete {
            // A new pass may legitimately walk the same pages again.
            self.visited.clear();
        } else if page.next == cursor {
            return Err(stuck(format!("the page after {cursor} is {cursor} again")));
        } else if !self.visited.insert(page.next.clone()) {
            return Err(stuck(format!(
                "it led back to a page already read in this listing ({})",
                page.next
            )));
        }
        self.previous = page.ids.clone();
        Ok(())
    }
}

/// Where a poll starts and when it is done.
struct Listing {
    cursor: String,
    /// Where a crashed poll stopped, when this one resumes it.
    resumed_at: Option<String>,
    /// A resumed poll has passed the end of the listing and started over.
    wrapped: bool,
}

/// An unchanged page commits nothing: its cursor waits for the next page that writes anything,
/// the end of the pass, the end of the poll, or this many pages, whichever comes first. A crash
/// re-reads at most this many unchanged pages (about 2,000 records, as many requests).
pub const CURSOR_SAVE_EVERY: u32 = 20;

/// What the pages committed so far reached that the state file does not hold yet.
#[derive(Default)]
struct Pass {
    /// The ids the pass in progress listed; `None` when it began in a poll that stopped without
    /// saving them (a crash), so its end cannot tell what vanished.
    seen: Option<SeenIds>,
    /// The cursor past committed pages that changed nothing, not saved yet, and how many.
    unsaved: Option<String>,
    unsaved_pages: u32,
}

impl Pass {
    /// How the next page's commit treats its cursor.
    fn cursor_save<'a>(&self, next: &'a str) -> CursorSave<'a> {
        if self.unsaved_pages + 1 >= CURSOR_SAVE_EVERY {
            CursorSave::Always(next)
        } else {
            CursorSave::WithChanges(next)
        }
    }
}

impl Listing {
    /// Whether the page that moved the listing to `next` ends this poll.
    fn ends_with(&mut self, source: &dyn Source, next: &str, pass_complete: bool) -> bool {
        match (&self.resumed_at, pass_complete) {
            (None, pass_complete) => pass_complete,
            (Some(at), true) if !self.wrapped && !source.covers(at, next) => {
                self.wrapped = true;
                false
            }
            (Some(_), true) => true,
            (Some(at), false) => self.wrapped && source.covers(at, next),
        }
    }
}

/// A page being mapped and committed on a blocking thread.
type Commit = JoinHandle<Result<CommitDone, StoreError>>;

async fn poll_pages(
    source: &Arc<dyn Source>,
    ctx: &PollContext,
    stats: &mut PollStats,
    poll_id: i64,
) -> Result<(), PollError> {
    let (mut listing, seen) = start_listing(source.as_ref(), ctx).await?;
    let mut pass = Pass {
        seen,
        ..Pass::default()
    };
    let result = walk(source, ctx, stats, poll_id, &mut listing, &mut pass).await;
    // However the poll ended, what its committed pages reached is kept: the cursor held back
    // and, mid-pass, the ids listed so far.
    let kept = stop_listing(ctx, &mut pass).await;
    match (result, kept) {
        (Err(error), Err(lost)) => {
            tracing::warn!(source = %ctx.name(), error = %lost, "Cannot save where the listing stopped; the next poll reads a few pages again.");
            Err(error)
        }
        (result, kept) => result.and(kept),
    }
}

async fn walk(
    source: &Arc<dyn Source>,
    ctx: &PollContext,
    stats: &mut PollStats,
    poll_id: i64,
    listing: &mut Listing,
    pass: &mut Pass,
) -> Result<(), PollError> {
    let mut progress = Progress::new(page_cap(ctx).await?);
    let mut commit: Option<Commit> = None;
    loop {
        if ctx.fetch.cancel.is_cancelled() {
            finish_commit(commit.take(), ctx, stats, poll_id, pass).await?;
            return Err(PollError::Cancelled);
        }
        // Fetch the next page while the previous one commits.
        let cursor = listing.cursor.clone();
        let fetch = with_retries(&ctx.fetch, || source.fetch(&cursor));
        let previous = finish_commit(commit.take(), ctx, stats, poll_id, pass);
        let (fetched, committed) = tokio::select! {
            both = async { tokio::join!(fetch, previous) } => both,
            () = ctx.fetch.cancel.cancelled() => return Err(PollError::Cancelled),
        };
        committed?;
        let page = fetched?;
        progress.check(ctx.name(), &listing.cursor, &page)?;
        let stop = listing.ends_with(source.as_ref(), &page.next, page.pass_complete);
        let pass_complete = page.pass_complete;
        listing.cursor = page.next.clone();
        // A full scan tells which records vanished: every pass of a full-scan kind, and an
        // incremental adapter's full listings.
        let full_scan = match kind_of(&ctx.source) {
            Ok(kind) if kind.full_scan() => true,
            _ => pass_complete && source.completed_full_scan(&page.next),
        };
        commit = Some(spawn_commit(source.clone(), ctx, page, pass));
        if pass_complete {
            finish_commit(commit.take(), ctx, stats, poll_id, pass).await?;
            // The next pass starts at the start of the listing: its ids are all this poll's.
            let seen = pass.seen.replace(SeenIds::default());
            if full_scan {
                report_vanished(ctx, stats, seen).await?;
            }
        }
        if stop {
            finish_commit(commit.take(), ctx, stats, poll_id, pass).await?;
            return Ok(());
        }
    }
}

/// When a poll stops: saves the cursor of unchanged pages held back and, in the middle of a
/// pass, the ids it listed (a poll that stopped right at a pass's end has none to keep).
async fn stop_listing(ctx: &PollContext, pass: &mut Pass) -> Result<(), PollError> {
    let cursor = pass.unsaved.take();
    pass.unsaved_pages = 0;
    let seen = pass.seen.take().filter(|seen| !seen.is_empty());
    if cursor.is_none() && seen.is_none() {
        return Ok(());
    }
    let name = ctx.name().to_string();
    // `call` may run its closure again (a busy state file): the set is sorted in place, once.
    let seen = std::sync::Mutex::new(seen);
    ctx.store
        .call(move |s| {
            let mut seen = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.stop_listing(&name, cursor.as_deref(), seen.as_mut())
        })
        .await?;
    Ok(())
}

/// Where this poll starts: the saved cursor, whether that resumes a crashed poll, and the ids
/// the pass in progress has listed (`None` when they are lost: a poll that resumes a crashed
/// one cannot tell what vanished at the end of that pass).
async fn start_listing(
    source: &dyn Source,
    ctx: &PollContext,
) -> Result<(Listing, Option<SeenIds>), PollError> {
    let saved = {
        let name = ctx.name().to_string();
        ctx.store.call(move |s| s.cursor(&name)).await?
    };
    let cursor = saved
        .map(|(c, _)| c)
        .unwrap_or_else(|| source.start_cursor());
    let kept = {
        let (name, cursor) = (ctx.name().to_string(), cursor.clone());
        ctx.store
            .call(move |s| s.resume_pass(&name, &cursor))
            .await?
    };
    // `--resync` reads every record: an incremental adapter starts a full listing.
    let cursor = if ctx.resync {
        source.full_listing(&cursor)
    } else {
        cursor
    };
    let resumed_at = source.mid_listing(&cursor).then(|| cursor.clone());
    let seen = match (&resumed_at, kept) {
        (None, _) => Some(SeenIds::default()),
        (Some(_), Some(kept)) => Some(kept),
        (Some(at), None) => {
            tracing::info!(source = %ctx.name(), cursor = %at, "Resuming the listing where the last poll stopped.");
            None
        }
    };
    let listing = Listing {
        cursor,
        resumed_at,
        wrapped: false,
    };
    Ok((listing, seen))
}

/// Maps a page (normalization, phone parsing, hashing) and commits it with its cursor, on a
/// blocking thread while the poll fetches the next page. The pass's ids travel with it and
/// come back in [`CommitDone`].
fn spawn_commit(source: Arc<dyn Source>, ctx: &PollContext, page: Page, pass: &mut Pass) -> Commit {
    let store = ctx.store.clone();
    let (name, revkeen_source, resync) = (
        ctx.name().to_string(),
        ctx.source.revkeen_source.clone(),
        ctx.resync,
    );
    let mut seen = pass.seen.take();
    let force = matches!(pass.cursor_save(""), CursorSave::Always(_));
    tokio::task::spawn_blocking(move || {
        let fetched = page.records.len();
        let (items, warnings) = map_page(source.as_ref(), &name, &page);
        if let Some(seen) = seen.as_mut() {
            for item in &items {
                seen.insert(&item.external_id);
            }
        }
        let cursor = if force {
            CursorSave::Always(&page.next)
        } else {
            CursorSave::WithChanges(&page.next)
        };
        let outcome = store.commit_page(
            &name,
            &revkeen_source,
            &items,
            cursor,
            page.pass_complete,
            resync,
        )?;
        Ok(CommitDone {
            fetched,
            warnings,
            outcome,
            cursor: page.next,
            seen,
        })
    })
}

/// Maps every record of a page, each on its own: a mapping that panics (a bug, or a library
/// tripping over a value) becomes that record's rejection, never a lost page or a dead run.
fn map_records(source: &dyn Source, page: &Page) -> Vec<Mapped> {
    page.records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.map(record)))
                .unwrap_or_else(|_| {
                    let id = page.ids.get(i).cloned().flatten();
                    super::unreadable(
                        id,
                        &format!("position-{i}"),
                        format!("record {} of a page could not be mapped (it made sync-daemon panic)", i + 1),
                        "a bug in sync-daemon: please report it; the record is read again on every poll",
                    )
                })
        })
        .collect()
}

/// Maps every record of a page, counting the fields that had to be left out.
fn map_page(source: &dyn Source, name: &str, page: &Page) -> (Vec<crate::store::PageItem>, u64) {
    let mut items = Vec::with_capacity(page.records.len());
    let mut warnings = 0u64;
    for mapped in map_records(source, page) {
        for warning in &mapped.warnings {
            metrics::counter!(crate::metrics::NORMALIZATION_WARNINGS,
                "source" => name.to_string(), "warning" => *warning)
            .increment(1);
        }
        warnings += mapped.warnings.len() as u64;
        items.push(mapped.item);
    }
    (items, warnings)
}

/// After a complete full scan that listed `seen`: counts and logs the records known before and
/// not listed now. They are not deleted in RevKeen (the source may have archived them). With
/// the pass's ids lost (it began in a poll that crashed), nothing is decided until the next.
async fn report_vanished(
    ctx: &PollContext,
    stats: &mut PollStats,
    seen: Option<SeenIds>,
) -> Result<(), PollError> {
    let name = ctx.name().to_string();
    let Some(seen) = seen else {
        tracing::info!(source = %name, "This scan began in a poll that stopped without saving what it had listed; vanished records are looked for at the end of the next one.");
        let total = {
            let name = name.clone();
            ctx.store.call(move |s| s.vanished_total(&name)).await?
        };
        stats.vanished = total;
        metrics::gauge!(crate::metrics::VANISHED_RECORDS, "source" => name).set(total as f64);
        return Ok(());
    };
    let (new, total) = {
        let name = name.clone();
        let seen = std::sync::Mutex::new(seen);
        ctx.store
            .call(move |s| {
                let pass = s.cursor(&name)?.map(|(_, passes)| passes).unwrap_or(0);
                let mut seen = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.record_vanished(&name, pass, &mut seen)
            })
            .await?
    };
    stats.vanished = total;
    metrics::gauge!(crate::metrics::VANISHED_RECORDS, "source" => name.clone()).set(total as f64);
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
    outcome: PageOutcome,
    /// The cursor past the page, and whether the commit saved it.
    cursor: String,
    /// The pass's ids, with this page's added.
    seen: Option<SeenIds>,
}

/// Waits for a page's commit and accounts for it: stats, progress, the pass's ids and held-back
/// cursor, the poll's record (with the cursor: an unchanged page writes neither), metrics,
/// and a wake-up for the worker when the page queued work.
async fn finish_commit(
    commit: Option<Commit>,
    ctx: &PollContext,
    stats: &mut PollStats,
    poll_id: i64,
    pass: &mut Pass,
) -> Result<(), PollError> {
    let Some(commit) = commit else {
        return Ok(());
    };
    let done = match commit.await {
        Ok(done) => done?,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => return Err(PollError::Cancelled),
    };
    pass.seen = done.seen;
    if done.outcome.cursor_saved {
        pass.unsaved = None;
        pass.unsaved_pages = 0;
    } else {
        pass.unsaved = Some(done.cursor);
        pass.unsaved_pages += 1;
    }
    stats.add_page(done.fetched, &done.outcome);
    stats.warnings += done.warnings;
    if let Some(progress) = &ctx.progress {
        *progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = *stats;
    }
    // `status` shows a running poll's progress, as of the last page that wrote anything.
    if done.outcome.cursor_saved {
        let running = *stats;
        ctx.store
            .call(move |s| s.update_poll(poll_id, &running, None, None))
            .await?;
    }
    let name = ctx.name().to_string();
    let page = done.outcome;
    metrics::counter!(crate::metrics::FETCHED, "source" => name.clone())
        .increment(done.fetched as u64);
    metrics::counter!(crate::metrics::ENQUEUED, "source" => name.clone()).increment(page.enqueued);
    metrics::counter!(crate::metrics::UNCHANGED, "source" => name.clone())
        .increment(page.unchanged);
    metrics::counter!(crate::metrics::SKIPPED, "source" => name.clone()).increment(page.skipped);
    metrics::counter!(crate::metrics::REJECTED, "source" => name).increment(page.rejected);
    if page.enqueued > 0 {
        ctx.wake_worker.notify_one();
    }
    Ok(())
}

/// A 429 with `Retry-After`: every request to the host waits, not just this one, for at most
/// `max_retry_after_secs`; a long pause is recorded for `status`.
async fn pause(ctx: &FetchContext, asked: Duration) {
    let wait = asked.min(ctx.max_pause);
    if wait < asked {
        tracing::warn!(
            source = %ctx.source,
            asked_secs = asked.as_secs(),
            waiting_secs = wait.as_secs(),
            "The source asked to wait longer than its max_retry_after_secs; waiting that long instead."
        );
    }
    ctx.limiter.pause(wait);
    let Some(store) = ctx
        .pauses
        .as_ref()
        .filter(|_| wait >= crate::limiter::REPORTED_PAUSE)
    else {
        return;
    };
    let until =
        crate::clock::now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
    let reason = crate::limiter::pause_reason(&ctx.source, asked, wait, "max_retry_after_secs");
    let target = ctx.source.clone();
    if let Err(error) = store
        .call(move |s| s.set_pause(&target, until, &reason))
        .await
    {
        tracing::warn!(source = %ctx.source, %error, "Cannot record the pause for `status`.");
    }
}

/// Sends `request` through the source's rate limiter, retrying what can be retried with
/// backoff, up to the source's `max_attempts`.
async fn with_retries<T, F, Fut>(ctx: &FetchContext, mut request: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SourceError>>,
{
    let name = ctx.source.as_str();
    let attempt = || {
        let answer = request();
        async move {
            ctx.limiter.acquire().await;
            // Counted before it is sent; refused once the month's requests are spent.
            ctx.budget.admit().await?;
            budget::count(&ctx.requests);
            let result = ctx.budget.answered(answer.await).await;
            if let Err(SourceError::RateLimited(Some(asked))) = &result {
                pause(ctx, *asked).await;
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

#[cfg(test)]
mod tests {
    //! The poll loop against a scripted source on a paused clock.

    use futures_util::future::BoxFuture;
    use tokio::time::Instant;

    use super::*;
    use crate::config::{Config, Environment};
    use crate::http::Probe;
    use crate::sources::Record;
    use crate::store::test_support::temp_store;
    use crate::store::{PageItem, PageItemOutcome};
    use crate::testing::Script;

    /// A page of the script: the ids on it and whether it ends the listing, or an error.
    type Step = Result<(Vec<u32>, bool), SourceError>;

    /// A source whose pages come from a script (the last step repeats); records are ids.
    type Scripted = Script<Step>;

    fn page(ids: &[u32], pass_complete: bool) -> Step {
        Ok((ids.to_vec(), pass_complete))
    }

    fn scripted(pages: Vec<Step>, latency: Duration) -> Arc<Scripted> {
        Arc::new(Script::new(pages, latency))
    }

    impl Source for Scripted {
        fn start_cursor(&self) -> String {
            "start".to_string()
        }

        fn fetch<'a>(&'a self, _cursor: &'a str) -> BoxFuture<'a, Result<Page, SourceError>> {
            Box::pin(async move {
                let (ids, pass_complete) = self.next().await.unwrap_or(Ok((Vec::new(), true)))?;
                Ok(Page {
                    ids: ids.iter().map(|id| Some(id.to_string())).collect(),
                    records: ids.iter().map(|id| Record::new(id.to_string())).collect(),
                    next: if pass_complete {
                        "start".to_string()
                    } else {
                        format!("after {}", ids.last().copied().unwrap_or(0))
                    },
                    pass_complete,
                })
            })
        }

        fn fetch_one<'a>(
            &'a self,
            _id: &'a str,
        ) -> BoxFuture<'a, Result<Option<Record>, SourceError>> {
            Box::pin(async { Ok(None) })
        }

        fn external_id(&self, text: &str) -> Option<String> {
            Some(text.to_string())
        }

        fn map(&self, record: &Record) -> Mapped {
            let id = record.get::<String>().cloned().unwrap_or_default();
            Mapped {
                item: PageItem {
                    outcome: PageItemOutcome::Customer {
                        body: format!(r#"{{"email":"c{id}@example.com"}}"#).into_bytes(),
                        update_only: false,
                    },
                    external_id: id,
                },
                warnings: Vec::new(),
            }
        }

        fn probe(&self) -> BoxFuture<'_, Probe> {
            Box::pin(async { Probe::Ok })
        }
    }

    fn context(store: &Store) -> PollContext {
        let config = Config::from_toml(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='gym'\nkind='wodify'\n\
             base_url='https://api.wodify.com/v1'\napi_key='w'\nmax_attempts=3\n\
             requests_per_second=1000\nburst=1000\n",
            &Environment::default(),
            &crate::sources::config_kinds(),
        )
        .expect("config");
        PollContext::new(
            &config.sources[0],
            store.clone(),
            Backoff::default(),
            Arc::new(Notify::new()),
            CancellationToken::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_stops_at_cancellation_without_waiting_for_a_slow_page() {
        let (store, _dir) = temp_store();
        let source = scripted(vec![page(&[1, 2], true)], Duration::from_secs(60));
        let ctx = context(&store);
        let cancel = ctx.fetch.cancel.clone();
        let adapter: Arc<dyn Source> = source.clone();
        let poll = tokio::spawn(async move { poll(&adapter, &ctx).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cancelled = Instant::now();
        cancel.cancel();
        let result = poll.await.expect("joins");
        assert!(matches!(result, Err(PollError::Cancelled)), "{result:?}");
        assert_eq!(
            cancelled.elapsed(),
            Duration::ZERO,
            "no wait for the 60 s page"
        );
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            None,
            "nothing committed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_page_waits_out_its_retry_after_and_the_poll_goes_on() {
        let (store, _dir) = temp_store();
        let source = scripted(
            vec![
                page(&[1, 2], false),
                Err(SourceError::RateLimited(Some(Duration::from_secs(20)))),
                page(&[3], true),
            ],
            Duration::ZERO,
        );
        let adapter: Arc<dyn Source> = source.clone();
        let stats = poll(&adapter, &context(&store)).await.expect("poll");
        assert_eq!((stats.pages, stats.enqueued), (2, 3));
        let fetches = source.arrivals();
        assert_eq!(fetches.len(), 3, "{fetches:?}");
        assert_eq!(
            fetches[2] - fetches[1],
            Duration::from_secs(20),
            "{fetches:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_page_that_stays_unavailable_fails_the_poll_and_keeps_the_cursor() {
        let (store, _dir) = temp_store();
        let source = scripted(
            vec![
                page(&[1, 2], false),
                Err(SourceError::Transient("HTTP 502".into())),
            ],
            Duration::ZERO,
        );
        let adapter: Arc<dyn Source> = source.clone();
        let result = poll(&adapter, &context(&store)).await;
        assert!(
            matches!(result, Err(PollError::Unavailable(_))),
            "{result:?}"
        );
        // One page read, then max_attempts = 3 tries of the next with backoff between them.
        let fetches = source.arrivals();
        assert_eq!(fetches.len(), 4, "{fetches:?}");
        for (n, pair) in fetches[1..].windows(2).enumerate() {
            assert!(
                pair[1] - pair[0] <= Duration::from_secs(1 << n),
                "{fetches:?}"
            );
        }
        // The next poll resumes after the committed page.
        assert_eq!(
            store.cursor("gym").expect("cursor"),
            Some(("after 2".to_string(), 0))
        );
    }
}
