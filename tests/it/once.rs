//! `--once` end to end, for each source kind: a backfill delivers every valid record, a second
//! run with nothing changed makes zero RevKeen writes, and changing a few records writes exactly
//! those records with their new data. For PracticeHub, the later polls are incremental
//! (`updated=gte:`), as the request log shows.

use std::collections::BTreeMap;

use serde_json::json;

use crate::support::{
    Harness, assert_revkeen_holds, client_ids, exit, expected_practicehub, expected_wodify,
    invalid_wodify, name_at_revkeen, rename_client, seed_valid_clients, state_bytes, summary_cell,
    wait_until, with_source,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wodify_backfill_then_unchanged_then_exactly_the_changed_clients() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    h.sims.wodify.seed(500, 1);
    assert!(
        !invalid_wodify(&h.sims.wodify).is_empty(),
        "the seed should include clients without a valid email"
    );

    // Backfill: every client with a valid email, and 65 because some have none.
    let first = h.once().await;
    first.assert_exit(exit::REJECTED);
    let expected = expected_wodify(&h.sims.wodify);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected);
    assert_eq!(h.sims.revkeen.stats().writes(), expected.len() as u64);

    // Nothing changed: nothing is sent at all.
    let before = h.sims.revkeen.stats();
    h.once().await.assert_exit(exit::REJECTED);
    let after = h.sims.revkeen.stats();
    assert_eq!(
        after.writes(),
        before.writes(),
        "an unchanged source must cost zero RevKeen writes"
    );
    assert_eq!(
        after.requests, before.requests,
        "an unchanged source must send RevKeen nothing"
    );

    // Five changed clients: exactly five writes, and RevKeen holds the new names.
    let changed: Vec<String> = expected.keys().step_by(97).take(5).cloned().collect();
    assert_eq!(changed.len(), 5);
    for (n, id) in changed.iter().enumerate() {
        let id: i64 = id.parse().expect("numeric id");
        rename_client(&h.sims.wodify, id, &format!("Renamed{n}"));
    }
    let before = h.sims.revkeen.stats();
    h.once().await.assert_exit(exit::REJECTED);
    let after = h.sims.revkeen.stats();
    assert_eq!(
        after.writes() - before.writes(),
        5,
        "exactly the 5 changed clients are written"
    );
    assert_eq!(after.updated - before.updated, 5);
    let expected = expected_wodify(&h.sims.wodify);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected);
    for (n, id) in changed.iter().enumerate() {
        let customer = h.sims.revkeen.customer("wodify", id).expect("delivered");
        let name = customer.fields["name"].as_str().unwrap_or_default();
        assert!(name.ends_with(&format!(" Renamed{n}")), "{id}: {name}");
        assert_eq!(customer.writes, 2, "{id} written at backfill and once more");
    }
    let written_again: Vec<String> = h
        .sims
        .revkeen
        .customers("wodify")
        .into_iter()
        .filter(|c| c.writes != 1 && !changed.contains(&c.external_id))
        .map(|c| c.external_id)
        .collect();
    assert!(
        written_again.is_empty(),
        "unchanged customers written again: {written_again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn practicehub_backfill_then_incremental_polls_write_only_changed_patients() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(300, 1);

    let first = h.once().await;
    first.assert_exit(exit::REJECTED);
    let expected = expected_practicehub(&h.sims.practicehub);
    assert_revkeen_holds(&h.sims.revkeen, "practicehub", &expected);
    assert!(
        h.sims.revkeen.customers("wodify").is_empty(),
        "patients are filed under RevKeen source practicehub only"
    );

    // Second run: incremental, and nothing to write.
    h.sims.practicehub.clear_log();
    let before = h.sims.revkeen.stats();
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.sims.revkeen.stats().writes(), before.writes());
    assert_eq!(h.sims.revkeen.stats().requests, before.requests);
    assert_incremental(&h, "second run");

    // Three changed patients: exactly three writes with the new names.
    let changed: Vec<String> = expected.keys().step_by(61).take(3).cloned().collect();
    assert_eq!(changed.len(), 3);
    for (n, id) in changed.iter().enumerate() {
        let id: i64 = id.parse().expect("numeric id");
        assert!(
            h.sims
                .practicehub
                .update_patient(id, json!({"last_name": format!("Moved{n}")}))
        );
    }
    h.sims.practicehub.clear_log();
    let before = h.sims.revkeen.stats();
    h.once().await.assert_exit(exit::REJECTED);
    let after = h.sims.revkeen.stats();
    assert_eq!(after.writes() - before.writes(), 3);
    assert_eq!(after.updated - before.updated, 3);
    assert_incremental(&h, "third run");
    let expected = expected_practicehub(&h.sims.practicehub);
    assert_revkeen_holds(&h.sims.revkeen, "practicehub", &expected);
    for (n, id) in changed.iter().enumerate() {
        let customer = h
            .sims
            .revkeen
            .customer("practicehub", id)
            .expect("delivered");
        assert!(
            customer.fields["name"]
                .as_str()
                .unwrap_or_default()
                .ends_with(&format!(" Moved{n}")),
            "{id}: {:?}",
            customer.fields["name"]
        );
    }
}

