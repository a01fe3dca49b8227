//! `--once`: poll every selected source to the end of its listing, drain the outbox, report.
//!
//! The poll loops and the worker run concurrently: RevKeen batches go out while polling goes
//! on. When every poll has finished the worker is told its inputs are done and stops once the
//! outbox holds nothing more for the selected sources. An auth refusal on either side stops
//! the run early; everything already committed stays queued for the next one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, UnknownSource};
use crate::exit::ExitStatus;
use crate::limiter::Backoff;

use crate::sources::{self, FetchContext, PollContext, PollError};
use crate::store::{
    Decision, Lane, PageItemOutcome, PollStats, Preview, Store, StoreError, decide,
};
use crate::worker::{Exhausted, Held, SendStats, Worker, WorkerExit, WorkerState};

/// What `--once` was asked to do.
#[derive(Clone, Default)]
pub struct OnceOptions {
    /// Limit the run to these sources (all when empty).
    pub sources: Vec<String>,
    /// Send everything again, ignoring synced hashes.
    pub resync: bool,
    /// Called a few times a second with the run's progress (progress bars).
    pub progress: Option<ProgressFn>,
    /// Cancelled by SIGTERM or SIGINT: polls stop at their next page, nothing new is claimed,
    /// requests in flight get up to `drain_timeout_secs`, and the run ends with its summary.
    pub stop: Option<CancellationToken>,
}

/// A progress callback for `--once`.
pub type ProgressFn = Arc<dyn Fn(&[SourceProgress]) + Send + Sync>;

/// A source's progress during `--once`.
#[derive(Debug, Clone, Default)]
pub struct SourceProgress {
    pub name: String,
    pub poll: PollStats,
    pub poll_done: bool,
    pub sent: SendStats,
    /// Records the source had at its last complete pass (an estimate of this pass's size).
    pub expected: Option<u64>,
}

/// One source's part of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceReport {
    pub name: String,
    pub kind: String,
    pub poll: PollStats,
    /// Why the poll stopped early, if it did.
    pub poll_error: Option<String>,
    pub sent: SendStats,
    /// Open failures after the run: records rejected before sending.
    pub rejected_open: u64,
    /// Open failures after the run: dead letters.
    pub dead_letters_open: u64,
}

impl SourceReport {
    /// The one-line summary of what a run did for this source.
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "{}: fetched {}, queued {}, unchanged {}, rejected {}; sent {} (created {}, updated {}, stale {}), dead-lettered {}",
            self.name,
            self.poll.fetched,
            self.poll.enqueued,
            self.poll.unchanged,
            self.poll.rejected,
            self.sent.delivered(),
            self.sent.created,
            self.sent.updated,
            self.sent.stale,
            self.sent.dead_lettered,
        );
        for note in self.notes() {
            line.push_str("; ");
            line.push_str(&note);
        }
        line
    }

    /// What else an operator should know about this source's run.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.poll.skipped > 0 {
            notes.push(format!(
                "{} skipped (deleted at the source, never in RevKeen)",
                self.poll.skipped
            ));
        }
        if self.poll.vanished > 0 {
            notes.push(format!(
                "{} records vanished from the source (kept in RevKeen; ids in the log)",
                self.poll.vanished
            ));
        }
        if self.poll.warnings > 0 {
            notes.push(format!(
                "{} unusable phones or countries left out",
                self.poll.warnings
            ));
        }
        if self.rejected_open + self.dead_letters_open > 0 {
            notes.push(format!(
                "open failures: {} rejected, {} dead letters (see `sync-daemon failures`)",
                self.rejected_open, self.dead_letters_open
            ));
        }
        if let Some(error) = &self.poll_error {
            notes.push(format!("poll stopped: {error}"));
        }
        notes
    }
}

/// The outcome of a `--once` run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub sources: Vec<SourceReport>,
    #[serde(skip)]
    pub exit: ExitStatus,
    /// Why the run ended early, if it did.
    pub stopped: Option<String>,
    pub elapsed: Duration,
}

