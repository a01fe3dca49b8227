//! The rest of the operator's toolbox, run as an operator would: `check-config --connect`
//! tells the four outcomes apart with distinct exit codes (ok 0, a refused key 77 for RevKeen
//! or a source, an unreachable API 69, a TLS failure 69 with `tls_error`) after one read per
//! API and no write; `check-config` alone prints the effective config with secrets redacted;
//! `--dry-run` names each customer it would create or update and the fields that differ from
//! the last sync (values only with `--verbose`, JSON lines with `--json`) and writes nothing
//! to RevKeen or the state file; `--once` ends with the summary table, draws no progress bar
//! escape codes when stderr is not a terminal and draws bars on a pseudo-terminal; `--version`
//! names the git commit and every subcommand's `--help` has an example.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::SystemTime;

use serde_json::{Value, json};
use sync_daemon_sim::{Faults, PRACTICEHUB_KEY, REVKEEN_KEY, WODIFY_KEY};

use crate::support::{
    BIN, Harness, Output, exit, free_listen_addr, rename_client, replaced, require_tool,
    run_command, seed_valid_clients, self_signed_tls_server,
};

/// The stderr line `check-config --connect` prints for `target` (`revkeen` or a source).
#[track_caller]
fn connect_line<'a>(out: &'a Output, target: &str) -> &'a str {
    out.stderr
        .lines()
        .find(|line| line.split_whitespace().next() == Some(target))
        .unwrap_or_else(|| panic!("no line for {target}:\n{}", out.transcript()))
}

/// The outcome word of `target`'s line.
#[track_caller]
fn outcome<'a>(out: &'a Output, target: &str) -> &'a str {
    connect_line(out, target)
        .split_whitespace()
        .nth(1)
        .expect("an outcome after the target")
}

