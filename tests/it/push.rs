//! The signed push change feed (`POST /v1/changes/{source}`) of a real daemon-mode process
//! (no `--once`, a yearly schedule so only the start-up poll runs): a signed event for a changed
//! Wodify client or PracticeHub patient makes the daemon re-read that record from the source
//! (`GET /clients/{id}`, `GET /patients?id=eq:{id}`) and reach RevKeen; every refusal
//! (bad, missing, stale, replayed or mismatched signature; oversize body; unknown or push-less
//! source; malformed body or unknown field; invalid id) gets its documented status, and nothing
//! is fetched or sent for it; several `v1=` values are accepted (secret rotation); an event
//! accepted just before a SIGKILL is processed after the restart; SIGTERM stops the daemon with
//! exit 0.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sync_daemon::server::sign;
use sync_daemon_sim::Faults;

use crate::support::{
    DaemonProcess, Harness, at_revkeen, exit, expected_practicehub, expected_wodify,
    name_at_revkeen, push, rename_client, seed_valid_clients, unix_now, wait_for, wait_for_name,
    wait_until, with_source, yearly_schedules,
};

/// The gym's push secret in these tests.
pub(crate) const SECRET: &str = "whsec_gym_push_4711";
/// The clinic's.
const CLINIC_SECRET: &str = "whsec_clinic_push_0815";

/// How long a pushed change may take to reach RevKeen before the test fails: a hang guard,
/// not a latency limit (the schedules are yearly, so only the push can deliver it).
const PUSH_GUARD: Duration = Duration::from_secs(30);

/// The documented body for `ids`, ids as strings.
pub(crate) fn events(ids: &[i64]) -> Vec<u8> {
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"external_id": id.to_string()}))
        .collect();
    serde_json::to_vec(&json!({ "events": events })).expect("json")
}

/// `X-Sync-Signature` for `body`, signed now with the gym's secret.
pub(crate) fn signed(body: &[u8]) -> String {
    sign(SECRET, body, unix_now())
}

/// The `v1=` value of a `t=…,v1=…` header.
fn v1(header: &str) -> &str {
    header.split_once(",v1=").expect("a v1 value").1
}

/// Starts the simulators with `clients` valid gym clients and `patients` clinic patients and a
/// daemon whose sources carry the given push secrets, and waits until it is ready and its
/// start-up polls have delivered everything.
async fn start(
    clients: usize,
    patients: usize,
    gym_secret: Option<&str>,
    clinic_secret: Option<&str>,
) -> (Harness, DaemonProcess) {
    start_with_env(clients, patients, gym_secret, clinic_secret, &[]).await
}

/// [`start`] with extra environment for the daemon (e.g. `RUST_LOG`).
pub(crate) async fn start_with_env(
    clients: usize,
    patients: usize,
    gym_secret: Option<&str>,
    clinic_secret: Option<&str>,
    env: &[(&str, &str)],
) -> (Harness, DaemonProcess) {
    start_configured(clients, patients, gym_secret, clinic_secret, &[], |c| {
        c.envs(env.iter().copied());
    })
    .await
}

/// [`start`] with the gym's push feed and extra lines in the gym's config section.
pub(crate) async fn start_with_gym_config(
    clients: usize,
    patients: usize,
    gym_secret: Option<&str>,
    gym_lines: &[&str],
) -> (Harness, DaemonProcess) {
    start_configured(clients, patients, gym_secret, None, gym_lines, |_| {}).await
}

