//! sync-daemon keeps a merchant's RevKeen customers in step with their Wodify clients and
//! PracticeHub patients.
//!
//! Data flows one way: a source adapter fetches a page, each record is normalized into a
//! customer body, change detection drops what RevKeen already has, and the page's jobs commit
//! to the SQLite outbox together with the cursor that moves past the page. A queue worker
//! claims jobs (or batches of them), sends them to RevKeen with deterministic idempotency keys
//! and acknowledges them only on a final answer. DESIGN.md states the invariants; the store's
//! module doc says how the state file keeps them.
//!
//! Map of the crate:
//! - [`config`]: the TOML file, `SYNC_DAEMON__…` overrides, secrets, validation (exit 78).
//! - [`customer`]: the normalized customer, its canonical body and hash, field helpers.
//! - [`sources`]: the adapter trait and the shared poll loop; [`sources::wodify`],
//!   [`sources::practicehub`] (with the PHI allowlist).
//! - [`store`]: the state file: cursors, outbox, batches, synced hashes, failures, runs.
//! - [`revkeen`]: the RevKeen client, idempotency keys, answer classification.
//! - [`worker`]: claims, sends, acknowledges, retries, halts.
//! - [`limiter`]: token buckets, `Retry-After` pauses, full-jitter backoff.
//! - [`run`]: `--once` (poll everything, drain, report), `--dry-run`, exit codes.
//! - [`daemon`]: daemon mode: cron polls and their watchdog, push processing, systemd, shutdown.
//! - [`server`]: `/healthz`, `/readyz`, `/metrics` and the signed push feed.
//! - [`health`]: loop heartbeats behind `/healthz` and the systemd watchdog.
//! - [`ops`]: operator commands: `status`, `failures`, `replay`, `check-config --connect`.
//! - [`progress`]: `--once` progress bars on a terminal.
//! - [`demo`]: the whole pipeline against the bundled simulators.
//! - [`schedule`]: cron schedules as the scheduler reads them.

pub mod clock;
pub mod config;
pub mod customer;
pub mod daemon;
pub mod demo;
pub mod exit;
mod health;
mod http;
pub mod keys;
mod limiter;
pub mod ops;
pub mod progress;
mod revkeen;
pub mod run;
mod schedule;
pub mod server;
pub mod sources;
pub mod store;
mod table;
mod worker;
