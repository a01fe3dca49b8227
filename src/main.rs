//! The `sync-daemon` command: CLI parsing, telemetry and exit codes. The work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sync_daemon::config::{Config, LogFormat};
use sync_daemon::run::{self, ExitStatus, OnceOptions};
use sync_daemon::sim::{Faults, SimPorts, SimSet};

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
  sync-daemon --once                     backfill: poll every source to the end, send, exit
  sync-daemon --once --source main-gym   the same for one source
  sync-daemon --dry-run                  show what a run would send, write nothing
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
    /// Fetch and diff; print what would be sent; write nothing anywhere.
    #[arg(long, conflicts_with = "once")]
    dry_run: bool,
    /// Ignore what was synced before and send every record again (a full backfill).
    #[arg(long)]
    resync: bool,
    /// Limit the run to this source (repeatable).
    #[arg(long = "source", value_name = "NAME")]
    sources: Vec<String>,
    /// With --dry-run: one JSON object per line.
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// With --dry-run: show the values that would be sent, not just the field names.
    #[arg(long, short, requires = "dry_run")]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config and print it with secrets redacted.
    ///
    /// Example: sync-daemon check-config --config /etc/sync-daemon/config.toml
    CheckConfig,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
    ExitCode::from(status.code())
}

async fn dispatch(cli: Cli) -> ExitStatus {
    match cli.command {
        Some(Command::Demo { clients, patients }) => {
            init_logging(LogFormat::Text, "warn");
            demo(clients, patients).await
        }
        Some(Command::Sim(args)) => {
            init_logging(LogFormat::Text, "info");
            sim(args).await
        }
        Some(Command::CheckConfig) => match load_config(&cli.config) {
            Ok(config) => {
                println!("{}", config.to_redacted_toml());
                eprintln!(
                    "sync-daemon: configuration is valid ({} sources).",
                    config.sources.len()
                );
                ExitStatus::Ok
            }
            Err(status) => status,
        },
        None => {
            let config = match load_config(&cli.config) {
                Ok(config) => config,
                Err(status) => return status,
            };
            init_logging(config.daemon.log_format, &config.daemon.log_level);
            let options = OnceOptions {
                sources: cli.sources.clone(),
                resync: cli.resync,
            };
            if cli.dry_run {
                dry_run(&config, &options, cli.json, cli.verbose).await
            } else if cli.once {
                once(&config, &options).await
            } else {
                eprintln!(
                    "sync-daemon: daemon mode is not available in this build; run with --once (a backfill) from a timer instead"
                );
                ExitStatus::Usage
            }
        }
    }
}

fn load_config(path: &Option<PathBuf>) -> Result<Config, ExitStatus> {
    Config::load(path.as_deref()).map_err(|error| {
        eprintln!("sync-daemon: {error}");
        ExitStatus::Config
    })
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        // journald adds its own timestamps.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.with_ansi(false).without_time().try_init()
        }
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Only fails if a subscriber is already set, which is harmless.
    let _ = result;
}

async fn once(config: &Config, options: &OnceOptions) -> ExitStatus {
    match run::once(config, options).await {
        Ok(report) => {
            for source in &report.sources {
                println!("{}", source.summary_line());
            }
            if let Some(reason) = &report.stopped {
                eprintln!("sync-daemon: run stopped early: {reason}");
            }
            report.exit
        }
        Err(error) => {
            eprintln!("sync-daemon: {error}");
            error.exit_status()
        }
    }
}

async fn dry_run(config: &Config, options: &OnceOptions, json: bool, verbose: bool) -> ExitStatus {
    let result = run::dry_run(config, options, |entry| {
        if json {
            let mut entry = entry;
            if !verbose {
                entry.body = None;
            }
            match serde_json::to_string(&entry) {
                Ok(line) => println!("{line}"),
                Err(error) => eprintln!("sync-daemon: {error}"),
            }
            return;
        }
        let detail = match (&entry.reason, verbose, &entry.body) {
            (Some(reason), _, _) => reason.clone(),
            (None, true, Some(body)) => body.to_string(),
            _ => entry.fields.join(", "),
        };
        println!(
            "{:<7} {} {}: {}",
            entry.action, entry.source, entry.external_id, detail
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
            eprintln!("sync-daemon: {error}");
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
            print!("{}", report.text);
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
    };
    sims.revkeen.set_faults(faults.clone());
    sims.wodify.set_faults(faults.clone());
    sims.practicehub.set_faults(faults);
    sims.wodify.seed(args.clients, 1);
    sims.practicehub.seed(args.patients, 1);
    println!(
        "Simulators running (Ctrl-C stops them). State is inspectable under /_sim/ on each.\n\
         \n# A config for them:\n{}",
        sims.config_toml(std::path::Path::new("./state.db"))
    );
    let _ = tokio::signal::ctrl_c().await;
    ExitStatus::Ok
}
