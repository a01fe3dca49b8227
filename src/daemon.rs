//! Daemon mode (the default): scheduled polls, the continuous worker, push processing, the HTTP
//! server, systemd notifications, and graceful shutdown.
//!
//! Each source polls once at start and then on its cron schedule (tokio-cron-scheduler cron
//! jobs, UTC). A tick only signals a per-source task through a one-slot channel, so a poll
//! never overlaps itself and ticks that arrive during a poll collapse into one. A watchdog
//! polls a source anyway, with an error in the log, when its poll is overdue by more than one
//! interval: scheduled jobs can silently stop firing (tokio-cron-scheduler issue #113).
//!
//! Between polls the daemon sleeps: no loop wakes on a fixed short timer. The scheduler's jobs
//! are fired by [`drive_scheduler`], which sleeps until the next tick in the scheduler's own
//! job store instead of running the crate's ticker (`JobScheduler::start` wakes every 500 ms
//! forever); the watchdog wakes when a poll could next become overdue; the systemd loop wakes
//! only when systemd listens, as often as its watchdog needs; the key re-read timer runs only
//! while a key is refused.
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

/// The longest [`drive_scheduler`] sleeps before it reads the wall clock again: cron ticks are
/// wall-clock times and its sleep is monotonic, so a clock stepped forward or a host resumed
/// from suspend fires a due poll at most this late.
const SCHEDULER_MAX_SLEEP: Duration = Duration::from_secs(60);
/// How long the worker stays parked with no poll running before the daemon hands memory back.
const IDLE_RELEASE_AFTER: Duration = Duration::from_secs(10);
/// How often `STATUS=` is refreshed when systemd listens but wants no watchdog pings.
const STATUS_REFRESH: Duration = Duration::from_secs(10);
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
    /// Stops [`drive_scheduler`] when dropped (at shutdown, or with a daemon never run).
    ticking: tokio_util::sync::DropGuard,
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
        // Its jobs fire from now on, by `drive_scheduler` (never by the crate's own ticker).
        let ticking = CancellationToken::new();
        tokio::spawn(drive_scheduler(scheduler.clone(), ticking.clone()));
        let ticking = ticking.drop_guard();
        Ok(Daemon {
            config,
            store,
            reader,
            metrics,
            listener,
            addr,
            scheduler,
            ticking,
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
        // Said by a poll whose source refused its key, and by a worker halted on a refused key:
        // the key re-read timer runs from then on.
        let key_refused = Arc::new(Notify::new());
        let mut worker_task = Some(spawn_worker(
            worker.clone(),
            stop.clone(),
            &config,
            health.clone(),
            key_refused.clone(),
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
            key_refused.clone(),
            resume_tx,
            stop.clone(),
        ));
        tasks.spawn(idle_release_loop(
            health.clone(),
            store.clone(),
            poll_states.clone(),
            stop.clone(),
        ));
        tasks.spawn(outside_writes_loop(
            store.clone(),
            worker.wake.clone(),
            stop.clone(),
        ));
        for mut task in self.sources {
            task.ctx.run_id = Some(run_id);
            tasks.spawn(source_loop(
                task,
                poll_states.clone(),
                self.held.clone(),
                key_refused.clone(),
            ));
        }
        tasks.spawn(watchdog(
            config.sources.clone(),
            self.ticks,
            poll_states.clone(),
            health.clone(),
            self.stop_polls.clone(),
        ));
        // Without a notify socket every `sd_notify` is a no-op: no loop, no wake-ups.
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            tasks.spawn(systemd_loop(
                health.clone(),
                poll_states,
                self.worker_state,
                store.clone(),
                stop.clone(),
                sd_notify::watchdog_enabled(),
                Arc::new(notify),
            ));
        }

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
            spawn_worker(
                worker.clone(),
                stop.clone(),
                &config,
                health.clone(),
                key_refused.clone(),
            )
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
        drop(self.ticking);
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

/// Hands memory back once the daemon goes idle: [`IDLE_RELEASE_AFTER`] after the worker last
/// parked, with no poll running. A poll already released what it used when it finished; this
/// also covers what sending after it used (the outbox drains after the poll), and the pages of
/// the program's own code that the busy spell mapped ([`release_code_pages`]). Waits for the
/// worker to park, never on a timer while it stays parked.
async fn idle_release_loop(
    health: Arc<Health>,
    store: Store,
    polls: PollStates,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = health.worker_parks() => {}
            // The only way out: the supervisor counts any other end as a death.
            () = stop.cancelled() => return,
        }
        // Quiet for a while: no park (so no wake-up and no send) meanwhile.
        loop {
            tokio::select! {
                () = tokio::time::sleep(IDLE_RELEASE_AFTER) => break,
                () = health.worker_parks() => {}
                () = stop.cancelled() => return,
            }
        }
        let polling = polls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|state| state.running);
        if polling || !health.worker_idle() {
            continue;
        }
        let _ = store.call(|s| s.release_memory()).await;
        release_code_pages();
    }
}