/// [`start`] with the gym's push feed and a daemon limited to `descriptors` open files.
pub(crate) async fn start_with_limits(
    clients: usize,
    patients: usize,
    gym_secret: Option<&str>,
    descriptors: u64,
) -> (Harness, DaemonProcess) {
    start_configured(clients, patients, gym_secret, None, &[], |c| {
        // SAFETY: setrlimit is async-signal-safe and only lowers the child's own limit.
        unsafe {
            c.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: descriptors,
                    rlim_max: descriptors,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    })
    .await
}

/// [`start`] after `configure` adjusted the daemon's command.
async fn start_configured(
    clients: usize,
    patients: usize,
    gym_secret: Option<&str>,
    clinic_secret: Option<&str>,
    gym_lines: &[&str],
    configure: impl FnOnce(&mut tokio::process::Command),
) -> (Harness, DaemonProcess) {
    let h = Harness::start().await;
    h.unlimited();
    seed_valid_clients(&h.sims.wodify, clients, 5);
    h.sims.practicehub.seed(patients, 5);
    let mut config = yearly_schedules(&h.base_config());
    if let Some(secret) = gym_secret {
        config = with_source(&config, "gym", &format!("push_secret = \"{secret}\""));
    }
    if let Some(secret) = clinic_secret {
        config = with_source(&config, "clinic", &format!("push_secret = \"{secret}\""));
    }
    for line in gym_lines {
        config = with_source(&config, "gym", line);
    }
    let daemon = h.spawn_daemon(&config, configure);
    daemon.wait_ready().await;
    daemon.wait_polls("gym", 1).await;
    daemon.wait_polls("clinic", 1).await;
    wait_for_revkeen(&h).await;
    wait_drained(&h).await;
    (h, daemon)
}

/// Waits until `status --json` shows an empty outbox: every answer acknowledged.
pub(crate) async fn wait_drained(h: &Harness) {
    wait_for(
        "the outbox to drain",
        Duration::from_secs(30),
        move || async move {
            let report = h.status_json().await;
            if report["outbox_depth"] == 0 {
                Ok(())
            } else {
                Err(format!("status --json: {report}"))
            }
        },
    )
    .await;
}

/// Waits until RevKeen holds exactly what both sources hold.
pub(crate) async fn wait_for_revkeen(h: &Harness) {
    let (revkeen, wodify, practicehub) = (
        h.sims.revkeen.clone(),
        h.sims.wodify.clone(),
        h.sims.practicehub.clone(),
    );
    wait_until(
        "RevKeen to hold every source record",
        Duration::from_secs(30),
        || {
            at_revkeen(&revkeen, "wodify") == expected_wodify(&wodify)
                && at_revkeen(&revkeen, "practicehub") == expected_practicehub(&practicehub)
        },
    )
    .await;
}

/// Wodify requests for one client by id (the push path), with their arrival times.
fn wodify_fetches(h: &Harness, id: i64) -> Vec<u64> {
    let path = format!("/clients/{id}");
    h.sims
        .wodify
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path_and_query.split('?').next() == Some(path.as_str()))
        .map(|r| r.at_ms)
        .collect()
}

