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
    // Not through run_with_env, which takes every value it sets for a secret (and "3" may
    // well be in the temporary directory's name).
    let mut command = h.command(&["--once"]);
    command.env("SYNC_DAEMON_MAX_PAGES", "3");
    let out = crate::support::run_command(command).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_moved_aside_gets_a_new_identity_so_revkeen_replays_nothing_from_before() {
    let (h, _) = gym(10).await;
    // Clients without `updated`: RevKeen cannot order their versions (no
    // `external_updated_at`), so only the idempotency key stands between a write and a replay.
    let originals: Vec<serde_json::Value> = h
        .sims
        .wodify
        .clients()
        .into_iter()
        .map(|mut client| {
            client.as_object_mut().expect("object").remove("updated");
            client
        })
        .collect();
    for client in &originals {
        h.sims.wodify.put_client(client.clone());
    }
    h.once().await.assert_exit(exit::OK);
    // A → B, synced.
    for client in &originals {
        let mut changed = client.clone();
        changed["last_name"] = "Changed".into();
        h.sims.wodify.put_client(changed);
    }
    h.once().await.assert_exit(exit::OK);
    // The documented cure for a damaged file: move it aside.
    std::fs::rename(&h.state, h.dir().join("state.db.damaged")).expect("move aside");
    // Back to A, byte for byte: the bodies of the very first sends, with version 1 again.
    for client in originals {
        h.sims.wodify.put_client(client);
    }
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    let stats = h.sims.revkeen.stats();
    assert_eq!((stats.replayed, stats.updated), (0, 10), "{stats:?}");
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_database_at_state_path_is_refused_untouched() {
    let (h, _) = gym(5).await;
    for version in [0, 3] {
        {
            let other = rusqlite::Connection::open(&h.state).expect("create");
            other
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS members (id INTEGER PRIMARY KEY, name TEXT);
                     INSERT INTO members (name) VALUES ('Ada');",
                )
                .expect("another application's data");
            other
                .pragma_update(None, "user_version", version)
                .expect("version");
        }
        let before = std::fs::read(&h.state).expect("read");
        let out = h.once().await;
        out.assert_exit(exit::CONFIG);
        assert!(
            out.stderr.contains(&format!(
                "{} is not a sync-daemon state file",
                h.state.display()
            )) && out.stderr.contains("members")
                && out.stderr.contains("left untouched"),
            "{}",
            out.transcript()
        );
        assert_eq!(
            std::fs::read(&h.state).expect("read"),
            before,
            "the file was modified"
        );
        let status = h.run(&["status"]).await;
        assert_ne!(status.code, Some(exit::OK), "{}", status.transcript());
    }
    assert!(
        h.sims.revkeen.customers("wodify").is_empty(),
        "nothing was synced"
    );
}

