//! Each injected fault on its own loses nothing: Wodify's error envelope inside a 200, Wodify
//! 429s, RevKeen 5xx, RevKeen 429s and dropped RevKeen connections all end with every client at
//! RevKeen and exit 0 (every seeded client has a valid email). A dropped connection after
//! RevKeen applied the write is retried as a replay: no customer is written twice and RevKeen
//! never sees one idempotency key with two bodies, in batches and in single upserts. RevKeen
//! staying down ends `--once` with 69 and keeps the customers queued for the next run; a write
//! that outlives the daemon's timeout is retried through 409 `idempotency_in_progress` to a
//! replay.
//!
//! Each test first injects its fault at rate 1.0 until the simulator has served it at least
//! once, then lowers it to the stated rate, so every run really meets the fault.

use std::time::Duration;

use sync_daemon_sim::Faults;

use crate::support::{
    Harness, Output, assert_revkeen_holds, assert_written_once, exit, expected_wodify,
    seed_valid_clients, wait_until, with_revkeen, with_source,
};

const CLIENTS: usize = 500;

/// A gym-only harness with every client valid; `revkeen_lines` go into `[revkeen]`.
async fn gym(revkeen_lines: &[&str]) -> Harness {
    gym_of(CLIENTS, revkeen_lines).await
}

/// [`gym`] with `clients` clients.
async fn gym_of(clients: usize, revkeen_lines: &[&str]) -> Harness {
    let h = Harness::start().await;
    let mut config = h.config_for("gym");
    for line in revkeen_lines {
        config = with_revkeen(&config, line);
    }
    h.write_config(&config);
    seed_valid_clients(&h.sims.wodify, clients, 3);
    h
}

/// The simulator a fault is injected at.
#[derive(Clone, Copy)]
enum At {
    Wodify,
    RevKeen,
}

/// Runs `--once` with one fault (`field` of [`Faults`]) at `at`: at rate 1.0 until `served`
/// counts one, then at `rate`.
async fn once_with_fault(
    h: &Harness,
    at: At,
    rate: f64,
    field: fn(&mut Faults) -> &mut f64,
    served: fn(&Harness) -> u64,
) -> Output {
    let set = |rate: f64| {
        let mut faults = Faults::default();
        *field(&mut faults) = rate;
        match at {
            At::Wodify => h.sims.wodify.set_faults(faults),
            At::RevKeen => h.sims.revkeen.set_faults(faults),
        }
    };
    set(1.0);
    let running = h.spawn_once();
    wait_until("the fault to be injected", Duration::from_secs(30), || {
        served(h) >= 1
    })
    .await;
    set(rate);
    running.finish().await
}

/// A gym (`revkeen_lines` in `[revkeen]`) synced by `--once` through one fault (see
/// [`once_with_fault`]): everything is delivered.
async fn delivered_despite(
    revkeen_lines: &[&str],
    at: At,
    rate: f64,
    field: fn(&mut Faults) -> &mut f64,
    served: fn(&Harness) -> u64,
) -> Harness {
    let h = gym(revkeen_lines).await;
    let out = once_with_fault(&h, at, rate, field, served).await;
    assert_all_delivered(&h, &out);
    h
}

/// A test that `--once` through one fault delivers everything: name, `[revkeen]` lines, where,
/// rate, the [`Faults`] field, and the simulator counter that says it was served.
macro_rules! delivered_despite_test {
    ($name:ident, [$($line:literal),*], $at:expr, $rate:expr, $field:ident, $sim:ident . $served:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            delivered_despite(
                &[$($line),*],
                $at,
                $rate,
                |f| &mut f.$field,
                |h| h.sims.$sim.stats().$served,
            )
            .await;
        }
    };
}

/// Every client is at RevKeen with its data, exit 0, and no idempotency conflict.
#[track_caller]
fn assert_all_delivered(h: &Harness, out: &Output) {
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
    assert!(
        h.failures().is_empty(),
        "no failures expected: {:?}",
        h.failures()
    );
}

delivered_despite_test!(
    wodify_error_envelope_inside_a_200_is_retried,
    [],
    At::Wodify,
    0.3,
    envelope_rate,
    wodify.envelopes
);

delivered_despite_test!(
    wodify_429s_are_waited_out,
    [],
    At::Wodify,
    0.3,
    rate_429,
    wodify.rate_limited
);

