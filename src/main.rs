//! The `sync-daemon` command: CLI parsing, telemetry and exit codes. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use sync_daemon::config::{Config, LogFormat};
use sync_daemon::exit::ExitStatus;
use sync_daemon::ops;
use sync_daemon::progress::ProgressUi;
use sync_daemon::run::{self, OnceOptions};
use sync_daemon::table::escape;
use sync_daemon_sim::{Faults, SimPorts, SimSet};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SYNC_DAEMON_GIT_COMMIT"),
    ")"
);

/// Keeps a merchant's RevKeen customers in step with their Wodify clients and PracticeHub
/// patients.
#[derive(Parser, Debug)]
#[command(name = "sync-daemon", version = VERSION, after_help = "\
Examples:
  sync-daemon                            run as a daemon: poll on schedule, send continuously
  sync-daemon --once                     backfill: poll every source to the end, send, exit
  sync-daemon --once --source main-gym   the same for one source
  sync-daemon --once --dry-run           show what a run would send, write nothing
  sync-daemon demo                       the whole pipeline against the bundled simulators

Exit codes: 0 all delivered, 65 some records rejected or dead-lettered, 69 an upstream stayed
unavailable, 77 an API refused its key, 78 invalid configuration, 2 usage, 1 anything else.")]
struct Cli {
    /// Config file [default: $SYNC_DAEMON_CONFIG, else /etc/sync-daemon/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Poll every source to the end of its listing, drain the outbox, exit.
    #[arg(long)]
    once: bool,
    /// Fetch and diff; print what would be sent; write nothing anywhere. The pinned form is
    /// `--once --dry-run`; `--dry-run` alone is the same.
    #[arg(long)]
    dry_run: bool,
    /// Ignore what was synced before and send every record again (a full backfill).
    #[arg(long)]
    resync: bool,
    /// Limit the run to this source (repeatable).
    #[arg(long = "source", value_name = "NAME")]
    sources: Vec<String>,
    /// With --dry-run: one JSON object per line; with --once: the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// With --dry-run: show the values that would be sent, not just the field names.
    #[arg(long, short)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// GET /healthz on the configured listen address; exit 0 if the daemon is alive, else 1
    /// (for container HEALTHCHECKs on images without curl).
    ///
    /// Example: sync-daemon healthcheck --config /etc/sync-daemon/config.toml
    Healthcheck,
    /// Per source: last poll, what it found, position, next poll; the outbox, dead letters and
    /// any auth halt. Works while the daemon runs (read-only) and when it is stopped.
    ///
    /// Example: sync-daemon status --json
    Status {
        /// Print the documented JSON shape instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Every record that could not be sent: why, RevKeen's error code and field errors,
    /// attempts, first and last seen, and how to fix it.
    ///
    /// Example: sync-daemon failures --source main-gym
    Failures {
        /// Only this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// One JSON array (the documented shape).
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the outbox with their stored body; the next run (or the
    /// running daemon) sends them. Refused while RevKeen refuses the key.
    ///
    /// Example: sync-daemon replay --all            (then: sync-daemon --once)
    #[command(group(clap::ArgGroup::new("what").required(true).args(["all", "ids"])))]
    Replay {
        /// Only this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// These external ids.
        #[arg(value_name = "EXTERNAL_ID")]
        ids: Vec<String>,
    },
    /// Validate the config and the SYNC_DAEMON__ overrides and print the effective config,
    /// secrets redacted. Exit 0 valid, 78 invalid; with --connect also 77 a key refused,
    /// 69 an API unreachable.
    ///
    /// Example: sync-daemon check-config --connect --config /etc/sync-daemon/config.toml
    CheckConfig {
        /// Also make one authenticated read per API.
        #[arg(long)]
        connect: bool,
        /// The verdict as one JSON object on stdout (instead of the effective config).
        #[arg(long)]
        json: bool,
    },
    /// Run the whole pipeline against the bundled simulators and print a summary.
    ///
    /// Example: sync-daemon demo --clients 10000
    Demo {
        /// Wodify clients to seed.
        #[arg(long, default_value_t = 3000)]
        clients: usize,
        /// PracticeHub patients to seed.
        #[arg(long, default_value_t = 1000)]
        patients: usize,
    },
    /// Serve the RevKeen, Wodify and PracticeHub simulators until interrupted.
    ///
    /// Example: sync-daemon sim --clients 500 --error-rate 0.05
    Sim(SimArgs),
    /// Print the shell completion script for SHELL on stdout (the Debian package installs
    /// bash's, zsh's and fish's).
    ///
    /// Example: sync-daemon completions bash > ~/.local/share/bash-completion/completions/sync-daemon
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page sync-daemon(1) on stdout (roff: `sync-daemon man | man -l -`), or
    /// write it and a page for each command into a directory.
    #[command(hide = true)]
    Man {
        /// Write sync-daemon.1, sync-daemon-status.1, … into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct SimArgs {
    /// RevKeen simulator port.
    #[arg(long, default_value_t = 9441)]
    revkeen_port: u16,
    /// Wodify simulator port.
    #[arg(long, default_value_t = 9442)]
    wodify_port: u16,
    /// PracticeHub simulator port.
    #[arg(long, default_value_t = 9443)]
    practicehub_port: u16,
    /// Wodify clients to seed.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// PracticeHub patients to seed.
    #[arg(long, default_value_t = 300)]
    patients: usize,
    /// Fraction of requests answered with a 5xx.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests answered 429.
    #[arg(long, default_value_t = 0.0)]
    rate_429: f64,
    /// Milliseconds added to every request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of connections dropped before the answer.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Fraction of Wodify answers that are an error envelope inside a 200.
    #[arg(long, default_value_t = 0.0)]
    envelope_rate: f64,
    /// Switch off the simulated rate limits (load testing).
    #[arg(long)]
    no_rate_limits: bool,
    /// Simulate RevKeen's own hosted sync active for this provider (wodify, practicehub;
    /// repeatable): the daemon's warning about the other writer.
    #[arg(long, value_name = "PROVIDER")]
    hosted_sync: Vec<String>,
    /// Serve PracticeHub as live integrations see it: other attribute names, naive local
    /// times, links that drop the filter.
    #[arg(long)]
    practicehub_live: bool,
    /// Seconds PracticeHub's clock runs ahead of this host's (negative: behind).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    practicehub_clock_offset_secs: i64,
    /// Wodify as live integrations see it: the API gateway's 429 bodies
    /// ({"message": "Too Many Requests"}) and a client search that ignores `sort`.
    #[arg(long)]
    wodify_live: bool,
    /// Wodify's monthly quota is spent: every request answers 429 {"message": "Limit Exceeded"}.
    #[arg(long)]
    wodify_quota_spent: bool,
}

fn main() -> ExitCode {
    // glibc gives each thread that contends for the heap an arena of its own and keeps their
    // free memory; two are plenty for this process and keep an idle daemon small.
    // SAFETY: mallopt is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    // One async worker thread (the network I/O; `block_on` runs the command's own future on
    // the main thread) and one blocking thread: the state file has one writer connection, so its
    // work runs a call at a time anyway, and the blocking thread runs it, the page mapping,
    // the push HMACs and DNS lookups in arrival order without contending for the connection.
    // With tokio's defaults (a worker per core, up to 512 blocking threads; 2 and 2 before
    // 2026-12-04) the threads only took turns at the connection's mutex: the 100k first sync
    // cost 6-17 % more CPU (ARCHITECTURE.md, "Threads").
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sync-daemon: cannot start the async runtime: {error}");
            return ExitCode::from(ExitStatus::Failure.code());
        }
    };
    let status = runtime.block_on(dispatch(cli));
    if STDOUT_FAILED.load(Ordering::Relaxed) {
        return ExitCode::from(ExitStatus::Failure.code());
    }
    ExitCode::from(status.code())
}

/// Set once stdout's reader went away (`… | head`): the rest of the output is dropped quietly
/// and the command ends as it would have.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// Set when stdout failed otherwise (a full disk under a redirect): the command exits 1.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes a command's output to stdout, never panicking (`print!` panics on a closed pipe).
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_FAILED.store(true, Ordering::Relaxed);
            eprintln!("sync-daemon: cannot write to stdout: {error}");
        }
    }
}

