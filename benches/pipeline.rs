//! `cargo bench --bench pipeline`: the whole pipeline against the bundled simulators on
//! loopback, measured the way a merchant would feel it.
//!
//! Rows (the performance goals in the README):
//! 1. Rate-limit bound: Wodify 50 req/s burst 20, RevKeen 600 req/min burst 20, batch 100.
//!    Elapsed vs the least time the limits allow: max((pages − burst) / source rate,
//!    (batches − burst) / RevKeen rate). Goal ratio ≥ 0.90, 429s ≤ 1 % of requests.
//! 2. Unthrottled: no limits, `--once` end to end; records/s, CPU s per 10k records, peak RSS;
//!    beside it a bare transfer loop (GET the same pages, PUT pre-built batch bodies, no store,
//!    no normalization) in this process against the same simulators. Goal daemon/bare ≥ 0.70.
//! 3. Steady state: a second `--once` over the unchanged clients: RevKeen writes must be 0.
//! 4. Memory scaling: peak RSS at the small vs the large size. Goal within 20 %, ≤ 64 MiB.
//! 5. Single vs batch upserts under row 1's limits.
//!
//! The daemon runs as a child process (the real binary, `--once`): its CPU time comes from
//! `wait4`, its peak RSS from its own `VmHWM`, sampled while it runs. `SYNC_DAEMON_BENCH=smoke`
//! runs every row at a tiny size (CI); the default is the full size. `SYNC_DAEMON_BENCH_ROWS`
//! picks rows (e.g. `1,5`); rows 2–4 share one run at the large size, so any of them runs all
//! three. The table is printed and the same figures written as JSON to `SYNC_DAEMON_BENCH_OUT`
//! (default `target/pipeline-bench.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sync_daemon_sim::{REVKEEN_KEY, SimPorts, SimSet, WODIFY_KEY};

struct Scale {
    name: &'static str,
    rate_clients: usize,
    large: usize,
    small: usize,
    single_vs_batch: usize,
}

const FULL: Scale = Scale {
    name: "full",
    rate_clients: 20_000,
    large: 100_000,
    small: 10_000,
    single_vs_batch: 5_000,
};

const SMOKE: Scale = Scale {
    name: "smoke",
    rate_clients: 800,
    large: 3_000,
    small: 1_000,
    single_vs_batch: 150,
};

/// Row 1's scaled limits.
const WODIFY_RPS: u32 = 50;
const WODIFY_BURST: u32 = 20;
const REVKEEN_RPM: u32 = 600;
const REVKEEN_BURST: u32 = 20;

/// What one `--once` child cost.
struct ChildRun {
    elapsed: Duration,
    cpu: Duration,
    max_rss_kib: u64,
    exit: i32,
}

fn main() {
    let scale = match std::env::var("SYNC_DAEMON_BENCH").as_deref() {
        Ok("smoke") => &SMOKE,
        _ => &FULL,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = runtime.block_on(bench(scale));
    let out = std::env::var("SYNC_DAEMON_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pipeline-bench.json")
        });
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"))
        .expect("write results");
    println!("\nFigures written to {}", out.display());
    let failed = results["goals_failed"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    if failed > 0 && scale.name == "full" {
        println!("{failed} goal(s) not met: see the table above.");
    }
}

/// Whether a row runs: all by default, else those listed in `SYNC_DAEMON_BENCH_ROWS` ("1,2").
fn wanted(row: u8) -> bool {
    match std::env::var("SYNC_DAEMON_BENCH_ROWS") {
        Ok(rows) => rows.split(',').any(|r| r.trim() == row.to_string()),
        Err(_) => true,
    }
}

