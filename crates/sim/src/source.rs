//! What the two source simulators (Wodify and PracticeHub) share: the record table behind a
//! mutex, the key, faults, rate limit and request log around it, the wrapper that logs every API
//! request, and the `/_sim/...` control surface. A simulator implements `Source` for what
//! differs (its record's name and routes, the ids seeding generates, how the "updated" stamp is
//! read and moved, what a control-plane delete does, and how an API request is answered); its
//! paging, filters, headers and error shapes stay in its own file.
//!
//! The control surface answers `{"message": …}` errors for both simulators and is never logged:
//! only requests that reach `Source::answer` count in [`SourceStats`]. A few helpers the two
//! record generators share (a seeded random stream per record, name-to-email folding) live here
//! as well.

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Bucket, Faults, redirect_response};

/// One API request a simulator served (calls to `/_sim` are not recorded).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceRequest {
    /// HTTP method as sent.
    pub method: String,
    /// Path and query string as sent, still percent-encoded.
    pub path_and_query: String,
    /// Status line of the answer (200 for a dropped connection, which breaks after it).
    pub status: u16,
    /// Arrival time in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The `User-Agent` header, when one was sent as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// Counters over the API requests a simulator served since it started or the log was cleared.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceStats {
    /// Every request outside `/_sim`, whatever its outcome.
    pub requests: u64,
    /// Answered 429, by the rate limiter or by the `rate_429` fault.
    pub rate_limited: u64,
    /// Answered with an injected 5xx (`error_rate`).
    pub errors: u64,
    /// Answered HTTP 200 carrying an error envelope (`envelope_rate`, Wodify only).
    pub envelopes: u64,
    /// Connections broken after the status line (`drop_rate`).
    pub dropped: u64,
    /// Requests with a method other than GET: the daemon must never send one.
    pub non_get: u64,
    /// Answered 401 for a missing or wrong key.
    pub auth_failures: u64,
    /// Answered 307 by the `redirect_to` fault, without doing anything else.
    pub redirected: u64,
}

/// Entries a request log keeps; older ones are forgotten (the stats keep counting) so a long
/// demo run cannot grow without bound.
const LOG_CAPACITY: usize = 100_000;

/// How a request ended, for [`SourceStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Answered,
    Error,
    RateLimited,
    Envelope,
    Dropped,
    AuthFailure,
    Redirected,
}

/// The requests a simulator served and their counters.
#[derive(Default)]
struct RequestLog {
    entries: VecDeque<SourceRequest>,
    stats: SourceStats,
}

impl RequestLog {
    fn record(&mut self, entry: SourceRequest, outcome: Outcome) {
        self.stats.requests += 1;
        // Every non-GET counts, not only those on API routes, so a write anywhere is caught.
        if entry.method != Method::GET.as_str() {
            self.stats.non_get += 1;
        }
        match outcome {
            Outcome::Answered => {}
            Outcome::Error => self.stats.errors += 1,
            Outcome::RateLimited => self.stats.rate_limited += 1,
            Outcome::Envelope => self.stats.envelopes += 1,
            Outcome::Dropped => self.stats.dropped += 1,
            Outcome::AuthFailure => self.stats.auth_failures += 1,
            Outcome::Redirected => self.stats.redirected += 1,
        }
        if self.entries.len() == LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }
}

