//! DESIGN invariant 7, "no PHI leaves a clinic", observed from outside: PracticeHub patients
//! whose clinical note, date of birth, address and other extra attributes carry unique marker
//! strings are synced (created, updated, deleted, rejected, dead-lettered, pushed), and no
//! marker appears in any RevKeen request, in any table or raw byte of the state file (its WAL
//! included, read while the daemon runs), in any log line at TRACE level (text and JSON), or in
//! the output of `status`, `failures` and `--dry-run` in each of their forms. A config that
//! points a patient field at a PHI attribute is refused with exit 78.

use serde_json::{Value, json};
use sync_daemon_sim::revkeen::Rejection;

use crate::support::{
    Harness, Output, exit, push, state_bytes, state_values, unix_now, wait_until, with_daemon,
    with_source, yearly_schedules,
};

/// Prefixes of every marker planted in a PHI attribute; none may appear anywhere.
const MARKERS: &[&str] = &[
    "phinote",
    "phiaddr",
    "phiref",
    "phiallergy",
    "phipostcode",
    "1823-07-",
];

/// A patient with valid billing fields and PHI carrying markers in every other attribute.
fn phi_patient(id: i64, round: &str) -> Value {
    json!({
        "id": id,
        "patient_number": format!("P{id:05}"),
        "custom_reference": format!("PHIREF{id}{round}"),
        "first_name": "Ada",
        "last_name": format!("Byron{id}{round}"),
        "email": format!("ada.byron{id}@example.co.uk"),
        "mobile": "07911 123456",
        "home_phone": null,
        "note": format!("<p>Lumbar pain PHINOTE{id}{round}; on amlodipine</p>"),
        "date_of_birth": format!("1823-07-{:02}", 10 + id % 18),
        "address": format!("PHIADDR{id}{round}, 221B Baker Street, London"),
        "postcode": format!("PHIPOSTCODE{id}"),
        "allergies": format!("PHIALLERGY{id}{round}: latex"),
        "created": "2024-03-01T09:00:00+00:00",
        "updated": "2025-06-01T09:00:00+00:00",
        "deleted": false,
        "active": true,
    })
}

/// Fails if any marker appears in `text` (case-insensitively).
#[track_caller]
fn assert_no_phi(what: &str, text: &str) {
    let lower = text.to_lowercase();
    for marker in MARKERS {
        if let Some(at) = lower.find(marker) {
            let start = lower[..at]
                .char_indices()
                .rev()
                .nth(120)
                .map_or(0, |(i, _)| i);
            let end = (at + 120).min(lower.len());
            let end = (end..=lower.len())
                .find(|&i| lower.is_char_boundary(i))
                .unwrap_or(lower.len());
            panic!(
                "PHI marker {marker:?} found in {what}: …{}…",
                &text[start..end]
            );
        }
    }
}

#[track_caller]
fn assert_output_has_no_phi(what: &str, out: &Output) {
    assert_no_phi(&format!("{what} stdout"), &out.stdout);
    assert_no_phi(&format!("{what} stderr"), &out.stderr);
}

/// Patients 1001‥1006 carry markers; each takes a different path through the daemon.
const SYNCED: i64 = 1001;
const INACTIVE: i64 = 1002;
const NO_EMAIL: i64 = 1003;
const REFUSED: i64 = 1004;
const DELETED_EARLY: i64 = 1005;
const BAD_PHONE: i64 = 1006;

fn plant_phi_patients(h: &Harness) {
    for id in SYNCED..=BAD_PHONE {
        h.sims.practicehub.put_patient(phi_patient(id, "A"));
    }
    assert!(
        h.sims
            .practicehub
            .update_patient(INACTIVE, json!({"active": false}))
    );
    assert!(
        h.sims
            .practicehub
            .update_patient(NO_EMAIL, json!({"email": null}))
    );
    assert!(
        h.sims
            .practicehub
            .update_patient(DELETED_EARLY, json!({"deleted": 1}))
    );
    assert!(
        h.sims
            .practicehub
            .update_patient(BAD_PHONE, json!({"mobile": "ring after 6"}))
    );
    h.sims.revkeen.set_rejections(vec![Rejection {
        external_id: Some(REFUSED.to_string()),
        email: None,
        status: 422,
        code: "validation_error".to_string(),
        message: "customer refused by a merchant rule".to_string(),
        field: Some("email".to_string()),
    }]);
}

