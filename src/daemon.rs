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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceConfig};
use crate::health::Health;
use crate::limiter::Backoff;

use crate::exit::ExitStatus;
use crate::run::Tuning;
use crate::server::{self, AppState, PushFeed};
use crate::sources::{self, PollContext, PollError, Source};
use crate::store::{PageItem, Store, StoreError};
use crate::worker::{Exhausted, Held, Worker, WorkerExit, WorkerState};

/// How often the scheduler watchdog looks at the sources.
const WATCHDOG_TICK: Duration = Duration::from_secs(2);

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
    Build(#[from] crate::sources::BuildError),
    #[error("cannot build an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot start the metrics recorder: {0}")]
    Metrics(String),
}

impl DaemonError {
    /// The exit code for this failure.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            DaemonError::Listen { .. } => ExitStatus::Config,
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

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<ExitStatus, DaemonError> {
    run_tuned(config, shutdown, Tuning::default()).await
}

/// Runs the daemon with explicit tuning (tests shorten backoff).
pub async fn run_tuned(
    config: Config,
    shutdown: CancellationToken,
    tuning: Tuning,
) -> Result<ExitStatus, DaemonError> {
    let path = config.daemon.state_path.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&path))
        .await
        .expect("opening the store does not panic")?;
    let reader = {
        let path = config.daemon.state_path.clone();
        tokio::task::spawn_blocking(move || Store::open_read_only(&path))
            .await
            .expect("opening the store does not panic")?
            .expect("the writer created the file")
    };
    let metrics = server::metrics_handle().map_err(DaemonError::Metrics)?;
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .map_err(|error| DaemonError::Listen {
            addr: config.daemon.listen.to_string(),
            error,
        })?;
    let run_id = store.call(|s| s.begin_run("daemon")).await?;
    // Loops beat at least four times per systemd watchdog interval.
    let beat = sd_notify::watchdog_enabled()
        .map(|w| (w / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(1));
    let health = Arc::new(Health::with_beat(beat));
    health.beat_scheduler();
    health.beat_worker();
    let wake_worker = Arc::new(Notify::new());
    let names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
    let stop_polls = shutdown.child_token();
    let mut tasks = JoinSet::new();

    // Sources: adapters, limiters, push feeds.
    let mut contexts = Vec::new();
    let mut push = HashMap::new();
    for source in &config.sources {
        let adapter = sources::build(source)?;
        let ctx = PollContext {
            run_id: Some(run_id),
            ..PollContext::new(
                source,
                store.clone(),
                tuning.backoff,
                wake_worker.clone(),
                stop_polls.clone(),
            )
        };
        if let Some(secret) = &source.push_secret {
            let wake = Arc::new(Notify::new());
            push.insert(
                source.name.clone(),
                PushFeed {
                    secret: secret.clone(),
                    adapter: adapter.clone(),
                    wake: wake.clone(),
                },
            );
            tasks.spawn(push_loop(adapter.clone(), ctx.clone(), wake));
        }
        contexts.push((adapter, ctx));
    }

    // HTTP server.
    let state = AppState {
        health: health.clone(),
        writer: store.clone(),
        reader,
        metrics,
        push: Arc::new(push),
        sources: Arc::new(names.clone()),
    };
    let server_stop = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(listener, state, server_stop.clone()));

    // Worker.
    let worker_state = Arc::new(WorkerState::default());
    let mut worker = Worker::for_config(
        &config,
        store.clone(),
        names.clone(),
        tuning.backoff,
        Exhausted::DeadLetter,
        wake_worker.clone(),
        worker_state.clone(),
        Some(health.clone()),
    )?;
    // What an earlier process left queued waits until the start-up poll has seen the record
    // again (a patient deleted meanwhile must not be created by its old queued create).
    let held = Held::new(names.clone());
    worker.held = Some(held.clone());
    let drain = Duration::from_secs(config.daemon.drain_timeout_secs);
    let worker_task = {
        let (never, shutdown, health) =
            (CancellationToken::new(), shutdown.clone(), health.clone());
        tokio::spawn(async move {
            let exit = worker.run(never, shutdown, drain).await;
            match &exit {
                // Sending stops until a restart with a fixed key; polling goes on.
                Ok(WorkerExit::AuthHalted(_)) => health.worker_stopped(),
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "Sending stopped: the state file failed. The daemon reports itself unhealthy so that it is restarted.");
                    health.failed();
                }
            }
            exit
        })
    };

    // Polls: one task per source fed by cron ticks, plus the watchdog.
    let scheduler = JobScheduler::new()
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    let mut ticks = HashMap::new();
    let poll_states: Arc<Mutex<HashMap<String, PollState>>> = Arc::default();
    for (adapter, ctx) in contexts {
        let (tx, rx) = mpsc::channel::<()>(1);
        // A poll at start, then on schedule.
        let _ = tx.try_send(());
        let job_tx = tx.clone();
        let job = Job::new_cron_job_async(ctx.source.schedule.as_str(), move |_, _| {
            let tx = job_tx.clone();
            Box::pin(async move {
                // Full means a poll is already pending: the ticks collapse into one.
                let _ = tx.try_send(());
            })
        })
        .map_err(|e| DaemonError::Scheduler(format!("{}: {e}", ctx.source.name)))?;
        scheduler
            .add(job)
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        ticks.insert(ctx.source.name.clone(), tx);
        tasks.spawn(source_loop(
            adapter,
            ctx,
            rx,
            poll_states.clone(),
            held.clone(),
        ));
    }
    scheduler
        .start()
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    tasks.spawn(watchdog(
        config.sources.clone(),
        ticks,
        poll_states.clone(),
        health.clone(),
        stop_polls.clone(),
    ));
    tasks.spawn(systemd_loop(
        health.clone(),
        poll_states.clone(),
        worker_state.clone(),
        store.clone(),
        shutdown.clone(),
    ));

    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        listen = %config.daemon.listen,
        sources = names.len(),
        state = %config.daemon.state_path.display(),
        "sync-daemon started."
    );

    shutdown.cancelled().await;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        drain_timeout_secs = config.daemon.drain_timeout_secs,
        "Shutting down: finishing in-flight requests."
    );
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    stop_polls.cancel();
    match worker_task.await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, "The worker stopped on a state file error."),
        Err(error) => tracing::error!(%error, "The worker task failed."),
    }
    // Polls and push loops stop at their next page boundary; don't wait on a slow source.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server_task).await;
    let _ = store.call(move |s| s.finish_run(run_id, "stopped")).await;
    tracing::info!("sync-daemon stopped.");
    Ok(ExitStatus::Ok)
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed.");
    }
}