/// What a source simulator tells the shared record table and control surface about itself.
pub(super) trait Source: Clone + Send + Sync + 'static {
    /// The service, in log lines: `Wodify`.
    const SERVICE: &'static str;
    /// One record, in messages: `client`.
    const RECORD: &'static str;
    /// The records, naming the `/_sim/{RECORDS}` routes: `clients`.
    const RECORDS: &'static str;
    /// The id of the first generated record: seeding `count` gives `FIRST_ID..FIRST_ID + count`.
    const FIRST_ID: i64;
    /// A record's "updated" stamp as read before a change.
    type Stamp;

    /// The generated record `id` under `seed`.
    fn generate(id: i64, seed: u64) -> Value;
    /// The record's "updated" stamp, if it has a readable one.
    fn updated(record: &Value) -> Option<Self::Stamp>;
    /// Moves the "updated" stamp of a record just changed, whose stamp was `previous`.
    fn bump_updated(record: &mut Map<String, Value>, previous: Option<Self::Stamp>);

    /// The record table and everything around it.
    fn core(&self) -> &SourceCore<Self>;
    /// Replaces every record by `count` generated ones (`POST /_sim/{RECORDS}/seed`).
    fn seed_records(&self, count: usize, seed: u64) {
        self.core().seed(count, seed);
    }
    /// Merges `patch` into record `id` and moves its stamp (`PATCH /_sim/{RECORDS}/{id}`);
    /// the record as it is now, or `None` if absent or `patch` is not an object.
    fn patch_record(&self, id: i64, patch: Value) -> Option<Value> {
        self.core().update(id, patch)
    }
    /// What `DELETE /_sim/{RECORDS}/{id}` does (a hard or a soft delete); false if absent.
    fn delete(&self, id: i64) -> bool;
    /// Answers one API request (anything outside `/_sim`) and says how it ended.
    fn answer(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> impl Future<Output = (Response, Outcome)> + Send;
}

/// The state a source simulator keeps: its records by id, the key requests must send, the
/// injected faults, the documented rate limit and the request log.
pub(super) struct SourceCore<S> {
    state: Mutex<SourceState>,
    bucket: Bucket,
    source: PhantomData<fn() -> S>,
}

/// What [`SourceCore`] keeps behind its mutex.
pub(super) struct SourceState {
    api_key: String,
    faults: Faults,
    /// Every record in id order, stored as given.
    pub(super) records: BTreeMap<i64, Value>,
    log: RequestLog,
}

