//! Source lifecycle, as RevKeen and the operator see it: a Wodify client deactivated or
//! suspended, and a PracticeHub patient made inactive or soft-deleted, reach RevKeen as an
//! update of the existing customer carrying `metadata.source_status`; a patient deleted before
//! RevKeen ever had it (even one whose create was still waiting in the outbox) never becomes a
//! customer; and a Wodify client that disappears from a complete scan is counted and named
//! (log, `--once` summary, `status`, `status --json`) but left in RevKeen.

use serde_json::{Value, json};
use sync_daemon_sim::Faults;

use crate::support::{
    Harness, client_ids, exit, expected_practicehub, seed_valid_clients, with_revkeen,
};

/// The `metadata.source_status` RevKeen holds for a customer, or `None` if it has none.
fn source_status(h: &Harness, source: &str, id: &str) -> Option<String> {
    h.sims.revkeen.customer(source, id).and_then(|c| {
        c.fields
            .get("metadata")?
            .get("source_status")?
            .as_str()
            .map(str::to_string)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_and_suspended_wodify_clients_are_updated_with_their_status() {
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 60, 83);
    let active: Vec<i64> = h
        .sims
        .wodify
        .clients()
        .iter()
        .filter(|c| c["client_status"] == "Active")
        .filter_map(|c| c["id"].as_i64())
        .take(2)
        .collect();
    let [inactive, suspended] = active[..] else {
        panic!("the seed should hold two active clients");
    };
    h.once().await.assert_exit(exit::OK);
    for id in [inactive, suspended] {
        assert_eq!(
            source_status(&h, "wodify", &id.to_string()).as_deref(),
            Some("Active")
        );
    }
    let before = |id: i64| {
        h.sims
            .revkeen
            .customer("wodify", &id.to_string())
            .expect("synced")
    };
    let (inactive_before, suspended_before) = (before(inactive), before(suspended));

    assert!(h.sims.wodify.update_client(
        inactive,
        json!({"client_status_id": 11, "client_status": "Inactive"})
    ));
    assert!(h.sims.wodify.update_client(
        suspended,
        json!({"client_status_id": 12, "client_status": "Suspended"})
    ));
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    let stats = h.sims.revkeen.stats();
    assert_eq!(
        (stats.created, stats.updated),
        (0, 2),
        "two updates of existing customers: {stats:?}"
    );
    for (id, status, was) in [
        (inactive, "Inactive", &inactive_before),
        (suspended, "Suspended", &suspended_before),
    ] {
        let customer = h
            .sims
            .revkeen
            .customer("wodify", &id.to_string())
            .expect("still at RevKeen");
        assert_eq!(customer.id, was.id, "{id}: the same RevKeen customer");
        assert_eq!(customer.writes, 2, "{id}");
        assert_eq!(
            customer.fields["metadata"]["source_status"], status,
            "{id}: {customer:?}"
        );
        assert_eq!(customer.fields["email"], was.fields["email"]);
        assert_eq!(customer.fields["name"], was.fields["name"]);
    }

    // Reactivated: back to Active, once more an update.
    assert!(h.sims.wodify.update_client(
        suspended,
        json!({"client_status_id": 10, "client_status": "Active"})
    ));
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    assert_eq!(h.sims.revkeen.stats().writes(), 1);
    assert_eq!(
        source_status(&h, "wodify", &suspended.to_string()).as_deref(),
        Some("Active")
    );
}

/// A patient with a valid email, active and not deleted.
fn patient(id: i64) -> Value {
    json!({
        "id": id,
        "patient_number": format!("P{id:05}"),
        "first_name": "Grace",
        "last_name": format!("Hopper{id}"),
        "email": format!("grace{id}@example.co.uk"),
        "mobile": "07911 123456",
        "note": "",
        "date_of_birth": "1906-12-09",
        "created": "2024-03-01T09:00:00+00:00",
        "updated": "2025-06-01T09:00:00+00:00",
        "deleted": false,
        "active": true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn practicehub_inactive_and_deleted_patients_update_the_customer_and_never_create_one() {
    const DELETED_LATER: i64 = 501;
    const INACTIVE_LATER: i64 = 502;
    const DELETED_FROM_THE_START: i64 = 503;
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("clinic"));
    h.sims.practicehub.seed(40, 89);
    for id in [DELETED_LATER, INACTIVE_LATER, DELETED_FROM_THE_START] {
        h.sims.practicehub.put_patient(patient(id));
    }
    assert!(
        h.sims
            .practicehub
            .update_patient(DELETED_FROM_THE_START, json!({"deleted": 1}))
    );
    h.once().await.assert_exit(exit::REJECTED);
    for id in [DELETED_LATER, INACTIVE_LATER] {
        assert_eq!(
            source_status(&h, "practicehub", &id.to_string()).as_deref(),
            Some("active")
        );
    }
    assert!(
        h.sims
            .revkeen
            .customer("practicehub", &DELETED_FROM_THE_START.to_string())
            .is_none(),
        "a patient deleted before it was ever synced became a RevKeen customer"
    );

    assert!(h.sims.practicehub.soft_delete(DELETED_LATER));
    assert!(
        h.sims
            .practicehub
            .update_patient(INACTIVE_LATER, json!({"active": 0}))
    );
    // Still deleted, but changed: still nothing to create.
    assert!(
        h.sims
            .practicehub
            .update_patient(DELETED_FROM_THE_START, json!({"last_name": "Changed"}))
    );
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::REJECTED);
    let stats = h.sims.revkeen.stats();
    assert_eq!(
        (stats.created, stats.updated),
        (0, 2),
        "two updates, no create: {stats:?}"
    );
    for (id, status) in [(DELETED_LATER, "deleted"), (INACTIVE_LATER, "inactive")] {
        let customer = h
            .sims
            .revkeen
            .customer("practicehub", &id.to_string())
            .expect("kept at RevKeen");
        assert_eq!(
            customer.fields["metadata"]["source_status"], status,
            "{id}: {customer:?}"
        );
        assert_eq!(customer.writes, 2, "{id}");
        assert_eq!(customer.fields["email"], format!("grace{id}@example.co.uk"));
    }
    assert!(
        h.sims
            .revkeen
            .customer("practicehub", &DELETED_FROM_THE_START.to_string())
            .is_none()
    );
    assert!(
        !h.sims.revkeen.requests().iter().any(|r| r
            .body
            .as_deref()
            .unwrap_or("")
            .contains("Changed")),
        "the deleted, never-synced patient was sent"
    );

    // Nothing changed: a deleted customer is not sent again.
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_deleted_while_its_create_waited_in_the_outbox_is_never_created() {
    const NEW: i64 = 601;
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&with_revkeen(&h.config_for("clinic"), "max_attempts = 2"));
    h.sims.practicehub.seed(20, 97);
    h.once().await.assert_exit(exit::REJECTED);
    let known = expected_practicehub(&h.sims.practicehub);

    // A new patient is queued while RevKeen is down …
    h.sims.practicehub.put_patient(patient(NEW));
    assert!(
        h.sims
            .practicehub
            .update_patient(NEW, json!({"last_name": "Queued"}))
    );
    h.sims.revkeen.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    h.once().await.assert_exit(exit::UNAVAILABLE);
    assert!(
        h.sims
            .revkeen
            .customer("practicehub", &NEW.to_string())
            .is_none()
    );

    // … and deleted at the clinic before RevKeen comes back.
    assert!(h.sims.practicehub.soft_delete(NEW));
    h.sims.revkeen.set_faults(Faults::default());
    h.sims.revkeen.clear_log();
    let out = h.once().await;
    assert!(
        h.sims
            .revkeen
            .customer("practicehub", &NEW.to_string())
            .is_none(),
        "a patient deleted before RevKeen ever had it was created; RevKeen received {:#?}\n{}",
        h.sims
            .revkeen
            .requests()
            .iter()
            .map(|r| (&r.path, r.status, &r.body))
            .collect::<Vec<_>>(),
        out.transcript()
    );
    assert_eq!(
        h.sims.revkeen.stats().requests,
        0,
        "nothing is left to send: {:?}",
        h.sims.revkeen.requests()
    );
    out.assert_exit(exit::REJECTED);
    assert_eq!(
        h.sims.revkeen.customers("practicehub").len(),
        known.len(),
        "the other patients are untouched"
    );
}

/// `status --json`'s `vanished` for `source`.
async fn vanished(h: &Harness, source: &str) -> u64 {
    let report = h.status_json().await;
    report["sources"]
        .as_array()
        .and_then(|sources| sources.iter().find(|s| s["name"] == source))
        .and_then(|s| s["vanished"].as_u64())
        .unwrap_or_else(|| panic!("no vanished count for {source}: {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wodify_clients_gone_from_a_complete_scan_are_counted_named_and_kept_in_revkeen() {
    const GONE: [i64; 2] = [10_011, 10_042];
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 60, 101);
    h.once().await.assert_exit(exit::OK);
    assert_eq!(vanished(&h, "gym").await, 0);
    let first_gone = h.sims.wodify.client(GONE[0]).expect("seeded");

    for id in GONE {
        assert!(h.sims.wodify.remove_client(id));
    }
    h.sims.revkeen.clear_log();
    let out = h.once().await;
    out.assert_exit(exit::OK);
    for id in GONE {
        assert!(
            out.stderr
                .lines()
                .any(|line| line.contains("vanished") && line.contains(&id.to_string())),
            "the log should name vanished client {id}\n{}",
            out.transcript()
        );
        let customer = h
            .sims
            .revkeen
            .customer("wodify", &id.to_string())
            .expect("a vanished client stays in RevKeen");
        assert_eq!(customer.writes, 1, "{id} was not written again");
    }
    assert!(
        out.stdout.contains("2 records vanished"),
        "the summary counts them:\n{}",
        out.transcript()
    );
    assert_eq!(h.sims.revkeen.stats().requests, 0, "nothing sent for them");
    assert_eq!(vanished(&h, "gym").await, 2);
    let status = h.run(&["status"]).await;
    status.assert_exit(exit::OK);
    assert!(
        status.stdout.contains("2 records vanished"),
        "{}",
        status.transcript()
    );

    // Still gone on the next complete scan: still counted.
    h.once().await.assert_exit(exit::OK);
    assert_eq!(vanished(&h, "gym").await, 2);

    // One comes back: it is no longer counted.
    h.sims.wodify.put_client(first_gone);
    h.once().await.assert_exit(exit::OK);
    assert_eq!(vanished(&h, "gym").await, 1);
    assert_eq!(
        h.sims.revkeen.customers("wodify").len(),
        60,
        "every client, present or vanished, is still at RevKeen"
    );
}

/// An unchanged rescan writes nothing per record (issue 14): the ids a scan lists are kept in
/// memory, and a poll that stops mid-scan saves them for the poll that continues the scan. A
/// kill loses them: that scan cannot tell what vanished, says so, and the next one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_killed_midway_still_names_vanished_clients_one_scan_later() {
    const CLIENTS: usize = 3_000; // 30 pages: past the 20 unchanged pages a cursor may wait
    let h = Harness::start().await;
    h.unlimited();
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, CLIENTS, 211);
    h.once().await.assert_exit(exit::OK);
    let ids = client_ids(&h.sims.wodify);
    // One client on the pages before the kill, one after.
    let gone = [ids[450], ids[2_650]];
    for id in gone {
        assert!(h.sims.wodify.remove_client(id));
    }
    let named = |out: &crate::support::Output, id: i64| {
        out.stderr
            .lines()
            .any(|line| line.contains("vanished") && line.contains(&id.to_string()))
    };

    // Killed on page 25 of the rescan: its cursor was saved at page 20, its ids are lost.
    h.sims.wodify.set_faults(Faults {
        latency_ms: 20,
        ..Faults::default()
    });
    let before = h.sims.wodify.stats().requests;
    let wodify = h.sims.wodify.clone();
    h.spawn_once()
        .kill_when(move || wodify.stats().requests >= before + 25)
        .await;
    h.sims.wodify.set_faults(Faults::default());

    // It resumes, completes the scan without the first pages' ids (and says so), then reads
    // the first pages again and saves their ids where it stops.
    let resumed = h.once().await;
    resumed.assert_exit(exit::OK);
    assert!(
        resumed
            .stderr
            .contains("vanished records are looked for at the end of the next one"),
        "{}",
        resumed.transcript()
    );
    assert!(
        !gone.iter().any(|&id| named(&resumed, id)),
        "{}",
        resumed.transcript()
    );
    assert_eq!(vanished(&h, "gym").await, 0);

    // The next run continues that scan with them: both are named, nothing else is.
    let next = h.once().await;
    next.assert_exit(exit::OK);
    for id in gone {
        assert!(named(&next, id), "{id} is named\n{}", next.transcript());
    }
    assert!(
        next.stdout.contains("2 records vanished"),
        "{}",
        next.transcript()
    );
    assert_eq!(vanished(&h, "gym").await, 2);
    assert_eq!(
        h.sims.revkeen.customers("wodify").len(),
        CLIENTS,
        "vanished clients stay in RevKeen"
    );
}