async fn bench(scale: &Scale) -> Value {
    let machine = machine();
    println!(
        "sync-daemon pipeline benchmark ({} size) on {}",
        scale.name, machine
    );
    let mut rows = BTreeMap::new();
    let mut goals_failed: Vec<String> = Vec::new();

    // Row 1.
    if wanted(1) {
        let rate = rate_limited(scale.rate_clients, 100).await;
        println!(
            "\n1. Rate-limit bound: {} clients, Wodify {WODIFY_RPS}/s burst {WODIFY_BURST}, RevKeen {REVKEEN_RPM}/min burst {REVKEEN_BURST}, batch 100",
            scale.rate_clients
        );
        print_rate(&rate);
        if rate["bound_ratio"].as_f64().unwrap_or(0.0) < 0.90 {
            goals_failed.push("row 1: bound ratio < 0.90".into());
        }
        if rate["rate_limited_share"].as_f64().unwrap_or(1.0) > 0.01 {
            goals_failed.push("row 1: 429s > 1% of requests".into());
        }
        rows.insert("1_rate_limit_bound", rate);
    }

    // Rows 2–4.
    if wanted(2) || wanted(3) || wanted(4) {
        let (unthrottled, steady, rss_large) = unthrottled(scale.large).await;
        println!(
            "\n2. Unthrottled: {} clients, no limits, batch 100",
            scale.large
        );
        for (k, v) in unthrottled.as_object().expect("object") {
            println!("   {k:<34} {v}");
        }
        if unthrottled["daemon_vs_bare"].as_f64().unwrap_or(0.0) < 0.70 {
            goals_failed.push("row 2: daemon/bare < 0.70".into());
        }
        println!(
            "\n3. Steady state: second --once over {} unchanged clients",
            scale.large
        );
        for (k, v) in steady.as_object().expect("object") {
            println!("   {k:<34} {v}");
        }
        if steady["revkeen_writes"].as_u64() != Some(0) {
            goals_failed.push("row 3: RevKeen writes on an unchanged source".into());
        }
        let (small_run, _, rss_small) = unthrottled_daemon_only(scale.small).await;
        let growth = rss_large as f64 / rss_small.max(1) as f64 - 1.0;
        let memory = json!({
            "clients_small": scale.small,
            "clients_large": scale.large,
            "peak_rss_small_mib": mib(rss_small),
            "peak_rss_large_mib": mib(rss_large),
            "growth": round(growth, 3),
            "small_records_per_sec": small_run["records_per_sec"],
        });
        println!(
            "\n4. Memory scaling: {} vs {} clients",
            scale.small, scale.large
        );
        for (k, v) in memory.as_object().expect("object") {
            println!("   {k:<34} {v}");
        }
        if growth > 0.20 {
            goals_failed.push("row 4: RSS grows more than 20%".into());
        }
        if mib(rss_large) > 64.0 {
            goals_failed.push("row 4: peak RSS above 64 MiB".into());
        }
        rows.insert("2_unthrottled", unthrottled);
        rows.insert("3_steady_state", steady);
        rows.insert("4_memory_scaling", memory);
    }

    // Row 5.
    if wanted(5) {
        let single = rate_limited(scale.single_vs_batch, 1).await;
        let batch = rate_limited(scale.single_vs_batch, 100).await;
        let speedup = single["elapsed_secs"].as_f64().unwrap_or(0.0)
            / batch["elapsed_secs"].as_f64().unwrap_or(1.0).max(0.001);
        let versus = json!({
            "clients": scale.single_vs_batch,
            "single_elapsed_secs": single["elapsed_secs"],
            "single_requests": single["revkeen_requests"],
            "batch_elapsed_secs": batch["elapsed_secs"],
            "batch_requests": batch["revkeen_requests"],
            "speedup": round(speedup, 1),
        });
        println!(
            "\n5. Single vs batch: {} clients under row 1's limits",
            scale.single_vs_batch
        );
        for (k, v) in versus.as_object().expect("object") {
            println!("   {k:<34} {v}");
        }
        rows.insert("5_single_vs_batch", versus);
    }

    json!({
        "scale": scale.name,
        "machine": machine,
        "date": chrono::Utc::now().to_rfc3339(),
        "rows": rows,
        "goals_failed": goals_failed,
    })
}

fn print_rate(row: &Value) {
    for (k, v) in row.as_object().expect("object") {
        println!("   {k:<34} {v}");
    }
}

/// Row 1 (and row 5): the daemon under the scaled documented limits.
async fn rate_limited(clients: usize, batch_size: usize) -> Value {
    let sims = SimSet::start(SimPorts::default())
        .await
        .expect("simulators");
    sims.wodify.seed(clients, 42);
    sims.wodify.set_rate_limit(WODIFY_RPS, WODIFY_BURST);
    sims.revkeen.set_rate_limit(REVKEEN_RPM, REVKEEN_BURST);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        &sims,
        dir.path(),
        batch_size,
        Some((WODIFY_RPS, WODIFY_BURST, REVKEEN_RPM, REVKEEN_BURST)),
    );
    let run = run_once(&config).await;
    let wodify = sims.wodify.stats();
    let revkeen = sims.revkeen.stats();
    let pages = wodify.requests - wodify.rate_limited;
    let batches = revkeen.requests - revkeen.rate_limited;
    let bound = f64::max(
        (pages as f64 - f64::from(WODIFY_BURST)).max(0.0) / f64::from(WODIFY_RPS),
        (batches as f64 - f64::from(REVKEEN_BURST)).max(0.0) / (f64::from(REVKEEN_RPM) / 60.0),
    );
    let elapsed = run.elapsed.as_secs_f64();
    let requests = wodify.requests + revkeen.requests;
    let limited = wodify.rate_limited + revkeen.rate_limited;
    json!({
        "exit_code": run.exit,
        "clients": clients,
        "batch_size": batch_size,
        "wodify_pages": pages,
        "revkeen_requests": batches,
        "elapsed_secs": round(elapsed, 2),
        "bound_secs": round(bound, 2),
        "bound_ratio": round(bound / elapsed.max(0.001), 3),
        "rate_limited_429s": limited,
        "rate_limited_share": round(limited as f64 / requests.max(1) as f64, 4),
        "customers_at_revkeen": sims.revkeen.customers("wodify").len(),
    })
}

