//! A refused API key ends `--once` with exit 77 without hammering the API; the
//! error names the problem without printing the key; fixing the key is all it takes for the next
//! run to deliver everything. Holds for RevKeen's key and for each source's key; a source whose
//! key is refused does not hold back the other source. Keys read from the environment, a key
//! file or systemd credentials work, and no key reaches the output even in trace logs.

use std::time::Duration;

use crate::support::{
    Harness, assert_revkeen_holds, exit, expected_practicehub, expected_wodify, replaced,
    seed_valid_clients, with_daemon,
};
use sync_daemon_sim::{PRACTICEHUB_KEY, REVKEEN_KEY, WODIFY_KEY};

const WRONG_REVKEEN_KEY: &str = "rk_live_wrong_9f8e7d6c5b4a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_revkeen_key_exits_77_without_hammering_and_a_fixed_key_delivers_everything() {
    let h = Harness::start().await;
    let good = h.config_for("gym");
    h.write_config(&replaced(
        &good,
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
    ));
    seed_valid_clients(&h.sims.wodify, 500, 5);

    let out = h.once().await;
    out.assert_exit(exit::AUTH_REFUSED);
    let stats = h.sims.revkeen.stats();
    assert!(stats.auth_failures >= 1, "{stats:?}");
    assert!(
        stats.requests <= 10,
        "after a 401 the daemon must stop sending with that key; RevKeen saw {} requests",
        stats.requests
    );
    assert_eq!(writes_and_customers(&h), 0);
    let stderr = out.stderr.to_lowercase();
    assert!(
        stderr.contains("revkeen") && stderr.contains("api_key"),
        "stderr should say RevKeen refused the key and which setting to fix:\n{}",
        out.transcript()
    );

    // Fix the key: the next run delivers everything.
    h.write_config(&good);
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