/// `print!` that ends quietly on a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// `println!` that ends quietly on a closed stdout.
macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

async fn dispatch(cli: Cli) -> ExitStatus {
    // The commands that bring their own setup or need none; every other one reads the config.
    match cli.command {
        Some(Command::Demo { clients, patients }) => {
            init_logging(LogFormat::Text, "warn");
            return demo(clients, patients).await;
        }
        Some(Command::Sim(args)) => {
            init_logging(LogFormat::Text, "info");
            return sim(args).await;
        }
        Some(Command::Completions { shell }) => return completions(shell),
        Some(Command::Man { out_dir }) => return man(out_dir.as_deref()),
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref(), &sync_daemon::sources::config_kinds()) {
        Ok(config) => config,
        Err(error) => {
            say(&error);
            if matches!(cli.command, Some(Command::CheckConfig { json: true, .. })) {
                outln!(
                    "{}",
                    serde_json::json!({
                        "valid": false,
                        "problem": error.to_string(),
                        "exit_code": ExitStatus::Config.code(),
                    })
                );
            }
            return ExitStatus::Config;
        }
    };
    // Runs say it in their log (set up below); commands on stderr.
    let logged = cli.command.is_none();
    if !logged {
        for warning in &config.warnings {
            eprintln!("sync-daemon: warning: {warning}");
        }
    }
    match cli.command {
        Some(
            Command::Demo { .. }
            | Command::Sim(_)
            | Command::Completions { .. }
            | Command::Man { .. },
        ) => unreachable!("handled above"),
        Some(Command::Healthcheck) => healthcheck(&config).await,
        Some(Command::CheckConfig { connect, json }) => check_config(&config, connect, json).await,
        Some(Command::Status { json }) => status(&config, json),
        Some(Command::Failures { source, json }) => failures(&config, source.as_deref(), json),
        Some(Command::Replay { source, all, ids }) => replay(&config, source.as_deref(), all, &ids),
        None if cli.verbose && !cli.dry_run => {
            eprintln!("sync-daemon: --verbose applies to --dry-run only");
            ExitStatus::Usage
        }
        None if cli.json && !cli.dry_run && !cli.once => {
            eprintln!(
                "sync-daemon: --json applies to --once and --dry-run (status and failures take their own --json)"
            );
            ExitStatus::Usage
        }
        None => {
            let mut options = OnceOptions {
                sources: cli.sources.clone(),
                resync: cli.resync,
                progress: None,
                stop: None,
            };
            if cli.dry_run {
                init_logging(config.daemon.log_format, &config.daemon.log_level);
                warn_config(&config);
                dry_run(&config, &options, cli.json, cli.verbose).await
            } else if cli.once {
                let ui = ProgressUi::new();
                init_logging_with(
                    config.daemon.log_format,
                    &config.daemon.log_level,
                    Some(ui.log_writer()),
                );
                options.progress = Some(ui.callback());
                let (stop, signal) = stop_on_signals(config.daemon.drain_timeout_secs);
                options.stop = Some(stop);
                warn_config(&config);
                once(&config, &options, &ui, cli.json, &signal).await
            } else if cli.resync || !cli.sources.is_empty() {
                eprintln!(
                    "sync-daemon: --resync and --source apply to a run: add --once or --dry-run"
                );
                ExitStatus::Usage
            } else {
                init_logging(config.daemon.log_format, &config.daemon.log_level);
                warn_config(&config);
                daemon(config, cli.config.clone()).await
            }
        }
    }
}

