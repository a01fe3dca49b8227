//! Crash safety: `--once` SIGKILLed at random moments, with both sources synced, faults on at
//! every upstream (errors and dropped connections) and clients changing between kills, loses
//! nothing. After the last kill a run to completion leaves every valid client at RevKeen
//! with its latest name and email, RevKeen never saw one idempotency key with two bodies, and
//! the only failures listed are the clients without a valid email (exit 65). A kill mid-scan is
//! followed by a run that resumes the Wodify scan where it stopped instead of starting over, and
//! a killed PracticeHub listing resumes from its saved `links.next`. A customer changed while its
//! batch was in flight at the kill gets its new data without an idempotency conflict.
//!
//! Environment:
//! - `SYNC_DAEMON_CRASH_ITERATIONS`: kills before the final run (default 5). Each one costs a
//!   second or two; the soak is `SYNC_DAEMON_CRASH_ITERATIONS=200` (about 10 minutes).
//! - `SYNC_DAEMON_CRASH_SEED`: seed for the kill moments and the changes (random by default;
//!   the seed in use is printed, so a failure can be replayed).

use std::time::Duration;

use serde_json::{Value, json};
use sync_daemon::store::FailureKind;
use sync_daemon_sim::Faults;

use crate::support::{
    Harness, Output, assert_revkeen_holds, exit, expected_practicehub, expected_wodify,
    invalid_wodify, name_at_revkeen, rename_client, seed_valid_patients, wait_until, with_revkeen,
    with_source,
};

const CLIENTS: usize = 1500;
/// Clinic patients synced beside the gym in the random-kill test.
const PATIENTS: usize = 300;
/// Wodify pages in a full scan (100 clients a page).
const PAGES: usize = CLIENTS / 100;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number"))
    })
}

/// Slow enough that a run takes a few seconds: a scan of ~1 s and ~150 batches of 10.
fn slow_down(h: &Harness) {
    h.sims.wodify.set_faults(Faults {
        latency_ms: 60,
        ..Faults::default()
    });
    h.sims.revkeen.set_faults(Faults {
        latency_ms: 30,
        ..Faults::default()
    });
}

/// The `N` of the keyset query `q=id|gt|N` in a Wodify request, if it is one.
fn keyset_after(path_and_query: &str) -> Option<i64> {
    let query = path_and_query.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "q")
        .and_then(|(_, q)| q.strip_prefix("id|gt|").and_then(|n| n.parse().ok()))
}

/// Renames a few random clients (and gives some a new email) so later runs have changes to
/// carry across kills.
fn change_some_clients(h: &Harness, rng: &mut fastrand::Rng, round: usize) {
    let valid: Vec<String> = expected_wodify(&h.sims.wodify).into_keys().collect();
    for n in 0..3 {
        let id: i64 = valid[rng.usize(..valid.len())].parse().expect("numeric id");
        let mut patch = json!({"last_name": format!("Round{round}x{n}")});
        if rng.bool() {
            patch["email"] = Value::String(format!("moved.r{round}.{id}@example.net"));
        }
        assert!(h.sims.wodify.update_client(id, patch));
    }
}

