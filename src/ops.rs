//! Operator commands: `status`, `failures`, `replay` and `check-config --connect`.
//!
//! Each answers one question a sysadmin has at 2 a.m. without SQL or logs. `status` and
//! `failures` read through a read-only connection, so they work while the daemon runs without
//! ever blocking it, and when it is stopped. Their `--json` shapes are the structs below
//! (documented in the README); fields are only ever added, never renamed.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::{Config, SourceConfig};
use crate::exit::ExitStatus;
use crate::http::Probe;
use crate::revkeen::RevKeenClient;
use crate::sources;
use crate::store::{DeliveryCounts, Failure, FailureKind, Halt, PollStats, Store, StoreError};
use crate::table::escape;
use crate::worker::REVKEEN;

/// `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub state_path: String,
    /// RFC 3339.
    pub generated_at: String,
    /// Whether a sync-daemon process (daemon or `--once`) holds the state file now.
    pub running: bool,
    /// What that process is: `daemon` or `once` (absent when none runs).
    pub mode: Option<String>,
    pub sources: Vec<SourceStatus>,
    pub outbox_depth: u64,
    pub oldest_pending_age_secs: Option<u64>,
    /// Push events accepted and waiting to be fetched from their source, all sources.
    pub push_pending: u64,
    pub dead_letters: u64,
    pub rejected: u64,
    /// APIs that refused their key (sending or polling them stops until a fixed key answers).
    pub auth_halts: Vec<HaltStatus>,
    /// Every halt: the refused keys above, and an address that does not lead to its API (a
    /// redirect, an untrusted certificate; code `misdirected`).
    pub halts: Vec<HaltStatus>,
    /// Hosts paused for a long `Retry-After`, with until when.
    pub pauses: Vec<PauseStatus>,
    /// The last re-read of each key: on `SIGHUP`, or a key file that changed while its API
    /// refused the old key.
    pub keys_reread: Vec<KeyRereadStatus>,
    /// RevKeen's own hosted sync found active for a provider this config also syncs (the
    /// other writer), as last read at a start or a run.
    pub hosted_syncs: Vec<HostedSyncStatus>,
}

/// RevKeen's own hosted sync, found active.
#[derive(Debug, Clone, Serialize)]
pub struct HostedSyncStatus {
    /// `wodify` or `practicehub`.
    pub provider: String,
    /// RFC 3339: when it was read.
    pub checked_at: String,
    /// What it means and what to do ("RevKeen's built-in wodify sync is active …").
    pub warning: String,
}

/// The last re-read of one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRereadStatus {
    /// `revkeen.api_key`, `sources.<name>.api_key` or `sources.<name>.push_secret`.
    pub key: String,
    /// RFC 3339.
    pub at: String,
    /// `SIGHUP` or `key file changed`.
    pub trigger: String,
    /// Whether the value differed from the one in use.
    pub changed: bool,
}

/// A host paused for a long `Retry-After`.
#[derive(Debug, Clone, Serialize)]
pub struct PauseStatus {
    pub target: String,
    /// RFC 3339.
    pub until: String,
    pub reason: String,
}

/// One source in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub kind: String,
    pub last_poll: Option<PollStatus>,
    /// The listing position in words.
    pub position: String,
    /// RFC 3339; when the schedule fires next (only while a daemon runs).
    pub next_poll: Option<String>,
    /// RevKeen's answers for this source, all time.
    pub delivered: DeliveryCounts,
    pub queued: u64,
    pub oldest_pending_age_secs: Option<u64>,
    /// Push events accepted and waiting to be fetched from the source.
    pub push_pending: u64,
    pub rejected: u64,
    pub dead_letters: u64,
    /// Records the last complete scan no longer listed (deleted at the source, kept in
    /// RevKeen). Full-scan sources (Wodify) only.
    pub vanished: u64,
    /// This calendar month's requests against the source's `monthly_request_budget`
    /// (`{"month": "2026-12", "used": N, "budget": B}`); absent when it has no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_budget: Option<sources::budget::Usage>,
    /// Why the source is not polled on its schedule this month: its quota is spent (until
    /// when), its budget is, or scans are spaced out so the budget lasts (to what interval
    /// and why). Absent when it polls on schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_note: Option<String>,
}

