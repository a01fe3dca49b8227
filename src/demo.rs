//! `sync-daemon demo`: the real pipeline against the bundled simulators, on a fresh machine.
//!
//! Starts the three simulators on loopback ports with their documented rate limits, seeds a gym
//! and a clinic (some records without a valid email, some with phones that do not parse),
//! runs `--once` into a temporary state file, then runs it again to show that an unchanged
//! source costs RevKeen zero writes. Nothing here is a shortcut: the same code as a merchant's
//! `--once` does the work, over HTTP.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::{Config, Environment};
use crate::run::{self, OnceOptions, RunReport};
use crate::store::FailureKind;
use sync_daemon_sim::{SimPorts, SimSet};

/// What to seed.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    pub clients: usize,
    pub patients: usize,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            clients: 3000,
            patients: 1000,
            seed: 7,
        }
    }
}

/// The demo's measured figures.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub first: RunReport,
    pub second: RunReport,
    /// RevKeen writes (created + updated) in each pass, as the simulator counted them.
    pub writes: (u64, u64),
    pub customers_at_revkeen: usize,
    pub text: String,
}

/// Runs the demo and returns its report (the text is what the command prints).
pub async fn run(options: DemoOptions) -> anyhow::Result<DemoReport> {
    let sims = SimSet::start(SimPorts::default())
        .await
        .context("starting the simulators on 127.0.0.1")?;
    sims.wodify.seed(options.clients, options.seed);
    sims.practicehub.seed(options.patients, options.seed);
    let dir = tempfile::Builder::new()
        .prefix("sync-daemon-demo")
        .tempdir()
        .context("creating a temporary directory for the state file")?;
    let state = dir.path().join("state.db");
    let config = Config::from_toml(
        &sims.config_toml(&state),
        &Environment::default(),
        &crate::sources::config_kinds(),
    )
    .context("the demo's own config is invalid (a bug)")?;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "sync-daemon demo: the real pipeline against the bundled simulators\n\
         \n  Wodify simulator       {}  {} clients, limit 5 req/s (burst 20)\
         \n  PracticeHub simulator  {}/api  {} patients, limit 3 req/s\
         \n  RevKeen simulator      {}  limit 1000 req/min (burst 2000), batches of 100\
         \n  state file             {}\n",
        sims.wodify_server.url(),
        options.clients,
        sims.practicehub_server.url(),
        options.patients,
        sims.revkeen_server.url(),
        state.display()
    );

    let before = sims.revkeen.stats();
    let first = run::once(&config, &OnceOptions::default()).await?;
    let after_first = sims.revkeen.stats();
    let first_writes = after_first.writes() - before.writes();
    describe_pass(
        &mut text,
        "First pass (backfill)",
        &first,
        first_writes,
        after_first.requests - before.requests,
    );

    // A scheduled poll comes minutes later; give Wodify's bucket (burst 20 at 5/s) the
    // seconds it needs to refill, or the second pass only shows 429 handling.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = run::once(&config, &OnceOptions::default()).await?;
    let after_second = sims.revkeen.stats();
    let second_writes = after_second.writes() - after_first.writes();
    describe_pass(
        &mut text,
        "Second pass (nothing changed at the sources)",
        &second,
        second_writes,
        after_second.requests - after_first.requests,
    );

    let customers_at_revkeen =
        sims.revkeen.customers("wodify").len() + sims.revkeen.customers("practicehub").len();
    let failures = crate::store::Store::open_read_only(&state)?
        .map(|store| store.failures(None))
        .transpose()?
        .unwrap_or_default();
    let rejected = failures
        .iter()
        .filter(|f| f.kind == FailureKind::Rejected)
        .count();
    let _ = writeln!(
        text,
        "RevKeen now holds {customers_at_revkeen} customers. {rejected} records could not be sent \
         (no valid email) and are kept with their reason, as `sync-daemon failures` lists them:"
    );
    for failure in failures.iter().take(3) {
        let _ = writeln!(
            text,
            "  {} {}: {} ({})",
            failure.source,
            failure.external_id,
            failure.reason,
            failure.hint.as_deref().unwrap_or("")
        );
    }

    if second_writes != 0 {
        bail!("the second pass wrote {second_writes} customers to RevKeen; it must write none");
    }
    let delivered: u64 = first.sources.iter().map(|s| s.sent.delivered()).sum();
    if delivered == 0 || first_writes != delivered {
        bail!(
            "the first pass delivered {delivered} customers but RevKeen counted {first_writes} writes"
        );
    }
    Ok(DemoReport {
        first,
        second,
        writes: (first_writes, second_writes),
        customers_at_revkeen,
        text,
    })
}

fn describe_pass(text: &mut String, title: &str, report: &RunReport, writes: u64, requests: u64) {
    let fetched: u64 = report.sources.iter().map(|s| s.poll.fetched).sum();
    let _ = writeln!(text, "{title}:");
    for source in &report.sources {
        let _ = writeln!(text, "  {}", source.summary_line());
    }
    let secs = report.elapsed.max(Duration::from_millis(1)).as_secs_f64();
    let _ = writeln!(
        text,
        "  RevKeen: {writes} writes in {requests} requests; {fetched} records in {secs:.1} s = {:.0} records/s\n",
        fetched as f64 / secs
    );
}
