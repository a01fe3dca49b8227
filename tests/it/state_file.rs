//! The state file against a careless host: a disk that fills up under a running daemon (and one
//! already full at start), a reset that moves the file aside, another application's database
//! at `state_path`, a damaged page, the file moved while the daemon runs, a history that would
//! grow for ever, and permissions. Each asserts what the operator sees — the answer of
//! `/readyz`, the message, the exit code — and that nothing is lost.

use std::time::Duration;

use sync_daemon_sim::Faults;

use crate::support::{
    Harness, assert_revkeen_holds, at_revkeen, exit, expected_wodify, only_source, rename_client,
    replaced, seed_valid_clients, with_revkeen,
};

/// A gym-only harness with `clients` valid clients, polled every 2 s in daemon mode, and its
/// config (written).
async fn gym(clients: usize) -> (Harness, String) {
    let h = Harness::start().await;
    h.unlimited();
    seed_valid_clients(&h.sims.wodify, clients, 71);
    let config = with_revkeen(
        &replaced(
            &only_source(&h.base_config(), "gym"),
            "0 */15 * * * *",
            "*/2 * * * * *",
        ),
        "max_attempts = 2",
    );
    h.write_config(&config);
    (h, config)
}

/// Fills the state file with a table of `pages` pages and compacts it, so that it has no free
/// page left: a daemon capped at its size (`SYNC_DAEMON_MAX_PAGES`) finds the disk full at its
/// first write that needs a new page. Returns the page count.
fn fill(h: &Harness, pages: usize) -> u64 {
    let conn = rusqlite::Connection::open(&h.state).expect("open the state file");
    conn.execute_batch("CREATE TABLE filler (b BLOB)")
        .expect("create");
    for _ in 0..pages {
        conn.execute("INSERT INTO filler VALUES (zeroblob(4000))", [])
            .expect("fill");
    }
    conn.execute_batch("VACUUM").expect("compact");
    conn.pragma_query_value(None, "page_count", |row| row.get(0))
        .expect("page count")
}

/// Frees the filler's pages (the daemon reuses them without growing the file).
fn free_space(h: &Harness) {
    let conn = rusqlite::Connection::open(&h.state).expect("open the state file");
    conn.busy_timeout(Duration::from_secs(30)).expect("timeout");
    conn.execute_batch("DROP TABLE filler")
        .expect("drop the filler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_daemon_with_readyz_naming_the_state_file_until_space_returns() {
    let (h, config) = gym(300).await;
    // 300 clients queued but not sent (RevKeen down), then 50 of them change at the source.
    h.sims.revkeen.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    h.once().await.assert_exit(exit::UNAVAILABLE);
    h.sims.revkeen.set_faults(Faults::default());
    for id in 10_001..10_051 {
        rename_client(&h.sims.wodify, id, "Refilled");
    }
    let pages = fill(&h, 2000);

    let daemon = h.spawn_daemon(&config, |command| {
        command.env("SYNC_DAEMON_MAX_PAGES", pages.to_string());
    });
    daemon.wait_healthy().await;
    let reason = daemon
        .wait_for(
            "/readyz to report the full state file",
            Duration::from_secs(30),
            || async {
                match daemon.try_get("/readyz").await {
                    Some((503, body)) if body.contains("cannot be written") => Ok(body),
                    other => Err(format!("/readyz: {other:?}")),
                }
            },
        )
        .await;
    let state = h.state.display().to_string();
    assert!(
        reason.contains("the disk is full") && reason.contains(&state),
        "{reason}"
    );
    // Alive all along: a full disk is a wait, not a hang (no restart would help).
    assert_eq!(daemon.get("/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        daemon.get("/healthz").await.0,
        200,
        "still alive while full"
    );

    free_space(&h);
    daemon.wait_ready().await;
    let expected = expected_wodify(&h.sims.wodify);
    assert_eq!(expected.len(), 300);
    daemon
        .wait_until(
            "RevKeen to hold every client once space returned",
            Duration::from_secs(60),
            || async { at_revkeen(&h.sims.revkeen, "wodify") == expected },
        )
        .await;
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr
            .contains("Sending paused: the state file failed; retrying.")
            && out
                .stderr
                .contains("The state file accepts writes again; sending resumes."),
        "{}",
        out.transcript()
    );
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_already_full_at_start_is_named_as_such_and_a_later_run_delivers_everything() {
    let (h, _) = gym(50).await;
    let out = h
        .run_with_env(&["--once"], &[("SYNC_DAEMON_MAX_PAGES", "3")])
        .await;
    out.assert_exit(1);
    assert!(
        out.stderr.contains("cannot be written: the disk is full")
            && out.stderr.contains(&h.state.display().to_string()),
        "{}",
        out.transcript()
    );
    assert!(
        !out.stderr.contains("disk I/O error"),
        "{}",
        out.transcript()
    );
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}
