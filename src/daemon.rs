//! Daemon mode (the default): scheduled polls, the continuous worker, push processing, the HTTP
//! server, systemd notifications, and graceful shutdown.
//!
//! Each source polls once at start and then on its cron schedule (tokio-cron-scheduler cron
//! jobs, UTC). A tick only signals a per-source task through a one-slot channel, so a poll
//! never overlaps itself and ticks that arrive during a poll collapse into one. A watchdog
//! polls a source anyway, with an error in the log, when its poll is overdue by more than one
//! interval: scheduled jobs can silently stop firing (tokio-cron-scheduler issue #113).
//!
//! Shutdown (SIGTERM/SIGINT, via the token passed in): polls stop at a page boundary, the
//! worker stops claiming, in-flight requests get `drain_timeout_secs`, then the process exits 0.
//! Any stop is a clean stop: the invariants make whatever was in flight safe to re-send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceConfig};
use crate::exit::ExitStatus;
use crate::health::Health;
use crate::limiter::Backoff;
use crate::reload::{Loader, Rereader, Trigger};
use crate::server::{self, AppState, PushFeed};
use crate::sources::{self, PollContext, PollError, Source};
use crate::store::{PageItem, Store, StoreError};
use crate::worker::{Exhausted, Held, Worker, WorkerExit, WorkerState};

/// A poll's outcome in [`PollState`] when the source refused its key.
const AUTH_REFUSED: &str = "auth refused";

/// How often the scheduler watchdog looks at the sources.
const WATCHDOG_TICK: Duration = Duration::from_secs(2);
/// How often the daemon looks for work another process queued (`replay`): the idle worker
/// never looks on a timer.
const OUTSIDE_WRITES_TICK: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {error}; set daemon.listen to a free address")]
    Listen { addr: String, error: std::io::Error },
    #[error("cannot start the scheduler: {0}")]
    Scheduler(String),
    #[error(transparent)]
    Build(#[from] sources::BuildError),
    #[error("cannot build an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot start the metrics recorder: {0}")]
    Metrics(String),
    #[error("a daemon loop ended unexpectedly: {0}")]
    LoopDied(String),
}

impl DaemonError {
    /// The exit code for this failure.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            DaemonError::Listen { .. } => ExitStatus::Config,
            DaemonError::Store(error) => error.exit_status(),
            _ => ExitStatus::Failure,
        }
    }
}

/// What the daemon knows about a source's polling, for the watchdog and STATUS=.
#[derive(Debug, Clone, Default)]
struct PollState {
    running: bool,
    last_started: Option<DateTime<Utc>>,
    last_outcome: Option<String>,
}

type PollStates = Arc<Mutex<HashMap<String, PollState>>>;

/// One source's part of the daemon: its adapter, its poll context and its cron ticks.
struct SourceTask {
    adapter: Arc<dyn Source>,
    ctx: PollContext,
    ticks: mpsc::Receiver<()>,
}

/// A daemon whose every fallible start-up step has succeeded (state file, listener, metrics,
/// adapters, scheduler); [`Daemon::run`] spawns its loops. Nothing runs until then except the
/// scheduler, whose ticks only fill one-slot channels.
pub struct Daemon {
    config: Config,
    store: Store,
    reader: Store,
    metrics: PrometheusHandle,
    listener: TcpListener,
    addr: SocketAddr,
    scheduler: JobScheduler,
    sources: Vec<SourceTask>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    push: HashMap<String, (PushFeed, PollContext)>,
    worker: Worker,
    held: Arc<Held>,
    health: Arc<Health>,
    worker_state: Arc<WorkerState>,
    stop_polls: CancellationToken,
    /// How `SIGHUP` reads the keys again (`None`: it only says there is nothing to re-read).
    reload: Option<Loader>,
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    reload: Option<Loader>,
) -> Result<ExitStatus, DaemonError> {
    let mut daemon = Daemon::build(config).await?;
    daemon.reload = reload;
    daemon.run(shutdown).await
}

