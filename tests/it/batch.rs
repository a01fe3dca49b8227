//! Batch upserts and rate limiting (issue 6), as RevKeen and Wodify see them.
//!
//! Batches: with the default `batch_size` RevKeen receives only `PUT /customers/external/batch`
//! requests of at most 100 unique customers, sorted by external id as strings, whose items are
//! byte for byte the single-upsert bodies with `external_id` in front; `batch_size = 1` sends
//! only single upserts. A batch `failed[]` item costs only that customer: the rest of its batch
//! is delivered, and the refused customer is resent alone and kept as a dead letter with
//! RevKeen's code, message, HTTP status and field errors. A stale item counts as delivered. A
//! batch RevKeen refuses as a whole (400: one item fails the schema) is split into single
//! upserts, so a bad record costs only itself. (A batch body never nears RevKeen's 10 MiB
//! limit: the daemon cuts fields and keeps batches under 1 MB, see `untrusted.rs`.) A
//! batch in flight when the daemon is SIGKILLed is re-sent after the restart with the identical
//! body and `Idempotency-Key`, RevKeen answers in-progress and then a replay (never a
//! conflict), and every customer is written exactly once.
//!
//! Rate limits: the daemon never sends to RevKeen faster than its configured rate, and with both sides at the
//! same limit it should draw at most 1 % 429s; Wodify at a matched limit sees no 429. Against a stricter RevKeen the daemon sends nothing inside
//! the `Retry-After` pause; against a stricter Wodify, whose 429s carry no `Retry-After`, it
//! backs off instead of hammering; nothing is lost either way. With a slow RevKeen, exactly
//! `concurrency` requests overlap and never more, and batches go out while the scan is still
//! reading pages.
//!
//! Not tested here: a customer carrying `custom_fields` must take the single endpoint, but the
//! daemon's normalized customer has no `custom_fields` field (`src/customer.rs`), so no source
//! record can produce one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use sync_daemon::store::FailureKind;
use sync_daemon_sim::Faults;
use sync_daemon_sim::revkeen::{LoggedRequest, Rejection};
use sync_daemon_sim::wodify::generate_client;

use crate::support::{
    Harness, assert_revkeen_holds, assert_written_once, exit, expected_wodify, seed_valid_clients,
    summary_cell, wait_until, with_revkeen, with_source,
};

const BATCH_PATH: &str = "/customers/external/batch";
const SINGLE_PREFIX: &str = "/customers/external/wodify/";

/// A gym-only harness with `clients` valid clients; `revkeen` lines go into `[revkeen]`,
/// `source` lines into the `gym` source.
async fn gym(clients: usize, seed: u64, revkeen: &[&str], source: &[&str]) -> Harness {
    let h = Harness::start().await;
    let mut config = h.config_for("gym");
    for line in revkeen {
        config = with_revkeen(&config, line);
    }
    for line in source {
        config = with_source(&config, "gym", line);
    }
    h.write_config(&config);
    seed_valid_clients(&h.sims.wodify, clients, seed);
    h
}

fn is_batch(request: &LoggedRequest) -> bool {
    request.method == "PUT" && request.path == BATCH_PATH
}

/// The external id of a single upsert, if `request` is one.
fn single_id(request: &LoggedRequest) -> Option<&str> {
    (request.method == "PUT")
        .then(|| request.path.strip_prefix(SINGLE_PREFIX))
        .flatten()
}

/// A batch request's body, parsed.
fn batch_json(request: &LoggedRequest) -> Value {
    let body = request.body.as_deref().expect("bodies are recorded");
    serde_json::from_str(body).expect("a batch body is JSON")
}

/// The external ids of a batch request's items, in body order.
fn batch_ids(request: &LoggedRequest) -> Vec<String> {
    batch_json(request)["customers"]
        .as_array()
        .expect("customers is an array")
        .iter()
        .map(|item| {
            item["external_id"]
                .as_str()
                .expect("external_id is a string")
                .to_string()
        })
        .collect()
}

