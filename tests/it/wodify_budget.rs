//! Wodify's shared monthly quota: the daemon's `monthly_request_budget` (never overspent, paced,
//! counted across restarts, shown by `status`, `/metrics` and `check-config`), a spent quota
//! (429 `Limit Exceeded`), a plain throttle, a search that ignores `sort`, and the `APIError`
//! envelope, each injected through a switch of the Wodify simulator.

use std::time::Duration;

use serde_json::Value;
use sync_daemon_sim::wodify::WodifySwitches;

use crate::support::{
    Harness, UNLIMITED_WODIFY, assert_revkeen_holds, exit, expected_wodify, replaced,
    seed_valid_clients, with_source,
};

/// A gym-only harness with `clients` valid clients and `extra` lines in its source.
async fn gym(clients: usize, extra: &[&str]) -> Harness {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, clients, 71);
    h.write_config(&gym_config(&h, extra));
    h
}

/// The gym alone with Wodify's default budget (the harness makes it unlimited) and `extra`
/// lines (a `monthly_request_budget` among them sets the budget).
fn gym_config(h: &Harness, extra: &[&str]) -> String {
    let toml = replaced(&h.config_for("gym"), &format!("{UNLIMITED_WODIFY}\n"), "");
    extra
        .iter()
        .fold(toml, |toml, line| with_source(&toml, "gym", line))
}

/// A per-second schedule instead of the default quarter hour.
fn every_second(toml: &str) -> String {
    replaced(
        toml,
        "schedule = \"0 */15 * * * *\"",
        "schedule = \"* * * * * *\"",
    )
}

