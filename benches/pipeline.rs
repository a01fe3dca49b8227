//! `cargo bench --bench pipeline`: the whole pipeline against the bundled simulators on
//! loopback, measured the way a merchant would feel it.
//!
//! Rows (the performance goals in the README):
//! 1. Rate-limit bound: Wodify 50 req/s burst 20, RevKeen 600 req/min burst 20, batch 100.
//!    Elapsed vs the least time the limits allow: max((pages − burst) / source rate,
//!    (batches − burst) / RevKeen rate). Goal ratio ≥ 0.90, 429s ≤ 1 % of requests.
//! 2. Unthrottled: no limits, `--once` end to end; records/s, CPU s per 10k records, peak RSS;
//!    beside it a bare transfer loop (GET the same pages, PUT pre-built batch bodies, no store,
//!    no normalization) in this process against the same simulators. The two run interleaved,
//!    A B A B … (`SYNC_DAEMON_BENCH_PAIRS` pairs: 3 at full size, 1 at smoke), each pair on
//!    fresh simulators, and the median ratio is the figure, since on a shared machine
//!    one-after-the-other runs drift. Goal daemon/bare ≥ 0.70.
//! 3. Steady state: a second `--once` over the unchanged clients: RevKeen writes must be 0.
//! 4. Memory scaling: peak RSS at the small vs the large size. Goal within 20 %, ≤ 64 MiB.
//! 5. Single vs batch upserts under row 1's limits.
//! 6. Scale: first sync and unchanged rescan at each size of `SYNC_DAEMON_BENCH_SCALE`
//!    (full: 10k, 100k, 1M; smoke: 2k, 5k): CPU s per 10k records, disk bytes written (the
//!    daemon's own `write_bytes` from `/proc/PID/io`, read after it exits and before it is
//!    reaped; where io accounting is missing, the growth of the state file plus its WAL, and
//!    the row says which), peak RSS, the final state-file size; for the rescan also RevKeen
//!    writes and bytes written per record; the first sync's system time (`sys_cpu_secs`)
//!    apart, since the kernel's share is where a larger file shows first. Every size runs
//!    `SYNC_DAEMON_BENCH_SCALE_ROUNDS` times (full 3, smoke 1), round by round (10k 100k 1M
//!    10k 100k 1M …), and the growth figure is the median over rounds. Goals: first-sync CPU
//!    per 10k at the largest size within 10 % of the next size down; rescan ≤ 64 bytes
//!    written per record, 0 RevKeen writes.
//! 7. Peer: `benches/peer/peer.py` (Python 3 + `requests`: page Wodify, PUT batches of 100, no
//!    durability), the script an integrator would write instead, on the large dataset, and the
//!    daemon's first sync on the same dataset (fresh simulators each), in
//!    `SYNC_DAEMON_BENCH_PAIRS` pairs (as row 2) whose order alternates; the figures are the
//!    medians of the pairs' ratios. Goal: daemon ≥ 1.5× the peer's records/s at ≤ 0.8× its CPU. Skipped with a message when no Python with
//!    `requests` is found (a venv under `target/peer-venv` is tried with pip first).
//!
//! The daemon runs as a child process (the real binary, `--once`): its CPU time comes from
//! `wait4`, its peak RSS from its own `VmHWM`, sampled while it runs. `SYNC_DAEMON_BENCH=smoke`
//! runs every row at a tiny size (CI); the default is the full size. `SYNC_DAEMON_BENCH_ROWS`
//! picks rows (e.g. `1,5`); rows 2–4 share one run at the large size, so any of them runs all
//! three. The table is printed and the same figures written as JSON to `SYNC_DAEMON_BENCH_OUT`
//! (default `target/pipeline-bench.json`); a full-size run of every row at the default sizes
//! also writes them to `benches/results/pipeline.json`, the run the README quotes.

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
    /// Row 2's daemon/bare pairs.
    pairs: usize,
    /// Row 6's sizes.
    sizes: &'static [usize],
    /// Row 6's rounds over the sizes.
    rounds: usize,
}