impl Daemon {
    /// Opens the state file, binds the listener and prepares every loop; spawns nothing.
    pub async fn build(config: Config) -> Result<Daemon, DaemonError> {
        let path = config.daemon.state_path.clone();
        let store = Store::open_blocking(path.clone()).await?;
        let reader = Store::open_read_only_blocking(path.clone())
            .await?
            .ok_or_else(|| StoreError::Open {
                path,
                problem: "it vanished right after it was created".to_string(),
            })?;
        let metrics = crate::metrics::install().map_err(DaemonError::Metrics)?;
        let known: Vec<crate::metrics::KnownSource<'_>> = config
            .sources
            .iter()
            .map(|s| crate::metrics::KnownSource {
                name: &s.name,
                push_feed: s.push_secret.is_some(),
            })
            .collect();
        crate::metrics::register_known(&known);
        // The last complete poll of each source survives a restart: a source that stays down
        // after one keeps its real age.
        for (source, finished_at) in store.call(|s| s.last_successful_polls()).await? {
            crate::metrics::poll_succeeded_at(&source, finished_at);
        }
        let listener = TcpListener::bind(config.daemon.listen)
            .await
            .map_err(|error| DaemonError::Listen {
                addr: config.daemon.listen.to_string(),
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| DaemonError::Listen {
            addr: config.daemon.listen.to_string(),
            error,
        })?;
        // Loops beat at least four times per systemd watchdog interval.
        let beat = sd_notify::watchdog_enabled()
            .map(|w| (w / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)))
            .unwrap_or(Duration::from_secs(1));
        let health = Arc::new(Health::with_beat(beat));
        let wake_worker = Arc::new(Notify::new());
        let names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
        let stop_polls = CancellationToken::new();

        let scheduler = JobScheduler::new()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let mut sources = Vec::new();
        let mut ticks = HashMap::new();
        let mut push = HashMap::new();
        for source in &config.sources {
            let adapter = sources::build(source)?;
            let ctx = PollContext::new(
                source,
                store.clone(),
                Backoff::default(),
                wake_worker.clone(),
                stop_polls.clone(),
            );
            if let Some(secret) = &source.push_secret {
                let feed = PushFeed {
                    secret: secret.clone(),
                    adapter: adapter.clone(),
                    wake: Arc::new(Notify::new()),
                };
                push.insert(source.name.clone(), (feed, ctx.clone()));
            }
            // The month's count so far on /metrics from the first scrape.
            ctx.fetch.budget.publish().await;
            let (tx, rx) = mpsc::channel::<()>(1);
            // A poll at start, then on schedule.
            let _ = tx.try_send(());
            scheduler
                .add(cron_job(source, &source.schedule, tx.clone())?)
                .await
                .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
            // A full scan is a poll the adapter makes full when its schedule has fired
            // (the adapter keeps when the last one was): its tick polls on time.
            if let Some(full_scan) = &source.full_scan_schedule {
                scheduler
                    .add(cron_job(source, full_scan, tx.clone())?)
                    .await
                    .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
            }
            ticks.insert(source.name.clone(), tx);
            sources.push(SourceTask {
                adapter,
                ctx,
                ticks: rx,
            });
        }
        let worker_state = Arc::new(WorkerState::default());
        let mut worker = Worker::for_config(
            &config,
            store.clone(),
            names.clone(),
            Exhausted::DeadLetter,
            wake_worker.clone(),
            worker_state.clone(),
        )?;
        worker.health = Some(health.clone());
        // What an earlier process left queued waits until the start-up poll has seen the
        // record again (a patient deleted meanwhile must not be created by its old queued
        // create).
        let held = Held::new(names);
        worker.held = Some(held.clone());
        scheduler
            .start()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        Ok(Daemon {
            config,
            store,
            reader,
            metrics,
            listener,
            addr,
            scheduler,
            sources,
            ticks,
            push,
            worker,
            held,
            health,
            worker_state,
            stop_polls,
            reload: None,
        })
    }

