//! Faithful in-memory simulators of the three remote APIs, for the demo, the integration tests
//! and integrators trying a config offline.
//!
//! Each simulator behaves like the API described in `shared/api/` (auth, paging, documented rate
//! limits, error shapes) and adds two things the real services lack: fault injection ([`Faults`])
//! and a `/_sim/...` surface to inspect and change their state. They keep state in memory only.
//! The same state is reachable from Rust (the `*Sim` handles), so in-process tests need no HTTP
//! round trip to check what a simulator received.
//!
//! The two source simulators ([`wodify`], [`practicehub`]) keep their records, key, faults,
//! rate limit and request log, and serve their control surface, through [`source`]; each file
//! keeps only what its API does differently.

pub mod practicehub;
pub mod revkeen;
pub mod source;
pub mod wodify;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Faults a simulator injects into the requests it serves. Every rate is a fraction in `0.0..=1.0`
/// drawn independently per request; all zero, `None` and empty (the default) is a healthy service
/// that behaves as documented. Each field says which simulators honour it; the others ignore it,
/// so one `Faults` can be given to all three. Fields added after the first five are left out of
/// the JSON while at their default, so `GET /_sim/faults` of a healthy RevKeen stays the same.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fraction of requests answered with a 5xx before any work is done.
    pub error_rate: f64,
    /// Fraction of requests answered 429 regardless of the rate limiter (with `Retry-After: 1`
    /// where the API documents the header, or the `retry_after` value when one is set).
    pub rate_429: f64,
    /// Milliseconds added to every request before it is answered.
    pub latency_ms: u64,
    /// Fraction of requests whose connection is dropped before an answer arrives: the request
    /// may already have been applied (RevKeen writes first, then drops), which is what makes
    /// idempotency keys matter.
    pub drop_rate: f64,
    /// Wodify only: fraction of requests answered HTTP 200 with an error envelope
    /// (`{"HTTPCode": 500, ...}`) instead of data.
    pub envelope_rate: f64,
    /// All three: the exact `Retry-After` value sent with the 429s `rate_429` injects, instead
    /// of the computed `1`, e.g. `"18446744073709551615"`, `"86400"` or an HTTP date such as
    /// `"Fri, 31 Dec 9999 23:59:59 GMT"`. A real gateway may send a huge, far-future or
    /// date-form value; a test wants to see the daemon cap or ignore it rather than sleep for
    /// ever. Wodify sends it even when `send_retry_after` is off (setting it means the test wants
    /// the header). 429s from the rate limiter itself keep their computed value. A value that
    /// cannot be a header (a control character) is ignored with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// All three: answer every API request (not `/_sim/…`) with `307 Temporary Redirect` and
    /// `Location: {redirect_to}{path and query as sent}`, and do nothing else (no auth, no
    /// fault, no latency, no write, no record served). A moved service or a misconfigured
    /// proxy does this; a test checks that the daemon does not follow a redirect blindly (a
    /// PUT replayed to another host, the API key sent along). Counted as `redirected` in the
    /// stats and logged with status 307. A value that cannot be a header leaves `Location` out,
    /// with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_to: Option<String>,
    /// RevKeen only: fraction of customer upserts (single `PUT /customers/external/{source}/{id}`
    /// and `PUT /customers/external/batch`) answered `200` with `bad_2xx_body` and
    /// `content-type: application/json` without applying the write: nothing is stored and no
    /// idempotency record is kept, so a retry under the same key is processed afresh (unless
    /// it is picked again). The documented API always answers a 2xx with its documented body;
    /// a proxy, a maintenance page or a regression may not, and a test wants the daemon to
    /// refuse to count such an answer as delivered. Drawn after faults, auth and the rate
    /// limit; counted as `bad_answers`.
    #[serde(skip_serializing_if = "is_zero")]
    pub bad_2xx_rate: f64,
    /// RevKeen only: the body `bad_2xx_rate` answers, sent as is; `None` is `{}`. Typical test
    /// bodies: `{}`, `OK`, `<html>…</html>`, or a well-formed batch answer whose counts do not
    /// match the batch (`{"created":1,"updated":0,"skipped":0,"failed":[]}` for three items).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_2xx_body: Option<String>,
    /// Wodify only: a broken `pagination` on the listings (`GET /clients`, `GET
    /// /clients/search`), which the documented API always gets right; a test wants the daemon
    /// to stop paging (a page cap, an empty page, a missing `has_more`) rather than loop or
    /// stop silently early. See [`PagingFault`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paging: Option<PagingFault>,
    /// Wodify and PracticeHub: values appended to the records array (`clients`, `data`) of the
    /// first listing page only: page 1, or for a Wodify keyset search a cursor `id|gt|0` (an `id`
    /// lower bound of at most 1) or none. Lets a test put `null`, `42`, `"a string"`,
    /// `{"id": "x"}` or a malformed record among real ones, as a real API with bad rows may;
    /// they are not in the record table and do not count towards `page_size`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<serde_json::Value>,
    /// Wodify and PracticeHub: raw JSON texts spliced, unparsed and comma-separated, into the
    /// first page's records array just before its closing `]` (after any `inject` values), so a
    /// test can send what `inject` cannot express: a lone-surrogate escape
    /// (`{"id": 999001, "first_name": "\ud800"}`), a duplicate key, a 200-deep nested array
    /// that `serde_json`'s parser refuses. The rest of the body stays valid JSON; the texts are
    /// the test's responsibility.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject_raw: Vec<String>,
    /// Wodify only: client ids whose `last_name` string carries one `0xFF` byte in the
    /// serialized body (the first byte of the value that is not part of an escape is replaced;
    /// an empty, non-string or missing `last_name` becomes a one-byte string), in every listing
    /// that shows the client and in `GET /clients/{id}`. The body is then not valid UTF-8, as
    /// from a server that stored Latin-1 bytes; a test wants the daemon to skip or repair the
    /// row, not fail the whole page. The stored client is unchanged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub corrupt_utf8_ids: Vec<i64>,
    /// PracticeHub only: a broken `links` object on `GET /api/patients`, where the documented
    /// API gives absolute links that keep the query. A test wants the daemon to detect a link
    /// that does not advance, resolve a relative one, and keep its filters when the link drops
    /// them. See [`NextLinkFault`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_link: Option<NextLinkFault>,
    /// PracticeHub only: every listed patient carries an extra attribute `custom_history`
    /// holding a JSON array nested 200 levels deep (`[[[…1…]]]`), deeper than `serde_json`'s
    /// default recursion limit of 128. The daemon never reads that attribute, so a test wants
    /// it to survive the page (skip the attribute, or the row, not the whole page).
    #[serde(skip_serializing_if = "is_false")]
    pub deep_nesting: bool,
    /// RevKeen only: external ids whose body fails RevKeen's schema, as for a constraint the
    /// daemon cannot know in advance (a length limit, a reserved word). A single upsert of one
    /// answers `400 validation_error` with `details.fields.name`; a batch carrying one is
    /// refused whole with a 400 naming the item, as the simulator does for any item failing the
    /// schema. Counted as `validation_errors`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_refuse: Vec<String>,
}