/// Unmaps the pages of this program's own code and read-only data (clean, file-backed: the
/// binary's text is most of an idle daemon's resident memory), as the kernel does under
/// memory pressure; the page cache keeps them, and the next poll maps back what it runs.
fn release_code_pages() {
    for mapping in clean_code_mappings() {
        // SAFETY: the range is a whole private, read-only mapping of the executable with no
        // page copied on write; dropping its pages only means they are read from the file (the
        // page cache) again on next use, exactly as after reclaim.
        unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                mapping.end - mapping.start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// A mapping [`release_code_pages`] may hand back, and how much of it is resident.
struct CodeMapping {
    start: usize,
    end: usize,
    #[cfg_attr(not(test), allow(dead_code))]
    resident_kib: u64,
}

/// The mappings of the executable that are not writable and hold no private copy of a page
/// (smaps `Anonymous: 0 kB`, so never the relocated RELRO data): for those, `MADV_DONTNEED`
/// changes what is resident, never what is read. Empty when `/proc` cannot be read.
fn clean_code_mappings() -> Vec<CodeMapping> {
    let (Ok(exe), Ok(smaps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/smaps"),
    ) else {
        return Vec::new();
    };
    let exe = exe.to_string_lossy();
    let mut mappings = Vec::new();
    // The mapping whose fields are being read, while it may still qualify.
    let mut current: Option<CodeMapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        let mut kib = || fields.next().and_then(|n| n.parse::<u64>().ok());
        if let Some((start, end)) = first.split_once('-') {
            // A mapping's header: `start-end perms offset dev inode path`.
            let perms = fields.next().unwrap_or("");
            let read_only = perms.starts_with('r') && !perms.contains('w') && perms.ends_with('p');
            current = match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) if read_only && line.ends_with(exe.as_ref()) => {
                    Some(CodeMapping {
                        start,
                        end,
                        resident_kib: 0,
                    })
                }
                _ => None,
            };
        } else if first == "Rss:"
            && let Some(mapping) = current.as_mut()
        {
            mapping.resident_kib = kib().unwrap_or(0);
        } else if first == "Anonymous:"
            && let Some(mapping) = current.take()
            && kib() == Some(0)
        {
            mappings.push(mapping);
        }
    }
    mappings
}

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