    /// The address the HTTP server listens on (the real port when `listen` asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs every loop until `shutdown`, then stops them in order: polls at a page boundary,
    /// the worker after its drain, the server last.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ExitStatus, DaemonError> {
        let (config, store, health) =
            (self.config.clone(), self.store.clone(), self.health.clone());
        let run_id = store.call(|s| s.begin_run("daemon")).await?;
        // Cancelled by a signal, or by a loop that died.
        let stop = shutdown.child_token();
        let fatal: Arc<Mutex<Option<String>>> = Arc::default();
        health.beat_scheduler();
        health.beat_worker();
        let mut tasks = JoinSet::new();
        let mut feeds = HashMap::new();
        for (name, (feed, ctx)) in self.push {
            tasks.spawn(push_loop(feed.adapter.clone(), ctx, feed.wake.clone()));
            feeds.insert(name, feed);
        }
        let state = AppState {
            health: health.clone(),
            writer: store.clone(),
            reader: self.reader,
            metrics: self.metrics,
            push: Arc::new(feeds),
            sources: Arc::new(config.sources.iter().map(|s| s.name.clone()).collect()),
            fatal: fatal.clone(),
            refusals: Arc::default(),
        };
        let server_stop = CancellationToken::new();
        let server_task = tokio::spawn(server::serve(self.listener, state, server_stop.clone()));
        let worker = self.worker;
        let mut worker_task = Some(spawn_worker(
            worker.clone(),
            stop.clone(),
            &config,
            health.clone(),
        ));
        let poll_states: PollStates = Arc::default();
        // A re-read key lifts a RevKeen halt: the supervisor starts the worker again.
        let (resume_tx, mut resume_rx) = mpsc::channel::<()>(1);
        tasks.spawn(reread_loop(
            self.reload
                .map(|load| Rereader::new(config.clone(), load, store.clone())),
            self.ticks.clone(),
            self.worker_state.clone(),
            poll_states.clone(),
            resume_tx,
            stop.clone(),
        ));
        tasks.spawn(outside_writes_loop(
            store.clone(),
            worker.wake.clone(),
            stop.clone(),
        ));
        for mut task in self.sources {
            task.ctx.run_id = Some(run_id);
            tasks.spawn(source_loop(task, poll_states.clone(), self.held.clone()));
        }
        tasks.spawn(watchdog(
            config.sources.clone(),
            self.ticks,
            poll_states.clone(),
            health.clone(),
            self.stop_polls.clone(),
        ));
        tasks.spawn(systemd_loop(
            health.clone(),
            poll_states,
            self.worker_state,
            store.clone(),
            stop.clone(),
            sd_notify::watchdog_enabled(),
            Arc::new(notify),
        ));

        notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            listen = %self.addr,
            sources = config.sources.len(),
            state = %config.daemon.state_path.display(),
            "sync-daemon started."
        );
        // RevKeen's own hosted sync, the other writer: a warning if it is active (`hosted`).
        {
            let (config, store) = (config.clone(), store.clone());
            tokio::spawn(async move {
                if let Err(error) =
                    crate::hosted::check_and_record(&config, &config.sources, &store).await
                {
                    tracing::warn!(%error, "Could not record RevKeen's built-in syncs for status.");
                }
            });
        }

        let respawn = || {
            health.worker_started();
            spawn_worker(worker.clone(), stop.clone(), &config, health.clone())
        };
        let died = match supervise(
            &shutdown,
            &mut worker_task,
            &mut tasks,
            &mut resume_rx,
            respawn,
        )
        .await
        {
            Ended::Signal => None,
            Ended::LoopDied(reason) => {
                // Not alive, not ready, and gone soon: systemd or Kubernetes restarts it.
                tracing::error!(
                    "A daemon loop ended unexpectedly ({reason}); exiting with an error so that the service manager restarts sync-daemon."
                );
                *fatal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.clone());
                health.failed();
                Some(reason)
            }
        };
        stop.cancel();
        notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!(
            drain_timeout_secs = config.daemon.drain_timeout_secs,
            "Shutting down: finishing in-flight requests."
        );
        let mut scheduler = self.scheduler;
        let _ = scheduler.shutdown().await;
        self.stop_polls.cancel();
        if let Some(worker_task) = worker_task {
            match worker_task.await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "The worker stopped on a state file error.")
                }
                Err(error) => tracing::error!(%error, "The worker task failed."),
            }
        }
        // Polls and push loops stop at their next page boundary; don't wait on a slow source.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        server_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), server_task).await;
        let outcome = if died.is_some() { "failed" } else { "stopped" };
        let _ = store.call(move |s| s.finish_run(run_id, outcome)).await;
        match died {
            None => {
                tracing::info!("sync-daemon stopped.");
                Ok(ExitStatus::Ok)
            }
            Some(reason) => Err(DaemonError::LoopDied(reason)),
        }
    }
}

/// What ended the daemon's watch over its loops.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// SIGTERM or SIGINT: a clean stop.
    Signal,
    /// A loop that should run until shutdown ended (a panic, a state file error in the
    /// worker): the daemon must not live on half-working.
    LoopDied(String),
}

