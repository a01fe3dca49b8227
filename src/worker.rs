//! The queue worker: claims units from the outbox, sends them to RevKeen and records the answer.
//!
//! Up to `concurrency` requests are in flight, all drawing from one RevKeen [`Limiter`]. A unit
//! is claimed only once a rate-limit token is in hand, so batches are filled as late as
//! possible. Every answer maps onto the failure policy (ARCHITECTURE.md): an acknowledgement only on a final
//! answer (invariant 2), retries with full-jitter backoff stored in the outbox (so a restart
//! does not reset them), a host-wide pause on 429, and an auth halt on 401/403 that stops all
//! sending with the refused key.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::health::Health;
use crate::http::Probe;
use crate::limiter::{Backoff, Limiter};
use crate::revkeen::{Answer, ApiError, BatchResult, RevKeenClient};
use crate::store::{ClaimFilter, DeadLetter, DeliveryCounts, Finished, Store, StoreError, Unit};
use futures_util::future::BoxFuture;

/// How long to wait before retrying a key RevKeen is still processing.
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(2);
/// The halt target name for RevKeen (sources use their own names).
pub(crate) const REVKEEN: &str = crate::metrics::REVKEEN;
/// The halt code of an address that does not lead to RevKeen (a redirect, an untrusted
/// certificate); any other halt code is RevKeen's refusal of the key.
pub(crate) const MISDIRECTED: &str = "misdirected";

/// What happens when a unit runs out of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exhausted {
    /// Daemon mode: dead-letter it as "retries exhausted" and carry on.
    DeadLetter,
    /// `--once`: keep it queued for the next run and end this one with "unavailable".
    StopRun,
}

/// How a worker run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WorkerExit {
    /// Inputs closed and nothing left to send.
    Drained,
    /// Shutdown requested.
    Stopped,
    /// Sending stopped: RevKeen refused the key, or the address does not lead to RevKeen.
    Halted(Halted),
    /// A unit ran out of attempts in `--once`.
    Unavailable(String),
}

/// Why sending stopped for the rest of the process: what the state file's halt says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Halted {
    /// RevKeen's error code for a refused key (`invalid_api_key`, …) or [`MISDIRECTED`].
    pub code: String,
    /// What happened and what to fix, for the log, `status` and `/readyz`.
    pub message: String,
}

impl Halted {
    fn refused_key(code: &str, why: &dyn std::fmt::Display) -> Halted {
        Halted {
            code: code.to_string(),
            message: format!(
                "RevKeen refused the API key ({why}); fix revkeen.api_key / api_key_file (a running daemon notices a changed key file, or reload it: SIGHUP)"
            ),
        }
    }

    fn misdirected(problem: &str) -> Halted {
        Halted {
            code: MISDIRECTED.to_string(),
            message: format!("{problem}; then restart"),
        }
    }

    pub(crate) fn is_auth(&self) -> bool {
        self.code != MISDIRECTED
    }

    /// A `--once` run ended by this halt exits 77 for a refused key, 69 otherwise.
    pub(crate) fn exit_status(&self) -> crate::exit::ExitStatus {
        if self.is_auth() {
            crate::exit::ExitStatus::AuthRefused
        } else {
            crate::exit::ExitStatus::Unavailable
        }
    }
}

/// Per-source counts of what was sent in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SendStats {
    pub requests: u64,
    pub created: u64,
    pub updated: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub retries: u64,
}

impl SendStats {
    /// Customers RevKeen accepted (written or already newer).
    pub fn delivered(&self) -> u64 {
        self.created + self.updated + self.stale
    }
}

/// State shared between the worker, its send tasks and whoever watches them.
#[derive(Default)]
pub(crate) struct WorkerState {
    stats: Mutex<BTreeMap<String, SendStats>>,
    halt: Mutex<Option<Halted>>,
    unavailable: Mutex<Option<String>>,
    /// Units being sent right now.
    in_flight: std::sync::atomic::AtomicUsize,
}

impl WorkerState {
    /// Counts so far, per source.
    pub(crate) fn stats(&self) -> BTreeMap<String, SendStats> {
        self.stats.lock().expect("stats lock poisoned").clone()
    }

