//! `cargo bench --bench status`: how fast `sync-daemon status` answers on a big state file while
//! a sync is writing to it (issue 5: under 100 ms with 100k synced customers and 10k dead
//! letters).
//!
//! The state is built directly through the store (`commit_page` in big pages, then `claim` and
//! `finish` with Delivered or DeadLetter), the way a real sync leaves it. A writer thread then
//! holds the state file as a running sync does (the writer lock, so `status` says `running`)
//! and commits continuously: a page of 100 changed customers, then a claimed batch finished as
//! delivered, over and over. Meanwhile the real binary runs `status` and `status --json` 20
//! times each; the wall time of each child process (spawn included) is what an operator waits.
//! The same is measured with the writer idle for comparison, and `ops::status` in-process to
//! separate the query cost from process start-up.
//!
//! Last, the cost of the start-up integrity check (`PRAGMA quick_check`) on that file, alone and
//! as part of a writer's `Store::open`.
//!
//! `SYNC_DAEMON_BENCH=smoke` builds a tenth of the state (CI).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sync_daemon::clock::now_ms;
use sync_daemon::config::Config;
use sync_daemon::store::{
    ClaimFilter, CursorSave, DeadLetter, DeliveryCounts, Finished, PageItem, PageItemOutcome,
    PollStats, Store,
};

const BIN: &str = env!("CARGO_BIN_EXE_sync-daemon");
const RUNS: usize = 20;
const SOURCE: &str = "gym";
const REVKEEN_SOURCE: &str = "wodify";

fn main() {
    let (synced, dead) = match std::env::var("SYNC_DAEMON_BENCH").as_deref() {
        Ok("smoke") => (10_000, 1_000),
        _ => (100_000, 10_000),
    };
    let dir = tempfile::Builder::new()
        .prefix("sync-daemon-status-bench")
        .tempdir()
        .expect("temp dir");
    let state = dir.path().join("state.db");
    let config = write_config(dir.path(), &state);

    let started = Instant::now();
    let store = Store::open(&state).expect("open the state file");
    build_state(&store, synced, dead);
    let size = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(state.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "state: {synced} synced customers, {dead} dead letters, {:.1} MiB, built in {:.1} s",
        size as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    check_status(&config, synced, dead);

    println!("\n{:<44} {:>8} {:>8} {:>8}", "", "min", "median", "max");
    row("status, writer idle", &time_binary(&config, &["status"]));
    row(
        "status --json, writer idle",
        &time_binary(&config, &["status", "--json"]),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, stop, commits) = (store.clone(), stop.clone(), commits.clone());
        std::thread::spawn(move || write_continuously(&store, synced, &stop, &commits))
    };
    // Let the writer get going before measuring.
    while commits.load(Ordering::Relaxed) < 10 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = (commits.load(Ordering::Relaxed), Instant::now());
    let human = time_binary(&config, &["status"]);
    let json = time_binary(&config, &["status", "--json"]);
    let loaded = Config::load(Some(&config), &sync_daemon::sources::config_kinds())
        .expect("bench config is valid");
    let in_process: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let report = sync_daemon::ops::status(&loaded).expect("status");
            assert!(report.running, "the writer holds the state file");
            t.elapsed()
        })
        .collect();
    let during = (
        commits.load(Ordering::Relaxed) - before.0,
        before.1.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");

    row("status, while a sync writes", &human);
    row("status --json, while a sync writes", &json);
    row("ops::status in-process, while a sync writes", &in_process);
    println!(
        "\nwriter: {} transactions in {:.1} s while measuring ({:.0}/s: a page of 100 changed customers or a finished batch of 100)",
        during.0,
        during.1.as_secs_f64(),
        during.0 as f64 / during.1.as_secs_f64()
    );
    // The start-up check (issue 11): `PRAGMA quick_check` alone, and a whole writer open.
    drop(store);
    let quick_check: Vec<Duration> = (0..5)
        .map(|_| {
            let conn = rusqlite::Connection::open(&state).expect("open");
            let t = Instant::now();
            let answer: String = conn
                .query_row("PRAGMA quick_check", [], |row| row.get(0))
                .expect("quick_check");
            assert_eq!(answer, "ok");
            t.elapsed()
        })
        .collect();
    let opens: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            drop(Store::open(&state).expect("open"));
            t.elapsed()
        })
        .collect();
    row("start-up quick_check", &quick_check);
    row("Store::open (lock, checks, migrations)", &opens);
    let worst = human.iter().chain(&json).max().copied().unwrap_or_default();
    println!(
        "goal: every `status` under 100 ms while a sync writes: {} (slowest {:.1} ms)",
        if worst < Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        },
        ms(worst)
    );
}

fn write_config(dir: &Path, state: &Path) -> PathBuf {
    let path = dir.join("config.toml");
    // Nothing listens on port 9: the bench never contacts an API.
    let toml = format!(
        r#"[daemon]
state_path = "{}"

[revkeen]
base_url = "http://127.0.0.1:9"
api_key = "rk_bench_unused"

[[sources]]
name = "{SOURCE}"
kind = "wodify"
base_url = "http://127.0.0.1:9"
api_key = "wodify_bench_unused"
schedule = "0 */15 * * * *"

[[sources]]
name = "clinic"
kind = "practicehub"
base_url = "http://127.0.0.1:9/api"
api_key = "practicehub_bench_unused"
app_details = "bench=ops@example.com"
schedule = "0 */5 * * * *"
"#,
        state.display()
    );
    std::fs::write(&path, toml).expect("write config");
    path
}