/// The config's warnings (a key file others can read), in the run's log.
fn warn_config(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

fn init_logging(format: LogFormat, level: &str) {
    init_logging_with(format, level, None::<fn() -> std::io::Stderr>);
}

/// Logs go to stderr (through `writer` when progress bars are drawn there); the format is
/// `sync_daemon::logging`'s.
fn init_logging_with<W>(format: LogFormat, level: &str, writer: Option<W>)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    sync_daemon::logging::init(format, level, writer);
}

async fn daemon(config: Config, path: Option<PathBuf>) -> ExitStatus {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("Cannot install signal handlers; stop the daemon with SIGKILL.");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("Signal received: shutting down (a second signal exits at once).");
            shutdown.cancel();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Safe: everything committed is consistent, and in-flight requests are re-sent.
            tracing::warn!("Second signal: exiting now.");
            std::process::exit(0);
        });
    }
    // SIGHUP reads the config the way this start did (the same path and environment).
    let reload: sync_daemon::reload::Loader =
        Arc::new(move || Config::load(path.as_deref(), &sync_daemon::sources::config_kinds()));
    match sync_daemon::daemon::run(config, shutdown, Some(reload)).await {
        Ok(status) => status,
        Err(error) => {
            say(&error);
            error.exit_status()
        }
    }
}