/// The last poll of a source.
#[derive(Debug, Clone, Serialize)]
pub struct PollStatus {
    pub started_at: String,
    pub finished_at: Option<String>,
    /// `ok`, `failed`, `auth_refused`, `cancelled`, or `running`.
    pub outcome: String,
    pub error: Option<String>,
    #[serde(flatten)]
    pub stats: PollStats,
}

/// An unresolved auth halt.
#[derive(Debug, Clone, Serialize)]
pub struct HaltStatus {
    pub target: String,
    pub code: String,
    pub reason: String,
    pub since: String,
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn age_secs(since_ms: i64, now_ms: i64) -> u64 {
    u64::try_from((now_ms - since_ms).max(0) / 1000).unwrap_or(0)
}

impl From<&Halt> for HaltStatus {
    fn from(halt: &Halt) -> Self {
        HaltStatus {
            target: halt.target.clone(),
            code: halt.code.clone(),
            reason: halt.message.clone(),
            since: rfc3339(halt.since),
        }
    }
}

/// What `check-config` checks of `daemon.state_path`: that this user can create the state file
/// and its companions (`-wal`, `-shm`, `.lock`) in its directory, and that a file already there
/// is a sync-daemon state file. `Err` says what is wrong and how to fix it.
pub fn check_state_path(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = crate::store::directory_of(path);
    // The nearest directory that exists: the daemon creates the rest.
    let existing = dir.ancestors().find(|d| d.is_dir()).unwrap_or(dir);
    let may = |p: &std::path::Path, mode: libc::c_int| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).is_ok_and(|c| {
            // SAFETY: access only reads the NUL-terminated path.
            unsafe { libc::access(c.as_ptr(), mode) == 0 }
        })
    };
    if !may(existing, libc::W_OK | libc::X_OK) {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        return Err(format!(
            "{} is not writable by this user (uid {uid}): the daemon creates {} and its -wal, -shm and .lock files there; give the service user write access (systemd: StateDirectory=) or choose another daemon.state_path",
            existing.display(),
            path.display()
        ));
    }
    if path.exists() {
        if !may(path, libc::W_OK) {
            return Err(format!(
                "{} is read-only for this user: the daemon writes it; fix its owner or mode",
                path.display()
            ));
        }
        Store::check_file(path).map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Builds `status` from the state file (read-only) and the config.
pub fn status(config: &Config) -> Result<StatusReport, StoreError> {
    let path = &config.daemon.state_path;
    let running = Store::writer_active(path);
    let store = Store::open_read_only(path)?;
    let now = crate::clock::now_ms();
    let (queue, push_pending, halts, pauses, rereads, hosted, mode) = match &store {
        Some(store) => (
            store.queue_summary()?,
            store.push_pending()?,
            store.halts()?,
            store.pauses(now)?,
            store.key_rereads()?,
            store.hosted_syncs()?,
            if running {
                store.open_run_mode()?
            } else {
                None
            },
        ),
        None => (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            None,
        ),
    };
    let daemon = mode.as_deref() == Some("daemon");
    let mut sources = Vec::new();
    for source in &config.sources {
        let summary = queue.iter().find(|q| q.source == source.name);
        let month = sources::budget::month_of(now);
        let (last_poll, cursor, delivered, vanished, spent) = match &store {
            Some(store) => (
                store.last_poll(&source.name)?,
                store.cursor(&source.name)?,
                store.delivery(&source.name)?,
                store.vanished_total(&source.name)?,
                store.budget_month(&source.name, &month)?,
            ),
            None => (
                None,
                None,
                DeliveryCounts::default(),
                0,
                crate::store::BudgetMonth::default(),
            ),
        };
        let budget_note = match spent.quota_spent_at {
            Some(at) => Some(format!(
                "PAUSED: the API key's monthly quota is spent (429 Limit Exceeded, last seen {}); \
                 polling resumes when the month turns ({}), with one try an hour meanwhile",
                rfc3339(at),
                rfc3339(sources::budget::month_end(now))
            )),
            None => spent.note.clone(),
        };
        sources.push(SourceStatus {
            name: source.name.clone(),
            kind: source.kind.to_string(),
            last_poll: last_poll.map(|p| PollStatus {
                started_at: rfc3339(p.started_at),
                finished_at: p.finished_at.map(rfc3339),
                outcome: p
                    .outcome
                    .unwrap_or_else(|| if running { "running" } else { "interrupted" }.to_string()),
                error: p.error,
                stats: p.stats,
            }),
            position: sources::describe_cursor(
                source,
                cursor.as_ref().map(|(c, passes)| (c.as_str(), *passes)),
            ),
            next_poll: daemon
                .then(|| crate::schedule::next_after(&source.schedule, crate::clock::now()))
                .flatten()
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
            delivered,
            queued: summary.map(|s| s.depth).unwrap_or(0),
            oldest_pending_age_secs: summary
                .and_then(|s| s.oldest_enqueued_at)
                .map(|t| age_secs(t, now)),
            push_pending: push_pending
                .iter()
                .find(|(name, _)| name == &source.name)
                .map_or(0, |(_, count)| *count),
            rejected: summary.map(|s| s.rejected).unwrap_or(0),
            dead_letters: summary.map(|s| s.dead_letters).unwrap_or(0),
            vanished: if sources::kind_of(source).is_ok_and(|kind| kind.full_scan()) {
                vanished
            } else {
                0
            },
            request_budget: source
                .monthly_request_budget
                .map(|budget| sources::budget::Usage {
                    month: month.clone(),
                    used: spent.used,
                    budget,
                }),
            budget_note,
        });
    }
    Ok(StatusReport {
        state_path: path.display().to_string(),
        generated_at: rfc3339(now),
        running,
        mode,
        outbox_depth: queue.iter().map(|q| q.depth).sum(),
        oldest_pending_age_secs: queue
            .iter()
            .filter_map(|q| q.oldest_enqueued_at)
            .min()
            .map(|t| age_secs(t, now)),
        push_pending: push_pending.iter().map(|(_, count)| count).sum(),
        dead_letters: queue.iter().map(|q| q.dead_letters).sum(),
        rejected: queue.iter().map(|q| q.rejected).sum(),
        auth_halts: halts
            .iter()
            .filter(|h| h.code != crate::worker::MISDIRECTED)
            .map(HaltStatus::from)
            .collect(),
        halts: halts.iter().map(HaltStatus::from).collect(),
        pauses: pauses
            .into_iter()
            .map(|p| PauseStatus {
                target: p.target,
                until: rfc3339(p.until),
                reason: p.reason,
            })
            .collect(),
        keys_reread: rereads
            .into_iter()
            .map(|r| KeyRereadStatus {
                key: r.key,
                at: rfc3339(r.at),
                trigger: r.trigger,
                changed: r.changed,
            })
            .collect(),
        hosted_syncs: hosted
            .into_iter()
            .filter(|(provider, _, _)| config.sources.iter().any(|s| s.kind == provider))
            .map(|(provider, warning, at)| HostedSyncStatus {
                provider,
                checked_at: rfc3339(at),
                warning,
            })
            .collect(),
        sources,
    })
}

/// What a source's schedule costs a month against its `monthly_request_budget`, for
/// `check-config`.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetCost {
    pub source: String,
    /// Requests a calendar month; absent: unlimited.
    pub budget: Option<u64>,
    /// Requests of the last complete poll (a scan), from the state file.
    pub scan_requests: Option<u64>,
    /// The schedule's average interval between polls.
    pub interval_secs: Option<u64>,
    /// Polls the schedule makes in an average month.
    pub scans_a_month: Option<u64>,
    /// Requests the schedule costs a month at the last scan's size.
    pub requests_a_month: Option<u64>,
    /// The sentence `check-config` prints.
    pub summary: String,
}

