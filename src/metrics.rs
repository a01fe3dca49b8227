//! Every metric the daemon exports, in one place: its name, type, unit and HELP text
//! ([`FAMILIES`]), the recorder that renders them on `/metrics` ([`install`]), and the label
//! sets known at start, registered at zero ([`register_known`]).
//!
//! Why zeros: a series that first appears with its first event cannot be alerted on with
//! `increase()` or `rate()` (there is no earlier sample), and an absent series looks the same
//! as a daemon that never exported it. So everything whose labels follow from the config (the
//! source names, RevKeen, the push feeds, the poll outcomes) exists from the first scrape.
//! Labels that only the wire decides (an HTTP status from an upstream, a normalization
//! warning) appear with their first event. The process metrics (`process_*`, the names every
//! Prometheus client library uses) come from the `metrics-process` crate, collected on each
//! scrape ([`collect_on_scrape`]).
//!
//! Emitting code names a family through the constants here, so a name without HELP text
//! cannot be exported by a typo. This module is a leaf (every layer records metrics): the
//! daemon tells it which sources exist.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The `target` of RevKeen in `auth_halted` and `rate_limited_total` (and of its halt in the
/// state file); a source's target is its configured name.
pub const REVKEEN: &str = "revkeen";

pub const FETCHED: &str = "sync_daemon_fetched_total";
pub const ENQUEUED: &str = "sync_daemon_enqueued_total";
pub const UNCHANGED: &str = "sync_daemon_unchanged_total";
pub const REJECTED: &str = "sync_daemon_rejected_total";
pub const SKIPPED: &str = "sync_daemon_skipped_total";
pub const NORMALIZATION_WARNINGS: &str = "sync_daemon_normalization_warnings_total";
pub const UPSERTS: &str = "sync_daemon_upserts_total";
pub const HTTP_REQUESTS: &str = "sync_daemon_http_requests_total";
pub const REQUEST_DURATION: &str = "sync_daemon_request_duration_seconds";
pub const RATE_LIMITED: &str = "sync_daemon_rate_limited_total";
pub const POLLS: &str = "sync_daemon_polls_total";
pub const LAST_SUCCESSFUL_POLL: &str = "sync_daemon_last_successful_poll_timestamp_seconds";
pub const QUEUE_DEPTH: &str = "sync_daemon_queue_depth";
pub const OLDEST_PENDING_AGE: &str = "sync_daemon_oldest_pending_age_seconds";
pub const DEAD_LETTERS: &str = "sync_daemon_dead_letters";
pub const REJECTED_RECORDS: &str = "sync_daemon_rejected_records";
pub const LAST_SUCCESS: &str = "sync_daemon_last_success_timestamp_seconds";
pub const AUTH_HALTED: &str = "sync_daemon_auth_halted";
pub const PUSH_EVENTS: &str = "sync_daemon_push_events_total";
pub const PUSH_REFUSED: &str = "sync_daemon_push_refused_total";
pub const PUSH_PENDING: &str = "sync_daemon_push_pending";
pub const SCHEDULER_OVERDUE: &str = "sync_daemon_scheduler_overdue_total";
pub const VANISHED_RECORDS: &str = "sync_daemon_vanished_records";
pub const FILTER_IGNORED: &str = "sync_daemon_filter_ignored_total";
pub const REQUESTS_THIS_MONTH: &str = "sync_daemon_source_requests_month";
pub const MONTHLY_REQUEST_BUDGET: &str = "sync_daemon_source_request_budget";
pub const BUILD_INFO: &str = "sync_daemon_build_info";

/// `outcome` of `sync_daemon_polls_total`: the poll read the source's whole listing.
pub const POLL_OK: &str = "ok";
/// The source stayed unavailable through every retry (5xx, timeouts, 429s, dropped
/// connections), or answered with a redirect or an untrusted certificate: the exit-69 kind.
pub const POLL_UNAVAILABLE: &str = "unavailable";
/// The source refused its API key (an auth halt for the source).
pub const POLL_AUTH_REFUSED: &str = "auth_refused";
/// An answer no retry changes (a 404 listing, a bad request, a listing that does not advance)
/// or a state file that could not be written.
pub const POLL_FAILED: &str = "failed";
/// Every poll outcome, registered at zero per source. A poll stopped by a shutdown is not
/// counted.
pub const POLL_OUTCOMES: [&str; 4] = [POLL_OK, POLL_UNAVAILABLE, POLL_AUTH_REFUSED, POLL_FAILED];

/// `outcome` of `sync_daemon_upserts_total`.
pub const UPSERT_OUTCOMES: [&str; 4] = ["created", "updated", "stale", "dead_lettered"];

/// Every status the push feed refuses a request with (`server.rs`): a malformed body or
/// signature header, a bad signature, no such feed, too large, a full backlog or an
/// unavailable state file.
pub const PUSH_REFUSED_STATUSES: [u16; 5] = [400, 401, 404, 413, 503];