/// The PracticeHub requests since the log was cleared were one filtered page: the poll asked
/// for `updated=gte:<mark>` and did not page through the table.
#[track_caller]
fn assert_incremental(h: &Harness, run: &str) {
    let requests = h.sims.practicehub.requests();
    assert!(!requests.is_empty(), "{run}: PracticeHub was not polled");
    for request in &requests {
        let query = request
            .path_and_query
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("");
        let params: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        assert!(
            params
                .get("updated")
                .is_some_and(|value| value.starts_with("gte:")),
            "{run}: poll without the updated=gte: filter: {}",
            request.path_and_query
        );
    }
    assert_eq!(
        requests.len(),
        1,
        "{run}: an incremental poll with few changes reads one page, not the whole table: {:?}",
        requests
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_changes_back_is_written_back() {
    // A → B → A with no source timestamp (Wodify's 1900-01-01 sentinel), so RevKeen's stale
    // protection cannot help: only a fresh idempotency key for the second A gets it written.
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 30, 17);
    let id = 10_005;
    let mut original = h.sims.wodify.client(id).expect("seeded");
    original["updated"]["updated_on_datetime"] = json!("1900-01-01T00:00:00");
    original["last_name"] = json!("Alpha");
    h.sims.wodify.put_client(original.clone());
    h.once().await.assert_exit(exit::OK);

    let mut changed = original.clone();
    changed["last_name"] = json!("Beta");
    h.sims.wodify.put_client(changed);
    h.once().await.assert_exit(exit::OK);
    let name = |h: &Harness| name_at_revkeen(h, "wodify", &id.to_string());
    assert!(
        name(&h).is_some_and(|name| name.ends_with(" Beta")),
        "{:?}",
        name(&h)
    );

    h.sims.wodify.put_client(original);
    h.once().await.assert_exit(exit::OK);
    assert!(
        name(&h).is_some_and(|name| name.ends_with(" Alpha")),
        "after A → B → A RevKeen must hold A again, holds {:?}",
        name(&h)
    );
    let customer = h
        .sims
        .revkeen
        .customer("wodify", &id.to_string())
        .expect("delivered");
    assert_eq!(customer.writes, 3);
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_writes_everything_again_with_fresh_keys() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 200, 19);
    h.once().await.assert_exit(exit::OK);
    h.sims.revkeen.clear_log();

    h.run(&["--once", "--resync"]).await.assert_exit(exit::OK);
    let stats = h.sims.revkeen.stats();
    assert_eq!(
        stats.updated, 200,
        "--resync sends every customer again: {stats:?}"
    );
    assert_eq!(
        stats.replayed, 0,
        "a resync must not be answered from old keys: {stats:?}"
    );
    assert_eq!(stats.conflicts, 0);

    // And it leaves the state as it found it: the next plain run sends nothing.
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_data_at_revkeen_is_kept_and_counts_as_delivered() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 50, 23);
    let id = "10007";
    // Someone wrote this customer at RevKeen with a later source timestamp.
    let response = reqwest::Client::new()
        .put(format!(
            "{}/customers/external/wodify/{id}",
            h.sims.revkeen_server.url()
        ))
        .header("x-api-key", sync_daemon_sim::REVKEEN_KEY)
        .json(&json!({
            "email": "newer@example.com",
            "name": "Newer Name",
            "external_updated_at": "2030-01-01T00:00:00Z",
        }))
        .send()
        .await
        .expect("PUT to the RevKeen simulator");
    assert!(response.status().is_success(), "{}", response.status());
    h.sims.revkeen.clear_log();

    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    assert!(h.sims.revkeen.stats().stale >= 1);
    let customer = h.sims.revkeen.customer("wodify", id).expect("exists");
    assert_eq!(customer.fields["name"], "Newer Name");
    assert_eq!(
        summary_cell(&out, "gym", "STALE"),
        1,
        "the summary counts the stale answer:\n{}",
        out.transcript()
    );

    // Accepted as final: not sent again.
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn practicehub_ignoring_the_filter_costs_a_full_scan_but_no_writes() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(250, 29);
    h.once().await.assert_exit(exit::REJECTED);
    h.sims.practicehub.set_ignore_filters(true);

    let id: i64 = expected_practicehub(&h.sims.practicehub)
        .keys()
        .nth(7)
        .expect("a patient")
        .parse()
        .expect("numeric id");
    assert!(
        h.sims
            .practicehub
            .update_patient(id, json!({"first_name": "Renamed"}))
    );
    h.sims.practicehub.clear_log();
    let before = h.sims.revkeen.stats();
    h.once().await.assert_exit(exit::REJECTED);
    let after = h.sims.revkeen.stats();
    assert_eq!(after.writes() - before.writes(), 1);
    assert_eq!(
        h.sims.practicehub.requests().len(),
        3,
        "a full scan of 250 patients is 3 pages"
    );
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_patient_is_marked_deleted_and_never_created() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(120, 31);
    h.once().await.assert_exit(exit::REJECTED);
    let expected = expected_practicehub(&h.sims.practicehub);
    let synced: i64 = expected
        .keys()
        .next()
        .expect("a patient")
        .parse()
        .expect("id");
    assert!(h.sims.practicehub.soft_delete(synced));
    // A new patient who is already deleted: nothing to create.
    let mut ghost = h.sims.practicehub.patient(synced).expect("exists");
    ghost["id"] = json!(999);
    ghost["email"] = json!("ghost@example.com");
    h.sims.practicehub.put_patient(ghost);
    assert!(
        h.sims
            .practicehub
            .update_patient(999, json!({"deleted": true}))
    );

    h.once().await.assert_exit(exit::REJECTED);
    let customer = h
        .sims
        .revkeen
        .customer("practicehub", &synced.to_string())
        .expect("still at RevKeen");
    assert_eq!(
        customer.fields["metadata"]["source_status"], "deleted",
        "{customer:?}"
    );
    assert!(h.sims.revkeen.customer("practicehub", "999").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_clinical_data_leaves_the_clinic_or_reaches_the_state_file() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(200, 37);
    h.once().await.assert_exit(exit::REJECTED);

    let patients = h.sims.practicehub.patients();
    let notes: Vec<String> = patients
        .iter()
        .filter_map(|p| p["note"].as_str())
        .filter(|note| !note.is_empty())
        .map(str::to_string)
        .collect();
    assert!(!notes.is_empty());
    let bodies: Vec<String> = h
        .sims
        .revkeen
        .requests()
        .into_iter()
        .filter_map(|r| r.body)
        .collect();
    assert!(!bodies.is_empty());
    for body in &bodies {
        for word in ["note", "date_of_birth", "custom_reference"] {
            assert!(!body.contains(word), "{word} sent to RevKeen: {body}");
        }
        for note in &notes {
            assert!(
                !body.contains(note.as_str()),
                "a clinical note was sent: {note}"
            );
        }
    }
    let stored = state_bytes(&h.state);
    for fragment in ["back pain", "latex", "amlodipine", "Pregnant", "ACL"] {
        assert!(
            !stored.contains(fragment),
            "clinical text {fragment:?} is in the state file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_sends_and_writes_nothing() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    h.sims.wodify.seed(150, 41);
    let expected = expected_wodify(&h.sims.wodify);
    // The pinned form and the short one.
    for args in [&["--once", "--dry-run"][..], &["--dry-run"]] {
        let out = h.run(args).await;
        out.assert_exit(exit::OK);
        let creates = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("create"))
            .count();
        assert_eq!(creates, expected.len(), "{args:?}: {}", out.transcript());
        assert_eq!(h.sims.revkeen.stats().requests, 0, "{args:?}");
        assert!(!h.state.exists(), "{args:?} created a state file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_flag_limits_the_run_to_that_source() {
    let h = Harness::start().await;
    h.sims.wodify.seed(120, 43);
    h.sims.practicehub.seed(80, 43);
    h.run(&["--once", "--source", "clinic"])
        .await
        .assert_exit(exit::REJECTED);
    assert_eq!(h.sims.wodify.stats().requests, 0);
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );

    // An unknown source is a usage error (exit 2) that names the configured ones.
    let out = h.run(&["--once", "--source", "nope"]).await;
    out.assert_exit(2);
    assert!(
        out.stderr.contains("nope") && out.stderr.contains("gym, clinic"),
        "{}",
        out.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_number_scan_delivers_the_same() {
    let h = Harness::start().await;
    h.write_config(&with_source(
        &h.config_for("gym"),
        "gym",
        "scan = \"pages\"",
    ));
    h.sims.wodify.seed(250, 47);
    h.once().await.assert_exit(exit::REJECTED);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert!(
        h.sims
            .wodify
            .requests()
            .iter()
            .all(|r| r.path_and_query.starts_with("/clients?")),
        "{:?}",
        h.sims.wodify.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_state_file_is_refused() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 300, 53);
    h.sims.revkeen.set_faults(sync_daemon_sim::Faults {
        latency_ms: 300,
        ..Default::default()
    });
    let first = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    wait_until(
        "the first run to send",
        std::time::Duration::from_secs(30),
        || revkeen.stats().requests >= 1,
    )
    .await;
    let second = h.once().await;
    assert_eq!(
        second.code,
        Some(exit::TEMPFAIL),
        "a second sender on the same state file must be refused with 75\n{}",
        second.transcript()
    );
    assert!(
        second.stderr.contains("in use"),
        "the refusal says why:\n{}",
        second.transcript()
    );
    first.finish().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_once_finishes_what_is_in_flight_prints_the_summary_and_exits_143_or_130() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 300, 54);
    h.sims.revkeen.set_faults(sync_daemon_sim::Faults {
        latency_ms: 300,
        ..Default::default()
    });
    // Every client changes before each run, so that each has sends to make whatever the runs
    // before it delivered: with every batch in flight at once, an interrupted run can still
    // deliver them all.
    let change_every_client = |last_name: &str| {
        for id in client_ids(&h.sims.wodify) {
            rename_client(&h.sims.wodify, id, last_name);
        }
    };
    for (signal, code, last_name) in [
        (libc::SIGTERM, exit::TERMINATED, "Terminated"),
        (libc::SIGINT, exit::INTERRUPTED, "Interrupted"),
    ] {
        change_every_client(last_name);
        let running = h.spawn_once();
        let (revkeen, before) = (h.sims.revkeen.clone(), h.sims.revkeen.stats().requests);
        wait_until(
            "the run to send",
            std::time::Duration::from_secs(30),
            || revkeen.stats().requests > before,
        )
        .await;
        running.signal(signal);
        let out = running.finish().await;
        out.assert_exit(code);
        assert!(
            out.stdout.contains("SOURCE") && out.stderr.contains("run stopped early: stopped by"),
            "{}",
            out.transcript()
        );
        eprintln!(
            "signal {signal}: exit {:?} after {:.1?}",
            out.code, out.elapsed
        );
    }
    // A second signal does not wait for anything.
    change_every_client("Signalled");
    let running = h.spawn_once();
    let (revkeen, before) = (h.sims.revkeen.clone(), h.sims.revkeen.stats().requests);
    wait_until(
        "the run to send",
        std::time::Duration::from_secs(30),
        || revkeen.stats().requests > before,
    )
    .await;
    running.signal(libc::SIGTERM);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    running.signal(libc::SIGTERM);
    let out = running.finish().await;
    out.assert_exit(exit::TERMINATED);
    assert!(
        out.stderr.contains("SIGTERM again: exiting now"),
        "{}",
        out.transcript()
    );

    // Nothing was lost.
    h.sims
        .revkeen
        .set_faults(sync_daemon_sim::Faults::default());
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}
