//! The harness: simulators in the test's runtime, a temp state directory, a config file, and
//! the real `sync-daemon` binary run as a child process.
//!
//! Tests must run on a multi-threaded runtime (`#[tokio::test(flavor = "multi_thread",
//! worker_threads = 2)]`) so the simulators keep serving while a child runs. Every run checks
//! that no configured API key appears in the child's stdout or stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sync_daemon::customer::normalize_email;
use sync_daemon::store::{Failure, Store};
use sync_daemon_sim::practicehub::PracticeHubSim;
use sync_daemon_sim::revkeen::RevKeenSim;
use sync_daemon_sim::wodify::WodifySim;
use sync_daemon_sim::{PRACTICEHUB_KEY, REVKEEN_KEY, SimPorts, SimSet, WODIFY_KEY};
use tokio::process::{Child, Command};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sync-daemon");

/// No single run of the binary may take longer; a hang fails the test instead of the suite.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Exit codes from DESIGN's external interface.
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 2;
    pub const REJECTED: i32 = 65;
    pub const UNAVAILABLE: i32 = 69;
    pub const AUTH_REFUSED: i32 = 77;
    pub const TEMPFAIL: i32 = 75;
    pub const CONFIG: i32 = 78;
    pub const INTERRUPTED: i32 = 130;
    pub const TERMINATED: i32 = 143;
}

/// One finished run of the binary.
#[derive(Debug)]
pub struct Output {
    /// The exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    fn new(status: ExitStatus, stdout: &[u8], stderr: &[u8], elapsed: Duration) -> Output {
        Output {
            code: status.code(),
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            elapsed,
        }
    }

    /// Panics with the run's output unless it exited with `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) -> &Output {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}, got {:?} after {:.1} s\n{}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.transcript()
        );
        self
    }

    /// stdout and stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// A running `--once` started with [`Harness::spawn_once`].
pub struct Running {
    child: Child,
    started: Instant,
    secrets: Vec<String>,
}

impl Running {
    /// SIGKILLs the process (tokio's `Child::kill`, like std's, sends SIGKILL on Unix) and
    /// returns what it printed; `code` is `None` if the kill landed before it exited.
    pub async fn kill(mut self) -> Output {
        // An error here means it already exited, which the returned code shows.
        let _ = self.child.start_kill();
        let out = tokio::time::timeout(RUN_TIMEOUT, self.child.wait_with_output())
            .await
            .expect("a killed sync-daemon is reaped promptly")
            .expect("waiting for sync-daemon");
        let out = Output::new(out.status, &out.stdout, &out.stderr, self.started.elapsed());
        assert_no_secrets(&out, &self.secrets);
        out
    }

    /// Kills the process as soon as `condition` holds, unless it exits first (then its output
    /// says how it ended). The condition is checked every [`WAIT_INTERVAL`].
    pub async fn kill_when(mut self, mut condition: impl FnMut() -> bool) -> Output {
        let child = &mut self.child;
        wait_until(
            "sync-daemon to finish or to meet the kill condition",
            RUN_TIMEOUT,
            || child.try_wait().expect("polling sync-daemon").is_some() || condition(),
        )
        .await;
        self.kill().await
    }

    /// Sends `signal` (SIGTERM, SIGINT) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal}");
    }

    /// Waits for the process to finish by itself.
    pub async fn finish(self) -> Output {
        let out = tokio::time::timeout(RUN_TIMEOUT, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("sync-daemon did not finish within {RUN_TIMEOUT:?}"))
            .expect("waiting for sync-daemon");
        let out = Output::new(out.status, &out.stdout, &out.stderr, self.started.elapsed());
        assert_no_secrets(&out, &self.secrets);
        out
    }
}

/// Simulators, a temp directory with `config.toml` and `state.db`, and the binary.
pub struct Harness {
    pub sims: SimSet,
    pub state: PathBuf,
    pub config: PathBuf,
    dir: tempfile::TempDir,
    /// Every API key any config of this test carried: none may ever be printed.
    secrets: Mutex<Vec<String>>,
}