fn writes_and_customers(h: &Harness) -> usize {
    let stats = h.sims.revkeen.stats();
    (stats.created + stats.updated) as usize + h.sims.revkeen.customers("wodify").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_wodify_key_exits_77_and_names_the_source() {
    let h = Harness::start().await;
    let good = h.config_for("gym");
    let wrong = "wodify_wrong_key_31337";
    h.write_config(&replaced(
        &good,
        &format!("api_key = \"{WODIFY_KEY}\""),
        &format!("api_key = \"{wrong}\""),
    ));
    seed_valid_clients(&h.sims.wodify, 200, 5);

    let out = h.once().await;
    out.assert_exit(exit::AUTH_REFUSED);
    let wodify = h.sims.wodify.stats();
    assert!(wodify.auth_failures >= 1, "{wodify:?}");
    assert!(
        wodify.requests <= 3,
        "a refused key is not retried: Wodify saw {} requests",
        wodify.requests
    );
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    let output = format!("{}{}", out.stdout, out.stderr);
    assert!(
        output.contains("gym") && output.contains("api_key"),
        "the output should name the source and the setting:\n{}",
        out.transcript()
    );

    h.write_config(&good);
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_practicehub_key_exits_77() {
    let h = Harness::start().await;
    let good = h.config_for("clinic");
    h.write_config(&replaced(
        &good,
        &format!("api_key = \"{PRACTICEHUB_KEY}\""),
        "api_key = \"practicehub_wrong_key_4242\"",
    ));
    h.sims.practicehub.seed(120, 5);

    let out = h.once().await;
    out.assert_exit(exit::AUTH_REFUSED);
    assert!(h.sims.practicehub.stats().auth_failures >= 1);
    assert!(h.sims.revkeen.customers("practicehub").is_empty());

    h.write_config(&good);
    h.once().await.assert_exit(exit::REJECTED);
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_revoked_mid_run_exits_77_and_a_restored_key_loses_nothing() {
    let h = Harness::start().await;
    h.write_config(&crate::support::with_revkeen(
        &h.config_for("gym"),
        "batch_size = 10",
    ));
    seed_valid_clients(&h.sims.wodify, 800, 7);
    h.sims.revkeen.set_faults(sync_daemon_sim::Faults {
        latency_ms: 20,
        ..Default::default()
    });
    let running = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    crate::support::wait_until("some batches delivered", Duration::from_secs(30), || {
        revkeen.stats().created >= 50
    })
    .await;
    h.sims.revkeen.set_api_keys(vec![]);
    let out = running.finish().await;
    out.assert_exit(exit::AUTH_REFUSED);
    let delivered = h.sims.revkeen.customers("wodify").len();
    assert!(delivered < 800, "the revocation came too late to matter");

    h.sims.revkeen.set_api_keys(vec![REVKEEN_KEY.to_string()]);
    h.sims
        .revkeen
        .set_faults(sync_daemon_sim::Faults::default());
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let stats = h.sims.revkeen.stats();
    assert_eq!(stats.conflicts, 0);
    assert_eq!(
        stats.created, 800,
        "every customer created exactly once: {stats:?}"
    );
    assert_eq!(stats.updated, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_out_of_trace_logs_in_text_and_json() {
    // The harness fails any run whose output holds a configured key; here the logs are as
    // verbose as they get, on the success path and on the refused-key path.
    for format in ["text", "json"] {
        let h = Harness::start().await;
        let config = with_daemon(
            &h.base_config(),
            &format!("log_level = \"trace\"\nlog_format = \"{format}\""),
        );
        h.write_config(&config);
        h.sims.wodify.seed(120, 9);
        h.sims.practicehub.seed(60, 9);
        let out = h.once().await;
        out.assert_exit(exit::REJECTED);
        assert!(
            out.stderr.len() > 1000,
            "{format}: expected verbose logs:\n{}",
            out.transcript()
        );
        h.write_config(&replaced(
            &config,
            &format!("api_key = \"{REVKEEN_KEY}\""),
            &format!("api_key = \"{WRONG_REVKEEN_KEY}\""),
        ));
        h.sims
            .wodify
            .update_client(10_001, serde_json::json!({"last_name": "Traced"}));
        h.once().await.assert_exit(exit::AUTH_REFUSED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_environment_files_and_credentials_work_and_stay_hidden() {
    // RevKeen's key from an environment override, Wodify's from api_key_file (with the
    // trailing newline `echo` leaves), PracticeHub's from $CREDENTIALS_DIRECTORY.
    let h = Harness::start().await;
    let revkeen_key = "rk_live_from_env_5150";
    let wodify_key = "wodify_from_file_8086";
    let practicehub_key = "practicehub_from_credentials_6502";
    h.sims.revkeen.set_api_keys(vec![revkeen_key.to_string()]);
    h.sims.wodify.set_api_key(wodify_key);
    h.sims.practicehub.set_api_key(practicehub_key);
    let key_file = h.dir().join("wodify_api_key");
    std::fs::write(&key_file, format!("{wodify_key}\n")).expect("write key file");
    let credentials = h.dir().join("credentials");
    std::fs::create_dir(&credentials).expect("credentials dir");
    std::fs::write(credentials.join("practicehub_api_key"), practicehub_key)
        .expect("write credential");

    let config = h.base_config();
    let config = replaced(
        &config,
        &format!("api_key = \"{WODIFY_KEY}\""),
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    let config = replaced(&config, &format!("api_key = \"{PRACTICEHUB_KEY}\"\n"), "");
    h.write_config(&config);
    h.sims.wodify.seed(100, 3);
    h.sims.practicehub.seed(50, 3);
    let env = [
        ("SYNC_DAEMON__REVKEEN__API_KEY", revkeen_key),
        (
            "CREDENTIALS_DIRECTORY",
            credentials.to_str().expect("utf-8 path"),
        ),
        ("WODIFY_KEY_FOR_SECRET_CHECK", wodify_key),
        ("PRACTICEHUB_KEY_FOR_SECRET_CHECK", practicehub_key),
    ];
    let out = h.run_with_env(&["--once"], &env).await;
    out.assert_exit(exit::REJECTED);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    h.run_with_env(&["check-config"], &env)
        .await
        .assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_source_key_does_not_hold_back_the_other_source() {
    let h = Harness::start().await;
    h.write_config(&replaced(
        &h.base_config(),
        &format!("api_key = \"{WODIFY_KEY}\""),
        "api_key = \"wodify_wrong_key_2718\"",
    ));
    h.sims.wodify.seed(100, 13);
    h.sims.practicehub.seed(120, 13);
    let out = h.once().await;
    out.assert_exit(exit::AUTH_REFUSED);
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
}