impl RunReport {
    /// `--once --json`: the summary as one object (README, "Running it"):
    /// `{exit_code, elapsed_secs, stopped, sources: [{name, poll: {…}, poll_error, sent: {…},
    /// rejected_open, dead_letters_open}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("elapsed");
            object.insert("exit_code".into(), self.exit.code().into());
            object.insert(
                "elapsed_secs".into(),
                ((self.elapsed.as_secs_f64() * 10.0).round() / 10.0).into(),
            );
        }
        value
    }

    /// The summary printed at the end of every run: one row per source, then any notes.
    pub fn summary_table(&self) -> String {
        let header = [
            "SOURCE",
            "FETCHED",
            "QUEUED",
            "UNCHANGED",
            "REJECTED",
            "SENT",
            "CREATED",
            "UPDATED",
            "STALE",
            "DEAD",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for s in &self.sources {
            let counts = [
                s.poll.fetched,
                s.poll.enqueued,
                s.poll.unchanged,
                s.poll.rejected,
                s.sent.delivered(),
                s.sent.created,
                s.sent.updated,
                s.sent.stale,
                s.sent.dead_lettered,
            ];
            rows.push(
                std::iter::once(s.name.clone())
                    .chain(counts.iter().map(u64::to_string))
                    .collect(),
            );
        }
        // The name column to the left, the counts to the right.
        let mut out = crate::table::text_table(&rows, |column| column > 0);
        for s in &self.sources {
            for note in s.notes() {
                out.push_str(&format!("{}: {}\n", s.name, crate::table::escape(&note)));
            }
        }
        out.push_str(&format!(
            "Finished in {:.1} s.\n",
            self.elapsed.as_secs_f64()
        ));
        out
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    UnknownSource(#[from] UnknownSource),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Build(#[from] sources::BuildError),
    #[error("{name}: {error}")]
    Poll { name: String, error: PollError },
}

impl RunError {
    /// The exit code for this failure.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            RunError::UnknownSource(_) => ExitStatus::Usage,
            RunError::Store(error) => error.exit_status(),
            RunError::Http(_) => ExitStatus::Failure,
            RunError::Build(_) => ExitStatus::Failure,
            RunError::Poll { error, .. } => error.exit_status(),
        }
    }
}