/// Re-reads the keys on `SIGHUP`, and every [`crate::reload::RECHECK`] while an API refuses
/// its key (no timer otherwise: a poll or a worker halted on a refused key says so through
/// `key_refused`); a changed key is tried at once: the source polls now, a halted worker starts
/// again. Without a `rereader` a `SIGHUP` only says so (it never ends the process).
async fn reread_loop(
    rereader: Option<Rereader>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    worker_state: Arc<WorkerState>,
    poll_states: PollStates,
    key_refused: Arc<Notify>,
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
    let revkeen_halted = || worker_state.halt().is_some_and(|halt| halt.is_auth());
    // A source refusing its key is one whose last poll ended so (every source polls at start,
    // so a halt an earlier process recorded shows here too).
    let source_refused = || {
        poll_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|state| state.last_outcome.as_deref() == Some(AUTH_REFUSED))
    };
    loop {
        // The timer runs only while a key is refused; a refusal starting says so.
        let refused = revkeen_halted() || source_refused();
        let trigger = tokio::select! {
            // The only way out: the supervisor counts any other end as a death.
            () = stop.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => Trigger::Signal,
            () = key_refused.notified() => continue,
            () = tokio::time::sleep(crate::reload::RECHECK), if refused => Trigger::Recheck,
        };
        let revkeen_halted = revkeen_halted();
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

/// Fires the scheduler's cron jobs, sleeping until the next one is due.
///
/// tokio-cron-scheduler stays the scheduler of record: its job store holds each job and its
/// next tick, its job runner runs the job when activated, and the next tick comes from the
/// job's own schedule (the crate's croner parse). Only its ticker is replaced: `start()` would
/// wake every 500 ms forever to compare the clock with the ticks; this loop does the same
/// comparison (the crate's `must_run` rule: due, and not yet run for this tick) when the
/// earliest tick comes, or after [`SCHEDULER_MAX_SLEEP`], whichever is first.
async fn drive_scheduler(scheduler: JobScheduler, cancel: CancellationToken) {
    let context = scheduler.context();
    loop {
        let now = crate::clock::now();
        let wait = match fire_due(&context, now).await {
            Ok(Some(next)) => (next - now).to_std().unwrap_or_default(),
            Ok(None) => SCHEDULER_MAX_SLEEP,
            Err(error) => {
                // The in-memory job store does not fail; if it ever does, the watchdog polls.
                tracing::warn!(%error, "The scheduler's job store failed; trying again.");
                SCHEDULER_MAX_SLEEP
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait.min(SCHEDULER_MAX_SLEEP)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Activates every job due at `now` and stores its next tick; returns the earliest tick still
/// to come.
async fn fire_due(
    context: &tokio_cron_scheduler::Context,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, tokio_cron_scheduler::JobSchedulerError> {
    use tokio_cron_scheduler::job::job_data::JobAndNextTick;

    let mut jobs = context.metadata_storage.write().await;
    let mut earliest: Option<DateTime<Utc>> = None;
    for job in jobs.list_next_ticks().await? {
        let Some(id) = job.id.as_ref().map(uuid::Uuid::from) else {
            continue;
        };
        // 0: no tick to come (the crate's convention).
        if job.next_tick == 0 {
            continue;
        }
        let mut next = JobAndNextTick::utc(job.next_tick);
        let due = next <= now && job.last_tick.is_none_or(|last| last <= job.next_tick);
        if due {
            // The crate's job runner runs the job's code (here: a tick into a one-slot channel).
            let _ = context.job_activation_tx.send(id);
            let following = jobs
                .get(id)
                .await?
                .and_then(|data| data.schedule())
                .and_then(|schedule| schedule.iter_after(now).next());
            jobs.set_next_and_last_tick(id, following, Some(now))
                .await?;
            match following {
                Some(following) => next = following,
                None => continue,
            }
        }
        if next > now {
            earliest = Some(earliest.map_or(next, |e| e.min(next)));
        }
    }
    Ok(earliest)
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
    key_refused: Arc<Notify>,
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
                    key_refused.notify_one();
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
async fn source_loop(
    task: SourceTask,
    states: PollStates,
    held: Arc<Held>,
    key_refused: Arc<Notify>,
) {
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
        let refused = outcome == AUTH_REFUSED;
        {
            let mut states = states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let state = states.entry(name.clone()).or_default();
            state.running = false;
            state.last_outcome = Some(outcome);
        }
        if refused {
            key_refused.notify_one();
        }
    }
}

/// Polls a source anyway when its scheduled poll is overdue by more than one interval.
///
/// It looks when a source could next be overdue, and at each firing of a schedule (where a
/// schedule's interval may change), never on a short timer; each look is a scheduler beat
/// that says how long it sleeps ([`Health::scheduler_sleeps`]).
async fn watchdog(
    sources: Vec<SourceConfig>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    states: PollStates,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut warned: HashMap<String, DateTime<Utc>> = HashMap::new();
    loop {
        let now = crate::clock::now();
        let mut next_look: Option<DateTime<Utc>> = None;
        let mut look_at = |at: DateTime<Utc>| {
            next_look = Some(next_look.map_or(at, |next| next.min(at)));
        };
        for source in &sources {
            let Some(interval) = interval_of(&source.schedule, now) else {
                continue;
            };
            if let Some(firing) = crate::schedule::next_after(&source.schedule, now) {
                look_at(firing);
            }
            let state = states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&source.name)
                .cloned()
                .unwrap_or_default();
            let Some(last) = state.last_started else {
                continue;
            };
            // A running poll is looked at again at the next firing.
            if state.running {
                continue;
            }
            let warned_at = warned.get(&source.name).copied();
            if now - last <= interval * 2 || warned_at.is_some_and(|at| now - at <= interval) {
                // The first moment both conditions above are false.
                let overdue = last + interval * 2;
                let rewarn = warned_at.map_or(overdue, |at| at + interval);
                look_at(overdue.max(rewarn) + chrono::Duration::milliseconds(1));
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
            look_at(now + interval + chrono::Duration::milliseconds(1));
        }
        // A schedule that never fires again leaves nothing to look at: one look an hour.
        let sleep = next_look
            .and_then(|at| (at - now).to_std().ok())
            .unwrap_or(Duration::from_secs(3600));
        health.scheduler_sleeps(sleep);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = cancel.cancelled() => return,
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
/// every half `watchdog` interval while every loop beats, none while one is wedged, with
/// `STATUS=` refreshed at each ping (every [`STATUS_REFRESH`] without a watchdog).
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
        .unwrap_or(STATUS_REFRESH);
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
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = ctx.fetch.cancel.cancelled() => return,
                }
            }
        };
        if events.is_empty() {
            // Every stored event wakes this loop (the server, once the event is committed): no
            // timer while there is nothing to fetch.
            tokio::select! {
                () = wake.notified() => continue,
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

    fn gym_config(schedule: &str) -> Config {
        Config::from_toml(
            &format!(
                "[revkeen]\napi_key='k'\n[[sources]]\nname='gym'\nkind='wodify'\n\
                 base_url='https://api.wodify.com/v1'\napi_key='w'\nschedule='{schedule}'\n"
            ),
            &crate::config::Environment::default(),
            &sources::config_kinds(),
        )
        .expect("config")
    }

    #[tokio::test(start_paused = true)]
    async fn the_scheduler_fires_each_tick_on_time_without_its_own_ticker() {
        let config = gym_config("0 */15 * * * *");
        let scheduler = JobScheduler::new().await.expect("scheduler");
        // Room for every tick, so that the test sees each one (the daemon's slot holds one).
        let (tx, mut rx) = mpsc::channel::<()>(16);
        scheduler
            .add(cron_job(&config.sources[0], &config.sources[0].schedule, tx).expect("job"))
            .await
            .expect("added");
        let cancel = CancellationToken::new();
        let driver = tokio::spawn(drive_scheduler(scheduler, cancel.clone()));
        let mut fired = Vec::new();
        let until = Instant::now() + Duration::from_secs(3600);
        while let Ok(Some(())) = tokio::time::timeout_at(until, rx.recv()).await {
            fired.push(crate::clock::now());
        }
        cancel.cancel();
        driver.await.expect("joins");
        assert_eq!(fired.len(), 4, "four quarter hours in an hour: {fired:?}");
        for at in &fired {
            use chrono::Timelike;
            // On the quarter hour, within the wall clock's sub-second part at the start.
            assert!(
                at.minute() % 15 == 0 && at.second() == 0,
                "a tick off its schedule: {fired:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_reread_on_a_timer_only_while_one_is_refused() {
        let config = gym_config("0 */15 * * * *");
        let (store, _dir) = temp_store();
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let load: Loader = {
            let (config, loads) = (config.clone(), loads.clone());
            Arc::new(move || {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(config.clone())
            })
        };
        let states = PollStates::default();
        let key_refused = Arc::new(Notify::new());
        let (resume, _resumes) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(reread_loop(
            Some(Rereader::new(config.clone(), load, store)),
            HashMap::new(),
            Arc::new(WorkerState::default()),
            states.clone(),
            key_refused.clone(),
            resume,
            stop.clone(),
        ));
        let reads = || loads.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(reads(), 0, "no key is refused: no re-read in an hour");
        // The source's poll was refused and says so: a re-read every RECHECK from then on.
        states.lock().expect("lock").insert(
            "gym".to_string(),
            PollState {
                last_outcome: Some(AUTH_REFUSED.to_string()),
                ..PollState::default()
            },
        );
        key_refused.notify_one();
        tokio::time::sleep(crate::reload::RECHECK * 3 + Duration::from_millis(500)).await;
        assert_eq!(reads(), 3);
        // Accepted again: the timer stops.
        states
            .lock()
            .expect("lock")
            .get_mut("gym")
            .expect("gym")
            .last_outcome = Some("ok".to_string());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(reads(), 3, "re-read after the key was accepted");
        stop.cancel();
        task.await.expect("joins");
    }

    /// Resident KiB of the mappings [`release_code_pages`] hands back.
    fn resident_code_kib() -> u64 {
        clean_code_mappings().iter().map(|m| m.resident_kib).sum()
    }

    #[test]
    fn an_idle_daemon_hands_back_its_code_pages_and_runs_on() {
        let before = resident_code_kib();
        release_code_pages();
        let after = resident_code_kib();
        // Other tests in this binary run meanwhile and map back what they execute: the drop is
        // asserted, not its size.
        assert!(
            after < before,
            "resident code {before} KiB before, {after} KiB after"
        );
        // The code that was handed back runs again (read back from the page cache).
        let config = gym_config("0 */15 * * * *");
        assert_eq!(config.sources[0].name, "gym");
        assert!(resident_code_kib() > 0);
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