/// What each source's schedule costs a month at its last scan's size, against its budget
/// (read-only: the state file, when there is one, gives the last scan's size).
pub fn budget_costs(config: &Config) -> Vec<BudgetCost> {
    use sources::budget::{month_of, schedule_interval, schedule_month_cost, span};
    let now = crate::clock::now_ms();
    let store = Store::open_read_only(&config.daemon.state_path)
        .ok()
        .flatten();
    config
        .sources
        .iter()
        .map(|source| {
            let scan = store
                .as_ref()
                .and_then(|s| s.budget_month(&source.name, &month_of(now)).ok())
                .and_then(|m| m.scan_requests);
            let interval = schedule_interval(&source.schedule, crate::clock::now());
            let cost = interval.zip(scan).map(|(i, c)| schedule_month_cost(i, c));
            let budget = source
                .monthly_request_budget
                .map_or("no monthly_request_budget (unlimited)".to_string(), |b| {
                    format!("a monthly_request_budget of {b}")
                });
            let summary = match (interval, scan, cost) {
                (Some(interval), Some(scan), Some((scans, requests))) => {
                    let verdict = match source.monthly_request_budget {
                        Some(b) if requests > b => format!(
                            ": over budget, so scans will be spaced out to about every {}",
                            span(interval.mul_f64(requests as f64 / b.max(1) as f64))
                        ),
                        Some(b) => format!(": {}% of it", requests.saturating_mul(100) / b.max(1)),
                        None => String::new(),
                    };
                    format!(
                        "{}: the schedule (every {}, {scans} polls a month) costs about {requests} requests a month at the last complete scan's {scan}, against {budget}{verdict}",
                        source.name,
                        span(interval)
                    )
                }
                _ => format!(
                    "{}: {budget}; no complete poll recorded yet, so what the schedule costs is not known (a Wodify scan takes one request per 100 clients)",
                    source.name
                ),
            };
            BudgetCost {
                source: source.name.clone(),
                budget: source.monthly_request_budget,
                scan_requests: scan,
                interval_secs: interval.map(|i| i.as_secs()),
                scans_a_month: cost.map(|c| c.0),
                requests_a_month: cost.map(|c| c.1),
                summary,
            }
        })
        .collect()
}