const FULL: Scale = Scale {
    name: "full",
    rate_clients: 20_000,
    large: 100_000,
    small: 10_000,
    single_vs_batch: 5_000,
    pairs: 3,
    sizes: &[10_000, 100_000, 1_000_000],
    rounds: 3,
};

const SMOKE: Scale = Scale {
    name: "smoke",
    rate_clients: 800,
    large: 3_000,
    small: 1_000,
    single_vs_batch: 150,
    pairs: 1,
    sizes: &[2_000, 5_000],
    rounds: 1,
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
    /// The kernel's share of `cpu` (system time: writes, fsyncs, sockets).
    sys: Duration,
    max_rss_kib: u64,
    /// `write_bytes` from `/proc/PID/io` (bytes the process caused to be sent to storage), when
    /// the kernel accounts it.
    write_bytes: Option<u64>,
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
    let text = serde_json::to_string_pretty(&results).expect("json") + "\n";
    std::fs::write(&out, &text).expect("write results");
    println!("\nFigures written to {}", out.display());
    // The run the README quotes: full size, every row, the default sizes.
    let complete = std::env::var_os("SYNC_DAEMON_BENCH_ROWS").is_none()
        && std::env::var_os("SYNC_DAEMON_BENCH_SCALE").is_none()
        && std::env::var_os("SYNC_DAEMON_BENCH_PAIRS").is_none()
        && std::env::var_os("SYNC_DAEMON_BENCH_SCALE_ROUNDS").is_none();
    if scale.name == "full" && complete {
        let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/pipeline.json");
        std::fs::write(&kept, &text).expect("write benches/results");
        println!("and to {}", kept.display());
    }
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
    let load_start = load_average();
    println!(
        "sync-daemon pipeline benchmark ({} size) on {}, load average {}",
        scale.name, machine, load_start
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
        let pairs = env_count("SYNC_DAEMON_BENCH_PAIRS").unwrap_or(scale.pairs);
        println!(
            "\n2. Unthrottled: {} clients, no limits, batch 100; {pairs} daemon/bare pair(s), interleaved",
            scale.large
        );
        let (unthrottled, steady, rss_large) = unthrottled(scale.large, pairs).await;
        for (k, v) in unthrottled.as_object().expect("object") {
            println!("   {k:<34} {v}");
        }
        if unthrottled["daemon_vs_bare"].as_f64().unwrap_or(0.0) < 0.70 {
            goals_failed.push("row 2: daemon/bare < 0.70 (median)".into());
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

    // Row 6.
    if wanted(6) {
        let sizes = scale_sizes(scale);
        println!(
            "\n6. Scale: first sync and unchanged rescan, no limits, batch 100, at {sizes:?} clients"
        );
        // Rounds interleave the sizes (10k 100k 1M 10k 100k 1M …), so drift on a shared machine
        // lands on both sides of the growth figure instead of on one.
        let rounds = env_count("SYNC_DAEMON_BENCH_SCALE_ROUNDS").unwrap_or(scale.rounds);
        let scale_row = scale_row(&sizes, rounds).await;
        goals_failed.extend(scale_goals(&scale_row));
        rows.insert("6_scale", scale_row);
    }

    // Row 7.
    if wanted(7) {
        let pairs = env_count("SYNC_DAEMON_BENCH_PAIRS").unwrap_or(scale.pairs);
        println!(
            "\n7. Peer: benches/peer/peer.py vs the daemon's first sync, {} clients, no limits; {pairs} pair(s), order alternating",
            scale.large
        );
        match peer(scale.large, pairs).await {
            Ok(row) => {
                for (k, v) in row.as_object().expect("object") {
                    // Each pair's figures are in the JSON, not the table.
                    if k != "runs" {
                        println!("   {k:<34} {v}");
                    }
                }
                if row["daemon_vs_peer_records_per_sec"]
                    .as_f64()
                    .unwrap_or(0.0)
                    < 1.5
                {
                    goals_failed.push("row 7: daemon < 1.5x the peer's records/s".into());
                }
                if row["daemon_vs_peer_cpu"].as_f64().unwrap_or(f64::MAX) > 0.8 {
                    goals_failed.push("row 7: daemon CPU > 0.8x the peer's".into());
                }
                rows.insert("7_peer", row);
            }
            Err(why) => {
                println!("   skipped: {why}");
                rows.insert("7_peer", json!({ "skipped": why }));
            }
        }
    }

    json!({
        "scale": scale.name,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": load_average(),
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

/// Rows 2 and 3 at the large size: `pairs` daemon/bare pairs run interleaved (A B A B …), each
/// on fresh simulators; row 3 reuses the last pair's. Returns (row 2, row 3, median peak RSS KiB).
async fn unthrottled(clients: usize, pairs: usize) -> (Value, Value, u64) {
    let pairs = pairs.max(1);
    let (mut daemon, mut bare, mut ratio, mut cpu, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut exits = Vec::new();
    let mut customers = 0u64;
    let mut last: Option<Kept> = None;
    for pair in 1..=pairs {
        // The previous pair's simulators go first: their memory is not this pair's.
        drop(last.take());
        let (row, kept, peak) = unthrottled_daemon_only(clients).await;
        let kept = kept.expect("unthrottled run keeps its simulators");
        let bare_rate = bare_loop(&kept.0, clients).await;
        let daemon_rate = row["records_per_sec"].as_f64().unwrap_or(0.0);
        println!(
            "   pair {pair}: daemon {daemon_rate:.0} records/s, bare loop {bare_rate:.0} records/s, ratio {:.3}",
            daemon_rate / bare_rate.max(0.001)
        );
        daemon.push(daemon_rate);
        bare.push(bare_rate);
        ratio.push(daemon_rate / bare_rate.max(0.001));
        cpu.push(row["cpu_secs_per_10k_records"].as_f64().unwrap_or(0.0));
        rss.push(peak as f64);
        exits.push(row["exit_code"].clone());
        customers = row["customers_at_revkeen"].as_u64().unwrap_or(0);
        last = Some(kept);
    }
    let row = json!({
        "exit_codes": exits,
        "clients": clients,
        "pairs": pairs,
        "records_per_sec": round(median(&daemon), 0),
        "records_per_sec_min_median_max": spread(&daemon, 0),
        "cpu_secs_per_10k_records": round(median(&cpu), 3),
        "cpu_secs_per_10k_min_median_max": spread(&cpu, 3),
        "peak_rss_mib": mib(median(&rss) as u64),
        "customers_at_revkeen": customers,
        "bare_loop_records_per_sec": round(median(&bare), 0),
        "bare_loop_min_median_max": spread(&bare, 0),
        "daemon_vs_bare": round(median(&ratio), 3),
        "daemon_vs_bare_min_median_max": spread(&ratio, 3),
    });
    // Row 3: again over the same, unchanged clients.
    let (sim_set, dir, config) = last.expect("at least one pair");
    let before_w = sim_set.wodify.stats();
    let before_r = sim_set.revkeen.stats();
    let run = run_once(&config).await;
    let after_w = sim_set.wodify.stats();
    let after_r = sim_set.revkeen.stats();
    drop(dir);
    let steady = json!({
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
    });
    (row, steady, median(&rss) as u64)
}

/// Row 6's sizes: `SYNC_DAEMON_BENCH_SCALE` (comma-separated client counts) or the scale's.
fn scale_sizes(scale: &Scale) -> Vec<usize> {
    match std::env::var("SYNC_DAEMON_BENCH_SCALE") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim().replace('_', "").parse::<usize>().ok().filter(|&n| n > 0).unwrap_or_else(|| {
                    panic!("SYNC_DAEMON_BENCH_SCALE: {n:?} is not a client count; give e.g. 10000,100000,1000000")
                })
            })
            .collect(),
        Err(_) => scale.sizes.to_vec(),
    }
}

/// Sizes of the state file and its WAL, in bytes (0 when absent).
fn state_files(state: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    (size(state), size(&state.with_extension("db-wal")))
}

/// Row 6: each size on fresh simulators and a fresh state file, `rounds` times over.
async fn scale_row(sizes: &[usize], rounds: usize) -> Value {
    let mut points = Vec::new();
    let mut growths = Vec::new();
    let mut method: &'static str = "write_bytes of the daemon process (/proc/PID/io)";
    println!(
        "   {:>9} | {:>9} {:>8} {:>11} {:>8} {:>9} | {:>8} {:>11} {:>9} {:>7} {:>8}",
        "clients",
        "1st rec/s",
        "CPU/10k",
        "written",
        "RSS MiB",
        "state",
        "rescan",
        "written",
        "B/record",
        "writes",
        "RSS MiB"
    );
    for pass in 1..=rounds {
        let mut round_points = Vec::new();
        for &clients in sizes {
            round_points.push(scale_point(clients, pass, &mut method).await);
        }
        let cpu = |p: &Value| {
            p["first_sync"]["cpu_secs_per_10k_records"]
                .as_f64()
                .unwrap_or(0.0)
        };
        if let [.., below, largest] = round_points.as_slice() {
            growths.push(round(cpu(largest) / cpu(below).max(0.001) - 1.0, 3));
        }
        points.extend(round_points);
    }
    println!("   (CPU/10k in CPU-seconds; written = {method})");
    // The median over rounds: one round's figure is at the mercy of what else the machine ran.
    let growth = (!growths.is_empty()).then(|| round(median(&growths), 3));
    if rounds > 1 {
        println!(
            "   first-sync CPU/10k growth at the largest size, per round: {growths:?}; median {growth:?}"
        );
    }
    json!({
        "disk_bytes_method": method,
        "first_sync_cpu_growth_at_largest": growth,
        "first_sync_cpu_growth_per_round": growths,
        "rounds": rounds,
        "points": points,
    })
}

/// One size of row 6, round `pass`: a first sync and an unchanged rescan on fresh simulators
/// and a fresh state file, printed as a table line. `method` says how disk bytes were counted.
async fn scale_point(clients: usize, pass: usize, method: &mut &'static str) -> Value {
    let sims = unthrottled_sims(clients).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&sims, dir.path(), 100, None);
    let state = dir.path().join("state.db");

    let first = run_once(&config).await;
    let (db1, wal1) = state_files(&state);
    let first_written = first.write_bytes.unwrap_or_else(|| {
        *method = "growth of the state file + WAL (io accounting unavailable)";
        db1 + wal1
    });
    let customers = sims.revkeen.customers("wodify").len();
    let before_r = sims.revkeen.stats();
    let before_w = sims.wodify.stats();
    let rescan = run_once(&config).await;
    let after_r = sims.revkeen.stats();
    let after_w = sims.wodify.stats();
    let (db2, wal2) = state_files(&state);
    let rescan_written = rescan.write_bytes.unwrap_or_else(|| {
        *method = "growth of the state file + WAL (io accounting unavailable)";
        (db2 + wal2).saturating_sub(db1 + wal1)
    });
    let n = clients as f64;
    let point = json!({
        "clients": clients,
        "round": pass,
        "first_sync": {
            "exit_code": first.exit,
            "elapsed_secs": round(first.elapsed.as_secs_f64(), 2),
            "records_per_sec": round(n / first.elapsed.as_secs_f64().max(0.001), 0),
            "cpu_secs": round(first.cpu.as_secs_f64(), 2),
            "cpu_secs_per_10k_records": round(first.cpu.as_secs_f64() * 10_000.0 / n, 3),
            "sys_cpu_secs": round(first.sys.as_secs_f64(), 2),
            "disk_bytes_written": first_written,
            "disk_bytes_per_record": round(first_written as f64 / n, 0),
            "written_vs_state_file": round(first_written as f64 / db1.max(1) as f64, 2),
            "peak_rss_mib": mib(first.max_rss_kib),
            "state_file_bytes": db1,
            "wal_bytes": wal1,
            "customers_at_revkeen": customers,
        },
        "rescan": {
            "exit_code": rescan.exit,
            "elapsed_secs": round(rescan.elapsed.as_secs_f64(), 2),
            "cpu_secs_per_10k_records": round(rescan.cpu.as_secs_f64() * 10_000.0 / n, 3),
            "disk_bytes_written": rescan_written,
            "disk_bytes_per_record": round(rescan_written as f64 / n, 1),
            "revkeen_writes": after_r.writes() - before_r.writes(),
            "source_requests": after_w.requests - before_w.requests,
            "peak_rss_mib": mib(rescan.max_rss_kib),
            "state_file_bytes": db2,
            "wal_bytes": wal2,
        },
    });
    println!(
        "   {:>9} | {:>9} {:>8} {:>11} {:>8} {:>9} | {:>8} {:>11} {:>9} {:>7} {:>8}",
        clients,
        point["first_sync"]["records_per_sec"].to_string(),
        point["first_sync"]["cpu_secs_per_10k_records"].to_string(),
        human_bytes(first_written),
        point["first_sync"]["peak_rss_mib"].to_string(),
        human_bytes(db1),
        point["rescan"]["cpu_secs_per_10k_records"].to_string(),
        human_bytes(rescan_written),
        point["rescan"]["disk_bytes_per_record"].to_string(),
        point["rescan"]["revkeen_writes"].to_string(),
        point["rescan"]["peak_rss_mib"].to_string(),
    );
    point
}

/// Row 6's goals, as failure messages.
fn scale_goals(row: &Value) -> Vec<String> {
    let mut failed = Vec::new();
    if row["first_sync_cpu_growth_at_largest"]
        .as_f64()
        .unwrap_or(0.0)
        > 0.10
    {
        failed.push("row 6: first-sync CPU per 10k at the largest size > 110% of the next".into());
    }
    for point in row["points"].as_array().into_iter().flatten() {
        let clients = &point["clients"];
        if point["rescan"]["revkeen_writes"].as_u64() != Some(0) {
            failed.push(format!(
                "row 6: RevKeen writes on the {clients}-client rescan"
            ));
        }
        if point["rescan"]["disk_bytes_per_record"]
            .as_f64()
            .unwrap_or(f64::MAX)
            > 64.0
        {
            failed.push(format!(
                "row 6: {clients}-client rescan writes > 64 bytes per record"
            ));
        }
    }
    failed
}

/// Fresh simulators with `clients` Wodify clients (seed 42) and no rate limits.
async fn unthrottled_sims(clients: usize) -> SimSet {
    let sims = SimSet::start(SimPorts::default())
        .await
        .expect("simulators");
    sims.wodify.seed(clients, 42);
    sims.wodify.set_rate_limit(0, 0);
    sims.revkeen.set_rate_limit(0, 0);
    sims
}

/// Row 7: `pairs` pairs of the peer script and the daemon, each run on fresh simulators seeded
/// alike, the order alternating (peer first in the first pair, the daemon first in the next),
/// so drift on a shared machine lands on both sides. The figures are the medians of the pairs'
/// ratios: the peer's CPU time moves with the machine as much as the daemon's (2.0–4.2 s in
/// one block of 12 runs), so one pair says little.
async fn peer(clients: usize, pairs: usize) -> Result<Value, String> {
    let python = python_with_requests()?;
    let mut runs = Vec::new();
    for pair in 0..pairs.max(1) {
        runs.push(peer_pair(clients, &python, pair % 2 == 1).await?);
    }
    let field = |key: &str| -> Vec<f64> {
        runs.iter()
            .map(|run| run[key].as_f64().unwrap_or(0.0))
            .collect()
    };
    let mut row = json!({
        "clients": clients,
        "python": python.display().to_string(),
        "pairs": runs.len(),
        "daemon_vs_peer_records_per_sec": round(median(&field("daemon_vs_peer_records_per_sec")), 2),
        "daemon_vs_peer_cpu": round(median(&field("daemon_vs_peer_cpu")), 2),
        "daemon_vs_peer_records_per_sec_min_median_max": spread(&field("daemon_vs_peer_records_per_sec"), 3),
        "daemon_vs_peer_cpu_min_median_max": spread(&field("daemon_vs_peer_cpu"), 3),
        "peer_records_per_sec": round(median(&field("peer_records_per_sec")), 0),
        "peer_cpu_secs_per_10k_records": round(median(&field("peer_cpu_secs_per_10k_records")), 3),
        "daemon_records_per_sec": round(median(&field("daemon_records_per_sec")), 0),
        "daemon_cpu_secs_per_10k_records": round(median(&field("daemon_cpu_secs_per_10k_records")), 3),
    });
    row["runs"] = Value::Array(runs);
    Ok(row)
}

/// One pair of row 7: the peer script and the daemon's first sync, in the order asked.
async fn peer_pair(clients: usize, python: &Path, daemon_first: bool) -> Result<Value, String> {
    let first = if daemon_first {
        Some(unthrottled_daemon_only(clients).await.0)
    } else {
        None
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/peer.py");
    let sims = unthrottled_sims(clients).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("peer.out");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .env("WODIFY_URL", sims.wodify_server.url())
        .env("WODIFY_API_KEY", WODIFY_KEY)
        .env("REVKEEN_URL", sims.revkeen_server.url())
        .env("REVKEEN_API_KEY", REVKEEN_KEY)
        .stdout(std::fs::File::create(&out).expect("peer output file"));
    let run = run_child(command).await;
    if run.exit != 0 {
        return Err(format!("peer.py exited {} (see its error above)", run.exit));
    }
    let report: Value = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str(text.trim()).ok())
        .unwrap_or(Value::Null);
    let peer_customers = sims.revkeen.customers("wodify").len();
    drop(sims);
    let daemon = match first {
        Some(daemon) => daemon,
        None => unthrottled_daemon_only(clients).await.0,
    };
    let n = clients as f64;
    let peer_rate = n / run.elapsed.as_secs_f64().max(0.001);
    let peer_cpu = run.cpu.as_secs_f64();
    let daemon_rate = daemon["records_per_sec"].as_f64().unwrap_or(0.0);
    let daemon_cpu = daemon["cpu_secs"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "first": if daemon_first { "daemon" } else { "peer" },
        "peer_exit_code": run.exit,
        "peer_elapsed_secs": round(run.elapsed.as_secs_f64(), 2),
        "peer_records_per_sec": round(peer_rate, 0),
        "peer_cpu_secs": round(peer_cpu, 2),
        "peer_cpu_secs_per_10k_records": round(peer_cpu * 10_000.0 / n, 3),
        "peer_peak_rss_mib": mib(run.max_rss_kib),
        "peer_report": report,
        "peer_customers_at_revkeen": peer_customers,
        "daemon_exit_code": daemon["exit_code"],
        "daemon_elapsed_secs": daemon["elapsed_secs"],
        "daemon_records_per_sec": daemon_rate,
        "daemon_cpu_secs": daemon_cpu,
        "daemon_cpu_secs_per_10k_records": daemon["cpu_secs_per_10k_records"],
        "daemon_customers_at_revkeen": daemon["customers_at_revkeen"],
        "daemon_vs_peer_records_per_sec": round(daemon_rate / peer_rate.max(0.001), 2),
        "daemon_vs_peer_cpu": round(daemon_cpu / peer_cpu.max(0.001), 2),
    }))
}