/// Runs `--once`.
pub async fn once(config: &Config, options: &OnceOptions) -> Result<RunReport, RunError> {
    let started = crate::clock::instant();
    let selected = config.selected_sources(&options.sources)?;
    let names: Vec<String> = selected.iter().map(|s| s.name.clone()).collect();
    let store = Store::open_blocking(config.daemon.state_path.clone()).await?;
    {
        // A new run gets a full retry budget for what an earlier run left queued.
        let names = names.clone();
        store.call(move |s| s.reset_attempts(&names)).await?;
    }
    let run_id = store.call(|s| s.begin_run("once")).await?;
    // RevKeen's own hosted sync, the other writer, read beside the run (`hosted`).
    let hosted = {
        let (config, selected, store) = (config.clone(), selected.clone(), store.clone());
        tokio::spawn(
            async move { crate::hosted::check_and_record(&config, &selected, &store).await },
        )
    };

    let wake = Arc::new(Notify::new());
    let state = Arc::new(WorkerState::default());
    let inputs_done = CancellationToken::new();
    let stop_polls = CancellationToken::new();
    let mut worker = Worker::for_config(
        config,
        store.clone(),
        names.clone(),
        Exhausted::StopRun,
        wake.clone(),
        state.clone(),
    )?;
    // What an earlier run left queued waits until this run's poll has seen the record again.
    let held = Held::new(names);
    worker.held = Some(held.clone());
    let shutdown = CancellationToken::new();
    if let Some(stop) = options.stop.clone() {
        let (shutdown, stop_polls) = (shutdown.clone(), stop_polls.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            stop_polls.cancel();
            shutdown.cancel();
        });
    }
    let worker_task = {
        let (inputs_done, shutdown) = (inputs_done.clone(), shutdown.clone());
        let drain = Duration::from_secs(config.daemon.drain_timeout_secs);
        tokio::spawn(async move { worker.run(inputs_done, shutdown, drain).await })
    };

    let run = Polls {
        store: &store,
        wake: &wake,
        stop_polls: &stop_polls,
        run_id,
    };
    let (polls, trackers) = run.spawn(&selected, options).await?;
    let done_polls: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let reporter = options.progress.clone().map(|report| {
        spawn_reporter(
            report,
            trackers,
            state.clone(),
            done_polls.clone(),
            inputs_done.clone(),
        )
    });
    let (poll_results, worker_exit) = run
        .wait(polls, worker_task, &held, &done_polls, &inputs_done)
        .await?;
    if let Some(reporter) = reporter {
        reporter.abort();
    }

    // Source auth refusals are recorded for `status`, like RevKeen's.
    for (name, result) in &poll_results {
        sources::record_key_outcome(&store, name, result).await?;
    }
    let reports = source_reports(&store, &selected, &poll_results, &state).await?;
    let (exit, stopped) = run_exit(&worker_exit, &poll_results, &reports);
    let outcome = match exit {
        ExitStatus::Ok => "ok",
        ExitStatus::Rejected => "ok_with_failures",
        ExitStatus::AuthRefused => "auth_refused",
        ExitStatus::Unavailable => "unavailable",
        _ => "failed",
    };
    // Bounded: a RevKeen too slow to answer this read does not hold the summary back.
    let abort = hosted.abort_handle();
    match tokio::time::timeout(HOSTED_SYNC_WAIT, hosted).await {
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "Could not record RevKeen's built-in syncs for status.");
        }
        Ok(_) => {}
        Err(_) => {
            abort.abort();
            tracing::debug!("RevKeen did not answer the read of its built-in syncs in time.");
        }
    }
    store.call(move |s| s.finish_run(run_id, outcome)).await?;
    Ok(RunReport {
        sources: reports,
        exit,
        stopped,
        elapsed: started.elapsed(),
    })
}

/// How long a finished run waits for the read of RevKeen's built-in syncs.
const HOSTED_SYNC_WAIT: Duration = Duration::from_secs(5);

/// A poll's source name and result.
type PollResult = (String, Result<PollStats, PollError>);

/// A source's progress counters and its expected size, for the progress bars.
type Tracker = (String, Arc<std::sync::Mutex<PollStats>>, Option<u64>);

/// The polls of one `--once` run.
struct Polls<'a> {
    store: &'a Store,
    wake: &'a Arc<Notify>,
    stop_polls: &'a CancellationToken,
    run_id: i64,
}