impl<S: Source> SourceCore<S> {
    /// No records, no faults, `api_key` required and `requests_per_second` allowed in bursts of
    /// `burst` (0 is unlimited).
    pub(super) fn new(api_key: String, requests_per_second: u32, burst: u32) -> Self {
        SourceCore {
            state: Mutex::new(SourceState {
                api_key,
                faults: Faults::default(),
                records: BTreeMap::new(),
                log: RequestLog::default(),
            }),
            bucket: Bucket::new(requests_per_second, Duration::from_secs(1), burst),
            source: PhantomData,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SourceState> {
        self.state.lock().expect("source simulator lock poisoned")
    }

    pub(super) fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub(super) fn set_api_key(&self, key: &str) {
        key.clone_into(&mut self.lock().api_key);
    }

    pub(super) fn set_rate_limit(&self, requests_per_second: u32, burst: u32) {
        self.bucket
            .set(requests_per_second, Duration::from_secs(1), burst);
    }

    /// The faults to inject into a request and whether it `presented` the right key, read
    /// together so a request sees one consistent setting.
    pub(super) fn faults_and_key(&self, presented: Option<&str>) -> (Faults, bool) {
        let state = self.lock();
        (
            state.faults.clone(),
            presented == Some(state.api_key.as_str()),
        )
    }

    /// Takes a token from the rate limit, or says how long until one is available.
    pub(super) fn check_rate(&self) -> Result<(), Duration> {
        self.bucket.check()
    }

    /// Replaces all records by `count` generated ones with ids from [`Source::FIRST_ID`] up.
    pub(super) fn seed(&self, count: usize, seed: u64) {
        let records = (0..i64::try_from(count).unwrap_or(i64::MAX))
            .map(|n| {
                let id = S::FIRST_ID + n;
                (id, S::generate(id, seed))
            })
            .collect();
        self.lock().records = records;
    }

    /// All records, sorted by id.
    pub(super) fn records(&self) -> Vec<Value> {
        self.lock().records.values().cloned().collect()
    }

    pub(super) fn record(&self, id: i64) -> Option<Value> {
        self.lock().records.get(&id).cloned()
    }

    /// Inserts or replaces the record with the same integer `"id"`, stored as given. A value
    /// without one cannot be stored and is dropped with a warning.
    pub(super) fn put(&self, record: Value) {
        match record.get("id").and_then(Value::as_i64) {
            Some(id) => {
                self.lock().records.insert(id, record);
            }
            None => tracing::warn!(
                "Simulated {} {} without an integer id ignored.",
                S::SERVICE,
                S::RECORD
            ),
        }
    }

    /// Merges the top-level keys of `patch` into record `id` and bumps its "updated" stamp;
    /// the record as it is now, or `None` if absent or `patch` is not an object.
    pub(super) fn update(&self, id: i64, patch: Value) -> Option<Value> {
        self.update_with(id, patch, S::bump_updated)
    }

    /// [`SourceCore::update`] with the stamp moved by `bump` (a simulator whose clock or
    /// stamp format is a setting of its own).
    pub(super) fn update_with(
        &self,
        id: i64,
        patch: Value,
        bump: impl FnOnce(&mut Map<String, Value>, Option<S::Stamp>),
    ) -> Option<Value> {
        let mut state = self.lock();
        let record = state.records.get_mut(&id)?;
        let previous = S::updated(record);
        if !merge_top_level(record, patch) {
            return None;
        }
        // The merge succeeded, so the record is an object.
        bump(record.as_object_mut()?, previous);
        Some(record.clone())
    }

    /// Deletes record `id` outright; false if it was absent.
    pub(super) fn remove(&self, id: i64) -> bool {
        self.lock().records.remove(&id).is_some()
    }

    pub(super) fn requests(&self) -> Vec<SourceRequest> {
        self.lock().log.entries.iter().cloned().collect()
    }

    pub(super) fn stats(&self) -> SourceStats {
        self.lock().log.stats.clone()
    }

    pub(super) fn clear_log(&self) {
        self.lock().log = RequestLog::default();
    }
}

/// The API (every path outside `/_sim`, answered by [`Source::answer`] and logged) plus the
/// `/_sim` control surface with `extra` control routes of the simulator's own.
pub(super) fn router<S: Source>(sim: &S, extra: Router<S>) -> Router {
    let records = format!("/{}", S::RECORDS);
    let control = Router::new()
        .route("/stats", get(sim_stats::<S>))
        .route("/requests", get(sim_requests::<S>))
        .route("/reset-log", post(sim_reset_log::<S>))
        .route("/faults", put(sim_faults::<S>))
        .route("/key", put(sim_key::<S>))
        .route("/rate-limit", put(sim_rate_limit::<S>))
        .route(&records, get(sim_records::<S>))
        .route(&format!("{records}/seed"), post(sim_seed::<S>))
        .route(
            &format!("{records}/{{id}}"),
            put(sim_put::<S>)
                .patch(sim_patch::<S>)
                .delete(sim_delete::<S>),
        )
        .merge(extra)
        // Without its own fallback a typo under /_sim would be served (and logged) as an
        // API request.
        .fallback(sim_not_found);
    Router::new()
        .nest("/_sim", control)
        .fallback(serve_api::<S>)
        .with_state(sim.clone())
}

async fn serve_api<S: Source>(State(sim): State<S>, request: Request) -> Response {
    let at_ms = now_ms();
    let (parts, _body) = request.into_parts();
    let redirect = sim.core().lock().faults.redirect_headers(&parts.uri);
    let (response, outcome) = match redirect {
        // Before routing, faults and auth: a redirecting front serves nothing of the API.
        Some(headers) => (redirect_response(headers), Outcome::Redirected),
        None => sim.answer(&parts.method, &parts.uri, &parts.headers).await,
    };
    let entry = SourceRequest {
        method: parts.method.to_string(),
        path_and_query: path_and_query(&parts.uri),
        status: response.status().as_u16(),
        at_ms,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    sim.core().lock().log.record(entry, outcome);
    response
}

async fn sim_not_found() -> Response {
    message(StatusCode::NOT_FOUND, "No such simulator route.")
}

async fn sim_stats<S: Source>(State(sim): State<S>) -> Json<SourceStats> {
    Json(sim.core().stats())
}

async fn sim_requests<S: Source>(State(sim): State<S>) -> Json<Vec<SourceRequest>> {
    Json(sim.core().requests())
}

async fn sim_reset_log<S: Source>(State(sim): State<S>) -> StatusCode {
    sim.core().clear_log();
    StatusCode::NO_CONTENT
}

async fn sim_faults<S: Source>(State(sim): State<S>, Json(faults): Json<Faults>) -> StatusCode {
    sim.core().set_faults(faults);
    StatusCode::NO_CONTENT
}

/// Body of `PUT /_sim/key`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    api_key: String,
}

async fn sim_key<S: Source>(State(sim): State<S>, Json(body): Json<KeyBody>) -> StatusCode {
    sim.core().set_api_key(&body.api_key);
    StatusCode::NO_CONTENT
}

/// Body of `PUT /_sim/rate-limit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitBody {
    requests_per_second: u32,
    burst: u32,
}

async fn sim_rate_limit<S: Source>(
    State(sim): State<S>,
    Json(body): Json<RateLimitBody>,
) -> StatusCode {
    sim.core()
        .set_rate_limit(body.requests_per_second, body.burst);
    StatusCode::NO_CONTENT
}

/// Body of `POST /_sim/…/seed`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedBody {
    count: usize,
    #[serde(default)]
    seed: u64,
}