/// How the Wodify listings break their `pagination` ([`Faults::paging`]); JSON in snake_case
/// (`"repeat_page"`, `"empty_has_more"`, `"no_pagination"`, `"no_has_more"`, `"unsorted"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PagingFault {
    /// Every listing request answers the first page of its query (page 1 whatever `page` says;
    /// for a keyset search, its `id|gt`/`id|gte` cursor ignored, so the lowest ids) with
    /// `has_more: true`; `pagination.page` echoes the page asked for.
    RepeatPage,
    /// Pages are served normally but `has_more` is always `true`: past the last record (a page
    /// beyond the end, or a keyset search `id|gt|N` past the last id) the answer is
    /// `{"clients": [], "pagination": {…, "has_more": true}}` for ever.
    EmptyHasMore,
    /// The `pagination` object is left out of every listing answer.
    NoPagination,
    /// `pagination` is present but without `has_more`.
    NoHasMore,
    /// `GET /clients/search` ignores `sort`: a page holds the clients the query and page select
    /// but in descending id order, as a search that does not support `sort` would answer.
    /// `GET /clients` keeps sorting.
    Unsorted,
}

/// How PracticeHub breaks `links` on `GET /api/patients` ([`Faults::next_link`]); JSON in
/// snake_case (`"self_link"`, `"cycle"`, `"relative"`, `"page_only"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NextLinkFault {
    /// `links.next` equals `links.self` on every page that would have a next.
    SelfLink,
    /// Page 1's next is page 2 and page 2's next is page 1 (1 → 2 → 1 → 2 …); with fewer than 2
    /// pages of data, page 1's next is page 1. Later pages, asked for directly, are normal.
    Cycle,
    /// `self`, `previous` and `next` are relative references, `?page=N&…` with the same query
    /// the absolute link would carry, but no scheme, host or path.
    Relative,
    /// `self`, `previous` and `next` are absolute but carry only `?page=N`, without the filters
    /// or `page_size` of the request, as the documented example links do. Following one
    /// really applies only what it carries: no filter, the default page size.
    PageOnly,
}