/// Rows 2 and 3 at the large size: returns (row 2, row 3, peak RSS KiB).
async fn unthrottled(clients: usize) -> (Value, Value, u64) {
    let (mut row, sims, rss) = unthrottled_daemon_only(clients).await;
    let (row, steady) = {
        let sims = sims.expect("large run keeps its simulators");
        let bare = bare_loop(&sims.0, clients).await;
        let daemon_rate = row["records_per_sec"].as_f64().unwrap_or(0.0);
        let object = row.as_object_mut().expect("object");
        object.insert("bare_loop_records_per_sec".into(), json!(round(bare, 0)));
        object.insert(
            "daemon_vs_bare".into(),
            json!(round(daemon_rate / bare.max(0.001), 3)),
        );
        // Row 3: again over the same, unchanged clients.
        let (sim_set, dir, config) = sims;
        let before_w = sim_set.wodify.stats();
        let before_r = sim_set.revkeen.stats();
        let run = run_once(&config).await;
        let after_w = sim_set.wodify.stats();
        let after_r = sim_set.revkeen.stats();
        drop(dir);
        (
            row,
            json!({
                "exit_code": run.exit,
                "clients": clients,
                "revkeen_writes": after_r.writes() - before_r.writes(),
                "revkeen_requests": after_r.requests - before_r.requests,
                "source_requests": after_w.requests - before_w.requests,
                // What the listing needs at 100 a page, to compare source_requests with.
                "pages_in_listing": clients.div_ceil(100),
                "elapsed_secs": round(run.elapsed.as_secs_f64(), 2),
                "records_per_sec": round(clients as f64 / run.elapsed.as_secs_f64().max(0.001), 0),
                "cpu_secs": round(run.cpu.as_secs_f64(), 2),
            }),
        )
    };
    (row, steady, rss)
}

type Kept = (SimSet, tempfile::TempDir, PathBuf);

/// One unthrottled `--once`; returns its row, the simulators and state (for reuse), and peak
/// RSS in KiB.
async fn unthrottled_daemon_only(clients: usize) -> (Value, Option<Kept>, u64) {
    let sims = SimSet::start(SimPorts::default())
        .await
        .expect("simulators");
    sims.wodify.seed(clients, 42);
    sims.wodify.set_rate_limit(0, 0);
    sims.revkeen.set_rate_limit(0, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&sims, dir.path(), 100, None);
    let run = run_once(&config).await;
    let elapsed = run.elapsed.as_secs_f64();
    let row = json!({
        "exit_code": run.exit,
        "clients": clients,
        "elapsed_secs": round(elapsed, 2),
        "records_per_sec": round(clients as f64 / elapsed.max(0.001), 0),
        "cpu_secs_per_10k_records": round(run.cpu.as_secs_f64() * 10_000.0 / clients as f64, 3),
        "peak_rss_mib": mib(run.max_rss_kib),
        "customers_at_revkeen": sims.revkeen.customers("wodify").len(),
    });
    (row, Some((sims, dir, config)), run.max_rss_kib)
}