delivered_despite_test!(
    revkeen_5xx_are_retried,
    ["batch_size = 10"],
    At::RevKeen,
    0.2,
    error_rate,
    revkeen.server_errors
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeen_429s_are_waited_out() {
    let h = delivered_despite(
        &["batch_size = 25"],
        At::RevKeen,
        0.2,
        |f| &mut f.rate_429,
        |h| h.sims.revkeen.stats().rate_limited,
    )
    .await;

    // A 429 carries `Retry-After: 1`, and the daemon pauses every request to RevKeen for it:
    // apart from requests already on their way, RevKeen sees nothing in the second after.
    let log = h.sims.revkeen.requests();
    for limited in log.iter().filter(|r| r.status == 429) {
        let during: Vec<u64> = log
            .iter()
            .map(|r| r.at_ms)
            .filter(|&at| at > limited.at_ms + 250 && at < limited.at_ms + 900)
            .collect();
        assert!(
            during.is_empty(),
            "requests at {during:?} ms inside the Retry-After of a 429 at {} ms",
            limited.at_ms
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeen_dropped_connections_are_replayed_not_rewritten() {
    let h = delivered_despite(
        &["batch_size = 10"],
        At::RevKeen,
        0.2,
        |f| &mut f.drop_rate,
        |h| h.sims.revkeen.stats().dropped,
    )
    .await;
    let stats = h.sims.revkeen.stats();
    assert!(
        stats.replayed >= 1,
        "a write whose answer was lost is retried with its key and replayed: {stats:?}"
    );
    assert_written_once(&h);
    assert_eq!(stats.created, CLIENTS as u64);
    assert_eq!(stats.updated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeen_dropped_single_upserts_are_replayed_not_rewritten() {
    let h = gym_of(150, &["batch_size = 1"]).await;
    let out = once_with_fault(
        &h,
        At::RevKeen,
        0.2,
        |f| &mut f.drop_rate,
        |h| h.sims.revkeen.stats().dropped,
    )
    .await;
    assert_all_delivered(&h, &out);
    let stats = h.sims.revkeen.stats();
    assert!(stats.single_requests > 150, "{stats:?}");
    assert!(stats.replayed >= 1, "{stats:?}");
    assert_eq!((stats.created, stats.updated), (150, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeen_down_exits_69_and_the_next_run_delivers_everything() {
    let h = gym(&["max_attempts = 3", "batch_size = 50"]).await;
    h.sims.revkeen.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::UNAVAILABLE);
    assert!(
        out.stderr.to_lowercase().contains("revkeen"),
        "stderr should say RevKeen stayed unavailable\n{}",
        out.transcript()
    );
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    assert!(
        h.failures().is_empty(),
        "--once keeps unsent customers queued rather than dead-lettering them: {:?}",
        h.failures()
    );

    h.sims.revkeen.set_faults(Faults::default());
    let out = h.once().await;
    assert_all_delivered(&h, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_write_still_in_progress_is_retried_until_replayed() {
    // The first requests take longer than the daemon's timeout; their retries find the key
    // still in progress (409 idempotency_in_progress) and must wait, then get the replay.
    let h = gym(&["timeout_secs = 1", "batch_size = 50"]).await;
    h.sims.revkeen.set_faults(Faults {
        latency_ms: 2500,
        ..Faults::default()
    });
    let running = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    wait_until("the first slow write", Duration::from_secs(30), || {
        revkeen.stats().requests >= 1
    })
    .await;
    h.sims.revkeen.set_faults(Faults::default());
    let out = running.finish().await;
    assert_all_delivered(&h, &out);
    let stats = h.sims.revkeen.stats();
    assert!(stats.in_progress >= 1, "{stats:?}");
    assert!(stats.replayed >= 1, "{stats:?}");
    assert_written_once(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wodify_down_exits_69_and_the_next_run_delivers_everything() {
    let h = gym(&[]).await;
    // Two attempts per page keep the test short (the default, 8, takes about a minute).
    h.write_config(&with_source(
        &h.config_for("gym"),
        "gym",
        "max_attempts = 2",
    ));
    h.sims.wodify.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::UNAVAILABLE);
    assert!(out.stderr.contains("unavailable"), "{}", out.transcript());
    h.sims.wodify.set_faults(Faults::default());
    let out = h.once().await;
    assert_all_delivered(&h, &out);
}