fn is_zero(rate: &f64) -> bool {
    *rate == 0.0
}

fn is_false(flag: &bool) -> bool {
    !*flag
}

impl Faults {
    /// True with probability `rate`.
    pub fn roll(rate: f64) -> bool {
        rate > 0.0 && fastrand::f64() < rate
    }

    /// Sleeps for the configured latency, if any.
    pub async fn delay(&self) {
        if self.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.latency_ms)).await;
        }
    }

    /// The `Retry-After` of a 429 the `rate_429` fault injects: [`Faults::retry_after`] when it
    /// is set and can be a header value, else `computed`.
    pub(crate) fn injected_retry_after(
        &self,
        computed: Option<HeaderValue>,
    ) -> Option<HeaderValue> {
        match &self.retry_after {
            Some(value) => header_value(value, "retry_after").or(computed),
            None => computed,
        }
    }

    /// The headers of the 307 [`Faults::redirect_to`] answers `uri` with (`Location` is the
    /// target plus the path and query as sent), or `None` when no redirect is asked for.
    pub(crate) fn redirect_headers(&self, uri: &Uri) -> Option<HeaderMap> {
        let target = self.redirect_to.as_ref()?;
        let path_and_query = uri
            .path_and_query()
            .map_or_else(|| uri.path(), |pq| pq.as_str());
        let mut headers = HeaderMap::new();
        if let Some(location) = header_value(&format!("{target}{path_and_query}"), "redirect_to") {
            headers.insert(header::LOCATION, location);
        }
        Some(headers)
    }
}

/// `text` as a header value, or `None` with a warning naming the `field` it came from.
fn header_value(text: &str, field: &str) -> Option<HeaderValue> {
    match HeaderValue::from_bytes(text.as_bytes()) {
        Ok(value) => Some(value),
        Err(_) => {
            tracing::warn!("Fault {field} {text:?} cannot be a header value; ignored.");
            None
        }
    }
}

/// The answer to a request [`Faults::redirect_to`] redirects: `307 Temporary Redirect`, the
/// given headers, an empty body.
pub(crate) fn redirect_response(headers: HeaderMap) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    *response.headers_mut() = headers;
    response
}

/// A token bucket for a simulator's documented rate limit (`rate` requests per `per`, `burst`
/// at once). `None` rate means unlimited.
pub struct Bucket {
    limiter: Mutex<Option<Arc<DefaultDirectRateLimiter>>>,
}

impl Bucket {
    /// A bucket allowing `rate` requests every `per` with bursts of `burst`; `rate == 0` is
    /// unlimited.
    pub fn new(rate: u32, per: Duration, burst: u32) -> Self {
        let bucket = Bucket {
            limiter: Mutex::new(None),
        };
        bucket.set(rate, per, burst);
        bucket
    }

    /// Changes the limit (tests scale the documented limits down or switch them off).
    pub fn set(&self, rate: u32, per: Duration, burst: u32) {
        let limiter = NonZeroU32::new(rate).map(|rate| {
            let period = per / rate.get();
            let burst = NonZeroU32::new(burst.max(1)).expect("max(1) is non-zero");
            let quota = Quota::with_period(period)
                .expect("a non-zero rate over a non-zero period has a non-zero period")
                .allow_burst(burst);
            Arc::new(RateLimiter::direct(quota))
        });
        *self.limiter.lock().expect("bucket lock poisoned") = limiter;
    }

