//! What an operator's Prometheus, Alertmanager and Grafana see of a running daemon:
//! - a scrape after a sync passes `promtool check metrics` (HELP text on every family, names
//!   as Prometheus expects), carries `sync_daemon_build_info{version,commit}` = 1 for the
//!   binary's own version and commit, and the process metrics (`process_*`);
//! - the label sets the config makes known are exported at zero from the first scrape, before
//!   their first event (auth halts, 429 pauses, the push feed, the scheduler watchdog, polls
//!   and upserts by outcome), and with every upstream down the polls are still counted
//!   (`sync_daemon_polls_total{outcome="unavailable"}`);
//! - a poll that finds nothing new moves `sync_daemon_last_successful_poll_timestamp_seconds`
//!   while the last upsert's time stays; the time stays while the source is down, and a
//!   refused source key is counted as `auth_refused` and shows as `sync_daemon_auth_halted`
//!   for that source until the key is accepted again;
//! - `deploy/prometheus/alerts.yaml` passes `promtool check rules` and its unit tests
//!   (`promtool test rules`);
//! - every metric the Grafana dashboard and the alerts name is one a running daemon exports;
//! - the Kubernetes example scrapes through a `PodMonitor`, not `prometheus.io/*` annotations
//!   that would take over the merchant app's own scrape settings.
//!
//! Where `promtool` is not installed the tests that run it fail, naming the Debian package
//! (`prometheus`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sync_daemon_sim::{Faults, WODIFY_KEY};

use crate::support::{
    DaemonProcess, Harness, Metrics, command, exit, replaced, require_tool, run_command,
    seed_valid_clients, unix_now, with_source, yearly_schedules,
};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `promtool` and its version line; fails the test when it is not installed.
fn promtool() -> (PathBuf, String) {
    let tool = require_tool("promtool", "prometheus");
    let out = Command::new(&tool)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {} --version: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text.lines().next().unwrap_or_default().to_string();
    (tool, version)
}

/// `promtool check metrics` on `text` (its stdin): the exit code and everything it printed.
fn check_metrics(tool: &Path, text: &str) -> (Option<i32>, String) {
    use std::io::Write as _;
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool check metrics");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), printed)
}

/// The default config (`gym` and `clinic`) with a push feed on `gym`, polling only at start.
fn config_with_push(h: &Harness) -> String {
    with_source(
        &yearly_schedules(&h.base_config()),
        "gym",
        "push_secret = \"monitoring-push-secret\"",
    )
}

/// A daemon that has polled both sources and delivered what they hold: seeded records
/// include invalid emails (rejections) and unusable phones (normalization warnings), so most
/// families have samples.
async fn synced_daemon(h: &Harness) -> DaemonProcess {
    h.sims.wodify.seed(60, 51);
    h.sims.practicehub.seed(20, 51);
    let daemon = h.start_daemon(&config_with_push(h)).await;
    daemon.wait_polls("gym", 1).await;
    daemon.wait_polls("clinic", 1).await;
    let d = &daemon;
    d.wait_until(
        "the polled customers delivered",
        Duration::from_secs(30),
        || async move {
            let m = d.metrics().await;
            m.sum("sync_daemon_upserts_total", &[]) > 0.0
                && m.sum("sync_daemon_queue_depth", &[]) == 0.0
        },
    )
    .await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_passes_promtool_check_metrics_and_names_the_build_and_the_process() {
    let (tool, version) = promtool();
    let h = Harness::start().await;
    let daemon = synced_daemon(&h).await;
    let m = daemon.metrics().await;

    let (code, printed) = check_metrics(&tool, &m.text);
    assert!(
        code == Some(0) && printed.trim().is_empty(),
        "promtool check metrics ({version}) exited {code:?}:\n{printed}\n--- scrape ---\n{}",
        m.text
    );

    // build_info names the running binary: the version and commit `--version` prints.
    let mut version_command = command(h.dir());
    version_command.arg("--version");
    let out = run_command(version_command).await;
    out.assert_exit(exit::OK);
    let commit = out
        .stdout
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no commit in --version: {}", out.stdout));
    assert_eq!(
        m.sum(
            "sync_daemon_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("commit", commit)]
        ),
        1.0,
        "build_info for {} {commit}\n{}",
        env!("CARGO_PKG_VERSION"),
        m.text
    );

    // The process metrics every Prometheus client library exports.
    let resident = m.sum("process_resident_memory_bytes", &[]);
    assert!(
        resident > 1024.0 * 1024.0,
        "resident memory {resident}\n{}",
        m.text
    );
    let open = m.sum("process_open_fds", &[]);
    let max = m.sum("process_max_fds", &[]);
    assert!(open >= 3.0 && open <= max, "open fds {open} of {max}");
    let started = m.sum("process_start_time_seconds", &[]);
    let now = unix_now() as f64;
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "process start {started}, now {now}"
    );
    assert!(m.has("process_cpu_seconds_total", &[]), "{}", m.text);
    daemon.stop().await.assert_exit(exit::OK);
}

