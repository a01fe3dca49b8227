//! Keys change without a restart. `SIGHUP` keeps the daemon running (it used to exit 129,
//! which `Restart=on-failure` leaves dead), re-reads every key, says which changed, and lifts a
//! RevKeen halt after one authenticated read; a key file changed while its API refuses the old
//! key (a Kubernetes Secret updated in place) is noticed with no signal at all. `status` says
//! which key was re-read when and why.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sync_daemon_sim::{REVKEEN_KEY, WODIFY_KEY};

use crate::support::{Harness, exit, expected_wodify, replaced, seed_valid_clients};

const WRONG_REVKEEN_KEY: &str = "rk_live_wrong_9f8e7d6c5b4a";
const WRONG_WODIFY_KEY: &str = "wodify_wrong_0a1b2c3d4e";

/// Writes a key file as a sysadmin would: readable by its owner only.
fn write_key(path: &Path, key: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("{key}\n")).expect("key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// `status --json`'s `keys_reread`, as (key, trigger, changed).
async fn rereads(h: &Harness) -> Vec<(String, String, bool)> {
    let out = h.run(&["status", "--json"]).await;
    out.assert_exit(exit::OK);
    let status: Value = serde_json::from_str(&out.stdout).expect("status JSON");
    status["keys_reread"]
        .as_array()
        .expect("keys_reread")
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or_default().to_string(),
                r["trigger"].as_str().unwrap_or_default().to_string(),
                r["changed"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_keys_and_a_fixed_revkeen_key_resumes_sending_without_a_restart() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 40, 71);
    let want = expected_wodify(&h.sims.wodify).len();
    let toml = replaced(
        &h.config_for("gym"),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
    );
    let daemon = h.spawn_daemon(&toml, |_| {});
    daemon.wait_healthy().await;
    daemon
        .wait_for_log(
            "sending to stop on the refused key",
            Duration::from_secs(30),
            |log| log.contains("Sending stops"),
        )
        .await;
    // The halt is logged before it is recorded: /readyz follows a moment later.
    daemon
        .wait_until(
            "/readyz to say not ready",
            Duration::from_secs(10),
            || async { daemon.get("/readyz").await.0 == 503 },
        )
        .await;

    // SIGHUP with the key still wrong: the daemon lives, says the key is unchanged, tries it
    // once more (one authenticated read) and stays halted.
    let before = h.sims.revkeen.stats().requests;
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_for_log(
            "the unchanged key tried again",
            Duration::from_secs(30),
            |log| log.contains("revkeen.api_key unchanged") && log.contains("Sending stays halted"),
        )
        .await;
    assert_eq!(
        daemon.get("/healthz").await.0,
        200,
        "SIGHUP must not end the daemon"
    );
    let tried = h.sims.revkeen.stats().requests - before;
    assert!(
        tried <= 2,
        "a still-refused key costs one read, not {tried} requests"
    );
    assert_eq!(h.sims.revkeen.customers("wodify").len(), 0);

    // The fixed key, then SIGHUP: sending resumes and delivers everything, no restart.
    let fixed = replaced(
        &std::fs::read_to_string(h.dir().join("config.toml")).expect("config"),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
        &format!("api_key = \"{REVKEEN_KEY}\""),
    );
    std::fs::write(h.dir().join("config.toml"), fixed).expect("fixed config");
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_until("everything delivered", Duration::from_secs(60), || async {
            h.sims.revkeen.customers("wodify").len() == want
        })
        .await;
    daemon.wait_ready().await;
    let log = daemon.log();
    assert!(
        log.contains(
            "SIGHUP: re-read the keys: revkeen.api_key changed, sources.gym.api_key unchanged"
        ),
        "{log}"
    );
    let recorded = rereads(&h).await;
    assert!(
        recorded.contains(&("revkeen.api_key".into(), "SIGHUP".into(), true)),
        "{recorded:?}"
    );
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout.contains("Key re-read: revkeen.api_key at ")
            && text.stdout.contains("(SIGHUP; changed)"),
        "{}",
        text.transcript()
    );
    assert!(!text.stdout.contains("AUTH HALT"), "{}", text.stdout);

    // A config that no longer loads: said, and nothing changes.
    std::fs::write(h.dir().join("config.toml"), "[revkeen\n").expect("broken config");
    daemon.signal(libc::SIGHUP);
    daemon
        .wait_for_log(
            "the broken config refused",
            Duration::from_secs(30),
            |log| log.contains("SIGHUP: the config does not load"),
        )
        .await;
    assert_eq!(daemon.get("/readyz").await.0, 200);
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_changed_while_its_api_refuses_the_old_key_is_noticed_without_a_signal() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 30, 72);
    let want = expected_wodify(&h.sims.wodify).len();
    let revkeen_file = h.dir().join("revkeen.key");
    let wodify_file = h.dir().join("wodify.key");
    write_key(&revkeen_file, WRONG_REVKEEN_KEY);
    write_key(&wodify_file, WRONG_WODIFY_KEY);
    let toml = replaced(
        &replaced(
            &h.config_for("gym"),
            &format!("api_key = \"{REVKEEN_KEY}\""),
            &format!("api_key_file = \"{}\"", revkeen_file.display()),
        ),
        &format!("api_key = \"{WODIFY_KEY}\""),
        &format!("api_key_file = \"{}\"", wodify_file.display()),
    );
    let daemon = h.spawn_daemon(&toml, |_| {});
    daemon.wait_healthy().await;
    // Wodify refuses its key: the poll records a halt (and nothing reaches RevKeen).
    daemon
        .wait_until("gym's halt in status", Duration::from_secs(30), || async {
            h.run(&["status"]).await.stdout.contains("AUTH HALT: gym")
        })
        .await;

    // Both files are replaced in place, as a Kubernetes Secret is; no signal is sent.
    write_key(&wodify_file, WODIFY_KEY);
    daemon
        .wait_for_log(
            "the new Wodify key noticed",
            Duration::from_secs(40),
            |log| log.contains("sources.gym.api_key changed"),
        )
        .await;
    // The poll it starts finds everything; RevKeen refuses the wrong key and halts sending.
    daemon
        .wait_for_log("RevKeen's refusal", Duration::from_secs(30), |log| {
            log.contains("Sending stops")
        })
        .await;
    write_key(&revkeen_file, REVKEEN_KEY);
    daemon
        .wait_until("everything delivered", Duration::from_secs(60), || async {
            h.sims.revkeen.customers("wodify").len() == want
        })
        .await;
    daemon.wait_ready().await;
    let recorded = rereads(&h).await;
    for key in ["revkeen.api_key", "sources.gym.api_key"] {
        assert!(
            recorded.contains(&(key.into(), "key file changed".into(), true)),
            "{key} not recorded as re-read: {recorded:?}"
        );
    }
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
}