    /// Takes one token, or says how long until one is available.
    pub fn check(&self) -> Result<(), Duration> {
        let limiter = self.limiter.lock().expect("bucket lock poisoned").clone();
        match limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }
}

/// Whole seconds to put in a `Retry-After` header for a wait (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A response whose body fails before anything is written: hyper then closes the connection
/// and the client sees it drop without an answer, as when a proxy or process dies mid-request.
pub fn dropped_connection() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated dropped connection",
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid")
}

/// A simulator serving on a loopback port until dropped or [`SimServer::shutdown`] is called.
pub struct SimServer {
    /// The address the simulator listens on.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimServer {
    /// Binds `addr` (port 0 picks a free port) and serves `router` in a background task.
    pub async fn spawn(router: Router, addr: SocketAddr) -> std::io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "Simulator stopped.");
            }
        });
        Ok(SimServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, the base URL to put in a config.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Ports for [`SimSet::start`]; 0 picks a free one.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimPorts {
    pub revkeen: u16,
    pub wodify: u16,
    pub practicehub: u16,
}

/// The three simulators together, as `demo`, `sim` and the integration tests use them.
pub struct SimSet {
    pub revkeen: revkeen::RevKeenSim,
    pub wodify: wodify::WodifySim,
    pub practicehub: practicehub::PracticeHubSim,
    pub revkeen_server: SimServer,
    pub wodify_server: SimServer,
    pub practicehub_server: SimServer,
}

/// The API key each simulator accepts by default.
pub const REVKEEN_KEY: &str = "rk_sandbox_sim";
/// See [`REVKEEN_KEY`].
pub const WODIFY_KEY: &str = "wodify_sim_key";
/// See [`REVKEEN_KEY`].
pub const PRACTICEHUB_KEY: &str = "practicehub_sim_key";

impl SimSet {
    /// Starts all three on loopback with their documented limits and default keys.
    pub async fn start(ports: SimPorts) -> std::io::Result<SimSet> {
        let revkeen = revkeen::RevKeenSim::new(revkeen::RevKeenOptions {
            api_keys: vec![REVKEEN_KEY.to_string()],
            ..revkeen::RevKeenOptions::default()
        });
        let wodify = wodify::WodifySim::new(wodify::WodifyOptions {
            api_key: WODIFY_KEY.to_string(),
            ..wodify::WodifyOptions::default()
        });
        let practicehub = practicehub::PracticeHubSim::new(practicehub::PracticeHubOptions {
            api_key: PRACTICEHUB_KEY.to_string(),
            ..practicehub::PracticeHubOptions::default()
        });
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Ok(SimSet {
            revkeen_server: revkeen.spawn(loopback(ports.revkeen)).await?,
            wodify_server: wodify.spawn(loopback(ports.wodify)).await?,
            practicehub_server: practicehub.spawn(loopback(ports.practicehub)).await?,
            revkeen,
            wodify,
            practicehub,
        })
    }

    /// A daemon config pointing at these simulators: one Wodify source `gym` and one
    /// PracticeHub source `clinic`, with the simulators' documented limits.
    pub fn config_toml(&self, state_path: &std::path::Path) -> String {
        format!(
            r#"[daemon]
state_path = "{state}"

[revkeen]
base_url = "{revkeen}"
api_key = "{REVKEEN_KEY}"

[[sources]]
name = "gym"
kind = "wodify"
base_url = "{wodify}"
api_key = "{WODIFY_KEY}"
schedule = "0 */15 * * * *"

[[sources]]
name = "clinic"
kind = "practicehub"
base_url = "{practicehub}/api"
api_key = "{PRACTICEHUB_KEY}"
app_details = "revkeen-sync=ops@clinic.example"
schedule = "0 */5 * * * *"
"#,
            state = state_path
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            revkeen = self.revkeen_server.url(),
            wodify = self.wodify_server.url(),
            practicehub = self.practicehub_server.url(),
        )
    }
}

/// HTTP helpers the simulators' unit tests share.
#[cfg(test)]
mod testing {
    use serde::de::DeserializeOwned;

    /// Sends `request` and returns the status of its answer.
    pub(super) async fn send_status(request: reqwest::RequestBuilder) -> u16 {
        request.send().await.expect("send").status().as_u16()
    }

    /// Sends `request` and reads the JSON body of its answer.
    pub(super) async fn send_json<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
        let response = request.send().await.expect("send");
        response.json().await.expect("JSON body")
    }

    /// Asserts that `sent` brought no data: the simulator dropped the connection.
    pub(super) async fn assert_dropped(sent: reqwest::Result<reqwest::Response>) {
        // hyper polls the body before flushing the headers, so the break usually surfaces as a
        // failed send rather than a failed body read; either way no data arrives.
        match sent {
            Ok(response) => assert!(response.bytes().await.is_err()),
            Err(error) => assert!(error.status().is_none(), "{error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn faults_default_is_all_off_and_every_field_has_a_snake_case_json_name() {
        let default = Faults::default();
        let healthy = json!({
            "error_rate": 0.0,
            "rate_429": 0.0,
            "latency_ms": 0,
            "drop_rate": 0.0,
            "envelope_rate": 0.0,
        });
        assert_eq!(serde_json::to_value(&default).expect("JSON"), healthy);
        let empty: Faults = serde_json::from_value(json!({})).expect("all fields default");
        assert_eq!(empty, default);
        assert_eq!(
            (
                default.retry_after,
                default.redirect_to,
                default.bad_2xx_body
            ),
            (None, None, None)
        );
        assert_eq!((default.bad_2xx_rate, default.deep_nesting), (0.0, false));
        assert_eq!((default.paging, default.next_link), (None, None));
        assert!(default.inject.is_empty() && default.inject_raw.is_empty());
        assert!(default.corrupt_utf8_ids.is_empty() && default.schema_refuse.is_empty());

        let all = json!({
            "error_rate": 0.1,
            "rate_429": 0.2,
            "latency_ms": 3,
            "drop_rate": 0.4,
            "envelope_rate": 0.5,
            "retry_after": "86400",
            "redirect_to": "https://moved.example",
            "bad_2xx_rate": 0.6,
            "bad_2xx_body": "OK",
            "paging": "repeat_page",
            "inject": [null, 42],
            "inject_raw": ["[[]]"],
            "corrupt_utf8_ids": [10001],
            "next_link": "page_only",
            "deep_nesting": true,
            "schema_refuse": ["10042"],
        });
        let faults: Faults = serde_json::from_value(all.clone()).expect("every field");
        let expected = Faults {
            error_rate: 0.1,
            rate_429: 0.2,
            latency_ms: 3,
            drop_rate: 0.4,
            envelope_rate: 0.5,
            retry_after: Some("86400".to_owned()),
            redirect_to: Some("https://moved.example".to_owned()),
            bad_2xx_rate: 0.6,
            bad_2xx_body: Some("OK".to_owned()),
            paging: Some(PagingFault::RepeatPage),
            inject: vec![json!(null), json!(42)],
            inject_raw: vec!["[[]]".to_owned()],
            corrupt_utf8_ids: vec![10_001],
            next_link: Some(NextLinkFault::PageOnly),
            deep_nesting: true,
            schema_refuse: vec!["10042".to_owned()],
        };
        assert_eq!(faults, expected);
        assert_eq!(serde_json::to_value(&faults).expect("JSON"), all);

        for (name, paging) in [
            ("repeat_page", PagingFault::RepeatPage),
            ("empty_has_more", PagingFault::EmptyHasMore),
            ("no_pagination", PagingFault::NoPagination),
            ("no_has_more", PagingFault::NoHasMore),
            ("unsorted", PagingFault::Unsorted),
        ] {
            assert_eq!(serde_json::to_value(paging).expect("JSON"), name);
        }
        for (name, next_link) in [
            ("self_link", NextLinkFault::SelfLink),
            ("cycle", NextLinkFault::Cycle),
            ("relative", NextLinkFault::Relative),
            ("page_only", NextLinkFault::PageOnly),
        ] {
            assert_eq!(serde_json::to_value(next_link).expect("JSON"), name);
        }
        for wrong in [
            json!({"paging": "RepeatPage"}),
            json!({"next_link": "self"}),
            json!({"redirect": "https://moved.example"}),
        ] {
            assert!(
                serde_json::from_value::<Faults>(wrong.clone()).is_err(),
                "{wrong}"
            );
        }
    }
}
