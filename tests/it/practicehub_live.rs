//! PracticeHub as live integrations see it (the simulator's live variant: `phone`,
//! `updated_at`, `created_at` and PHI attributes, naive London times, `links.next` with
//! `?page=N` alone, a server clock off the host's): every valid patient is delivered with its
//! phone in E.164 and `external_updated_at`, the naming is told once and by `check-config
//! --connect`, a change on a server clock 10 minutes behind or ahead is delivered by the next
//! incremental run within a few pages, nothing of the PHI reaches RevKeen, the state file or the
//! output, `--resync` re-reads and re-sends everything, the filter warning fires only when the
//! filter was ignored, and the full-scan schedule finds what a cursor missed and what vanished.

use serde_json::{Value, json};
use sync_daemon::customer::{Phone, normalize_phone};

use crate::support::{
    Harness, Output, assert_revkeen_holds, exit, expected_practicehub, seed_valid_patients,
    state_bytes, with_daemon, with_source, yearly_schedules,
};

/// The app details the simulators' config sends, which must also be the User-Agent.
const APP: &str = "revkeen-sync=ops@clinic.example";

/// A clinic-only harness; `live` with the server clock `offset` seconds off the host's.
async fn clinic(live: bool, offset: i64, extra: &str) -> Harness {
    let h = Harness::start().await;
    h.unlimited();
    if live {
        h.practicehub_live(offset);
    }
    let mut config = h.config_for("clinic");
    if !extra.is_empty() {
        config = with_source(&config, "clinic", extra);
    }
    h.write_config(&config);
    h
}

/// The PracticeHub listing requests since the log was last cleared.
fn listings(h: &Harness) -> Vec<String> {
    h.sims
        .practicehub
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect()
}

fn run_ok(out: &Output) {
    out.assert_exit(exit::OK);
}

/// Markers planted in every PHI attribute of the live rows; none may appear anywhere.
const MARKERS: &[&str] = &[
    "phisex",
    "phiinsurer",
    "phinum",
    "phistreet",
    "1823-07-",
    "1999-09-09",
    "2098-08-08",
    "98765.43",
];

fn plant_phi(h: &Harness, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        let mut patient = h.sims.practicehub.patient(id).expect("seeded");
        let fields = json!({
            "sex": format!("PHISEX{id}"),
            "dob": format!("1823-07-{:02}", 10 + id % 18),
            "medical_insurance": format!("PHIINSURER{id}"),
            "total_balance": 98765.43,
            "last_apt": "1999-09-09 09:09:09",
            "next_apt": "2098-08-08 08:08:08",
            "address_num": format!("PHINUM{id}"),
            "address_str": format!("PHISTREET{id}"),
        });
        for (key, value) in fields.as_object().expect("object") {
            patient[key] = value.clone();
        }
        h.sims.practicehub.put_patient(patient);
    }
}

