//! Upstreams that misbehave the way real ones do, each injected on its own (the simulators'
//! fault switches, or a small raw server): a `Retry-After` beyond any clock, redirects, a 2xx
//! that is not the documented answer, listings that never end or lack their envelope, records
//! that cannot be read, keys echoed in error text, control characters, oversized fields, odd
//! ids, an untrusted certificate. Each asserts what an operator sees (exit code, output,
//! `status`), what RevKeen holds, what each upstream was asked, that no key went anywhere but
//! its own host, and that a later run with a well-behaved upstream delivers everything.

use std::time::Duration;

use serde_json::{Value, json};
use sync_daemon_sim::revkeen::Rejection;
use sync_daemon_sim::{Faults, NextLinkFault, PagingFault, WODIFY_KEY};

use crate::support::{
    Harness, Trap, assert_revkeen_holds, exit, expected_practicehub, expected_wodify, replaced,
    seed_valid_clients, seed_valid_patients, self_signed_tls_server, state_bytes, wait_until,
    with_revkeen, with_source,
};

/// A gym-only harness with `clients` valid clients.
async fn gym(clients: usize) -> Harness {
    let h = Harness::start().await;
    h.write_config(&h.config_for("gym"));
    seed_valid_clients(&h.sims.wodify, clients, 61);
    h
}

/// A clinic-only harness with `patients` valid patients.
async fn clinic(patients: usize) -> Harness {
    let h = Harness::start().await;
    h.write_config(&h.config_for("clinic"));
    seed_valid_patients(&h.sims.practicehub, patients, 62);
    h
}

/// Prints how a faulty run ended, for the figures of the closing note (`--nocapture`).
fn figure(what: &str, out: &crate::support::Output) {
    eprintln!("{what}: exit {:?} after {:.1?}", out.code, out.elapsed);
}

/// Healthy upstreams again: the next `--once` delivers every record, exit 0.
async fn healthy_rerun_delivers_everything(h: &Harness) {
    h.sims.revkeen.set_faults(Faults::default());
    h.sims.wodify.set_faults(Faults::default());
    h.sims.practicehub.set_faults(Faults::default());
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    assert_eq!(h.sims.revkeen.stats().conflicts, 0);
}