impl Harness {
    /// Starts the simulators on free loopback ports and writes the default config (sources
    /// `gym` and `clinic`), with no records seeded.
    pub async fn start() -> Harness {
        let sims = SimSet::start(SimPorts::default())
            .await
            .expect("simulators start on 127.0.0.1");
        let dir = tempfile::Builder::new()
            .prefix("sync-daemon-it")
            .tempdir()
            .expect("temp dir");
        let harness = Harness {
            state: dir.path().join("state.db"),
            config: dir.path().join("config.toml"),
            sims,
            dir,
            secrets: Mutex::new(
                [REVKEEN_KEY, WODIFY_KEY, PRACTICEHUB_KEY]
                    .map(String::from)
                    .to_vec(),
            ),
        };
        harness.write_config(&harness.base_config());
        harness
    }

    /// The temp directory (the child's working directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The simulators' own config (`SimSet::config_toml`) for this state file.
    pub fn base_config(&self) -> String {
        // The simulators count no quota, and tests poll Wodify far more often than a month's
        // budget would allow (the daemon would space their polls out): unlimited here. The
        // budget's own tests set one (`wodify_budget.rs`).
        with_source(&self.sims.config_toml(&self.state), "gym", UNLIMITED_WODIFY)
    }

    /// The default config with only the named source.
    pub fn config_for(&self, source: &str) -> String {
        only_source(&self.base_config(), source)
    }

    /// Writes `toml` as the config file; its API keys join the secrets that must never print.
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config, toml).expect("write config");
        let mut secrets = self.secrets.lock().expect("secrets lock");
        for secret in secret_values(toml) {
            if !secrets.contains(&secret) {
                secrets.push(secret);
            }
        }
    }

    fn secrets(&self) -> Vec<String> {
        self.secrets.lock().expect("secrets lock").clone()
    }

    /// `sync-daemon --config <config> <args>`, with the test environment scrubbed of anything
    /// that could change the config or the log level.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = command(self.dir());
        command.arg("--config").arg(&self.config).args(args);
        command
    }

    /// Runs the binary with `args` after `--config` and waits for it.
    pub async fn run(&self, args: &[&str]) -> Output {
        let out = run_command(self.command(args)).await;
        assert_no_secrets(&out, &self.secrets());
        out
    }

    /// Like [`Harness::run`] with extra environment variables, whose values must not print
    /// either (they carry secrets in the tests that use this).
    pub async fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let out = run_command(command).await;
        let mut secrets = self.secrets();
        secrets.extend(env.iter().map(|(_, value)| value.to_string()));
        assert_no_secrets(&out, &secrets);
        out
    }

    /// `sync-daemon --config <config> --once`.
    pub async fn once(&self) -> Output {
        self.run(&["--once"]).await
    }

    /// Starts `--once` without waiting for it.
    pub fn spawn_once(&self) -> Running {
        let mut command = self.command(&["--once"]);
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Running {
            started: Instant::now(),
            child: command.spawn().expect("spawn sync-daemon"),
            secrets: self.secrets(),
        }
    }

    /// `status --json`, parsed; fails the test, showing the run's output, unless it exits 0
    /// and prints JSON.
    pub async fn status_json(&self) -> Value {
        let out = self.run(&["status", "--json"]).await;
        out.assert_exit(exit::OK);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`status --json` printed no JSON ({e})\n{}",
                out.transcript()
            )
        })
    }

    /// Every open failure in the state file, read through a read-only handle.
    pub fn failures(&self) -> Vec<Failure> {
        Store::open_read_only(&self.state)
            .expect("state file opens read-only")
            .expect("state file exists after a run")
            .failures(None)
            .expect("failures read")
    }

    /// Serves PracticeHub as live integrations see it (its simulator's live variant), with its
    /// clock `clock_offset_secs` ahead of this host's (negative: behind). Before seeding.
    pub fn practicehub_live(&self, clock_offset_secs: i64) {
        self.sims.practicehub.set_live(true);
        self.sims.practicehub.set_clock_offset(clock_offset_secs);
    }

    /// Lifts every simulator's rate limit, for tests not about rate limiting that run the
    /// binary several times in a row.
    pub fn unlimited(&self) {
        self.sims.wodify.set_rate_limit(0, 0);
        self.sims.practicehub.set_rate_limit(0, 0);
        self.sims.revkeen.set_rate_limit(0, 0);
    }
}

/// A command for the binary with a scrubbed environment, run in `dir`.
pub fn command(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("SYNC_DAEMON")
            || matches!(
                name_text.as_ref(),
                "RUST_LOG" | "CREDENTIALS_DIRECTORY" | "STATE_DIRECTORY" | "JOURNAL_STREAM"
            )
        {
            command.env_remove(&name);
        }
    }
    command
}