/// `status` as a compact table, then what needs attention.
pub fn render_status(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sync-daemon status — {} ({})",
        report.state_path,
        match (report.running, report.mode.as_deref()) {
            (true, Some("daemon")) => "the daemon is running",
            (true, Some("once")) => "a --once run is in progress",
            (true, _) => "a sync-daemon process is running",
            (false, _) => "no sync-daemon process running",
        }
    );
    out.push_str(&status_table(report));
    for source in &report.sources {
        if let Some(error) = source.last_poll.as_ref().and_then(|p| p.error.as_ref()) {
            let _ = writeln!(out, "  {}: last poll error: {}", source.name, escape(error));
        }
        if let Some(usage) = &source.request_budget {
            let _ = writeln!(
                out,
                "  {}: {} of {} requests of the monthly budget used in {}",
                source.name, usage.used, usage.budget, usage.month
            );
        }
        if let Some(note) = &source.budget_note {
            let _ = writeln!(out, "  {}: {}", source.name, escape(note));
        }
        if source.vanished > 0 {
            let _ = writeln!(
                out,
                "  {}: {} records vanished from the source since they were synced (kept in RevKeen; ids in the log)",
                source.name, source.vanished
            );
        }
    }
    let oldest = report
        .oldest_pending_age_secs
        .map(|s| format!(", oldest waiting {}", human_duration(s)))
        .unwrap_or_default();
    let push = if report.push_pending > 0 {
        format!(
            " Push events waiting to be fetched: {}.",
            report.push_pending
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "Outbox: {} waiting{oldest}.{push} Dead letters: {}. Rejected records: {}.{}",
        report.outbox_depth,
        report.dead_letters,
        report.rejected,
        if report.dead_letters + report.rejected > 0 {
            " See `sync-daemon failures`."
        } else {
            ""
        }
    );
    if report.auth_halts.is_empty() {
        let _ = writeln!(out, "Auth: every API accepted its key.");
    }
    for halt in &report.halts {
        let what = if halt.code == crate::worker::MISDIRECTED {
            "SENDING HALTED: {} answered wrongly"
        } else {
            "AUTH HALT: {} refused the key"
        }
        .replace("{}", &halt.target);
        let _ = writeln!(
            out,
            "{what} since {} ({}): {}",
            short_time(&halt.since),
            escape(&halt.code),
            escape(&halt.reason)
        );
    }
    for pause in &report.pauses {
        let _ = writeln!(
            out,
            "PAUSED: {} until {}: {}",
            pause.target,
            short_time(&pause.until),
            escape(&pause.reason)
        );
    }
    for hosted in &report.hosted_syncs {
        let _ = writeln!(
            out,
            "WARNING (read {}): {}",
            short_time(&hosted.checked_at),
            escape(&hosted.warning)
        );
    }
    for reread in &report.keys_reread {
        let _ = writeln!(
            out,
            "Key re-read: {} at {} ({}; {}).",
            reread.key,
            short_time(&reread.at),
            reread.trigger,
            if reread.changed {
                "changed"
            } else {
                "unchanged"
            }
        );
    }
    out
}

