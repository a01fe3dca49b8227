//! Records that cannot be delivered are never dropped silently: a client without an email and a
//! customer RevKeen refuses both end the run with exit 65 and are listed in the state file with
//! their reason (RevKeen's code, message, HTTP status and field errors for a refusal), whether
//! the customer went out as a single upsert or inside a batch. A fixed source record is sent on
//! the next run and leaves the list.

use serde_json::json;
use sync_daemon::store::FailureKind;
use sync_daemon_sim::revkeen::Rejection;

use crate::support::{
    Harness, assert_revkeen_holds, exit, expected_wodify, seed_valid_clients, seed_valid_patients,
    with_revkeen,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_email_is_listed_with_reason_and_hint_until_fixed() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 150, 11);
    let id = 10_042;
    let mut client = h.sims.wodify.client(id).expect("seeded");
    client["email"] = json!("");
    h.sims.wodify.put_client(client);

    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    let failures = h.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let failure = &failures[0];
    assert_eq!(failure.source, "gym");
    assert_eq!(failure.external_id, id.to_string());
    assert_eq!(failure.kind, FailureKind::Rejected);
    assert!(
        failure.reason.contains("no email"),
        "reason: {:?}",
        failure.reason
    );
    assert!(
        failure.hint.as_deref().is_some_and(|hint| !hint.is_empty()),
        "a failure says what to do: {failure:?}"
    );
    assert!(h.sims.revkeen.customer("wodify", &id.to_string()).is_none());
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));

    // Fixed at the source: sent on the next run, and the failure is gone.
    assert!(
        h.sims
            .wodify
            .update_client(id, json!({"email": "fixed.member@example.com"}))
    );
    h.once().await.assert_exit(exit::OK);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    let customer = h
        .sims
        .revkeen
        .customer("wodify", &id.to_string())
        .expect("delivered once it has an email");
    assert_eq!(customer.fields["email"], "fixed.member@example.com");
}

const REFUSED_ID: i64 = 10_077;
const MESSAGE: &str = "email domain is not accepted for this merchant";

fn rejection() -> Rejection {
    Rejection {
        external_id: Some(REFUSED_ID.to_string()),
        email: None,
        status: 422,
        code: "validation_error".to_string(),
        message: MESSAGE.to_string(),
        field: Some("email".to_string()),
    }
}

/// Seeds valid clients, makes RevKeen refuse one, runs once with `batch_size`.
async fn run_with_refusal(batch_size: usize) -> Harness {
    let h = Harness::start().await;
    h.write_config(&with_revkeen(
        &h.config_for("gym"),
        &format!("batch_size = {batch_size}"),
    ));
    seed_valid_clients(&h.sims.wodify, 150, 13);
    h.sims.revkeen.set_rejections(vec![rejection()]);
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    assert!(h.sims.revkeen.stats().rejected >= 1);

    // Everyone else is delivered.
    let mut expected = expected_wodify(&h.sims.wodify);
    expected.remove(&REFUSED_ID.to_string());
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected);
    h
}

#[track_caller]
fn the_dead_letter(h: &Harness) -> sync_daemon::store::Failure {
    let failures = h.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let failure = failures.into_iter().next().expect("one failure");
    assert_eq!(failure.external_id, REFUSED_ID.to_string());
    assert_eq!(failure.kind, FailureKind::DeadLetter);
    assert_eq!(failure.code, "validation_error");
    assert!(failure.reason.contains(MESSAGE), "{failure:?}");
    assert!(failure.hint.is_some(), "{failure:?}");
    failure
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_upsert_refusal_is_a_dead_letter_with_status_and_field_errors() {
    let h = run_with_refusal(1).await;
    let failure = the_dead_letter(&h);
    assert_eq!(failure.http_status, Some(422));
    assert_eq!(failure.field_errors, Some(json!({"email": MESSAGE})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_item_refusal_is_a_dead_letter_with_code_and_message() {
    let h = run_with_refusal(100).await;
    assert!(h.sims.revkeen.stats().batch_requests >= 1);
    the_dead_letter(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_not_resent_until_its_record_changes() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 80, 19);
    let id = 10_033;
    let refused_email = h.sims.wodify.client(id).expect("seeded")["email"]
        .as_str()
        .expect("email")
        .to_string();
    h.sims.revkeen.set_rejections(vec![Rejection {
        external_id: None,
        email: Some(refused_email),
        status: 422,
        code: "email_blocked".to_string(),
        message: "this address bounced".to_string(),
        field: Some("email".to_string()),
    }]);
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.failures().len(), 1);

    // Unchanged: not sent again, still listed.
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
    assert_eq!(h.failures().len(), 1);

    // Fixed at the source: sent, and no longer listed.
    assert!(
        h.sims
            .wodify
            .update_client(id, json!({"email": "working.address@example.com"}))
    );
    h.once().await.assert_exit(exit::OK);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_command_lists_what_the_summary_points_to() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    h.sims.wodify.seed(100, 1);
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    assert!(out.stdout.contains("see `sync-daemon failures`"));
    let listed = h.run(&["failures"]).await;
    listed.assert_exit(exit::OK);
    for failure in h.failures() {
        assert!(
            listed.stdout.contains(&failure.external_id),
            "{} missing from `failures`:\n{}",
            failure.external_id,
            listed.transcript()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_patient_deleted_at_the_clinic_is_no_longer_a_failure() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    seed_valid_patients(&h.sims.practicehub, 40, 61);
    assert!(h.sims.practicehub.update_patient(7, json!({"email": null})));
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.failures().len(), 1, "{:?}", h.failures());

    assert!(h.sims.practicehub.soft_delete(7));
    let out = h.once().await;
    assert!(
        h.failures().is_empty(),
        "a deleted patient has nothing left to fix, yet is still listed: {:?}",
        h.failures()
    );
    out.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_client_deleted_at_the_gym_is_no_longer_a_failure() {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, 40, 67);
    assert!(h.sims.wodify.update_client(10_007, json!({"email": ""})));
    h.once().await.assert_exit(exit::REJECTED);
    assert_eq!(h.failures().len(), 1);

    assert!(h.sims.wodify.remove_client(10_007));
    let out = h.once().await;
    assert!(
        h.failures().is_empty(),
        "a client that no longer exists is still listed: {:?}",
        h.failures()
    );
    out.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reads_the_same_whether_batched_or_not() {
    let single = the_dead_letter(&run_with_refusal(1).await);
    let batched = the_dead_letter(&run_with_refusal(100).await);
    assert_eq!(
        (batched.http_status, &batched.field_errors),
        (single.http_status, &single.field_errors),
        "batched: {batched:?}\nsingle: {single:?}"
    );
}