async fn sim_records<S: Source>(State(sim): State<S>) -> Json<Vec<Value>> {
    Json(sim.core().records())
}

async fn sim_seed<S: Source>(State(sim): State<S>, Json(body): Json<SeedBody>) -> StatusCode {
    sim.seed_records(body.count, body.seed);
    StatusCode::NO_CONTENT
}

async fn sim_put<S: Source>(
    State(sim): State<S>,
    Path(id): Path<i64>,
    Json(mut record): Json<Value>,
) -> Response {
    let Some(object) = record.as_object_mut() else {
        let text = format!("A {} must be a JSON object.", S::RECORD);
        return message(StatusCode::BAD_REQUEST, &text);
    };
    // The path names the record; a differing or missing id in the body would store it
    // somewhere the caller did not ask for.
    object.insert("id".to_owned(), Value::from(id));
    sim.core().put(record.clone());
    json_response(StatusCode::OK, &record)
}

async fn sim_patch<S: Source>(
    State(sim): State<S>,
    Path(id): Path<i64>,
    Json(patch): Json<Value>,
) -> Response {
    if !patch.is_object() {
        return message(StatusCode::BAD_REQUEST, "A patch must be a JSON object.");
    }
    match sim.patch_record(id, patch) {
        Some(record) => json_response(StatusCode::OK, &record),
        None => no_such_record::<S>(),
    }
}

async fn sim_delete<S: Source>(State(sim): State<S>, Path(id): Path<i64>) -> Response {
    if sim.delete(id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        no_such_record::<S>()
    }
}

fn no_such_record<S: Source>() -> Response {
    message(StatusCode::NOT_FOUND, &format!("No such {}.", S::RECORD))
}

/// A JSON answer.
pub(super) fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, Json(body)).into_response()
}