    /// Why sending is halted, if it is.
    pub(crate) fn halt(&self) -> Option<Halted> {
        self.halt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why a `--once` run must end (a unit ran out of attempts), if it must.
    fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Units in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Halts sending for the rest of the process. The first halt is the one kept.
    fn halt_sending(&self, halt: Halted) {
        self.halt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(halt);
    }

    /// Lifts the halt so that a new worker run may start (after a key was re-read); that run
    /// first makes one authenticated read, which clears the recorded halt or halts again.
    pub(crate) fn resume(&self) -> Option<Halted> {
        self.halt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn add(&self, source: &str, f: impl FnOnce(&mut SendStats)) {
        let mut stats = self.stats.lock().expect("stats lock poisoned");
        f(stats.entry(source.to_string()).or_default());
    }
}

/// Sources whose jobs from an earlier process wait for this process's first poll of them.
pub(crate) struct Held {
    since: i64,
    sources: Mutex<Vec<String>>,
}

impl Held {
    /// Holds the earlier jobs of `sources`, from now.
    pub(crate) fn new(sources: Vec<String>) -> Arc<Held> {
        Arc::new(Held {
            since: now_ms(),
            sources: Mutex::new(sources),
        })
    }

    /// The source's first poll has run (whatever its outcome): its earlier jobs may go.
    pub(crate) fn release(&self, source: &str) {
        self.sources
            .lock()
            .expect("held lock poisoned")
            .retain(|s| s != source);
    }

    fn apply(&self, filter: &ClaimFilter) -> ClaimFilter {
        ClaimFilter {
            held: self.sources.lock().expect("held lock poisoned").clone(),
            held_since: self.since,
            ..filter.clone()
        }
    }
}

/// Where the worker sends: RevKeen in the daemon, a scripted fake in tests. One call is one
/// request; the answer is already classified for the failure policy.
pub(crate) trait Upstream: Send + Sync + 'static {
    /// Sends a unit (a single upsert or a recorded batch) as stored.
    fn send<'a>(&'a self, unit: &'a Unit) -> BoxFuture<'a, Answer>;

    /// One authenticated read (is a refused key fixed?).
    fn probe(&self) -> BoxFuture<'_, Probe>;
}

impl Upstream for RevKeenClient {
    fn send<'a>(&'a self, unit: &'a Unit) -> BoxFuture<'a, Answer> {
        Box::pin(async move {
            match unit {
                Unit::Single(job) => {
                    self.upsert(
                        &job.revkeen_source,
                        &job.external_id,
                        &job.body,
                        &job.idempotency_key,
                    )
                    .await
                }
                Unit::Batch(batch) => {
                    self.upsert_batch(&batch.body, &batch.idempotency_key, batch.members.len())
                        .await
                }
            }
        })
    }

    fn probe(&self) -> BoxFuture<'_, Probe> {
        Box::pin(RevKeenClient::probe(self))
    }
}

/// Everything a worker needs (cheap to clone: a worker that failed on the state file starts
/// over from a clone).
#[derive(Clone)]
pub(crate) struct Worker {
    pub store: Store,
    pub upstream: Arc<dyn Upstream>,
    pub limiter: Arc<Limiter>,
    pub filter: ClaimFilter,
    pub concurrency: usize,
    pub max_attempts: u32,
    /// The longest a 429 pauses sending (`revkeen.max_retry_after_secs`).
    pub max_pause: Duration,
    pub backoff: Backoff,
    pub exhausted: Exhausted,
    /// Notified when new work is queued.
    pub wake: Arc<Notify>,
    pub state: Arc<WorkerState>,
    /// Beaten on every loop iteration (daemon liveness).
    pub health: Option<Arc<Health>>,
    /// Earlier jobs held until their source's first poll.
    pub held: Option<Arc<Held>>,
}

/// The longest the worker loop goes without beating its heartbeat (unless its `Health` asks
/// for more often).
const BEAT: Duration = Duration::from_secs(1);

impl Worker {
    /// A worker for `sources` as the config describes RevKeen: its client, its rate limit,
    /// batch size, concurrency and attempts.
    pub(crate) fn for_config(
        config: &crate::config::Config,
        store: Store,
        sources: Vec<String>,
        exhausted: Exhausted,
        wake: Arc<Notify>,
        state: Arc<WorkerState>,
    ) -> reqwest::Result<Worker> {
        let revkeen = &config.revkeen;
        Ok(Worker {
            store,
            upstream: Arc::new(RevKeenClient::new(revkeen)?),
            limiter: Arc::new(Limiter::per_minute(
                REVKEEN,
                revkeen.requests_per_minute,
                revkeen.burst,
            )),
            filter: ClaimFilter {
                sources,
                batch_size: revkeen.batch_size,
                ..ClaimFilter::default()
            },
            concurrency: revkeen.concurrency,
            max_attempts: revkeen.max_attempts,
            max_pause: Duration::from_secs(revkeen.max_retry_after_secs),
            backoff: Backoff::default(),
            exhausted,
            wake,
            state,
            health: None,
            held: None,
        })
    }
}

struct Shared {
    store: Store,
    upstream: Arc<dyn Upstream>,
    limiter: Arc<Limiter>,
    max_attempts: u32,
    max_pause: Duration,
    backoff: Backoff,
    exhausted: Exhausted,
    state: Arc<WorkerState>,
    wake: Arc<Notify>,
    /// A RevKeen halt left by an earlier run, cleared by the first authenticated answer.
    stale_halt: Mutex<bool>,
}

/// A send task's failure that must stop the worker (the state file failed).
type SendResult = Result<(), StoreError>;

/// What the loop does next, once a request slot is free.
enum Next {
    /// Claim and send a unit now.
    Send,
    /// Nothing is due: look again after this long (a retry comes due), or, with `None`, only
    /// when woken (new work queued, an answer in, a stop).
    Wait(Option<Duration>),
    /// `--once`: nothing is left to send.
    Drained,
}