// ---------------------------------------------------------------------------------------------
// 1. Retry-After beyond any clock.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_u64_max_is_capped_not_a_panic() {
    let h = gym(120).await;
    h.write_config(&with_revkeen(
        &h.config_for("gym"),
        "max_retry_after_secs = 2",
    ));
    h.sims.revkeen.set_faults(Faults {
        rate_429: 1.0,
        retry_after: Some("18446744073709551615".into()),
        ..Faults::default()
    });
    let running = h.spawn_once();
    let revkeen = h.sims.revkeen.clone();
    wait_until(
        "a 429 with that Retry-After",
        Duration::from_secs(30),
        || revkeen.stats().rate_limited >= 1,
    )
    .await;
    h.sims.revkeen.set_faults(Faults::default());
    let out = running.finish().await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.contains("max_retry_after_secs"),
        "a capped wait is said in the log:\n{}",
        out.transcript()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.transcript());
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_retry_afters_of_a_day_or_the_year_9999_are_capped() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 50, 63);
    seed_valid_patients(&h.sims.practicehub, 50, 63);
    let toml = with_source(&h.base_config(), "gym", "max_retry_after_secs = 1");
    h.write_config(&with_source(&toml, "clinic", "max_retry_after_secs = 1"));
    h.sims.wodify.set_faults(Faults {
        rate_429: 1.0,
        retry_after: Some("86400".into()),
        ..Faults::default()
    });
    h.sims.practicehub.set_faults(Faults {
        rate_429: 1.0,
        retry_after: Some("Fri, 31 Dec 9999 23:59:59 GMT".into()),
        ..Faults::default()
    });
    let running = h.spawn_once();
    let (wodify, practicehub) = (h.sims.wodify.clone(), h.sims.practicehub.clone());
    wait_until("both sources answered 429", Duration::from_secs(30), || {
        wodify.stats().rate_limited >= 1 && practicehub.stats().rate_limited >= 1
    })
    .await;
    h.sims.wodify.set_faults(Faults::default());
    h.sims.practicehub.set_faults(Faults::default());
    let out = running.finish().await;
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.contains("max_retry_after_secs"),
        "{}",
        out.stderr
    );
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pause_is_shown_by_status_with_until_when_and_why() {
    let h = gym(60).await;
    h.sims.revkeen.set_faults(Faults {
        rate_429: 1.0,
        retry_after: Some("86400".into()),
        ..Faults::default()
    });
    let daemon = h
        .start_daemon(&with_revkeen(
            &h.config_for("gym"),
            "max_retry_after_secs = 120",
        ))
        .await;
    let status = crate::support::wait_for(
        "status to show the pause",
        Duration::from_secs(30),
        || async {
            let status = h.status_json().await;
            let shown = status["pauses"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["target"] == "revkeen"));
            if shown {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
    let pause = &status["pauses"][0];
    let reason = pause["reason"].as_str().expect("a reason");
    assert!(
        reason.contains("86400") && reason.contains("120"),
        "{status:#}"
    );
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout.contains("PAUSED: revkeen until "),
        "{}",
        text.stdout
    );
    // A pause is not a fault of the daemon's: it stays ready.
    assert_eq!(daemon.get("/readyz").await.0, 200);
    daemon.stop().await.assert_exit(exit::OK);
}

// ---------------------------------------------------------------------------------------------
// 2. Redirects are never followed.

/// A trap that answers what a RevKeen or a source would count as success.
async fn trap() -> Trap {
    Trap::start(
        200,
        r#"{"data":{"id":"trapped"},"created":true,"clients":[],"pagination":{"has_more":false}}"#,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revkeen_redirect_is_refused_and_the_key_goes_nowhere() {
    let h = gym(30).await;
    let trap = trap().await;
    h.sims.revkeen.set_faults(Faults {
        redirect_to: Some(trap.url()),
        ..Faults::default()
    });
    let out = h.once().await;
    figure("RevKeen redirect", &out);
    out.assert_exit(exit::UNAVAILABLE);
    let expected = format!(
        "RevKeen answered 307 to {}: sync-daemon does not follow redirects; check revkeen.base_url",
        trap.addr
    );
    assert!(out.stderr.contains(&expected), "{}", out.transcript());
    assert!(trap.requests().is_empty(), "{:?}", trap.requests());
    // The first 307 halts sending; requests already on their way when it came back (at most
    // `revkeen.concurrency`, 4 by default, when a second page's batch went out meanwhile) are
    // redirected too, and none follows.
    let redirected = h.sims.revkeen.stats().redirected;
    assert!(
        (1..=4).contains(&redirected),
        "{redirected} requests before sending halted"
    );
    assert!(h.sims.revkeen.customers("wodify").is_empty());
    let status = h.status_json().await;
    assert_eq!(status["outbox_depth"], 30, "{status:#}");
    assert_eq!(status["halts"][0]["code"], "misdirected", "{status:#}");
    let text = h.run(&["status"]).await;
    assert!(
        text.stdout.contains("SENDING HALTED: revkeen"),
        "{}",
        text.stdout
    );
    healthy_rerun_delivers_everything(&h).await;
    assert!(trap.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_redirects_are_refused_and_their_keys_go_nowhere() {
    let h = Harness::start().await;
    seed_valid_clients(&h.sims.wodify, 20, 64);
    seed_valid_patients(&h.sims.practicehub, 20, 64);
    let trap = trap().await;
    let redirect = Faults {
        redirect_to: Some(trap.url()),
        ..Faults::default()
    };
    h.sims.wodify.set_faults(redirect.clone());
    h.sims.practicehub.set_faults(redirect);
    let out = h.once().await;
    figure("source redirects", &out);
    out.assert_exit(exit::UNAVAILABLE);
    for api in ["Wodify", "PracticeHub"] {
        assert!(
            out.stderr
                .contains(&format!("{api} answered 307 to {}", trap.addr)),
            "{api}: {}",
            out.transcript()
        );
    }
    assert!(out.stderr.contains("the base_url of source \"gym\""));
    assert!(trap.requests().is_empty(), "{:?}", trap.requests());
    // Not retried: one request each.
    assert_eq!(h.sims.wodify.stats().redirected, 1);
    assert_eq!(h.sims.practicehub.stats().redirected, 1);
    healthy_rerun_delivers_everything(&h).await;
}

// ---------------------------------------------------------------------------------------------
// 3. and 5. Listings that never end, or are not in the documented shape.

/// Runs `--once` against a Wodify listing with `paging`, in keyset or page mode.
async fn wodify_paging(paging: PagingFault, scan: &str) -> (Harness, crate::support::Output) {
    let h = gym(250).await;
    h.write_config(&with_source(
        &with_source(&h.config_for("gym"), "gym", &format!("scan = \"{scan}\"")),
        "gym",
        "max_attempts = 2",
    ));
    h.sims.wodify.set_faults(Faults {
        paging: Some(paging),
        ..Faults::default()
    });
    let out = h.once().await;
    (h, out)
}

/// A poll stopped by a listing that does not advance (`what`): exit 1 saying `says`, after at
/// most `most` of the source's `requests` (printed, for the closing figures), and a healthy
/// rerun then delivers everything.
async fn assert_poll_stopped(
    h: &Harness,
    out: &crate::support::Output,
    says: &str,
    requests: u64,
    most: u64,
    what: &str,
) {
    out.assert_exit(1);
    assert!(out.stderr.contains(says), "{what}: {}", out.transcript());
    figure(&format!("{what}, stopped after {requests} requests"), out);
    assert!(requests <= most, "{what}: {requests} requests");
    healthy_rerun_delivers_everything(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_wodify_page_again_stops_the_poll_in_both_scan_modes() {
    for scan in ["keyset", "pages"] {
        let (h, out) = wodify_paging(PagingFault::RepeatPage, scan).await;
        // A keyset page of the lowest ids again lists ids below its own cursor.
        let says = if scan == "keyset" {
            "out of id order"
        } else {
            "does not advance"
        };
        let requests = h.sims.wodify.stats().requests;
        assert_poll_stopped(&h, &out, says, requests, 3, scan).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsorted_wodify_search_falls_back_to_page_numbers_for_the_scan_and_skips_no_one() {
    // Descending ids within each page: moving the keyset to the page's highest id would skip
    // the rest unseen. The scan goes on by page numbers (`GET /clients` keeps sorting).
    let (h, out) = wodify_paging(PagingFault::Unsorted, "keyset").await;
    figure("unsorted keyset search", &out);
    out.assert_exit(exit::OK);
    assert!(
        out.stderr.contains("out of id order") && out.stderr.contains("by page numbers"),
        "{}",
        out.transcript()
    );
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    // The search's page, then the three pages of 250 clients.
    assert_eq!(h.sims.wodify.stats().requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_wodify_page_ends_the_listing_whatever_has_more_says() {
    let (h, out) = wodify_paging(PagingFault::EmptyHasMore, "pages").await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(&h.sims.revkeen, "wodify", &expected_wodify(&h.sims.wodify));
    // Three pages of clients and the empty one.
    assert_eq!(h.sims.wodify.stats().requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wodify_listing_without_pagination_is_retried_never_taken_for_the_end() {
    for paging in [PagingFault::NoPagination, PagingFault::NoHasMore] {
        let (h, out) = wodify_paging(paging, "keyset").await;
        figure(&format!("{paging:?}"), &out);
        out.assert_exit(exit::UNAVAILABLE);
        assert!(
            out.stderr.contains("pagination"),
            "{paging:?}: {}",
            out.transcript()
        );
        assert!(
            h.sims.revkeen.customers("wodify").is_empty(),
            "{paging:?}: nothing was taken from a listing it could not trust"
        );
        assert_eq!(h.sims.wodify.stats().requests, 2, "max_attempts = 2");
        healthy_rerun_delivers_everything(&h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn practicehub_links_that_loop_stop_the_poll() {
    for next_link in [NextLinkFault::SelfLink, NextLinkFault::Cycle] {
        let h = clinic(250).await;
        h.sims.practicehub.set_faults(Faults {
            next_link: Some(next_link),
            ..Faults::default()
        });
        let out = h.once().await;
        let requests = h.sims.practicehub.stats().requests;
        let what = format!("{next_link:?}");
        assert_poll_stopped(&h, &out, "does not advance", requests, 4, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_practicehub_link_is_the_next_page_not_a_fresh_start() {
    let h = clinic(250).await;
    h.sims.practicehub.set_faults(Faults {
        next_link: Some(NextLinkFault::Relative),
        ..Faults::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::OK);
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    assert_eq!(
        h.sims.practicehub.stats().requests,
        3,
        "three pages, once each"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A 2xx that is not the documented answer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_2xx_is_never_counted_as_delivered() {
    for (batch_size, body) in [
        (100, "{}"),
        (100, r#"{"created":0,"updated":0,"skipped":0,"failed":[]}"#),
        (1, "OK"),
        (1, "<html><body>Welcome</body></html>"),
        (1, r#"{"data":{}}"#),
    ] {
        let h = gym(12).await;
        h.write_config(&with_revkeen(
            &with_revkeen(&h.config_for("gym"), &format!("batch_size = {batch_size}")),
            "max_attempts = 2",
        ));
        h.sims.revkeen.set_faults(Faults {
            bad_2xx_rate: 1.0,
            bad_2xx_body: Some(body.to_string()),
            ..Faults::default()
        });
        let out = h.once().await;
        figure(&format!("2xx {body:?}, batch_size {batch_size}"), &out);
        out.assert_exit(exit::UNAVAILABLE);
        assert!(
            out.stderr.contains("200"),
            "{batch_size} {body}: {}",
            out.transcript()
        );
        assert!(h.sims.revkeen.customers("wodify").is_empty());
        let status = h.status_json().await;
        assert_eq!(status["outbox_depth"], 12, "{body}: {status:#}");
        assert_eq!(
            status["sources"][0]["delivered"]["created"], 0,
            "{body}: {status:#}"
        );
        healthy_rerun_delivers_everything(&h).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. One bad record never poisons its page.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_clients_are_rejected_alone_and_the_rest_syncs() {
    // In page mode: in a keyset scan the injected ids (above the page's) are out of id order,
    // which stops the poll instead (see the unsorted-search test).
    let h = gym(150).await;
    h.write_config(&with_source(
        &h.config_for("gym"),
        "gym",
        "scan = \"pages\"",
    ));
    let corrupt = h.sims.wodify.clients()[40]["id"].as_i64().expect("an id");
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    h.sims.wodify.set_faults(Faults {
        inject: vec![
            Value::Null,
            json!(42),
            json!("a string"),
            json!({"first_name": "NoId", "email": "noid@example.com"}),
            json!({"id": "x", "email": "x@example.com"}),
            json!({"id": 10000.0, "email": "float@example.com"}),
            json!({"id": -5, "email": "minus@example.com"}),
            json!({"id": 0, "email": "zero@example.com"}),
            json!({"id": 1.5, "email": "half@example.com"}),
            json!({"id": "99999999999999999999", "email": "big@example.com"}),
        ],
        inject_raw: vec![
            r#"{"id": 999001, "first_name": "\ud800", "email": "surrogate@example.com"}"#.into(),
            format!(r#"{{"id": 999002, "email": "deep@example.com", "custom": {deep}}}"#),
        ],
        corrupt_utf8_ids: vec![corrupt],
        ..Faults::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    // Every real client but the corrupted one is delivered, and the deeply nested one too.
    let mut expected = expected_wodify(&h.sims.wodify);
    expected.remove(&corrupt.to_string());
    let held = crate::support::at_revkeen(&h.sims.revkeen, "wodify");
    for id in expected.keys() {
        assert!(held.contains_key(id), "client {id} was not delivered");
    }
    assert!(
        h.sims.revkeen.customer("wodify", "999002").is_some(),
        "a client nested deep in a field the daemon never reads is delivered"
    );
    let failures = h.failures();
    let unreadable: Vec<_> = failures.iter().filter(|f| f.code == "unreadable").collect();
    // The ten injected values, the lone surrogate and the bad bytes: each its own row.
    assert_eq!(unreadable.len(), 12, "{failures:#?}");
    assert!(
        unreadable
            .iter()
            .any(|f| f.external_id == corrupt.to_string() || f.reason.contains("UTF-8")),
        "{failures:#?}"
    );
    assert!(
        unreadable
            .iter()
            .all(|f| f.reason.contains("of the first page")),
        "each says where it was: {unreadable:#?}"
    );
    assert!(
        out.stdout.contains("open failures: 12 rejected"),
        "{}",
        out.stdout
    );

    // The bad records gone, the corrupted client readable again: everything is delivered and
    // the rejections of records no longer listed are dropped with the next complete scan.
    h.sims.wodify.set_faults(Faults::default());
    h.once().await.assert_exit(exit::OK);
    let held = crate::support::at_revkeen(&h.sims.revkeen, "wodify");
    for (id, want) in expected_wodify(&h.sims.wodify) {
        assert_eq!(held.get(&id), Some(&want), "client {id}");
    }
    assert!(h.failures().is_empty(), "{:#?}", h.failures());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_patients_are_rejected_alone_without_quoting_them() {
    let h = clinic(150).await;
    h.sims.practicehub.set_faults(Faults {
        deep_nesting: true,
        inject: vec![
            Value::Null,
            json!("PHI-IN-A-STRING"),
            json!({"id": "abc", "email": "abc@example.com", "note": "PHI-NOTE"}),
        ],
        inject_raw: vec![
            r#"{"id": 888001, "email": "s@example.com", "first_name": "\ud800"}"#.into(),
        ],
        ..Faults::default()
    });
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    // Every patient delivered (their 200-deep attribute never read), none of the bad rows.
    assert_revkeen_holds(
        &h.sims.revkeen,
        "practicehub",
        &expected_practicehub(&h.sims.practicehub),
    );
    let failures = h.failures();
    let unreadable: Vec<_> = failures.iter().filter(|f| f.code == "unreadable").collect();
    assert_eq!(unreadable.len(), 4, "{failures:#?}");
    let json = h.run(&["failures", "--json"]).await.stdout;
    assert!(!json.contains("PHI"), "{json}");
    assert!(!state_bytes(&h.state).contains("PHI"));
}

// ---------------------------------------------------------------------------------------------
// 7. and 8. Keys in upstream text; control characters.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_by_an_upstream_is_redacted_everywhere() {
    let h = gym(5).await;
    let echoing = Trap::start(
        401,
        &format!(r#"{{"message": "key {WODIFY_KEY} is not valid for this account"}}"#),
    )
    .await;
    h.write_config(&replaced(
        &h.config_for("gym"),
        &h.sims.wodify_server.url(),
        &echoing.url(),
    ));
    // The harness fails the run if the key shows in stdout or stderr.
    let out = h.once().await;
    out.assert_exit(exit::AUTH_REFUSED);
    assert!(out.stderr.contains("[redacted]"), "{}", out.transcript());
    let status = h.run(&["status", "--json"]).await;
    assert!(status.stdout.contains("[redacted]"), "{}", status.stdout);
    assert!(!state_bytes(&h.state).contains(WODIFY_KEY));
    // The trap saw the key: it is Wodify's own host in this test, asked with one GET.
    let asked = echoing.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].method, "GET");
    assert!(asked[0].path_and_query.starts_with("/clients"), "{asked:?}");
    assert!(
        asked[0]
            .headers
            .iter()
            .any(|(name, value)| name == "x-api-key" && value == WODIFY_KEY)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_revkeen_and_are_escaped_on_a_terminal() {
    let h = gym(3).await;
    let id = h.sims.wodify.clients()[0]["id"].as_i64().expect("an id");
    assert!(h.sims.wodify.update_client(
        id,
        json!({"first_name": "Ada\u{0}\u{7}", "last_name": "\u{1b}[31mByron\u{7f}"})
    ));
    let other = h.sims.wodify.clients()[1]["id"].as_i64().expect("an id");
    h.sims.revkeen.set_rejections(vec![Rejection {
        external_id: Some(other.to_string()),
        email: None,
        status: 400,
        code: "bad\u{1b}]0;owned\u{7}".into(),
        message: "refused \u{1b}[2J".into(),
        field: None,
    }]);
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    let name = h
        .sims
        .revkeen
        .customer("wodify", &id.to_string())
        .and_then(|c| {
            c.fields
                .get("name")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .expect("delivered");
    assert_eq!(name, "Ada [31mByron");
    let text = h.run(&["failures"]).await.stdout;
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}"), "{text}");
    // JSON stays exact.
    let json = h.run(&["failures", "--json"]).await.stdout;
    let list: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(list[0]["code"], "bad\u{1b}]0;owned\u{7}");
}

// ---------------------------------------------------------------------------------------------
// 9. and 10. Sizes and ids.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_cut_long_emails_refused_and_batches_kept_under_a_megabyte() {
    let h = gym(0).await;
    let huge = "N".repeat(1 << 20);
    for id in 1..=10 {
        h.sims.wodify.put_client(json!({
            "id": id, "first_name": huge, "last_name": "Big",
            "email": format!("big{id}@example.com"),
            "tags": (0..10_000).map(|t| format!("tag{t}")).collect::<Vec<_>>(),
        }));
    }
    h.sims.wodify.put_client(json!({
        "id": 11, "first_name": "Long", "email": format!("{}@example.com", "a".repeat(300)),
    }));
    let out = h.once().await;
    out.assert_exit(exit::REJECTED);
    let customer = h.sims.revkeen.customer("wodify", "1").expect("delivered");
    let name = customer.fields["name"].as_str().expect("a name");
    assert_eq!(name.chars().count(), 255, "names are cut at 255 characters");
    let tags = customer.fields["metadata"]["tags"]
        .as_array()
        .expect("tags");
    assert_eq!(tags.len(), 50);
    let failures = h.failures();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(failures[0].external_id, "11");
    assert_eq!(failures[0].code, "invalid_email");
    for request in h.sims.revkeen.requests() {
        let size = request.body.map_or(0, |b| b.len());
        assert!(size <= 1_000_000, "a {size}-byte request body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_takes_exactly_the_ids_a_poll_takes() {
    let h = gym(5).await;
    let toml = with_source(
        &h.config_for("gym"),
        "gym",
        "push_secret = \"push-secret-ids\"",
    );
    let daemon = h
        .start_daemon(&crate::support::yearly_schedules(&toml))
        .await;
    for bad in [
        r#""-5""#,
        r#""0""#,
        r#""abc""#,
        r#""1.5""#,
        r#""99999999999999999999""#,
        "10000.5",
    ] {
        let body = format!(r#"{{"events":[{{"external_id":{bad}}}]}}"#);
        let signature = sync_daemon::server::sign(
            "push-secret-ids",
            body.as_bytes(),
            crate::support::unix_now(),
        );
        let (status, answer) =
            crate::support::push(&daemon, "gym", body.as_bytes(), Some(&signature)).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let body = r#"{"events":[{"external_id":"007"}]}"#;
    let signature = sync_daemon::server::sign(
        "push-secret-ids",
        body.as_bytes(),
        crate::support::unix_now(),
    );
    let (status, answer) =
        crate::support::push(&daemon, "gym", body.as_bytes(), Some(&signature)).await;
    assert_eq!(
        status, 202,
        "a digit string is an id, in canonical form: {answer}"
    );
    daemon.stop().await.assert_exit(exit::OK);
}

// ---------------------------------------------------------------------------------------------
// 11. An untrusted certificate.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_revkeen_certificate_ends_the_run_at_once_saying_so() {
    let h = gym(5).await;
    let (_server, port) = self_signed_tls_server(h.dir()).await;
    h.write_config(&replaced(
        &h.config_for("gym"),
        &h.sims.revkeen_server.url(),
        &format!("https://127.0.0.1:{port}"),
    ));
    let out = h.once().await;
    figure("untrusted certificate", &out);
    out.assert_exit(exit::UNAVAILABLE);
    assert!(
        out.stderr
            .contains("certificate for 127.0.0.1 is not trusted")
            && out.stderr.contains("does not retry"),
        "{}",
        out.transcript()
    );
    assert!(
        !out.stderr.contains("retrying"),
        "an untrusted certificate is not retried: {}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// 12. A dead loop is a dead daemon: `daemon::tests` kills a loop with a panic and checks the
// daemon ends saying why; `server::tests` checks `/readyz` and `/healthz` then fail. (A full
// state file, once the way this test killed the worker, is now a wait: `state_file.rs`.)