fn body(i: u64, generation: u64) -> Vec<u8> {
    format!(
        r#"{{"email":"member{i}@example.com","external_updated_at":"2025-03-01T00:00:00Z","name":"Member {i} g{generation}","phone":"+13125550{:03}"}}"#,
        i % 1000
    )
    .into_bytes()
}

fn page(from: u64, to: u64, generation: u64) -> Vec<PageItem> {
    (from..to)
        .map(|i| PageItem {
            external_id: (10_000 + i).to_string(),
            outcome: PageItemOutcome::Customer {
                body: body(i, generation),
                update_only: false,
            },
        })
        .collect()
}

/// `synced + dead` customers polled, then every one answered: the first `synced` delivered,
/// the rest refused by RevKeen.
fn build_state(store: &Store, synced: u64, dead: u64) {
    let total = synced + dead;
    let poll = store.begin_poll(None, SOURCE).expect("begin poll");
    let mut stats = PollStats::default();
    let mut from = 0;
    while from < total {
        let to = (from + 5_000).min(total);
        let items = page(from, to, 0);
        let cursor = format!(r#"{{"after_id":{}}}"#, 10_000 + to - 1);
        let outcome = store
            .commit_page(
                SOURCE,
                REVKEEN_SOURCE,
                &items,
                CursorSave::Always(&cursor),
                false,
                false,
            )
            .expect("commit page");
        stats.add_page(items.len(), &outcome);
        from = to;
    }
    store
        .commit_page(
            SOURCE,
            REVKEEN_SOURCE,
            &[],
            CursorSave::Always(r#"{"after_id":0}"#),
            true,
            false,
        )
        .expect("complete the pass");
    store
        .update_poll(poll, &stats, Some("ok"), None)
        .expect("finish poll");

    let filter = ClaimFilter {
        sources: vec![SOURCE.to_string()],
        batch_size: 1_000,
        ..ClaimFilter::default()
    };
    while let Some(unit) = store.claim(&filter, now_ms()).expect("claim") {
        let mut counts = DeliveryCounts::default();
        let results: Vec<(i64, Finished)> = unit
            .jobs()
            .iter()
            .map(|job| {
                let index: u64 = job.external_id.parse::<u64>().expect("numeric id") - 10_000;
                let finished = if index < synced {
                    counts.created += 1;
                    Finished::Delivered
                } else {
                    counts.dead_lettered += 1;
                    Finished::DeadLetter(refusal())
                };
                (job.id, finished)
            })
            .collect();
        store.finish(&unit, &results, counts).expect("finish");
    }
}

fn refusal() -> DeadLetter {
    DeadLetter {
        code: "validation_error".to_string(),
        reason: "email domain is not accepted for this merchant".to_string(),
        http_status: Some(422),
        field_errors: Some(serde_json::json!({"email": "email domain is not accepted"})),
        hint: Some("correct the record at the source, then `sync-daemon replay`".to_string()),
    }
}

/// Commits pages of changed customers and finishes claimed batches until `stop`.
fn write_continuously(store: &Store, synced: u64, stop: &AtomicBool, commits: &AtomicU64) {
    let filter = ClaimFilter {
        sources: vec![SOURCE.to_string()],
        batch_size: 100,
        ..ClaimFilter::default()
    };
    let mut generation = 1;
    let mut from = 0;
    while !stop.load(Ordering::Relaxed) {
        let to = from + 100;
        let cursor = format!(r#"{{"after_id":{}}}"#, 10_000 + to - 1);
        store
            .commit_page(
                SOURCE,
                REVKEEN_SOURCE,
                &page(from, to, generation),
                CursorSave::Always(&cursor),
                false,
                false,
            )
            .expect("commit page");
        commits.fetch_add(1, Ordering::Relaxed);
        from = if to >= synced {
            generation += 1;
            0
        } else {
            to
        };
        if let Some(unit) = store.claim(&filter, now_ms()).expect("claim") {
            let results: Vec<(i64, Finished)> = unit
                .jobs()
                .iter()
                .map(|job| (job.id, Finished::Delivered))
                .collect();
            let counts = DeliveryCounts {
                updated: results.len() as u64,
                ..DeliveryCounts::default()
            };
            store.finish(&unit, &results, counts).expect("finish");
            commits.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One `status --json` run checked against what was built, so the bench measures a real answer.
fn check_status(config: &Path, synced: u64, dead: u64) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .output()
        .expect("run sync-daemon status");
    assert!(out.status.success(), "status failed: {out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["dead_letters"], dead, "{status:#}");
    assert_eq!(status["sources"][0]["delivered"]["created"], synced);
    assert_eq!(status["running"], true, "the bench holds the writer lock");
}

fn time_binary(config: &Path, args: &[&str]) -> Vec<Duration> {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let status = Command::new(BIN)
                .arg("--config")
                .arg(config)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run sync-daemon status");
            let elapsed = t.elapsed();
            assert!(status.success(), "sync-daemon {args:?} failed: {status}");
            elapsed
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(label: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let middle = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2
    } else {
        sorted[middle]
    };
    println!(
        "{label:<44} {:>6.1}ms {:>6.1}ms {:>6.1}ms",
        ms(sorted[0]),
        ms(median),
        ms(sorted[sorted.len() - 1])
    );
}