async fn source_loop(
    adapter: Arc<dyn Source>,
    ctx: PollContext,
    mut ticks: mpsc::Receiver<()>,
    states: Arc<Mutex<HashMap<String, PollState>>>,
    held: Arc<Held>,
) {
    let name = ctx.source.name.clone();
    loop {
        tokio::select! {
            tick = ticks.recv() => if tick.is_none() { return },
            () = ctx.fetch.cancel.cancelled() => return,
        }
        {
            let mut states = states.lock().expect("poll state lock poisoned");
            let state = states.entry(name.clone()).or_default();
            state.running = true;
            state.last_started = Some(Utc::now());
        }
        let result = sources::poll(&adapter, &ctx).await;
        held.release(&name);
        ctx.wake_worker.notify_one();
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(PollError::Cancelled) => return,
            Err(PollError::AuthRefused(_)) => "auth refused".to_string(),
            Err(error) => format!("failed: {error}"),
        };
        let _ = sources::record_key_outcome(&ctx.store, &name, &result).await;
        // Between polls the daemon mostly sleeps: hand the compiled phone patterns and the
        // page cache back.
        crate::customer::release_phone_patterns();
        let _ = ctx.store.call(|s| s.release_memory()).await;
        let mut states = states.lock().expect("poll state lock poisoned");
        let state = states.entry(name.clone()).or_default();
        state.running = false;
        state.last_outcome = Some(outcome);
    }
}

/// Polls a source anyway when its scheduled poll is overdue by more than one interval.
async fn watchdog(
    sources: Vec<SourceConfig>,
    ticks: HashMap<String, mpsc::Sender<()>>,
    states: Arc<Mutex<HashMap<String, PollState>>>,
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
        let now = Utc::now();
        for source in &sources {
            let Some(interval) = interval_of(&source.schedule, now) else {
                continue;
            };
            let state = states
                .lock()
                .expect("poll state lock poisoned")
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
            metrics::counter!("sync_daemon_scheduler_overdue_total", "source" => source.name.clone())
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

/// Feeds the systemd watchdog from real loop progress and keeps `STATUS=` current.
async fn systemd_loop(
    health: Arc<Health>,
    states: Arc<Mutex<HashMap<String, PollState>>>,
    worker: Arc<WorkerState>,
    store: Store,
    cancel: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
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
        let polls = {
            let states = states.lock().expect("poll state lock poisoned");
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
            .map(|_| "; SENDING HALTED: RevKeen refused the key")
            .unwrap_or("");
        let status = format!("{polls}; queued {queued}; sent {sent}{halt}");
        notify(&[sd_notify::NotifyState::Status(&status)]);
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = cancel.cancelled() => return,
        }
    }
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
