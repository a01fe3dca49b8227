//! sync-daemon keeps a merchant's RevKeen customers in step with their Wodify clients and
//! PracticeHub patients.
//!
//! Data flows one way: a source adapter fetches a page, each record is normalized into a
//! customer body, change detection drops what RevKeen already has, and the page's jobs commit
//! to the SQLite outbox together with the cursor that moves past the page. A queue worker
//! claims jobs (or batches of them), sends them to RevKeen with deterministic idempotency keys
//! and acknowledges them only on a final answer. ARCHITECTURE.md (in the repository root)
//! states the invariants, the failure policy and the layering.
//!
//! Map of the crate, highest layer first (an arrow only ever points down the list;
//! `tests/layering.rs` checks it):
//! - [`demo`]: the whole pipeline against the bundled simulators (`sync-daemon-sim`).
//! - [`progress`]: `--once` progress bars on a terminal.
//! - [`ops`]: operator commands: `status`, `failures`, `replay`, `check-config --connect`.
//! - [`daemon`]: daemon mode: built (every fallible step), then run: cron polls and their
//!   watchdog, push processing, the worker, the HTTP server, systemd, shutdown.
//! - [`reload`]: `SIGHUP` re-reads the keys; so does a key file changed while its API refuses
//!   the old key.
//! - [`run`]: `--once` (poll everything, drain, report) and `--dry-run`.
//! - `hosted`: RevKeen's own hosted sync (the other writer): read at start and by
//!   `check-config --connect`, a warning when it is active.
//! - [`server`]: `/healthz`, `/readyz`, `/metrics` and the signed push feed, with the limits
//!   that bound its clients (timeouts, a connection cap, push caps, a refusal log summary).
//! - `worker`: claims units, sends them, records RevKeen's answers, retries, halts.
//!   **Where a RevKeen answer is decided**: `revkeen::classify`, then `worker::apply`.
//! - `revkeen`: the RevKeen client (single and batch upserts, answer classification).
//! - [`sources`]: the `Source` interface, the registry of kinds, the shared poll loop
//!   (`sources::poll`), the monthly request budget every request passes
//!   ([`sources::budget`]), one folder per adapter: [`sources::wodify`], [`sources::practicehub`]
//!   (with the PHI allowlist). **Where a page becomes outbox rows**: the poll loop's commit
//!   calls [`store::Store::commit_page`].
//! - [`store`]: the state file, split by what it keeps (outbox, customers, failures, history,
//!   cursors, push events, requests per source and month).
//! - [`config`]: the TOML file, `SYNC_DAEMON__…` overrides, secrets, validation (exit 78); the
//!   hook through which each adapter owns its keys.
//! - [`customer`]: the normalized customer, its canonical body and hash, field helpers.
//! - [`keys`]: idempotency keys, batch keys and bodies.
//! - `http`: shared HTTP plumbing (clients without redirects, bounded bodies, send-and-measure,
//!   probes, `Retry-After`).
//! - `limiter`: token buckets, host-wide pauses, full-jitter backoff.
//! - [`logging`]: text or flat JSON log lines, syslog priorities under journald.
//! - `health`: loop heartbeats behind `/healthz` and the systemd watchdog.
//! - [`metrics`]: every exported metric family (name, type, unit, HELP text), the Prometheus
//!   recorder, the label sets registered at zero at start, the process metrics.
//! - [`secret`]: the `Secret` type and `redact`, which scrubs every secret from upstream text.
//! - [`clock`]: the one clock, pausable in tests.
//! - `schedule`, [`table`], [`exit`]: cron parsing, text tables and terminal escaping, exit
//!   codes.

pub mod clock;
pub mod config;
pub mod customer;
pub mod daemon;
pub mod demo;
pub mod exit;
mod health;
mod hosted;
mod http;
pub mod keys;
mod limiter;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod progress;
pub mod reload;
mod revkeen;
pub mod run;
mod schedule;
pub mod secret;
pub mod server;
pub mod sources;
pub mod store;
pub mod table;
#[cfg(test)]
mod testing;
mod worker;