/// A JSON answer whose body is already serialized (and may be neither valid JSON nor UTF-8,
/// when a fault says so).
pub(super) fn raw_json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The body of a listing answer, `{"<key>": [items…, raw…], "<member>": value, …}`,
/// serialized compactly as `serde_json` would, with each item written by `write_item` and the
/// `raw` texts ([`injected`]) spliced unparsed, comma-separated, before the array's closing `]`.
pub(super) fn listing_body(
    key: &str,
    items: &[Value],
    raw: &[String],
    members: &[(&str, Value)],
    mut write_item: impl FnMut(&mut Vec<u8>, &Value),
) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(b'{');
    write_json(&mut out, &Value::from(key));
    out.extend_from_slice(b":[");
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_item(&mut out, item);
    }
    for (index, text) in raw.iter().enumerate() {
        if index > 0 || !items.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(text.as_bytes());
    }
    out.push(b']');
    for (name, value) in members {
        out.push(b',');
        write_json(&mut out, &Value::from(*name));
        out.push(b':');
        write_json(&mut out, value);
    }
    out.push(b'}');
    out
}

/// The texts the first page of a listing appends to its records array: the `inject` values
/// serialized, then the `inject_raw` texts as given.
pub(super) fn injected(faults: &Faults) -> Vec<String> {
    faults
        .inject
        .iter()
        .map(Value::to_string)
        .chain(faults.inject_raw.iter().cloned())
        .collect()
}

/// Appends `value` serialized compactly.
pub(super) fn write_json(out: &mut Vec<u8>, value: &Value) {
    serde_json::to_writer(out, value).expect("a serde_json::Value always serializes");
}

/// `{"message": …}`: the control surface's error shape, and PracticeHub's.
pub(super) fn message(status: StatusCode, text: &str) -> Response {
    json_response(status, &json!({"message": text}))
}

/// Milliseconds since the Unix epoch, for [`SourceRequest::at_ms`].
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The path and query of `uri` as sent.
fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned())
}

/// The decoded query parameters of `uri` in order, or `None` if the query is not form-encoded.
pub(super) fn query_pairs(uri: &Uri) -> Option<Vec<(String, String)>> {
    Query::<Vec<(String, String)>>::try_from_uri(uri)
        .ok()
        .map(|Query(pairs)| pairs)
}

/// The items on 1-based `page` of `page_size` and whether any come after them.
pub(super) fn page_of<T>(items: &[T], page: u64, page_size: u64) -> (&[T], bool) {
    let start = (page - 1)
        .checked_mul(page_size)
        .and_then(|start| usize::try_from(start).ok())
        .unwrap_or(usize::MAX)
        .min(items.len());
    let end = start
        .saturating_add(usize::try_from(page_size).unwrap_or(usize::MAX))
        .min(items.len());
    (&items[start..end], end < items.len())
}

/// Copies the top-level keys of `patch` into `record`; false if either is not an object.
pub(super) fn merge_top_level(record: &mut Value, patch: Value) -> bool {
    match (record.as_object_mut(), patch) {
        (Some(record), Value::Object(patch)) => {
            record.extend(patch);
            true
        }
        _ => false,
    }
}

/// The instant generated data leads up to: 2026-01-01T00:00:00Z. Fixed rather than "now" so a
/// seed produces the same records on any day.
pub(super) const GENERATED_UNTIL_SECS: i64 = 1_767_225_600;

/// A random stream for record `id` under `seed`: a splitmix64 finaliser over both, so
/// neighbouring ids and seeds give unrelated records.
pub(super) fn record_rng(id: i64, seed: u64) -> fastrand::Rng {
    let mut z = seed ^ id.cast_unsigned().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    fastrand::Rng::with_seed(z ^ (z >> 31))
}

