//! Integration tests for `sync-daemon`: the real binary against the bundled simulators.
//!
//! Every test starts its own RevKeen, Wodify and PracticeHub simulators on loopback port 0 in
//! the test's runtime, writes a config into a fresh temp directory and runs the compiled
//! `sync-daemon` as a child process, as an operator would. Assertions are about what a user can
//! observe: exit codes, output, what RevKeen holds and was sent, and what the state file lists.
//! [`support`] holds the harness.

mod abuse;
mod auth;
mod batch;
mod completions;
mod config_errors;
mod crash;
mod daemon;
mod demo;
mod deploy;
mod failures;
mod faults;
mod hosted;
mod lifecycle;
mod monitoring;
mod once;
mod operate;
mod operate_cli;
mod phi;
mod practicehub;
mod practicehub_live;
mod push;
mod reload;
mod state_file;
mod support;
mod untrusted;
mod wodify_budget;
