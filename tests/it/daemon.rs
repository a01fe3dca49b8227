//! Daemon mode (`sync-daemon --config PATH` without `--once`), run as a process against the
//! simulators, as systemd or a container runtime would run it:
//! - with a per-second schedule, a changed source record is queued by one of the next two polls
//!   and reaches RevKeen, and a poll that outlasts the schedule never overlaps itself;
//! - `/healthz`, `/readyz` and `/metrics` answer what an operator needs: readiness fails with a
//!   JSON reason while RevKeen refuses the key (polling and queueing go on) and recovers after
//!   the key is fixed and the daemon restarted, with nothing lost; the metrics agree with what
//!   the simulators saw;
//! - SIGTERM in the middle of a burst of sends exits 0, stops claiming work, lets the requests in
//!   flight finish, nothing is lost and RevKeen never sees an idempotency conflict; requests
//!   slower than `drain_timeout_secs`, or a slow source page, are still unanswered when it
//!   exits; a second signal exits at once, without waiting for the requests or the drain;
//! - systemd's notify protocol: `READY=1` once the listener is bound, `WATCHDOG=1` only when
//!   `WATCHDOG_USEC` asks for it (and they keep coming while upstreams answer slowly),
//!   `STATUS=`, and `STOPPING=1`;
//! - a second process on the same state file is refused while the daemon carries on; a listen
//!   address in use is a configuration error (78);
//! - a config made of `SYNC_DAEMON__…` variables alone runs `--once` and the daemon, and such a
//!   variable overrides a file value;
//! - `sync-daemon healthcheck` exits 0 against a running daemon and 1 when none listens;
//! - logs: flat JSON lines with `log_format = "json"` (a bridged `log` record too), syslog
//!   priorities and no timestamps under journald (only when `JOURNAL_STREAM` is our stderr),
//!   and the level from `log_level` unless `RUST_LOG` says otherwise.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sync_daemon_sim::revkeen::{Rejection, RevKeenStats};
use sync_daemon_sim::{Faults, PRACTICEHUB_KEY, REVKEEN_KEY, WODIFY_KEY};

use crate::support::{
    DaemonProcess, Harness, Output, assert_no_secrets, assert_revkeen_holds, exit,
    expected_practicehub, expected_wodify, free_listen_addr, invalid_wodify, names_source,
    polls_finished, rename_client, replaced, run_command, seed_valid_clients, wait_for_name,
    wait_until, with_daemon, with_revkeen, yearly_schedules,
};

const EVERY_SECOND: &str = "* * * * * *";

/// `toml` with every source polling on `schedule`.
fn scheduled(toml: &str, schedule: &str) -> String {
    let mut toml = toml.to_string();
    for default in ["0 */15 * * * *", "0 */5 * * * *"] {
        toml = toml.replace(
            &format!("schedule = \"{default}\""),
            &format!("schedule = \"{schedule}\""),
        );
    }
    toml
}

/// Renames a delivered Wodify client at the source and waits until RevKeen holds the new name.
async fn assert_a_change_reaches_revkeen(h: &Harness, last_name: &str) {
    let id = expected_wodify(&h.sims.wodify)
        .into_keys()
        .next()
        .expect("client");
    let numeric: i64 = id.parse().expect("id");
    rename_client(&h.sims.wodify, numeric, last_name);
    wait_for_name(h, "wodify", numeric, last_name, Duration::from_secs(10)).await;
}

fn delivered(h: &Harness, source: &str) -> usize {
    h.sims.revkeen.customers(source).len()
}

// ---------------------------------------------------------------------------------------------
// Scheduling.

/// The `enqueued=` count of every finished poll of `source` in a daemon log, in order.
fn enqueued_per_poll(log: &str, source: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("Poll finished.") && names_source(line, source))
        .map(|line| {
            let (_, rest) = line
                .split_once("enqueued=")
                .or_else(|| line.split_once("\"enqueued\":"))
                .unwrap_or_else(|| panic!("no enqueued count in {line:?}"));
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().expect("an enqueued count")
        })
        .collect()
}