/// The same transfer with nothing but HTTP: GET every page, PUT pre-built batch bodies with
/// four in flight. Returns records/s.
async fn bare_loop(sims: &SimSet, clients: usize) -> f64 {
    let http = reqwest::Client::new();
    let wodify = sims.wodify_server.url();
    let revkeen = sims.revkeen_server.url();
    // Pre-built bodies holding the very customers the daemon wrote, under another source so
    // they are new to RevKeen: the work the daemon does per record (normalize, hash, store) is
    // exactly what the bare loop leaves out.
    let mut written = sims.revkeen.customers("wodify");
    written.sort_by(|a, b| a.external_id.cmp(&b.external_id));
    let bodies: Vec<Vec<u8>> = written
        .chunks(100)
        .map(|chunk| {
            let customers: Vec<Value> = chunk
                .iter()
                .map(|c| {
                    let mut item = c.fields.clone();
                    item.insert("external_id".into(), json!(c.external_id));
                    Value::Object(item)
                })
                .collect();
            serde_json::to_vec(&json!({"source": "bare", "customers": customers})).expect("json")
        })
        .collect();
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let sender = {
        let http = http.clone();
        tokio::spawn(async move {
            let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(body) = rx.recv().await {
                let permit = permits.clone().acquire_owned().await.expect("semaphore");
                let (http, url) = (http.clone(), format!("{revkeen}/customers/external/batch"));
                tasks.spawn(async move {
                    let response = http
                        .put(url)
                        .header("x-api-key", REVKEEN_KEY)
                        .header("content-type", "application/json")
                        .header("idempotency-key", uuid_like())
                        .body(body)
                        .send()
                        .await
                        .and_then(reqwest::Response::error_for_status)
                        .expect("bare PUT");
                    let _ = response.bytes().await;
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let mut after = 0i64;
    let mut page = 0usize;
    loop {
        let response: Value = http
            .get(format!(
                "{wodify}/clients/search?q=id%7Cgt%7C{after}&sort=id&page=1&page_size=100"
            ))
            .header("x-api-key", WODIFY_KEY)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("bare GET")
            .json()
            .await
            .expect("page json");
        let items = response["clients"].as_array().cloned().unwrap_or_default();
        after = items
            .iter()
            .filter_map(|c| c["id"].as_i64())
            .max()
            .unwrap_or(after);
        if let Some(body) = bodies.get(page) {
            tx.send(body.clone()).await.expect("sender alive");
        }
        page += 1;
        if !response["pagination"]["has_more"]
            .as_bool()
            .unwrap_or(false)
        {
            break;
        }
    }
    drop(tx);
    sender.await.expect("sender");
    clients as f64 / started.elapsed().as_secs_f64().max(0.001)
}

fn uuid_like() -> String {
    format!("{:032x}", fastrand::u128(..))
}

fn config(
    sims: &SimSet,
    dir: &Path,
    batch_size: usize,
    limits: Option<(u32, u32, u32, u32)>,
) -> PathBuf {
    // Unthrottled: limits far above anything the loopback can do.
    let (rps, burst, rpm, rburst) = limits.unwrap_or((1_000_000, 1_000_000, 60_000_000, 1_000_000));
    let text = format!(
        r#"[daemon]
state_path = "{state}"
log_level = "warn"

[revkeen]
base_url = "{revkeen}"
api_key = "{REVKEEN_KEY}"
requests_per_minute = {rpm}
burst = {rburst}
batch_size = {batch_size}
concurrency = 4

[[sources]]
name = "gym"
kind = "wodify"
base_url = "{wodify}"
api_key = "{WODIFY_KEY}"
requests_per_second = {rps}
burst = {burst}
"#,
        state = dir.join("state.db").display(),
        revkeen = sims.revkeen_server.url(),
        wodify = sims.wodify_server.url(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `sync-daemon --once` as a child and measures it with `wait4`.
async fn run_once(config: &Path) -> ChildRun {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        // Reaped by wait4 below, which also returns the child's own CPU time (its peak RSS comes
        // from VmHWM: see below).
        #[allow(clippy::zombie_processes)]
        let child = Command::new(env!("CARGO_BIN_EXE_sync-daemon"))
            .arg("--config")
            .arg(&config)
            .arg("--once")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn sync-daemon");
        let pid = child.id() as libc::pid_t;
        // wait4's ru_maxrss counts the pages a forked child shares with this (large) process
        // before exec, so the peak is read from the child's own VmHWM while it runs.
        let sampler = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            let mut peak = 0u64;
            while let Ok(status) = std::fs::read_to_string(&path) {
                let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                else {
                    break;
                };
                peak = peak.max(kib);
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let mut status = 0;
        // SAFETY: rusage is plain old data; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(reaped, pid, "wait4 failed");
        let elapsed = started.elapsed();
        let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
        ChildRun {
            elapsed,
            cpu,
            max_rss_kib: sampler.join().unwrap_or(0),
            exit: if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            },
        }
    })
    .await
    .expect("child run")
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

fn mib(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

fn round(x: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (x * factor).round() / factor
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}