/// The value of the one sample of `name` with `labels`; fails when there is none.
#[track_caller]
fn sample(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = m.matching(name, labels).map(|s| s.value).collect();
    assert_eq!(
        found.len(),
        1,
        "one sample of {name}{labels:?} expected, found {found:?}\n{}",
        m.text
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_sets_known_at_start_are_exported_at_zero_and_polls_count_with_every_upstream_down() {
    let h = Harness::start().await;
    h.sims.wodify.seed(10, 52);
    h.sims.practicehub.seed(10, 52);
    let down = Faults {
        error_rate: 1.0,
        ..Faults::default()
    };
    h.sims.revkeen.set_faults(down.clone());
    h.sims.wodify.set_faults(down.clone());
    h.sims.practicehub.set_faults(down);
    let mut toml = config_with_push(&h);
    for source in ["gym", "clinic"] {
        toml = with_source(&toml, source, "max_attempts = 1");
    }
    let daemon = h.start_daemon(&toml).await;

    // The first scrape: nothing of this has happened yet, and all of it is there at 0.
    let m = daemon.metrics().await;
    for target in ["revkeen", "gym", "clinic"] {
        assert_eq!(
            sample(&m, "sync_daemon_auth_halted", &[("target", target)]),
            0.0
        );
        assert_eq!(
            sample(&m, "sync_daemon_rate_limited_total", &[("target", target)]),
            0.0
        );
    }
    assert_eq!(
        sample(&m, "sync_daemon_push_events_total", &[("source", "gym")]),
        0.0
    );
    assert_eq!(
        sample(&m, "sync_daemon_push_pending", &[("source", "gym")]),
        0.0
    );
    assert!(
        !m.has("sync_daemon_push_events_total", &[("source", "clinic")]),
        "clinic has no push feed\n{}",
        m.text
    );
    for status in ["400", "401", "404", "413", "503"] {
        assert_eq!(
            sample(&m, "sync_daemon_push_refused_total", &[("status", status)]),
            0.0
        );
    }
    for source in ["gym", "clinic"] {
        assert_eq!(
            sample(
                &m,
                "sync_daemon_scheduler_overdue_total",
                &[("source", source)]
            ),
            0.0
        );
        for outcome in ["ok", "unavailable", "auth_refused", "failed"] {
            sample(
                &m,
                "sync_daemon_polls_total",
                &[("source", source), ("outcome", outcome)],
            );
        }
        for outcome in ["created", "updated", "stale", "dead_lettered"] {
            assert_eq!(
                sample(
                    &m,
                    "sync_daemon_upserts_total",
                    &[("source", source), ("outcome", outcome)]
                ),
                0.0
            );
        }
    }

    // Every upstream down: the failed polls are what moves.
    let d = &daemon;
    let m = d
        .wait_for(
            "a poll of each source counted as unavailable",
            Duration::from_secs(30),
            || async move {
                let m = d.metrics().await;
                let both = ["gym", "clinic"].iter().all(|source| {
                    m.sum(
                        "sync_daemon_polls_total",
                        &[("source", source), ("outcome", "unavailable")],
                    ) >= 1.0
                });
                if both { Ok(m) } else { Err(m.text) }
            },
        )
        .await;
    for source in ["gym", "clinic"] {
        assert_eq!(
            sample(
                &m,
                "sync_daemon_polls_total",
                &[("source", source), ("outcome", "ok")]
            ),
            0.0
        );
        assert!(
            !m.has(
                "sync_daemon_last_successful_poll_timestamp_seconds",
                &[("source", source)]
            ),
            "no poll of {source} has succeeded\n{}",
            m.text
        );
    }
    daemon.stop().await.assert_exit(exit::OK);
}

/// Scrapes until `condition` holds for a scrape, and returns that scrape.
async fn scrape_until(
    daemon: &DaemonProcess,
    what: &str,
    condition: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let condition = &condition;
    daemon
        .wait_for(what, Duration::from_secs(30), || async move {
            let m = daemon.metrics().await;
            if condition(&m) { Ok(m) } else { Err(m.text) }
        })
        .await
}

fn polls(m: &Metrics, outcome: &str) -> f64 {
    m.sum(
        "sync_daemon_polls_total",
        &[("source", "gym"), ("outcome", outcome)],
    )
}

fn gym_gauge(m: &Metrics, name: &str) -> f64 {
    sample(m, name, &[("source", "gym")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_with_nothing_new_is_a_success_and_a_source_that_is_down_or_refuses_its_key_is_not()
{
    const POLL_TIME: &str = "sync_daemon_last_successful_poll_timestamp_seconds";
    const UPSERT_TIME: &str = "sync_daemon_last_success_timestamp_seconds";
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 53);
    let toml = replaced(
        &h.config_for("gym"),
        "schedule = \"0 */15 * * * *\"",
        "schedule = \"* * * * * *\"",
    );
    let toml = with_source(&toml, "gym", "max_attempts = 1");
    let daemon = h.start_daemon(&toml).await;
    let revkeen = h.sims.revkeen.clone();

    // Backfilled, then polled again with nothing new.
    let m = scrape_until(&daemon, "the backfill and a second poll", |m| {
        revkeen.customers("wodify").len() == 20 && polls(m, "ok") >= 2.0
    })
    .await;
    let (upserted, polled, ok) = (
        gym_gauge(&m, UPSERT_TIME),
        gym_gauge(&m, POLL_TIME),
        polls(&m, "ok"),
    );
    let m = scrape_until(&daemon, "two more quiet polls", |m| {
        polls(m, "ok") >= ok + 2.0
    })
    .await;
    assert_eq!(
        gym_gauge(&m, UPSERT_TIME),
        upserted,
        "nothing new was sent\n{}",
        m.text
    );
    let quiet = gym_gauge(&m, POLL_TIME);
    assert!(
        quiet > polled && quiet > upserted,
        "a quiet poll is a successful poll: {quiet} after {polled} (last upsert {upserted})"
    );

    // Wodify down: polls are counted as unavailable and the success time stays.
    h.sims.wodify.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let m = scrape_until(&daemon, "a poll counted as unavailable", |m| {
        polls(m, "unavailable") >= 1.0
    })
    .await;
    let (down_since, ok, unavailable) = (
        gym_gauge(&m, POLL_TIME),
        polls(&m, "ok"),
        polls(&m, "unavailable"),
    );
    let m = scrape_until(&daemon, "two more unavailable polls", |m| {
        polls(m, "unavailable") >= unavailable + 2.0
    })
    .await;
    assert_eq!(gym_gauge(&m, POLL_TIME), down_since, "{}", m.text);
    assert_eq!(polls(&m, "ok"), ok, "{}", m.text);

    // Up again but refusing the key: counted as such, and an auth halt for the source.
    h.sims.wodify.set_faults(Faults::default());
    h.sims.wodify.set_api_key("wodify_rotated_key");
    let m = scrape_until(&daemon, "an auth halt for gym", |m| {
        polls(m, "auth_refused") >= 1.0
            && m.sum("sync_daemon_auth_halted", &[("target", "gym")]) == 1.0
    })
    .await;
    assert_eq!(
        m.sum("sync_daemon_auth_halted", &[("target", "revkeen")]),
        0.0,
        "RevKeen accepts its key\n{}",
        m.text
    );
    let ok = polls(&m, "ok");

    // Accepted again: the halt clears and polls succeed.
    h.sims.wodify.set_api_key(WODIFY_KEY);
    let m = scrape_until(&daemon, "the halt cleared by a successful poll", |m| {
        polls(m, "ok") > ok && m.sum("sync_daemon_auth_halted", &[("target", "gym")]) == 0.0
    })
    .await;
    assert!(gym_gauge(&m, POLL_TIME) > down_since);
    daemon.stop().await.assert_exit(exit::OK);
}

#[test]
fn the_alert_rules_pass_promtool_check_rules_and_their_unit_tests() {
    let (tool, version) = promtool();
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yaml"],
        ["test", "rules", "deploy/prometheus/tests/alerts_test.yaml"],
    ] {
        let out = Command::new(&tool)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap_or_else(|e| panic!("run promtool {args:?}: {e}"));
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && printed.contains("SUCCESS"),
            "promtool {} ({version}) exited {:?}:\n{printed}",
            args.join(" "),
            out.status.code()
        );
    }
}

/// The metric names in a PromQL expression or a rules file: identifiers that start with
/// `sync_daemon_` or `process_` (functions, labels and `up` are not ours).
fn metric_names(text: &str) -> BTreeSet<String> {
    let pattern = regex::Regex::new(r"\b(?:sync_daemon|process)_[a-z0-9_]+\b").expect("regex");
    pattern
        .find_iter(text)
        .map(|m| m.as_str().to_string())
        .collect()
}

/// Every PromQL expression in a Grafana dashboard: each panel target's `expr` and each
/// templating variable's query, however deeply nested.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query" | "definition", serde_json::Value::String(query)) => {
                        out.push(query.clone())
                    }
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, out);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_one_the_daemon_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/sync-daemon.json"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let exprs = queries
        .iter()
        .filter(|q| q.contains("sync_daemon_") || q.contains("process_"))
        .count();
    assert!(exprs >= 20, "the dashboard has {exprs} queries of ours");
    let mut wanted: Vec<(String, String)> = queries
        .iter()
        .flat_map(|q| metric_names(q))
        .map(|name| ("deploy/grafana/sync-daemon.json".to_string(), name))
        .collect();
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/prometheus/tests/alerts_test.yaml",
    ] {
        wanted.extend(
            metric_names(&read(file))
                .into_iter()
                .map(|name| (file.to_string(), name)),
        );
    }

    let h = Harness::start().await;
    let daemon = synced_daemon(&h).await;
    let m = daemon.metrics().await;
    daemon.stop().await.assert_exit(exit::OK);
    let exported: BTreeSet<&str> = m.samples.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, name)| !exported.contains(name.as_str()))
        .map(|(file, name)| format!("{file}: {name}"))
        .collect();
    assert!(
        missing.is_empty(),
        "queries name metrics the daemon does not export:\n{}\n--- scrape ---\n{}",
        missing.join("\n"),
        m.text
    );
    // The alerts cover what the issue asks of them.
    let alerts = read("deploy/prometheus/alerts.yaml");
    for name in [
        "sync_daemon_auth_halted",
        "sync_daemon_oldest_pending_age_seconds",
        "sync_daemon_dead_letters",
        "sync_daemon_polls_total",
        "sync_daemon_last_successful_poll_timestamp_seconds",
        "sync_daemon_rate_limited_total",
    ] {
        assert!(alerts.contains(name), "no alert on {name}");
    }
    assert!(
        alerts.contains("up{job=\"sync-daemon\"}"),
        "no daemon-down alert"
    );
}

#[test]
fn kubernetes_scrapes_the_sidecar_through_a_pod_monitor_not_the_apps_annotations() {
    let sidecar = read("deploy/k8s/sidecar.yaml");
    assert!(
        !sidecar
            .lines()
            .any(|line| line.trim_start().starts_with("prometheus.io/")),
        "prometheus.io/* pod annotations take over the merchant app's own scrape settings"
    );
    let monitor = read("deploy/k8s/podmonitor.yaml");
    assert!(monitor.contains("kind: PodMonitor"), "{monitor}");
    assert!(
        monitor.contains("app: merchant-app") && sidecar.contains("app: merchant-app"),
        "the PodMonitor selects the pods of deploy/k8s/sidecar.yaml"
    );
    assert!(
        monitor.contains("port: sync-http") && sidecar.contains("name: sync-http"),
        "the PodMonitor scrapes the sidecar's named port"
    );
    assert!(monitor.contains("path: /metrics"));
    // The alerts select job="sync-daemon": the PodMonitor sets it.
    assert!(
        monitor.contains("targetLabel: job") && monitor.contains("replacement: sync-daemon"),
        "{monitor}"
    );
}
