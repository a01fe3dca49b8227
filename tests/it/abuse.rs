//! The daemon's own HTTP surfaces under abuse, against a real daemon-mode process: a signature
//! header built to cost thousands of HMACs, push bodies that would queue days of source
//! fetches, a flood of refused requests, and a thousand half-open connections. Each asserts what
//! an operator sees: the answers, that `/healthz` keeps answering a probe with a 5 s timeout,
//! the log, `status` and `/metrics`, and that nothing is lost.

use std::time::{Duration, Instant};

use sync_daemon::server::{MAX_CONNECTIONS, MAX_EVENTS_PER_REQUEST, MAX_PENDING_PUSH, sign};
use sync_daemon_sim::Faults;

use crate::push::{
    SECRET, events, signed, start_with_env, start_with_gym_config, wait_drained, wait_for_revkeen,
};
use crate::support::{DaemonProcess, push, rename_client, unix_now, wait_for, wait_for_name};

/// A probe as a kubelet sends it: its own connection, a 5 s timeout. Returns the status (or why
/// there was none, so a failing test can print it beside the daemon's log) and how long the
/// answer took.
async fn probe(daemon: &DaemonProcess) -> (Result<u16, String>, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let started = Instant::now();
    let status = match client.get(daemon.url("/healthz")).send().await {
        Ok(answer) => Ok(answer.status().as_u16()),
        Err(error) => Err(format!("/healthz did not answer within 5 s: {error}")),
    };
    (status, started.elapsed())
}