impl Worker {
    /// Runs until `inputs_done` is cancelled and the outbox is drained (`--once`), or until
    /// `shutdown` (daemon). In-flight sends are awaited for at most `drain` after a shutdown.
    pub(crate) async fn run(
        self,
        inputs_done: CancellationToken,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<WorkerExit, StoreError> {
        let stale_halt = match self.check_earlier_halt().await? {
            Ok(stale) => stale,
            Err(exit) => return Ok(exit),
        };
        let shared = Arc::new(Shared {
            store: self.store,
            upstream: self.upstream,
            limiter: self.limiter,
            max_attempts: self.max_attempts.max(1),
            max_pause: self.max_pause,
            backoff: self.backoff,
            exhausted: self.exhausted,
            state: self.state,
            wake: self.wake,
            stale_halt: Mutex::new(stale_halt),
        });
        let base_filter = self.filter;
        let held = self.held;
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut tasks: JoinSet<SendResult> = JoinSet::new();
        let driven = async {
        let beat_every = self.health.as_ref().map_or(BEAT, |h| h.beat());
        let beat = || {
            if let Some(health) = &self.health {
                health.beat_worker();
            }
        };
        let exit = loop {
            beat();
            while let Some(done) = tasks.try_join_next() {
                join_result(done)?;
            }
            if let Some(exit) = stop_reason(&shared, &shutdown) {
                break exit;
            }
            let filter = Arc::new(match &held {
                Some(held) => held.apply(&base_filter),
                None => base_filter.clone(),
            });
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    // The semaphore lives in this function and is never closed.
                    Err(_) => break WorkerExit::Stopped,
                },
                () = shutdown.cancelled() => continue,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    join_result(done)?;
                    continue;
                }
                // Every request slot busy with slow answers: still alive.
                () = tokio::time::sleep(beat_every) => continue,
            };
            match next(&shared, &filter, &inputs_done, tasks.is_empty(), beat_every).await? {
                Next::Drained => break WorkerExit::Drained,
                Next::Wait(sleep) => {
                    drop(permit);
                    // Parked: an idle worker sleeps until something wakes it (no timer while
                    // nothing is queued or due), and is not wedged while it does.
                    let parked = self.health.as_ref().map(|health| health.worker_parked());
                    tokio::select! {
                        () = sleep_for(sleep) => {}
                        () = shared.wake.notified() => {}
                        () = inputs_done.cancelled(), if !inputs_done.is_cancelled() => {}
                        () = shutdown.cancelled() => {}
                        Some(done) = tasks.join_next(), if !tasks.is_empty() => join_result(done)?,
                    }
                    drop(parked);
                    continue;
                }
                Next::Send => {}
            }
            // A 429 pause can last minutes; keep beating while it does.
            let acquired = tokio::select! {
                () = shared.limiter.acquire() => true,
                () = shutdown.cancelled() => continue,
                () = tokio::time::sleep(beat_every) => false,
            };
            if !acquired {
                continue;
            }
            // An answer that came in meanwhile may have halted sending.
            if let Some(exit) = stop_reason(&shared, &shutdown) {
                break exit;
            }
            let unit = shared
                .store
                .call(move |s| s.claim(&filter, now_ms()))
                .await?;
            let Some(unit) = unit else {
                continue;
            };
            shared
                .state
                .in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tasks.spawn(send(shared.clone(), unit, permit));
        };
        Ok::<WorkerExit, StoreError>(exit)
        }
        .await;
        match driven {
            Ok(exit) => {
                finish_in_flight(tasks, &exit, drain).await?;
                Ok(exit)
            }
            Err(error) => {
                // The state file failed: stop every send before saying so, so that nothing is
                // still writing when the caller starts over.
                tasks.shutdown().await;
                Err(error)
            }
        }
    }

    /// A halt left by an earlier run: one authenticated read tells at once whether the key
    /// was fixed (and clears it) or is still refused (no send is wasted on it). `Ok(stale)`
    /// says whether a halt is still recorded (the first authenticated answer clears it);
    /// `Err` is the exit of a worker that must not send.
    async fn check_earlier_halt(&self) -> Result<Result<bool, WorkerExit>, StoreError> {
        let Some(earlier) = self
            .store
            .call(|s| s.halts())
            .await?
            .into_iter()
            .find(|h| h.target == REVKEEN)
        else {
            return Ok(Ok(false));
        };
        let still = match self.upstream.probe().await {
            Probe::Ok => {
                tracing::info!("RevKeen answers again; the earlier halt is cleared.");
                self.store.call(|s| s.clear_halt(REVKEEN)).await?;
                return Ok(Ok(false));
            }
            Probe::KeyRefused(reason) => Halted::refused_key("invalid_api_key", &reason),
            Probe::Tls(problem) | Probe::Unexpected(problem) if earlier.code == MISDIRECTED => {
                Halted::misdirected(&problem)
            }
            // Unreachable or odd: the first send will tell.
            _ => return Ok(Ok(true)),
        };
        tracing::error!(code = %still.code, "Sending stays halted: {}", still.message);
        record_halt(&self.store, &self.state, still.clone()).await?;
        Ok(Err(WorkerExit::Halted(still)))
    }
}

/// Why the loop must stop claiming, if it must: a shutdown, a refused key, a `--once` unit out
/// of attempts.
fn stop_reason(shared: &Shared, shutdown: &CancellationToken) -> Option<WorkerExit> {
    if shutdown.is_cancelled() {
        return Some(WorkerExit::Stopped);
    }
    if let Some(halt) = shared.state.halt() {
        return Some(WorkerExit::Halted(halt));
    }
    shared.state.unavailable().map(WorkerExit::Unavailable)
}