/// Runs `command` to completion (or fails the test after [`RUN_TIMEOUT`]).
pub async fn run_command(mut command: Command) -> Output {
    let started = Instant::now();
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("spawn sync-daemon");
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sync-daemon did not finish within {RUN_TIMEOUT:?}"))
        .expect("waiting for sync-daemon");
    Output::new(out.status, &out.stdout, &out.stderr, started.elapsed())
}

/// Fails the test if any secret appears in the run's output.
#[track_caller]
pub fn assert_no_secrets(out: &Output, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !out.stdout.contains(secret.as_str()) && !out.stderr.contains(secret.as_str()),
            "the API key {secret:?} appeared in sync-daemon's output\n{}",
            out.transcript()
        );
    }
}

/// The quoted values of `api_key = "…"` and `push_secret = "…"` lines.
fn secret_values(toml: &str) -> Vec<String> {
    toml.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            (key == "api_key" || key == "push_secret").then_some(())?;
            let value = value.trim().trim_matches('"');
            (!value.is_empty()).then(|| value.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Host tools a few tests run.

/// Where `tool` is on `PATH`. Fails the test, naming the Debian `package` to install, when it
/// is not installed: a missing tool never lets a test pass silently (`.ci/run` installs them).
#[track_caller]
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    match find_on_path(tool) {
        Some(path) => path,
        None => panic!(
            "`{tool}` is not installed (not on PATH) and this test needs it: install the Debian \
             package `{package}` (apt-get install {package}); .ci/run installs it when missing"
        ),
    }
}

/// The first executable file named `tool` in a `PATH` directory.
fn find_on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

// ---------------------------------------------------------------------------------------------
// Config editing: tests start from `SimSet::config_toml` and change a few lines.

/// `toml` with every `[[sources]]` block except the one named `name` removed.
#[track_caller]
pub fn only_source(toml: &str, name: &str) -> String {
    let mut parts = toml.split("[[sources]]");
    let mut out = parts.next().unwrap_or_default().to_string();
    for block in parts {
        if block.contains(&format!("name = \"{name}\"")) {
            out.push_str("[[sources]]");
            out.push_str(block);
        }
    }
    assert!(out.contains("[[sources]]"), "no source named {name}");
    out
}

/// `toml` with `line` added to the `[revkeen]` table.
#[track_caller]
pub fn with_revkeen(toml: &str, line: &str) -> String {
    assert!(toml.contains("[revkeen]\n"), "no [revkeen] table");
    toml.replacen("[revkeen]\n", &format!("[revkeen]\n{line}\n"), 1)
}

/// `toml` with `line` added to the source named `name`.
#[track_caller]
pub fn with_source(toml: &str, name: &str, line: &str) -> String {
    let anchor = format!("name = \"{name}\"\n");
    assert!(toml.contains(&anchor), "no source named {name}");
    toml.replacen(&anchor, &format!("{anchor}{line}\n"), 1)
}

/// The line [`Harness::base_config`] gives the Wodify source `gym`.
pub const UNLIMITED_WODIFY: &str = "monthly_request_budget = 0";

/// `toml` with `line` added to the `[daemon]` table.
#[track_caller]
pub fn with_daemon(toml: &str, line: &str) -> String {
    assert!(toml.contains("[daemon]\n"), "no [daemon] table");
    toml.replacen("[daemon]\n", &format!("[daemon]\n{line}\n"), 1)
}

/// `toml` with `from` replaced by `to`, which must be present.
#[track_caller]
pub fn replaced(toml: &str, from: &str, to: &str) -> String {
    assert!(toml.contains(from), "{from:?} is not in the config");
    toml.replacen(from, to, 1)
}

// ---------------------------------------------------------------------------------------------
// Expectations, computed from the simulators' data.

/// What RevKeen should hold for one customer: the fields a user would check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub email: String,
    pub name: Option<String>,
}