/// Kills a run at a random moment: mid-scan, mid-send, or after a random time.
async fn kill_at_random(h: &Harness, rng: &mut fastrand::Rng) -> Output {
    let running = h.spawn_once();
    let wodify_before = h.sims.wodify.stats().requests;
    let revkeen_before = h.sims.revkeen.stats().requests;
    let out = match rng.u8(0..3) {
        0 => {
            let pages = rng.u64(1..PAGES as u64);
            let wodify = h.sims.wodify.clone();
            running
                .kill_when(move || wodify.stats().requests >= wodify_before + pages)
                .await
        }
        1 => {
            let sends = rng.u64(1..120);
            let revkeen = h.sims.revkeen.clone();
            running
                .kill_when(move || revkeen.stats().requests >= revkeen_before + sends)
                .await
        }
        _ => {
            // The moment itself is the random variable here, not a condition to wait for.
            let at = std::time::Instant::now() + Duration::from_millis(rng.u64(0..3000));
            running
                .kill_when(move || std::time::Instant::now() >= at)
                .await
        }
    };
    eprintln!(
        "  killed after {:.2} s (exit {:?}); Wodify +{} requests, RevKeen +{} requests",
        out.elapsed.as_secs_f64(),
        out.code,
        h.sims.wodify.stats().requests - wodify_before,
        h.sims.revkeen.stats().requests - revkeen_before
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runs_lose_nothing_and_a_killed_scan_resumes() {
    let iterations = env_u64("SYNC_DAEMON_CRASH_ITERATIONS").unwrap_or(5);
    let seed = env_u64("SYNC_DAEMON_CRASH_SEED").unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash test: {iterations} kills, SYNC_DAEMON_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let h = Harness::start().await;
    h.unlimited();
    let config = with_revkeen(
        &with_revkeen(&h.base_config(), "batch_size = 10"),
        "concurrency = 2",
    );
    let config = with_source(&config, "gym", "requests_per_second = 1000\nburst = 1000");
    let config = with_source(&config, "clinic", "requests_per_second = 1000");
    h.write_config(&config);
    h.sims.wodify.seed(CLIENTS, 21);
    seed_valid_patients(&h.sims.practicehub, PATIENTS, 22);
    slow_down(&h);
    let faulty = |latency_ms| Faults {
        latency_ms,
        error_rate: 0.03,
        drop_rate: 0.02,
        ..Faults::default()
    };

    // A deliberate kill mid-scan: at least two pages are committed, the scan is not finished.
    h.sims.wodify.clear_log();
    let wodify = h.sims.wodify.clone();
    let killed = h
        .spawn_once()
        .kill_when(move || wodify.stats().requests >= 4)
        .await;
    assert_eq!(
        killed.code,
        None,
        "the run should still have been going\n{}",
        killed.transcript()
    );
    let served = h.sims.wodify.requests().len();
    assert!(
        served < PAGES,
        "killed after the scan ended ({served} pages)"
    );
    change_some_clients(&h, &mut rng, 0);

    // The next run resumes the scan instead of starting at id 0.
    h.sims.wodify.clear_log();
    let running = h.spawn_once();
    let wodify = h.sims.wodify.clone();
    wait_until(
        "the resumed run's first page",
        Duration::from_secs(30),
        || !wodify.requests().is_empty(),
    )
    .await;
    let first = h.sims.wodify.requests()[0].path_and_query.clone();
    let after = keyset_after(&first);
    assert!(
        after.is_some_and(|n| n >= 10_200),
        "a run after a kill mid-scan should resume past the pages already read, but its first \
         Wodify request was {first}"
    );
    let killed = running.kill().await;
    assert_ne!(killed.code, Some(exit::OK), "{}", killed.transcript());

    // Random kills with faults on everywhere, with changes in between.
    h.sims.wodify.set_faults(faulty(60));
    h.sims.revkeen.set_faults(faulty(30));
    h.sims.practicehub.set_faults(faulty(20));
    for round in 1..=iterations {
        let out = kill_at_random(&h, &mut rng).await;
        assert!(
            matches!(out.code, None | Some(exit::REJECTED)),
            "round {round}: a run ended by itself with an unexpected code\n{}",
            out.transcript()
        );
        change_some_clients(&h, &mut rng, round as usize);
    }

    // A run to completion delivers the latest data for everyone.
    h.sims.wodify.set_faults(Faults::default());
    h.sims.revkeen.set_faults(Faults::default());
    h.sims.practicehub.set_faults(Faults::default());
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    let integrity: String = rusqlite::Connection::open(&h.state)
        .expect("open the state file")
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    let stats = h.sims.revkeen.stats();
    eprintln!(
        "crash soak: {iterations} random kills with faults on; RevKeen holds every valid client and all {PATIENTS} patients current; {} idempotency conflicts, {} replays, {} stale answers; integrity_check {integrity}",
        stats.conflicts, stats.replayed, stats.stale
    );
    assert_eq!(
        stats.conflicts, 0,
        "RevKeen saw one idempotency key with two bodies"
    );
    let mut failed: Vec<String> = h
        .failures()
        .into_iter()
        .map(|f| {
            assert_eq!(f.kind, FailureKind::Rejected, "unexpected failure {f:?}");
            f.external_id
        })
        .collect();
    failed.sort();
    let mut invalid: Vec<String> = invalid_wodify(&h.sims.wodify)
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    invalid.sort();
    assert_eq!(
        failed, invalid,
        "failures should be exactly the clients without an email"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_changed_while_its_batch_was_in_flight_at_a_crash_gets_its_new_data() {
    // The kill lands while RevKeen is still working on the first batch (it finishes the write
    // anyway); one of the batch's customers then changes at the source. The restart must re-send
    // the recorded batch without reusing its key for other bodies, then send the new version.
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&with_revkeen(
        &with_revkeen(&h.config_for("gym"), "batch_size = 10"),
        "concurrency = 1",
    ));
    crate::support::seed_valid_clients(&h.sims.wodify, 60, 59);
    h.sims.revkeen.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let revkeen = h.sims.revkeen.clone();
    let killed = h
        .spawn_once()
        .kill_when(move || !revkeen.requests().is_empty())
        .await;
    assert_eq!(killed.code, None, "{}", killed.transcript());
    h.sims.revkeen.set_faults(Faults::default());

    let body = h.sims.revkeen.requests()[0]
        .body
        .clone()
        .expect("bodies are recorded");
    let batch: Value = serde_json::from_str(&body).expect("batch body is JSON");
    let member: i64 = batch["customers"][3]["external_id"]
        .as_str()
        .expect("external id")
        .parse()
        .expect("numeric");
    rename_client(&h.sims.wodify, member, "AfterCrash");

    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
}

/// A clinic of 600 valid patients whose first `--once` is killed after two pages; then one
/// patient on page 1 (already read) and one on page 6 (not yet read) change. Returns their ids.
async fn killed_listing_then_changes(h: &Harness) -> (i64, i64) {
    h.unlimited();
    let config = with_revkeen(&h.config_for("clinic"), "batch_size = 10");
    h.write_config(&with_source(
        &config,
        "clinic",
        "requests_per_second = 1000\nburst = 1000",
    ));
    seed_valid_patients(&h.sims.practicehub, 600, 71);
    h.sims.practicehub.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });

    let practicehub = h.sims.practicehub.clone();
    let killed = h
        .spawn_once()
        .kill_when(move || practicehub.stats().requests >= 3)
        .await;
    assert_eq!(killed.code, None, "{}", killed.transcript());
    assert!(
        h.sims.practicehub.requests().len() < 6,
        "the listing had ended"
    );

    let (early, late) = (42, 577);
    for id in [early, late] {
        assert!(
            h.sims
                .practicehub
                .update_patient(id, json!({"last_name": format!("Changed{id}")}))
        );
    }
    h.sims.practicehub.clear_log();
    (early, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_practicehub_listing_resumes_from_its_next_link() {
    let h = Harness::start().await;
    let (early, late) = killed_listing_then_changes(&h).await;

    h.once().await.assert_exit(exit::OK);
    let first = h.sims.practicehub.requests()[0].path_and_query.clone();
    assert!(
        first.contains("page=3"),
        "the listing should resume from the saved next link: {first}"
    );
    assert!(
        name_at_revkeen(&h, "practicehub", &late.to_string())
            .is_some_and(|name| name.ends_with(&format!("Changed{late}")))
    );

    // After a further (incremental) run, RevKeen holds the change to a page read before the
    // kill and every patient as the clinic does. (The next test requires the resumed run above
    // to have delivered that change already.)
    h.once().await.assert_exit(exit::OK);
    assert!(
        name_at_revkeen(&h, "practicehub", &early.to_string())
            .is_some_and(|name| name.ends_with(&format!("Changed{early}")))
    );
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &crate::support::expected_practicehub(&h.sims.practicehub),
    );
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_practicehub_once_delivers_changes_made_before_it_started() {
    let h = Harness::start().await;
    let (early, _) = killed_listing_then_changes(&h).await;
    h.once().await.assert_exit(exit::OK);
    let name = name_at_revkeen(&h, "practicehub", &early.to_string());
    assert!(
        name.as_deref()
            .is_some_and(|name| name.ends_with(&format!("Changed{early}"))),
        "patient {early} changed before this --once started, which exited 0, yet RevKeen \
         still holds {name:?}"
    );
}