#[track_caller]
fn assert_no_phi(what: &str, text: &str) {
    let lower = text.to_lowercase();
    for marker in MARKERS {
        assert!(
            !lower.contains(marker),
            "PHI marker {marker:?} found in {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_patients_are_delivered_in_e164_with_their_time_and_no_phi_reaches_anything() {
    let h = clinic(true, 0, "").await;
    let config = with_daemon(&h.config_for("clinic"), "log_level = \"trace\"");
    h.write_config(&config);
    seed_valid_patients(&h.sims.practicehub, 300, 41);
    plant_phi(&h, 1..=300);

    let connect = h.run(&["check-config", "--connect"]).await;
    connect.assert_exit(exit::OK);
    assert!(
        connect.stderr.contains(
            "patients carry the names live integrations see: phone from `phone`, updated from `updated_at`, created from `created_at`; times are naive local times, read as Europe/London"
        ),
        "{}",
        connect.transcript()
    );

    let first = h.run_with_env(&["--once"], &[("RUST_LOG", "trace")]).await;
    run_ok(&first);
    let told = "patients carry the names live integrations see";
    assert_eq!(
        first.stderr.matches(told).count(),
        1,
        "{}",
        first.transcript()
    );
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    let mut phones = 0;
    for customer in h.sims.revkeen.customers("practicehub") {
        let id: i64 = customer.external_id.parse().expect("id");
        let patient = h.sims.practicehub.patient(id).expect("patient");
        let expected_phone = match normalize_phone(patient["phone"].as_str(), "GB") {
            Phone::E164(number) => Some(number),
            _ => None,
        };
        assert_eq!(
            customer.fields.get("phone").and_then(Value::as_str),
            expected_phone.as_deref(),
            "patient {id}"
        );
        phones += usize::from(expected_phone.is_some());
        let updated = h
            .sims
            .practicehub
            .parse_time(patient["updated_at"].as_str().expect("naive"))
            .expect("a time");
        assert_eq!(
            customer.fields["external_updated_at"],
            updated.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "patient {id}: the naive London time as an instant"
        );
    }
    assert!(phones > 200, "{phones} phones in E.164");
    // Every request named the app as PracticeHub's guide asks.
    for request in h.sims.practicehub.requests() {
        assert_eq!(request.user_agent.as_deref(), Some(APP), "{request:?}");
    }

    // The choice is kept: a second run neither re-decides nor repeats it.
    let second = h.run_with_env(&["--once"], &[("RUST_LOG", "trace")]).await;
    run_ok(&second);
    assert_eq!(
        second.stderr.matches(told).count(),
        0,
        "{}",
        second.transcript()
    );
    let status = h.run(&["status"]).await;
    assert!(
        status.stdout.contains("updated_at ≥ "),
        "{}",
        status.transcript()
    );

    for (what, out) in [
        ("first run", &first),
        ("second run", &second),
        ("status", &status),
    ] {
        assert_no_phi(&format!("{what} stdout"), &out.stdout);
        assert_no_phi(&format!("{what} stderr"), &out.stderr);
    }
    for request in h.sims.revkeen.requests() {
        assert_no_phi("a RevKeen request", request.body.as_deref().unwrap_or(""));
    }
    assert_no_phi("the state file", &state_bytes(&h.state));
}

/// A change made on the server's clock, `offset` seconds off the host's, and one on 150
/// patients, each delivered by the next incremental run of a 1,000-patient table.
async fn changes_follow_the_server_clock(offset: i64) {
    let h = clinic(true, offset, "full_scan_schedule = \"off\"").await;
    seed_valid_patients(&h.sims.practicehub, 1000, 43);
    run_ok(&h.once().await);
    assert_eq!(listings(&h).len(), 10, "the first run lists the table");

    let sim = &h.sims.practicehub;
    assert!(sim.update_patient(500, json!({"last_name": "Moved"})));
    let mut new = sim.patient(1).expect("seeded");
    new["id"] = json!(5000);
    new["email"] = json!("new.patient5000@example.co.uk");
    new["updated_at"] = json!(sim.format_time(sim.now()));
    sim.put_patient(new);
    sim.clear_log();
    let out = h.once().await;
    run_ok(&out);
    let pages = listings(&h);
    assert!(
        (1..=2).contains(&pages.len()),
        "offset {offset}: {pages:?}\n{}",
        out.transcript()
    );
    assert!(
        pages.iter().all(|p| p.contains("updated_at=gte%3A")),
        "every page keeps the filter: {pages:?}"
    );
    assert_eq!(
        crate::support::name_at_revkeen(&h, "practicehub", "500").as_deref(),
        Some(
            format!(
                "{} Moved",
                sim.patient(500).expect("kept")["first_name"]
                    .as_str()
                    .expect("a name")
            )
            .as_str()
        ),
        "offset {offset}\n{}",
        out.transcript()
    );
    assert!(
        h.sims.revkeen.customer("practicehub", "5000").is_some(),
        "offset {offset}: a new patient on the server's clock is delivered"
    );

    for id in 101..=250 {
        assert!(sim.update_patient(id, json!({"last_name": format!("Changed{id}")})));
    }
    sim.clear_log();
    h.sims.revkeen.clear_log();
    run_ok(&h.once().await);
    let pages = listings(&h);
    assert!(pages.len() <= 3, "offset {offset}: 150 changes: {pages:?}");
    assert!(
        pages.iter().all(|p| p.contains("updated_at=gte%3A")),
        "{pages:?}"
    );
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_a_server_clock_ten_minutes_behind_is_delivered_by_the_next_poll() {
    changes_follow_the_server_clock(-600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_a_server_clock_ten_minutes_ahead_is_delivered_by_the_next_poll() {
    changes_follow_the_server_clock(600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_re_reads_and_re_sends_every_patient_in_either_variant() {
    for live in [false, true] {
        let h = clinic(live, 0, "").await;
        seed_valid_patients(&h.sims.practicehub, 250, 47);
        run_ok(&h.once().await);
        h.sims.practicehub.clear_log();
        h.sims.revkeen.clear_log();
        let out = h.run(&["--once", "--resync"]).await;
        run_ok(&out);
        let pages = listings(&h);
        assert_eq!(pages.len(), 3, "live {live}: the whole table: {pages:?}");
        assert!(
            pages.iter().all(|p| !p.contains("gte")),
            "live {live}: no filter: {pages:?}"
        );
        let resent: usize = h
            .sims
            .revkeen
            .requests()
            .iter()
            .filter_map(|r| r.body.as_deref())
            .map(|body| body.matches("\"email\"").count())
            .sum();
        assert_eq!(
            resent,
            250,
            "live {live}: every patient re-sent\n{}",
            out.transcript()
        );
        // The next run is incremental again.
        h.sims.practicehub.clear_log();
        run_ok(&h.once().await);
        assert_eq!(listings(&h).len(), 1, "live {live}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_warning_fires_only_when_the_filter_was_ignored_and_undated_rows_are_reported() {
    const IGNORED: &str = "ignored the updated filter";
    const UNDATED: &str = "have no readable `updated_at`";
    let h = clinic(true, 0, "full_scan_schedule = \"off\"").await;
    seed_valid_patients(&h.sims.practicehub, 120, 53);
    let sim = &h.sims.practicehub;
    // The newest patient, and one within the very second the next mark is sent at (70 min
    // before it, to the second): the server returns it, and it is no sign of an ignored filter.
    let mut newest = sim.patient(1).expect("seeded");
    newest["updated_at"] = json!("2026-01-01 00:30:00.700");
    sim.put_patient(newest);
    let mut edge = sim.patient(2).expect("seeded");
    edge["updated_at"] = json!("2025-12-31 23:20:00.300");
    sim.put_patient(edge);
    let mut undated = sim.patient(3).expect("seeded");
    undated["updated_at"] = Value::Null;
    sim.put_patient(undated);

    let first = h.once().await;
    run_ok(&first);
    assert_eq!(
        first.stderr.matches(IGNORED).count(),
        0,
        "{}",
        first.transcript()
    );
    assert_eq!(
        first.stderr.matches(UNDATED).count(),
        1,
        "{}",
        first.transcript()
    );
    assert!(
        first
            .stderr
            .contains("1 PracticeHub patients have no readable")
    );

    sim.clear_log();
    let second = h.once().await;
    run_ok(&second);
    let pages = listings(&h);
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert!(
        pages[0].contains("updated_at=gte%3A2025-12-31+23%3A20%3A00"),
        "{pages:?}"
    );
    assert_eq!(
        second.stderr.matches(IGNORED).count(),
        0,
        "{}",
        second.transcript()
    );

    sim.set_ignore_filters(true);
    let third = h.once().await;
    run_ok(&third);
    assert_eq!(
        third.stderr.matches(IGNORED).count(),
        1,
        "{}",
        third.transcript()
    );
    assert_eq!(
        third.stderr.matches(UNDATED).count(),
        1,
        "{}",
        third.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scan_when_due_finds_what_the_cursor_missed_and_sees_vanished_patients() {
    let h = clinic(true, 0, "").await;
    seed_valid_patients(&h.sims.practicehub, 250, 59);
    let yearly = with_source(
        &h.config_for("clinic"),
        "clinic",
        "full_scan_schedule = \"0 0 0 1 1 *\"",
    );
    h.write_config(&yearly);
    run_ok(&h.once().await);
    // A change the cursor cannot see (a server that stamped it a minute after the patient's
    // previous change, months before the mark) and a patient purged.
    let sim = &h.sims.practicehub;
    let mut missed = sim
        .patients()
        .into_iter()
        .find(|p| p["updated_at"].as_str().is_some_and(|t| t < "2025-11-01"))
        .expect("a patient last changed before November");
    let id = missed["id"].as_i64().expect("id").to_string();
    let previous = sim
        .parse_time(missed["updated_at"].as_str().expect("naive"))
        .expect("a time");
    missed["last_name"] = json!("Missed");
    missed["updated_at"] = json!(sim.format_time(previous + chrono::TimeDelta::minutes(1)));
    sim.put_patient(missed);
    assert!(sim.remove_patient(if id == "77" { 78 } else { 77 }));
    sim.clear_log();
    run_ok(&h.once().await);
    assert_eq!(listings(&h).len(), 1, "incremental");
    assert_ne!(
        crate::support::name_at_revkeen(&h, "practicehub", &id)
            .as_deref()
            .map(|n| n.ends_with("Missed")),
        Some(true)
    );

    // A schedule that has fired since the last full scan: the next --once lists everything.
    h.write_config(&with_source(
        &h.config_for("clinic"),
        "clinic",
        "full_scan_schedule = \"* * * * * *\"",
    ));
    sim.clear_log();
    let out = h.once().await;
    run_ok(&out);
    let pages = listings(&h);
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(pages.iter().all(|p| !p.contains("gte")), "{pages:?}");
    assert!(
        out.stderr.contains("due by full_scan_schedule"),
        "{}",
        out.transcript()
    );
    assert!(
        crate::support::name_at_revkeen(&h, "practicehub", &id)
            .is_some_and(|n| n.ends_with("Missed")),
        "{}",
        out.transcript()
    );
    assert!(
        out.stdout.contains("1 records vanished") || out.stderr.contains("1 records vanished"),
        "{}",
        out.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_polls_on_its_full_scan_schedule() {
    let h = clinic(true, 0, "").await;
    seed_valid_patients(&h.sims.practicehub, 150, 61);
    let config = yearly_schedules(&h.config_for("clinic")).replace(
        "full_scan_schedule = \"0 0 0 1 1 *\"",
        "full_scan_schedule = \"*/2 * * * * *\"",
    );
    let daemon = h.start_daemon(&config).await;
    // The start-up poll (full: the first), then full scans on the two-second schedule, though
    // the poll schedule is once a year.
    daemon
        .wait_for_log(
            "two full scans by schedule",
            std::time::Duration::from_secs(30),
            |log| log.matches("due by full_scan_schedule").count() >= 2,
        )
        .await;
    // Two pages of the start-up listing and of the first scheduled one at least.
    let unfiltered = listings(&h).iter().filter(|p| !p.contains("gte")).count();
    assert!(unfiltered >= 4, "{unfiltered} unfiltered pages");
    daemon.stop().await.assert_exit(exit::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_timezone_or_full_scan_schedule_is_refused_naming_the_key() {
    let h = Harness::start().await;
    for (line, key, says) in [
        (
            "timezone = \"Europe/Londn\"",
            "sources[0].timezone",
            "IANA time zone",
        ),
        (
            "full_scan_schedule = \"nightly\"",
            "sources[0].full_scan_schedule",
            "\"off\"",
        ),
    ] {
        h.write_config(&with_source(&h.config_for("clinic"), "clinic", line));
        let out = h.run(&["check-config"]).await;
        out.assert_exit(exit::CONFIG);
        assert!(
            out.stderr.contains(key) && out.stderr.contains(says),
            "{}",
            out.transcript()
        );
    }
    h.write_config(&with_source(
        &h.config_for("clinic"),
        "clinic",
        "timezone = \"Europe/Dublin\"\nfull_scan_schedule = \"off\"",
    ));
    let out = h.run(&["check-config"]).await;
    out.assert_exit(exit::OK);
    assert!(
        out.stdout.contains("timezone = \"Europe/Dublin\""),
        "{}",
        out.transcript()
    );
    assert!(
        out.stdout.contains("full_scan_schedule = \"off\""),
        "{}",
        out.transcript()
    );
}

/// PracticeHub requests per full scan and per incremental poll (one change), measured for the
/// report at 1,000 and 10,000 patients in both variants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_full_scan_and_incremental_poll() {
    for live in [false, true] {
        for size in [1_000usize, 10_000] {
            let h = clinic(live, 0, "full_scan_schedule = \"off\"").await;
            seed_valid_patients(&h.sims.practicehub, size, 67);
            run_ok(&h.once().await);
            let full = listings(&h).len();
            assert!(
                h.sims
                    .practicehub
                    .update_patient(7, json!({"last_name": "Again"}))
            );
            h.sims.practicehub.clear_log();
            run_ok(&h.once().await);
            let incremental = listings(&h).len();
            eprintln!(
                "MEASURED practicehub live={live} patients={size}: full scan {full} requests, incremental poll {incremental}"
            );
            assert_eq!(full, size.div_ceil(100));
            assert!((1..=2).contains(&incremental), "{incremental}");
        }
    }
}