fn joined_name(first: Option<&str>, last: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [first, last]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The name RevKeen holds for a customer, if it holds the customer.
pub fn name_at_revkeen(h: &Harness, source: &str, id: &str) -> Option<String> {
    h.sims
        .revkeen
        .customer(source, id)
        .and_then(|c| c.fields.get("name")?.as_str().map(str::to_string))
}

/// Every Wodify client with a valid email, by external id.
pub fn expected_wodify(sim: &WodifySim) -> BTreeMap<String, Expected> {
    sim.clients()
        .iter()
        .filter_map(|client| {
            let id = client.get("id")?.as_i64()?;
            let email = normalize_email(client.get("email").and_then(Value::as_str)).ok()?;
            let name = joined_name(
                client.get("first_name").and_then(Value::as_str),
                client.get("last_name").and_then(Value::as_str),
            );
            Some((id.to_string(), Expected { email, name }))
        })
        .collect()
}

/// Ids of Wodify clients without a valid email.
pub fn invalid_wodify(sim: &WodifySim) -> Vec<i64> {
    sim.clients()
        .iter()
        .filter(|client| normalize_email(client.get("email").and_then(Value::as_str)).is_err())
        .filter_map(|client| client.get("id").and_then(Value::as_i64))
        .collect()
}

fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => false,
    }
}

/// Every PracticeHub patient that is not deleted and has a valid email, by external id.
pub fn expected_practicehub(sim: &PracticeHubSim) -> BTreeMap<String, Expected> {
    sim.patients()
        .iter()
        .filter(|patient| !truthy(patient.get("deleted")))
        .filter_map(|patient| {
            let id = patient.get("id")?.as_i64()?;
            let email = normalize_email(patient.get("email").and_then(Value::as_str)).ok()?;
            let name = joined_name(
                patient.get("first_name").and_then(Value::as_str),
                patient.get("last_name").and_then(Value::as_str),
            );
            Some((id.to_string(), Expected { email, name }))
        })
        .collect()
}

/// What RevKeen holds for `source`, by external id.
pub fn at_revkeen(sim: &RevKeenSim, source: &str) -> BTreeMap<String, Expected> {
    sim.customers(source)
        .into_iter()
        .map(|customer| {
            let field = |name: &str| {
                customer
                    .fields
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            (
                customer.external_id.clone(),
                Expected {
                    email: field("email").unwrap_or_default(),
                    name: field("name"),
                },
            )
        })
        .collect()
}

/// Asserts RevKeen holds exactly `expected` for `source`, listing a few differences if not.
#[track_caller]
pub fn assert_revkeen_holds(sim: &RevKeenSim, source: &str, expected: &BTreeMap<String, Expected>) {
    let actual = at_revkeen(sim, source);
    if &actual == expected {
        return;
    }
    let mut report = String::new();
    let missing: Vec<&String> = expected
        .keys()
        .filter(|id| !actual.contains_key(*id))
        .collect();
    let extra: Vec<&String> = actual
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    let different: Vec<String> = expected
        .iter()
        .filter_map(|(id, want)| {
            let got = actual.get(id)?;
            (got != want).then(|| format!("{id}: expected {want:?}, RevKeen has {got:?}"))
        })
        .collect();
    let _ = writeln!(
        report,
        "RevKeen's {source} customers differ from the source: {} missing, {} unexpected, {} with other data",
        missing.len(),
        extra.len(),
        different.len()
    );
    let _ = writeln!(
        report,
        "missing (first 10): {:?}",
        &missing[..missing.len().min(10)]
    );
    let _ = writeln!(
        report,
        "unexpected (first 10): {:?}",
        &extra[..extra.len().min(10)]
    );
    for line in different.iter().take(10) {
        let _ = writeln!(report, "  {line}");
    }
    panic!("{report}");
}

// ---------------------------------------------------------------------------------------------
// Seeding.

/// Seeds `count` Wodify clients and gives every one without a valid email a valid one, so a
/// clean run exits 0.
pub fn seed_valid_clients(sim: &WodifySim, count: usize, seed: u64) {
    sim.seed(count, seed);
    for id in invalid_wodify(sim) {
        let mut client = sim.client(id).expect("seeded client");
        client["email"] = json!(format!("member{id}@example.com"));
        sim.put_client(client);
    }
    assert!(invalid_wodify(sim).is_empty());
}

/// Seeds `count` PracticeHub patients, every one with a valid email and not deleted.
pub fn seed_valid_patients(sim: &PracticeHubSim, count: usize, seed: u64) {
    sim.seed(count, seed);
    for mut patient in sim.patients() {
        let id = patient["id"].as_i64().expect("seeded patients have ids");
        patient["email"] = json!(format!("patient{id}@example.co.uk"));
        patient["deleted"] = json!(false);
        sim.put_patient(patient);
    }
}

/// The ids of Wodify's clients, in ascending order.
pub fn client_ids(sim: &WodifySim) -> Vec<i64> {
    let mut ids: Vec<i64> = sim
        .clients()
        .iter()
        .filter_map(|c| c["id"].as_i64())
        .collect();
    ids.sort_unstable();
    ids
}

/// Gives Wodify client `id` the last name `last_name`; fails the test if Wodify has no such
/// client.
#[track_caller]
pub fn rename_client(sim: &WodifySim, id: i64, last_name: &str) {
    assert!(
        sim.update_client(id, json!({ "last_name": last_name })),
        "Wodify has no client {id} to rename to {last_name:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Waiting: every wait of these tests goes through `wait_for`.

/// How often a wait looks at its condition again.
pub const WAIT_INTERVAL: Duration = Duration::from_millis(10);

/// The one poll-until loop: awaits `check` every [`WAIT_INTERVAL`] until it returns
/// `Ok(value)`, and returns the value. `Err(state)` means "not yet"; after `timeout` the test
/// fails with `what` and the last `state` (what was seen instead). A check may also panic
/// itself when waiting on is pointless (a daemon that exited).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let state = match check().await {
            Ok(value) => return value,
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            let separator = if state.is_empty() { "" } else { "\n" };
            panic!("timed out after {timeout:?} waiting for {what}{separator}{state}");
        }
        tokio::time::sleep(WAIT_INTERVAL).await;
    }
}