/// One row per source: its last poll, where it stands, when it polls next.
fn status_table(report: &StatusReport) -> String {
    let header = [
        "SOURCE",
        "KIND",
        "LAST POLL",
        "ENDED",
        "OUTCOME",
        "FETCHED",
        "QUEUED",
        "UNCHANGED",
        "REJECTED",
        "SENT",
        "POSITION",
        "NEXT POLL",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for source in &report.sources {
        let poll = source.last_poll.as_ref();
        rows.push(vec![
            source.name.clone(),
            source.kind.clone(),
            poll.map(|p| short_time(&p.started_at))
                .unwrap_or_else(|| "never".to_string()),
            poll.map(|p| {
                p.finished_at
                    .as_deref()
                    .map(short_time)
                    .unwrap_or_else(|| "-".to_string())
            })
            .unwrap_or_default(),
            poll.map(|p| p.outcome.clone()).unwrap_or_default(),
            poll.map(|p| p.stats.fetched.to_string())
                .unwrap_or_default(),
            poll.map(|p| p.stats.enqueued.to_string())
                .unwrap_or_default(),
            poll.map(|p| p.stats.unchanged.to_string())
                .unwrap_or_default(),
            poll.map(|p| p.stats.rejected.to_string())
                .unwrap_or_default(),
            source.delivered.writes().to_string(),
            source.position.clone(),
            source
                .next_poll
                .as_deref()
                .map(short_time)
                .unwrap_or_else(|| "-".to_string()),
        ]);
    }
    crate::table::text_table(&rows, |_| false)
}

fn short_time(rfc3339: &str) -> String {
    rfc3339.replace('T', " ")
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

/// `failures --json`: one entry per record that could not be sent.
pub fn failures(config: &Config, source: Option<&str>) -> Result<Vec<Failure>, StoreError> {
    let names: Vec<String> = match source {
        Some(name) => vec![name.to_string()],
        None => config.sources.iter().map(|s| s.name.clone()).collect(),
    };
    match Store::open_read_only(&config.daemon.state_path)? {
        Some(store) => store.failures(Some(&names)),
        None => Ok(Vec::new()),
    }
}

/// `failures` as text: one line per record and the fix on the next.
pub fn render_failures(failures: &[Failure]) -> String {
    if failures.is_empty() {
        return "No failures: every record was sent or is on its way.\n".to_string();
    }
    let mut out = String::new();
    for failure in failures {
        let kind = match failure.kind {
            FailureKind::Rejected => "rejected",
            FailureKind::DeadLetter => "dead letter",
        };
        let status = failure
            .http_status
            .filter(|s| *s != 200)
            .map(|s| format!(" (HTTP {s})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} {}  {kind}  {}{status}: {}",
            failure.source,
            escape(&failure.external_id),
            escape(&failure.code),
            escape(&failure.reason)
        );
        if let Some(fields) = failure.field_errors.as_ref().and_then(|f| f.as_object()) {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}: {}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )
                })
                .collect();
            let _ = writeln!(out, "    fields: {}", escape(&fields.join("; ")));
        }
        let attempts = if failure.attempts > 0 {
            format!("attempts {}, ", failure.attempts)
        } else {
            String::new()
        };
        let revkeen = failure
            .revkeen_id
            .as_deref()
            .map(|id| format!(", RevKeen customer {}", escape(id)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    {attempts}first seen {}, last seen {}{revkeen}",
            short_time(&rfc3339(failure.first_seen)),
            short_time(&rfc3339(failure.last_seen))
        );
        if let Some(hint) = &failure.hint {
            let _ = writeln!(out, "    fix: {}", escape(hint));
        }
    }
    let rejected = failures
        .iter()
        .filter(|f| f.kind == FailureKind::Rejected)
        .count();
    let _ = writeln!(
        out,
        "{} failures: {} rejected before sending, {} dead letters.",
        failures.len(),
        rejected,
        failures.len() - rejected
    );
    out
}