async fn healthcheck(config: &Config) -> ExitStatus {
    let mut addr = config.daemon.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            eprintln!("sync-daemon healthcheck: {error}");
            return ExitStatus::Failure;
        }
    };
    match client.get(format!("http://{addr}/healthz")).send().await {
        Ok(response) if response.status().is_success() => {
            outln!("alive");
            ExitStatus::Ok
        }
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            eprintln!("sync-daemon healthcheck: http://{addr}/healthz answered {status}: {body}");
            ExitStatus::Failure
        }
        Err(error) => {
            eprintln!("sync-daemon healthcheck: http://{addr}/healthz unreachable: {error}");
            ExitStatus::Failure
        }
    }
}

/// For `--once`: the first SIGTERM or SIGINT cancels the returned token (the run winds down
/// and prints its summary); a second exits at once. The second value says which came first.
fn stop_on_signals(
    drain_secs: u64,
) -> (
    tokio_util::sync::CancellationToken,
    Arc<std::sync::OnceLock<ExitStatus>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = tokio_util::sync::CancellationToken::new();
    let received: Arc<std::sync::OnceLock<ExitStatus>> = Arc::default();
    let (token, first) = (stop.clone(), received.clone());
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        let next = async |term: &mut tokio::signal::unix::Signal,
                          int: &mut tokio::signal::unix::Signal| {
            tokio::select! {
                _ = term.recv() => ("SIGTERM", ExitStatus::Terminated),
                _ = int.recv() => ("SIGINT", ExitStatus::Interrupted),
            }
        };
        let (name, status) = next(&mut term, &mut int).await;
        let _ = first.set(status);
        eprintln!(
            "sync-daemon: {name}: stopping; requests in flight get up to {drain_secs} s, then the summary (a second signal exits at once)."
        );
        token.cancel();
        let (name, status) = next(&mut term, &mut int).await;
        eprintln!(
            "sync-daemon: {name} again: exiting now; what was in flight is re-sent next run."
        );
        std::process::exit(i32::from(status.code()));
    });
    (stop, received)
}

async fn once(
    config: &Config,
    options: &OnceOptions,
    ui: &ProgressUi,
    json: bool,
    signal: &std::sync::OnceLock<ExitStatus>,
) -> ExitStatus {
    let mut result = run::once(config, options).await;
    ui.finish();
    if let (Ok(report), Some(status)) = (&mut result, signal.get()) {
        report.exit = *status;
        report.stopped = Some(format!(
            "stopped by {}; the next run resumes where this one stopped",
            if *status == ExitStatus::Terminated {
                "SIGTERM"
            } else {
                "SIGINT"
            }
        ));
    }
    match result {
        Ok(report) if json => {
            outln!("{}", report.to_json());
            report.exit
        }
        Ok(report) => {
            out!("{}", report.summary_table());
            if let Some(reason) = &report.stopped {
                eprintln!("sync-daemon: run stopped early: {}", escape(reason));
            }
            report.exit
        }
        Err(error) => {
            say(&error);
            error.exit_status()
        }
    }
}