/// Whether work is due now, when it will be, or (in `--once`, with nothing in flight and the
/// inputs done) whether the outbox holds nothing more for these sources.
async fn next(
    shared: &Shared,
    filter: &Arc<ClaimFilter>,
    inputs_done: &CancellationToken,
    idle: bool,
    beat_every: Duration,
) -> Result<Next, StoreError> {
    let due = {
        let filter = filter.clone();
        shared.store.call(move |s| s.next_due(&filter)).await?
    };
    let now = now_ms();
    match due {
        Some(at) if at <= now => Ok(Next::Send),
        None if inputs_done.is_cancelled() && idle => {
            let sources = filter.sources.clone();
            let left = shared.store.call(move |s| s.outstanding(&sources)).await?;
            Ok(if left == 0 {
                Next::Drained
            } else {
                // `--once`: work held back or in another lane's flight; look again soon.
                Next::Wait(Some(beat_every))
            })
        }
        // Until the next retry is due; with nothing queued, until woken. Work another process
        // (`replay`) queues wakes the worker through the daemon's watch of the state file.
        Some(at) => Ok(Next::Wait(Some(Duration::from_millis(
            u64::try_from(at - now).unwrap_or(0),
        )))),
        None => Ok(Next::Wait(None)),
    }
}

/// Sleeps for `wait`, or for ever with `None`.
async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Lets what is in flight finish: it is acknowledged, or safely re-sent next time. After a
/// shutdown for at most `drain`; otherwise (the run ended) until every answer is in.
async fn finish_in_flight(
    mut tasks: JoinSet<SendResult>,
    exit: &WorkerExit,
    drain: Duration,
) -> Result<(), StoreError> {
    let all = async {
        while let Some(done) = tasks.join_next().await {
            join_result(done)?;
        }
        Ok::<(), StoreError>(())
    };
    if !matches!(exit, WorkerExit::Stopped) {
        return all.await;
    }
    let drained = tokio::time::timeout(drain, all).await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                in_flight = tasks.len(),
                "Drain timeout reached; requests still in flight will be re-sent next time."
            );
            tasks.abort_all();
            Ok(())
        }
    }
}

fn join_result(done: Result<SendResult, tokio::task::JoinError>) -> Result<(), StoreError> {
    match done {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Ok(()),
    }
}

async fn send(shared: Arc<Shared>, unit: Unit, permit: OwnedSemaphorePermit) -> SendResult {
    let answer = shared.upstream.send(&unit).await;
    let result = apply(&shared, unit, answer).await;
    shared
        .state
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    drop(permit);
    shared.wake.notify_one();
    result
}

fn source_of(unit: &Unit) -> String {
    unit.jobs()
        .first()
        .map(|job| job.source.clone())
        .unwrap_or_default()
}

/// Records RevKeen's answer for a unit, per the failure policy.
async fn apply(shared: &Arc<Shared>, unit: Unit, answer: Answer) -> SendResult {
    let source = source_of(&unit);
    shared.state.add(&source, |s| s.requests += 1);
    if !matches!(
        answer,
        Answer::AuthRefused(_) | Answer::Transient(_) | Answer::Misdirected(_)
    ) {
        clear_stale_halt(shared).await?;
    }
    match answer {
        Answer::Applied { created, id } => {
            let counts = DeliveryCounts {
                created: u64::from(created),
                updated: u64::from(!created),
                ..DeliveryCounts::default()
            };
            let result = match id {
                Some(revkeen_id) => Finished::Applied { revkeen_id },
                None => Finished::Delivered,
            };
            finish_all(shared, unit, result, counts).await
        }
        Answer::Stale => {
            let counts = DeliveryCounts {
                stale: 1,
                ..DeliveryCounts::default()
            };
            finish_all(shared, unit, Finished::Delivered, counts).await
        }
        Answer::Batch(result) => finish_batch(shared, unit, result).await,
        Answer::Refused(error) => refused(shared, unit, &error).await,
        Answer::Conflict(error) => conflict(shared, unit, &error).await,
        Answer::AuthRefused(error) => {
            halt(shared, unit, Halted::refused_key(&error.code, &error)).await
        }
        Answer::Misdirected(problem) => halt(shared, unit, Halted::misdirected(&problem)).await,
        Answer::Unexpected(problem) => unexpected(shared, unit, problem).await,
        Answer::InProgress => {
            let at = now_ms() + IN_PROGRESS_RETRY.as_millis() as i64;
            shared
                .store
                .call(move |s| s.retry_later(&unit, at, "idempotency key still in progress", false))
                .await
        }
        Answer::RateLimited { retry_after } => rate_limited(shared, unit, retry_after).await,
        Answer::Transient(error) => retry_or_give_up(shared, unit, Failed::transient(error)).await,
    }
}