/// Waits until `source` has finished two more polls than the `before` it had when a record
/// changed, and asserts one of those two queued it: the poll under way at the change or the
/// next one, started after it.
async fn assert_queued_by_the_next_two_polls(
    daemon: &DaemonProcess,
    source: &str,
    before: usize,
    what: &str,
) {
    daemon.wait_polls(source, before + 2).await;
    let enqueued = enqueued_per_poll(&daemon.log(), source);
    assert!(
        enqueued[before..before + 2].iter().any(|n| *n > 0),
        "{what}: neither of the two polls of {source} after the change queued it; enqueued per \
         poll since the change: {:?}\n{}",
        &enqueued[before..],
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_record_is_queued_by_one_of_the_next_two_polls_and_reaches_revkeen() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 40, 21);
    h.sims.practicehub.seed(30, 21);
    let daemon = h
        .start_daemon(&scheduled(&h.base_config(), EVERY_SECOND))
        .await;
    let wodify = expected_wodify(&h.sims.wodify);
    let practicehub = expected_practicehub(&h.sims.practicehub);
    wait_until("the backfill at start", Duration::from_secs(20), || {
        delivered(&h, "wodify") == wodify.len() && delivered(&h, "practicehub") == practicehub.len()
    })
    .await;

    let client: i64 = wodify.keys().nth(3).expect("a client").parse().expect("id");
    let patient: i64 = practicehub
        .keys()
        .nth(3)
        .expect("a patient")
        .parse()
        .expect("id");
    for round in 0..3 {
        let last = format!("Moved{round}");
        let before = polls_finished(&daemon.log(), "gym");
        rename_client(&h.sims.wodify, client, &last);
        wait_for_name(&h, "wodify", client, &last, Duration::from_secs(30)).await;
        let what = format!("round {round}, a Wodify change");
        assert_queued_by_the_next_two_polls(&daemon, "gym", before, &what).await;

        let before = polls_finished(&daemon.log(), "clinic");
        assert!(
            h.sims
                .practicehub
                .update_patient(patient, json!({"last_name": last}))
        );
        wait_for_name(&h, "practicehub", patient, &last, Duration::from_secs(30)).await;
        let what = format!("round {round}, a PracticeHub change");
        assert_queued_by_the_next_two_polls(&daemon, "clinic", before, &what).await;
    }
    daemon.stop().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_never_overlaps_itself_when_it_outlasts_the_schedule() {
    let h = Harness::start().await;
    // Three pages of 700 ms each: every poll takes longer than the one-second schedule.
    seed_valid_clients(&h.sims.wodify, 250, 35);
    h.sims.wodify.set_faults(Faults {
        latency_ms: 700,
        ..Faults::default()
    });
    let daemon = h
        .start_daemon(&scheduled(&h.config_for("gym"), EVERY_SECOND))
        .await;
    let wodify = h.sims.wodify.clone();
    wait_until("a few polls", Duration::from_secs(30), || {
        wodify.stats().requests >= 10
    })
    .await;
    daemon.stop().await.assert_exit(exit::OK);
    let arrivals: Vec<u64> = h.sims.wodify.requests().iter().map(|r| r.at_ms).collect();
    let closest = arrivals
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .min()
        .expect("several requests");
    assert!(
        closest >= 650,
        "two Wodify requests arrived {closest} ms apart although each takes 700 ms: polls of \
         one source overlapped (arrivals {arrivals:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Health, readiness, metrics.

const WRONG_REVKEEN_KEY: &str = "rk_live_revoked_0a1b2c3d4e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_during_an_auth_halt_polling_goes_on_and_a_fixed_key_loses_nothing() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 30, 22);
    let good = scheduled(&h.config_for("gym"), EVERY_SECOND);

    // Healthy: alive and ready.
    let daemon = h.start_daemon(&good).await;
    wait_until("the backfill", Duration::from_secs(20), || {
        delivered(&h, "wodify") == 30
    })
    .await;
    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "/healthz: {body}");
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200, "/readyz with a good key: {body}");
    daemon.stop().await.assert_exit(exit::OK);

    // The key is wrong: the first send is refused, readiness fails with a reason.
    let ids: Vec<i64> = expected_wodify(&h.sims.wodify)
        .keys()
        .map(|id| id.parse().expect("id"))
        .collect();
    for id in &ids[..5] {
        rename_client(&h.sims.wodify, *id, "Halted");
    }
    let wrong = replaced(
        &good,
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
    );
    let daemon = h.start_daemon(&wrong).await;
    let d = &daemon;
    d.wait_until(
        "/readyz to answer 503",
        Duration::from_secs(15),
        || async move { d.get("/readyz").await.0 == 503 },
    )
    .await;
    assert!(h.sims.revkeen.stats().auth_failures >= 1);
    let (_, body) = daemon.get("/readyz").await;
    let reason: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/readyz 503 body is not JSON ({e}): {body}"));
    let text = reason["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        text.starts_with("halted: revkeen") && text.contains("refused the api key"),
        "/readyz should say RevKeen refused the key: {body}"
    );
    assert!(!body.contains(WRONG_REVKEEN_KEY), "{body}");
    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(
        status, 200,
        "an auth halt is not a wedged daemon: /healthz must stay 200 (a liveness probe would \
         restart-loop it): {body}"
    );
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_auth_halted", &[("target", "revkeen")]),
        1.0,
        "{}",
        metrics.text
    );

    // Polling and queueing go on; sending does not.
    let revkeen_requests = h.sims.revkeen.stats().requests;
    let wodify_requests = h.sims.wodify.stats().requests;
    for id in &ids[5..8] {
        rename_client(&h.sims.wodify, *id, "HaltedLater");
    }
    d.wait_until(
        "the changes made during the halt to be queued",
        Duration::from_secs(15),
        || async move {
            d.metrics()
                .await
                .sum("sync_daemon_queue_depth", &[("source", "gym")])
                == 8.0
        },
    )
    .await;
    let wodify = h.sims.wodify.clone();
    wait_until(
        "more Wodify polls during the halt",
        Duration::from_secs(10),
        || wodify.stats().requests >= wodify_requests + 3,
    )
    .await;
    assert_eq!(
        h.sims.revkeen.stats().requests,
        revkeen_requests,
        "nothing may be sent with a refused key"
    );
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);

    // Fixed key and a restart: ready again, and every change is delivered.
    let daemon = h.start_daemon(&good).await;
    let d = &daemon;
    d.wait_until(
        "/readyz to answer 200 after the fix",
        Duration::from_secs(15),
        || async move { d.get("/readyz").await.0 == 200 },
    )
    .await;
    let expected = expected_wodify(&h.sims.wodify);
    let revkeen = h.sims.revkeen.clone();
    wait_until("every change delivered", Duration::from_secs(15), || {
        crate::support::at_revkeen(&revkeen, "wodify") == expected
    })
    .await;
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_auth_halted", &[("target", "revkeen")]),
        0.0
    );
    daemon.stop().await.assert_exit(exit::OK);
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_source_refuses_its_key_and_recovers_when_it_accepts_it() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 36);
    let daemon = h
        .start_daemon(&scheduled(&h.config_for("gym"), EVERY_SECOND))
        .await;
    let d = &daemon;
    d.wait_until("/readyz 200", Duration::from_secs(10), || async move {
        d.get("/readyz").await.0 == 200
    })
    .await;

    // Wodify starts refusing the key (rotated on their side).
    h.sims.wodify.set_api_key("wodify_rotated_key");
    d.wait_until(
        "/readyz to answer 503",
        Duration::from_secs(10),
        || async move { d.get("/readyz").await.0 == 503 },
    )
    .await;
    let (_, body) = daemon.get("/readyz").await;
    assert!(
        body.contains("gym"),
        "/readyz should name the source whose key is refused: {body}"
    );
    assert_eq!(daemon.get("/healthz").await.0, 200);

    // Accepted again: the next poll clears the halt, no restart needed.
    h.sims.wodify.set_api_key(WODIFY_KEY);
    d.wait_until(
        "/readyz back to 200",
        Duration::from_secs(10),
        || async move { d.get("/readyz").await.0 == 200 },
    )
    .await;
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_match_what_the_simulators_saw() {
    let h = Harness::start().await;
    h.sims.wodify.seed(150, 23);
    h.sims.practicehub.seed(40, 23);
    let invalid_clients = invalid_wodify(&h.sims.wodify).len();
    assert!(
        invalid_clients > 0,
        "the seed should include invalid emails"
    );
    let wodify = expected_wodify(&h.sims.wodify);
    let practicehub = expected_practicehub(&h.sims.practicehub);
    let refused = wodify.keys().next().expect("a client").clone();
    h.sims.revkeen.set_rejections(vec![Rejection {
        external_id: Some(refused.clone()),
        email: None,
        status: 422,
        code: "customer_blocked".into(),
        message: "this customer is blocked".into(),
        field: None,
    }]);
    let toml = with_revkeen(&yearly_schedules(&h.base_config()), "batch_size = 10");
    let daemon = h.start_daemon(&toml).await;
    let d = &daemon;
    let (want_wodify, want_practicehub) = (wodify.len() - 1, practicehub.len());
    d.wait_until(
        "everything delivered and acknowledged",
        Duration::from_secs(30),
        || {
            let h = &h;
            async move {
                let m = d.metrics().await;
                delivered(h, "wodify") == want_wodify
                    && delivered(h, "practicehub") == want_practicehub
                    && m.has("sync_daemon_queue_depth", &[])
                    && m.sum("sync_daemon_queue_depth", &[]) == 0.0
                    && m.sum("sync_daemon_dead_letters", &[("source", "gym")]) == 1.0
            }
        },
    )
    .await;

    let m = daemon.metrics().await;
    let revkeen = h.sims.revkeen.stats();
    let context = format!("{revkeen:?}\n{}", m.text);
    assert_eq!(
        m.sum("sync_daemon_upserts_total", &[("outcome", "created")]),
        revkeen.created as f64,
        "upserts created vs RevKeen's created\n{context}"
    );
    assert_eq!(revkeen.created as usize, want_wodify + want_practicehub);
    assert_eq!(
        m.sum(
            "sync_daemon_upserts_total",
            &[("source", "gym"), ("outcome", "dead_lettered")]
        ),
        1.0,
        "{context}"
    );
    assert_eq!(
        m.sum("sync_daemon_fetched_total", &[("source", "gym")]),
        h.sims.wodify.clients().len() as f64,
        "every Wodify client listed once\n{context}"
    );
    assert_eq!(
        m.sum("sync_daemon_fetched_total", &[("source", "clinic")]),
        h.sims.practicehub.patients().len() as f64,
        "every PracticeHub patient listed once\n{context}"
    );
    assert_eq!(
        m.sum("sync_daemon_http_requests_total", &[("target", "revkeen")]),
        // The customer API's requests and the read of RevKeen's own hosted syncs at start.
        (revkeen.requests + revkeen.integration_reads) as f64,
        "requests to RevKeen vs what RevKeen counted\n{context}"
    );
    assert_eq!(
        m.sum("sync_daemon_http_requests_total", &[("target", "wodify")]),
        h.sims.wodify.stats().requests as f64,
        "{context}"
    );
    assert_eq!(
        m.sum(
            "sync_daemon_http_requests_total",
            &[("target", "practicehub")]
        ),
        h.sims.practicehub.stats().requests as f64,
        "{context}"
    );

    // The latency histogram has explicit buckets, cumulative up to +Inf = count.
    assert!(
        m.text
            .contains("# TYPE sync_daemon_request_duration_seconds histogram"),
        "{context}"
    );
    let buckets: Vec<(f64, f64)> = m
        .matching(
            "sync_daemon_request_duration_seconds_bucket",
            &[("target", "revkeen")],
        )
        .map(|s| {
            let le = match s.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                le => le.parse().expect("numeric le"),
            };
            (le, s.value)
        })
        .collect();
    assert!(
        buckets.len() >= 6 && buckets.iter().any(|(le, _)| le.is_infinite()),
        "the RevKeen latency histogram should have explicit buckets and +Inf: {buckets:?}"
    );
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "buckets ascend and are cumulative: {buckets:?}"
    );
    let count = m.sum(
        "sync_daemon_request_duration_seconds_count",
        &[("target", "revkeen")],
    );
    assert_eq!(
        count,
        (revkeen.requests + revkeen.integration_reads) as f64,
        "{context}"
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(count));

    // Gauges: queue depth, oldest pending age, open failures, per source.
    for source in ["gym", "clinic"] {
        for gauge in [
            "sync_daemon_queue_depth",
            "sync_daemon_oldest_pending_age_seconds",
            "sync_daemon_dead_letters",
            "sync_daemon_rejected_records",
        ] {
            assert!(
                m.has(gauge, &[("source", source)]),
                "{gauge}{{source={source:?}}} missing\n{context}"
            );
        }
    }
    assert_eq!(
        m.sum("sync_daemon_rejected_records", &[("source", "gym")]),
        invalid_clients as f64,
        "clients without a valid email are open rejections\n{context}"
    );
    assert!(m.has(
        "sync_daemon_last_success_timestamp_seconds",
        &[("source", "gym")]
    ));
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_metric_is_explained_in_the_readme() {
    let h = Harness::start().await;
    h.sims.wodify.seed(60, 40);
    h.sims.practicehub.seed(20, 40);
    let daemon = h.start_daemon(&yearly_schedules(&h.base_config())).await;
    let d = &daemon;
    d.wait_until(
        "a scrape after the first polls",
        Duration::from_secs(20),
        || async move {
            let m = d.metrics().await;
            m.has("sync_daemon_fetched_total", &[("source", "gym")])
                && m.has("sync_daemon_fetched_total", &[("source", "clinic")])
                && m.has("sync_daemon_upserts_total", &[])
        },
    )
    .await;
    let metrics = daemon.metrics().await;
    daemon.stop().await.assert_exit(exit::OK);
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut families: Vec<&str> = metrics
        .samples
        .iter()
        .map(|s| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| s.name.strip_suffix(suffix))
                .filter(|base| metrics.text.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(&s.name)
        })
        .collect();
    families.sort_unstable();
    families.dedup();
    let undocumented: Vec<&&str> = families
        .iter()
        .filter(|name| !readme.contains(&format!("`{name}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics the README does not explain: {undocumented:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown.

/// A gym config with `batch_size` and `drain_timeout_secs`, polling only at start.
fn burst_config(h: &Harness, batch_size: usize, drain_secs: u64) -> String {
    let toml = with_revkeen(
        &yearly_schedules(&h.config_for("gym")),
        &format!("batch_size = {batch_size}"),
    );
    with_daemon(&toml, &format!("drain_timeout_secs = {drain_secs}"))
}

/// RevKeen requests that have arrived and not been answered yet.
fn unanswered(h: &Harness) -> usize {
    h.sims
        .revkeen
        .requests()
        .iter()
        .filter(|r| r.status == 0)
        .count()
}

fn slow_revkeen(h: &Harness, latency_ms: u64) {
    h.sims.revkeen.set_faults(Faults {
        latency_ms,
        ..Faults::default()
    });
}

/// Seeds `(clients, seed)`, starts the daemon with RevKeen answering after `latency_ms` and a
/// drain of `drain_secs`, waits until RevKeen's counts meet `ready`, then sends SIGTERM.
/// Returns how it exited and how many requests RevKeen had seen at the signal.
async fn sigterm_when(
    h: &Harness,
    (clients, seed): (usize, u64),
    latency_ms: u64,
    drain_secs: u64,
    what: &str,
    ready: impl Fn(&RevKeenStats) -> bool,
) -> (Output, u64) {
    seed_valid_clients(&h.sims.wodify, clients, seed);
    slow_revkeen(h, latency_ms);
    let daemon = h.start_daemon(&burst_config(h, 5, drain_secs)).await;
    let revkeen = h.sims.revkeen.clone();
    wait_until(what, Duration::from_secs(30), || ready(&revkeen.stats())).await;
    let sent_before = h.sims.revkeen.stats().requests;
    daemon.signal(libc::SIGTERM);
    (daemon.wait_exit(Duration::from_secs(30)).await, sent_before)
}

/// After a stop, `--once` delivers the rest: exit 0, an empty outbox, RevKeen holds every
/// client, and never saw one idempotency key with two bodies.
async fn rerun_delivers_everything(h: &Harness) {
    h.sims.revkeen.set_faults(Faults::default());
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert!(
        !out.stdout.contains("open failures"),
        "the rerun should leave nothing failed:\n{}",
        out.transcript()
    );
    let status = h.status_json().await;
    assert_eq!(status["outbox_depth"], json!(0), "{status:#}");
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(
        h.sims.revkeen.stats().conflicts,
        0,
        "RevKeen saw an idempotency key with two bodies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_0_drains_and_loses_nothing() {
    let h = Harness::start().await;
    let (out, sent_before) = sigterm_when(&h, (400, 24), 300, 3, "the burst under way", |r| {
        r.created >= 40
    })
    .await;
    out.assert_exit(exit::OK);
    assert!(
        delivered(&h, "wodify") < 400,
        "the signal should have landed mid-burst"
    );
    // It stops claiming: at most the requests already on their way (concurrency 4) arrive.
    let sent_after = h.sims.revkeen.stats().requests - sent_before;
    assert!(
        sent_after <= 4,
        "{sent_after} requests reached RevKeen after SIGTERM; the daemon should stop claiming"
    );
    rerun_delivers_everything(&h).await;
    // The in-flight requests were allowed to finish and were acknowledged: the rerun re-sent
    // none of them.
    assert_eq!(
        h.sims.revkeen.stats().replayed,
        0,
        "the rerun re-sent requests that were in flight at SIGTERM: they were not drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_a_shutdown_behind_slow_requests() {
    let h = Harness::start().await;
    // Every request takes 6 s, longer than the 2 s the drain allows.
    let (out, _) = sigterm_when(&h, (60, 25), 6_000, 2, "requests in flight", |r| {
        r.requests >= 1
    })
    .await;
    out.assert_exit(exit::OK);
    assert!(
        unanswered(&h) >= 1,
        "the daemon waited for requests slower than drain_timeout_secs: RevKeen had answered \
         them all when it exited\n{}",
        out.stderr
    );
    rerun_delivers_everything(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_source_page_exits_0_without_waiting_for_the_page() {
    let h = Harness::start().await;
    // Three pages of 100; every page takes 8 s, far longer than the 1 s drain.
    seed_valid_clients(&h.sims.wodify, 250, 38);
    h.sims.wodify.set_faults(Faults {
        latency_ms: 8_000,
        ..Faults::default()
    });
    let daemon = h.start_daemon(&burst_config(&h, 5, 1)).await;
    let wodify = h.sims.wodify.clone();
    // Wodify counts a request once it has answered it: then the second page is on its way.
    wait_until("the first page answered", Duration::from_secs(20), || {
        wodify.stats().requests >= 1
    })
    .await;
    let answered = h.sims.wodify.stats().requests;
    daemon.signal(libc::SIGTERM);
    let out = daemon.wait_exit(Duration::from_secs(30)).await;
    out.assert_exit(exit::OK);
    assert_eq!(
        h.sims.wodify.stats().requests,
        answered,
        "the daemon waited for the Wodify page in flight at SIGTERM before exiting\n{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 60, 26);
    // Requests of 20 s and a drain of 60 s, both far beyond the 10 s the exit may take.
    slow_revkeen(&h, 20_000);
    let daemon = h.start_daemon(&burst_config(&h, 5, 60)).await;
    let revkeen = h.sims.revkeen.clone();
    wait_until("requests in flight", Duration::from_secs(10), || {
        revkeen.stats().requests >= 1
    })
    .await;
    daemon.signal(libc::SIGTERM);
    // The first signal is being handled once the daemon says it is draining.
    wait_until("the drain to begin", Duration::from_secs(5), || {
        daemon.log().to_lowercase().contains("shutting down")
    })
    .await;
    daemon.signal(libc::SIGINT);
    // A guard, not a stopwatch: waiting for the requests or the drain would take 20 s or more.
    let out = daemon.wait_exit(Duration::from_secs(10)).await;
    assert!(
        out.code.is_some(),
        "exited by itself, not killed\n{}",
        out.transcript()
    );
    assert!(
        unanswered(&h) >= 1,
        "a second signal should exit at once, not wait for the requests in flight: RevKeen had \
         answered them all\n{}",
        out.transcript()
    );
    rerun_delivers_everything(&h).await;
}

// ---------------------------------------------------------------------------------------------
// systemd notify protocol.

/// A fake `NOTIFY_SOCKET`: every line received, in order.
struct NotifySocket {
    path: std::path::PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("sd-notify")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::UnixDatagram::from_std(socket).expect("tokio socket");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let into = lines.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut lines = into.lock().expect("lines lock");
                for line in text.lines().filter(|l| !l.is_empty()) {
                    lines.push(line.to_string());
                }
            }
        });
        NotifySocket {
            path,
            lines,
            _dir: dir,
            _task: task,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    fn position(&self, line: &str) -> Option<usize> {
        self.lines().iter().position(|l| l == line)
    }

    /// `WATCHDOG=1` lines from line `from` on.
    fn pings_since(&self, from: usize) -> usize {
        self.lines()
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter(|l| *l == "WATCHDOG=1")
            .count()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_watchdog_status_and_stopping() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 50, 27);
    let notify = NotifySocket::bind();
    let daemon = h.spawn_daemon(&scheduled(&h.config_for("gym"), EVERY_SECOND), |c| {
        c.env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID");
    });
    wait_until("READY=1", Duration::from_secs(20), || {
        notify.position("READY=1").is_some()
    })
    .await;
    let (status, _) = daemon
        .try_get("/healthz")
        .await
        .expect("READY=1 is sent only once the HTTP listener is bound");
    assert_eq!(status, 200);
    let ready = notify.position("READY=1").expect("seen");

    // Work progresses; the watchdog is fed meanwhile.
    let wodify = expected_wodify(&h.sims.wodify);
    wait_until("the backfill", Duration::from_secs(20), || {
        delivered(&h, "wodify") == wodify.len()
    })
    .await;
    assert_a_change_reaches_revkeen(&h, "Watched").await;
    wait_until(
        "WATCHDOG=1 pings after READY=1",
        Duration::from_secs(10),
        || notify.pings_since(ready) >= 3,
    )
    .await;

    daemon.signal(libc::SIGTERM);
    let out = daemon.wait_exit(Duration::from_secs(20)).await;
    out.assert_exit(exit::OK);
    wait_until("STOPPING=1", Duration::from_secs(5), || {
        notify.position("STOPPING=1").is_some()
    })
    .await;
    let lines = notify.lines();
    let stopping = notify.position("STOPPING=1").expect("seen");
    assert!(stopping > ready, "STOPPING=1 before READY=1: {lines:?}");
    let statuses: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("STATUS="))
        .collect();
    assert!(
        statuses.iter().any(|s| s.contains("gym")),
        "STATUS= should say how the sources are doing: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watchdog_pings_unless_systemd_asks_for_them() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 28);
    let toml = scheduled(&h.config_for("gym"), EVERY_SECOND);
    // No WATCHDOG_USEC; then WATCHDOG_USEC meant for another process (WATCHDOG_PID).
    for watchdog_pid in [None, Some("1")] {
        let notify = NotifySocket::bind();
        let daemon = h.spawn_daemon(&toml, |c| {
            c.env("NOTIFY_SOCKET", notify.path())
                .env_remove("WATCHDOG_PID");
            match watchdog_pid {
                None => c.env_remove("WATCHDOG_USEC"),
                Some(pid) => c.env("WATCHDOG_USEC", "500000").env("WATCHDOG_PID", pid),
            };
        });
        wait_until("READY=1", Duration::from_secs(20), || {
            notify.position("READY=1").is_some()
        })
        .await;
        // Three polls' worth of time: pings, were there any, would have come.
        let polls = h.sims.wodify.stats().requests;
        let wodify = h.sims.wodify.clone();
        wait_until("three more polls", Duration::from_secs(10), || {
            wodify.stats().requests >= polls + 3
        })
        .await;
        daemon.stop().await.assert_exit(exit::OK);
        wait_until("STOPPING=1", Duration::from_secs(5), || {
            notify.position("STOPPING=1").is_some()
        })
        .await;
        let lines = notify.lines();
        assert!(
            !lines.iter().any(|l| l == "WATCHDOG=1"),
            "WATCHDOG=1 sent although systemd asked for no watchdog (WATCHDOG_PID {watchdog_pid:?}): {lines:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstreams_do_not_starve_the_watchdog_or_liveness() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 39);
    // Every answer takes longer than WatchdogSec: a quiet, slow hour, not a hang.
    let slow = Faults {
        latency_ms: 3_000,
        ..Faults::default()
    };
    h.sims.revkeen.set_faults(slow.clone());
    h.sims.wodify.set_faults(slow);
    let notify = NotifySocket::bind();
    let daemon = h.spawn_daemon(&scheduled(&h.config_for("gym"), EVERY_SECOND), |c| {
        c.env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID");
    });
    wait_until("READY=1", Duration::from_secs(20), || {
        notify.position("READY=1").is_some()
    })
    .await;
    let revkeen = h.sims.revkeen.clone();
    wait_until("a slow RevKeen request", Duration::from_secs(20), || {
        revkeen.stats().requests >= 1
    })
    .await;
    let slow_request_began = notify.lines().len();
    // While that request takes its 3 s, the daemon is alive and says so.
    let (d, revkeen) = (&daemon, &h.sims.revkeen);
    d.wait_until(
        "the slow RevKeen request to be answered",
        Duration::from_secs(20),
        move || async move {
            let (status, body) = d.get("/healthz").await;
            assert_eq!(
                status, 200,
                "/healthz while upstreams answer slowly: {body}"
            );
            revkeen.requests().iter().any(|r| r.status != 0)
        },
    )
    .await;
    let pings = notify.pings_since(slow_request_began);
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    assert!(
        pings >= 1,
        "slow answers starved the watchdog: no WATCHDOG=1 while a RevKeen request took its 3 s \
         (WATCHDOG_USEC=2000000)\n{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_watchdog_is_fed_while_the_daemon_is_healthy() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 34);
    let notify = NotifySocket::bind();
    // WatchdogSec=1s: systemd restarts the unit unless a ping arrives every second.
    let daemon = h.spawn_daemon(&scheduled(&h.config_for("gym"), EVERY_SECOND), |c| {
        c.env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID");
    });
    wait_until("READY=1", Duration::from_secs(20), || {
        notify.position("READY=1").is_some()
    })
    .await;
    // A healthy daemon polling a few times, and pings all along.
    let ready = notify.position("READY=1").expect("seen");
    let polls = h.sims.wodify.stats().requests;
    let wodify = h.sims.wodify.clone();
    wait_until(
        "three more polls and five WATCHDOG=1 pings after READY=1",
        Duration::from_secs(20),
        || wodify.stats().requests >= polls + 3 && notify.pings_since(ready) >= 5,
    )
    .await;
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    let pings = notify.pings_since(ready);
    assert!(
        pings >= 5,
        "with WATCHDOG_USEC=1000000 a healthy daemon keeps pinging; {pings} pings\n{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration from the environment alone.

fn env_only_config(h: &Harness) -> Vec<(String, String)> {
    let sims = &h.sims;
    [
        ("DAEMON__STATE_PATH", h.state.display().to_string()),
        ("REVKEEN__BASE_URL", sims.revkeen_server.url()),
        ("REVKEEN__API_KEY", REVKEEN_KEY.to_string()),
        ("SOURCES__0__NAME", "gym".to_string()),
        ("SOURCES__0__KIND", "wodify".to_string()),
        ("SOURCES__0__BASE_URL", sims.wodify_server.url()),
        ("SOURCES__0__API_KEY", WODIFY_KEY.to_string()),
        ("SOURCES__0__SCHEDULE", EVERY_SECOND.to_string()),
        // Wodify's default monthly budget spaces every-second scans out to one every 9 s,
        // nearly the test's wait for a change.
        ("SOURCES__0__MONTHLY_REQUEST_BUDGET", "0".to_string()),
        ("SOURCES__1__NAME", "clinic".to_string()),
        ("SOURCES__1__KIND", "practicehub".to_string()),
        (
            "SOURCES__1__BASE_URL",
            format!("{}/api", sims.practicehub_server.url()),
        ),
        ("SOURCES__1__API_KEY", PRACTICEHUB_KEY.to_string()),
        (
            "SOURCES__1__APP_DETAILS",
            "revkeen-sync=ops@clinic.example".to_string(),
        ),
        ("SOURCES__1__SCHEDULE", EVERY_SECOND.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("SYNC_DAEMON__{key}"), value))
    .collect()
}

/// Patients PracticeHub lists that cannot be sent (no valid email, not deleted).
fn unsendable_patients(h: &Harness) -> usize {
    let deleted = |p: &Value| {
        p.get("deleted")
            .is_some_and(|d| d == &json!(true) || d == &json!(1))
    };
    let listed = h
        .sims
        .practicehub
        .patients()
        .iter()
        .filter(|p| !deleted(p))
        .count();
    listed - expected_practicehub(&h.sims.practicehub).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_made_only_of_environment_variables_runs_once_and_as_a_daemon() {
    let h = Harness::start().await;
    std::fs::remove_file(&h.config).expect("no config file");
    seed_valid_clients(&h.sims.wodify, 40, 29);
    h.sims.practicehub.seed(25, 29);
    let env = env_only_config(&h);
    let secrets: Vec<String> = [REVKEEN_KEY, WODIFY_KEY, PRACTICEHUB_KEY]
        .map(String::from)
        .to_vec();

    let mut once = crate::support::command(h.dir());
    once.arg("--once").envs(env.iter().map(|(k, v)| (k, v)));
    let out = run_command(once).await;
    assert_no_secrets(&out, &secrets);
    let want = if unsendable_patients(&h) > 0 {
        exit::REJECTED
    } else {
        exit::OK
    };
    out.assert_exit(want);
    assert!(
        h.state.exists(),
        "the state file is where the variables say"
    );
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );

    // The same variables (plus a listen address) run the daemon.
    let addr = free_listen_addr();
    let mut command = crate::support::command(h.dir());
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SYNC_DAEMON__DAEMON__LISTEN", addr.to_string());
    let daemon = DaemonProcess::spawn(command, addr, secrets);
    daemon.wait_healthy().await;
    assert_a_change_reaches_revkeen(&h, "FromEnv").await;
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_variable_overrides_the_file() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 30, 30);
    // The file has a wrong key and the default batch size; the environment corrects both.
    h.write_config(&replaced(
        &h.config_for("gym"),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
    ));
    // The key is a secret (checked below); the batch size is not.
    let mut command = h.command(&["--once"]);
    command
        .env("SYNC_DAEMON__REVKEEN__API_KEY", REVKEEN_KEY)
        .env("SYNC_DAEMON__REVKEEN__BATCH_SIZE", "1");
    let out = run_command(command).await;
    assert_no_secrets(
        &out,
        &[REVKEEN_KEY, WRONG_REVKEEN_KEY, WODIFY_KEY].map(String::from),
    );
    out.assert_exit(exit::OK);
    let stats = h.sims.revkeen.stats();
    assert_eq!(stats.auth_failures, 0, "the file's key was used: {stats:?}");
    assert_eq!(
        stats.batch_requests, 0,
        "batch_size = 1 from the environment means single upserts only: {stats:?}"
    );
    assert_eq!(stats.single_requests, 30);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

// ---------------------------------------------------------------------------------------------
// `sync-daemon healthcheck`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_against_a_running_daemon_and_1_when_none_listens() {
    let h = Harness::start().await;
    let daemon = h.start_daemon(&h.config_for("gym")).await;
    // start_daemon wrote the config with the daemon's listen address.
    let out = h.run(&["healthcheck"]).await;
    out.assert_exit(exit::OK);
    // In a container the daemon listens on 0.0.0.0 (the Dockerfile's setting); the check
    // still reaches it over loopback.
    let mut command = h.command(&["healthcheck"]);
    command.env(
        "SYNC_DAEMON__DAEMON__LISTEN",
        format!("0.0.0.0:{}", daemon.addr.port()),
    );
    run_command(command).await.assert_exit(exit::OK);

    // SIGINT stops the daemon as gracefully as SIGTERM.
    daemon.signal(libc::SIGINT);
    daemon
        .wait_exit(Duration::from_secs(20))
        .await
        .assert_exit(exit::OK);

    let out = h.run(&["healthcheck"]).await;
    out.assert_exit(1);
    assert!(
        out.stderr.contains("/healthz"),
        "the failure should say what was checked:\n{}",
        out.transcript()
    );
    // (A wedged daemon answering 503 cannot be produced from outside; not covered here.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_state_file_is_refused_and_the_daemon_carries_on() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 37);
    let toml = scheduled(&h.config_for("gym"), EVERY_SECOND);
    let daemon = h.start_daemon(&toml).await;

    // A backfill started by mistake beside the running daemon: a temporary failure (75).
    let out = h.once().await;
    out.assert_exit(exit::TEMPFAIL);
    assert!(
        out.stderr.contains("another sync-daemon"),
        "the refusal should say another process holds the state file:\n{}",
        out.transcript()
    );
    // A second daemon on another port, same state file.
    let out = h
        .spawn_daemon(&toml, |_| {})
        .wait_exit(Duration::from_secs(10))
        .await;
    out.assert_exit(exit::TEMPFAIL);
    assert!(
        out.stderr.contains("another sync-daemon"),
        "{}",
        out.transcript()
    );

    // The first one still serves and delivers.
    assert_eq!(daemon.get("/healthz").await.0, 200);
    assert_a_change_reaches_revkeen(&h, "StillHere").await;
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_in_use_is_a_configuration_error() {
    let h = Harness::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    h.write_config(&with_daemon(
        &h.config_for("gym"),
        &format!("listen = \"{addr}\""),
    ));
    let command = h.command(&[]);
    let out = tokio::time::timeout(Duration::from_secs(20), run_command(command))
        .await
        .expect("a daemon that cannot listen exits instead of running");
    out.assert_exit(exit::CONFIG);
    assert!(
        out.stderr.contains("daemon.listen") && out.stderr.contains(&addr.to_string()),
        "the error should name the address and the setting:\n{}",
        out.transcript()
    );
}

// ---------------------------------------------------------------------------------------------
// Logs.

/// Starts a daemon, lets it deliver a few clients, stops it and returns its stderr.
async fn daemon_log(
    h: &Harness,
    toml: &str,
    configure: impl FnOnce(&mut tokio::process::Command),
) -> String {
    let daemon = h.spawn_daemon(toml, configure);
    daemon.wait_healthy().await;
    let want = expected_wodify(&h.sims.wodify).len();
    wait_until("the backfill", Duration::from_secs(20), || {
        delivered(h, "wodify") == want
    })
    .await;
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    out.stderr
}

fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() >= 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_only_json_lines() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 31);
    let toml = with_daemon(&h.config_for("gym"), "log_format = \"json\"");
    let stderr = daemon_log(&h, &toml, |_| {}).await;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "expected a few log lines:\n{stderr}");
    for line in &lines {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}\n{stderr}"));
        assert!(value.is_object() && value.get("level").is_some(), "{line}");
    }

    // --once too, with a dependency's `log` records bridged in (reqwest logs each new
    // connection at debug): every line is one flat object, as a shipper reads it.
    let id: i64 = expected_wodify(&h.sims.wodify)
        .keys()
        .next()
        .expect("client")
        .parse()
        .expect("id");
    rename_client(&h.sims.wodify, id, "Jsonson");
    let mut command = h.command(&["--once"]);
    command.env("RUST_LOG", "info,reqwest=debug");
    let out = run_command(command).await;
    out.assert_exit(exit::OK);
    let mut bridged = 0;
    for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("--once with log_format = \"json\" wrote a non-JSON line ({e}): {line:?}")
        });
        for key in [
            "timestamp",
            "level",
            "severity",
            "message",
            "target",
            "service",
            "version",
        ] {
            assert!(value[key].is_string(), "no top-level {key:?}: {line}");
        }
        assert_eq!(value["service"], "sync-daemon", "{line}");
        assert_eq!(value["version"], env!("CARGO_PKG_VERSION"), "{line}");
        assert!(value.get("fields").is_none(), "the event nests: {line}");
        assert!(
            !line.contains("log.file") && !line.contains(".cargo/registry"),
            "a bridged record's registry path: {line}"
        );
        if value["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("reqwest"))
        {
            bridged += 1;
        }
    }
    assert!(
        bridged > 0,
        "no bridged reqwest line at debug:\n{}",
        out.stderr
    );
}

/// `--once`'s log as journald would receive it: stderr is a file (standing in for the journal's
/// stream) and `JOURNAL_STREAM` names that file's device and inode, as systemd sets it.
async fn once_under_journal(h: &Harness, journal_stream: Option<&str>) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let log = h.dir().join("journal-stream.log");
    let file = std::fs::File::create(&log).expect("log file");
    let meta = file.metadata().expect("log file metadata");
    let matching = format!("{}:{}", meta.dev(), meta.ino());
    let mut command = h.command(&["--once"]);
    command
        .env("JOURNAL_STREAM", journal_stream.unwrap_or(&matching))
        .stdout(std::process::Stdio::null())
        .stderr(file);
    let status = tokio::time::timeout(Duration::from_secs(120), command.status())
        .await
        .expect("--once finished")
        .expect("spawned");
    assert_eq!(status.code(), Some(exit::OK));
    std::fs::read_to_string(&log).expect("log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_lines_carry_their_syslog_priority_and_no_timestamp() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 10, 32);
    // A key file others can read: a warning in the run's log.
    let key_file = h.dir().join("wodify.key");
    std::fs::write(&key_file, WODIFY_KEY).expect("key file");
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let toml = replaced(
        &h.config_for("gym"),
        &format!("api_key = \"{WODIFY_KEY}\""),
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    h.write_config(&toml);

    let journal = once_under_journal(&h, None).await;
    let lines: Vec<&str> = journal.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines under journald");
    let mut warnings = 0;
    for line in &lines {
        let (priority, rest) = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap_or_else(|| panic!("no <priority> prefix under journald: {line:?}"));
        let level = rest.split_whitespace().next().unwrap_or_default();
        let want = match level {
            "ERROR" => "3",
            "WARN" => "4",
            "INFO" => "6",
            _ => "7",
        };
        assert_eq!(priority, want, "priority of a {level} line: {line:?}");
        warnings += usize::from(level == "WARN");
        assert!(
            !starts_with_timestamp(rest.trim_start()),
            "journald adds its own timestamps; the daemon's line carries one: {line:?}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "ANSI colour under journald: {line:?}"
        );
    }
    assert!(
        warnings > 0 && journal.contains("UNPROTECTED KEY FILE"),
        "the key-file warning at priority 4:\n{journal}"
    );

    // A JOURNAL_STREAM inherited by a process whose stderr went elsewhere is not journald.
    let elsewhere = once_under_journal(&h, Some("8:123456")).await;
    let first = elsewhere.lines().next().unwrap_or_default();
    assert!(
        starts_with_timestamp(first),
        "outside journald, a text line starts with its time: {first:?}"
    );
    assert!(!elsewhere.contains("<4>"), "{elsewhere}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_comes_from_the_config_unless_rust_log_is_set() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 10, 33);
    let json_logs = with_daemon(&h.config_for("gym"), "log_format = \"json\"");
    let levels = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["level"].as_str().map(String::from))
            .collect()
    };

    let info = levels(&daemon_log(&h, &json_logs, |_| {}).await);
    assert!(
        info.iter().any(|l| l == "INFO"),
        "default level info: {info:?}"
    );
    assert!(!info.iter().any(|l| l == "DEBUG"), "{info:?}");

    let quiet = with_daemon(&json_logs, "log_level = \"warn\"");
    let warn = levels(&daemon_log(&h, &quiet, |_| {}).await);
    assert!(
        warn.iter().all(|l| l == "WARN" || l == "ERROR"),
        "log_level = \"warn\" still logged {warn:?}"
    );

    let debug = levels(
        &daemon_log(&h, &quiet, |c| {
            c.env("RUST_LOG", "debug");
        })
        .await,
    );
    assert!(
        debug.iter().any(|l| l == "DEBUG"),
        "RUST_LOG=debug should win over log_level = \"warn\": {debug:?}"
    );
}