/// Whether SQLite finds the file intact.
fn integrity_ok(path: &std::path::Path) -> bool {
    let Ok(conn) = rusqlite::Connection::open(path) else {
        return false;
    };
    conn.query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
        .is_ok_and(|answer| answer == "ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_page_anywhere_is_refused_with_the_recovery_step_never_run_on() {
    let (h, _) = gym(40).await;
    h.once().await.assert_exit(exit::OK);
    // Some history in every table: a second run, a failure, a pause.
    rename_client(&h.sims.wodify, 10_001, "Again");
    h.once().await.assert_exit(exit::OK);
    let pristine = std::fs::read(&h.state).expect("read");
    assert!(
        !h.dir().join("state.db-wal").exists(),
        "checkpointed at the clean end"
    );
    let pages = pristine.len() / 4096;
    let (mut refused, mut ran_intact) = (0, 0);
    for page in 1..pages {
        let mut damaged = pristine.clone();
        for (i, byte) in damaged[page * 4096..(page + 1) * 4096]
            .iter_mut()
            .enumerate()
        {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        std::fs::write(&h.state, &damaged).expect("write the damaged copy");
        let out = h.once().await;
        if out.code == Some(exit::OK) {
            assert!(
                integrity_ok(&h.state),
                "page {page}: exit 0 on a file left damaged\n{}",
                out.transcript()
            );
            ran_intact += 1;
        } else {
            assert_eq!(out.code, Some(1), "page {page}\n{}", out.transcript());
            assert!(
                out.stderr.contains("move it aside") && out.stderr.contains(".damaged"),
                "page {page}: no recovery step\n{}",
                out.transcript()
            );
            refused += 1;
        }
        let _ = std::fs::remove_file(h.dir().join("state.db-wal"));
        let _ = std::fs::remove_file(h.dir().join("state.db-shm"));
    }
    eprintln!(
        "{} damaged copies: {refused} refused with the recovery step, {ran_intact} ran and left the file intact",
        pages - 1
    );
    // The recovery step works: a fresh file delivers everything.
    std::fs::rename(&h.state, h.dir().join("state.db.damaged")).expect("move aside");
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_moved_aside_under_a_running_daemon_leaves_no_room_for_a_second_sender() {
    let (h, config) = gym(20).await;
    let daemon = h.spawn_daemon(&config, |_| {});
    daemon.wait_ready().await;
    std::fs::rename(&h.state, h.dir().join("state.db.moved")).expect("move aside");
    let out = h.once().await;
    out.assert_exit(exit::TEMPFAIL);
    assert!(
        out.stderr.contains("in use by another sync-daemon process"),
        "{}",
        out.transcript()
    );
    assert!(!h.state.exists(), "the refused run created a state file");
    daemon.stop().await.assert_exit(exit::OK);
}

/// `args` run as an unprivileged user: `nobody` when the tests run as root (for whom no mode
/// bit denies anything), else the test's own user.
async fn as_unprivileged(h: &Harness, args: &[&str]) -> crate::support::Output {
    use std::os::unix::fs::PermissionsExt as _;
    // The user must reach the config in the test directory.
    std::fs::set_permissions(h.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut command = h.command(args);
    // SAFETY: setgroups, setgid and setuid are async-signal-safe and only change the child.
    unsafe {
        command.pre_exec(|| {
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::support::run_command(command).await
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The harness with its state file in `<dir>/state/`.
async fn gym_in_state_dir(clients: usize) -> (Harness, std::path::PathBuf) {
    let (h, config) = gym(clients).await;
    let dir = h.dir().join("state");
    std::fs::create_dir(&dir).expect("state dir");
    let state = dir.join("state.db");
    let config: Vec<String> = config
        .lines()
        .map(|line| {
            if line.starts_with("state_path") {
                format!("state_path = \"{}\"", state.display())
            } else {
                line.to_string()
            }
        })
        .collect();
    h.write_config(&config.join("\n"));
    (h, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_a_state_directory_the_user_cannot_write() {
    let (h, state) = gym_in_state_dir(5).await;
    let dir = state.parent().expect("dir").to_path_buf();
    chmod(&dir, 0o555);
    let out = as_unprivileged(&h, &["check-config"]).await;
    out.assert_exit(exit::CONFIG);
    assert!(
        out.stderr
            .contains(&format!("{} is not writable by this user", dir.display()))
            && out.stderr.contains("StateDirectory="),
        "{}",
        out.transcript()
    );
    // Writable: valid.
    chmod(&dir, 0o777);
    as_unprivileged(&h, &["check-config"])
        .await
        .assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_failures_read_a_state_file_the_user_cannot_write() {
    let (h, state) = gym_in_state_dir(20).await;
    h.once().await.assert_exit(exit::OK);
    let dir = state.parent().expect("dir");
    for entry in std::fs::read_dir(dir).expect("list") {
        chmod(&entry.expect("entry").path(), 0o444);
    }
    chmod(dir, 0o555);
    let status = as_unprivileged(&h, &["status"]).await;
    status.assert_exit(exit::OK);
    assert!(status.stdout.contains("gym"), "{}", status.transcript());
    let json = as_unprivileged(&h, &["status", "--json"]).await;
    json.assert_exit(exit::OK);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(report["sources"][0]["delivered"]["created"], 20, "{report}");
    as_unprivileged(&h, &["failures"])
        .await
        .assert_exit(exit::OK);
    chmod(dir, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_is_warned_about_and_a_loose_state_file_is_tightened_saying_so()
{
    let (h, config) = gym(5).await;
    let key_file = h.dir().join("wodify.key");
    std::fs::write(&key_file, sync_daemon_sim::WODIFY_KEY).expect("key file");
    chmod(&key_file, 0o644);
    let config = replaced(
        &config,
        &format!("api_key = \"{}\"", sync_daemon_sim::WODIFY_KEY),
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    h.write_config(&config);
    let check = h.run(&["check-config"]).await;
    check.assert_exit(exit::OK);
    let warning = format!(
        "UNPROTECTED KEY FILE: {} is readable by others (mode 0644)",
        key_file.display()
    );
    assert!(check.stderr.contains(&warning), "{}", check.transcript());
    let once = h.once().await;
    once.assert_exit(exit::OK);
    assert!(once.stderr.contains(&warning), "{}", once.transcript());

    // The state file copied in world-readable: made private, and the log says so.
    chmod(&h.state, 0o644);
    chmod(&key_file, 0o600);
    let once = h.once().await;
    once.assert_exit(exit::OK);
    assert!(
        once.stderr
            .contains("The state file was readable by others (mode 0644); its mode is now 0600."),
        "{}",
        once.transcript()
    );
    assert!(
        !once.stderr.contains("UNPROTECTED"),
        "{}",
        once.transcript()
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&h.state)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