/// Waits for a signal, or for a loop to end before one. A worker halted on purpose (a refused
/// key) is not a death: polling goes on, `/readyz` says why, and a re-read key (`resume`)
/// starts it again through `respawn`.
async fn supervise(
    shutdown: &CancellationToken,
    worker: &mut Option<JoinHandle<Result<WorkerExit, StoreError>>>,
    tasks: &mut JoinSet<()>,
    resume: &mut mpsc::Receiver<()>,
    respawn: impl Fn() -> JoinHandle<Result<WorkerExit, StoreError>>,
) -> Ended {
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ended::Signal,
            Some(()) = resume.recv() => {
                if worker.is_none() {
                    tracing::info!("Sending resumes with the re-read RevKeen key: one authenticated read first.");
                    *worker = Some(respawn());
                }
            }
            exit = async {
                match worker.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                *worker = None;
                match exit {
                    Ok(Ok(WorkerExit::Halted(_))) => continue,
                    Ok(Ok(other)) => {
                        return Ended::LoopDied(format!("the worker ended ({other:?})"));
                    }
                    Ok(Err(error)) => {
                        return Ended::LoopDied(format!("the worker stopped: {error}"));
                    }
                    Err(join) => return Ended::LoopDied(format!("the worker {}", ended(join))),
                }
            }
            Some(done) = tasks.join_next() => {
                return Ended::LoopDied(match done {
                    Ok(()) => "a poll or push loop ended".to_string(),
                    Err(join) => format!("a poll or push loop {}", ended(join)),
                });
            }
        }
    }
}

/// How a task that should not have ended did: its panic's message, or a cancellation.
fn ended(join: tokio::task::JoinError) -> String {
    if !join.is_panic() {
        return "was cancelled".to_string();
    }
    let payload = join.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string());
    format!("panicked: {}", crate::secret::redact(&message))
}

/// Re-reads the keys on `SIGHUP`, and every [`reload::RECHECK`] while an API refuses its key;
/// a changed key is tried at once: the source polls now, a halted worker starts again.
/// Without a `rereader` a `SIGHUP` only says so (it never ends the process).
/// Wakes the worker when another process committed to the state file (`sync-daemon replay`
/// put dead letters back while the daemon runs): every [`OUTSIDE_WRITES_TICK`] one pragma on
/// the writer connection, whose `data_version` moves only for other connections' commits.
async fn outside_writes_loop(store: Store, wake: Arc<Notify>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(OUTSIDE_WRITES_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<i64> = None;
    loop {
        tokio::select! {
            // The only way out: the supervisor counts any other end as a death.
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.call(|s| s.data_version()).await {
            Ok(version) => {
                if seen.is_some_and(|seen| seen != version) {
                    wake.notify_one();
                }
                seen = Some(version);
            }
            Err(error) => tracing::debug!(%error, "Cannot read the state file's data version."),
        }
    }
}

async fn reread_loop(
    rereader: Option<Rereader>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    worker_state: Arc<WorkerState>,
    poll_states: PollStates,
    resume: mpsc::Sender<()>,
    stop: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::error!(%error, "Cannot handle SIGHUP; restart sync-daemon to apply a new key.");
            None
        }
    };
    let mut recheck = tokio::time::interval(crate::reload::RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            // The only way out: the supervisor counts any other end as a death.
            () = stop.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => Trigger::Signal,
            _ = recheck.tick() => Trigger::Recheck,
        };
        let revkeen_halted = worker_state.halt().is_some_and(|halt| halt.is_auth());
        // A source refusing its key is one whose last poll ended so (every source polls at
        // start, so a halt an earlier process recorded shows here too).
        let source_refused = || {
            poll_states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .any(|state| state.last_outcome.as_deref() == Some(AUTH_REFUSED))
        };
        if trigger == Trigger::Recheck && !revkeen_halted && !source_refused() {
            continue;
        }
        let Some(rereader) = &rereader else {
            tracing::warn!("SIGHUP: this daemon has no config file to re-read the keys from.");
            continue;
        };
        let changed = match rereader.reread(trigger).await {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(%error, "Keys re-read, but recording it in the state file failed.");
                continue;
            }
        };
        // SIGHUP retries a refused RevKeen key even if unchanged (it may have been re-enabled).
        if revkeen_halted && (changed.revkeen || trigger == Trigger::Signal) {
            worker_state.resume();
            let _ = resume.try_send(());
        }
        for name in &changed.sources {
            if let Some(tick) = ticks.get(name) {
                // Full: a poll is already due, which will use the new key.
                let _ = tick.try_send(());
            }
        }
    }
}

/// A cron job (`schedule`: the source's poll or full-scan schedule) that ticks a source's
/// poll. A tick only signals the source's loop through a one-slot channel, so a poll never
/// overlaps itself and ticks during a poll collapse into one.
fn cron_job(
    source: &SourceConfig,
    schedule: &str,
    tx: mpsc::Sender<()>,
) -> Result<Job, DaemonError> {
    Job::new_cron_job_async(schedule, move |_, _| {
        let tx = tx.clone();
        Box::pin(async move {
            // Full means a poll is already pending: the ticks collapse into one.
            let _ = tx.try_send(());
        })
    })
    .map_err(|e| DaemonError::Scheduler(format!("{}: {e}", source.name)))
}

