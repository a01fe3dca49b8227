//! An invalid configuration stops the binary with exit 78 before it contacts anything, and the
//! error names the offending key and value (a missing config file names its path); a bad
//! command line exits 2. `check-config` prints the effective configuration without any API key
//! (the harness checks every run's output for the configured keys).

use crate::support::{Harness, exit, replaced, with_revkeen, with_source};
use sync_daemon_sim::{PRACTICEHUB_KEY, REVKEEN_KEY, WODIFY_KEY};

/// Writes `toml`, runs `--once` and `check-config`, and checks both exit 78 naming `key` and
/// `value` on stderr without contacting any API.
async fn refused(h: &Harness, toml: &str, key: &str, value: &str) {
    h.write_config(toml);
    for args in [&["--once"][..], &["check-config"][..]] {
        let out = h.run(args).await;
        out.assert_exit(exit::CONFIG);
        assert!(
            out.stderr.contains(key) && out.stderr.contains(value),
            "{args:?}: stderr should name {key} and {value:?}\n{}",
            out.transcript()
        );
    }
    assert_eq!(h.sims.revkeen.stats().requests, 0);
    assert_eq!(h.sims.wodify.stats().requests, 0);
    assert_eq!(h.sims.practicehub.stats().requests, 0);
    assert!(!h.state.exists(), "no state file for an invalid config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_source_kind() {
    let h = Harness::start().await;
    let toml = replaced(&h.base_config(), "kind = \"wodify\"", "kind = \"mindbody\"");
    refused(&h, &toml, "sources[0].kind", "mindbody").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_base_url() {
    let h = Harness::start().await;
    let line = format!("base_url = \"{}\"\n", h.sims.wodify_server.url());
    let toml = replaced(&h.base_config(), &line, "");
    refused(&h, &toml, "sources[0].base_url", "missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_cron_schedule() {
    let h = Harness::start().await;
    let toml = replaced(
        &h.base_config(),
        "schedule = \"0 */5 * * * *\"",
        "schedule = \"every five minutes\"",
    );
    refused(&h, &toml, "sources[1].schedule", "every five minutes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_source_name() {
    let h = Harness::start().await;
    let toml = replaced(&h.base_config(), "name = \"clinic\"", "name = \"gym\"");
    refused(&h, &toml, "sources[1].name", "gym").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host() {
    let h = Harness::start().await;
    let remote = "http://api.revkeen.example/v2";
    let toml = replaced(
        &h.base_config(),
        &format!("base_url = \"{}\"", h.sims.revkeen_server.url()),
        &format!("base_url = \"{remote}\""),
    );
    refused(&h, &toml, "revkeen.base_url", remote).await;

    let wodify_remote = "http://wodify.example.com/v1";
    let toml = replaced(
        &h.base_config(),
        &format!("base_url = \"{}\"", h.sims.wodify_server.url()),
        &format!("base_url = \"{wodify_remote}\""),
    );
    refused(&h, &toml, "sources[0].base_url", wodify_remote).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_prints_the_config_without_keys() {
    let h = Harness::start().await;
    let toml = with_source(
        &with_revkeen(&h.base_config(), "batch_size = 25"),
        "gym",
        "push_secret = \"push_secret_do_not_print_77\"",
    );
    h.write_config(&toml);
    let out = h.run(&["check-config"]).await;
    out.assert_exit(exit::OK);
    assert!(
        out.stdout.contains("batch_size = 25"),
        "{}",
        out.transcript()
    );
    assert!(out.stdout.contains("[redacted]"), "{}", out.transcript());
    for key in [REVKEEN_KEY, WODIFY_KEY, PRACTICEHUB_KEY] {
        assert!(!out.stdout.contains(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_on_the_key_line_does_not_print_the_key() {
    let h = Harness::start().await;
    // A missing closing quote: the parser's error quotes the offending line.
    let toml = replaced(
        &h.base_config(),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        &format!("api_key = \"{REVKEEN_KEY}"),
    );
    h.write_config(&toml);
    // `run` fails the test if the key appears in the output.
    h.run(&["check-config"]).await.assert_exit(exit::CONFIG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_a_missing_config_file_exits_78() {
    let h = Harness::start().await;
    for args in [&["--bogus"][..], &["--once", "--bogus"][..]] {
        let out = h.run(args).await;
        out.assert_exit(2);
        assert!(out.stderr.contains("Usage"), "{}", out.transcript());
    }
    let missing = h.dir().join("nowhere.toml");
    let mut command = crate::support::command(h.dir());
    command.arg("--config").arg(&missing).arg("--once");
    let out = crate::support::run_command(command).await;
    out.assert_exit(exit::CONFIG);
    assert!(
        out.stderr.contains(missing.to_str().expect("utf-8 path")),
        "{}",
        out.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_environment_override_is_named_by_its_variable_and_rust_log_is_shown_as_effective() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    // Not through run_with_env, which takes every value it sets for a secret.
    let mut command = h.command(&["check-config"]);
    command.env("SYNC_DAEMON__REVKEEN__BATCH_SIZE", "abc");
    let out = crate::support::run_command(command).await;
    out.assert_exit(exit::CONFIG);
    assert!(
        out.stderr
            .contains("SYNC_DAEMON__REVKEEN__BATCH_SIZE: invalid type")
            && out.stderr.contains("from the environment")
            && !out.stderr.contains("config.toml"),
        "{}",
        out.transcript()
    );
    let mut command = h.command(&["check-config"]);
    command.env("RUST_LOG", "sync_daemon=debug");
    let out = crate::support::run_command(command).await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.contains(
            "RUST_LOG=sync_daemon=debug overrides daemon.log_level (\"info\"): the effective log filter is \"sync_daemon=debug\""
        ),
        "{}",
        out.transcript()
    );
}