/// The buckets of [`REQUEST_DURATION`], seconds: 5 ms to 30 s (the default request timeout).
pub const REQUEST_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// What kind of series a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// One exported family: what `# HELP` and `# TYPE` say about it.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Type,
    pub unit: Unit,
    /// Its labels, for the README's table.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    kind: Type,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        unit,
        labels,
        help,
    }
}

use Type::{Counter, Gauge, Histogram};

/// Every `sync_daemon_*` family (the `process_*` ones are described by `metrics-process`).
pub const FAMILIES: &[Family] = &[
    family(
        FETCHED,
        Counter,
        Unit::Count,
        &["source"],
        "Records read from the source's listing by polls.",
    ),
    family(
        ENQUEUED,
        Counter,
        Unit::Count,
        &["source"],
        "Records queued for RevKeen because their body changed.",
    ),
    family(
        UNCHANGED,
        Counter,
        Unit::Count,
        &["source"],
        "Records skipped because their body is the one last queued for RevKeen (nothing to send).",
    ),
    family(
        REJECTED,
        Counter,
        Unit::Count,
        &["source"],
        "Records that cannot be sent (no valid email, unreadable), each time a poll reads one.",
    ),
    family(
        SKIPPED,
        Counter,
        Unit::Count,
        &["source"],
        "Deleted source records skipped because RevKeen never had them.",
    ),
    family(
        NORMALIZATION_WARNINGS,
        Counter,
        Unit::Count,
        &["source", "warning"],
        "Fields left out or cut while normalizing a record, by warning (phone_unparseable, country_unrecognised, text_truncated, tags_truncated).",
    ),
    family(
        UPSERTS,
        Counter,
        Unit::Count,
        &["source", "outcome"],
        "Customers RevKeen gave a final answer for, by outcome: created, updated, stale (RevKeen holds a newer version), dead_lettered.",
    ),
    family(
        HTTP_REQUESTS,
        Counter,
        Unit::Count,
        &["target", "endpoint", "status"],
        "Requests to RevKeen and the sources, by target (revkeen, wodify, practicehub), endpoint and HTTP status (error: no answer).",
    ),
    family(
        REQUEST_DURATION,
        Histogram,
        Unit::Seconds,
        &["target"],
        "Duration of requests to RevKeen and the sources, answer body included, by target.",
    ),
    family(
        RATE_LIMITED,
        Counter,
        Unit::Count,
        &["target"],
        "Pauses of every request to a host after a 429, by target: revkeen or the source's name.",
    ),
    family(
        POLLS,
        Counter,
        Unit::Count,
        &["source", "outcome"],
        "Finished polls of a source, by outcome: ok, unavailable (retries exhausted, redirected, untrusted certificate), auth_refused, failed.",
    ),
    family(
        LAST_SUCCESSFUL_POLL,
        Gauge,
        Unit::Seconds,
        &["source"],
        "Unix time the last poll that read the source's whole listing finished, whether or not it found changes (from the state file at start).",
    ),
    family(
        QUEUE_DEPTH,
        Gauge,
        Unit::Count,
        &["source"],
        "Jobs waiting for a final answer from RevKeen.",
    ),
    family(
        OLDEST_PENDING_AGE,
        Gauge,
        Unit::Seconds,
        &["source"],
        "Age of the oldest job waiting for a final answer from RevKeen (0 when none waits).",
    ),
    family(
        DEAD_LETTERS,
        Gauge,
        Unit::Count,
        &["source"],
        "Open dead letters: customers RevKeen refused or whose retries ran out (sync-daemon failures).",
    ),
    family(
        REJECTED_RECORDS,
        Gauge,
        Unit::Count,
        &["source"],
        "Open rejections: source records that cannot be sent (sync-daemon failures).",
    ),
    family(
        LAST_SUCCESS,
        Gauge,
        Unit::Seconds,
        &["source"],
        "Unix time of the last upsert RevKeen accepted for the source in this process.",
    ),
    family(
        AUTH_HALTED,
        Gauge,
        Unit::Count,
        &["target"],
        "1 while the target (revkeen or a source's name) refuses its API key, else 0; as /readyz and sync-daemon status report it.",
    ),
    family(
        PUSH_EVENTS,
        Counter,
        Unit::Count,
        &["source"],
        "Push events accepted and committed on the source's push feed.",
    ),
    family(
        PUSH_REFUSED,
        Counter,
        Unit::Count,
        &["status"],
        "Push requests refused, by the HTTP status answered.",
    ),
    family(
        PUSH_PENDING,
        Gauge,
        Unit::Count,
        &["source"],
        "Push events accepted and waiting to be fetched from the source.",
    ),
    family(
        SCHEDULER_OVERDUE,
        Counter,
        Unit::Count,
        &["source"],
        "Polls the watchdog started because the cron scheduler missed one by more than an interval.",
    ),
    family(
        VANISHED_RECORDS,
        Gauge,
        Unit::Count,
        &["source"],
        "Records the previous complete Wodify scan listed and the last one did not (kept in RevKeen).",
    ),
    family(
        FILTER_IGNORED,
        Counter,
        Unit::Count,
        &["source"],
        "PracticeHub polls that read the whole patient list because the updated filter was ignored.",
    ),
    family(
        REQUESTS_THIS_MONTH,
        Gauge,
        Unit::Count,
        &["source"],
        "Requests sent to the source this calendar month (UTC), as counted against its monthly_request_budget (sources with a budget only).",
    ),
    family(
        MONTHLY_REQUEST_BUDGET,
        Gauge,
        Unit::Count,
        &["source"],
        "The source's monthly_request_budget: requests it may be sent in a calendar month (sources with a budget only).",
    ),
    family(
        BUILD_INFO,
        Gauge,
        Unit::Count,
        &["version", "commit"],
        "Always 1: the version and git commit of the running sync-daemon.",
    ),
];

