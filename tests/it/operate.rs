//! The operator's questions, answered by `status`, `failures` and `replay` against a state file
//! built by real syncs against the simulators: rejected records (no or an invalid email), dead
//! letters carrying RevKeen's code, HTTP status and field errors (sent as single upserts and
//! inside batches, which must read the same), and an auth halt from a wrong RevKeen key.
//! Human and JSON outputs are pinned as insta snapshots with times, ages, ports and temp paths
//! filtered. `status` reads while a `--once` or the daemon holds the state file (`running`,
//! the live position, the next scheduled poll only when a daemon schedules one). `replay` is
//! refused (exit 77) while the key is refused, puts dead letters back by id or all at once,
//! reports ids it cannot replay, and a `--once` after it delivers them once RevKeen accepts.

use std::time::Duration;

use serde_json::{Value, json};
use sync_daemon_sim::REVKEEN_KEY;
use sync_daemon_sim::revkeen::Rejection;

use crate::support::{
    Harness, Output, exit, rename_client, replaced, seed_valid_clients, seed_valid_patients,
    wait_until, wait_until_async, with_revkeen,
};

/// A Wodify client with no email: rejected before sending.
const NO_EMAIL_CLIENT: i64 = 10_004;
/// A Wodify client whose email is not an address: rejected before sending.
const BAD_EMAIL_CLIENT: i64 = 10_009;
/// A Wodify client RevKeen refuses (422 with a field error): a dead letter.
const REFUSED_CLIENT: i64 = 10_007;
/// A PracticeHub patient with no email.
const NO_EMAIL_PATIENT: i64 = 3;
/// A PracticeHub patient RevKeen refuses (400 with a field error).
const REFUSED_PATIENT: i64 = 5;
/// Gym clients changed after the first sync, queued when the key is refused.
const CHANGED_CLIENTS: [i64; 2] = [10_002, 10_012];
const WRONG_REVKEEN_KEY: &str = "rk_live_wrong_0badc0de77";

fn rejections() -> Vec<Rejection> {
    vec![
        Rejection {
            external_id: Some(REFUSED_CLIENT.to_string()),
            email: None,
            status: 422,
            code: "validation_error".to_string(),
            message: "email domain is not accepted for this merchant".to_string(),
            field: Some("email".to_string()),
        },
        Rejection {
            external_id: Some(REFUSED_PATIENT.to_string()),
            email: None,
            status: 400,
            code: "invalid_request".to_string(),
            message: "phone is not a dialable number".to_string(),
            field: Some("phone".to_string()),
        },
    ]
}

/// Both sources synced once with `batch_size`: 30 clients (two rejected, one refused by
/// RevKeen) and 12 patients (one rejected, one refused). Exit 65.
async fn synced_with_failures(batch_size: usize) -> Harness {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&with_revkeen(
        &h.base_config(),
        &format!("batch_size = {batch_size}"),
    ));
    seed_valid_clients(&h.sims.wodify, 30, 21);
    assert!(
        h.sims
            .wodify
            .update_client(NO_EMAIL_CLIENT, json!({"email": ""}))
    );
    assert!(
        h.sims
            .wodify
            .update_client(BAD_EMAIL_CLIENT, json!({"email": "pat at example"}))
    );
    seed_valid_patients(&h.sims.practicehub, 12, 21);
    assert!(
        h.sims
            .practicehub
            .update_patient(NO_EMAIL_PATIENT, json!({"email": null}))
    );
    h.sims.revkeen.set_rejections(rejections());
    h.once().await.assert_exit(exit::REJECTED);
    h
}

/// The config with RevKeen's key replaced by a wrong one.
fn wrong_key_config(h: &Harness) -> String {
    replaced(
        &std::fs::read_to_string(&h.config).expect("read config"),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
    )
}

/// Changes two gym clients and runs `--once --source gym` with a wrong RevKeen key: the poll
/// completes, the two changes stay queued and RevKeen's refusal is recorded (exit 77).
/// Returns the good config.
async fn halt_with_wrong_key(h: &Harness) -> String {
    let good = std::fs::read_to_string(&h.config).expect("read config");
    for id in CHANGED_CLIENTS {
        rename_client(&h.sims.wodify, id, "Halvorsen");
    }
    h.write_config(&wrong_key_config(h));
    h.run(&["--once", "--source", "gym"])
        .await
        .assert_exit(exit::AUTH_REFUSED);
    good
}