/// `Ok(())` when `done`, else "not yet" with nothing more to say.
fn met(done: bool) -> Result<(), String> {
    done.then_some(()).ok_or_else(String::new)
}

/// [`wait_for`] a plain condition; fails the test after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    wait_for(what, timeout, || std::future::ready(met(condition()))).await;
}

/// [`wait_for`] an async condition (an HTTP answer, a connection); fails the test after
/// `timeout`.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let pending = condition();
        async move { met(pending.await) }
    })
    .await;
}

/// Waits until RevKeen's name for `source` customer `id` ends with `suffix` (see
/// [`name_at_revkeen`]); fails the test after `within`, a hang guard.
pub async fn wait_for_name(h: &Harness, source: &str, id: i64, suffix: &str, within: Duration) {
    let external_id = id.to_string();
    wait_until(
        &format!("RevKeen's {source} {id} to be named …{suffix}"),
        within,
        || name_at_revkeen(h, source, &external_id).is_some_and(|name| name.ends_with(suffix)),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Run results.

/// The number in the `--once` summary table at (`source` row, `column`).
#[track_caller]
pub fn summary_cell(out: &Output, source: &str, column: &str) -> u64 {
    let mut lines = out
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("SOURCE"));
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_else(|| panic!("no summary table\n{}", out.transcript()))
        .split_whitespace()
        .collect();
    let index = header
        .iter()
        .position(|name| *name == column)
        .unwrap_or_else(|| panic!("no {column} column in {header:?}"));
    let row: Vec<&str> = lines
        .find(|line| line.split_whitespace().next() == Some(source))
        .unwrap_or_else(|| panic!("no {source} row\n{}", out.transcript()))
        .split_whitespace()
        .collect();
    row[index].parse().expect("a count")
}

/// Every customer RevKeen holds for Wodify was written exactly once.
#[track_caller]
pub fn assert_written_once(h: &Harness) {
    let rewritten: Vec<(String, u64)> = h
        .sims
        .revkeen
        .customers("wodify")
        .into_iter()
        .filter(|c| c.writes != 1)
        .map(|c| (c.external_id, c.writes))
        .collect();
    assert!(
        rewritten.is_empty(),
        "customers written more than once: {rewritten:?}"
    );
}

/// Every text and blob value in every table of the state file, read through a read-only
/// connection (works while a daemon holds the file), as `(table, column, value)`.
pub fn state_values(path: &Path) -> Vec<(String, String, String)> {
    use rusqlite::types::ValueRef;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("state file opens read-only");
    conn.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .expect("list tables");
    assert!(!tables.is_empty(), "the state file has no tables");
    let mut values = Vec::new();
    for table in tables {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\""))
            .expect("select a table");
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let mut rows = stmt.query([]).expect("query a table");
        while let Some(row) = rows.next().expect("read a row") {
            for (index, column) in columns.iter().enumerate() {
                let text = match row.get_ref(index).expect("a column") {
                    ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                        String::from_utf8_lossy(bytes).into_owned()
                    }
                    _ => continue,
                };
                values.push((table.clone(), column.clone(), text));
            }
        }
    }
    values
}