impl Polls<'_> {
    /// Starts one poll per selected source.
    async fn spawn(
        &self,
        selected: &[crate::config::SourceConfig],
        options: &OnceOptions,
    ) -> Result<(tokio::task::JoinSet<PollResult>, Vec<Tracker>), RunError> {
        let mut polls = tokio::task::JoinSet::new();
        let mut trackers = Vec::new();
        for source in selected {
            let progress = Arc::new(std::sync::Mutex::new(PollStats::default()));
            let expected = {
                let name = source.name.clone();
                self.store.call(move |s| s.known_records(&name)).await?
            };
            trackers.push((source.name.clone(), progress.clone(), expected));
            let ctx = PollContext {
                resync: options.resync,
                run_id: Some(self.run_id),
                progress: Some(progress),
                ..PollContext::new(
                    source,
                    self.store.clone(),
                    Backoff::default(),
                    self.wake.clone(),
                    self.stop_polls.clone(),
                )
            };
            let adapter = sources::build(source)?;
            polls.spawn(async move {
                let result = sources::poll(&adapter, &ctx).await;
                (ctx.source.name.clone(), result)
            });
        }
        Ok((polls, trackers))
    }

    /// Waits for every poll, watching the worker meanwhile: a RevKeen auth halt (or a unit
    /// out of attempts) stops the polls, since polling on would only queue more. Then lets
    /// the worker drain what the polls queued.
    async fn wait(
        &self,
        mut polls: tokio::task::JoinSet<PollResult>,
        worker_task: tokio::task::JoinHandle<Result<WorkerExit, StoreError>>,
        held: &Held,
        done_polls: &std::sync::Mutex<Vec<String>>,
        inputs_done: &CancellationToken,
    ) -> Result<(Vec<PollResult>, WorkerExit), RunError> {
        let mut poll_results = Vec::new();
        let mut worker_task = Some(worker_task);
        let mut worker_exit = None;
        while !polls.is_empty() {
            tokio::select! {
                Some(done) = polls.join_next() => {
                    let done = joined(done);
                    held.release(&done.0);
                    self.wake.notify_one();
                    done_polls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(done.0.clone());
                    poll_results.push(done);
                }
                exit = async { worker_task.as_mut().expect("present until it ends").await }, if worker_task.is_some() => {
                    worker_task = None;
                    let exit = joined(exit)?;
                    if !matches!(exit, WorkerExit::Drained) {
                        self.stop_polls.cancel();
                    }
                    worker_exit = Some(exit);
                }
            }
        }
        inputs_done.cancel();
        let worker_exit = match (worker_exit, worker_task) {
            (Some(exit), _) => exit,
            (None, Some(task)) => joined(task.await)?,
            (None, None) => WorkerExit::Drained,
        };
        Ok((poll_results, worker_exit))
    }
}

/// A task's result; a panic in it goes on up, as it would have without the task.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// Calls `report` a few times a second with the run's progress, until the run is done.
fn spawn_reporter(
    report: ProgressFn,
    trackers: Vec<Tracker>,
    state: Arc<WorkerState>,
    done_polls: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let sent = state.stats();
            let done = done_polls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let snapshot: Vec<SourceProgress> = trackers
                .iter()
                .map(|(name, poll, expected)| SourceProgress {
                    name: name.clone(),
                    poll: *poll
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    poll_done: done.contains(name),
                    sent: sent.get(name).copied().unwrap_or_default(),
                    expected: *expected,
                })
                .collect();
            report(&snapshot);
            if stop.is_cancelled() && state.in_flight() == 0 && done.len() == trackers.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// One report per selected source: its poll (or what was recorded of a poll that stopped),
/// what was sent, and its open failures.
async fn source_reports(
    store: &Store,
    selected: &[crate::config::SourceConfig],
    poll_results: &[PollResult],
    state: &WorkerState,
) -> Result<Vec<SourceReport>, RunError> {
    let sent = state.stats();
    let mut reports = Vec::new();
    for source in selected {
        let result = poll_results.iter().find(|(n, _)| *n == source.name);
        let (poll, poll_error) = match result {
            Some((_, Ok(stats))) => (*stats, None),
            Some((_, Err(PollError::Cancelled))) | None => (
                last_poll_stats(store, &source.name).await?,
                Some("stopped early".to_string()),
            ),
            Some((_, Err(error))) => (
                last_poll_stats(store, &source.name).await?,
                Some(error.to_string()),
            ),
        };
        let (rejected_open, dead_letters_open) = {
            let names = vec![source.name.clone()];
            store.call(move |s| s.failure_counts(&names)).await?
        };
        reports.push(SourceReport {
            name: source.name.clone(),
            kind: source.kind.to_string(),
            poll,
            poll_error,
            sent: sent.get(&source.name).copied().unwrap_or_default(),
            rejected_open,
            dead_letters_open,
        });
    }
    Ok(reports)
}

/// The run's exit code and why it stopped early: the worst outcome wins (a refused key, then
/// an unavailable upstream, then a failed poll, then open failures).
fn run_exit(
    worker_exit: &WorkerExit,
    poll_results: &[PollResult],
    reports: &[SourceReport],
) -> (ExitStatus, Option<String>) {
    let worst_poll = poll_results
        .iter()
        .filter_map(|(_, result)| result.as_ref().err())
        .filter(|error| !matches!(error, PollError::Cancelled))
        .map(PollError::exit_status)
        .min_by_key(|status| match status {
            ExitStatus::AuthRefused => 0,
            ExitStatus::Unavailable => 1,
            _ => 2,
        });
    match (worker_exit, worst_poll) {
        (WorkerExit::Halted(halt), _) => (halt.exit_status(), Some(halt.message.clone())),
        (_, Some(ExitStatus::AuthRefused)) => (
            ExitStatus::AuthRefused,
            Some("a source refused its API key".to_string()),
        ),
        (WorkerExit::Unavailable(reason), _) => (ExitStatus::Unavailable, Some(reason.clone())),
        (_, Some(ExitStatus::Unavailable)) => (
            ExitStatus::Unavailable,
            // A spent month says which and until when; the run does not wait for it.
            Some(
                poll_results
                    .iter()
                    .find_map(|(name, result)| match result {
                        Err(PollError::QuotaSpent(why)) => Some(format!("{name}: {why}")),
                        _ => None,
                    })
                    .unwrap_or_else(|| "a source stayed unavailable".to_string()),
            ),
        ),
        (_, Some(status)) => (status, Some("a poll failed".to_string())),
        _ if reports
            .iter()
            .any(|r| r.rejected_open + r.dead_letters_open > 0) =>
        {
            (ExitStatus::Rejected, None)
        }
        _ => (ExitStatus::Ok, None),
    }
}

async fn last_poll_stats(store: &Store, name: &str) -> Result<PollStats, StoreError> {
    let name = name.to_string();
    Ok(store
        .call(move |s| s.last_poll(&name))
        .await?
        .map(|p| p.stats)
        .unwrap_or_default())
}

/// One customer `--dry-run` would write (or cannot).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DryRunEntry {
    pub source: String,
    pub external_id: String,
    /// `create`, `update` or `reject`.
    pub action: &'static str,
    /// Fields that differ from what was last synced (every field for a create).
    pub fields: Vec<String>,
    /// The body that would be sent (shown with `--verbose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// Why a record cannot be sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RevKeen's id for the customer, when an earlier single upsert's answer named it (shown
    /// with `--verbose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revkeen_id: Option<String>,
}