/// Output with the temp dir replaced by `[dir]`.
fn stable(h: &Harness, text: &str) -> String {
    text.replace(&h.dir().display().to_string(), "[dir]")
}

/// Parses `status --json` / `failures --json` output.
fn json_of(out: &Output) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.transcript()))
}

/// `status --json` with the temp dir replaced by `[dir]`.
fn stable_status(h: &Harness, mut status: Value) -> Value {
    let path = status["state_path"]
        .as_str()
        .expect("state_path")
        .to_string();
    status["state_path"] = json!(stable(h, &path));
    status
}

/// `failures` lists oldest first; records seen in the same millisecond-ish window of two
/// concurrent polls may come in either order, so snapshots sort them by kind, source and id.
fn sorted_failures_json(mut failures: Value) -> Value {
    let key = |f: &Value| {
        (
            f["kind"].as_str().unwrap_or_default().to_string(),
            f["source"].as_str().unwrap_or_default().to_string(),
            f["external_id"].as_str().unwrap_or_default().to_string(),
        )
    };
    failures
        .as_array_mut()
        .expect("failures --json is an array")
        .sort_by_key(key);
    failures
}

/// The human `failures` output with its per-record blocks sorted (see
/// [`sorted_failures_json`]); the closing count stays last.
fn sorted_failures_text(text: &str) -> String {
    let mut blocks: Vec<String> = Vec::new();
    let mut tail = String::new();
    for line in text.lines() {
        if line.starts_with("    ") {
            let block = blocks
                .last_mut()
                .expect("a detail line follows a record line");
            block.push_str(line);
            block.push('\n');
        } else if line.contains(" failures: ") {
            tail = format!("{line}\n");
        } else {
            blocks.push(format!("{line}\n"));
        }
    }
    blocks.sort();
    blocks.concat() + &tail
}

/// Insta settings that hide what changes between runs: times, ages, ports.
pub fn snapshot_settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(true);
    // Same width as the times they replace, so tables stay aligned.
    settings.add_filter(
        r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z",
        "YYYY-MM-DD hh:mm:ssZ",
    );
    settings.add_filter(
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z",
        "YYYY-MM-DDThh:mm:ssZ",
    );
    settings.add_filter(r"127\.0\.0\.1:\d+", "127.0.0.1:[port]");
    settings.add_filter(r#""month": "\d{4}-\d{2}""#, r#""month": "YYYY-MM""#);
    settings.add_filter(r"budget used in \d{4}-\d{2}", "budget used in YYYY-MM");
    settings.add_filter(r"oldest waiting \d+ (s|min|h)", "oldest waiting [age]");
    settings.add_filter(
        r#""oldest_pending_age_secs": \d+"#,
        r#""oldest_pending_age_secs": "[age]""#,
    );
    settings.add_filter(r#""(first_seen|last_seen)": \d+"#, r#""$1": "[unix ms]""#);
    settings
}

fn source<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sources"]
        .as_array()
        .and_then(|sources| sources.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no source {name} in {status:#}"))
}

fn failure(failures: &Value, id: i64) -> &Value {
    failures
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|f| f["external_id"] == id.to_string().as_str())
        })
        .unwrap_or_else(|| panic!("no failure for {id} in {failures:#}"))
}

