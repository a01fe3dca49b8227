//! A PracticeHub server that ignores the `updated=gte:` filter (the documented failure mode:
//! invalid filters are silently ignored) costs full scans but changes nothing a user sees: the
//! same customers with the same data and the same number of writes as against a server that
//! honours it, and the warning "ignored the updated filter" exactly once per poll — in
//! `--once` runs and across the scheduled polls of one daemon process.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::support::{Harness, Output, exit, expected_practicehub, names_source, replaced};

const WARNING: &str = "ignored the updated filter";

/// A clinic-only harness with 250 patients (three pages); `ignoring` switches the filter off.
async fn clinic(ignoring: bool) -> Harness {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(250, 29);
    h.sims.practicehub.set_ignore_filters(ignoring);
    h
}

/// Every field RevKeen holds for each practicehub customer.
fn revkeen_fields(h: &Harness) -> BTreeMap<String, Map<String, Value>> {
    h.sims
        .revkeen
        .customers("practicehub")
        .into_iter()
        .map(|c| (c.external_id, c.fields))
        .collect()
}

fn warnings(out: &Output) -> usize {
    out.stderr.matches(WARNING).count()
}

/// Runs `--once` on both harnesses; returns (normal, ignoring) outputs and writes.
async fn both_once(normal: &Harness, ignoring: &Harness) -> [(Output, u64); 2] {
    let mut results = Vec::new();
    for h in [normal, ignoring] {
        h.sims.revkeen.clear_log();
        h.sims.practicehub.clear_log();
        let out = h.once().await;
        out.assert_exit(exit::REJECTED);
        results.push((out, h.sims.revkeen.stats().writes()));
    }
    results.try_into().expect("two results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_the_filter_gives_identical_results_and_one_warning_per_poll() {
    let normal = clinic(false).await;
    let ignoring = clinic(true).await;

    // Backfill: no filter is sent yet, so nothing to warn about.
    let [(n, n_writes), (i, i_writes)] = both_once(&normal, &ignoring).await;
    assert_eq!(warnings(&n), 0, "{}", n.transcript());
    assert_eq!(warnings(&i), 0, "{}", i.transcript());
    assert_eq!(n_writes, i_writes);
    assert_eq!(revkeen_fields(&normal), revkeen_fields(&ignoring));

    // The same changes on both, with the same `updated` stamp: renamed, a new phone, deleted,
    // made inactive, and a new patient.
    let stamp = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string();
    let ids: Vec<i64> = expected_practicehub(&normal.sims.practicehub)
        .keys()
        .map(|id| id.parse().expect("id"))
        .collect();
    let patches = [
        (ids[3], json!({"last_name": "Renamed"})),
        (ids[90], json!({"mobile": "07911 123457"})),
        (ids[150], json!({"deleted": true})),
        (ids[200], json!({"active": false})),
    ];
    for h in [&normal, &ignoring] {
        for (id, patch) in &patches {
            let mut patient = h.sims.practicehub.patient(*id).expect("seeded");
            for (key, value) in patch.as_object().expect("object") {
                patient[key] = value.clone();
            }
            patient["updated"] = json!(stamp);
            h.sims.practicehub.put_patient(patient);
        }
        let mut new = h.sims.practicehub.patient(ids[0]).expect("seeded");
        new["id"] = json!(5000);
        new["email"] = json!("new.patient5000@example.co.uk");
        new["updated"] = json!(stamp);
        h.sims.practicehub.put_patient(new);
    }
    let [(n, n_writes), (i, i_writes)] = both_once(&normal, &ignoring).await;
    assert_eq!(warnings(&n), 0, "{}", n.transcript());
    assert_eq!(
        warnings(&i),
        1,
        "one warning for the poll, not one per page:\n{}",
        i.transcript()
    );
    assert_eq!(
        normal.sims.practicehub.requests().len(),
        1,
        "the normal server is read incrementally"
    );
    assert_eq!(
        ignoring.sims.practicehub.requests().len(),
        3,
        "the ignoring server costs a full scan"
    );
    assert_eq!(n_writes, 5, "four changes and one new patient");
    assert_eq!(i_writes, n_writes, "the full scan writes only the changes");
    let (n_fields, i_fields) = (revkeen_fields(&normal), revkeen_fields(&ignoring));
    let differing: Vec<&String> = n_fields
        .keys()
        .chain(i_fields.keys())
        .filter(|id| n_fields.get(*id) != i_fields.get(*id))
        .collect();
    assert!(
        differing.is_empty(),
        "RevKeen holds other data for {differing:?}"
    );
    assert_eq!(
        n_fields[&ids[150].to_string()]["metadata"]["source_status"],
        "deleted"
    );

    // Nothing changed: still one warning per poll, and no writes.
    let [(n, n_writes), (i, i_writes)] = both_once(&normal, &ignoring).await;
    assert_eq!((n_writes, i_writes), (0, 0));
    assert_eq!(warnings(&n), 0);
    assert_eq!(warnings(&i), 1, "{}", i.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_warns_once_per_poll_about_an_ignored_filter() {
    let h = clinic(true).await;
    let config = replaced(
        &h.config_for("clinic"),
        "schedule = \"0 */5 * * * *\"",
        "schedule = \"*/2 * * * * *\"",
    );
    let daemon = h.spawn_daemon(&config, |_| {});
    daemon.wait_ready().await;
    daemon.wait_polls("clinic", 4).await;
    let out = daemon.stop().await;
    out.assert_exit(exit::OK);

    // Warnings between consecutive finished polls; polls never overlap.
    let mut per_poll = Vec::new();
    let mut seen = 0;
    for line in out.stderr.lines() {
        if line.contains(WARNING) {
            seen += 1;
        }
        if line.contains("Poll finished.") && names_source(line, "clinic") {
            per_poll.push(seen);
            seen = 0;
        }
    }
    let expected: Vec<usize> = (0..per_poll.len()).map(|n| usize::from(n > 0)).collect();
    assert_eq!(
        per_poll, expected,
        "the first poll lists everything (no filter); every later one warns once\n{}",
        out.stderr
    );
}