/// The PracticeHub simulator hands the daemon the marked attributes: the test is only
/// meaningful if the PHI reaches the daemon in the first place.
async fn assert_sim_serves_phi(h: &Harness) {
    let answer = reqwest::Client::new()
        .get(format!(
            "{}/api/patients?id=eq:{SYNCED}",
            h.sims.practicehub_server.url()
        ))
        .header("x-practicehub-key", sync_daemon_sim::PRACTICEHUB_KEY)
        .header("x-app-details", "revkeen-sync=ops@clinic.example")
        .send()
        .await
        .expect("GET from the PracticeHub simulator")
        .text()
        .await
        .expect("a body");
    for marker in [
        format!("PHINOTE{SYNCED}A"),
        format!("PHIADDR{SYNCED}A"),
        "1823-07-".to_string(),
    ] {
        assert!(answer.contains(&marker), "{marker} not served: {answer}");
    }
}

/// Runs every read-only command an operator might use and checks none prints PHI; returns
/// the `failures --json` output for further checks.
async fn operator_commands_show_no_phi(h: &Harness) -> String {
    let mut failures = String::new();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["failures"],
        &["failures", "--json"],
        &["failures", "--source", "clinic", "--json"],
    ] {
        let out = h.run(args).await;
        assert!(
            matches!(out.code, Some(0) | Some(65)),
            "{args:?} failed\n{}",
            out.transcript()
        );
        assert_output_has_no_phi(&format!("{args:?}"), &out);
        if args == ["failures", "--json"] {
            failures = out.stdout.clone();
        }
    }
    failures
}

/// Every `--dry-run` form.
const ALL_DRY_RUNS: &[&[&str]] = &[
    &["--dry-run"],
    &["--dry-run", "--verbose"],
    &["--dry-run", "--json"],
    &["--dry-run", "--verbose", "--json"],
];
/// The forms that print the bodies.
const VERBOSE_DRY_RUNS: &[&[&str]] = &[
    &["--dry-run", "--verbose"],
    &["--dry-run", "--verbose", "--json"],
];