/// A final refusal (400/422): a batch refused as a whole is split into singles (one bad
/// record cannot hold back the others); a single is dead-lettered with RevKeen's reasons.
async fn refused(shared: &Arc<Shared>, unit: Unit, error: &ApiError) -> SendResult {
    if let Unit::Batch(batch) = &unit {
        tracing::warn!(
            source = %source_of(&unit),
            members = batch.members.len(),
            code = %error.code,
            "RevKeen refused a batch as a whole; resending its customers one by one."
        );
        let batch = batch.clone();
        return shared.store.call(move |s| s.split_batch(&batch)).await;
    }
    for job in unit.jobs() {
        tracing::error!(
            source = %job.source,
            external_id = %job.external_id,
            status = error.status,
            code = %error.code,
            "RevKeen refused a customer; it is kept as a dead letter (see `sync-daemon failures`)."
        );
    }
    let counts = DeliveryCounts {
        dead_lettered: unit.jobs().len() as u64,
        ..DeliveryCounts::default()
    };
    finish_all(
        shared,
        unit,
        Finished::DeadLetter(dead_letter_for(error)),
        counts,
    )
    .await
}

/// One key with two bodies: a bug in this daemon, kept as a dead letter and logged as such.
async fn conflict(shared: &Arc<Shared>, unit: Unit, error: &ApiError) -> SendResult {
    tracing::error!(
        source = %source_of(&unit),
        code = %error.code,
        "RevKeen saw one idempotency key with two bodies: this is a bug in sync-daemon, please report it. The customer is kept as a dead letter."
    );
    let dead = DeadLetter {
        code: error.code.clone(),
        reason: error.message.clone(),
        http_status: Some(error.status),
        field_errors: None,
        hint: Some(
            "a sync-daemon bug: please report it; `sync-daemon replay` resends with a new key"
                .to_string(),
        ),
    };
    let counts = DeliveryCounts {
        dead_lettered: unit.jobs().len() as u64,
        ..DeliveryCounts::default()
    };
    finish_all(shared, unit, Finished::DeadLetter(dead), counts).await
}

/// Sending stops for the rest of the process (a refused key, an address that does not lead
/// to RevKeen); the unit goes back untouched.
async fn halt(shared: &Arc<Shared>, unit: Unit, halt: Halted) -> SendResult {
    tracing::error!(code = %halt.code, "Sending stops: {}", halt.message);
    shared.store.call(move |s| s.release(&unit)).await?;
    record_halt(&shared.store, &shared.state, halt).await
}

/// Halts this process's sending and records the halt for `status` and `/readyz`.
async fn record_halt(store: &Store, state: &WorkerState, halt: Halted) -> SendResult {
    state.halt_sending(halt.clone());
    store
        .call(move |s| s.set_halt(REVKEEN, &halt.code, &halt.message))
        .await
}

/// A 429: every request to RevKeen waits out `Retry-After` (or backoff), capped at
/// `revkeen.max_retry_after_secs`; the unit is due again when the pause lifts.
async fn rate_limited(
    shared: &Arc<Shared>,
    unit: Unit,
    retry_after: Option<Duration>,
) -> SendResult {
    let asked = retry_after.unwrap_or_else(|| shared.backoff.delay(unit.attempts()));
    let wait = asked.min(shared.max_pause);
    if wait < asked {
        tracing::warn!(
            asked_secs = asked.as_secs(),
            waiting_secs = wait.as_secs(),
            "RevKeen asked to wait longer than revkeen.max_retry_after_secs; waiting that long instead."
        );
    }
    shared.limiter.pause(wait);
    let at = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
    let reason =
        crate::limiter::pause_reason("RevKeen", asked, wait, "revkeen.max_retry_after_secs");
    shared
        .store
        .call(move |s| {
            if wait >= crate::limiter::REPORTED_PAUSE {
                s.set_pause(REVKEEN, at, &reason)?;
            }
            s.retry_later(&unit, at, "rate limited (429)", false)
        })
        .await
}

/// A 2xx that is not the documented answer: a batch is split into singles (whose answers are
/// per customer); a single is retried like a 5xx and, out of attempts, dead-lettered with
/// what RevKeen said.
async fn unexpected(shared: &Arc<Shared>, unit: Unit, problem: String) -> SendResult {
    if let Unit::Batch(batch) = &unit {
        tracing::warn!(
            source = %source_of(&unit),
            members = batch.members.len(),
            %problem,
            "RevKeen's batch answer cannot be read; resending its customers one by one."
        );
        let batch = batch.clone();
        return shared.store.call(move |s| s.split_batch(&batch)).await;
    }
    let failed = Failed {
        code: "unexpected_answer",
        http_status: Some(200),
        message: problem,
        hint: "RevKeen's answer could not be read, so the customer was not counted as sent: \
               `sync-daemon replay` it once RevKeen answers as documented",
    };
    retry_or_give_up(shared, unit, failed).await
}

async fn clear_stale_halt(shared: &Arc<Shared>) -> SendResult {
    let was_halted = std::mem::replace(
        &mut *shared.stale_halt.lock().expect("halt lock poisoned"),
        false,
    );
    if was_halted {
        tracing::info!("RevKeen accepted the API key again; the earlier auth halt is cleared.");
        shared.store.call(|s| s.clear_halt(REVKEEN)).await?;
    }
    Ok(())
}

/// An attempt that got no final answer, and the dead letter it becomes when attempts run out.
struct Failed {
    code: &'static str,
    http_status: Option<u16>,
    message: String,
    hint: &'static str,
}