/// Probes `/healthz` every 50 ms until `done` resolves; every answer must be 200. Returns the
/// slowest answer and how many probes ran.
async fn probe_while<F: std::future::Future>(daemon: &DaemonProcess, done: F) -> (Duration, usize) {
    tokio::pin!(done);
    let (mut slowest, mut probes) = (Duration::ZERO, 0);
    loop {
        tokio::select! {
            _ = &mut done => return (slowest, probes),
            (status, took) = probe(daemon) => {
                assert_eq!(status, Ok(200), "/healthz under abuse; the daemon's log:\n{}", daemon.log());
                slowest = slowest.max(took);
                probes += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A push whose header is far over the server's 16 KiB: 431, or — when the server has
/// answered and closed before the client finished writing — a connection it cut (reported as
/// 431 too: either way the header was refused unread).
async fn oversized(daemon: &DaemonProcess, body: &[u8], signature: &str) -> (u16, String) {
    let sent = reqwest::Client::new()
        .post(daemon.url("/v1/changes/gym"))
        .header("x-sync-signature", signature)
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        Ok(answer) => (answer.status().as_u16(), String::new()),
        Err(error) if error.is_request() => (431, format!("cut by the server: {error}")),
        Err(error) => panic!("push: {error}"),
    }
}

/// Wodify GETs of single clients (the push path).
fn push_fetches(h: &crate::support::Harness) -> usize {
    h.sims
        .wodify
        .requests()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/clients/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_floods_are_refused_before_any_hmac_while_healthz_answers() {
    let (h, daemon) = start_with_env(20, 5, Some(SECRET), None, &[]).await;
    h.sims.wodify.clear_log();
    let body = events(&[10_002]);
    let t = unix_now();
    let wrong = sign("not-the-secret", &body, t);
    let wrong_v1 = wrong.split_once(",v1=").expect("v1").1.to_string();

    // Two requests with 8,000 candidates each (544 KB of header), one 300 KB header, and twenty
    // 1 MiB bodies signed four times with the wrong secret, all at once.
    let thousands = format!("t={t}{}", format!(",v1={wrong_v1}").repeat(8000));
    let huge = format!("t={t},v1={}", "0".repeat(300 * 1024));
    let mut big = events(&[10_003]);
    big.resize(1024 * 1024 - 64, b' ');
    let four_wrong = format!(
        "t={t}{}",
        format!(
            ",v1={}",
            sign("nope", &big, t).split_once(",v1=").expect("v1").1
        )
        .repeat(4)
    );
    let abuse = async {
        let mut answers = Vec::new();
        let mut requests = Vec::new();
        for header in [&thousands, &thousands, &huge] {
            requests.push(oversized(&daemon, &body, header));
        }
        let first: Vec<(u16, String)> = futures_util::future::join_all(requests).await;
        answers.extend(first);
        let heavy: Vec<_> = (0..20)
            .map(|_| push(&daemon, "gym", &big, Some(&four_wrong)))
            .collect();
        answers.extend(futures_util::future::join_all(heavy).await);
        answers
    };
    let (answers, (slowest, probes)) = {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let probing = probe_while(&daemon, rx);
        let abusing = async {
            let answers = abuse.await;
            let _ = tx.send(());
            answers
        };
        tokio::join!(abusing, probing)
    };
    eprintln!("signature flood: {probes} probes, slowest /healthz {slowest:.1?}");
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(
        &statuses[..3],
        &[431, 431, 431],
        "headers over 16 KiB: {answers:?}"
    );
    assert!(statuses[3..].iter().all(|s| *s == 401), "{statuses:?}");

    // A short header with five signatures: 400 naming the limit, no HMAC computed.
    let five = format!("t={t}{}", format!(",v1={wrong_v1}").repeat(5));
    let (status, answer) = push(&daemon, "gym", &body, Some(&five)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("more than 4 v1= signatures"), "{answer}");
    // Rotation still works: the old secret's and the current secret's signatures together.
    let t = unix_now();
    let rotated = format!(
        "{},v1={}",
        sign("not-the-secret", &body, t),
        sign(SECRET, &body, t).split_once(",v1=").expect("v1").1
    );
    rename_client(&h.sims.wodify, 10_002, "Rotated");
    let (status, answer) = push(&daemon, "gym", &body, Some(&rotated)).await;
    assert_eq!(status, 202, "{answer}");
    wait_for_name(&h, "wodify", 10_002, "Rotated", Duration::from_secs(30)).await;
    assert_eq!(push_fetches(&h), 1, "only the accepted push was fetched");
    daemon.stop().await.assert_exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_backlog_is_capped_per_request_and_per_source_and_shown_in_status_and_metrics() {
    // Fetched at 500/s, not Wodify's 5/s, so the full backlog drains within seconds.
    let (h, daemon) =
        start_with_gym_config(20, 5, Some(SECRET), &["requests_per_second = 500"]).await;
    // Wodify down: accepted events wait, unfetched.
    h.sims.wodify.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let ids: Vec<i64> = (1..=i64::try_from(MAX_PENDING_PUSH).expect("fits") + 1).collect();

    let over = events(&ids[..MAX_EVENTS_PER_REQUEST + 1]);
    let (status, answer) = push(&daemon, "gym", &over, Some(&signed(&over))).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("at most 1000 per request"), "{answer}");

    for chunk in ids[..MAX_PENDING_PUSH].chunks(MAX_EVENTS_PER_REQUEST) {
        let body = events(chunk);
        let (status, answer) = push(&daemon, "gym", &body, Some(&signed(&body))).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Full: one more id is refused with Retry-After; an id already waiting is not new.
    let one_more = events(&ids[MAX_PENDING_PUSH..]);
    let answer = reqwest::Client::new()
        .post(daemon.url("/v1/changes/gym"))
        .header("x-sync-signature", signed(&one_more))
        .body(one_more.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status().as_u16(), 503);
    assert_eq!(answer.headers()["retry-after"], "60");
    let text = answer.text().await.expect("body");
    assert!(
        text.contains("5000 events of this source are waiting to be fetched"),
        "{text}"
    );
    let again = events(&[1]);
    assert_eq!(
        push(&daemon, "gym", &again, Some(&signed(&again))).await.0,
        202
    );

    let report = h.status_json().await;
    assert_eq!(report["push_pending"], MAX_PENDING_PUSH, "{report}");
    let gym = &report["sources"][0];
    assert_eq!(gym["name"], "gym");
    assert_eq!(gym["push_pending"], MAX_PENDING_PUSH);
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout
            .contains("Push events waiting to be fetched: 5000."),
        "{}",
        text.stdout
    );
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_push_pending", &[("source", "gym")]),
        MAX_PENDING_PUSH as f64,
        "{}",
        metrics.text
    );

    // Wodify back: the backlog drains (ids Wodify does not hold are answered 404 and
    // consumed) and the changed client among them reaches RevKeen.
    rename_client(&h.sims.wodify, 10_005, "Backlog");
    let body = events(&[10_005]);
    // Not accepted yet: the source is still full until the backlog drains.
    h.sims.wodify.set_faults(Faults::default());
    wait_for(
        "the push backlog to drain",
        Duration::from_secs(120),
        || async {
            let report = h.status_json().await;
            if report["push_pending"] == 0 {
                Ok(())
            } else {
                Err(format!("push_pending {}", report["push_pending"]))
            }
        },
    )
    .await;
    assert_eq!(
        push(&daemon, "gym", &body, Some(&signed(&body))).await.0,
        202
    );
    wait_for_name(&h, "wodify", 10_005, "Backlog", Duration::from_secs(30)).await;
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_push_pending", &[("source", "gym")]),
        0.0
    );
    wait_drained(&h).await;
    daemon.stop().await.assert_exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_pushes_writes_one_log_line_and_is_counted_in_metrics() {
    let (h, daemon) = start_with_env(5, 5, Some(SECRET), None, &[]).await;
    let body = events(&[10_001]);
    let wrong = sign("not-the-secret", &body, unix_now());
    let warnings_before = daemon.log().matches("WARN").count();
    let client = reqwest::Client::new();
    for round in 0..100 {
        let requests: Vec<_> = (0..20)
            .map(|_| {
                client
                    .post(daemon.url("/v1/changes/gym"))
                    .header("x-sync-signature", &wrong)
                    .body(body.clone())
                    .send()
            })
            .collect();
        for answer in futures_util::future::join_all(requests).await {
            assert_eq!(
                answer.expect("answer").status().as_u16(),
                401,
                "round {round}"
            );
        }
    }
    let log = daemon.log();
    let warnings = log.matches("WARN").count() - warnings_before;
    let refusal_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Requests refused"))
        .collect();
    eprintln!("2000 refused pushes: {warnings} WARN lines");
    assert_eq!(warnings, 1, "one line for 2000 refusals: {refusal_lines:?}");
    assert!(
        refusal_lines[0].contains("1 × 401 on gym (signature does not match)"),
        "{refusal_lines:?}"
    );
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_push_refused_total", &[("status", "401")]),
        2000.0
    );
    drop(h);
    daemon.stop().await.assert_exit(0);
}

/// Raises this process's descriptor limit to its hard limit (the test holds over a thousand
/// connections) and returns it.
fn raise_own_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// Descriptors a process holds now.
fn descriptors(pid: libc::pid_t) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_connections_starve_neither_probes_nor_descriptors_nor_fetches() {
    use tokio::io::AsyncWriteExt as _;
    assert!(
        raise_own_descriptor_limit() > 1500,
        "the test needs 1,500 descriptors"
    );
    // The daemon with the 1,024 descriptors a process gets by default.
    let (h, daemon) = crate::push::start_with_limits(20, 5, Some(SECRET), 1024).await;
    let mut attackers = Vec::new();
    for _ in 0..1100 {
        let mut stream = tokio::net::TcpStream::connect(daemon.addr)
            .await
            .expect("connect");
        stream
            .write_all(b"POST /v1/changes/gym HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n")
            .await
            .expect("write");
        attackers.push(stream);
    }
    let held = descriptors(daemon.pid());
    let (mut slowest, mut statuses) = (Duration::ZERO, Vec::new());
    for _ in 0..10 {
        let (status, took) = probe(&daemon).await;
        statuses.push(status);
        slowest = slowest.max(took);
    }
    eprintln!(
        "1100 half-open connections: daemon holds {held} descriptors, slowest of 10 probes {slowest:.1?}"
    );
    assert_eq!(
        statuses,
        vec![Ok(200); 10],
        "the daemon's log:\n{}",
        daemon.log()
    );
    assert!(
        held <= MAX_CONNECTIONS + 32,
        "{held} descriptors held with {MAX_CONNECTIONS} connections allowed"
    );
    // The daemon's own requests still get descriptors: a push is fetched and delivered.
    rename_client(&h.sims.wodify, 10_004, "Besieged");
    let body = events(&[10_004]);
    assert_eq!(
        push(&daemon, "gym", &body, Some(&signed(&body))).await.0,
        202
    );
    wait_for_name(&h, "wodify", 10_004, "Besieged", Duration::from_secs(30)).await;
    wait_for_revkeen(&h).await;
    drop(attackers);
    daemon.stop().await.assert_exit(0);
}