/// What every state built by [`synced_with_failures`] + [`halt_with_wrong_key`] must show,
/// asserted field by field (the snapshots pin the rest).
fn assert_halted_status(status: &Value) {
    assert_eq!(status["running"], false);
    assert_eq!(
        status["outbox_depth"], 2,
        "the two changes wait: {status:#}"
    );
    assert!(status["oldest_pending_age_secs"].is_u64(), "{status:#}");
    assert_eq!(status["dead_letters"], 2);
    assert_eq!(status["rejected"], 3);
    let halts = status["auth_halts"].as_array().expect("auth_halts");
    assert_eq!(halts.len(), 1, "{status:#}");
    assert_eq!(halts[0]["target"], "revkeen");
    assert!(
        halts[0]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "the halt says why: {status:#}"
    );
    let gym = source(status, "gym");
    assert_eq!(gym["kind"], "wodify");
    assert_eq!(gym["queued"], 2);
    assert_eq!(
        (gym["rejected"].as_u64(), gym["dead_letters"].as_u64()),
        (Some(2), Some(1))
    );
    let poll = &gym["last_poll"];
    assert_eq!(poll["outcome"], "ok", "{status:#}");
    assert!(poll["finished_at"].is_string());
    assert_eq!(
        (
            poll["fetched"].as_u64(),
            poll["enqueued"].as_u64(),
            poll["rejected"].as_u64()
        ),
        (Some(30), Some(2), Some(2)),
        "{status:#}"
    );
    assert_eq!(
        gym["position"], "Wodify scan at the start (2 complete scans)",
        "{status:#}"
    );
    assert!(gym["next_poll"].is_null(), "no daemon, no next poll");
    let clinic = source(status, "clinic");
    assert_eq!(clinic["kind"], "practicehub");
    assert_eq!(clinic["last_poll"]["fetched"], 12);
    assert_eq!(clinic["delivered"]["created"], 10, "{status:#}");
    assert!(
        clinic["position"]
            .as_str()
            .is_some_and(|p| p.starts_with("PracticeHub updated ≥ ")),
        "{status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_failures_describe_rejections_dead_letters_and_an_auth_halt() {
    let h = synced_with_failures(1).await;
    halt_with_wrong_key(&h).await;

    let human = h.run(&["status"]).await;
    human.assert_exit(exit::OK);
    let status = h.status_json().await;
    assert_halted_status(&status);
    for expected in [
        "no sync-daemon process running",
        "Wodify scan at the start (2 complete scans)",
        "PracticeHub updated ≥ ",
        "Outbox: 2 waiting, oldest waiting ",
        "Dead letters: 2. Rejected records: 3. See `sync-daemon failures`.",
        "AUTH HALT: revkeen refused the key since ",
    ] {
        assert!(
            human.stdout.contains(expected),
            "`status` lacks {expected:?}:\n{}",
            human.transcript()
        );
    }

    let failures_human = h.run(&["failures"]).await;
    failures_human.assert_exit(exit::OK);
    let failures_json = h.run(&["failures", "--json"]).await;
    failures_json.assert_exit(exit::OK);
    let failures = json_of(&failures_json);
    assert_eq!(failures.as_array().map(Vec::len), Some(5), "{failures:#}");
    let refused = failure(&failures, REFUSED_CLIENT);
    assert_eq!(refused["kind"], "dead_letter");
    assert_eq!(refused["code"], "validation_error");
    assert_eq!(refused["http_status"], 422);
    assert_eq!(
        refused["field_errors"],
        json!({"email": "email domain is not accepted for this merchant"})
    );
    let no_email = failure(&failures, NO_EMAIL_CLIENT);
    assert_eq!(no_email["kind"], "rejected");
    assert!(
        failures_human
            .stdout
            .contains("fix: add an email in the client's Wodify profile"),
        "the no-email fix hint:\n{}",
        failures_human.transcript()
    );
    assert!(
        failures_human
            .stdout
            .contains("fields: email: email domain is not accepted for this merchant"),
        "{}",
        failures_human.transcript()
    );

    snapshot_settings().bind(|| {
        insta::assert_snapshot!("status", stable(&h, &human.stdout));
        insta::assert_json_snapshot!("status_json", stable_status(&h, status));
        insta::assert_snapshot!("failures", sorted_failures_text(&failures_human.stdout));
        insta::assert_json_snapshot!("failures_json", sorted_failures_json(failures));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_inside_batches_read_the_same_as_single_upserts() {
    // The same state as above, but every delivery went out in batches: a refused batch item is
    // resent alone for RevKeen's full error, so `status` and `failures` must not differ.
    let h = synced_with_failures(100).await;
    assert!(h.sims.revkeen.stats().batch_requests >= 2);
    halt_with_wrong_key(&h).await;

    let human = h.run(&["status"]).await;
    let status = h.status_json().await;
    assert_halted_status(&status);
    let failures_human = h.run(&["failures"]).await;
    let failures = json_of(&h.run(&["failures", "--json"]).await);
    let patient = failure(&failures, REFUSED_PATIENT);
    assert_eq!(patient["http_status"], 400, "{failures:#}");
    assert_eq!(
        patient["field_errors"],
        json!({"phone": "phone is not a dialable number"})
    );
    // The same snapshots as the single-upsert test.
    snapshot_settings().bind(|| {
        insta::assert_snapshot!("status", stable(&h, &human.stdout));
        insta::assert_json_snapshot!("status_json", stable_status(&h, status));
        insta::assert_snapshot!("failures", sorted_failures_text(&failures_human.stdout));
        insta::assert_json_snapshot!("failures_json", sorted_failures_json(failures));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_filters_by_source_and_refuses_an_unknown_one() {
    let h = synced_with_failures(1).await;

    let clinic = json_of(&h.run(&["failures", "--source", "clinic", "--json"]).await);
    let ids: Vec<&str> = clinic
        .as_array()
        .expect("array")
        .iter()
        .map(|f| {
            assert_eq!(f["source"], "clinic", "{clinic:#}");
            f["external_id"].as_str().expect("id")
        })
        .collect();
    assert_eq!(ids.len(), 2, "{clinic:#}");
    assert!(ids.contains(&"3") && ids.contains(&"5"), "{ids:?}");

    let gym = h.run(&["failures", "--source", "gym"]).await;
    gym.assert_exit(exit::OK);
    assert!(gym.stdout.contains(&format!("gym {REFUSED_CLIENT}")));
    assert!(
        !gym.stdout.contains("clinic "),
        "--source gym lists clinic:\n{}",
        gym.stdout
    );
    assert!(
        gym.stdout
            .contains("3 failures: 2 rejected before sending, 1 dead letters.")
    );

    for args in [
        &["failures", "--source", "main-gym"][..],
        &["failures", "--source", "main-gym", "--json"][..],
        &["replay", "--source", "main-gym", "--all"][..],
    ] {
        let out = h.run(args).await;
        out.assert_exit(2);
        assert!(
            out.stderr.contains("no source named \"main-gym\""),
            "{args:?}: {}",
            out.transcript()
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.transcript());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_refused_while_revkeen_refuses_the_key() {
    let h = synced_with_failures(1).await;
    let good = halt_with_wrong_key(&h).await;
    let before = h.failures();

    for args in [&["replay", "--all"][..], &["replay", "10007"][..]] {
        let out = h.run(args).await;
        out.assert_exit(exit::AUTH_REFUSED);
        let stderr = out.stderr.to_lowercase();
        assert!(
            stderr.contains("refused the api key") && stderr.contains("revkeen.api_key"),
            "the refusal says why and what to fix:\n{}",
            out.transcript()
        );
        assert!(!out.stdout.contains("Replayed"), "{}", out.transcript());
    }
    assert_eq!(
        h.failures(),
        before,
        "a refused replay changed the failures"
    );
    assert_eq!(h.status_json().await["outbox_depth"], 2);

    // A run with the fixed key clears the halt; then replay is allowed.
    h.write_config(&good);
    h.once().await.assert_exit(exit::REJECTED);
    let status = h.status_json().await;
    assert_eq!(status["auth_halts"], json!([]), "{status:#}");
    h.run(&["replay", "--all"]).await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_once_delivers_dead_letters_once_revkeen_accepts_them() {
    let h = synced_with_failures(1).await;
    // The cause is fixed at RevKeen's side.
    h.sims.revkeen.set_rejections(vec![]);

    // By id: an unknown id and a rejected record are reported, the dead letter is replayed.
    let out = h
        .run(&[
            "replay",
            &REFUSED_CLIENT.to_string(),
            "424242",
            &NO_EMAIL_CLIENT.to_string(),
        ])
        .await;
    assert_ne!(out.code, Some(exit::OK), "{}", out.transcript());
    assert!(
        out.stdout.contains("Replayed 1 dead letters"),
        "{}",
        out.transcript()
    );
    assert!(
        out.stderr.contains("No failure recorded for: 424242"),
        "{}",
        out.transcript()
    );
    assert!(
        out.stderr.contains(&format!(
            "Not replayable (rejected before sending; fix them at the source): {NO_EMAIL_CLIENT}"
        )),
        "{}",
        out.transcript()
    );
    // Replaying the same id again: it is no longer a failure.
    let again = h.run(&["replay", &REFUSED_CLIENT.to_string()]).await;
    assert!(
        again
            .stderr
            .contains(&format!("No failure recorded for: {REFUSED_CLIENT}")),
        "{}",
        again.transcript()
    );

    // All of one source.
    let out = h.run(&["replay", "--source", "clinic", "--all"]).await;
    out.assert_exit(exit::OK);
    assert!(
        out.stdout
            .starts_with("Replayed 1 dead letters into the outbox"),
        "{}",
        out.transcript()
    );
    let status = h.status_json().await;
    assert_eq!(status["outbox_depth"], 2, "{status:#}");
    assert_eq!(status["dead_letters"], 0, "{status:#}");
    let listed = json_of(&h.run(&["failures", "--json"]).await);
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .all(|f| f["kind"] == "rejected"),
        "{listed:#}"
    );

    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::REJECTED);
    let puts: Vec<String> = h
        .sims
        .revkeen
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        puts.len(),
        2,
        "exactly the two replayed customers are sent: {puts:?}"
    );
    for (revkeen_source, id) in [
        ("wodify", REFUSED_CLIENT.to_string()),
        ("practicehub", REFUSED_PATIENT.to_string()),
    ] {
        assert!(
            puts.iter()
                .any(|p| p.ends_with(&format!("/{revkeen_source}/{id}"))),
            "{id} not sent: {puts:?}"
        );
        assert!(
            h.sims.revkeen.customer(revkeen_source, &id).is_some(),
            "RevKeen does not hold {revkeen_source}/{id} after the replay"
        );
    }
    let client = h
        .sims
        .revkeen
        .customer("wodify", &REFUSED_CLIENT.to_string())
        .expect("delivered");
    let source_email = h.sims.wodify.client(REFUSED_CLIENT).expect("client")["email"]
        .as_str()
        .expect("email")
        .trim()
        .to_lowercase();
    assert_eq!(client.fields["email"], source_email.as_str());
    let status = h.status_json().await;
    assert_eq!(
        (
            status["outbox_depth"].as_u64(),
            status["dead_letters"].as_u64(),
            status["rejected"].as_u64()
        ),
        (Some(0), Some(0), Some(3)),
        "{status:#}"
    );
}

/// A gym-only harness with `clients` valid clients and Wodify answering slowly, so a
/// `--once` takes a while.
async fn slow_gym(clients: usize, latency_ms: u64) -> Harness {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, clients, 5);
    h.sims.wodify.set_faults(sync_daemon_sim::Faults {
        latency_ms,
        ..Default::default()
    });
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_while_once_holds_the_state_file() {
    let h = slow_gym(500, 150).await;
    let running = h.spawn_once();
    let wodify = h.sims.wodify.clone();
    // The third page is requested only after the first one committed.
    wait_until(
        "three Wodify pages requested",
        Duration::from_secs(30),
        || wodify.stats().requests >= 3,
    )
    .await;

    let json = h.run(&["status", "--json"]).await;
    json.assert_exit(exit::OK);
    let status = json_of(&json);
    assert_eq!(status["running"], true, "{status:#}");
    let gym = source(&status, "gym");
    assert_eq!(gym["last_poll"]["outcome"], "running", "{status:#}");
    assert!(gym["last_poll"]["finished_at"].is_null());
    let position = gym["position"].as_str().expect("position");
    assert!(
        position.starts_with("Wodify scan at client id 10")
            && position.ends_with("(no complete scan yet)"),
        "mid-scan position in words: {position:?}"
    );
    let human = h.run(&["status"]).await;
    human.assert_exit(exit::OK);
    assert!(
        human.stdout.contains("a --once run is in progress"),
        "{}",
        human.transcript()
    );
    assert!(human.stdout.contains("running"), "{}", human.stdout);

    running.finish().await.assert_exit(exit::OK);
    let status = h.status_json().await;
    assert_eq!(status["running"], false);
    assert_eq!(source(&status, "gym")["last_poll"]["outcome"], "ok");
    assert_eq!(source(&status, "gym")["delivered"]["created"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_no_next_poll_while_a_once_runs() {
    let h = slow_gym(400, 150).await;
    let running = h.spawn_once();
    let wodify = h.sims.wodify.clone();
    wait_until("a Wodify page requested", Duration::from_secs(30), || {
        wodify.stats().requests >= 2
    })
    .await;
    let status = h.status_json().await;
    running.finish().await.assert_exit(exit::OK);
    assert_eq!(status["running"], true);
    assert!(
        source(&status, "gym")["next_poll"].is_null(),
        "--once schedules no further poll, yet status says: {status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_what_a_running_poll_has_fetched_so_far() {
    let h = slow_gym(500, 150).await;
    let running = h.spawn_once();
    let wodify = h.sims.wodify.clone();
    wait_until(
        "three Wodify pages requested",
        Duration::from_secs(30),
        || wodify.stats().requests >= 3,
    )
    .await;
    let status = h.status_json().await;
    running.finish().await.assert_exit(exit::OK);
    let poll = &source(&status, "gym")["last_poll"];
    assert_eq!(poll["outcome"], "running", "{status:#}");
    assert!(
        poll["fetched"].as_u64().is_some_and(|n| n >= 100),
        "the position is past the first page, but status says fetched {}: {status:#}",
        poll["fetched"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_next_scheduled_poll_while_the_daemon_runs() {
    let h = Harness::start().await;
    h.unlimited();
    seed_valid_clients(&h.sims.wodify, 40, 3);
    seed_valid_patients(&h.sims.practicehub, 10, 3);
    let daemon = h.start_daemon(&h.base_config()).await;
    let revkeen = h.sims.revkeen.clone();
    wait_until("the first polls delivered", Duration::from_secs(30), || {
        revkeen.customers("wodify").len() == 40 && revkeen.customers("practicehub").len() == 10
    })
    .await;

    let status = h.status_json().await;
    assert_eq!(status["running"], true, "{status:#}");
    let now = chrono::Utc::now();
    for (name, every_min) in [("gym", 15), ("clinic", 5)] {
        let next = source(&status, name)["next_poll"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no next_poll while the daemon runs: {status:#}"));
        let next = chrono::DateTime::parse_from_rfc3339(next).expect("RFC 3339");
        use chrono::Timelike as _;
        assert!(
            next > now - chrono::Duration::seconds(2)
                && next <= now + chrono::Duration::minutes(every_min),
            "{name}: next poll {next} is not within {every_min} min of {now}"
        );
        assert_eq!(
            (next.minute() % every_min as u32, next.second()),
            (0, 0),
            "{name}: {next} is not on the schedule"
        );
    }
    let human = h.run(&["status"]).await;
    let gym_row = human
        .stdout
        .lines()
        .find(|l| l.starts_with("gym "))
        .expect("a gym row");
    assert!(
        !gym_row.trim_end().ends_with('-'),
        "the NEXT POLL column is empty while the daemon runs:\n{}",
        human.stdout
    );

    let alive = h.run(&["healthcheck"]).await;
    alive.assert_exit(exit::OK);
    assert_eq!(alive.stdout.trim(), "alive");

    daemon.stop().await.assert_exit(exit::OK);
    h.run(&["healthcheck"]).await.assert_exit(1);
    let status = h.status_json().await;
    assert_eq!(status["running"], false);
    assert!(source(&status, "gym")["next_poll"].is_null(), "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_status_shows_when_the_last_poll_ended() {
    // A poll of about two seconds, so its start and end fall in different seconds.
    let h = slow_gym(300, 500).await;
    h.once().await.assert_exit(exit::OK);
    let status = h.status_json().await;
    let poll = &source(&status, "gym")["last_poll"];
    let (started, finished) = (
        poll["started_at"].as_str().expect("started_at"),
        poll["finished_at"].as_str().expect("finished_at"),
    );
    assert_ne!(started, finished);
    let human = h.run(&["status"]).await;
    assert!(
        human.stdout.contains(&started.replace('T', " ")),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains(&finished.replace('T', " ")),
        "the table does not say when the last poll ended ({finished}):\n{}",
        human.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_failures_answer_before_the_first_run_without_creating_state() {
    let h = Harness::start().await;
    let status = h.status_json().await;
    assert_eq!(
        (status["outbox_depth"].as_u64(), status["running"].as_bool()),
        (Some(0), Some(false)),
        "{status:#}"
    );
    for name in ["gym", "clinic"] {
        let source = source(&status, name);
        assert!(source["last_poll"].is_null(), "{status:#}");
        assert_eq!(source["position"], "not polled yet");
    }
    let human = h.run(&["status"]).await;
    human.assert_exit(exit::OK);
    assert!(human.stdout.contains("never"), "{}", human.stdout);
    let failures = h.run(&["failures"]).await;
    failures.assert_exit(exit::OK);
    assert!(
        failures.stdout.starts_with("No failures"),
        "{}",
        failures.stdout
    );
    assert_eq!(h.run(&["failures", "--json"]).await.stdout.trim(), "[]");
    assert!(
        !h.state.exists(),
        "a read-only command created the state file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_source_whose_key_is_refused_until_a_run_succeeds() {
    let h = Harness::start().await;
    h.unlimited();
    let good = h.config_for("gym");
    h.write_config(&replaced(
        &good,
        &format!("api_key = \"{}\"", sync_daemon_sim::WODIFY_KEY),
        "api_key = \"wodify_revoked_key_5150\"",
    ));
    seed_valid_clients(&h.sims.wodify, 20, 2);
    h.once().await.assert_exit(exit::AUTH_REFUSED);

    let status = h.status_json().await;
    let halts = status["auth_halts"].as_array().expect("auth_halts");
    assert_eq!(halts.len(), 1, "{status:#}");
    assert_eq!(halts[0]["target"], "gym");
    assert!(
        halts[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("api_key")),
        "the reason names the setting to fix: {status:#}"
    );
    assert_eq!(
        source(&status, "gym")["last_poll"]["outcome"],
        "auth_refused"
    );
    let human = h.run(&["status"]).await;
    assert!(
        human
            .stdout
            .contains("AUTH HALT: gym refused the key since "),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("gym: last poll error: "),
        "{}",
        human.stdout
    );

    h.write_config(&good);
    h.once().await.assert_exit(exit::OK);
    let status = h.status_json().await;
    assert_eq!(status["auth_halts"], json!([]), "{status:#}");
    assert_eq!(source(&status, "gym")["last_poll"]["outcome"], "ok");
}

/// `replay` while the daemon runs: the idle worker sleeps without a timer, and the daemon's
/// watch of the state file (another process committed) wakes it, so the replayed dead letter
/// is delivered without waiting for a scheduled poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_the_daemon_runs_is_delivered_by_it() {
    let h = synced_with_failures(1).await;
    h.sims.revkeen.set_rejections(vec![]);
    let daemon = h
        .start_daemon(&crate::support::yearly_schedules(&with_revkeen(
            &h.base_config(),
            "batch_size = 1",
        )))
        .await;
    // The start's polls find nothing new; the worker goes idle.
    let revkeen = h.sims.revkeen.clone();
    wait_until_async("the start's polls", Duration::from_secs(30), || async {
        daemon.get("/readyz").await.0 == 200
    })
    .await;
    assert!(
        revkeen
            .customer("wodify", &REFUSED_CLIENT.to_string())
            .is_none(),
        "refused before"
    );
    h.run(&["replay", &REFUSED_CLIENT.to_string()])
        .await
        .assert_exit(exit::OK);
    // Fails with the daemon's log.
    daemon
        .wait_until(
            "the replayed customer at RevKeen",
            Duration::from_secs(30),
            || async {
                revkeen
                    .customer("wodify", &REFUSED_CLIENT.to_string())
                    .is_some()
            },
        )
        .await;
    daemon.stop().await.assert_exit(exit::OK);
}