/// The worker, sending until shutdown. A refused key stops it on purpose (polling goes on). A
/// state file that cannot be written (a full disk) never ends sending for good: the worker
/// waits — with backoff, or until a write succeeds again — and starts over, re-sending what
/// was in flight with the same keys; meanwhile `/readyz` answers 503 naming the state file.
fn spawn_worker(
    worker: Worker,
    shutdown: CancellationToken,
    config: &Config,
    health: Arc<Health>,
) -> tokio::task::JoinHandle<Result<WorkerExit, StoreError>> {
    let drain = Duration::from_secs(config.daemon.drain_timeout_secs);
    tokio::spawn(async move {
        let store = worker.store.clone();
        let mut failures = 0u32;
        loop {
            let exit = worker
                .clone()
                .run(CancellationToken::new(), shutdown.clone(), drain)
                .await;
            let error = match exit {
                Ok(WorkerExit::Halted(halt)) => {
                    health.worker_stopped();
                    return Ok(WorkerExit::Halted(halt));
                }
                Err(error) if !shutdown.is_cancelled() => error,
                other => return other,
            };
            failures += 1;
            let wait = STORE_RETRY.delay(failures);
            tracing::warn!(%error, retry_in_secs = wait.as_secs(), "Sending paused: the state file failed; retrying.");
            // Alive while it waits: the wait is the plan, not a hang.
            let until = tokio::time::Instant::now() + wait;
            loop {
                health.beat_worker();
                tokio::select! {
                    () = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_secs(1))) => {
                        if tokio::time::Instant::now() >= until { break; }
                    }
                    () = store.writable_again() => break,
                    () = shutdown.cancelled() => return Ok(WorkerExit::Stopped),
                }
            }
            // Nothing is in flight any more: what was is claimable again.
            if let Err(error) = store.call(|s| s.reset_inflight()).await {
                tracing::warn!(%error, "Cannot clear in-flight marks yet; retrying.");
            }
        }
    })
}

/// How long the worker waits after a state file failure: 1 s doubling to 30 s (a write that
/// succeeds meanwhile — a poll's, a push's — ends the wait at once).
const STORE_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
};

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed.");
    }
}

/// Polls a source on every tick, one poll at a time.
async fn source_loop(task: SourceTask, states: PollStates, held: Arc<Held>) {
    let SourceTask {
        adapter,
        ctx,
        mut ticks,
    } = task;
    let name = ctx.source.name.clone();
    loop {
        tokio::select! {
            tick = ticks.recv() => if tick.is_none() { return },
            () = ctx.fetch.cancel.cancelled() => return,
        }
        if ctx.fetch.budget.gate(&ctx.source.schedule).await == sources::budget::Gate::Skip {
            // The month's requests are spent or scans are spaced out (said once, in the log and
            // `status`). The tick still came, which is all the watchdog asks; what an earlier
            // process left queued is not held for days behind a poll that waits.
            held.release(&name);
            states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(name.clone())
                .or_default()
                .last_started = Some(crate::clock::now());
            continue;
        }
        {
            let mut states = states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let state = states.entry(name.clone()).or_default();
            state.running = true;
            state.last_started = Some(crate::clock::now());
        }
        let result = sources::poll(&adapter, &ctx).await;
        held.release(&name);
        ctx.wake_worker.notify_one();
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(PollError::Cancelled) => return,
            Err(PollError::AuthRefused(_)) => AUTH_REFUSED.to_string(),
            Err(error) => format!("failed: {error}"),
        };
        let _ = sources::record_key_outcome(&ctx.store, &name, &result).await;
        // Between polls the daemon mostly sleeps: hand the compiled phone patterns and the
        // page cache back.
        crate::customer::release_phone_patterns();
        let _ = ctx.store.call(|s| s.release_memory()).await;
        let mut states = states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = states.entry(name.clone()).or_default();
        state.running = false;
        state.last_outcome = Some(outcome);
    }
}