/// Adds clients 9 and 100000, whose ids sort differently as strings than as numbers.
fn add_odd_ids(h: &Harness, seed: u64) {
    for id in [9, 100_000] {
        let mut client = generate_client(id, seed);
        client["id"] = json!(id);
        client["email"] = json!(format!("odd{id}@example.com"));
        h.sims.wodify.put_client(client);
    }
}

// ---------------------------------------------------------------------------------------------
// Batches

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_up_to_100_sorted_customers_whose_items_are_the_single_bodies() {
    // The same 252 clients, once with the default batch size and once with batch_size = 1.
    let batched = gym(250, 5, &[], &[]).await;
    add_odd_ids(&batched, 5);
    batched.once().await.assert_exit(exit::OK);
    let expected = expected_wodify(&batched.sims.wodify);
    assert_eq!(expected.len(), 252);
    assert_revkeen_holds(&batched.sims.revkeen, "wodify", &expected);

    let log = batched.sims.revkeen.requests();
    let stats = batched.sims.revkeen.stats();
    assert_eq!(
        stats.single_requests, 0,
        "batch_size 100 (the default) should send batches only: {stats:?}"
    );
    assert!(log.iter().all(is_batch), "non-batch requests: {log:?}");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut any_string_order_differs = false;
    for request in &log {
        assert_eq!(request.status, 200, "{request:?}");
        let parsed = batch_json(request);
        assert_eq!(parsed["source"], "wodify");
        let ids = batch_ids(request);
        assert!(
            (1..=100).contains(&ids.len()),
            "a batch of {} customers",
            ids.len()
        );
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "batch items must be unique and sorted by external id as strings: {ids:?}"
        );
        let numeric: Vec<i64> = ids.iter().map(|id| id.parse().expect("numeric")).collect();
        any_string_order_differs |= numeric.windows(2).any(|pair| pair[0] > pair[1]);
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert!(
        any_string_order_differs,
        "no batch mixed ids whose string and numeric order differ, so the sort went untested"
    );
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        "the batches should carry every customer"
    );
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "customers sent in more than one batch: {repeated:?}"
    );
    assert!(
        log.len() >= 3,
        "252 customers need at least 3 batches of 100, got {}",
        log.len()
    );

    let singles = gym(250, 5, &["batch_size = 1"], &[]).await;
    add_odd_ids(&singles, 5);
    singles.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&singles.sims.revkeen, "wodify", &expected);
    let stats = singles.sims.revkeen.stats();
    assert_eq!(stats.batch_requests, 0, "batch_size = 1: {stats:?}");
    assert_eq!(stats.single_requests, 252, "{stats:?}");

    // Each batch item is the single body with `"external_id"` spliced in front, byte for byte.
    let batch_bodies: Vec<String> = log.iter().filter_map(|r| r.body.clone()).collect();
    for request in singles.sims.revkeen.requests() {
        let id = single_id(&request).expect("a single upsert").to_string();
        let body = request.body.expect("bodies are recorded");
        assert!(body.starts_with('{') && body.len() > 2, "{body}");
        let item = format!("{{\"external_id\":{},{}", json!(id), &body[1..]);
        let carrying: Vec<&String> = batch_bodies
            .iter()
            .filter(|batch| batch.contains(&item))
            .collect();
        assert_eq!(
            carrying.len(),
            1,
            "customer {id}: the batches should carry its single body {body} exactly once as \
             {item}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batch_items_cost_only_themselves_and_carry_revkeens_full_error() {
    let h = gym(250, 7, &[], &[]).await;
    let email_10233 = h.sims.wodify.client(10_233).expect("seeded")["email"]
        .as_str()
        .expect("email")
        .to_string();
    let rules = [
        (
            Some("10017"),
            None,
            422,
            "customer_blocked",
            "this customer is blocked",
            Some("email"),
        ),
        (
            Some("10120"),
            None,
            400,
            "validation_error",
            "name is on a deny list",
            None,
        ),
        (
            None,
            Some(email_10233.as_str()),
            422,
            "invalid_phone",
            "phone number is not reachable",
            Some("phone"),
        ),
    ];
    h.sims.revkeen.set_rejections(
        rules
            .iter()
            .map(|(id, email, status, code, message, field)| Rejection {
                external_id: id.map(str::to_string),
                email: email.map(str::to_string),
                status: *status,
                code: code.to_string(),
                message: message.to_string(),
                field: field.map(str::to_string),
            })
            .collect(),
    );
    let refused: BTreeSet<String> = ["10017", "10120", "10233"].map(String::from).into();

    let out = h.once().await;
    out.assert_exit(exit::REJECTED);

    // Everyone else is at RevKeen, including every other member of the refused ones' batches.
    let mut expected = expected_wodify(&h.sims.wodify);
    expected.retain(|id, _| !refused.contains(id));
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected);
    assert_written_once(&h);

    let log = h.sims.revkeen.requests();
    for id in &refused {
        let first_batch = log
            .iter()
            .position(|r| is_batch(r) && batch_ids(r).contains(id))
            .unwrap_or_else(|| panic!("{id} was never sent in a batch"));
        assert_eq!(log[first_batch].status, 200, "{:?}", log[first_batch]);
        assert!(
            batch_ids(&log[first_batch]).len() > 1,
            "{id} had no batch mates"
        );
        let alone: Vec<&LoggedRequest> = log[first_batch..]
            .iter()
            .filter(|r| single_id(r) == Some(id.as_str()))
            .collect();
        assert!(
            !alone.is_empty(),
            "{id} was refused in a batch and should be resent alone for RevKeen's full error"
        );
    }
    let singles: BTreeSet<String> = log
        .iter()
        .filter_map(single_id)
        .map(str::to_string)
        .collect();
    assert_eq!(singles, refused, "only refused customers are resent alone");

    // Dead letters with RevKeen's code, message, status and field errors.
    let failures: BTreeMap<String, _> = h
        .failures()
        .into_iter()
        .map(|f| (f.external_id.clone(), f))
        .collect();
    assert_eq!(
        failures.keys().cloned().collect::<BTreeSet<_>>(),
        refused,
        "{failures:?}"
    );
    for ((_, _, status, code, message, field), id) in rules.iter().zip(["10017", "10120", "10233"])
    {
        let failure = &failures[id];
        assert_eq!(failure.kind, FailureKind::DeadLetter, "{failure:?}");
        assert_eq!(failure.code, *code, "{failure:?}");
        assert!(failure.reason.contains(message), "{failure:?}");
        assert_eq!(failure.http_status, Some(*status), "{failure:?}");
        assert_eq!(
            failure.field_errors,
            field.map(|field| json!({ field: message })),
            "{failure:?}"
        );
    }
    assert_eq!(summary_cell(&out, "gym", "DEAD"), 3, "{}", out.stdout);
    assert_eq!(
        summary_cell(&out, "gym", "SENT"),
        expected.len() as u64,
        "{}",
        out.stdout
    );

    // `failures --json` lists exactly those three, as dead letters with their status.
    let listed = h.run(&["failures", "--json"]).await;
    listed.assert_exit(exit::OK);
    let listed: Vec<Value> = serde_json::from_str(&listed.stdout).expect("failures --json");
    let listed: BTreeMap<String, (String, Value)> = listed
        .into_iter()
        .map(|f| {
            (
                f["external_id"].as_str().expect("id").to_string(),
                (
                    f["kind"].as_str().expect("kind").to_string(),
                    f["http_status"].clone(),
                ),
            )
        })
        .collect();
    assert_eq!(
        listed,
        BTreeMap::from([
            ("10017".to_string(), ("dead_letter".to_string(), json!(422))),
            ("10120".to_string(), ("dead_letter".to_string(), json!(400))),
            ("10233".to_string(), ("dead_letter".to_string(), json!(422))),
        ])
    );
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_batch_item_counts_as_delivered() {
    let h = gym(120, 17, &[], &[]).await;
    h.once().await.assert_exit(exit::OK);

    // Five clients change, but carry an update time older than what RevKeen holds: RevKeen
    // answers them `skipped` (stale) inside the batch.
    let stale = ["10003", "10040", "10077", "10101", "10118"];
    for id in stale {
        let mut client = h
            .sims
            .wodify
            .client(id.parse().expect("id"))
            .expect("seeded");
        client["last_name"] = json!("Outdated");
        client["updated"]["updated_on_datetime"] = json!("2001-01-01T00:00:00");
        h.sims.wodify.put_client(client);
    }
    h.sims.revkeen.clear_log();
    let out = h.once().await;
    out.assert_exit(exit::OK);
    let stats = h.sims.revkeen.stats();
    assert_eq!(stats.stale, 5, "{stats:?}");
    assert!(stats.batch_requests >= 1, "{stats:?}");
    assert_eq!(stats.single_requests, 0, "{stats:?}");
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    assert_eq!(summary_cell(&out, "gym", "STALE"), 5, "{}", out.stdout);
    for id in stale {
        let name = h
            .sims
            .revkeen
            .customer("wodify", id)
            .expect("delivered")
            .fields["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!name.ends_with("Outdated"), "{id}: RevKeen kept {name}");
    }

    // Acknowledged: the next run sends nothing.
    h.sims.revkeen.clear_log();
    h.once().await.assert_exit(exit::OK);
    assert_eq!(h.sims.revkeen.stats().requests, 0);
}

/// An ISO 8601 time a source can hold that lands in year 10000 once converted to UTC, which
/// RFC 3339 cannot write: the daemon must leave it out rather than send `+10000-…`.
const BEYOND_9999: &str = "9999-12-31T23:59:59-01:00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_as_a_whole_is_split_and_only_the_bad_customer_is_a_dead_letter() {
    // A client RevKeen's schema refuses for a rule the daemon cannot know: the batch carrying
    // it is refused whole (400), its members are sent one by one, and only that client is
    // refused again, as a single.
    let h = gym(250, 23, &[], &[]).await;
    let bad = "10042";
    h.sims.revkeen.set_faults(Faults {
        schema_refuse: vec![bad.into()],
        ..Faults::default()
    });

    let out = h.once().await;
    out.assert_exit(exit::REJECTED);

    let log = h.sims.revkeen.requests();
    let refused_at = log
        .iter()
        .position(|r| is_batch(r) && r.status == 400)
        .expect("the batch carrying the bad customer is refused whole");
    assert_eq!(
        log[..refused_at].iter().filter_map(single_id).count(),
        0,
        "no single upserts before the split"
    );
    // … then its members went out alone, the bad one among them, each once.
    let singles: Vec<&str> = log[refused_at + 1..].iter().filter_map(single_id).collect();
    let singles_set: BTreeSet<&str> = singles.iter().copied().collect();
    assert!(singles_set.contains(bad), "{singles:?}");
    assert!(
        singles_set.len() > 1,
        "the whole batch was split: {singles:?}"
    );
    assert!(
        singles.len() <= 100,
        "one batch's members at most: {}",
        singles.len()
    );

    let mut expected = expected_wodify(&h.sims.wodify);
    expected.remove(bad);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected);
    assert_written_once(&h);

    let failures = h.failures();
    assert_eq!(
        failures.len(),
        1,
        "only the bad customer fails: {failures:?}"
    );
    let failure = &failures[0];
    assert_eq!(failure.external_id, bad);
    assert_eq!(failure.kind, FailureKind::DeadLetter);
    assert_eq!(failure.http_status, Some(400), "{failure:?}");
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_time_beyond_year_9999_does_not_cost_the_customer() {
    let h = gym(20, 29, &["batch_size = 1"], &[]).await;
    let mut client = h.sims.wodify.client(10_007).expect("seeded");
    client["updated"]["updated_on_datetime"] = json!(BEYOND_9999);
    h.sims.wodify.put_client(client);
    let out = h.once().await;
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_at_a_kill_is_resent_identically_and_replayed() {
    let h = gym(60, 37, &["batch_size = 10", "concurrency = 2"], &[]).await;
    h.unlimited();
    h.sims.revkeen.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    // Two batches in flight (concurrency 2); no third can start before one is answered.
    let revkeen = h.sims.revkeen.clone();
    let mut at_kill: Vec<LoggedRequest> = Vec::new();
    let killed = h
        .spawn_once()
        .kill_when(|| {
            let log = revkeen.requests();
            let ready = log.iter().filter(|r| is_batch(r)).count() >= 2;
            if ready {
                at_kill = log;
            }
            ready
        })
        .await;
    assert_eq!(
        killed.code,
        None,
        "the run should still have been going\n{}",
        killed.transcript()
    );
    assert_eq!(at_kill.len(), 2, "{at_kill:?}");
    assert!(
        at_kill.iter().all(|r| is_batch(r) && r.status == 0),
        "both batches were still being processed at the kill: {at_kill:?}"
    );
    assert_eq!(h.sims.revkeen.requests().len(), 2);
    let in_flight: BTreeSet<(Option<String>, Option<String>)> = at_kill
        .iter()
        .map(|r| (r.idempotency_key.clone(), r.body.clone()))
        .collect();

    // RevKeen finishes those writes on its own; the restart must not write anyone twice.
    h.sims.revkeen.set_faults(Faults::default());
    let out = h.once().await;
    out.assert_exit(exit::OK);

    let after: Vec<LoggedRequest> = h.sims.revkeen.requests().split_off(2);
    let first_two: BTreeSet<(Option<String>, Option<String>)> = after
        .iter()
        .filter(|r| is_batch(r))
        .take(2)
        .map(|r| (r.idempotency_key.clone(), r.body.clone()))
        .collect();
    assert_eq!(
        first_two, in_flight,
        "the first batches after the restart must be the recorded ones, same key, same bytes"
    );
    assert!(is_batch(&after[0]), "{:?}", after[0]);
    for (key, _) in &in_flight {
        let answers: Vec<(u16, bool)> = after
            .iter()
            .filter(|r| &r.idempotency_key == key)
            .map(|r| (r.status, r.replayed))
            .collect();
        eprintln!("re-sent batch {key:?}: (status, replayed) {answers:?}");
        assert!(
            answers
                .iter()
                .all(|answer| matches!(answer, (409, false) | (200, true))),
            "a re-sent batch is answered in-progress or replayed, nothing else: {answers:?}"
        );
        assert!(
            answers.contains(&(200, true)),
            "the re-sent batch should end with a replay: {answers:?}"
        );
    }
    let stats = h.sims.revkeen.stats();
    assert_eq!(stats.conflicts, 0, "{stats:?}");
    assert_eq!(stats.created, 60, "{stats:?}");
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_written_once(&h);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
}

// ---------------------------------------------------------------------------------------------
// Rate limits, concurrency, pipelining

/// RevKeen's limit scaled down for the tests: 1200/min is one request every 50 ms after a
/// burst of 5.
const REVKEEN_RATE: [&str; 2] = ["requests_per_minute = 1200", "burst = 5"];
const REVKEEN_PERIOD_MS: u64 = 50;
const REVKEEN_BURST: u64 = 5;

/// A `--once` of 300 clients in 100 batches of 3 with the daemon configured to
/// [`REVKEEN_RATE`]; RevKeen enforces it too when `enforce` is set. Returns RevKeen's log.
async fn at_revkeens_rate(enforce: bool) -> Vec<LoggedRequest> {
    let h = gym(
        300,
        41,
        &[REVKEEN_RATE[0], REVKEEN_RATE[1], "batch_size = 3"],
        &[],
    )
    .await;
    if enforce {
        h.sims.revkeen.set_rate_limit(1200, 5);
    } else {
        h.unlimited();
    }
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let log = h.sims.revkeen.requests();
    assert!(log.len() >= 100, "{} requests", log.len());
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_paces_revkeen_at_its_configured_rate() {
    let log = at_revkeens_rate(false).await;
    // The k-th request may not come before (k - burst) periods after the first: the long-run
    // rate never exceeds the configured one. Slack covers the first request's own delays.
    let first = log[0].at_ms;
    let early: Vec<(usize, u64)> = log
        .iter()
        .enumerate()
        .filter(|(k, r)| {
            let allowed = (*k as u64).saturating_sub(REVKEEN_BURST) * REVKEEN_PERIOD_MS;
            r.at_ms - first + 30 < allowed
        })
        .map(|(k, r)| (k, r.at_ms - first))
        .collect();
    assert!(
        early.is_empty(),
        "requests (index, ms after the first) faster than 1200/min burst 5: {early:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revkeen_limit_matched_on_both_sides_draws_at_most_1_percent_429s() {
    let log = at_revkeens_rate(true).await;
    let arrivals: Vec<(u64, u16)> = log
        .iter()
        .map(|r| (r.at_ms - log[0].at_ms, r.status))
        .collect();
    eprintln!("RevKeen arrivals (ms after the first, status): {arrivals:?}");
    // The daemon's own bucket allows `burst` requests at once and one more per period: any
    // `burst + 1` consecutive requests must span a period (2 ms for clock granularity).
    let burst = REVKEEN_BURST as usize;
    let crowded: Vec<(usize, u64)> = arrivals
        .windows(burst + 1)
        .enumerate()
        .map(|(k, window)| (k, window[burst].0 - window[0].0))
        .filter(|(_, span)| span + 2 < REVKEEN_PERIOD_MS)
        .collect();
    let limited = log.iter().filter(|r| r.status == 429).count();
    assert!(
        crowded.is_empty() && limited * 100 <= log.len(),
        "{limited} of {} RevKeen requests were answered 429 though the daemon is configured \
         to RevKeen's limit; {} requests arrived within {} ms starting at these (index, span): \
         {crowded:?}",
        log.len(),
        burst + 1,
        REVKEEN_PERIOD_MS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stricter_revkeen_is_waited_out_for_its_retry_after() {
    // The daemon believes in 1000/min; RevKeen allows 120/min, burst 2. A token is at most
    // 500 ms away, so every 429 says `Retry-After: 1`.
    let h = gym(150, 43, &["batch_size = 25"], &[]).await;
    h.sims.revkeen.set_rate_limit(120, 2);
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_written_once(&h);
    assert!(h.failures().is_empty(), "{:?}", h.failures());
    let log = h.sims.revkeen.requests();
    let limited: Vec<u64> = log
        .iter()
        .filter(|r| r.status == 429)
        .map(|r| r.at_ms)
        .collect();
    assert!(!limited.is_empty(), "RevKeen never answered 429: {log:?}");
    // Requests already on their way when the 429 came back may land just after it; nothing
    // may be sent inside the second RevKeen asked for.
    for at in &limited {
        let inside: Vec<u64> = log
            .iter()
            .map(|r| r.at_ms)
            .filter(|t| *t > at + 250 && *t < at + 950)
            .collect();
        assert!(
            inside.is_empty(),
            "requests at {inside:?} ms, inside the 1 s Retry-After of a 429 at {at} ms"
        );
    }
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wodify_limit_matched_on_both_sides_draws_no_429s() {
    // Wodify's documented 5/s with a burst of 2: a page every 200 ms, slower than the daemon
    // maps a page, so its own bucket sets the pace (unthrottled, it draws a 429 every few
    // pages here).
    let h = gym(1000, 47, &[], &["requests_per_second = 5", "burst = 2"]).await;
    h.sims.wodify.set_rate_limit(5, 2);
    h.once().await.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let log = h.sims.wodify.requests();
    eprintln!(
        "Wodify arrivals (ms after the first, status): {:?}",
        log.iter()
            .map(|r| (r.at_ms - log[0].at_ms, r.status))
            .collect::<Vec<_>>()
    );
    assert!(log.len() >= 10, "{} Wodify requests", log.len());
    // 1 % of a dozen requests: one 429 at most (a loaded machine can delay one request enough
    // for the next to arrive early).
    let limited = log.iter().filter(|r| r.status == 429).count();
    assert!(
        limited <= 1,
        "{limited} of {} Wodify requests were answered 429 though the daemon is configured to \
         Wodify's limit",
        log.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wodify_429s_without_retry_after_are_backed_off_not_hammered() {
    // The daemon believes in 100/s; Wodify allows 2/s, burst 1, and its 429s carry no
    // Retry-After, so the daemon can only back off.
    let h = gym(300, 53, &[], &["requests_per_second = 100", "burst = 100"]).await;
    h.sims.wodify.set_rate_limit(2, 1);
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let stats = h.sims.wodify.stats();
    eprintln!("Wodify: {stats:?}");
    assert!(
        stats.rate_limited >= 1,
        "Wodify never answered 429: {stats:?}"
    );
    let pages = stats.requests - stats.rate_limited;
    // A token every 500 ms; backoff starting at 1 s (full jitter) needs a few tries per page
    // at most, where a retry loop without backoff would make hundreds.
    assert!(
        stats.rate_limited <= 6 * pages,
        "{} 429s for {pages} pages: the daemon hammered Wodify",
        stats.rate_limited
    );
}

/// The most intervals `[at, at + length)` that overlap at any moment.
fn max_overlap(starts: &[u64], length: u64) -> usize {
    starts
        .iter()
        .map(|&t| starts.iter().filter(|&&s| s <= t && t < s + length).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_concurrency_revkeen_requests_overlap() {
    const LATENCY: u64 = 300;
    let h = gym(150, 59, &["batch_size = 10", "concurrency = 3"], &[]).await;
    h.unlimited();
    h.sims.revkeen.set_faults(Faults {
        latency_ms: LATENCY,
        ..Faults::default()
    });
    // Besides the arrival times, sample what RevKeen is working on during the run.
    let running = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    let mut most_in_progress = 0;
    let out = running
        .kill_when(|| {
            let busy = revkeen.requests().iter().filter(|r| r.status == 0).count();
            most_in_progress = most_in_progress.max(busy);
            false
        })
        .await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    let starts: Vec<u64> = h.sims.revkeen.requests().iter().map(|r| r.at_ms).collect();
    assert!(starts.len() >= 15, "{} requests", starts.len());
    let overlap = max_overlap(&starts, LATENCY);
    assert!(
        overlap <= 3 && most_in_progress <= 3,
        "concurrency = 3, yet {overlap} requests overlapped (sampled: {most_in_progress})"
    );
    assert_eq!(
        overlap, 3,
        "with 15 batches waiting, 3 requests should be in flight at once: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_out_while_the_scan_is_still_reading() {
    let h = gym(
        800,
        61,
        &[],
        &["requests_per_second = 1000", "burst = 1000"],
    )
    .await;
    h.unlimited();
    h.sims.wodify.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let running = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    wait_until("the first RevKeen request", Duration::from_secs(30), || {
        revkeen.stats().requests >= 1
    })
    .await;
    let pages_then = h.sims.wodify.stats().requests;
    let out = running.finish().await;
    out.assert_exit(exit::OK);
    let pages = h.sims.wodify.stats().requests;
    assert!(
        pages_then < pages,
        "RevKeen heard nothing until all {pages} pages were read"
    );
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}