/// Fetches every selected source and reports what a run would send, writing nothing: not to
/// RevKeen, not to the state file (which is opened read-only, if it exists at all).
pub async fn dry_run(
    config: &Config,
    options: &OnceOptions,
    mut emit: impl FnMut(DryRunEntry),
) -> Result<Vec<SourceReport>, RunError> {
    let selected = config.selected_sources(&options.sources)?;
    let store = Store::open_read_only_blocking(config.daemon.state_path.clone()).await?;
    let mut reports = Vec::new();
    for source in &selected {
        let adapter = sources::build(source)?;
        let ctx = FetchContext {
            // The month's count is read (the dry run never spends past the budget) but,
            // like everything else, never written.
            budget: sources::budget::Budget::new(source, store.clone(), false),
            ..FetchContext::new(source, Backoff::default(), CancellationToken::new())
        };
        let mut pages = Vec::new();
        let stats = sources::scan(adapter.as_ref(), &ctx, |page| pages.push(page))
            .await
            .map_err(|error| RunError::Poll {
                name: source.name.clone(),
                error,
            })?;
        let mut report = SourceReport {
            name: source.name.clone(),
            kind: source.kind.to_string(),
            poll: stats,
            ..SourceReport::default()
        };
        for mapped in pages.into_iter().flatten() {
            preview_item(
                &source.name,
                mapped,
                store.as_ref(),
                options.resync,
                &mut report,
                &mut emit,
            )?;
        }
        reports.push(report);
    }
    Ok(reports)
}