async fn check_config(config: &Config, connect: bool, json: bool) -> ExitStatus {
    let state_problem = ops::check_state_path(&config.daemon.state_path).err();
    let log_override = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let checks = if connect && state_problem.is_none() {
        ops::connect(config).await
    } else {
        Vec::new()
    };
    let status = match &state_problem {
        Some(_) => ExitStatus::Config,
        None if connect => ops::connect_status(&checks),
        None => ExitStatus::Ok,
    };
    let budgets = ops::budget_costs(config);
    if json {
        // `check-config --json` (README): fields are only ever added.
        outln!(
            "{}",
            serde_json::json!({
                "valid": state_problem.is_none(),
                "problem": state_problem.as_ref().map(|p| format!("daemon.state_path: {p}")),
                "state_path": config.daemon.state_path,
                "sources": config.sources.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "log_filter": log_override.as_deref().unwrap_or(&config.daemon.log_level),
                "warnings": config.warnings,
                "connections": checks,
                "request_budgets": budgets,
                "exit_code": status.code(),
            })
        );
        return status;
    }
    outln!("{}", config.to_redacted_toml());
    if let Some(problem) = state_problem {
        eprintln!("sync-daemon: daemon.state_path: {problem}");
        return status;
    }
    if let Some(filter) = log_override {
        eprintln!(
            "sync-daemon: RUST_LOG={filter} overrides daemon.log_level ({:?}): the effective log filter is {filter:?}",
            config.daemon.log_level
        );
    }
    eprintln!(
        "sync-daemon: configuration is valid ({} sources).",
        config.sources.len()
    );
    for cost in &budgets {
        eprintln!("sync-daemon: {}.", escape(&cost.summary));
    }
    for check in &checks {
        let detail = if check.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", check.detail)
        };
        eprintln!(
            "{:<12} {:<12} {}{}",
            check.target,
            check.outcome,
            check.url,
            escape(&detail)
        );
        if !check.hint.is_empty() {
            eprintln!("{:<12} fix: {}", "", check.hint);
        }
        for warning in &check.warnings {
            eprintln!("{:<12} WARNING: {}", "", escape(warning));
        }
    }
    status
}

fn status(config: &Config, json: bool) -> ExitStatus {
    print_report(ops::status(config), json, ops::render_status)
}

/// Prints a read-only command's answer: the documented JSON with `--json`, else the text.
fn print_report<T: serde::Serialize>(
    answer: Result<T, sync_daemon::store::StoreError>,
    json: bool,
    render: fn(&T) -> String,
) -> ExitStatus {
    match answer {
        Ok(report) if json => print_json(&report),
        Ok(report) => {
            out!("{}", render(&report));
            ExitStatus::Ok
        }
        Err(error) => {
            say(&error);
            error.exit_status()
        }
    }
}

/// `--source NAME` of an operator command: a name no source has is a usage error, as in a run.
fn known_source(config: &Config, source: Option<&str>) -> Result<(), ExitStatus> {
    let names: Vec<String> = source.map(str::to_string).into_iter().collect();
    config.selected_sources(&names).map(drop).map_err(|error| {
        say(&error);
        ExitStatus::Usage
    })
}

fn failures(config: &Config, source: Option<&str>, json: bool) -> ExitStatus {
    if let Err(status) = known_source(config, source) {
        return status;
    }
    print_report(ops::failures(config, source), json, |list| {
        ops::render_failures(list)
    })
}