/// The process-wide Prometheus recorder, installed once with every family described; later
/// calls return the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(REQUEST_DURATION.to_string()),
                    &REQUEST_DURATION_BUCKETS,
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// HELP text and units for every family, ours and the process collector's.
fn describe() {
    for family in FAMILIES {
        match family.kind {
            Counter => describe_counter!(family.name, family.unit, family.help),
            Gauge => describe_gauge!(family.name, family.unit, family.help),
            Histogram => describe_histogram!(family.name, family.unit, family.help),
        }
    }
    process().describe();
}

fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process figures (CPU, memory, descriptors, threads) for the scrape being
/// answered.
pub fn collect_on_scrape() {
    process().collect();
}

/// A configured source, as far as its metrics go.
#[derive(Debug, Clone, Copy)]
pub struct KnownSource<'a> {
    pub name: &'a str,
    /// Whether it has a push feed (a `push_secret`).
    pub push_feed: bool,
}

/// Registers at zero every label set the configured `sources` make known, and sets
/// `build_info`.
pub fn register_known(sources: &[KnownSource<'_>]) {
    metrics::gauge!(BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("SYNC_DAEMON_GIT_COMMIT"))
    .set(1.0);
    for target in std::iter::once(REVKEEN).chain(sources.iter().map(|s| s.name)) {
        metrics::gauge!(AUTH_HALTED, "target" => target.to_string()).set(0.0);
        metrics::counter!(RATE_LIMITED, "target" => target.to_string()).increment(0);
    }
    for source in sources {
        let name = source.name.to_string();
        for counter in [
            FETCHED,
            ENQUEUED,
            UNCHANGED,
            REJECTED,
            SKIPPED,
            SCHEDULER_OVERDUE,
        ] {
            metrics::counter!(counter, "source" => name.clone()).increment(0);
        }
        for outcome in UPSERT_OUTCOMES {
            metrics::counter!(UPSERTS, "source" => name.clone(), "outcome" => outcome).increment(0);
        }
        for outcome in POLL_OUTCOMES {
            metrics::counter!(POLLS, "source" => name.clone(), "outcome" => outcome).increment(0);
        }
        for gauge in [
            QUEUE_DEPTH,
            OLDEST_PENDING_AGE,
            DEAD_LETTERS,
            REJECTED_RECORDS,
        ] {
            metrics::gauge!(gauge, "source" => name.clone()).set(0.0);
        }
        if source.push_feed {
            metrics::counter!(PUSH_EVENTS, "source" => name.clone()).increment(0);
            metrics::gauge!(PUSH_PENDING, "source" => name.clone()).set(0.0);
        }
    }
    if sources.iter().any(|s| s.push_feed) {
        for status in PUSH_REFUSED_STATUSES {
            metrics::counter!(PUSH_REFUSED, "status" => status.to_string()).increment(0);
        }
    }
}

/// Records that a poll of `source` read its whole listing at `unix_ms`.
pub fn poll_succeeded_at(source: &str, unix_ms: i64) {
    metrics::gauge!(LAST_SUCCESSFUL_POLL, "source" => source.to_string())
        .set(unix_ms as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `promtool check metrics` lints by name, checked without the tool: counters end in
    /// `_total`, nothing else does, names are snake_case and every family is unique.
    #[test]
    fn every_family_is_named_as_prometheus_expects() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        for family in FAMILIES {
            assert!(family.name.starts_with("sync_daemon_"), "{}", family.name);
            assert!(
                family
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                family.name
            );
            assert_eq!(
                family.name.ends_with("_total"),
                family.kind == Counter,
                "{}: counters and only counters end in _total",
                family.name
            );
            if family.unit == Unit::Seconds {
                assert!(
                    family.name.ends_with("_seconds"),
                    "{}: a unit of seconds is in the name",
                    family.name
                );
            }
            assert!(
                family.help.ends_with('.') && !family.help.contains('\n'),
                "{}",
                family.name
            );
        }
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a family is listed twice");
    }

    /// The README's metric table names every family with the labels it is exported with.
    #[test]
    fn the_readme_documents_every_family_with_its_labels() {
        let readme = include_str!("../README.md");
        for family in FAMILIES {
            let written = format!("`{}{{{}}}`", family.name, family.labels.join(","));
            assert!(readme.contains(&written), "the README lacks {written}");
        }
    }
}