/// Why `replay` did not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "sending to RevKeen is halted ({0}): fix that first (`sync-daemon check-config --connect` tells when it works), then run sync-daemon once so the halt clears, and replay: replayed records would only fail again"
    )]
    AuthHalted(String),
    #[error(
        "there is no state file at {0}, so nothing was ever dead-lettered there: check daemon.state_path (or --config)"
    )]
    NoState(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `replay`: puts dead letters back in the outbox with their stored bodies.
pub fn replay(
    config: &Config,
    source: Option<&str>,
    ids: Option<&[String]>,
) -> Result<crate::store::ReplayOutcome, ReplayError> {
    let path = &config.daemon.state_path;
    if !path.exists() {
        return Err(ReplayError::NoState(path.display().to_string()));
    }
    let store = Store::open_shared(path)?;
    if let Some(halt) = store.halts()?.into_iter().find(|h| h.target == REVKEEN) {
        return Err(ReplayError::AuthHalted(halt.message));
    }
    let names: Vec<String> = match source {
        Some(name) => vec![name.to_string()],
        None => config.sources.iter().map(|s| s.name.clone()).collect(),
    };
    Ok(store.replay(&names, ids)?)
}

/// One API's answer to `check-config --connect`.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    /// `revkeen` or a source name.
    pub target: String,
    pub url: String,
    /// `ok`, `key_refused`, `unreachable`, `tls_error`, `unexpected`.
    pub outcome: &'static str,
    pub detail: String,
    pub hint: String,
    /// What the check found worth knowing besides the outcome: for RevKeen, its own hosted
    /// sync active for a provider this config syncs too.
    pub warnings: Vec<String>,
}

/// Makes one authenticated read per API.
pub async fn connect(config: &Config) -> Vec<Connection> {
    let mut checks = Vec::new();
    let (revkeen, warnings) = match RevKeenClient::new(&config.revkeen) {
        Ok(client) => {
            let probe = client.probe().await;
            let warnings = if matches!(probe, Probe::Ok) {
                crate::hosted::check(&client, &config.sources)
                    .await
                    .into_iter()
                    .filter_map(|finding| finding.warning)
                    .collect()
            } else {
                Vec::new()
            };
            (probe, warnings)
        }
        Err(error) => (Probe::Unexpected(error.to_string()), Vec::new()),
    };
    let mut check = connection(
        "revkeen",
        config.revkeen.base_url.as_str(),
        revkeen,
        "revkeen.api_key / api_key_file (a sandbox key works only against staging)",
    );
    check.warnings = warnings;
    checks.push(check);
    for source in &config.sources {
        let (probe, notes) = match sources::build(source) {
            Ok(adapter) => adapter.probe_details().await,
            Err(error) => (Probe::Unexpected(error.to_string()), Vec::new()),
        };
        let mut check = connection(
            &source.name,
            source.base_url.as_str(),
            probe,
            &source_key_hint(source),
        );
        // What the source's answer showed (PracticeHub: the naming it uses), on an ok line.
        if check.outcome == "ok" && !notes.is_empty() {
            check.detail = crate::secret::redact(&notes.join("; "));
        }
        checks.push(check);
    }
    checks
}

fn source_key_hint(source: &SourceConfig) -> String {
    format!("the api_key / api_key_file of source {:?}", source.name)
}

fn connection(target: &str, url: &str, probe: Probe, key_hint: &str) -> Connection {
    let (outcome, detail, hint) = match probe {
        Probe::Ok => ("ok", String::new(), String::new()),
        Probe::KeyRefused(detail) => ("key_refused", detail, format!("check {key_hint}")),
        Probe::Unreachable(detail) => (
            "unreachable",
            detail,
            "check base_url, DNS, and that outbound HTTPS is allowed from this host".to_string(),
        ),
        Probe::Tls(detail) => (
            "tls_error",
            detail,
            "the server's certificate was not accepted: check base_url and any TLS-intercepting proxy".to_string(),
        ),
        Probe::Unexpected(detail) => (
            "unexpected",
            detail,
            "the API answered but not as expected: check base_url".to_string(),
        ),
    };
    Connection {
        target: target.to_string(),
        url: url.to_string(),
        outcome,
        detail,
        hint,
        warnings: Vec::new(),
    }
}

/// The exit status for a set of connection checks: 77 if any key was refused, else 69 if any
/// API could not be reached, else 0.
pub fn connect_status(checks: &[Connection]) -> ExitStatus {
    if checks.iter().any(|c| c.outcome == "key_refused") {
        ExitStatus::AuthRefused
    } else if checks.iter().any(|c| c.outcome != "ok") {
        ExitStatus::Unavailable
    } else {
        ExitStatus::Ok
    }
}