/// Runs the `--dry-run` forms; checks none prints PHI and returns the verbose JSON lines.
async fn dry_runs_show_no_phi(h: &Harness, forms: &[&[&str]], env: &[(&str, &str)]) -> String {
    let mut verbose_json = String::new();
    for &args in forms {
        let out = h.run_with_env(args, env).await;
        out.assert_exit(exit::OK);
        assert_output_has_no_phi(&format!("{args:?}"), &out);
        if args == ["--dry-run", "--verbose", "--json"] {
            verbose_json = out.stdout.clone();
        }
    }
    verbose_json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phi_markers_reach_no_request_state_file_trace_log_or_command_output() {
    for format in ["text", "json"] {
        let h = Harness::start().await;
        h.unlimited();
        let config = with_daemon(
            &h.config_for("clinic"),
            &format!("log_level = \"trace\"\nlog_format = \"{format}\""),
        );
        h.write_config(&config);
        let env = [("RUST_LOG", "trace")];
        h.sims.practicehub.seed(60, 71);
        plant_phi_patients(&h);
        assert_sim_serves_phi(&h).await;

        // Before anything was synced: every record is a create, and the verbose forms show
        // the bodies that would be sent.
        let shown = dry_runs_show_no_phi(&h, ALL_DRY_RUNS, &env).await;
        assert!(
            shown.contains(&format!("ada.byron{SYNCED}@example.co.uk")),
            "{format}: the verbose dry run should show the body it would send:\n{shown}"
        );
        assert!(!h.state.exists(), "--dry-run wrote a state file");

        // Backfill at TRACE.
        let first = h.run_with_env(&["--once"], &env).await;
        first.assert_exit(exit::REJECTED);
        assert!(
            first.stderr.lines().count() > 20 && first.stderr.contains("TRACE"),
            "{format}: expected a TRACE log, got:\n{}",
            first.transcript()
        );
        assert_output_has_no_phi(&format!("{format} --once at TRACE"), &first);
        let customer = h
            .sims
            .revkeen
            .customer("practicehub", &SYNCED.to_string())
            .expect("the marked patient was delivered");
        assert_eq!(
            customer.fields["email"],
            format!("ada.byron{SYNCED}@example.co.uk")
        );
        assert!(
            h.sims
                .revkeen
                .customer("practicehub", &INACTIVE.to_string())
                .is_some()
        );

        // Every marked patient changes its PHI (and its name, so it is sent again); one is
        // deleted after being synced.
        for id in SYNCED..=BAD_PHONE {
            let mut patch = phi_patient(id, "B");
            for keep in [
                "id", "created", "updated", "deleted", "active", "mobile", "email",
            ] {
                patch.as_object_mut().expect("object").remove(keep);
            }
            assert!(h.sims.practicehub.update_patient(id, patch));
        }
        assert!(h.sims.practicehub.soft_delete(BAD_PHONE));
        let shown = dry_runs_show_no_phi(&h, VERBOSE_DRY_RUNS, &env).await;
        assert!(
            shown.contains(&format!("Byron{SYNCED}B")),
            "{format}: the dry run should show the changed name:\n{shown}"
        );
        let second = h.run_with_env(&["--once"], &env).await;
        second.assert_exit(exit::REJECTED);
        assert_output_has_no_phi(&format!("{format} second --once at TRACE"), &second);
        assert_eq!(
            h.sims
                .revkeen
                .customer("practicehub", &BAD_PHONE.to_string())
                .expect("synced before its deletion")
                .fields["metadata"]["source_status"],
            "deleted"
        );

        // What RevKeen received.
        let requests = h.sims.revkeen.requests();
        let bodies: Vec<&str> = requests.iter().filter_map(|r| r.body.as_deref()).collect();
        assert!(
            bodies
                .iter()
                .any(|b| b.contains(&format!("Byron{SYNCED}B"))),
            "{format}: the second run should have sent the new name"
        );
        for request in &requests {
            assert_no_phi("a RevKeen request path", &request.path);
            assert_no_phi(
                &format!("a RevKeen request body ({})", request.path),
                request.body.as_deref().unwrap_or(""),
            );
        }
        for customer in h.sims.revkeen.customers("practicehub") {
            assert_no_phi(
                &format!("RevKeen's customer {}", customer.external_id),
                &serde_json::to_string(&customer.fields).expect("json"),
            );
        }

        // What the operator commands print.
        let failures = operator_commands_show_no_phi(&h).await;
        for id in [NO_EMAIL, REFUSED] {
            assert!(
                failures.contains(&format!("\"{id}\"")),
                "{format}: {id} should be listed as a failure:\n{failures}"
            );
        }

        // What the state file holds: every text and blob value of every table, and the raw
        // bytes (free pages and any WAL included).
        let values = state_values(&h.state);
        assert!(
            values.iter().any(|(table, _, _)| table == "customers"),
            "{format}: expected customer rows in the state file"
        );
        for (table, column, value) in &values {
            assert_no_phi(&format!("state file {table}.{column}"), value);
        }
        assert_no_phi("the state file's bytes", &state_bytes(&h.state));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_patients_phi_stays_out_of_the_live_state_file_wal_log_and_metrics() {
    // Daemon mode at TRACE in JSON: the start-up poll and a pushed change go through, and the
    // WAL is read while the daemon still holds the state file (nothing checkpointed it away).
    let h = Harness::start().await;
    h.unlimited();
    let secret = "phi-push-secret-1";
    let config = with_daemon(
        &yearly_schedules(&with_source(
            &h.config_for("clinic"),
            "clinic",
            &format!("push_secret = \"{secret}\""),
        )),
        "log_level = \"trace\"\nlog_format = \"json\"",
    );
    h.sims.practicehub.seed(40, 73);
    plant_phi_patients(&h);
    let daemon = h.spawn_daemon(&config, |c| {
        c.env("RUST_LOG", "trace");
    });
    daemon.wait_ready().await;
    daemon.wait_polls("clinic", 1).await;
    let revkeen = h.sims.revkeen.clone();
    wait_until(
        "the start-up poll's patients at RevKeen",
        std::time::Duration::from_secs(30),
        || {
            revkeen
                .customer("practicehub", &SYNCED.to_string())
                .is_some()
        },
    )
    .await;

    let mut patch = phi_patient(SYNCED, "C");
    patch.as_object_mut().expect("object").remove("id");
    assert!(h.sims.practicehub.update_patient(SYNCED, patch));
    let body = format!("{{\"events\":[{{\"external_id\":{SYNCED}}}]}}");
    let signature = sync_daemon::server::sign(secret, body.as_bytes(), unix_now());
    let (status, answer) = push(&daemon, "clinic", body.as_bytes(), Some(&signature)).await;
    assert_eq!(status, 202, "{answer}");
    wait_until(
        "the pushed change at RevKeen",
        std::time::Duration::from_secs(10),
        || {
            revkeen
                .customer("practicehub", &SYNCED.to_string())
                .is_some_and(|c| c.fields["name"] == format!("Ada Byron{SYNCED}C"))
        },
    )
    .await;

    let mut wal = h.state.as_os_str().to_owned();
    wal.push("-wal");
    assert!(
        std::path::Path::new(&wal)
            .metadata()
            .is_ok_and(|m| m.len() > 0),
        "expected a live WAL next to the state file while the daemon runs"
    );
    assert_no_phi("the live state file and WAL", &state_bytes(&h.state));
    for (table, column, value) in state_values(&h.state) {
        assert_no_phi(&format!("state file {table}.{column}"), &value);
    }
    operator_commands_show_no_phi(&h).await;
    let metrics = daemon.metrics().await;
    assert!(metrics.text.contains("sync_daemon_"), "{}", metrics.text);
    assert_no_phi("/metrics", &metrics.text);
    for request in h.sims.revkeen.requests() {
        assert_no_phi(
            "a RevKeen request body",
            request.body.as_deref().unwrap_or(""),
        );
    }

    let out = daemon.stop().await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.lines().count() > 20 && out.stderr.contains("\"level\":\"TRACE\""),
        "expected a JSON TRACE log:\n{}",
        out.stderr
    );
    assert_no_phi("the daemon's TRACE log", &out.stderr);
    assert_no_phi("the daemon's stdout", &out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_pointing_a_patient_field_at_phi_is_refused() {
    let h = Harness::start().await;
    h.sims.practicehub.seed(20, 79);
    for (field, attribute) in [
        ("first_name", "note"),
        ("last_name", "notes"),
        ("phone", "date_of_birth"),
        ("first_name", "dateOfBirth"),
        ("last_name", "dob"),
        ("email", "address"),
        ("last_name", "address_line_1"),
        ("patient_number", "custom_reference"),
        ("first_name", "medical_history"),
        ("last_name", "clinical_notes"),
    ] {
        // The clinic is the last [[sources]] entry, so the table belongs to it.
        let toml = format!(
            "{}\n[sources.fields]\n{field} = \"{attribute}\"\n",
            h.config_for("clinic")
        );
        h.write_config(&toml);
        for args in [&["--once"][..], &["check-config"], &["--dry-run"]] {
            let out = h.run(args).await;
            out.assert_exit(exit::CONFIG);
            assert!(
                out.stderr.contains("fields")
                    && out.stderr.contains(field)
                    && out.stderr.contains(attribute),
                "{args:?} with {field} = {attribute:?}: the error should name the key and the attribute\n{}",
                out.transcript()
            );
        }
    }
    assert_eq!(h.sims.practicehub.stats().requests, 0);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
    assert!(!h.state.exists());

    // A billing-safe override is accepted.
    let toml = format!(
        "{}\n[sources.fields]\nphone = \"home_phone\"\n",
        h.config_for("clinic")
    );
    h.write_config(&toml);
    h.run(&["check-config"]).await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_pointing_a_patient_field_at_an_address_part_is_refused() {
    let h = Harness::start().await;
    let mut accepted = Vec::new();
    for attribute in [
        "post_code",
        "postal_code",
        "zip",
        "zipcode",
        "city",
        "town",
        "county",
        "addr1",
        "born_on",
    ] {
        h.write_config(&format!(
            "{}\n[sources.fields]\nlast_name = \"{attribute}\"\n",
            h.config_for("clinic")
        ));
        let out = h.run(&["check-config"]).await;
        if out.code != Some(exit::CONFIG) {
            accepted.push(attribute);
        }
    }
    assert!(
        accepted.is_empty(),
        "last_name may be read from these address or birth-date attributes: {accepted:?}"
    );
}