/// The raw bytes of the state file and its `-wal`, `-shm` and `-journal` companions (free
/// pages and not-yet-checkpointed frames included), lossily as text.
pub fn state_bytes(path: &Path) -> String {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        if let Ok(content) = std::fs::read(PathBuf::from(name)) {
            bytes.extend(content);
            bytes.push(b'\n');
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `toml` with every source's schedule moved to once a year (midnight, 1 January), so a
/// daemon polls only at start-up during a test.
pub fn yearly_schedules(toml: &str) -> String {
    let mut out = String::new();
    for line in toml.split_inclusive('\n') {
        if line.starts_with("schedule = ") {
            // PracticeHub's nightly full scan would tick a poll too.
            out.push_str("schedule = \"0 0 0 1 1 *\"\nfull_scan_schedule = \"0 0 0 1 1 *\"\n");
        } else {
            out.push_str(line);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Daemon mode: `sync-daemon --config PATH` without `--once`, on a free loopback port.

/// How long a daemon may take from spawn to answering `/healthz`.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A loopback address nothing listens on right now, for `daemon.listen`. (Bound to port 0 and
/// released: another process could take it before the daemon binds, which then fails loudly.)
pub fn free_listen_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}

impl Harness {
    /// Writes `toml` with `daemon.listen` set to a free loopback port, starts the daemon on it
    /// and waits until `/healthz` answers 200.
    pub async fn start_daemon(&self, toml: &str) -> DaemonProcess {
        let daemon = self.spawn_daemon(toml, |_| {});
        daemon.wait_healthy().await;
        daemon
    }

    /// Writes `toml` with `daemon.listen` set to a free loopback port and spawns the daemon on
    /// it after `configure` adjusted the command (environment, …). Returns at once; see
    /// [`DaemonProcess::wait_healthy`] and [`DaemonProcess::wait_ready`].
    pub fn spawn_daemon(&self, toml: &str, configure: impl FnOnce(&mut Command)) -> DaemonProcess {
        assert!(
            !toml.contains("\nlisten ="),
            "spawn_daemon sets daemon.listen itself"
        );
        let addr = free_listen_addr();
        self.write_config(&with_daemon(toml, &format!("listen = \"{addr}\"")));
        let mut command = self.command(&[]);
        configure(&mut command);
        DaemonProcess::spawn(command, addr, self.secrets())
    }
}

/// A daemon-mode `sync-daemon` running as a child process. Its stdout and stderr are read as
/// they arrive (so a chatty daemon never blocks on a full pipe) and can be inspected while it
/// runs; its log is its stderr. However it ends, its output is checked for the configured API
/// keys. Dropping it SIGKILLs the process.
pub struct DaemonProcess {
    child: Mutex<Child>,
    /// Where its HTTP server listens (`daemon.listen`).
    pub addr: SocketAddr,
    started: Instant,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    secrets: Vec<String>,
    http: reqwest::Client,
}

fn collect(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            into.lock()
                .expect("output lock")
                .extend_from_slice(&buf[..n]);
        }
    })
}

impl DaemonProcess {
    /// Spawns `command` (a `sync-daemon` invocation without `--once`) whose config listens on
    /// `addr`; `secrets` must never appear in its output.
    pub fn spawn(mut command: Command, addr: SocketAddr, secrets: Vec<String>) -> DaemonProcess {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn sync-daemon");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        DaemonProcess {
            child: Mutex::new(child),
            addr,
            started: Instant::now(),
            stdout,
            stderr,
            readers,
            secrets,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
        }
    }

    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        self.child
            .lock()
            .expect("child lock")
            .id()
            .and_then(|id| libc::pid_t::try_from(id).ok())
            .expect("the daemon has not been reaped")
    }

    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the daemon logged so far (its stderr).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("output lock")).into_owned()
    }

    /// How the process ended, if it has.
    fn exit_status(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .expect("child lock")
            .try_wait()
            .expect("polling sync-daemon")
    }

    /// GET `path`: the status and body, or `None` when nothing answers.
    pub async fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let response = self.http.get(self.url(path)).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// GET `path`: the status and body; fails the test when nothing answers.
    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.try_get(path).await {
            Some(answer) => answer,
            None => panic!("GET {path} got no answer\n--- stderr ---\n{}", self.log()),
        }
    }

    /// `/metrics`, parsed (the raw text is [`Metrics::text`]); fails unless it answers 200
    /// with Prometheus text.
    pub async fn metrics(&self) -> Metrics {
        let response = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status().as_u16(), 200, "GET /metrics");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/plain"),
            "/metrics content type is {content_type:?}, expected Prometheus text (text/plain)"
        );
        Metrics::parse(&response.text().await.expect("/metrics body"))
    }

    /// [`wait_for`] while the daemon runs: fails at once if it exits before `check` is met,
    /// and shows its log with the last state if the wait times out.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        wait_for(what, timeout, || {
            let pending = check();
            async move {
                let state = match pending.await {
                    Ok(value) => return Ok(value),
                    Err(state) => state,
                };
                if let Some(status) = self.exit_status() {
                    panic!(
                        "sync-daemon exited ({status}) while waiting for {what}\n{state}\n\
                         --- stderr ---\n{}",
                        self.log()
                    );
                }
                Err(format!("{state}\n--- stderr ---\n{}", self.log()))
            }
        })
        .await
    }

    /// [`DaemonProcess::wait_for`] an async condition (`|| async move { d.get(…).await … }`).
    pub async fn wait_until<F, Fut>(&self, what: &str, timeout: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        self.wait_for(what, timeout, || {
            let pending = condition();
            async move { met(pending.await) }
        })
        .await;
    }

    /// Waits until `condition(log)` holds; fails with the log if the daemon exits first or
    /// after `timeout`.
    pub async fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&str) -> bool,
    ) {
        self.wait_for(what, timeout, || {
            std::future::ready(met(condition(&self.log())))
        })
        .await;
    }

    /// Waits until `/healthz` answers 200; fails with the daemon's output if it exits first or
    /// takes longer than [`DAEMON_START_TIMEOUT`].
    pub async fn wait_healthy(&self) {
        self.wait_for_answer("/healthz", DAEMON_START_TIMEOUT).await;
    }

    /// Waits until `/readyz` answers 200; fails with the daemon's output if it exits first or
    /// after 30 s.
    pub async fn wait_ready(&self) {
        self.wait_for_answer("/readyz", Duration::from_secs(30))
            .await;
    }

    async fn wait_for_answer(&self, path: &str, timeout: Duration) {
        self.wait_for(&format!("{path} to answer 200"), timeout, || async move {
            match self.try_get(path).await {
                Some((200, _)) => Ok(()),
                Some((status, body)) => Err(format!("{path} answered {status}: {body}")),
                None => Err(format!("nothing answered on {path}")),
            }
        })
        .await;
    }

    /// Waits until the log shows `count` finished polls of `source`.
    pub async fn wait_polls(&self, source: &str, count: usize) {
        self.wait_for_log(
            &format!("{count} finished polls of {source}"),
            Duration::from_secs(60),
            |log| polls_finished(log, source) >= count,
        )
        .await;
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child, which has not been reaped (we hold its handle).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits up to `timeout` for the process to exit by itself and returns what it printed
    /// (`elapsed` counts from the spawn). Fails, after SIGKILLing it, if it does not exit.
    pub async fn wait_exit(self, timeout: Duration) -> Output {
        let DaemonProcess {
            child,
            started,
            stdout,
            stderr,
            readers,
            secrets,
            ..
        } = self;
        let mut child = child.into_inner().expect("child lock");
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.expect("waiting for sync-daemon"),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "the daemon did not exit within {timeout:?}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stderr.lock().expect("output lock"))
                );
            }
        };
        let elapsed = started.elapsed();
        for reader in readers {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        let out = Output::new(
            status,
            &stdout.lock().expect("output lock"),
            &stderr.lock().expect("output lock"),
            elapsed,
        );
        assert_no_secrets(&out, &secrets);
        out
    }

    /// SIGTERM, then waits for the exit (at most [`RUN_TIMEOUT`]).
    pub async fn stop(self) -> Output {
        self.signal(libc::SIGTERM);
        self.wait_exit(RUN_TIMEOUT).await
    }

    /// SIGKILL, then reaps the process; the output's `code` is `None`.
    pub async fn kill(self) -> Output {
        self.signal(libc::SIGKILL);
        self.wait_exit(RUN_TIMEOUT).await
    }
}