fn gym_status(status: &Value) -> &Value {
    status["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "gym"))
        .unwrap_or_else(|| panic!("no gym in {status:#}"))
}

/// Prints a measured figure (`--nocapture`).
fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("figure: {what}: {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_second_daemon_stays_within_a_budget_smaller_than_a_day_and_the_count_survives_a_restart()
 {
    // 250 clients: 3 requests a scan; 10 requests a month is less than 4 seconds of the schedule.
    let h = gym(250, &["monthly_request_budget = 10"]).await;
    let toml = every_second(&gym_config(&h, &["monthly_request_budget = 10"]));
    let daemon = h.start_daemon(&toml).await;
    daemon.wait_polls("gym", 1).await;
    // Five seconds of per-second ticks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.sims.wodify.stats().requests, 3, "{}", daemon.log());
    let log = daemon.log();
    assert_eq!(
        log.matches("The monthly request budget would not last the month")
            .count(),
        1,
        "said once: {log}"
    );
    let status = h.status_json().await;
    let gym = gym_status(&status);
    assert_eq!(gym["request_budget"]["used"], 3, "{gym:#}");
    assert_eq!(gym["request_budget"]["budget"], 10, "{gym:#}");
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    assert_eq!(gym["request_budget"]["month"], month.as_str());
    let note = gym["budget_note"].as_str().unwrap_or_default();
    assert!(note.contains("scans spaced out to every"), "{gym:#}");
    assert!(note.contains("the schedule fires every 1 s"), "{note}");
    let metrics = daemon.metrics().await;
    assert_eq!(
        metrics.sum("sync_daemon_source_requests_month", &[("source", "gym")]),
        3.0
    );
    assert_eq!(
        metrics.sum("sync_daemon_source_request_budget", &[("source", "gym")]),
        10.0
    );
    daemon.stop().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));

    // A restart neither resets the month nor the pacing: the start-up tick waits too.
    let daemon = h.start_daemon(&toml).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(h.sims.wodify.stats().requests, 3, "{}", daemon.log());
    daemon.stop().await.assert_exit(exit::OK);
    let status = h.status_json().await;
    assert_eq!(gym_status(&status)["request_budget"]["used"], 3);

    // A `--once` spends the rest and stops at the budget: never more than 10 in the month.
    h.sims.wodify.seed(1000, 72);
    let out = h.once().await;
    out.assert_exit(exit::UNAVAILABLE);
    assert!(
        out.stderr
            .contains("has spent its monthly_request_budget (10 of 10"),
        "{}",
        out.transcript()
    );
    assert_eq!(h.sims.wodify.stats().requests, 10);
    let status = h.status_json().await;
    assert_eq!(gym_status(&status)["request_budget"]["used"], 10);

    // A spent budget: the daemon sends nothing more this month and `status` says why.
    let daemon = h.start_daemon(&toml).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.sims.wodify.stats().requests, 10, "{}", daemon.log());
    let status = h.status_json().await;
    let note = gym_status(&status)["budget_note"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        note.contains("polling resumes when the month turns"),
        "{note}"
    );
    daemon.stop().await.assert_exit(exit::OK);
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout.contains(&format!(
            "gym: 10 of 10 requests of the monthly budget used in {month}"
        )),
        "{}",
        text.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_wodify_quota_ends_once_at_once_with_69_naming_the_monthly_quota() {
    let h = gym(50, &[]).await;
    h.sims.wodify.set_switches(WodifySwitches {
        quota_spent: true,
        ..WodifySwitches::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::UNAVAILABLE);
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    let requests = h.sims.wodify.stats().requests;
    assert!(requests <= 2, "{requests} requests");
    figure("requests before a spent quota ends --once", requests);
    for says in [
        "Limit Exceeded",
        "monthly request quota",
        "resets when the month turns",
        "once an hour",
    ] {
        assert!(out.stderr.contains(says), "{says}: {}", out.transcript());
    }
    // The next run within the hour sends nothing: the pause is in the state file.
    let again = h.once().await;
    again.assert_exit(exit::UNAVAILABLE);
    assert!(again.stderr.contains("resets when the month turns"));
    assert_eq!(h.sims.wodify.stats().requests, requests);
    let status = h.status_json().await;
    let note = gym_status(&status)["budget_note"]
        .as_str()
        .unwrap_or_default();
    assert!(
        note.contains("PAUSED") && note.contains("monthly quota is spent"),
        "{status:#}"
    );
    assert!(h.run(&["status"]).await.stdout.contains("PAUSED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_gateway_throttle_is_retried_as_before() {
    let h = gym(250, &[]).await;
    h.sims.wodify.set_switches(WodifySwitches {
        gateway_429: true,
        ..WodifySwitches::default()
    });
    // Two a second, one at a time: the second page, asked for at once, is throttled.
    h.sims.wodify.set_rate_limit(2, 1);
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert!(h.sims.wodify.stats().rate_limited > 0);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    // Every try counted, retries included.
    let status = h.status_json().await;
    assert_eq!(
        gym_status(&status)["request_budget"]["used"],
        h.sims.wodify.stats().requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apierror_envelope_inside_a_200_is_an_error_not_data() {
    let h = gym(120, &["max_attempts = 2"]).await;
    h.sims.wodify.set_switches(WodifySwitches {
        api_error_rate: 1.0,
        ..WodifySwitches::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::UNAVAILABLE);
    assert!(
        out.stderr.contains("Simulated APIError envelope"),
        "{}",
        out.transcript()
    );
    assert_eq!(h.sims.wodify.stats().requests, 2, "retried like a 5xx");
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    h.sims.wodify.set_switches(WodifySwitches {
        api_error_rate: 0.3,
        ..WodifySwitches::default()
    });
    h.write_config(&gym_config(&h, &[]));
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

/// Requests of a first and of a second `--once` (every Wodify poll is a full scan).
async fn scan_requests(clients: usize, switches: WodifySwitches) -> (u64, u64, String) {
    let h = gym(clients, &[]).await;
    h.unlimited();
    h.sims.wodify.set_switches(switches);
    let first = h.once().await;
    first.assert_exit(exit::OK);
    let after_first = h.sims.wodify.stats().requests;
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let second = h.once().await;
    second.assert_exit(exit::OK);
    let check = h.run(&["check-config"]).await;
    check.assert_exit(exit::OK);
    (
        after_first,
        h.sims.wodify.stats().requests - after_first,
        check.stderr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_scan_in_both_variants_and_what_check_config_says_they_cost() {
    // Documented: the keyset search walks 10 pages of 100.
    let (first, second, check) = scan_requests(1000, WodifySwitches::default()).await;
    figure("documented, 1,000 clients, first scan", first);
    figure("documented, 1,000 clients, next scan", second);
    assert_eq!((first, second), (10, 10));
    assert!(
        check.contains("gym: the schedule (every 15 min, 2921 polls a month) costs about 29210 requests a month at the last complete scan's 10, against a monthly_request_budget of 250000: 11% of it"),
        "{check}"
    );
    // Live: the search ignores `sort`, so each scan reads its first page, then 10 pages by
    // number, and still delivers everyone (asserted inside).
    let (first, second, check) = scan_requests(1000, WodifySwitches::live()).await;
    figure("live, 1,000 clients, first scan", first);
    figure("live, 1,000 clients, next scan", second);
    assert_eq!((first, second), (11, 11));
    assert!(check.contains("at the last complete scan's 11"), "{check}");
}