fn replay(config: &Config, source: Option<&str>, all: bool, ids: &[String]) -> ExitStatus {
    if let Err(status) = known_source(config, source) {
        return status;
    }
    let ids = (!all).then_some(ids);
    match ops::replay(config, source, ids) {
        Ok(outcome) => {
            outln!(
                "Replayed {} dead letters into the outbox; the running daemon or the next `sync-daemon --once` sends them.",
                outcome.replayed
            );
            if outcome.superseded > 0 {
                outln!(
                    "{} dropped: a newer version of those customers is already queued.",
                    outcome.superseded
                );
            }
            if !outcome.rejected.is_empty() {
                eprintln!(
                    "Not replayable (rejected before sending; fix them at the source): {}",
                    escape(&outcome.rejected.join(", "))
                );
            }
            if !outcome.not_found.is_empty() {
                eprintln!(
                    "No failure recorded for: {}",
                    escape(&outcome.not_found.join(", "))
                );
            }
            if outcome.rejected.is_empty() && outcome.not_found.is_empty() {
                ExitStatus::Ok
            } else {
                ExitStatus::Failure
            }
        }
        Err(error @ ops::ReplayError::AuthHalted(_)) => {
            say(&error);
            ExitStatus::AuthRefused
        }
        Err(error @ ops::ReplayError::NoState(_)) => {
            say(&error);
            ExitStatus::Failure
        }
        Err(error) => {
            say(&error);
            ExitStatus::Failure
        }
    }
}

/// `sync-daemon completions SHELL`: the script clap_complete generates from the parsed CLI.
fn completions(shell: clap_complete::Shell) -> ExitStatus {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "sync-daemon", &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if shell == clap_complete::Shell::Bash {
        // clap_complete 4.6 spells a hyphenated binary's state `sync__daemon__subcmd__status`
        // in its dispatch loop but `sync__subcmd__daemon__subcmd__status` in the case arms, so
        // nothing after a command would complete (clap-rs/clap#6421, open). One spelling for
        // both; the completions test runs bash on the script and sees when this is fixed.
        script = script.replace("sync__subcmd__daemon", "sync__daemon");
    }
    out!("{script}");
    ExitStatus::Ok
}

/// `sync-daemon man [--out-dir DIR]`: the manual pages clap_mangen renders from the CLI,
/// sync-daemon(1) and one per visible command (sync-daemon-status(1), …), which the first
/// page's COMMANDS section names.
fn man(out_dir: Option<&std::path::Path>) -> ExitStatus {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let source = format!("sync-daemon {}", env!("CARGO_PKG_VERSION"));
    let commands: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set())
        .cloned()
        .collect();
    let mut pages = std::iter::once(command)
        .chain(commands)
        .map(|command| clap_mangen::Man::new(command).source(&source));
    let Some(dir) = out_dir else {
        let mut page = Vec::new();
        let main = pages.next().expect("the first page is sync-daemon(1)");
        return match main.render(&mut page) {
            Ok(()) => {
                out!("{}", String::from_utf8_lossy(&page));
                ExitStatus::Ok
            }
            Err(error) => {
                eprintln!("sync-daemon man: {error}");
                ExitStatus::Failure
            }
        };
    };
    for page in pages {
        if let Err(error) = page.generate_to(dir) {
            eprintln!(
                "sync-daemon man: cannot write {} into {}: {error}",
                page.get_filename(),
                dir.display()
            );
            return ExitStatus::Failure;
        }
    }
    ExitStatus::Ok
}

/// An error on stderr, its control characters escaped (it may carry an upstream's text).
fn say(error: &dyn std::fmt::Display) {
    eprintln!("sync-daemon: {}", escape(&error.to_string()));
}

fn print_json(value: &impl serde::Serialize) -> ExitStatus {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            outln!("{text}");
            ExitStatus::Ok
        }
        Err(error) => {
            say(&error);
            ExitStatus::Failure
        }
    }
}