/// Lines of a daemon log (text or JSON) that say a poll of `source` finished.
pub fn polls_finished(log: &str, source: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("Poll finished.") && names_source(line, source))
        .count()
}

/// Whether a log line (text or JSON) carries `source = <source>`.
pub fn names_source(line: &str, source: &str) -> bool {
    line.contains(&format!("source={source}")) || line.contains(&format!("\"source\":\"{source}\""))
}

/// Posts `body` to the daemon's push feed for `source`, with `X-Sync-Signature: signature`
/// if given; returns the status and the body of the answer.
pub async fn push(
    daemon: &DaemonProcess,
    source: &str,
    body: &[u8],
    signature: Option<&str>,
) -> (u16, String) {
    // No client timeout: some pushes wait out the daemon's busy timeout on purpose.
    let mut request = reqwest::Client::new()
        .post(daemon.url(&format!("/v1/changes/{source}")))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("x-sync-signature", signature);
    }
    let response = request.send().await.expect("POST to the push feed");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Seconds since the Unix epoch, for push signatures.
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format (`name{label="value",…} value` lines; `#` lines are kept in
    /// `text` only). Fails the test on a line that is not a sample.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                Self::parse_line(line)
                    .unwrap_or_else(|| panic!("not a Prometheus sample line: {line:?}"))
            })
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    fn parse_line(line: &str) -> Option<Sample> {
        let (series, value) = line.rsplit_once(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().ok()?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}')?;
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                loop {
                    while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
                        chars.next();
                    }
                    if chars.peek().is_none() {
                        break;
                    }
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if chars.next() != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()? {
                            '\\' => value.push(chars.next()?),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(key.trim().to_string(), value);
                }
                (name, labels)
            }
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        valid_name.then(|| Sample {
            name: name.to_string(),
            labels,
            value,
        })
    }

    /// The samples of `name` carrying every label in `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples of `name` carrying `labels` (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|sample| sample.value).sum()
    }

    /// Whether any sample of `name` carries `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }
}