impl Failed {
    /// A 5xx, timeout or connection error.
    fn transient(message: String) -> Failed {
        Failed {
            code: "retries_exhausted",
            http_status: None,
            message,
            hint: "RevKeen was unavailable: run `sync-daemon replay --all` once it is back",
        }
    }
}

async fn retry_or_give_up(shared: &Arc<Shared>, unit: Unit, failed: Failed) -> SendResult {
    let error = failed.message;
    let source = source_of(&unit);
    let attempts = unit.attempts() + 1;
    shared.state.add(&source, |s| s.retries += 1);
    if attempts < shared.max_attempts {
        let delay = shared.backoff.delay(unit.attempts());
        tracing::warn!(source = %source, attempt = attempts, %error, retry_in_ms = delay.as_millis() as u64, "RevKeen request failed; retrying.");
        let at = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        return shared
            .store
            .call(move |s| s.retry_later(&unit, at, &error, true))
            .await;
    }
    match shared.exhausted {
        Exhausted::StopRun => {
            tracing::error!(source = %source, attempts, %error, "RevKeen stayed unavailable; ending the run. Queued customers are sent by the next run.");
            *shared
                .state
                .unavailable
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!(
                "RevKeen stayed unavailable after {attempts} attempts: {error}"
            ));
            let at = now_ms();
            shared
                .store
                .call(move |s| s.retry_later(&unit, at, &error, true))
                .await
        }
        Exhausted::DeadLetter => {
            tracing::error!(source = %source, attempts, %error, "RevKeen stayed unavailable; the customer is kept as a dead letter.");
            let dead = DeadLetter {
                code: failed.code.to_string(),
                reason: format!("no final answer after {attempts} attempts; last error: {error}"),
                http_status: failed.http_status,
                field_errors: None,
                hint: Some(failed.hint.to_string()),
            };
            let counts = DeliveryCounts {
                dead_lettered: unit.jobs().len() as u64,
                ..DeliveryCounts::default()
            };
            finish_all(shared, unit, Finished::DeadLetter(dead), counts).await
        }
    }
}

async fn finish_all(
    shared: &Arc<Shared>,
    unit: Unit,
    result: Finished,
    counts: DeliveryCounts,
) -> SendResult {
    let results: Vec<(i64, Finished)> = unit
        .jobs()
        .iter()
        .map(|job| (job.id, result.clone()))
        .collect();
    finish(shared, unit, results, counts).await
}

async fn finish_batch(shared: &Arc<Shared>, unit: Unit, result: BatchResult) -> SendResult {
    let mut results = Vec::with_capacity(unit.jobs().len());
    for job in unit.jobs() {
        let failure = result
            .failed
            .iter()
            .find(|(external_id, _)| *external_id == job.external_id);
        match failure {
            Some((_, error)) => {
                // The batch answer says only `error: <free text>`: the customer is sent again
                // alone, whose answer carries RevKeen's code, message and field errors for the
                // dead letter (or is accepted, if the refusal was about the batch).
                tracing::warn!(
                    source = %job.source,
                    external_id = %job.external_id,
                    %error,
                    "RevKeen refused a customer in a batch; resending it alone for RevKeen's full error."
                );
                results.push((job.id, Finished::RetrySingle));
            }
            None => results.push((job.id, Finished::Delivered)),
        }
    }
    let counts = DeliveryCounts {
        created: result.created,
        updated: result.updated,
        stale: result.skipped,
        dead_lettered: 0,
    };
    finish(shared, unit, results, counts).await
}

async fn finish(
    shared: &Arc<Shared>,
    unit: Unit,
    results: Vec<(i64, Finished)>,
    counts: DeliveryCounts,
) -> SendResult {
    let source = source_of(&unit);
    shared.state.add(&source, |s| {
        s.created += counts.created;
        s.updated += counts.updated;
        s.stale += counts.stale;
        s.dead_lettered += counts.dead_lettered;
    });
    for (outcome, n) in [
        ("created", counts.created),
        ("updated", counts.updated),
        ("stale", counts.stale),
        ("dead_lettered", counts.dead_lettered),
    ] {
        if n > 0 {
            metrics::counter!(crate::metrics::UPSERTS, "source" => source.clone(), "outcome" => outcome)
                .increment(n);
        }
    }
    if counts.created + counts.updated + counts.stale > 0 {
        metrics::gauge!(crate::metrics::LAST_SUCCESS, "source" => source.clone())
            .set(now_ms() as f64 / 1000.0);
    }
    shared
        .store
        .call(move |s| s.finish(&unit, &results, counts))
        .await
}

fn dead_letter_for(error: &ApiError) -> DeadLetter {
    DeadLetter {
        code: error.code.clone(),
        reason: error.message.clone(),
        http_status: Some(error.status),
        field_errors: error.fields.clone(),
        hint: Some(refusal_hint(&error.code)),
    }
}