/// A Python 3 that imports `requests`: `target/peer-venv`'s, else `python3`'s, else a venv made
/// under target/ with pip. `Err` says what is missing and how to add it.
fn python_with_requests() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let venv = target.join("peer-venv");
    let venv_python = venv.join("bin/python3");
    let imports_requests = |python: &Path| {
        Command::new(python)
            .args(["-c", "import requests"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports_requests(&venv_python) {
        return Ok(venv_python);
    }
    if imports_requests(Path::new("python3")) {
        return Ok("python3".into());
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .stdout(std::process::Stdio::null())
        .status();
    match made {
        Err(error) => {
            return Err(format!(
                "no python3 ({error}): install Python 3 with `requests` to run the peer row"
            ));
        }
        Ok(status) if !status.success() => {
            return Err(
                "python3 has no `requests` and `python3 -m venv` failed (Debian: apt-get install python3-venv, or python3-requests)".into(),
            );
        }
        Ok(_) => {}
    }
    println!(
        "   installing requests into {} with pip ...",
        venv.display()
    );
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "requests",
    ]);
    let installed = run_with_deadline(pip, Duration::from_secs(240));
    if installed && imports_requests(&venv_python) {
        Ok(venv_python)
    } else {
        Err(format!(
            "python3 has no `requests` and pip could not install it into {} (`pip install requests` to run the peer row)",
            venv.display()
        ))
    }
}

/// Runs `command`, killing it past `limit`; whether it exited 0 in time.
fn run_with_deadline(mut command: Command, limit: Duration) -> bool {
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `[min, median, max]`, rounded.
fn spread(values: &[f64], digits: i32) -> Value {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!([
        round(min, digits),
        round(median(values), digits),
        round(max, digits)
    ])
}

fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// A positive count from the environment.
fn env_count(name: &str) -> Option<usize> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("{name}: {value:?} is not a positive count")),
    )
}