/// An `openssl s_server` with a fresh self-signed certificate on a free port; fails the test
/// when openssl is not installed or cannot make one.
pub async fn self_signed_tls_server(dir: &Path) -> (tokio::process::Child, u16) {
    let openssl = require_tool("openssl", "openssl");
    let generated = tokio::process::Command::new(&openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run openssl req");
    assert!(
        generated.status.success(),
        "openssl req could not make a self-signed certificate:\n{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let port = free_listen_addr().port();
    let server = tokio::process::Command::new(&openssl)
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start openssl s_server");
    wait_until_async(
        "openssl s_server to listen",
        Duration::from_secs(10),
        move || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    (server, port)
}

/// A server that is not the API: it records every request (method, path and query, headers)
/// and answers each with `status` and `body`. A trap for what a redirect would carry, or an
/// upstream that answers what no simulator does.
pub struct Trap {
    pub addr: SocketAddr,
    requests: std::sync::Arc<Mutex<Vec<TrapRequest>>>,
    _task: tokio::task::JoinHandle<()>,
}

/// One request a [`Trap`] received.
#[derive(Debug, Clone)]
pub struct TrapRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
}

impl Trap {
    /// Listens on a free loopback port.
    pub async fn start(status: u16, body: &str) -> Trap {
        let requests: std::sync::Arc<Mutex<Vec<TrapRequest>>> = Default::default();
        let (log, body) = (requests.clone(), body.to_string());
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (log, body) = (log.clone(), body.clone());
            async move {
                log.lock().expect("trap log").push(TrapRequest {
                    method: request.method().to_string(),
                    path_and_query: request
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    headers: request
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                });
                (
                    axum::http::StatusCode::from_u16(status).expect("a status"),
                    [("content-type", "application/json")],
                    body,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a trap");
        let addr = listener.local_addr().expect("trap address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Trap {
            addr,
            requests,
            _task: task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<TrapRequest> {
        self.requests.lock().expect("trap log").clone()
    }
}