/// Polls a source anyway when its scheduled poll is overdue by more than one interval.
async fn watchdog(
    sources: Vec<SourceConfig>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    states: PollStates,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut warned: HashMap<String, DateTime<Utc>> = HashMap::new();
    loop {
        health.beat_scheduler();
        tokio::select! {
            () = tokio::time::sleep(WATCHDOG_TICK.min(health.beat())) => {}
            () = cancel.cancelled() => return,
        }
        let now = crate::clock::now();
        for source in &sources {
            let Some(interval) = interval_of(&source.schedule, now) else {
                continue;
            };
            let state = states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&source.name)
                .cloned()
                .unwrap_or_default();
            let Some(last) = state.last_started else {
                continue;
            };
            if state.running || now - last <= interval * 2 {
                continue;
            }
            if warned
                .get(&source.name)
                .is_some_and(|at| now - *at <= interval)
            {
                continue;
            }
            warned.insert(source.name.clone(), now);
            tracing::error!(
                source = %source.name,
                last_poll = %last.to_rfc3339(),
                "Scheduled poll is overdue by more than one interval (the scheduler stopped firing); polling anyway."
            );
            metrics::counter!(crate::metrics::SCHEDULER_OVERDUE, "source" => source.name.clone())
                .increment(1);
            if let Some(tx) = ticks.get(&source.name) {
                let _ = tx.try_send(());
            }
        }
    }
}

/// The time between two firings of a schedule around `now`.
fn interval_of(schedule: &str, now: DateTime<Utc>) -> Option<chrono::Duration> {
    let first = crate::schedule::next_after(schedule, now)?;
    let second = crate::schedule::next_after(schedule, first)?;
    Some(second - first)
}