/// PracticeHub requests that asked for one patient with `id=eq:{id}`.
fn practicehub_fetches(h: &Harness, id: i64) -> usize {
    let wanted = format!("eq:{id}");
    h.sims
        .practicehub
        .requests()
        .into_iter()
        .filter(|r| {
            let query = r.path_and_query.split_once('?').map_or("", |(_, q)| q);
            r.method == "GET"
                && url::form_urlencoded::parse(query.as_bytes())
                    .any(|(key, value)| key == "id" && value == wanted)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_wodify_event_reaches_revkeen() {
    let (h, daemon) = start(40, 0, Some(SECRET), None).await;
    let id = 10_007;
    rename_client(&h.sims.wodify, id, "Pushed");
    h.sims.revkeen.clear_log();
    h.sims.wodify.clear_log();

    let body = events(&[id]);
    let sent = Instant::now();
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
    assert_eq!(answer["accepted"], 1, "{answer}");
    wait_for_name(&h, "wodify", id, " Pushed", PUSH_GUARD).await;
    let delay = sent.elapsed();
    eprintln!("push → RevKeen: {} ms", delay.as_millis());

    assert_eq!(
        wodify_fetches(&h, id).len(),
        1,
        "the daemon re-reads the client itself: {:?}",
        h.sims.wodify.requests()
    );
    assert_eq!(
        h.sims.wodify.requests().len(),
        1,
        "a push reads one record, not the listing: {:?}",
        h.sims.wodify.requests()
    );
    let stats = h.sims.revkeen.stats();
    assert_eq!(
        (stats.created, stats.updated),
        (0, 1),
        "exactly the pushed change is written: {stats:?}"
    );

    // Several events, ids as JSON numbers, in one body.
    for (n, id) in [10_011_i64, 10_012].into_iter().enumerate() {
        rename_client(&h.sims.wodify, id, &format!("Batch{n}"));
    }
    let body = br#"{"events": [{"external_id": 10011}, {"external_id": 10012}]}"#;
    let (status, answer) = push(&daemon, "gym", body, Some(&signed(body))).await;
    assert_eq!(status, 202, "{answer}");
    wait_for_name(&h, "wodify", 10_011, " Batch0", PUSH_GUARD).await;
    wait_for_name(&h, "wodify", 10_012, " Batch1", PUSH_GUARD).await;

    // A pushed id the source does not have: fetched once, nothing sent, no retry loop.
    h.sims.revkeen.clear_log();
    let body = events(&[99_999]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    rename_client(&h.sims.wodify, 10_013, "After");
    let body = events(&[10_013]);
    push(&daemon, "gym", &body, Some(&signed(&body))).await;
    wait_for_name(&h, "wodify", 10_013, " After", PUSH_GUARD).await;
    assert_eq!(wodify_fetches(&h, 99_999).len(), 1);
    assert!(h.sims.revkeen.customer("wodify", "99999").is_none());
    assert_eq!(h.sims.revkeen.stats().updated, 1);

    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pushes_get_their_status_and_fetch_and_send_nothing() {
    // At TRACE, so "nothing is logged from a rejected body" covers every log line.
    let (h, daemon) = start_with_env(40, 5, Some(SECRET), None, &[("RUST_LOG", "trace")]).await;
    // Every client a refused push names has changed at the source: were it fetched, RevKeen
    // would get a write.
    let refused_ids = 10_002..=10_009;
    for id in refused_ids.clone() {
        rename_client(&h.sims.wodify, id, &format!("Refused{id}"));
    }
    h.sims.revkeen.clear_log();
    h.sims.wodify.clear_log();
    let now = unix_now();
    let mut answers: Vec<(String, u16, u16, String)> = Vec::new();
    let mut expect = |what: &str, want: u16, got: (u16, String)| {
        answers.push((what.to_string(), want, got.0, got.1));
    };

    let body = events(&[10_002]);
    expect(
        "signed with another secret",
        401,
        push(
            &daemon,
            "gym",
            &body,
            Some(&sign("not-the-secret", &body, now)),
        )
        .await,
    );
    expect("no signature", 401, push(&daemon, "gym", &body, None).await);
    expect(
        "a malformed signature header",
        401,
        push(&daemon, "gym", &body, Some("v1=deadbeef")).await,
    );
    expect(
        "a signature without v1",
        401,
        push(&daemon, "gym", &body, Some(&format!("t={now}"))).await,
    );
    let body = events(&[10_003]);
    expect(
        "a stale timestamp (t = now - 400)",
        401,
        push(&daemon, "gym", &body, Some(&sign(SECRET, &body, now - 400))).await,
    );
    expect(
        "a timestamp from the future (t = now + 400)",
        401,
        push(&daemon, "gym", &body, Some(&sign(SECRET, &body, now + 400))).await,
    );
    // A request captured 400 s ago and replayed: as captured, and with t moved to now.
    let body = events(&[10_004]);
    let captured = sign(SECRET, &body, now - 400);
    expect(
        "a replayed request as captured",
        401,
        push(&daemon, "gym", &body, Some(&captured)).await,
    );
    let old_v1 = v1(&captured);
    expect(
        "a replayed signature with a fresh t",
        401,
        push(&daemon, "gym", &body, Some(&format!("t={now},v1={old_v1}"))).await,
    );
    // A valid signature of one body sent with another.
    let other = events(&[10_005]);
    expect(
        "the signature of another body",
        401,
        push(&daemon, "gym", &other, Some(&signed(&events(&[10_001])))).await,
    );
    // Over 1 MiB, correctly signed.
    let mut big = events(&[10_006]);
    big.resize(1024 * 1024 + 1, b' ');
    expect(
        "a body over 1 MiB",
        413,
        push(&daemon, "gym", &big, Some(&signed(&big))).await,
    );
    let body = events(&[10_007]);
    expect(
        "an unknown source",
        404,
        push(&daemon, "nope", &body, Some(&signed(&body))).await,
    );
    expect(
        "a source without a push_secret",
        404,
        push(&daemon, "clinic", &body, Some(&signed(&body))).await,
    );
    for (what, body) in [
        (
            "malformed JSON",
            &br#"{"events": [{"external_id": "10008"}"#[..],
        ),
        ("not JSON at all", &b"external_id=10008"[..]),
        (
            "an unknown top-level field",
            &br#"{"events": [{"external_id": "10008"}], "source": "gym"}"#[..],
        ),
        (
            "an unknown event field carrying data",
            &br#"{"events": [{"external_id": "10008", "email": "REFUSEDBODYMARKER@example.com"}]}"#
                [..],
        ),
        ("events not a list", &br#"{"events": "10008"}"#[..]),
        ("no events", &br#"{"external_id": "10008"}"#[..]),
        (
            "an id that is no id",
            &br#"{"events": [{"external_id": "abc"}]}"#[..],
        ),
        (
            "a negative id",
            &br#"{"events": [{"external_id": -10008}]}"#[..],
        ),
        ("an empty id", &br#"{"events": [{"external_id": ""}]}"#[..]),
    ] {
        expect(
            what,
            400,
            push(&daemon, "gym", body, Some(&signed(body))).await,
        );
    }

    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, want, got, _)| want != got)
        .map(|(what, want, got, body)| format!("{what}: expected {want}, got {got} {body}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every refusal says why in {"error": …}.
    for (what, _, status, body) in &answers {
        let message = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        assert!(
            message.len() > 10,
            "{what}: a {status} should say why in {{\"error\": …}}, got {body:?}"
        );
    }
    // Each refusal is counted by its status, the oversize one included.
    let metrics = daemon.metrics().await;
    for status in [400, 401, 404, 413] {
        let count = answers
            .iter()
            .filter(|(_, want, _, _)| *want == status)
            .count();
        let line = format!("sync_daemon_push_refused_total{{status=\"{status}\"}} {count}");
        assert!(
            metrics.text.contains(&line),
            "no `{line}` in\n{}",
            metrics.text
        );
    }
    let not_found: Vec<&String> = answers
        .iter()
        .filter(|(_, _, status, _)| *status == 404)
        .map(|(_, _, _, body)| body)
        .collect();
    assert_ne!(
        not_found[0], not_found[1],
        "an unknown source and a source without push_secret should say which"
    );

    // Accepted: several v1 values while a secret rotates (old first, or garbage first), and a
    // body of exactly 1 MiB.
    let t = unix_now();
    let body = events(&[10_010]);
    let rotating = format!(
        "{},v1={}",
        sign("the-old-secret", &body, t),
        v1(&sign(SECRET, &body, t))
    );
    rename_client(&h.sims.wodify, 10_010, "Rotated");
    let (status, answer) = push(&daemon, "gym", &body, Some(&rotating)).await;
    assert_eq!(status, 202, "two v1 values, the second valid: {answer}");
    let mut exact = events(&[10_011]);
    exact.resize(1024 * 1024, b' ');
    rename_client(&h.sims.wodify, 10_011, "Exact");
    let garbage_first = format!("t={t},v1=zz,v1={}", v1(&sign(SECRET, &exact, t)));
    let (status, answer) = push(&daemon, "gym", &exact, Some(&garbage_first)).await;
    assert_eq!(
        status, 202,
        "a body of exactly 1 MiB, a non-hex v1 first: {answer}"
    );

    // Within the 5-minute tolerance: a sender whose clock is 4.5 minutes behind.
    let body = events(&[10_012]);
    rename_client(&h.sims.wodify, 10_012, "Skewed");
    let (status, answer) = push(
        &daemon,
        "gym",
        &body,
        Some(&sign(SECRET, &body, unix_now() - 270)),
    )
    .await;
    assert_eq!(
        status, 202,
        "t = now - 270 is within the tolerance: {answer}"
    );

    // Once the accepted ones have arrived, the refused ones were neither fetched nor sent.
    wait_for_name(&h, "wodify", 10_010, " Rotated", Duration::from_secs(5)).await;
    wait_for_name(&h, "wodify", 10_011, " Exact", Duration::from_secs(5)).await;
    wait_for_name(&h, "wodify", 10_012, " Skewed", Duration::from_secs(5)).await;
    for id in refused_ids {
        assert!(
            wodify_fetches(&h, id).is_empty(),
            "client {id} was fetched after a refused push: {:?}",
            h.sims.wodify.requests()
        );
        assert!(
            !name_at_revkeen(&h, "wodify", &id.to_string())
                .unwrap_or_default()
                .contains("Refused"),
            "client {id} was sent after a refused push"
        );
    }
    assert_eq!(h.sims.revkeen.stats().updated, 3);

    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.contains("TRACE"),
        "expected a TRACE log:\n{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("REFUSEDBODYMARKER") && !out.stderr.contains("REFUSEDBODYMARKER"),
        "a refused body was logged:\n{}",
        out.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_accepted_just_before_a_crash_is_processed_after_the_restart() {
    let (h, daemon) = start(40, 0, Some(SECRET), None).await;
    let id = 10_021;
    rename_client(&h.sims.wodify, id, "Survived");
    // The source is slow, so the fetch is still pending when the process dies.
    h.sims.wodify.set_faults(Faults {
        latency_ms: 3_000,
        ..Faults::default()
    });
    let body = events(&[id]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    let killed = daemon.kill().await;
    assert_eq!(killed.code, None, "SIGKILLed:\n{}", killed.stderr);
    let killed_at = chrono::Utc::now().timestamp_millis();
    assert!(
        !name_at_revkeen(&h, "wodify", &id.to_string())
            .unwrap_or_default()
            .ends_with(" Survived"),
        "the change arrived before the kill; the test proves nothing"
    );

    h.sims.wodify.set_faults(Faults::default());
    let config = std::fs::read_to_string(&h.config).expect("config");
    let config: String = config
        .lines()
        .filter(|line| !line.starts_with("listen = "))
        .map(|line| format!("{line}\n"))
        .collect();
    let daemon = h.spawn_daemon(&config, |_| {});
    daemon.wait_ready().await;
    wait_for_name(&h, "wodify", id, " Survived", Duration::from_secs(10)).await;
    let refetched: Vec<u64> = wodify_fetches(&h, id)
        .into_iter()
        .filter(|at| *at as i64 >= killed_at)
        .collect();
    assert_eq!(
        refetched.len(),
        1,
        "the restarted daemon should re-read the pushed client once (the event survived the crash): {:?}",
        h.sims.wodify.requests()
    );
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_practicehub_event_is_fetched_by_id_and_reaches_revkeen() {
    let (h, daemon) = start(0, 30, None, Some(CLINIC_SECRET)).await;
    let expected = expected_practicehub(&h.sims.practicehub);
    let id: i64 = expected
        .keys()
        .nth(3)
        .expect("a patient")
        .parse()
        .expect("id");
    assert!(
        h.sims
            .practicehub
            .update_patient(id, json!({"last_name": "Pushed"}))
    );
    h.sims.practicehub.clear_log();
    h.sims.revkeen.clear_log();
    let body = events(&[id]);
    let sent = Instant::now();
    let (status, answer) = push(
        &daemon,
        "clinic",
        &body,
        Some(&sign(CLINIC_SECRET, &body, unix_now())),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    wait_for_name(&h, "practicehub", id, " Pushed", PUSH_GUARD).await;
    eprintln!(
        "PracticeHub push → RevKeen: {} ms",
        sent.elapsed().as_millis()
    );
    assert_eq!(
        practicehub_fetches(&h, id),
        1,
        "the daemon asks PracticeHub for the patient by id: {:?}",
        h.sims.practicehub.requests()
    );
    assert_eq!(h.sims.practicehub.requests().len(), 1);
    assert_eq!(h.sims.revkeen.stats().updated, 1);

    // The gym's secret does not sign for the clinic.
    let (status, _) = push(&daemon, "clinic", &body, Some(&signed(&body))).await;
    assert_eq!(status, 401);

    // A pushed patient who is deleted and was never synced: fetched, never created.
    let mut ghost = h.sims.practicehub.patient(id).expect("exists");
    ghost["id"] = json!(999);
    ghost["email"] = json!("ghost@example.co.uk");
    ghost["deleted"] = json!(true);
    h.sims.practicehub.put_patient(ghost);
    let other: i64 = expected
        .keys()
        .nth(5)
        .expect("a patient")
        .parse()
        .expect("id");
    assert!(
        h.sims
            .practicehub
            .update_patient(other, json!({"last_name": "Second"}))
    );
    let body = events(&[999, other]);
    let (status, answer) = push(
        &daemon,
        "clinic",
        &body,
        Some(&sign(CLINIC_SECRET, &body, unix_now())),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    wait_for_name(&h, "practicehub", other, " Second", PUSH_GUARD).await;
    assert_eq!(practicehub_fetches(&h, 999), 1);
    assert!(
        h.sims.revkeen.customer("practicehub", "999").is_none(),
        "a deleted patient pushed before it was ever synced became a customer"
    );

    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    assert!(
        h.sims.practicehub.stats().non_get == 0,
        "only GET is ever sent to PracticeHub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_the_state_file_is_locked_gets_503_and_is_not_lost_once_retried() {
    let (h, daemon) = start(30, 0, Some(SECRET), None).await;
    let id = 10_017;
    rename_client(&h.sims.wodify, id, "Locked");
    h.sims.wodify.clear_log();
    // Another process holds the state file's write lock longer than the daemon waits for it.
    let lock = rusqlite::Connection::open(&h.state).expect("open the state file");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let body = events(&[id]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("error"), "{answer}");
    lock.execute_batch("ROLLBACK").expect("release the lock");
    drop(lock);
    assert!(
        wodify_fetches(&h, id).is_empty(),
        "an event that was not stored was fetched"
    );

    // The sender retries: now it is stored and delivered.
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    wait_for_name(&h, "wodify", id, " Locked", Duration::from_secs(5)).await;
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_push_for_a_record_already_read_is_not_lost() {
    let (h, daemon) = start(30, 0, Some(SECRET), None).await;
    let (first, slow) = (10_003, 10_004);
    rename_client(&h.sims.wodify, first, "One");
    rename_client(&h.sims.wodify, slow, "Slow");
    h.sims.wodify.clear_log();
    // Every read takes 1.5 s: the daemon reads `first`, then spends 1.5 s reading `slow` before
    // it commits the two.
    h.sims.wodify.set_faults(Faults {
        latency_ms: 1_500,
        ..Faults::default()
    });
    let body = events(&[first, slow]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    let wodify = h.sims.wodify.clone();
    wait_until(
        "the daemon to have read the first client",
        Duration::from_secs(10),
        || {
            wodify
                .requests()
                .iter()
                .any(|r| r.path_and_query == format!("/clients/{first}"))
        },
    )
    .await;
    // The first client changes again after it was read, and its system says so.
    rename_client(&h.sims.wodify, first, "Two");
    let body = events(&[first]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    h.sims.wodify.set_faults(Faults::default());

    wait_for_name(&h, "wodify", slow, " Slow", Duration::from_secs(10)).await;
    wait_for_name(&h, "wodify", first, " Two", Duration::from_secs(10)).await;
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_the_state_file_was_locked_longer_than_the_busy_timeout() {
    let (h, daemon) = start(30, 0, Some(SECRET), None).await;
    let id = 10_019;
    rename_client(&h.sims.wodify, id, "Later");
    // RevKeen fails, so the change waits in the outbox for a retry …
    h.sims.revkeen.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let body = events(&[id]);
    let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
    assert_eq!(status, 202, "{answer}");
    let revkeen = h.sims.revkeen.clone();
    wait_until(
        "RevKeen to refuse the change once",
        Duration::from_secs(10),
        || revkeen.stats().server_errors >= 1,
    )
    .await;
    // … while another process holds the state file's write lock for longer than the daemon
    // waits for it (a `sqlite3` shell, a careless backup).
    let lock = rusqlite::Connection::open(&h.state).expect("open the state file");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    tokio::time::sleep(Duration::from_secs(7)).await;
    h.sims.revkeen.set_faults(Faults::default());
    lock.execute_batch("ROLLBACK").expect("release the lock");
    drop(lock);

    let (h, d) = (&h, &daemon);
    daemon
        .wait_for(
            "the change to be delivered after the lock was released",
            Duration::from_secs(15),
            move || async move {
                if name_at_revkeen(h, "wodify", &id.to_string())
                    .is_some_and(|name| name.ends_with(" Later"))
                {
                    return Ok(());
                }
                let health = d.try_get("/healthz").await.map(|(status, _)| status);
                Err(format!("/healthz answers {health:?}"))
            },
        )
        .await;
    daemon.stop().await.assert_exit(exit::OK);
}