/// The `fix:` hint printed after `target`'s line.
#[track_caller]
fn hint_after<'a>(out: &'a Output, target: &str) -> &'a str {
    let line = connect_line(out, target);
    let mut lines = out.stderr.lines().skip_while(|l| *l != line).skip(1);
    lines
        .next()
        .filter(|l| l.trim_start().starts_with("fix: "))
        .unwrap_or_else(|| panic!("no fix hint after {target}:\n{}", out.transcript()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_ok_reads_once_per_api_and_writes_nothing() {
    let h = Harness::start().await;
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::OK);
    for target in ["revkeen", "gym", "clinic"] {
        assert_eq!(outcome(&out, target), "ok", "{}", out.transcript());
    }
    // The effective config, keys redacted (the harness also checks no key is printed).
    assert_eq!(
        out.stdout.matches("api_key = \"[redacted]\"").count(),
        3,
        "{}",
        out.stdout
    );

    let revkeen: Vec<(String, String)> = h
        .sims
        .revkeen
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        revkeen,
        vec![("GET".to_string(), "/customers".to_string())],
        "one authenticated read at RevKeen"
    );
    let wodify = h.sims.wodify.requests();
    assert_eq!(wodify.len(), 1, "{wodify:?}");
    assert!(
        wodify[0].path_and_query.starts_with("/clients?")
            && wodify[0].path_and_query.contains("page_size=1"),
        "{wodify:?}"
    );
    let practicehub = h.sims.practicehub.requests();
    assert_eq!(practicehub.len(), 1, "{practicehub:?}");
    assert!(
        practicehub[0].path_and_query.starts_with("/api/patients?")
            && practicehub[0].path_and_query.contains("page_size=1"),
        "{practicehub:?}"
    );
    assert!(!h.state.exists(), "check-config created the state file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_refused_revkeen_key_exits_77_with_a_hint() {
    let h = Harness::start().await;
    h.write_config(&replaced(
        &h.base_config(),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        "api_key = \"rk_live_not_this_one_8080\"",
    ));
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::AUTH_REFUSED);
    assert_eq!(
        outcome(&out, "revkeen"),
        "key_refused",
        "{}",
        out.transcript()
    );
    assert!(
        hint_after(&out, "revkeen").contains("revkeen.api_key"),
        "{}",
        out.transcript()
    );
    assert_eq!(outcome(&out, "gym"), "ok");
    assert_eq!(outcome(&out, "clinic"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_refused_source_keys_exit_77_naming_the_source() {
    for (key, name) in [(WODIFY_KEY, "gym"), (PRACTICEHUB_KEY, "clinic")] {
        let h = Harness::start().await;
        h.write_config(&replaced(
            &h.base_config(),
            &format!("api_key = \"{key}\""),
            "api_key = \"source_key_revoked_1234\"",
        ));
        let out = h.run(&["check-config", "--connect"]).await;
        out.assert_exit(exit::AUTH_REFUSED);
        assert_eq!(outcome(&out, name), "key_refused", "{}", out.transcript());
        assert!(
            hint_after(&out, name).contains(&format!("source \"{name}\"")),
            "{}",
            out.transcript()
        );
        assert_eq!(outcome(&out, "revkeen"), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_closed_port_is_unreachable_69() {
    let h = Harness::start().await;
    let closed = format!("http://{}", free_listen_addr());
    h.write_config(&replaced(
        &h.base_config(),
        &h.sims.wodify_server.url(),
        &closed,
    ));
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::UNAVAILABLE);
    assert_eq!(outcome(&out, "gym"), "unreachable", "{}", out.transcript());
    assert!(hint_after(&out, "gym").contains("base_url"));
    assert_eq!(outcome(&out, "revkeen"), "ok");

    // A refused key outranks an unreachable API: 77.
    h.write_config(&replaced(
        &std::fs::read_to_string(&h.config).expect("config"),
        &format!("api_key = \"{REVKEEN_KEY}\""),
        "api_key = \"rk_live_not_this_one_8080\"",
    ));
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::AUTH_REFUSED);
    assert_eq!(outcome(&out, "gym"), "unreachable");
    assert_eq!(outcome(&out, "revkeen"), "key_refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_tls_handshake_failure_is_a_tls_error() {
    let h = Harness::start().await;
    // The RevKeen simulator speaks plain HTTP: a TLS client hello gets no TLS answer.
    let http = h.sims.revkeen_server.url();
    let https = http.replace("http://", "https://");
    h.write_config(&replaced(&h.base_config(), &http, &https));
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::UNAVAILABLE);
    assert_eq!(
        outcome(&out, "revkeen"),
        "tls_error",
        "{}",
        out.transcript()
    );
    assert!(hint_after(&out, "revkeen").contains("certificate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_untrusted_certificate_is_a_tls_error_69() {
    let h = Harness::start().await;
    let (_server, port) = self_signed_tls_server(h.dir()).await;
    h.write_config(&replaced(
        &h.base_config(),
        &h.sims.revkeen_server.url(),
        &format!("https://127.0.0.1:{port}"),
    ));
    let out = h.run(&["check-config", "--connect"]).await;
    out.assert_exit(exit::UNAVAILABLE);
    assert_eq!(
        outcome(&out, "revkeen"),
        "tls_error",
        "{}",
        out.transcript()
    );
    assert!(
        hint_after(&out, "revkeen").contains("certificate"),
        "{}",
        out.transcript()
    );
    assert_eq!(outcome(&out, "gym"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_alone_exits_0_or_78_and_never_connects() {
    let h = Harness::start().await;
    let out = h.run(&["check-config"]).await;
    out.assert_exit(exit::OK);
    assert!(out.stdout.contains("[revkeen]") && out.stdout.contains("[[sources]]"));
    assert_eq!(out.stdout.matches("api_key = \"[redacted]\"").count(), 3);
    assert!(
        out.stdout.contains("batch_size = 100") && out.stdout.contains("max_attempts = 25"),
        "defaults are filled in:\n{}",
        out.stdout
    );

    h.write_config(&replaced(
        &h.base_config(),
        "schedule = \"0 */15 * * * *\"",
        "schedule = \"*/15 * * * *\"",
    ));
    for args in [&["check-config"][..], &["check-config", "--connect"][..]] {
        let out = h.run(args).await;
        out.assert_exit(exit::CONFIG);
        assert!(
            out.stderr.contains("sources[0].schedule"),
            "{}",
            out.transcript()
        );
    }
    assert_eq!(h.sims.revkeen.stats().requests, 0);
    assert_eq!(h.sims.wodify.stats().requests, 0);
    assert_eq!(h.sims.practicehub.stats().requests, 0);
}

/// Path, length, SHA-256 and modification time of the state file, and the length of its WAL
/// (a reader may create an empty one; any frame in it would be a write).
fn state_files(state: &Path) -> (PathBuf, usize, String, SystemTime, u64) {
    use sha2::Digest as _;
    let wal = std::fs::metadata(state.with_extension("db-wal")).map_or(0, |m| m.len());
    [state.to_path_buf()]
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("read state file");
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .expect("mtime");
            let digest = hex::encode(sha2::Sha256::digest(&bytes));
            (path, bytes.len(), digest, modified, wal)
        })
        .next()
        .expect("one path")
}

const RENAMED: i64 = 10_003;
const EMAIL_REMOVED: i64 = 10_005;
const NEW_CLIENT: i64 = 10_021;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_names_creates_updates_and_changed_fields_and_writes_nothing() {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 20, 8);
    h.once().await.assert_exit(exit::OK);

    rename_client(&h.sims.wodify, RENAMED, "Okafor-Smith");
    assert!(
        h.sims
            .wodify
            .update_client(EMAIL_REMOVED, json!({"email": ""}))
    );
    let mut client = sync_daemon_sim::wodify::generate_client(NEW_CLIENT, 8);
    client["email"] = json!("new.member@example.com");
    h.sims.wodify.put_client(client);
    let before = state_files(&h.state);
    h.sims.revkeen.clear_log();
    // Only the dry runs' reads count below, not the first `--once`'s.
    h.sims.wodify.clear_log();

    let plain = h.run(&["--dry-run"]).await;
    plain.assert_exit(exit::OK);
    let lines: Vec<&str> = plain.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "one line per customer that changed:\n{}",
        plain.stdout
    );
    assert_eq!(
        lines[0], "update  gym 10003: external_updated_at, name",
        "{}",
        plain.stdout
    );
    assert_eq!(lines[1], "reject  gym 10005: no email in Wodify");
    assert!(
        lines[2].starts_with("create  gym 10021: ")
            && lines[2].contains("email, ")
            && lines[2].contains("name"),
        "{}",
        plain.stdout
    );
    assert!(
        !plain.stdout.contains("Okafor-Smith") && !plain.stdout.contains("new.member@"),
        "values only with --verbose:\n{}",
        plain.stdout
    );
    assert!(
        plain.stderr.contains(
            "gym: fetched 21, would send 2, unchanged 18, rejected 1 (dry run: nothing written)"
        ),
        "{}",
        plain.transcript()
    );

    let verbose = h.run(&["--dry-run", "--verbose"]).await;
    verbose.assert_exit(exit::OK);
    let update = verbose
        .stdout
        .lines()
        .find(|l| l.starts_with("update  gym 10003: "))
        .expect("update line");
    let body: Value = serde_json::from_str(update.trim_start_matches("update  gym 10003: "))
        .expect("--verbose shows the body as JSON");
    assert!(
        body["name"]
            .as_str()
            .is_some_and(|n| n.ends_with(" Okafor-Smith")),
        "{update}"
    );
    assert!(verbose.stdout.contains("new.member@example.com"));

    for (args, with_body) in [
        (&["--dry-run", "--json"][..], false),
        (&["--dry-run", "--json", "--verbose"][..], true),
    ] {
        let out = h.run(args).await;
        out.assert_exit(exit::OK);
        let objects: Vec<Value> = out
            .stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{args:?}: not a JSON line ({e}): {line}"))
            })
            .collect();
        assert_eq!(objects.len(), 3, "{args:?}:\n{}", out.stdout);
        let by_id = |id: i64| {
            objects
                .iter()
                .find(|o| o["external_id"] == id.to_string().as_str())
                .unwrap_or_else(|| panic!("{args:?}: no object for {id}"))
        };
        let renamed = by_id(RENAMED);
        assert_eq!(renamed["source"], "gym");
        assert_eq!(renamed["action"], "update");
        assert_eq!(renamed["fields"], json!(["external_updated_at", "name"]));
        assert_eq!(by_id(NEW_CLIENT)["action"], "create");
        assert_eq!(by_id(EMAIL_REMOVED)["action"], "reject");
        assert_eq!(by_id(EMAIL_REMOVED)["reason"], "no email in Wodify");
        assert_eq!(
            renamed.get("body").is_some(),
            with_body,
            "{args:?}: {renamed}"
        );
        if with_body {
            assert!(
                renamed["body"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(" Okafor-Smith"))
            );
        }
    }

    // Nothing was written anywhere.
    assert_eq!(
        h.sims.revkeen.stats().requests,
        0,
        "--dry-run sent to RevKeen: {:?}",
        h.sims.revkeen.requests()
    );
    assert_eq!(
        state_files(&h.state),
        before,
        "--dry-run changed the state file or wrote to its WAL"
    );
    assert!(
        h.sims.wodify.stats().requests >= 4,
        "each dry run read the source"
    );

    // What it announced is what a run then does.
    h.once().await.assert_exit(exit::REJECTED);
    let stats = h.sims.revkeen.stats();
    assert_eq!((stats.created, stats.updated), (1, 1), "{stats:?}");

    crate::operate::snapshot_settings().bind(|| {
        insta::assert_snapshot!("dry_run", plain.stdout);
    });
}

/// A gym with enough clients and Wodify latency for `--once` to run for about a second.
async fn gym_for_progress() -> Harness {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 600, 4);
    h.sims.wodify.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_without_a_terminal_prints_the_summary_table_and_no_bars() {
    let h = gym_for_progress().await;
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert!(
        !out.stderr.contains('\x1b') && !out.stdout.contains('\x1b'),
        "escape codes without a terminal:\n{:?}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(" fetched · "),
        "a progress bar was drawn into a pipe:\n{}",
        out.stderr
    );
    let mut lines = out.stdout.lines();
    assert_eq!(
        lines
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec![
            "SOURCE",
            "FETCHED",
            "QUEUED",
            "UNCHANGED",
            "REJECTED",
            "SENT",
            "CREATED",
            "UPDATED",
            "STALE",
            "DEAD"
        ]),
        "{}",
        out.stdout
    );
    assert_eq!(
        lines
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec![
            "gym", "600", "600", "0", "0", "600", "600", "0", "0", "0"
        ]),
        "{}",
        out.stdout
    );
    let mut settings = crate::operate::snapshot_settings();
    settings.add_filter(r"Finished in \d+\.\d s\.", "Finished in [elapsed].");
    settings.bind(|| insta::assert_snapshot!("once_summary", out.stdout));
}

/// Runs `sync-daemon --config <config> <args>` under `script` (util-linux's, at `script`),
/// which gives it a pseudo-terminal; returns the terminal transcript and the exit code.
async fn on_a_terminal(script: &Path, h: &Harness, args: &str) -> (Option<i32>, String) {
    on_a_terminal_with(script, h, args, &[]).await
}

/// [`on_a_terminal`] with extra environment.
async fn on_a_terminal_with(
    script: &Path,
    h: &Harness,
    args: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let inner = format!("'{BIN}' --config '{}' {args}", h.config.display());
    let mut command = tokio::process::Command::new(script);
    command
        .args(["-qfec", &inner, "/dev/null"])
        .current_dir(h.dir())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = run_command(command).await;
    (out.code, out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_on_a_terminal_draws_progress_bars_then_the_summary() {
    // util-linux's `script`, which Debian 12 ships in bsdutils.
    let script = require_tool("script", "bsdutils");
    let h = gym_for_progress().await;

    // First run: the size of the listing is unknown, a spinner counts pages and records.
    let (code, first) = on_a_terminal(&script, &h, "--once").await;
    assert_eq!(code, Some(exit::OK), "{first}");
    assert!(first.contains('\x1b'), "no terminal drawing:\n{first:?}");
    for expected in [
        " fetched · ",
        " pages · queued ",
        " · sent ",
        "SOURCE",
        "FETCHED",
    ] {
        assert!(
            first.contains(expected),
            "{expected:?} missing from the terminal:\n{first:?}"
        );
    }
    assert!(
        first.find(" fetched · ") < first.find("SOURCE"),
        "the summary table comes after the bars:\n{first:?}"
    );

    // A later run knows the listing's size: a bar with an ETA.
    let (code, second) = on_a_terminal(&script, &h, "--once --resync").await;
    assert_eq!(code, Some(exit::OK), "{second}");
    assert!(second.contains("/600 fetched"), "{second:?}");
    assert!(second.contains("ETA"), "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_names_the_commit_and_every_help_has_an_example() {
    let mut version = crate::support::command(Path::new("."));
    version.arg("--version");
    let out = run_command(version).await;
    out.assert_exit(exit::OK);
    let text = out.stdout.trim();
    let commit = text
        .strip_prefix(&format!(
            "sync-daemon {} (commit ",
            env!("CARGO_PKG_VERSION")
        ))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {text:?}"));
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(
            commit.trim_end_matches("-modified"),
            head,
            "--version names another commit than the checkout's"
        ),
        None => assert!(!commit.is_empty(), "{text:?}"),
    }

    for sub in [
        None,
        Some("status"),
        Some("failures"),
        Some("replay"),
        Some("check-config"),
        Some("healthcheck"),
        Some("demo"),
        Some("sim"),
        Some("completions"),
    ] {
        let mut help = crate::support::command(Path::new("."));
        help.args(sub).arg("--help");
        let out = run_command(help).await;
        out.assert_exit(exit::OK);
        assert!(
            out.stdout.contains("Example"),
            "`sync-daemon {} --help` has no example:\n{}",
            sub.unwrap_or_default(),
            out.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printing_command_ends_quietly_on_a_closed_stdout() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 30, 91);
    h.once().await.assert_exit(exit::OK);
    rename_client(&h.sims.wodify, 10_001, "Piped");
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["failures"],
        &["failures", "--json"],
        &["check-config"],
        &["--dry-run"],
        &["--dry-run", "--json"],
        &["completions", "bash"],
        &["man"],
    ] {
        let expected = h.run(args).await.code;
        // `… | head -c1` whose reader has already gone: every write is EPIPE.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut command = h.command(args);
        command.stdout(Stdio::from(writer));
        let out = run_command(command).await;
        assert_eq!(out.code, expected, "{args:?}\n{}", out.transcript());
        assert!(
            !out.stderr.contains("panicked") && !out.stderr.contains("Broken pipe"),
            "{args:?} did not end quietly\n{}",
            out.transcript()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_prints_only_a_config_on_stdout() {
    let ports: Vec<String> = (0..3)
        .map(|_| free_listen_addr().port().to_string())
        .collect();
    let mut command = crate::support::command(Path::new("."));
    command
        .args([
            "sim",
            "--revkeen-port",
            &ports[0],
            "--wodify-port",
            &ports[1],
        ])
        .args(["--practicehub-port", &ports[2]])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn sim");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut text = String::new();
    let read = async {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 4096];
        while text.matches("[[sources]]").count() < 2 || !text.ends_with('\n') {
            let n = stdout.read(&mut buf).await.expect("read");
            assert!(n > 0, "sim closed stdout early: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the config within 30 s");
    child.kill().await.expect("kill");
    assert!(!text.contains("Simulators running"), "{text}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.toml");
    std::fs::write(&path, &text).expect("write");
    let mut check = crate::support::command(dir.path());
    check.args(["check-config", "--config"]).arg(&path);
    run_command(check).await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_json_prints_the_summary_as_one_object_and_flags_that_do_nothing_are_refused() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 20, 92);
    let out = h.run(&["--once", "--json"]).await;
    out.assert_exit(exit::OK);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object:\n{}", out.stdout);
    let summary: Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(summary["exit_code"], 0, "{summary}");
    assert!(summary["elapsed_secs"].is_number(), "{summary}");
    assert_eq!(summary["stopped"], Value::Null, "{summary}");
    let gym = &summary["sources"][0];
    assert_eq!(gym["name"], "gym", "{summary}");
    assert_eq!(gym["poll"]["fetched"], 20, "{summary}");
    assert_eq!(gym["sent"]["created"], 20, "{summary}");
    assert_eq!(gym["rejected_open"], 0, "{summary}");

    for args in [&["--once", "--verbose"][..], &["--verbose"], &["--json"]] {
        let out = h.run(args).await;
        out.assert_exit(exit::USAGE);
        assert!(
            out.stderr.contains("applies to"),
            "{args:?}\n{}",
            out.transcript()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let script = require_tool("script", "bsdutils");
    let h = gym_for_progress().await;
    // A warning to log: the state file found readable by others.
    h.once().await.assert_exit(exit::OK);
    let colour = regex::Regex::new("\x1b\\[[0-9;]*m").expect("regex");
    let warning = |text: &str| {
        text.lines()
            .find(|line| line.contains("its mode is now 0600"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no warning line:\n{text:?}"))
    };
    for (env, coloured) in [(&[][..], true), (&[("NO_COLOR", "1")][..], false)] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&h.state, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let (code, text) = on_a_terminal_with(&script, &h, "--once", env).await;
        assert_eq!(code, Some(exit::OK), "{text}");
        let line = warning(&text);
        assert_eq!(colour.is_match(&line), coloured, "{env:?}: {line:?}");
    }
}

/// Runs `args` in a mount namespace where no directory SQLite could put a temporary file in is
/// writable (`/tmp`, `/var/tmp`, the working directory), as under Kubernetes'
/// `readOnlyRootFilesystem`; only the harness's own directory stays writable. `None` when this
/// machine cannot make mount namespaces (not root, or no CAP_SYS_ADMIN).
async fn without_a_temporary_directory(h: &Harness, args: &str) -> Option<Output> {
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: this machine cannot make a mount namespace");
        return None;
    }
    let dir = h.dir().display().to_string();
    let script = format!(
        "set -e; mkdir -p /run/keep; mount --bind '{dir}' /run/keep; \
         mount --bind /tmp /tmp; mount -o remount,bind,ro /tmp; \
         mount --bind /run/keep '{dir}'; \
         mount -t tmpfs -o ro tmpfs /var/tmp; \
         cd /tmp; exec '{BIN}' --config '{}' {args}",
        h.config.display()
    );
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Some(run_command(command).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_and_a_resync_need_no_writable_temporary_directory() {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.base_config());
    seed_valid_clients(&h.sims.wodify, 3000, 93);
    crate::support::seed_valid_patients(&h.sims.practicehub, 500, 93);
    let Some(first) = without_a_temporary_directory(&h, "--once").await else {
        return;
    };
    first.assert_exit(exit::OK);
    let resync = without_a_temporary_directory(&h, "--once --resync")
        .await
        .expect("namespaces work");
    resync.assert_exit(exit::OK);
    crate::support::assert_revkeen_holds(
        &h.sims.revkeen,
        "wodify",
        &crate::support::expected_wodify(&h.sims.wodify),
    );
    crate::support::assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &crate::support::expected_practicehub(&h.sims.practicehub),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_json_gives_the_verdict_as_one_object() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    let out = h.run(&["check-config", "--json"]).await;
    out.assert_exit(exit::OK);
    let verdict: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(verdict["sources"], json!(["gym"]), "{verdict}");
    assert_eq!(verdict["log_filter"], "info", "{verdict}");
    assert_eq!(verdict["exit_code"], 0, "{verdict}");
    assert_eq!(verdict["connections"], json!([]), "{verdict}");

    let out = h.run(&["check-config", "--connect", "--json"]).await;
    out.assert_exit(exit::OK);
    let verdict: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    let outcomes: Vec<(String, String)> = verdict["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| {
            (
                c["target"].as_str().unwrap_or_default().to_string(),
                c["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("revkeen".to_string(), "ok".to_string()),
            ("gym".to_string(), "ok".to_string())
        ],
        "{verdict}"
    );

    h.write_config("[daemon\\nbroken");
    let out = h.run(&["check-config", "--json"]).await;
    out.assert_exit(exit::CONFIG);
    let verdict: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(verdict["valid"], false, "{verdict}");
    assert_eq!(verdict["exit_code"], 78, "{verdict}");
    assert!(
        verdict["problem"].as_str().is_some_and(|p| !p.is_empty()),
        "{verdict}"
    );
}