/// How the daemon talks to systemd (`sd_notify` in the daemon, a recorder in tests).
type Notifier = Arc<dyn Fn(&[sd_notify::NotifyState<'_>]) + Send + Sync>;

/// Feeds the systemd watchdog from real loop progress and keeps `STATUS=` current: a ping
/// every half `watchdog` interval while every loop beats, none while one is wedged.
async fn systemd_loop(
    health: Arc<Health>,
    states: PollStates,
    worker: Arc<WorkerState>,
    store: Store,
    cancel: CancellationToken,
    watchdog: Option<Duration>,
    notify: Notifier,
) {
    let period = watchdog
        .map(|w| (w / 2).max(Duration::from_millis(100)))
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(10));
    loop {
        if let Some(window) = watchdog {
            // Unfed when a loop is wedged, so systemd restarts a real hang.
            if health.alive(window) {
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "A daemon loop made no progress; withholding the systemd watchdog ping."
                );
            }
        }
        let queued = store
            .call(|s| s.queue_summary())
            .await
            .map(|q| q.iter().map(|s| s.depth).sum::<u64>())
            .unwrap_or(0);
        let status = status_line(&states, &worker, queued);
        notify(&[sd_notify::NotifyState::Status(&status)]);
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// `STATUS=` for `systemctl status`, e.g. `clinic ok, gym polling; queued 12; sent 2891`.
fn status_line(states: &PollStates, worker: &WorkerState, queued: u64) -> String {
    let polls = {
        let states = states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut parts: Vec<String> = states
            .iter()
            .map(|(name, s)| {
                let what = if s.running {
                    "polling".to_string()
                } else {
                    s.last_outcome
                        .clone()
                        .unwrap_or_else(|| "waiting".to_string())
                };
                format!("{name} {what}")
            })
            .collect();
        parts.sort();
        parts.join(", ")
    };
    let sent: u64 = worker.stats().values().map(|s| s.delivered()).sum();
    let halt = worker
        .halt()
        .map(|halt| format!("; SENDING HALTED: {}", halt.message))
        .unwrap_or_default();
    format!("{polls}; queued {queued}; sent {sent}{halt}")
}

/// Processes push events: fetches each record from the source and enqueues it, consuming the
/// events in the same transaction (a crash after the 202 loses nothing).
async fn push_loop(adapter: Arc<dyn Source>, ctx: PollContext, wake: Arc<Notify>) {
    let name = ctx.source.name.clone();
    loop {
        let pending = {
            let name = name.clone();
            ctx.store.call(move |s| s.pending_push(&name, 100)).await
        };
        let events = match pending {
            Ok(events) => events,
            Err(error) => {
                tracing::error!(source = %name, %error, "Cannot read push events.");
                Vec::new()
            }
        };
        if events.is_empty() {
            tokio::select! {
                () = wake.notified() => continue,
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                () = ctx.fetch.cancel.cancelled() => return,
            }
        }
        let mut items: Vec<PageItem> = Vec::new();
        let mut done: Vec<(i64, i64)> = Vec::new();
        for (event_id, external_id, seq) in events {
            if ctx.fetch.cancel.is_cancelled() {
                return;
            }
            match sources::fetch_one(adapter.as_ref(), &ctx.fetch, &external_id).await {
                Ok(Some(mapped)) => {
                    items.push(mapped.item);
                    done.push((event_id, seq));
                }
                Ok(None) => {
                    tracing::info!(source = %name, external_id = %external_id, "Pushed record does not exist at the source; nothing to send.");
                    done.push((event_id, seq));
                }
                Err(PollError::Cancelled) => return,
                Err(PollError::QuotaSpent(_)) => {
                    // Kept until the month turns or the quota answers again (the source's polls
                    // say so); no warning per round.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(60)) => {}
                        () = ctx.fetch.cancel.cancelled() => return,
                    }
                    break;
                }
                Err(error) => {
                    // Kept for the next round; the scheduled poll covers it meanwhile.
                    tracing::warn!(source = %name, %error, "Cannot fetch a pushed record; will retry.");
                    break;
                }
            }
        }
        if done.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(Backoff::default().delay(3)) => continue,
                () = ctx.fetch.cancel.cancelled() => return,
            }
        }
        let (store, source, revkeen_source) = (
            ctx.store.clone(),
            name.clone(),
            ctx.source.revkeen_source.clone(),
        );
        match store
            .call(move |s| s.commit_push(&source, &revkeen_source, &items, &done))
            .await
        {
            Ok(outcome) => {
                if outcome.enqueued > 0 {
                    ctx.wake_worker.notify_one();
                }
            }
            Err(error) => {
                tracing::error!(source = %name, %error, "Cannot store pushed records.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The daemon's own timing on a paused clock: systemd watchdog pings and the scheduler
    //! watchdog.

    use tokio::time::Instant;

    use super::*;
    use crate::store::test_support::temp_store;

    /// A notifier that records `WATCHDOG=1` pings with when they were sent.
    fn recorder() -> (Notifier, Arc<Mutex<Vec<Duration>>>) {
        let pings: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let started = Instant::now();
        let sink = pings.clone();
        let notify: Notifier = Arc::new(move |states: &[sd_notify::NotifyState<'_>]| {
            if states
                .iter()
                .any(|s| matches!(s, sd_notify::NotifyState::Watchdog))
            {
                sink.lock().expect("lock").push(started.elapsed());
            }
        });
        (notify, pings)
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_every_half_interval_while_loops_beat_and_stop_when_one_wedges() {
        let (store, _dir) = temp_store();
        let health = Arc::new(Health::with_beat(Duration::from_millis(500)));
        health.beat_worker();
        health.beat_scheduler();
        let beating = CancellationToken::new();
        {
            // The daemon's loops, beating as they do while healthy.
            let (health, beating) = (health.clone(), beating.clone());
            tokio::spawn(async move {
                while !beating.is_cancelled() {
                    health.beat_worker();
                    health.beat_scheduler();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
        let (notify, pings) = recorder();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(systemd_loop(
            health.clone(),
            PollStates::default(),
            Arc::new(WorkerState::default()),
            store,
            cancel.clone(),
            Some(Duration::from_secs(2)),
            notify,
        ));
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let healthy: Vec<Duration> = pings.lock().expect("lock").clone();
        assert_eq!(
            healthy.len(),
            11,
            "a ping at start, then every second: {healthy:?}"
        );
        assert!(
            healthy
                .windows(2)
                .all(|w| w[1] - w[0] == Duration::from_secs(1)),
            "{healthy:?}"
        );
        // A wedged loop: its beats stop, and the pings stop once the window (2 s) passes.
        beating.cancel();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let after: Vec<Duration> = pings.lock().expect("lock")[healthy.len()..].to_vec();
        assert!(
            after.len() <= 2,
            "pings went on for a wedged loop: {after:?}"
        );
        cancel.cancel();
        task.await.expect("joins");
    }

    #[tokio::test(start_paused = true)]
    async fn no_watchdog_pings_unless_systemd_asks_for_them() {
        let (store, _dir) = temp_store();
        let health = Arc::new(Health::default());
        let (notify, pings) = recorder();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(systemd_loop(
            health,
            PollStates::default(),
            Arc::new(WorkerState::default()),
            store,
            cancel.clone(),
            None,
            notify,
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        cancel.cancel();
        task.await.expect("joins");
        assert!(pings.lock().expect("lock").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_poll_is_started_by_the_watchdog_and_a_running_one_is_left_alone() {
        let config = Config::from_toml(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='gym'\nkind='wodify'\n\
             base_url='https://api.wodify.com/v1'\napi_key='w'\nschedule='*/10 * * * * *'\n",
            &crate::config::Environment::default(),
            &sources::config_kinds(),
        )
        .expect("config");
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let states = PollStates::default();
        states.lock().expect("lock").insert(
            "gym".to_string(),
            PollState {
                running: true,
                last_started: Some(crate::clock::now()),
                last_outcome: None,
            },
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watchdog(
            config.sources.clone(),
            HashMap::from([("gym".to_string(), tx)]),
            states.clone(),
            Arc::new(Health::default()),
            cancel.clone(),
        ));
        // A poll that runs long is not overdue.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(rx.try_recv().is_err(), "a running poll was started again");
        // Finished, then the scheduler never fires again: more than two 10 s intervals on,
        // the watchdog polls anyway.
        let finished = Instant::now();
        {
            let mut states = states.lock().expect("lock");
            let state = states.get_mut("gym").expect("state");
            state.running = false;
            state.last_started = Some(crate::clock::now());
        }
        rx.recv().await.expect("a tick from the watchdog");
        let waited = finished.elapsed();
        assert!(
            waited > Duration::from_secs(20) && waited <= Duration::from_secs(23),
            "{waited:?}"
        );
        cancel.cancel();
        task.await.expect("joins");
    }

    fn no_respawn() -> JoinHandle<Result<WorkerExit, StoreError>> {
        unreachable!("no resume was sent")
    }

    fn halted_worker() -> JoinHandle<Result<WorkerExit, StoreError>> {
        tokio::spawn(async {
            Ok(WorkerExit::Halted(crate::worker::Halted {
                code: "invalid_api_key".into(),
                message: "refused".into(),
            }))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_starts_a_halted_worker_again_and_leaves_a_running_one_alone() {
        let shutdown = CancellationToken::new();
        let (resume, mut resumes) = mpsc::channel(1);
        let respawned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = respawned.clone();
        // The respawned worker ends on a state file error after 5 s: the watch ends with it.
        let respawn = move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Err(StoreError::Open {
                    path: "/state.db".into(),
                    problem: "the respawned worker".into(),
                })
            })
        };
        let mut worker = Some(halted_worker());
        let mut idle = JoinSet::new();
        idle.spawn(std::future::pending::<()>());
        let sender = tokio::spawn(async move {
            // The worker halts at once; the key is re-read a minute later, twice.
            tokio::time::sleep(Duration::from_secs(60)).await;
            resume.send(()).await.expect("send");
            resume.send(()).await.expect("send");
            resume
        });
        let started = Instant::now();
        let ended = supervise(&shutdown, &mut worker, &mut idle, &mut resumes, respawn).await;
        assert!(
            matches!(&ended, Ended::LoopDied(reason) if reason.contains("the respawned worker")),
            "{ended:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(65));
        // The second resume came while the respawned worker ran: no second worker.
        assert_eq!(respawned.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(sender.await.expect("sender"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_dies_ends_the_watch_and_a_halted_worker_does_not() {
        let shutdown = CancellationToken::new();
        // A worker halted on purpose: the watch goes on.
        let mut worker = Some(halted_worker());
        let mut tasks = JoinSet::new();
        tasks.spawn(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            panic!("boom in a poll loop");
        });
        let started = Instant::now();
        let (_resume, mut resumes) = mpsc::channel(1);
        let ended = supervise(&shutdown, &mut worker, &mut tasks, &mut resumes, no_respawn).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(
            matches!(&ended, Ended::LoopDied(reason) if reason.contains("panicked: boom in a poll loop")),
            "{ended:?}"
        );
        // A worker that stops on a state file error is a death too.
        let mut worker = Some(tokio::spawn(async {
            Err(StoreError::Open {
                path: "/state.db".into(),
                problem: "disk I/O error".into(),
            })
        }));
        let mut none = JoinSet::new();
        let ended = supervise(&shutdown, &mut worker, &mut none, &mut resumes, no_respawn).await;
        assert!(
            matches!(&ended, Ended::LoopDied(reason) if reason.contains("disk I/O error")),
            "{ended:?}"
        );
        // A signal is a clean end.
        shutdown.cancel();
        let mut idle = JoinSet::new();
        idle.spawn(std::future::pending::<()>());
        assert_eq!(
            supervise(&shutdown, &mut None, &mut idle, &mut resumes, no_respawn).await,
            Ended::Signal
        );
    }
}
