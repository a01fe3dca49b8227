//! RevKeen's own hosted sync, the other writer: when RevKeen's built-in Wodify (or
//! PracticeHub) sync is active for the merchant, `check-config --connect`, a `--once` run and
//! the daemon say so plainly and say what to do, and `status` repeats it; a key that may not
//! read integrations (403) changes nothing. The daemon only ever reads the integration: no
//! write goes anywhere but the customer endpoints. RevKeen's customer id from a single
//! upsert's answer is kept and shown by `failures` and the verbose dry run.

use std::time::Duration;

use serde_json::json;
use sync_daemon_sim::revkeen::{HostedSync, Rejection};

use crate::support::{Harness, exit, replaced, seed_valid_clients};

const WODIFY_WARNING: &str = "RevKeen's built-in wodify sync is active";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_hosted_sync_is_warned_about_by_the_check_the_run_and_status() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 30, 7);
    h.sims
        .revkeen
        .set_hosted_sync("wodify", Some(HostedSync::active()));

    // The check: the warning and the fix, under RevKeen's line; still exit 0 (it is not a
    // configuration error).
    let check = h.run(&["check-config", "--connect"]).await;
    check.assert_exit(exit::OK);
    let warning = check
        .stderr
        .lines()
        .find(|line| line.contains(WODIFY_WARNING))
        .unwrap_or_else(|| panic!("no warning:\n{}", check.transcript()));
    assert!(warning.contains("WARNING"), "{warning}");
    assert!(warning.contains("Turn one of the two off"), "{warning}");
    assert!(warning.contains("\"gym\""), "names the source: {warning}");
    let json = h.run(&["check-config", "--connect", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    let revkeen = report["connections"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["target"] == "revkeen"))
        .expect("RevKeen's check");
    assert!(
        revkeen["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains(WODIFY_WARNING)),
        "{report}"
    );

    // The run: warned in its log, everything still delivered, and `status` repeats it.
    let run = h.run(&["--once"]).await;
    run.assert_exit(exit::OK);
    assert!(run.stderr.contains(WODIFY_WARNING), "{}", run.transcript());
    assert_eq!(h.sims.revkeen.customers("wodify").len(), 30);
    let status = h.status_json().await;
    assert_eq!(status["hosted_syncs"][0]["provider"], "wodify", "{status}");
    assert!(
        status["hosted_syncs"][0]["warning"]
            .as_str()
            .is_some_and(|w| w.contains(WODIFY_WARNING)),
        "{status}"
    );
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout.contains(WODIFY_WARNING),
        "{}",
        text.transcript()
    );

    // Only reads: nothing but customer upserts was written, and RevKeen was asked once per
    // command that checks (the two checks and the run).
    assert!(
        h.sims
            .revkeen
            .requests()
            .iter()
            .all(|r| r.method == "GET" || r.path.starts_with("/customers/external/")),
        "{:?}",
        h.sims.revkeen.requests()
    );
    assert_eq!(h.sims.revkeen.stats().integration_reads, 3);

    // Turned off at RevKeen: the next run clears the warning from `status`.
    h.sims.revkeen.set_hosted_sync(
        "wodify",
        Some(HostedSync {
            sync_enabled: false,
            ..HostedSync::active()
        }),
    );
    h.run(&["--once"]).await.assert_exit(exit::OK);
    let status = h.status_json().await;
    assert_eq!(status["hosted_syncs"], serde_json::json!([]), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_warns_at_start_and_a_key_that_may_not_read_integrations_changes_nothing() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 5, 9);
    h.sims
        .revkeen
        .set_hosted_sync("wodify", Some(HostedSync::active()));
    let daemon = h.start_daemon(&h.config_for("gym")).await;
    daemon
        .wait_for_log("the hosted-sync warning", Duration::from_secs(30), |log| {
            log.contains(WODIFY_WARNING)
        })
        .await;
    daemon.stop().await.assert_exit(exit::OK);

    // A key without `integrations:read`: no warning, no error, the run as usual.
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 5, 9);
    h.sims
        .revkeen
        .set_hosted_sync("wodify", Some(HostedSync::active()));
    h.sims.revkeen.set_integrations_readable(false);
    let check = h.run(&["check-config", "--connect"]).await;
    check.assert_exit(exit::OK);
    assert!(!check.stderr.contains("WARNING"), "{}", check.transcript());
    let run = h.run(&["--once"]).await;
    run.assert_exit(exit::OK);
    assert!(!run.stderr.contains(WODIFY_WARNING), "{}", run.transcript());
    assert_eq!(h.sims.revkeen.customers("wodify").len(), 5);
    assert_eq!(h.status_json().await["hosted_syncs"], serde_json::json!([]));
}

/// RevKeen's id for a customer, from a single upsert's answer, is kept beside the synced hash
/// and shown where the customer is shown: `failures` and the dry run's verbose output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeens_customer_id_is_shown_by_failures_and_the_verbose_dry_run() {
    let h = Harness::start().await;
    h.write_config(&replaced(
        &h.config_for("gym"),
        "[revkeen]\n",
        "[revkeen]\nbatch_size = 1\n",
    ));
    seed_valid_clients(&h.sims.wodify, 10, 3);
    h.run(&["--once"]).await.assert_exit(exit::OK);
    let ids: Vec<i64> = h
        .sims
        .wodify
        .clients()
        .iter()
        .map(|c| c["id"].as_i64().expect("id"))
        .collect();
    let (refused, changed) = (ids[0], ids[1]);
    let revkeen_id = |id: i64| {
        h.sims
            .revkeen
            .customer("wodify", &id.to_string())
            .expect("synced")
            .id
    };

    // Changed at the source: the dry run names RevKeen's customer it would update.
    for id in [refused, changed] {
        assert!(
            h.sims
                .wodify
                .update_client(id, json!({"first_name": "Changed"}))
        );
    }
    let dry = h.run(&["--once", "--dry-run", "--verbose"]).await;
    dry.assert_exit(exit::OK);
    let line = dry
        .stdout
        .lines()
        .find(|l| l.starts_with("update") && l.contains(&format!(" {changed}:")))
        .unwrap_or_else(|| panic!("no update line:\n{}", dry.transcript()));
    assert!(
        line.contains(&format!("(RevKeen customer {})", revkeen_id(changed))),
        "{line}"
    );
    let terse = h.run(&["--once", "--dry-run"]).await;
    assert!(
        !terse.stdout.contains("RevKeen customer"),
        "{}",
        terse.stdout
    );

    // Refused on update: the dead letter names the customer RevKeen holds.
    h.sims.revkeen.set_rejections(vec![Rejection {
        external_id: Some(refused.to_string()),
        email: None,
        status: 422,
        code: "customer_locked".to_string(),
        message: "this customer is locked".to_string(),
        field: None,
    }]);
    h.run(&["--once"]).await.assert_exit(exit::REJECTED);
    let listed = h.run(&["failures", "--json"]).await;
    let failures: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON");
    assert_eq!(
        failures[0]["revkeen_id"].as_str(),
        Some(revkeen_id(refused).as_str()),
        "{failures}"
    );
    let text = h.run(&["failures"]).await;
    assert!(
        text.stdout
            .contains(&format!("RevKeen customer {}", revkeen_id(refused))),
        "{}",
        text.stdout
    );
}