/// What a run would do with one mapped record: counted in `report`, and emitted unless it
/// is unchanged or skipped. Change detection is the store's (`Store::preview`), the very
/// question the real run asks.
fn preview_item(
    source: &str,
    mapped: crate::sources::Mapped,
    store: Option<&Store>,
    resync: bool,
    report: &mut SourceReport,
    emit: &mut impl FnMut(DryRunEntry),
) -> Result<(), RunError> {
    let external_id = mapped.item.external_id;
    let (body, update_only) = match mapped.item.outcome {
        PageItemOutcome::Customer { body, update_only } => (body, update_only),
        PageItemOutcome::Rejected(rejection) => {
            report.poll.rejected += 1;
            emit(DryRunEntry {
                source: source.to_string(),
                external_id,
                action: "reject",
                fields: Vec::new(),
                body: None,
                reason: Some(rejection.reason),
                revkeen_id: None,
            });
            return Ok(());
        }
        PageItemOutcome::Ignored => {
            report.poll.skipped += 1;
            return Ok(());
        }
    };
    // The same question the real run asks the store (one change detection).
    let hash = crate::customer::body_hash(&body);
    let preview = match store {
        Some(store) => store.preview(source, &external_id, &hash, update_only, resync)?,
        None => Preview {
            decision: decide(&Lane::default(), &hash, update_only, resync),
            synced_body: None,
            revkeen_id: None,
        },
    };
    let create = match preview.decision {
        Decision::Unchanged => {
            report.poll.unchanged += 1;
            return Ok(());
        }
        Decision::Skip => {
            report.poll.skipped += 1;
            return Ok(());
        }
        Decision::Send { create } => create,
    };
    report.poll.enqueued += 1;
    let new: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let old: Option<serde_json::Value> = preview
        .synced_body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok());
    emit(DryRunEntry {
        source: source.to_string(),
        external_id,
        action: if create { "create" } else { "update" },
        fields: changed_fields(old.as_ref(), &new),
        body: Some(new),
        reason: None,
        revkeen_id: preview.revkeen_id,
    });
    Ok(())
}

/// Top-level fields whose values differ between two bodies (all of `new`'s when `old` is none).
pub fn changed_fields(old: Option<&serde_json::Value>, new: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let new = new.as_object().unwrap_or(&empty);
    let old = old.and_then(|o| o.as_object()).unwrap_or(&empty);
    let mut fields: Vec<String> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(old.keys().filter(|k| !new.contains_key(*k)).cloned())
        .collect();
    fields.sort();
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_daemon_sim::{SimPorts, SimSet};

    /// The dry run asks the store the question the real run asks: a deleted patient RevKeen
    /// never had is skipped by both, never shown as a create.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_patient_revkeen_never_had_is_skipped_by_the_dry_run_and_the_run() {
        let sims = SimSet::start(SimPorts::default())
            .await
            .expect("simulators");
        sims.practicehub.seed(3, 1);
        let deleted = sims.practicehub.patients()[0]["id"].as_i64().expect("id");
        sims.practicehub.update_patient(
            deleted,
            serde_json::json!({"email": "gone@example.com", "deleted": true}),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = sims.config_toml(&dir.path().join("state.db"));
        let config = Config::from_toml(
            &toml,
            &crate::config::Environment::default(),
            &sources::config_kinds(),
        )
        .expect("config");
        let options = OnceOptions {
            sources: vec!["clinic".to_string()],
            ..OnceOptions::default()
        };
        let mut entries = Vec::new();
        let reports = dry_run(&config, &options, |entry| entries.push(entry))
            .await
            .expect("dry run");
        let id = deleted.to_string();
        assert!(
            !entries.iter().any(|e| e.external_id == id),
            "the dry run would act on a deleted patient RevKeen never had: {entries:?}"
        );
        assert_eq!(reports[0].poll.skipped, 1, "{:?}", reports[0].poll);

        let report = once(&config, &options).await.expect("run");
        assert_eq!(
            report.sources[0].poll.skipped, 1,
            "{:?}",
            report.sources[0].poll
        );
        assert!(sims.revkeen.customer("practicehub", &id).is_none());
        assert_eq!(
            report.sources[0].poll.enqueued, reports[0].poll.enqueued,
            "the dry run and the run disagree on what to send"
        );
    }
}