/// One of `items`, uniformly.
pub(super) fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// `name` reduced to lowercase ASCII letters, for the local part of a generated email.
pub(super) fn email_part(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `word` with its first letter upper-cased.
pub(super) fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// A check of the control routes both source simulators share, for their tests.
#[cfg(test)]
pub(super) mod testing {
    use super::{Source, SourceRequest, SourceStats};
    use crate::SimServer;
    use crate::testing::{send_json, send_status};

    /// Checks the `/_sim` routes every source simulator has beyond its records: a new key, rate
    /// limit and faults take effect on `api` (an authorised API request, answering its status),
    /// and stats, requests and reset-log report exactly the four API requests made here. Wants
    /// an unlimited simulator without faults that accepts `key`; clears the log first and
    /// leaves the simulator as it found it, log emptied.
    pub(crate) async fn shared_control_routes<S: Source>(
        sim: &S,
        server: &SimServer,
        key: &str,
        api: impl AsyncFn() -> u16,
    ) {
        let http = reqwest::Client::new();
        let url = |path: &str| format!("{}/_sim{path}", server.url());
        sim.core().clear_log();

        let rotated = http
            .put(url("/key"))
            .json(&serde_json::json!({"api_key": "k2"}));
        assert_eq!(send_status(rotated).await, 204);
        assert_eq!(api().await, 401);
        sim.core().set_api_key(key);

        let limit = serde_json::json!({"requests_per_second": 1, "burst": 1});
        assert_eq!(
            send_status(http.put(url("/rate-limit")).json(&limit)).await,
            204
        );
        assert_eq!(api().await, 200);
        assert_eq!(api().await, 429);
        sim.core().set_rate_limit(0, 0);

        let faults = serde_json::json!({"error_rate": 1.0});
        assert_eq!(
            send_status(http.put(url("/faults")).json(&faults)).await,
            204
        );
        assert_eq!(api().await, 500);
        sim.core().set_faults(crate::Faults::default());

        let stats: SourceStats = send_json(http.get(url("/stats"))).await;
        assert_eq!(stats, sim.core().stats());
        let counted = (
            stats.requests,
            stats.errors,
            stats.rate_limited,
            stats.auth_failures,
        );
        assert_eq!(counted, (4, 1, 1, 1));
        let requests: Vec<SourceRequest> = send_json(http.get(url("/requests"))).await;
        assert_eq!(requests.len(), 4);
        assert!(
            requests
                .iter()
                .all(|r| !r.path_and_query.starts_with("/_sim"))
        );
        assert_eq!(send_status(http.get(url("/nope"))).await, 404);

        assert_eq!(send_status(http.post(url("/reset-log"))).await, 204);
        assert_eq!(sim.core().stats(), SourceStats::default());
        assert!(sim.core().requests().is_empty());
    }

    /// Checks a simulator whose faults redirect to `to` (with another fault set too): each of
    /// `sent` (method, path and query, without a key) is answered `307` to `{to}{path and
    /// query}` with an empty body, before routing, auth and any other fault; each is logged
    /// and counted as redirected; the control surface at `/_sim{control}` is not redirected.
    /// Wants the log cleared before.
    pub(crate) async fn redirects_everything<S: Source>(
        sim: &S,
        server: &SimServer,
        to: &str,
        sent: &[(axum::http::Method, &str)],
        control: &str,
    ) {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        for (method, path_and_query) in sent {
            let request = http.request(method.clone(), format!("{}{path_and_query}", server.url()));
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 307, "{path_and_query}");
            assert_eq!(
                response.headers()[axum::http::header::LOCATION],
                format!("{to}{path_and_query}").as_str()
            );
            assert!(response.bytes().await.expect("body").is_empty());
        }
        let records = http.get(format!("{}/_sim{control}", server.url()));
        assert_eq!(send_status(records).await, 200, "the control surface stays");

        let stats = sim.core().stats();
        let non_get = sent
            .iter()
            .filter(|(method, _)| method != axum::http::Method::GET)
            .count();
        let n = sent.len() as u64;
        assert_eq!(
            (stats.requests, stats.redirected, stats.non_get),
            (n, n, non_get as u64)
        );
        assert_eq!(
            (stats.errors, stats.rate_limited, stats.auth_failures),
            (0, 0, 0)
        );
        let log: Vec<(String, u16)> = sim
            .core()
            .requests()
            .into_iter()
            .map(|r| (r.path_and_query, r.status))
            .collect();
        let expected: Vec<(String, u16)> = sent
            .iter()
            .map(|(_, path)| ((*path).to_owned(), 307))
            .collect();
        assert_eq!(log, expected);
    }
}