/// What an operator can do about a refusal.
fn refusal_hint(code: &str) -> String {
    match code {
        "validation_error" => "fix the named fields in the source record (it is resent when it changes), or `sync-daemon replay` it once RevKeen accepts it".to_string(),
        _ => "see RevKeen's message; fix the source record (it is resent when it changes) or `sync-daemon replay` it".to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The worker against a scripted RevKeen on a paused clock: every wait below is exact.

    use tokio::time::Instant;

    use super::*;
    use crate::store::test_support::temp_store;
    use crate::store::{CursorSave, FailureKind, PageItem, PageItemOutcome};
    use crate::testing::Script;

    /// A RevKeen that answers from a script (the last answer repeats).
    type Scripted = Script<Answer>;

    fn scripted(answers: Vec<Answer>, latency: Duration) -> Arc<Scripted> {
        Arc::new(Script::new(answers, latency))
    }

    impl Upstream for Scripted {
        fn send<'a>(&'a self, _unit: &'a Unit) -> BoxFuture<'a, Answer> {
            Box::pin(async move {
                self.next()
                    .await
                    .unwrap_or(Answer::Transient("no script".into()))
            })
        }

        fn probe(&self) -> BoxFuture<'_, Probe> {
            Box::pin(async { Probe::Ok })
        }
    }

    /// A store with `n` queued customers of source `gym`.
    fn queued(n: usize) -> (Store, tempfile::TempDir) {
        let (store, dir) = temp_store();
        let items: Vec<PageItem> = (0..n)
            .map(|i| PageItem {
                external_id: format!("c{i}"),
                outcome: PageItemOutcome::Customer {
                    body: format!(r#"{{"email":"c{i}@example.com"}}"#).into_bytes(),
                    update_only: false,
                },
            })
            .collect();
        store
            .commit_page("gym", "wodify", &items, CursorSave::Keep, false, false)
            .expect("commit");
        (store, dir)
    }

    fn worker(store: &Store, upstream: Arc<Scripted>, exhausted: Exhausted) -> Worker {
        Worker {
            store: store.clone(),
            upstream,
            limiter: Arc::new(Limiter::per_second(REVKEEN, 1000, 1000)),
            filter: ClaimFilter {
                sources: vec!["gym".to_string()],
                batch_size: 1,
                ..ClaimFilter::default()
            },
            concurrency: 1,
            max_attempts: 3,
            max_pause: Duration::from_secs(900),
            backoff: Backoff::default(),
            exhausted,
            wake: Arc::new(Notify::new()),
            state: Arc::new(WorkerState::default()),
            health: None,
            held: None,
        }
    }

    /// The daemon's worker: it runs until the returned token is cancelled, then drains.
    struct Running {
        task: tokio::task::JoinHandle<Result<WorkerExit, StoreError>>,
        shutdown: CancellationToken,
        state: Arc<WorkerState>,
    }

    impl Running {
        fn start(worker: Worker, drain: Duration) -> Running {
            let shutdown = CancellationToken::new();
            let state = worker.state.clone();
            let task = tokio::spawn(worker.run(CancellationToken::new(), shutdown.clone(), drain));
            Running {
                task,
                shutdown,
                state,
            }
        }

        /// Signals the shutdown and waits for the worker to end.
        async fn stop(self) -> WorkerExit {
            self.shutdown.cancel();
            self.task.await.expect("joins").expect("the store works")
        }
    }

    /// `--once`: inputs are done from the start; the worker ends when the outbox is empty.
    async fn run_once(worker: Worker) -> WorkerExit {
        let done = CancellationToken::new();
        done.cancel();
        worker
            .run(done, CancellationToken::new(), Duration::ZERO)
            .await
            .expect("the store works")
    }

    fn applied() -> Answer {
        Answer::Applied {
            created: true,
            id: Some("c_1".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_request_for_its_retry_after() {
        let (store, _dir) = queued(3);
        let revkeen = scripted(
            vec![
                Answer::RateLimited {
                    retry_after: Some(Duration::from_secs(30)),
                },
                applied(),
            ],
            Duration::ZERO,
        );
        let exit = run_once(worker(&store, revkeen.clone(), Exhausted::StopRun)).await;
        assert_eq!(exit, WorkerExit::Drained);
        let arrivals = revkeen.arrivals();
        assert_eq!(
            arrivals.len(),
            4,
            "one refused, then three accepted: {arrivals:?}"
        );
        assert_eq!(arrivals[0], Duration::ZERO);
        // Nothing at all went out during the pause; then the host is open again.
        assert!(arrivals[1] >= Duration::from_secs(30), "{arrivals:?}");
        assert!(arrivals[1] < Duration::from_secs(32), "{arrivals:?}");
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_and_end_a_once_run_as_unavailable() {
        let (store, _dir) = queued(1);
        let revkeen = scripted(vec![Answer::Transient("HTTP 503".into())], Duration::ZERO);
        let exit = run_once(worker(&store, revkeen.clone(), Exhausted::StopRun)).await;
        assert!(
            matches!(&exit, WorkerExit::Unavailable(reason) if reason.contains("3 attempts")),
            "{exit:?}"
        );
        let arrivals = revkeen.arrivals();
        assert_eq!(arrivals.len(), 3, "max_attempts = 3: {arrivals:?}");
        // Full jitter under base 1 s: retry n waits at most 2^n s.
        for (n, pair) in arrivals.windows(2).enumerate() {
            assert!(pair[1] - pair[0] <= Duration::from_secs(1 << n) + Duration::from_secs(1));
        }
        // Nothing is lost: the customer stays queued for the next run.
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 1);
        assert!(store.failures(None).expect("failures").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn in_the_daemon_retries_run_out_into_a_dead_letter() {
        let (store, _dir) = queued(1);
        let revkeen = scripted(vec![Answer::Transient("HTTP 503".into())], Duration::ZERO);
        let running = Running::start(
            worker(&store, revkeen.clone(), Exhausted::DeadLetter),
            Duration::ZERO,
        );
        // Three attempts fit in well under ten minutes of backoff.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(running.stop().await, WorkerExit::Stopped);
        assert_eq!(revkeen.arrivals().len(), 3);
        let failures = store.failures(None).expect("failures");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].kind, FailureKind::DeadLetter);
        assert_eq!(failures[0].code, "retries_exhausted");
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 0);
    }

    /// Three customers queued; a shutdown one second into the first request, which takes
    /// `latency`, with a 10 s drain. Returns how long the stop took, the customers still
    /// queued, and the requests RevKeen saw.
    async fn stop_during_a_request(latency: Duration) -> (Duration, u64, usize) {
        let (store, _dir) = queued(3);
        let revkeen = scripted(vec![applied()], latency);
        let running = Running::start(
            worker(&store, revkeen.clone(), Exhausted::DeadLetter),
            Duration::from_secs(10),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(running.state.in_flight(), 1, "one request on its way");
        let signalled = Instant::now();
        assert_eq!(running.stop().await, WorkerExit::Stopped);
        let queued = store.outstanding(&["gym".to_string()]).expect("count");
        (signalled.elapsed(), queued, revkeen.arrivals().len())
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_waits_for_slow_requests_at_most_the_drain_timeout() {
        let (took, queued, requests) = stop_during_a_request(Duration::from_secs(60)).await;
        assert_eq!(took, Duration::from_secs(10), "the drain bounds the wait");
        assert_eq!(requests, 1, "nothing new is claimed after the signal");
        // The request cut off is re-sent next time: every customer is still queued.
        assert_eq!(queued, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_finish_within_the_drain_are_acknowledged() {
        let (took, queued, requests) = stop_during_a_request(Duration::from_secs(2)).await;
        assert_eq!(took, Duration::from_secs(1), "it ends with its last answer");
        assert_eq!((queued, requests), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_halts_sending_after_one_request() {
        let (store, _dir) = queued(5);
        let refusal = ApiError {
            status: 401,
            code: "invalid_api_key".into(),
            message: "no".into(),
            fields: None,
        };
        let revkeen = scripted(vec![Answer::AuthRefused(refusal)], Duration::ZERO);
        let exit = run_once(worker(&store, revkeen.clone(), Exhausted::StopRun)).await;
        assert!(matches!(exit, WorkerExit::Halted(_)), "{exit:?}");
        assert_eq!(revkeen.arrivals().len(), 1);
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 5);
        assert_eq!(store.halts().expect("halts").len(), 1);
    }

    /// Idle means asleep: with nothing queued the worker makes no round (so no read of the
    /// state file) for an hour; new work wakes it at once, and a retry wakes it when due.
    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_sleeps_until_work_is_queued_or_a_retry_is_due() {
        let (store, _dir) = queued(0);
        let revkeen = scripted(
            vec![Answer::Transient("HTTP 503".into()), applied()],
            Duration::ZERO,
        );
        let health = Arc::new(Health::with_beat(Duration::from_secs(1)));
        let mut worker = worker(&store, revkeen.clone(), Exhausted::DeadLetter);
        worker.health = Some(health.clone());
        let wake = worker.wake.clone();
        let running = Running::start(worker, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let settled = health.worker_beats();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            health.worker_beats(),
            settled,
            "an idle hour woke the worker"
        );
        health.beat_scheduler();
        assert!(health.alive(Duration::from_secs(5)), "parked is alive");

        let item = PageItem {
            external_id: "late".to_string(),
            outcome: PageItemOutcome::Customer {
                body: br#"{"email":"late@example.com"}"#.to_vec(),
                update_only: false,
            },
        };
        store
            .commit_page("gym", "wodify", &[item], CursorSave::Keep, false, false)
            .expect("commit");
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(revkeen.arrivals().len(), 1, "woken at once by the new work");
        // The 503's retry is due after the backoff: the worker wakes for it, unprompted.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(revkeen.arrivals().len(), 2, "the retry was sent when due");
        assert_eq!(store.outstanding(&["gym".to_string()]).expect("count"), 0);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_worker_stays_alive_while_every_slot_waits_on_a_slow_answer() {
        let (store, _dir) = queued(3);
        let revkeen = scripted(vec![applied()], Duration::from_secs(30));
        let health = Arc::new(Health::with_beat(Duration::from_millis(500)));
        health.beat_scheduler();
        let mut worker = worker(&store, revkeen.clone(), Exhausted::DeadLetter);
        worker.health = Some(health.clone());
        let running = Running::start(worker, Duration::ZERO);
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            health.beat_scheduler();
            assert!(
                health.alive(Duration::from_secs(2)),
                "a slow answer is not a hang"
            );
        }
        assert_eq!(
            revkeen.arrivals().len(),
            1,
            "concurrency 1: one slow request at a time"
        );
        running.stop().await;
    }
}