async fn dry_run(config: &Config, options: &OnceOptions, json: bool, verbose: bool) -> ExitStatus {
    let result = run::dry_run(config, options, |entry| {
        if json {
            let mut entry = entry;
            if !verbose {
                entry.body = None;
                entry.revkeen_id = None;
            }
            match serde_json::to_string(&entry) {
                Ok(line) => outln!("{line}"),
                Err(error) => eprintln!("sync-daemon: {error}"),
            }
            return;
        }
        let mut detail = match (&entry.reason, verbose, &entry.body) {
            (Some(reason), _, _) => reason.clone(),
            (None, true, Some(body)) => body.to_string(),
            _ => entry.fields.join(", "),
        };
        if let Some(id) = entry.revkeen_id.as_deref().filter(|_| verbose) {
            detail = format!("{detail} (RevKeen customer {id})");
        }
        outln!(
            "{:<7} {} {}: {}",
            entry.action,
            entry.source,
            escape(&entry.external_id),
            escape(&detail)
        );
    })
    .await;
    match result {
        Ok(reports) => {
            for report in reports {
                eprintln!(
                    "{}: fetched {}, would send {}, unchanged {}, rejected {} (dry run: nothing written)",
                    report.name,
                    report.poll.fetched,
                    report.poll.enqueued,
                    report.poll.unchanged,
                    report.poll.rejected
                );
            }
            ExitStatus::Ok
        }
        Err(error) => {
            say(&error);
            error.exit_status()
        }
    }
}

async fn demo(clients: usize, patients: usize) -> ExitStatus {
    let options = sync_daemon::demo::DemoOptions {
        clients,
        patients,
        ..Default::default()
    };
    match sync_daemon::demo::run(options).await {
        Ok(report) => {
            out!("{}", report.text);
            ExitStatus::Ok
        }
        Err(error) => {
            eprintln!("sync-daemon demo failed: {error:#}");
            ExitStatus::Failure
        }
    }
}

async fn sim(args: SimArgs) -> ExitStatus {
    let ports = SimPorts {
        revkeen: args.revkeen_port,
        wodify: args.wodify_port,
        practicehub: args.practicehub_port,
    };
    let sims = match SimSet::start(ports).await {
        Ok(sims) => sims,
        Err(error) => {
            eprintln!("sync-daemon sim: cannot listen on 127.0.0.1: {error}");
            return ExitStatus::Unavailable;
        }
    };
    let faults = Faults {
        error_rate: args.error_rate,
        rate_429: args.rate_429,
        latency_ms: args.latency_ms,
        drop_rate: args.drop_rate,
        envelope_rate: args.envelope_rate,
        ..Faults::default()
    };
    sims.revkeen.set_faults(faults.clone());
    sims.wodify.set_faults(faults.clone());
    sims.practicehub.set_faults(faults);
    if args.no_rate_limits {
        sims.revkeen.set_rate_limit(0, 0);
        sims.wodify.set_rate_limit(0, 0);
        sims.practicehub.set_rate_limit(0, 0);
    }
    for provider in &args.hosted_sync {
        sims.revkeen.set_hosted_sync(
            provider,
            Some(sync_daemon_sim::revkeen::HostedSync::active()),
        );
    }
    let mut switches = if args.wodify_live {
        sync_daemon_sim::wodify::WodifySwitches::live()
    } else {
        sync_daemon_sim::wodify::WodifySwitches::default()
    };
    switches.quota_spent = args.wodify_quota_spent;
    sims.wodify.set_switches(switches);
    sims.wodify.seed(args.clients, 1);
    sims.practicehub.set_live(args.practicehub_live);
    sims.practicehub
        .set_clock_offset(args.practicehub_clock_offset_secs);
    sims.practicehub.seed(args.patients, 1);
    // The banner on stderr, so that stdout is a config file: `sync-daemon sim > sim.toml`.
    eprintln!(
        "Simulators running (Ctrl-C stops them). State is inspectable under /_sim/ on each. \
         A config for them follows on stdout."
    );
    out!("{}", sims.config_toml(std::path::Path::new("./state.db")));
    let _ = tokio::signal::ctrl_c().await;
    ExitStatus::Ok
}