/// `/proc/loadavg`'s three figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".into())
}

type Kept = (SimSet, tempfile::TempDir, PathBuf);

/// One unthrottled `--once`; returns its row, the simulators and state (for reuse), and peak
/// RSS in KiB.
async fn unthrottled_daemon_only(clients: usize) -> (Value, Option<Kept>, u64) {
    let sims = unthrottled_sims(clients).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&sims, dir.path(), 100, None);
    let run = run_once(&config).await;
    let elapsed = run.elapsed.as_secs_f64();
    let row = json!({
        "exit_code": run.exit,
        "clients": clients,
        "elapsed_secs": round(elapsed, 2),
        "records_per_sec": round(clients as f64 / elapsed.max(0.001), 0),
        "cpu_secs": round(run.cpu.as_secs_f64(), 2),
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

/// Runs `sync-daemon --once` as a child and measures it.
async fn run_once(config: &Path) -> ChildRun {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-daemon"));
    command
        .arg("--config")
        .arg(config)
        .arg("--once")
        .stdout(std::process::Stdio::null());
    run_child(command).await
}

/// Runs `command` as a child and measures it: CPU time from `wait4`, peak RSS from its own
/// `VmHWM`, disk writes from its `/proc/PID/io` read once it has exited but before it is reaped.
async fn run_child(mut command: Command) -> ChildRun {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        // Reaped by wait4 below, which also returns the child's own CPU time (its peak RSS comes
        // from VmHWM: see below).
        #[allow(clippy::zombie_processes)]
        let child = command.spawn().expect("spawn the measured child");
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
        // Wait for the exit without reaping (WNOWAIT): the zombie keeps its io accounting,
        // the sum over all its threads.
        // SAFETY: siginfo_t is plain old data; waitid fills it for our own child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let waited = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        let write_bytes = (waited == 0)
            .then(|| std::fs::read_to_string(format!("/proc/{pid}/io")).ok())
            .flatten()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
        let mut status = 0;
        // SAFETY: rusage is plain old data; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(reaped, pid, "wait4 failed");
        let elapsed = started.elapsed();
        let sys = timeval(usage.ru_stime);
        let cpu = timeval(usage.ru_utime) + sys;
        ChildRun {
            elapsed,
            cpu,
            sys,
            max_rss_kib: sampler.join().unwrap_or(0),
            write_bytes,
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
