//! Simulator of the Wodify client API (`shared/api/wodify.md`): `x-api-key` auth, 1-based
//! `page`/`page_size` paging with `has_more` and no total, `sort=field`/`sort=desc_field`, the
//! `q=field|op|value;…` search language, the list/detail shape difference (`created_on` vs
//! `created`), the gateway's 403 `Missing Authentication Token` for unknown paths, the error
//! envelope — including the one that arrives inside an HTTP 200 — and the documented 5 rps /
//! burst 20 limit with no `Retry-After`. Generated clients carry the data quirks the daemon has
//! to survive: padded and mixed-case emails, free-text phones, `1900-01-01` null sentinels,
//! datetimes with and without `Z`, and several spellings of the country.
//!
//! Where it deliberately differs or has to guess: the monthly quota (500k requests) is not
//! counted, but [`WodifySwitches::quota_spent`] answers every request as a spent one would (429
//! `{"message": "Limit Exceeded"}`); [`WodifySwitches::live`] gives the shapes public code that
//! calls the live API reports (gateway-style 429 bodies, a search that ignores `sort`); routes are served at the root (`/clients`, not `/v1/clients`) so the simulator's
//! URL is the base URL; search is case-sensitive, SQL-like about nulls (a null matches only
//! `is_null`), also accepts dotted paths (`updated.updated_on_datetime`) and, on the
//! `created_on`/`updated` objects, compares their `*_datetime` member, because the real filter
//! semantics there are unverified; an unknown field in `q` or `sort`, a missing `q` and a
//! `page`/`page_size` below 1 are 400 envelopes rather than silently ignored; the `rate_429`
//! fault carries `Retry-After` only when `send_retry_after` is on or the `retry_after` fault
//! gives a value, as Wodify documents none;
//! every non-GET outside `/_sim` counts as `non_get`, not just those on API routes, so a write
//! anywhere is caught. Generated timestamps lie before a fixed instant (2026-01-01) so a seed
//! gives the same data on any day.
//!
//! The client table, request log and `/_sim` control surface are the ones in [`super::source`],
//! shared with the PracticeHub simulator; this file says what is Wodify's own.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};

use super::source::{
    self, GENERATED_UNTIL_SECS, Outcome, Source, SourceCore, SourceRequest, SourceStats,
    capitalized, email_part, injected, json_response, listing_body, page_of, pick, query_pairs,
    raw_json_response, record_rng, write_json,
};
use super::{Faults, PagingFault, SimServer, dropped_connection, retry_after_secs};

/// How the simulated account departs from the documented API ([`WodifyOptions::switches`]):
/// the shapes public code that calls the live API reports, and a spent quota. All off is the
/// documented API; [`WodifySwitches::live`] is the live variant. `PUT /_sim/switches` sets them
/// (JSON, every field optional).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WodifySwitches {
    /// 429s (the rate limiter's and the `rate_429` fault's) answer as the AWS API Gateway in
    /// front of the live API does, `{"message": "Too Many Requests"}`, instead of the
    /// documented error envelope.
    pub gateway_429: bool,
    /// `GET /clients/search` ignores `sort`, as a live integrator reports: the clients the
    /// query selects come in a scrambled (but stable) order across pages, so a page of
    /// `id|gt|N` holds ids that are not the lowest ones and not ascending. `GET /clients` keeps
    /// sorting.
    pub search_ignores_sort: bool,
    /// The month's quota of the key is spent: every API request with the right key answers
    /// 429 `{"message": "Limit Exceeded"}` (the gateway's usage-plan quota), whatever else.
    pub quota_spent: bool,
    /// Fraction of requests answered HTTP 200 with the second error envelope some endpoints
    /// use, `{"APIError": {"ErrorMessage": "…"}}`, instead of data.
    pub api_error_rate: f64,
}

impl WodifySwitches {
    /// The live variant: gateway-style 429s and a search that ignores `sort`.
    pub fn live() -> WodifySwitches {
        WodifySwitches {
            gateway_429: true,
            search_ignores_sort: true,
            ..WodifySwitches::default()
        }
    }
}

/// Settings a [`WodifySim`] starts with; all can be changed later.
#[derive(Clone, Debug)]
pub struct WodifyOptions {
    /// The key requests must send in `x-api-key`.
    pub api_key: String,
    /// Sustained requests per second before 429s; 0 is unlimited. Documented: 5.
    pub requests_per_second: u32,
    /// Requests allowed at once before the sustained rate applies. Documented: 20.
    pub burst: u32,
    /// Add `Retry-After` to 429s. Wodify documents none, so off by default; on lets tests
    /// check that the daemon honours one if it ever appears.
    pub send_retry_after: bool,
    /// Departures from the documented API (all off by default).
    pub switches: WodifySwitches,
}

impl Default for WodifyOptions {
    fn default() -> Self {
        WodifyOptions {
            api_key: "wodify_sim_key".to_owned(),
            requests_per_second: 5,
            burst: 20,
            send_retry_after: false,
            switches: WodifySwitches::default(),
        }
    }
}

/// The most items a page holds; larger `page_size` values are clamped to it.
const MAX_PAGE_SIZE: u64 = 100;

/// The client statuses every simulated account has configured.
const STATUSES: [(i64, &str); 3] = [(10, "Active"), (11, "Inactive"), (12, "Suspended")];

/// The envelope's `MoreInfo` link.
const MORE_INFO: &str = "https://docs.wodify.com/";

/// Handle to a simulated Wodify account; clones share state.
#[derive(Clone)]
pub struct WodifySim {
    inner: Arc<Inner>,
}

struct Inner {
    core: SourceCore<WodifySim>,
    send_retry_after: bool,
    switches: std::sync::Mutex<WodifySwitches>,
}

impl WodifySim {
    /// An account with no clients; call [`WodifySim::seed`] or [`WodifySim::put_client`].
    pub fn new(options: WodifyOptions) -> Self {
        WodifySim {
            inner: Arc::new(Inner {
                core: SourceCore::new(options.api_key, options.requests_per_second, options.burst),
                send_retry_after: options.send_retry_after,
                switches: std::sync::Mutex::new(options.switches),
            }),
        }
    }

    /// The API routes at the root plus the `/_sim` control surface (with `PUT
    /// /_sim/switches`).
    pub fn router(&self) -> Router {
        let extra = Router::new().route("/switches", axum::routing::put(sim_switches));
        source::router(self, extra)
    }

    /// Replaces the departures from the documented API.
    pub fn set_switches(&self, switches: WodifySwitches) {
        *self
            .inner
            .switches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = switches;
    }

    /// The departures from the documented API in force.
    pub fn switches(&self) -> WodifySwitches {
        self.inner
            .switches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves [`WodifySim::router`] on `addr` (port 0 picks a free one).
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        SimServer::spawn(self.router(), addr).await
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.core().set_faults(faults);
    }

    /// Changes the key requests must send.
    pub fn set_api_key(&self, key: &str) {
        self.core().set_api_key(key);
    }

    /// Changes the rate limit (0 = unlimited); the bucket starts full.
    pub fn set_rate_limit(&self, requests_per_second: u32, burst: u32) {
        self.core().set_rate_limit(requests_per_second, burst);
    }

    /// Replaces all clients by `count` generated ones with ids `10001..=10000+count`.
    pub fn seed(&self, count: usize, seed: u64) {
        self.core().seed(count, seed);
    }

    /// All clients in list shape, sorted by id.
    pub fn clients(&self) -> Vec<Value> {
        self.core().records()
    }

    /// One client in list shape.
    pub fn client(&self, id: i64) -> Option<Value> {
        self.core().record(id)
    }

    /// Inserts or replaces the client with the same integer `"id"`, stored as given. A value
    /// without one cannot be stored and is dropped with a warning.
    pub fn put_client(&self, client: Value) {
        self.core().put(client);
    }

    /// Merges the top-level keys of `patch` into client `id` and sets
    /// `updated.updated_on_datetime` to now (UTC, whole seconds), never earlier than it was.
    /// False if the client is absent or `patch` is not an object.
    pub fn update_client(&self, id: i64, patch: Value) -> bool {
        self.core().update(id, patch).is_some()
    }

    /// Deletes client `id` outright: like a hard delete upstream, visible only as absence.
    pub fn remove_client(&self, id: i64) -> bool {
        self.core().remove(id)
    }

    /// The API requests served, oldest first.
    pub fn requests(&self) -> Vec<SourceRequest> {
        self.core().requests()
    }

    /// Counters over the API requests served.
    pub fn stats(&self) -> SourceStats {
        self.core().stats()
    }

    /// Forgets the request log and zeroes the stats.
    pub fn clear_log(&self) {
        self.core().clear_log();
    }

    /// The answer to an authorised, rate-limited GET, with the listing `faults` applied.
    fn respond(&self, route: &Route, uri: &Uri, faults: &Faults) -> Response {
        let Some(pairs) = query_pairs(uri) else {
            return bad_request("The query string is not form-encoded.");
        };
        let param = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        match route {
            Route::Detail(raw) => {
                let Ok(id) = raw.parse::<i64>() else {
                    return bad_request(&format!("Client id {raw:?} is not an integer."));
                };
                match self.client(id) {
                    Some(client) => {
                        let mut body = Vec::new();
                        write_client(&mut body, &detail_shape(client), faults);
                        raw_json_response(StatusCode::OK, body)
                    }
                    None => error_response(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("Client {id} was not found."),
                    ),
                }
            }
            Route::Statuses => {
                let (page, page_size) = match paging(param("page"), param("page_size")) {
                    Ok(paging) => paging,
                    Err(message) => return bad_request(&message),
                };
                let statuses: Vec<Value> = STATUSES
                    .iter()
                    .map(|(id, status)| json!({"id": id, "status": status}))
                    .collect();
                let (items, has_more) = page_of(&statuses, page, page_size);
                let items: Vec<Value> = items.to_vec();
                json_response(
                    StatusCode::OK,
                    &json!({
                        "statuses": items,
                        "pagination": {"page": page, "page_size": page_size, "has_more": has_more},
                    }),
                )
            }
            Route::List | Route::Search => {
                let (page, page_size) = match paging(param("page"), param("page_size")) {
                    Ok(paging) => paging,
                    Err(message) => return bad_request(&message),
                };
                let conditions = if *route == Route::Search {
                    match param("q").map(parse_search) {
                        Some(Ok(conditions)) => conditions,
                        Some(Err(message)) => return bad_request(&message),
                        None => return bad_request("Missing required parameter q."),
                    }
                } else {
                    Vec::new()
                };
                self.list(route, page, page_size, conditions, param("sort"), faults)
            }
        }
    }

    /// One page of a listing (`GET /clients` or `/clients/search` with its `q` parsed), with
    /// the `paging`, `inject`, `inject_raw` and `corrupt_utf8_ids` faults applied.
    fn list(
        &self,
        route: &Route,
        page: u64,
        page_size: u64,
        mut conditions: Vec<Condition>,
        sort: Option<&str>,
        faults: &Faults,
    ) -> Response {
        let lower_bound = |conditions: &[Condition]| {
            conditions
                .iter()
                .filter_map(Condition::id_lower_bound)
                .max()
                .unwrap_or(i64::MIN)
        };
        // Page 1 of a listing, or of a keyset search whose cursor is `id|gt|0` (or absent).
        let first_page = page == 1 && lower_bound(&conditions) <= 1;
        let mut served_page = page;
        if faults.paging == Some(PagingFault::RepeatPage) {
            // Stuck at the start: the page asked for and the keyset cursor are both ignored.
            served_page = 1;
            conditions.retain(|c| !(c.field == "id" && matches!(c.op, Op::Gt | Op::Gte)));
        }
        let shared = self.core().lock();
        let known = |field: &str| is_known_field(&shared.records, field);
        if let Some(unknown) = conditions.iter().find(|c| !known(&c.field)) {
            let message = format!("Unknown field {:?} in q.", unknown.field);
            return bad_request(&message);
        }
        let sort = match sort.map(parse_sort) {
            None => None,
            Some(sort) if known(&sort.0) => Some(sort),
            Some((field, _)) => return bad_request(&format!("Cannot sort by {field:?}.")),
        };
        let by_id = sort
            .as_ref()
            .is_none_or(|(field, descending)| field == "id" && !descending);
        let scrambled = *route == Route::Search && self.switches().search_ignores_sort;
        let (items, has_more): (Vec<&Value>, bool) = if scrambled {
            // No sort at all: a stable order that is not the id order.
            let mut matching: Vec<&Value> = shared
                .records
                .iter()
                .filter(|(_, client)| conditions.iter().all(|c| c.matches(client)))
                .map(|(_, client)| client)
                .collect();
            matching.sort_by_key(|client| {
                scramble(client.get("id").and_then(Value::as_i64).unwrap_or(0))
            });
            let (items, has_more) = page_of(&matching, served_page, page_size);
            (items.to_vec(), has_more)
        } else if by_id {
            // Clients are kept in id order: walk from the tightest `id` lower bound and stop
            // after the page, as the real API's keyset paging does, instead of filtering and
            // sorting the whole table on every request.
            let from = lower_bound(&conditions);
            let skip =
                usize::try_from((served_page - 1).saturating_mul(page_size)).unwrap_or(usize::MAX);
            let size = usize::try_from(page_size).unwrap_or(usize::MAX);
            let mut items: Vec<&Value> = shared
                .records
                .range(from..)
                .map(|(_, client)| client)
                .filter(|client| conditions.iter().all(|c| c.matches(client)))
                .skip(skip)
                .take(size.saturating_add(1))
                .collect();
            let has_more = items.len() > size;
            items.truncate(size);
            (items, has_more)
        } else {
            let mut matching: Vec<&Value> = shared
                .records
                .values()
                .filter(|client| conditions.iter().all(|c| c.matches(client)))
                .collect();
            if let Some((field, descending)) = &sort {
                // Stable, so ties stay in id order.
                matching.sort_by(|a, b| {
                    let order = sort_order(resolve(a, field), resolve(b, field));
                    if *descending { order.reverse() } else { order }
                });
            }
            let (items, has_more) = page_of(&matching, served_page, page_size);
            (items.to_vec(), has_more)
        };
        let mut clients: Vec<Value> = items.iter().map(|client| (*client).clone()).collect();
        drop(shared);

        if faults.paging == Some(PagingFault::Unsorted) && *route == Route::Search {
            clients
                .sort_by_key(|client| std::cmp::Reverse(client.get("id").and_then(Value::as_i64)));
        }
        let has_more = match faults.paging {
            Some(PagingFault::RepeatPage | PagingFault::EmptyHasMore) => true,
            _ => has_more,
        };
        let pagination = match faults.paging {
            Some(PagingFault::NoPagination) => None,
            Some(PagingFault::NoHasMore) => Some(json!({"page": page, "page_size": page_size})),
            _ => Some(json!({"page": page, "page_size": page_size, "has_more": has_more})),
        };
        let raw = if first_page {
            injected(faults)
        } else {
            Vec::new()
        };
        let members: Vec<(&str, Value)> = pagination
            .into_iter()
            .map(|pagination| ("pagination", pagination))
            .collect();
        let body = listing_body("clients", &clients, &raw, &members, |out, client| {
            write_client(out, client, faults);
        });
        raw_json_response(StatusCode::OK, body)
    }
}

impl Source for WodifySim {
    const SERVICE: &'static str = "Wodify";
    const RECORD: &'static str = "client";
    const RECORDS: &'static str = "clients";
    const FIRST_ID: i64 = 10_001;
    type Stamp = NaiveDateTime;

    fn generate(id: i64, seed: u64) -> Value {
        generate_client(id, seed)
    }

    fn updated(client: &Value) -> Option<NaiveDateTime> {
        client
            .pointer("/updated/updated_on_datetime")
            .and_then(Value::as_str)
            .and_then(parse_wodify_datetime)
    }

    /// Sets `updated.updated_on_datetime` to now (UTC, whole seconds), never earlier than it
    /// was, creating the `updated` object if the client lacks one.
    fn bump_updated(client: &mut Map<String, Value>, previous: Option<NaiveDateTime>) {
        let now = Utc::now().naive_utc();
        // Updates within one second keep the same stamp; one earlier than the stored value
        // (a test may have put a future one) would look like time going backwards.
        let stamp = previous.map_or(now, |previous| previous.max(now));
        let updated = client
            .entry("updated")
            .or_insert_with(|| json!({"updated_by_id": 1, "updated_by": "API"}));
        if !updated.is_object() {
            *updated = json!({"updated_by_id": 1, "updated_by": "API"});
        }
        updated["updated_on_datetime"] =
            Value::String(stamp.format("%Y-%m-%dT%H:%M:%S").to_string());
    }

    fn core(&self) -> &SourceCore<Self> {
        &self.inner.core
    }

    fn delete(&self, id: i64) -> bool {
        self.remove_client(id)
    }

    /// Runs one API request through faults, auth, method, rate limit and latency, in the order
    /// a gateway in front of the real service would.
    async fn answer(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> (Response, Outcome) {
        let Some(route) = Route::parse(uri.path()) else {
            let body = json!({"message": "Missing Authentication Token"});
            return (
                json_response(StatusCode::FORBIDDEN, &body),
                Outcome::Answered,
            );
        };
        let presented = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let (faults, key_ok) = self.core().faults_and_key(presented);
        let send_retry_after = self.inner.send_retry_after;
        let switches = self.switches();
        if switches.quota_spent && key_ok {
            // The gateway's usage plan answers before the service sees the request.
            let body = json!({"message": "Limit Exceeded"});
            return (
                json_response(StatusCode::TOO_MANY_REQUESTS, &body),
                Outcome::RateLimited,
            );
        }
        let too_many_requests = |retry_after| too_many_requests(retry_after, switches.gateway_429);
        if Faults::roll(faults.error_rate) {
            let response = error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Simulated internal error.",
            );
            return (response, Outcome::Error);
        }
        if Faults::roll(faults.rate_429) {
            let computed = send_retry_after.then(|| HeaderValue::from(1u64));
            let retry_after = faults.injected_retry_after(computed);
            return (too_many_requests(retry_after), Outcome::RateLimited);
        }
        if Faults::roll(switches.api_error_rate) {
            let body = json!({"APIError": {"ErrorMessage": "Simulated APIError envelope inside an HTTP 200."}});
            return (json_response(StatusCode::OK, &body), Outcome::Envelope);
        }
        if Faults::roll(faults.envelope_rate) {
            let body = envelope(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Simulated error envelope inside an HTTP 200.",
            );
            return (json_response(StatusCode::OK, &body), Outcome::Envelope);
        }
        if !key_ok {
            let response = error_response(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Missing or invalid x-api-key header.",
            );
            return (response, Outcome::AuthFailure);
        }
        if method != Method::GET {
            let mut response = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("{method} is not allowed here; the simulator serves GET only."),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return (response, Outcome::Answered);
        }
        if let Err(wait) = self.core().check_rate() {
            let retry_after = send_retry_after.then(|| HeaderValue::from(retry_after_secs(wait)));
            return (too_many_requests(retry_after), Outcome::RateLimited);
        }
        faults.delay().await;
        let response = self.respond(&route, uri, &faults);
        if Faults::roll(faults.drop_rate) {
            return (dropped_connection(), Outcome::Dropped);
        }
        (response, Outcome::Answered)
    }
}

/// The API routes; anything else is the gateway's 403.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    List,
    Search,
    Statuses,
    Detail(String),
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        match path.strip_prefix("/clients")? {
            "" => Some(Route::List),
            "/search" => Some(Route::Search),
            "/statuses" => Some(Route::Statuses),
            rest => {
                let id = rest.strip_prefix('/')?;
                (!id.is_empty() && !id.contains('/')).then(|| Route::Detail(id.to_owned()))
            }
        }
    }
}

/// `page` (1-based, default 1) and `page_size` (default 100, clamped to 100).
fn paging(page: Option<&str>, page_size: Option<&str>) -> Result<(u64, u64), String> {
    let positive = |name: &str, raw: Option<&str>, default: u64| match raw {
        None => Ok(default),
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(value) if value >= 1 => Ok(value),
            _ => Err(format!("{name} must be a positive integer, got {raw:?}.")),
        },
    };
    let page = positive("page", page, 1)?;
    let page_size = positive("page_size", page_size, MAX_PAGE_SIZE)?.min(MAX_PAGE_SIZE);
    Ok((page, page_size))
}

/// `sort=field` ascending or `sort=desc_field` descending.
fn parse_sort(raw: &str) -> (String, bool) {
    match raw.trim().strip_prefix("desc_") {
        Some(field) => (field.to_owned(), true),
        None => (raw.trim().to_owned(), false),
    }
}

/// `client` serialized, with a `0xFF` byte in its `last_name` if its id is one of the
/// `corrupt_utf8_ids`.
fn write_client(out: &mut Vec<u8>, client: &Value, faults: &Faults) {
    let corrupt = client
        .get("id")
        .and_then(Value::as_i64)
        .is_some_and(|id| faults.corrupt_utf8_ids.contains(&id));
    match client.as_object() {
        Some(object) if corrupt => write_with_bad_byte(out, object, "last_name"),
        _ => write_json(out, client),
    }
}

/// `object` serialized as `serde_json` would, except that the string value of member `key`
/// carries one `0xFF` byte: the first byte of the string that is not part of an escape is
/// replaced, so the JSON structure survives; an empty, all-escapes, non-string or missing value
/// becomes (or gains) a string holding the byte.
fn write_with_bad_byte(out: &mut Vec<u8>, object: &Map<String, Value>, key: &str) {
    let corrupted = |value: Option<&Value>| {
        let mut text = match value {
            Some(value @ Value::String(_)) => {
                serde_json::to_vec(value).expect("a string always serializes")
            }
            _ => b"\"\"".to_vec(),
        };
        let end = text.len() - 1;
        let mut at = 1;
        while at < end {
            if text[at] == b'\\' {
                at += if text.get(at + 1) == Some(&b'u') {
                    6
                } else {
                    2
                };
            } else {
                text[at] = 0xFF;
                return text;
            }
        }
        text.insert(1, 0xFF);
        text
    };
    out.push(b'{');
    for (index, (name, value)) in object.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_json(out, &Value::from(name.as_str()));
        out.push(b':');
        if name == key {
            out.extend_from_slice(&corrupted(Some(value)));
        } else {
            write_json(out, value);
        }
    }
    if !object.contains_key(key) {
        if !object.is_empty() {
            out.push(b',');
        }
        write_json(out, &Value::from(key));
        out.push(b':');
        out.extend_from_slice(&corrupted(None));
    }
    out.push(b'}');
}

/// A list item turned into the detail shape: the same fields, but `created_on` is `created`.
fn detail_shape(mut client: Value) -> Value {
    if let Some(object) = client.as_object_mut()
        && let Some(created) = object.remove("created_on")
    {
        object.insert("created".to_owned(), created);
    }
    client
}

/// Top-level and nested fields a query may name even when no stored client has them.
#[rustfmt::skip]
const SCHEMA_FIELDS: &[&str] = &[
    "id", "first_name", "last_name", "email", "phone_number", "client_status_id", "client_status",
    "location_id", "location", "street_address_1", "street_address_2", "city", "state", "zipcode",
    "country", "date_of_birth", "timezone", "is_email_subscribed", "is_sms_subscribed", "tags",
    "member_since", "created_on", "created", "updated", "created_on.created_by_id",
    "created_on.created_by", "created_on.created_on_datetime", "updated.updated_by_id",
    "updated.updated_by", "updated.updated_on_datetime",
];

fn is_known_field(clients: &BTreeMap<i64, Value>, field: &str) -> bool {
    SCHEMA_FIELDS.contains(&field) || clients.values().any(|c| resolve(c, field).is_some())
}

/// The value a query or sort on `field` sees: a dotted path into the client, with `created`
/// standing for `created_on`, and the `created_on`/`updated` objects standing for their
/// `*_datetime` member (the only ordering they have).
fn resolve<'a>(client: &'a Value, field: &str) -> Option<&'a Value> {
    let mut parts = field.split('.');
    let first = parts.next()?;
    let mut value = client.get(first).or_else(|| {
        (first == "created")
            .then(|| client.get("created_on"))
            .flatten()
    })?;
    for part in parts {
        value = value.get(part)?;
    }
    if let Value::Object(object) = value
        && let Some((_, stamp)) = object.iter().find(|(key, _)| key.ends_with("_datetime"))
    {
        return Some(stamp);
    }
    Some(value)
}

/// A total order for sorting: missing/null < bools < numbers < strings < anything else.
fn sort_order(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(value: Option<&Value>) -> u8 {
        match value {
            None | Some(Value::Null) => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(_) => 4,
        }
    }
    match (a, b) {
        (Some(Value::Bool(a)), Some(Value::Bool(b))) => a.cmp(b),
        (Some(Value::Number(a)), Some(Value::Number(b))) => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            a.total_cmp(&b)
        }
        (Some(Value::String(a)), Some(Value::String(b))) => a.cmp(b),
        (
            Some(a @ (Value::Array(_) | Value::Object(_))),
            Some(b @ (Value::Array(_) | Value::Object(_))),
        ) => a.to_string().cmp(&b.to_string()),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// A search operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    Between,
    In,
    NotIn,
    IsNull,
    NotNull,
    Contains,
    StartsWith,
    EndsWith,
}

impl Op {
    fn parse(raw: &str) -> Option<Op> {
        Some(match raw {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "between" => Op::Between,
            "in" => Op::In,
            "not_in" => Op::NotIn,
            "is_null" => Op::IsNull,
            "not_null" => Op::NotNull,
            "contains" => Op::Contains,
            "starts_with" => Op::StartsWith,
            "ends_with" => Op::EndsWith,
            _ => return None,
        })
    }
}

/// A value in a search condition: a single-quoted string or a bare number, bool or null.
#[derive(Clone, Debug, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

impl Literal {
    fn parse(token: &str) -> Result<Literal, String> {
        let token = token.trim();
        if token.len() >= 2 && token.starts_with('\'') && token.ends_with('\'') {
            return Ok(Literal::Str(token[1..token.len() - 1].replace("''", "'")));
        }
        match token {
            "null" => return Ok(Literal::Null),
            "true" => return Ok(Literal::Bool(true)),
            "false" => return Ok(Literal::Bool(false)),
            _ => {}
        }
        // Guarded so that `inf`, `NaN` and friends are not taken for numbers.
        let numeric = !token.is_empty()
            && token
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'));
        match token.parse::<f64>() {
            Ok(number) if numeric => Ok(Literal::Num(number)),
            _ => Err(format!(
                "Value {token:?} is neither a number nor a single-quoted string."
            )),
        }
    }

    /// The text a string operator matches against.
    fn text(&self) -> Option<String> {
        match self {
            Literal::Str(text) => Some(text.clone()),
            Literal::Num(number) => Some(number.to_string()),
            Literal::Bool(_) | Literal::Null => None,
        }
    }
}

/// One `field|op|value` condition of a `q=` search.
#[derive(Clone, Debug, PartialEq)]
struct Condition {
    field: String,
    op: Op,
    values: Vec<Literal>,
}

impl Condition {
    /// The smallest id this condition admits, when it bounds `id` from below (`gt`, `gte`,
    /// `eq`, `between`): lets an id-ordered listing start there.
    fn id_lower_bound(&self) -> Option<i64> {
        if self.field != "id" {
            return None;
        }
        let Some(Literal::Num(n)) = self.values.first() else {
            return None;
        };
        let n = *n;
        match self.op {
            Op::Gt => Some(n.floor() as i64 + 1),
            Op::Gte | Op::Eq | Op::Between => Some(n.ceil() as i64),
            _ => None,
        }
    }
}

/// Splits `text` on `separator` where it is not inside single quotes.
fn split_unquoted(text: &str, separator: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (at, c) in text.char_indices() {
        if c == '\'' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            parts.push(&text[start..at]);
            start = at + c.len_utf8();
        }
    }
    if quoted {
        return Err(format!("Unterminated quote in {text:?}."));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// Parses `q`: conditions joined by `;`, all of which must hold.
fn parse_search(q: &str) -> Result<Vec<Condition>, String> {
    let conditions = split_unquoted(q, ';')?
        .into_iter()
        // A trailing `;` is harmless; anything else malformed is an error.
        .filter(|raw| !raw.trim().is_empty())
        .map(parse_condition)
        .collect::<Result<Vec<_>, _>>()?;
    if conditions.is_empty() {
        return Err("q holds no condition.".to_owned());
    }
    Ok(conditions)
}

fn parse_condition(raw: &str) -> Result<Condition, String> {
    let malformed = || format!("Condition {raw:?} is not field|op|value.");
    let parts = split_unquoted(raw, '|')?;
    let (field, op, value) = match parts.as_slice() {
        [field, op] => (field.trim(), op.trim(), None),
        [field, op, value] => (field.trim(), op.trim(), Some(*value)),
        _ => return Err(malformed()),
    };
    if field.is_empty() {
        return Err(malformed());
    }
    let op = Op::parse(op).ok_or_else(|| format!("Unknown operator {op:?} in {raw:?}."))?;
    let list = |value: Option<&str>| -> Result<Vec<Literal>, String> {
        let value = value.ok_or_else(malformed)?;
        split_unquoted(value, ',')?
            .into_iter()
            .map(Literal::parse)
            .collect()
    };
    let values = match op {
        // A value after is_null/not_null means nothing; tolerate it rather than guess.
        Op::IsNull | Op::NotNull => Vec::new(),
        Op::Between => {
            let values = list(value)?;
            if values.len() != 2 {
                return Err(format!("between takes two values (a,b) in {raw:?}."));
            }
            values
        }
        Op::In | Op::NotIn => list(value)?,
        _ => vec![Literal::parse(value.ok_or_else(malformed)?)?],
    };
    Ok(Condition {
        field: field.to_owned(),
        op,
        values,
    })
}

/// How a client's value compares with a literal: numbers numerically (a numeric string
/// counts as a number against a number), strings lexically, bools with bools.
fn compare(value: &Value, literal: &Literal) -> Option<Ordering> {
    match (value, literal) {
        (Value::Number(n), Literal::Num(x)) => n.as_f64()?.partial_cmp(x),
        (Value::Number(n), Literal::Str(s)) => n.as_f64()?.partial_cmp(&s.trim().parse().ok()?),
        (Value::String(s), Literal::Str(x)) => Some(s.as_str().cmp(x.as_str())),
        (Value::String(s), Literal::Num(x)) => s.trim().parse::<f64>().ok()?.partial_cmp(x),
        (Value::Bool(b), Literal::Bool(x)) => Some(b.cmp(x)),
        _ => None,
    }
}

impl Condition {
    fn matches(&self, client: &Value) -> bool {
        let value = resolve(client, &self.field).filter(|value| !value.is_null());
        let Some(value) = value else {
            // Like SQL: a null satisfies is_null and nothing else.
            return self.op == Op::IsNull;
        };
        let equals = |literal: &Literal| compare(value, literal) == Some(Ordering::Equal);
        if let Value::Array(items) = value {
            // Tags: membership is the only meaningful test.
            let member = items.iter().any(|item| {
                self.values
                    .iter()
                    .any(|literal| compare(item, literal) == Some(Ordering::Equal))
            });
            return match self.op {
                Op::Eq | Op::In | Op::Contains => member,
                Op::Neq | Op::NotIn => !member,
                Op::NotNull => true,
                _ => false,
            };
        }
        let first = || {
            self.values
                .first()
                .and_then(|literal| compare(value, literal))
        };
        let text_op = |test: fn(&str, &str) -> bool| {
            let literal = self.values.first().and_then(Literal::text);
            matches!((value.as_str(), literal), (Some(text), Some(literal)) if test(text, &literal))
        };
        match self.op {
            Op::IsNull => false,
            Op::NotNull => true,
            Op::Eq => self.values.first().is_some_and(equals),
            Op::Neq => !self.values.first().is_some_and(equals),
            Op::Lt => first() == Some(Ordering::Less),
            Op::Lte => matches!(first(), Some(Ordering::Less | Ordering::Equal)),
            Op::Gt => first() == Some(Ordering::Greater),
            Op::Gte => matches!(first(), Some(Ordering::Greater | Ordering::Equal)),
            Op::Between => match self.values.as_slice() {
                [low, high] => {
                    matches!(
                        compare(value, low),
                        Some(Ordering::Greater | Ordering::Equal)
                    ) && matches!(compare(value, high), Some(Ordering::Less | Ordering::Equal))
                }
                _ => false,
            },
            Op::In => self.values.iter().any(equals),
            Op::NotIn => !self.values.iter().any(equals),
            Op::Contains => text_op(|text, part| text.contains(part)),
            Op::StartsWith => text_op(|text, part| text.starts_with(part)),
            Op::EndsWith => text_op(|text, part| text.ends_with(part)),
        }
    }
}

/// A Wodify datetime (`YYYY-MM-DDTHH:MM:SS`, optionally with `Z`), read as UTC.
fn parse_wodify_datetime(text: &str) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(text.trim().trim_end_matches('Z'), "%Y-%m-%dT%H:%M:%S").ok()
}

/// The error envelope body.
fn envelope(status: StatusCode, error_code: &str, developer_message: &str) -> Value {
    json!({
        "HTTPCode": status.as_u16(),
        "DeveloperMessage": developer_message,
        "UserMessage": status.canonical_reason().unwrap_or("Error"),
        "MoreInfo": MORE_INFO,
        "ErrorCode": error_code,
    })
}

/// A stable order unrelated to the id order (a multiplicative hash), for a search that ignores
/// `sort`.
fn scramble(id: i64) -> u64 {
    (id as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17)
}

async fn sim_switches(
    axum::extract::State(sim): axum::extract::State<WodifySim>,
    axum::Json(switches): axum::Json<WodifySwitches>,
) -> StatusCode {
    sim.set_switches(switches);
    StatusCode::NO_CONTENT
}

fn error_response(status: StatusCode, error_code: &str, developer_message: &str) -> Response {
    json_response(status, &envelope(status, error_code, developer_message))
}

fn bad_request(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// A 429 envelope (or the gateway's `{"message": "Too Many Requests"}`), with `Retry-After`
/// only when one is given.
fn too_many_requests(retry_after: Option<HeaderValue>, gateway: bool) -> Response {
    let mut response = if gateway {
        json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too Many Requests"}),
        )
    } else {
        error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Rate limit exceeded.",
        )
    };
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

#[rustfmt::skip]
const FIRST_NAMES: &[&str] = &[
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
    "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Carlos", "Maria", "Wei", "Priya", "Aisha", "Mateo", "Sofia", "Liam", "Olivia", "Noah", "Emma",
    "Hiroshi", "Zoe", "Andre", "Fatima", "Connor", "Grace", "José",
];

#[rustfmt::skip]
const LAST_NAMES: &[&str] = &[
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Nguyen", "Patel", "Kim", "O'Brien", "Van Der Berg", "Chen",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Müller",
];

#[rustfmt::skip]
const STREETS: &[&str] = &[
    "Main St", "Oak Ave", "Maple Dr", "Elm St", "Lakeshore Dr", "Broadway", "Mission St",
    "Washington Blvd", "Park Pl", "Cedar Ln",
];

/// A gym of the simulated account, with where its members tend to live.
struct Gym {
    id: i64,
    name: &'static str,
    timezone: &'static str,
    city: &'static str,
    state: &'static str,
    zip_prefix: &'static str,
    area_codes: &'static [u16],
}

const GYMS: &[Gym] = &[
    Gym {
        id: 20,
        name: "Main Street Gym",
        timezone: "America/Chicago",
        city: "Chicago",
        state: "IL",
        zip_prefix: "606",
        area_codes: &[312, 773],
    },
    Gym {
        id: 21,
        name: "Riverside CrossFit",
        timezone: "America/New_York",
        city: "New York",
        state: "NY",
        zip_prefix: "100",
        area_codes: &[212, 646, 917],
    },
    Gym {
        id: 22,
        name: "Bay Barbell Club",
        timezone: "America/Los_Angeles",
        city: "San Francisco",
        state: "CA",
        zip_prefix: "941",
        area_codes: &[415, 628],
    },
];

/// Area codes of members who moved away from their gym's city.
const OTHER_AREA_CODES: &[u16] = &[617, 206, 303, 512, 713, 305];

const STAFF: &[(i64, &str)] = &[
    (80, "Admin"),
    (81, "Staff"),
    (82, "Front Desk"),
    (1, "Online Signup"),
];

/// A US number libphonenumber accepts as valid: a real area code and an exchange that starts
/// 2-9 and is neither N11 nor 555.
fn us_phone(rng: &mut fastrand::Rng, area_codes: &[u16]) -> String {
    let area = *pick(rng, area_codes);
    let exchange = loop {
        let exchange = rng.u16(200..=999);
        if exchange % 100 != 11 && exchange != 555 {
            break exchange;
        }
    };
    let line = rng.u16(0..=9999);
    match rng.u8(0..7) {
        0 => format!("{area}-{exchange}-{line:04}"),
        1 => format!("({area}) {exchange}-{line:04}"),
        2 => format!("+1 {area} {exchange} {line:04}"),
        3 => format!("{area}.{exchange}.{line:04}"),
        4 => format!("{area}{exchange}{line:04}"),
        5 => format!("1-{area}-{exchange}-{line:04}"),
        _ => format!("+1 ({area}) {exchange}-{line:04}"),
    }
}

/// A naive Wodify datetime `secs` after the epoch.
fn wodify_datetime(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .expect("generated instants lie between 2018 and 2026")
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

/// One generated client in list shape; the same `(id, seed)` always gives the same client.
pub fn generate_client(id: i64, seed: u64) -> Value {
    let rng = &mut record_rng(id, seed);
    let first = *pick(rng, FIRST_NAMES);
    let last = *pick(rng, LAST_NAMES);
    let gym = pick(rng, GYMS);

    let email = match rng.f64() {
        roll if roll < 0.03 => String::new(),
        roll if roll < 0.04 => match rng.u8(0..3) {
            0 => format!("{} at example", email_part(first)),
            1 => format!("{}.{}{id}@", email_part(first), email_part(last)),
            _ => format!(
                "{}.{}{id}@@example.com",
                email_part(first),
                email_part(last)
            ),
        },
        _ => {
            let (first, last) = (email_part(first), email_part(last));
            let domain = *pick(rng, &["example.com", "example.org", "example.net"]);
            let address = match rng.f64() {
                roll if roll < 0.55 => format!("{first}.{last}{id}@{domain}"),
                roll if roll < 0.8 => format!(
                    "{}.{}{id}@{}",
                    capitalized(&first),
                    capitalized(&last),
                    capitalized(domain)
                ),
                roll if roll < 0.9 => format!("{first}.{last}{id}@{domain}").to_uppercase(),
                _ => format!("{first}.{}{id}@{domain}", last.to_uppercase()),
            };
            match rng.u8(0..20) {
                0 => format!("  {address} "),
                1 => format!(" {address}"),
                2 => format!("{address}  "),
                _ => address,
            }
        }
    };

    let phone_number = match rng.f64() {
        roll if roll < 0.05 => String::new(),
        roll if roll < 0.07 => (*pick(rng, &["ask front desk", "n/a", "none", "12345"])).to_owned(),
        _ => {
            let area_codes = if rng.f64() < 0.75 {
                gym.area_codes
            } else {
                OTHER_AREA_CODES
            };
            us_phone(rng, area_codes)
        }
    };

    let (status_id, status) = match rng.f64() {
        roll if roll < 0.8 => STATUSES[0],
        roll if roll < 0.92 => STATUSES[1],
        _ => STATUSES[2],
    };

    let country = match rng.f64() {
        roll if roll < 0.35 => "US",
        roll if roll < 0.55 => "USA",
        roll if roll < 0.75 => "United States",
        roll if roll < 0.8 => "Canada",
        _ => "",
    };
    let (city, state, zipcode) = if country == "Canada" {
        let letters = b"ABCEGHJKLMNPRSTVWXYZ";
        let letter = |rng: &mut fastrand::Rng| char::from(*pick(rng, letters));
        let postcode = format!(
            "M{}{} {}{}{}",
            rng.u8(1..=9),
            letter(rng),
            rng.u8(0..=9),
            letter(rng),
            rng.u8(0..=9)
        );
        ("Toronto".to_owned(), "ON".to_owned(), postcode)
    } else {
        let zipcode = format!("{}{:02}", gym.zip_prefix, rng.u8(1..=60));
        (gym.city.to_owned(), gym.state.to_owned(), zipcode)
    };
    let street_address_2 = match rng.u8(0..8) {
        0 => format!("Apt {}{}", rng.u8(1..=30), char::from(rng.u8(b'A'..=b'F'))),
        1 => format!("Unit {}", rng.u16(100..=999)),
        _ => String::new(),
    };

    let date_of_birth = if rng.f64() < 0.08 {
        "1900-01-01".to_owned()
    } else {
        format!(
            "{}-{:02}-{:02}",
            rng.u16(1955..=2008),
            rng.u8(1..=12),
            rng.u8(1..=28)
        )
    };
    let timezone = if rng.f64() < 0.05 {
        "America/Denver"
    } else {
        gym.timezone
    };

    let tags: Vec<&str> = {
        let mut all = vec!["vip", "founding-member", "student"];
        rng.shuffle(&mut all);
        let count = match rng.f64() {
            roll if roll < 0.6 => 0,
            roll if roll < 0.9 => 1,
            _ => 2,
        };
        all.truncate(count);
        all
    };

    // 2018-01-01 .. 2025-07-01 for sign-up; the last edit anywhere between then and the end.
    let created_secs = rng.i64(1_514_764_800..1_751_328_000);
    let updated_secs = rng.i64(created_secs..GENERATED_UNTIL_SECS);
    let member_since = DateTime::<Utc>::from_timestamp(created_secs, 0)
        .map(|created| created.date_naive())
        .and_then(|date| date.checked_add_days(chrono::Days::new(rng.u64(0..=14))))
        .unwrap_or(NaiveDate::MIN)
        .format("%Y-%m-%d")
        .to_string();
    let (created_by_id, created_by) = *pick(rng, STAFF);
    let (updated_by_id, updated_by) = *pick(rng, STAFF);
    let updated_on = match rng.f64() {
        roll if roll < 0.01 => "1900-01-01T00:00:00".to_owned(),
        roll if roll < 0.5 => format!("{}Z", wodify_datetime(updated_secs)),
        _ => wodify_datetime(updated_secs),
    };

    let mut client = Map::new();
    let mut set = |key: &str, value: Value| {
        client.insert(key.to_owned(), value);
    };
    set("id", json!(id));
    set("first_name", json!(first));
    set("last_name", json!(last));
    set("email", json!(email));
    set("phone_number", json!(phone_number));
    set("client_status_id", json!(status_id));
    set("client_status", json!(status));
    set("location_id", json!(gym.id));
    set("location", json!(gym.name));
    set(
        "street_address_1",
        json!(format!("{} {}", rng.u16(1..=9999), pick(rng, STREETS))),
    );
    set("street_address_2", json!(street_address_2));
    set("city", json!(city));
    set("state", json!(state));
    set("zipcode", json!(zipcode));
    set("country", json!(country));
    set("date_of_birth", json!(date_of_birth));
    set("timezone", json!(timezone));
    set("is_email_subscribed", json!(rng.f64() < 0.7));
    set("is_sms_subscribed", json!(rng.f64() < 0.4));
    set("tags", json!(tags));
    set("member_since", json!(member_since));
    set(
        "created_on",
        json!({
            "created_by_id": created_by_id,
            "created_by": created_by,
            "created_on_datetime": wodify_datetime(created_secs),
        }),
    );
    set(
        "updated",
        json!({
            "updated_by_id": updated_by_id,
            "updated_by": updated_by,
            "updated_on_datetime": updated_on,
        }),
    );
    Value::Object(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::testing::shared_control_routes;
    use crate::source::{merge_top_level, now_ms};
    use crate::testing::{assert_dropped, send_json, send_status};
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const KEY: &str = "wodify_sim_key";

    fn unlimited() -> WodifyOptions {
        WodifyOptions {
            requests_per_second: 0,
            ..WodifyOptions::default()
        }
    }

    async fn start(options: WodifyOptions) -> (WodifySim, SimServer) {
        let sim = WodifySim::new(options);
        let server = sim
            .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind a loopback port");
        (sim, server)
    }

    async fn get(server: &SimServer, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", server.url()), query)
            .expect("valid URL");
        reqwest::Client::new()
            .get(url)
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("send request")
    }

    async fn get_json(server: &SimServer, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        let response = get(server, path, query).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    fn ids(body: &Value) -> Vec<i64> {
        body["clients"]
            .as_array()
            .expect("clients array")
            .iter()
            .map(|client| client["id"].as_i64().expect("integer id"))
            .collect()
    }

    fn assert_envelope(body: &Value, code: u16, error_code: &str) {
        assert_eq!(body["HTTPCode"], code, "{body}");
        assert_eq!(body["ErrorCode"], error_code, "{body}");
        for key in ["DeveloperMessage", "UserMessage", "MoreInfo"] {
            assert!(body[key].is_string(), "{key} missing in {body}");
        }
    }

    /// A generated client with `fields` overridden.
    fn client_with(id: i64, fields: Value) -> Value {
        let mut client = generate_client(id, 0);
        assert!(merge_top_level(&mut client, fields));
        client
    }

    #[tokio::test]
    async fn pages_to_the_end_following_has_more() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(250, 1);
        let mut seen = Vec::new();
        let mut pages = 0;
        for page in 1.. {
            let page = page.to_string();
            let (status, body) = get_json(
                &server,
                "/clients",
                &[("page", &page), ("page_size", "100"), ("sort", "id")],
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(body["pagination"]["page_size"], 100);
            assert!(body.get("total").is_none(), "Wodify gives no total");
            seen.extend(ids(&body));
            pages += 1;
            if !body["pagination"]["has_more"].as_bool().expect("has_more") {
                break;
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (10_001..=10_250).collect::<Vec<_>>());

        // Larger page sizes are clamped, and past the end is empty, not an error.
        let (_, body) = get_json(&server, "/clients", &[("page_size", "500")]).await;
        assert_eq!(body["pagination"]["page_size"], 100);
        assert_eq!(ids(&body).len(), 100);
        let (status, body) = get_json(&server, "/clients", &[("page", "9")]).await;
        assert_eq!(status, 200);
        assert!(ids(&body).is_empty());
        assert_eq!(body["pagination"]["has_more"], false);

        let (status, body) = get_json(&server, "/clients", &[("page", "0")]).await;
        assert_eq!(status, 400);
        assert_envelope(&body, 400, "BadRequest");
    }

    #[tokio::test]
    async fn keyset_search_resumes_after_an_id_and_sorts_either_way() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(120, 2);
        let (status, body) = get_json(
            &server,
            "/clients/search",
            &[("q", "id|gt|10050"), ("sort", "id")],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(ids(&body), (10_051..=10_120).collect::<Vec<_>>());
        assert_eq!(body["pagination"]["has_more"], false);

        let (_, body) = get_json(
            &server,
            "/clients",
            &[("sort", "desc_id"), ("page_size", "3")],
        )
        .await;
        assert_eq!(ids(&body), vec![10_120, 10_119, 10_118]);
        assert_eq!(body["pagination"]["has_more"], true);

        let (_, body) = get_json(&server, "/clients", &[("sort", "last_name")]).await;
        let names: Vec<String> = body["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| c["last_name"].as_str().expect("last name").to_owned())
            .collect();
        assert!(names.windows(2).all(|pair| pair[0] <= pair[1]), "{names:?}");

        let (status, body) = get_json(&server, "/clients", &[("sort", "shoe_size")]).await;
        assert_eq!(status, 400);
        assert_envelope(&body, 400, "BadRequest");
    }

    #[tokio::test]
    async fn search_operators_filter_as_documented() {
        let (sim, server) = start(unlimited()).await;
        sim.put_client(client_with(
            1,
            json!({"first_name": "Ann", "last_name": "O'Hara", "email": "ann@example.com",
                   "client_status": "Active", "tags": ["vip"], "date_of_birth": "1980-02-03",
                   "updated": {"updated_by_id": 80, "updated_by": "Admin",
                               "updated_on_datetime": "2024-01-01T00:00:00Z"}}),
        ));
        sim.put_client(client_with(
            2,
            json!({"first_name": "Bob", "last_name": "Stone", "email": "",
                   "client_status": "Inactive", "tags": [], "date_of_birth": "1900-01-01",
                   "updated": {"updated_by_id": 80, "updated_by": "Admin",
                               "updated_on_datetime": "2024-07-01T00:00:00"}}),
        ));
        sim.put_client(client_with(
            3,
            json!({"first_name": "Cara", "last_name": "Stone", "email": "cara@example.org",
                   "client_status": "Suspended", "tags": ["student"], "date_of_birth": null,
                   "updated": {"updated_by_id": 80, "updated_by": "Admin",
                               "updated_on_datetime": "2025-01-01T00:00:00Z"}}),
        ));
        let cases: &[(&str, &[i64])] = &[
            ("last_name|eq|'Stone'", &[2, 3]),
            ("last_name|eq|'O''Hara'", &[1]),
            ("last_name|eq|'a;b|c'", &[]),
            ("client_status|neq|'Active'", &[2, 3]),
            ("id|lt|2", &[1]),
            ("id|lte|2", &[1, 2]),
            ("id|gte|2", &[2, 3]),
            ("id|between|1,2", &[1, 2]),
            ("id|in|1,3", &[1, 3]),
            ("id|not_in|1,3", &[2]),
            ("first_name|starts_with|'B'", &[2]),
            ("email|ends_with|'.org'", &[3]),
            ("email|contains|'@example'", &[1, 3]),
            ("date_of_birth|is_null", &[3]),
            ("date_of_birth|not_null", &[1, 2]),
            ("tags|contains|'vip'", &[1]),
            ("last_name|eq|'Stone';first_name|eq|'Cara'", &[3]),
            ("updated|gt|'2024-06-01T00:00:00'", &[2, 3]),
            ("updated.updated_on_datetime|lt|'2024-06-01'", &[1]),
        ];
        for (q, expected) in cases {
            let (status, body) = get_json(&server, "/clients/search", &[("q", q)]).await;
            assert_eq!(status, 200, "{q}: {body}");
            assert_eq!(ids(&body), *expected, "{q}");
        }

        for q in [
            "id|gt",
            "id|approx|3",
            "last_name|eq|Stone",
            "id|between|1",
            "last_name|eq|'unterminated",
            "shoe_size|eq|1",
            "|eq|1",
            "",
        ] {
            let (status, body) = get_json(&server, "/clients/search", &[("q", q)]).await;
            assert_eq!(status, 400, "{q}: {body}");
            assert_envelope(&body, 400, "BadRequest");
        }
        let (status, _) = get_json(&server, "/clients/search", &[]).await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn detail_uses_created_and_404s_when_absent() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(3, 4);
        let (status, body) = get_json(&server, "/clients/10002", &[]).await;
        assert_eq!(status, 200);
        assert!(body.get("created_on").is_none(), "{body}");
        let listed = sim.client(10_002).expect("seeded");
        assert_eq!(body["created"], listed["created_on"]);
        assert_eq!(body["email"], listed["email"]);
        assert_eq!(body["updated"], listed["updated"]);

        let (status, body) = get_json(&server, "/clients/99999", &[]).await;
        assert_eq!(status, 404);
        assert_envelope(&body, 404, "NotFound");

        let (status, body) = get_json(&server, "/clients/statuses", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(body["statuses"][0], json!({"id": 10, "status": "Active"}));
        assert_eq!(body["statuses"].as_array().map(Vec::len), Some(3));
        assert_eq!(body["pagination"]["has_more"], false);
    }

    #[tokio::test]
    async fn a_missing_or_wrong_key_gets_a_401_envelope() {
        let (sim, server) = start(unlimited()).await;
        let url = format!("{}/clients", server.url());
        let client = reqwest::Client::new();
        let without = client.get(&url).send().await.expect("send");
        assert_eq!(without.status(), 401);
        assert_envelope(&without.json().await.expect("JSON"), 401, "Unauthorized");
        let wrong = client
            .get(&url)
            .header("x-api-key", "nope")
            .send()
            .await
            .expect("send");
        assert_eq!(wrong.status(), 401);

        sim.set_api_key("rotated");
        assert_eq!(get(&server, "/clients", &[]).await.status(), 401);
        let rotated = client
            .get(&url)
            .header("x-api-key", "rotated")
            .send()
            .await
            .expect("send");
        assert_eq!(rotated.status(), 200);
        assert_eq!(sim.stats().auth_failures, 3);
    }

    #[tokio::test]
    async fn an_unknown_path_is_the_gateways_403() {
        let (sim, server) = start(unlimited()).await;
        for path in ["/members", "/clients/10001/notes", "/", "/v1/clients"] {
            let response = reqwest::get(format!("{}{path}", server.url()))
                .await
                .expect("send");
            assert_eq!(response.status(), 403, "{path}");
            let body: Value = response.json().await.expect("JSON");
            assert_eq!(body, json!({"message": "Missing Authentication Token"}));
        }
        assert_eq!(sim.stats().requests, 4);
        assert_eq!(sim.stats().auth_failures, 0);
    }

    #[tokio::test]
    async fn writes_get_405_and_are_counted() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(1, 0);
        let client = reqwest::Client::new();
        let put = client
            .put(format!("{}/clients/10001", server.url()))
            .header("x-api-key", KEY)
            .json(&json!({"email": "x@example.com"}))
            .send()
            .await
            .expect("send");
        assert_eq!(put.status(), 405);
        assert_eq!(put.headers()[header::ALLOW], "GET");
        assert_envelope(&put.json().await.expect("JSON"), 405, "MethodNotAllowed");
        let post = client
            .post(format!("{}/clients", server.url()))
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(post.status(), 405);

        assert_eq!(sim.stats().non_get, 2);
        assert_ne!(sim.client(10_001).expect("kept")["email"], "x@example.com");
        let log = sim.requests();
        assert_eq!(log.len(), 2);
        assert_eq!((log[0].method.as_str(), log[0].status), ("PUT", 405));
        assert_eq!(log[0].path_and_query, "/clients/10001");
        assert!(log[0].at_ms <= log[1].at_ms && log[1].at_ms <= now_ms());
    }

    #[tokio::test]
    async fn bursts_over_the_limit_get_429_without_retry_after_by_default() {
        let (sim, server) = start(WodifyOptions {
            requests_per_second: 1,
            burst: 2,
            ..WodifyOptions::default()
        })
        .await;
        let mut statuses = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let response = get(&server, "/clients", &[]).await;
            statuses.push(response.status().as_u16());
            last = Some(response);
        }
        assert_eq!(statuses, vec![200, 200, 429]);
        let limited = last.expect("three responses");
        assert!(limited.headers().get(header::RETRY_AFTER).is_none());
        assert_envelope(&limited.json().await.expect("JSON"), 429, "TooManyRequests");
        assert_eq!(sim.stats().rate_limited, 1);

        sim.set_rate_limit(0, 0);
        for _ in 0..30 {
            assert_eq!(get(&server, "/clients", &[]).await.status(), 200);
        }
    }

    #[tokio::test]
    async fn retry_after_is_sent_when_asked() {
        let (_sim, server) = start(WodifyOptions {
            requests_per_second: 1,
            burst: 1,
            send_retry_after: true,
            ..WodifyOptions::default()
        })
        .await;
        assert_eq!(get(&server, "/clients", &[]).await.status(), 200);
        let limited = get(&server, "/clients", &[]).await;
        assert_eq!(limited.status(), 429);
        let seconds: u64 = limited.headers()[header::RETRY_AFTER]
            .to_str()
            .expect("ASCII")
            .parse()
            .expect("whole seconds");
        assert!((1..=2).contains(&seconds), "{seconds}");
    }

    #[tokio::test]
    async fn faults_answer_before_auth_and_an_envelope_arrives_as_http_200() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        sim.set_faults(Faults {
            envelope_rate: 1.0,
            ..Faults::default()
        });
        let (status, body) = get_json(&server, "/clients", &[]).await;
        assert_eq!(status, 200);
        assert_envelope(&body, 500, "InternalError");
        assert!(body.get("clients").is_none());

        sim.set_faults(Faults {
            error_rate: 1.0,
            ..Faults::default()
        });
        let (status, body) = get_json(&server, "/clients", &[]).await;
        assert_eq!(status, 500);
        assert_envelope(&body, 500, "InternalError");
        // Faults come before auth, as at a gateway.
        let unauthenticated = reqwest::get(format!("{}/clients", server.url()))
            .await
            .expect("send");
        assert_eq!(unauthenticated.status(), 500);

        sim.set_faults(Faults {
            rate_429: 1.0,
            ..Faults::default()
        });
        let limited = get(&server, "/clients", &[]).await;
        assert_eq!(limited.status(), 429);
        assert!(limited.headers().get(header::RETRY_AFTER).is_none());

        let stats = sim.stats();
        assert_eq!(
            (stats.envelopes, stats.errors, stats.rate_limited),
            (1, 2, 1)
        );
        assert_eq!((stats.requests, stats.auth_failures), (4, 0));
    }

    #[tokio::test]
    async fn a_dropped_connection_errors_the_body_read() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        sim.set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        });
        let response = reqwest::Client::new()
            .get(format!("{}/clients", server.url()))
            .header("x-api-key", KEY)
            .send()
            .await;
        assert_dropped(response).await;
        assert_eq!(sim.stats().dropped, 1);
    }

    #[tokio::test]
    async fn latency_delays_the_answer() {
        let (sim, server) = start(unlimited()).await;
        sim.set_faults(Faults {
            latency_ms: 150,
            ..Faults::default()
        });
        let started = std::time::Instant::now();
        assert_eq!(get(&server, "/clients", &[]).await.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    fn updated_on(sim: &WodifySim, id: i64) -> String {
        sim.client(id).expect("client")["updated"]["updated_on_datetime"]
            .as_str()
            .expect("string")
            .to_owned()
    }

    #[tokio::test]
    async fn update_client_bumps_updated_and_never_goes_back() {
        let (sim, server) = start(unlimited()).await;
        sim.put_client(client_with(
            7,
            json!({"updated": {"updated_by_id": 81, "updated_by": "Staff",
                               "updated_on_datetime": "2024-03-10T14:45:00Z"}}),
        ));
        let before = Utc::now().naive_utc() - chrono::TimeDelta::seconds(1);
        assert!(sim.update_client(7, json!({"email": "new@example.com"})));
        let first = updated_on(&sim, 7);
        let parsed = NaiveDateTime::parse_from_str(&first, "%Y-%m-%dT%H:%M:%S").expect("format");
        assert!(parsed >= before, "{first}");
        assert_eq!(sim.client(7).expect("client")["email"], "new@example.com");
        assert_eq!(
            sim.client(7).expect("client")["updated"]["updated_by"],
            "Staff"
        );

        assert!(sim.update_client(7, json!({"city": "Evanston"})));
        assert!(updated_on(&sim, 7) >= first);

        sim.put_client(client_with(
            8,
            json!({"updated": {"updated_by_id": 81, "updated_by": "Staff",
                               "updated_on_datetime": "2099-01-01T00:00:00"}}),
        ));
        assert!(sim.update_client(8, json!({"city": "Evanston"})));
        assert_eq!(updated_on(&sim, 8), "2099-01-01T00:00:00");
        assert!(!sim.update_client(9, json!({"city": "Evanston"})));

        // The same through the control surface, and visible to a search on the update time.
        let cursor = first.clone();
        let patch = reqwest::Client::new()
            .patch(format!("{}/_sim/clients/7", server.url()))
            .json(&json!({"first_name": "Patched"}));
        let patched: Value = send_json(patch).await;
        assert_eq!(patched["first_name"], "Patched");
        let q = format!("updated|gte|'{cursor}'");
        let (_, body) = get_json(&server, "/clients/search", &[("q", &q)]).await;
        assert_eq!(ids(&body), vec![7, 8]);
    }

    #[tokio::test]
    async fn seeding_is_deterministic() {
        let sim = WodifySim::new(unlimited());
        sim.seed(50, 7);
        let first = sim.clients();
        sim.seed(50, 7);
        assert_eq!(sim.clients(), first);
        assert_eq!(first.len(), 50);
        assert_eq!(first[0], generate_client(10_001, 7));
        assert_eq!(first[49]["id"], 10_050);
        sim.seed(50, 8);
        assert_ne!(sim.clients(), first);
        assert!(sim.remove_client(10_001));
        assert!(!sim.remove_client(10_001));
        assert_eq!(sim.clients().len(), 49);
    }

    #[test]
    fn generated_clients_carry_the_documented_quirks() {
        let clients: Vec<Value> = (10_001..=12_000).map(|id| generate_client(id, 1)).collect();
        let count = |test: &dyn Fn(&Value) -> bool| clients.iter().filter(|c| test(c)).count();
        let share = |n: usize| n as f64 / clients.len() as f64;

        let example: BTreeSet<&str> = [
            "id",
            "first_name",
            "last_name",
            "email",
            "phone_number",
            "client_status_id",
            "client_status",
            "location_id",
            "location",
            "date_of_birth",
            "timezone",
            "is_email_subscribed",
            "is_sms_subscribed",
            "tags",
            "member_since",
            "created_on",
            "updated",
        ]
        .into();
        let address: BTreeSet<&str> = [
            "street_address_1",
            "street_address_2",
            "city",
            "state",
            "zipcode",
            "country",
        ]
        .into();
        for client in &clients {
            let keys: BTreeSet<&str> = client
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, &example | &address);
            assert!(client["created_on"]["created_on_datetime"].is_string());
            assert!(client["updated"]["updated_by_id"].is_i64());
        }

        let email = |c: &Value| c["email"].as_str().expect("email").to_owned();
        assert!((0.01..0.06).contains(&share(count(&|c| email(c).is_empty()))));
        assert!(count(&|c| !email(c).is_empty() && !email(c).contains('@')) > 0);
        assert!(count(&|c| email(c) != email(c).trim()) > 100);
        assert!(count(&|c| email(c).chars().any(char::is_uppercase)) > 100);

        let phone = |c: &Value| c["phone_number"].as_str().expect("phone").to_owned();
        assert!((0.03..0.08).contains(&share(count(&|c| phone(c).is_empty()))));
        let junk = ["ask front desk", "n/a", "none", "12345"];
        assert!(count(&|c| junk.contains(&phone(c).as_str())) > 10);
        for client in &clients {
            let phone = phone(client);
            if phone.is_empty() || junk.contains(&phone.as_str()) {
                continue;
            }
            let parsed = phonenumber::parse(Some(phonenumber::country::Id::US), &phone)
                .unwrap_or_else(|error| panic!("{phone}: {error}"));
            assert!(
                phonenumber::is_valid(&parsed),
                "{phone} is not a valid US number"
            );
        }

        let updated = |c: &Value| {
            c["updated"]["updated_on_datetime"]
                .as_str()
                .expect("stamp")
                .to_owned()
        };
        assert!((0.4..0.6).contains(&share(count(&|c| updated(c).ends_with('Z')))));
        assert!(count(&|c| updated(c) == "1900-01-01T00:00:00") > 5);
        assert!(count(&|c| c["date_of_birth"] == "1900-01-01") > 50);
        for client in &clients {
            let stamp = updated(client);
            if stamp.starts_with("1900") {
                continue;
            }
            let created = client["created_on"]["created_on_datetime"]
                .as_str()
                .expect("created");
            assert!(
                created <= stamp.trim_end_matches('Z'),
                "{created} > {stamp}"
            );
            assert!(
                stamp.as_str() < "2026-01-01T00:00:00",
                "{stamp} is not in the past"
            );
        }

        let countries: BTreeSet<String> = clients
            .iter()
            .map(|c| c["country"].as_str().expect("country").to_owned())
            .collect();
        assert_eq!(
            countries,
            ["", "Canada", "US", "USA", "United States"]
                .map(String::from)
                .into()
        );
        let statuses: BTreeSet<i64> = clients
            .iter()
            .map(|c| c["client_status_id"].as_i64().expect("status"))
            .collect();
        assert_eq!(statuses, [10, 11, 12].into());
        assert!(share(count(&|c| c["client_status_id"] == 10)) > 0.7);
        let locations: BTreeSet<i64> = clients
            .iter()
            .map(|c| c["location_id"].as_i64().expect("location"))
            .collect();
        assert_eq!(locations.len(), 3);
        assert!(
            clients
                .iter()
                .all(|c| c["tags"].as_array().is_some_and(|tags| tags.len() <= 2))
        );
    }

    #[tokio::test]
    async fn the_control_surface_changes_state_without_being_logged() {
        let (sim, server) = start(unlimited()).await;
        let http = reqwest::Client::new();
        let url = |path: &str| format!("{}/_sim{path}", server.url());
        let seed = json!({"count": 5, "seed": 3});
        assert_eq!(
            send_status(http.post(url("/clients/seed")).json(&seed)).await,
            204
        );
        let listed: Vec<Value> = send_json(http.get(url("/clients"))).await;
        assert_eq!(listed, sim.clients());
        assert_eq!(listed.len(), 5);

        let client = client_with(0, json!({"first_name": "Put"}));
        assert_eq!(
            send_status(http.put(url("/clients/42")).json(&client)).await,
            200
        );
        assert_eq!(sim.client(42).expect("stored")["first_name"], "Put");
        assert_eq!(send_status(http.delete(url("/clients/42"))).await, 204);
        assert_eq!(send_status(http.delete(url("/clients/42"))).await, 404);
        assert_eq!(get(&server, "/clients/42", &[]).await.status(), 404);
        assert_eq!(sim.stats().requests, 1, "only the API request is logged");

        let api = async || get(&server, "/clients", &[]).await.status().as_u16();
        shared_control_routes(&sim, &server, KEY, api).await;
    }

    /// Replaces the faults through `PUT /_sim/faults`, as a test against a running simulator
    /// would.
    async fn put_faults(server: &SimServer, faults: Value) {
        let request = reqwest::Client::new()
            .put(format!("{}/_sim/faults", server.url()))
            .json(&faults);
        assert_eq!(send_status(request).await, 204, "{faults}");
    }

    /// The status, content type and raw body of an authorised GET.
    async fn get_bytes(
        server: &SimServer,
        path: &str,
        query: &[(&str, &str)],
    ) -> (u16, String, Vec<u8>) {
        let response = get(server, path, query).await;
        let status = response.status().as_u16();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .expect("ASCII")
            .to_owned();
        let body = response.bytes().await.expect("body").to_vec();
        (status, content_type, body)
    }

    fn pagination(page: u64, page_size: u64, has_more: bool) -> Value {
        json!({"page": page, "page_size": page_size, "has_more": has_more})
    }

    #[tokio::test]
    async fn an_injected_429_sends_the_retry_after_fault_even_without_send_retry_after() {
        let (sim, server) = start(unlimited()).await;
        put_faults(&server, json!({"rate_429": 1.0})).await;
        let limited = get(&server, "/clients", &[]).await;
        assert_eq!(limited.status(), 429);
        assert!(limited.headers().get(header::RETRY_AFTER).is_none());

        for value in [
            "18446744073709551615",
            "86400",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            put_faults(&server, json!({"rate_429": 1.0, "retry_after": value})).await;
            let limited = get(&server, "/clients", &[]).await;
            assert_eq!(limited.status(), 429);
            assert_eq!(limited.headers()[header::RETRY_AFTER], value);
            assert_envelope(&limited.json().await.expect("JSON"), 429, "TooManyRequests");
        }

        // Alone it changes nothing, and the limiter's own 429 keeps its (absent) header.
        put_faults(&server, json!({"retry_after": "86400"})).await;
        sim.set_rate_limit(1, 1);
        assert_eq!(get(&server, "/clients", &[]).await.status(), 200);
        let limited = get(&server, "/clients", &[]).await;
        assert_eq!(limited.status(), 429);
        assert!(limited.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(sim.stats().rate_limited, 5);
    }

    #[tokio::test]
    async fn redirect_to_answers_every_api_request_307_and_nothing_else() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(3, 0);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let listing = http
            .get(format!("{}/clients", server.url()))
            .header("x-api-key", KEY);
        assert_eq!(send_status(listing).await, 200, "off by default");
        sim.clear_log();

        put_faults(
            &server,
            json!({"redirect_to": "https://moved.example/v2", "error_rate": 1.0}),
        )
        .await;
        let sent = [
            (Method::GET, "/clients?page=2&page_size=1&sort=desc_id"),
            (Method::GET, "/clients/search?q=id%7Cgt%7C10001"),
            (Method::GET, "/clients/10001"),
            (Method::GET, "/members"),
            (Method::PUT, "/clients/10001"),
        ];
        crate::source::testing::redirects_everything(
            &sim,
            &server,
            "https://moved.example/v2",
            &sent,
            "/clients",
        )
        .await;

        // A client that follows the Location lands on the other server, key and all: why the
        // daemon must not follow redirects blindly.
        let (other, other_server) = start(unlimited()).await;
        other.seed(1, 9);
        sim.set_faults(Faults {
            redirect_to: Some(other_server.url()),
            ..Faults::default()
        });
        let (status, body) = get_json(&server, "/clients", &[("page_size", "5")]).await;
        assert_eq!((status, ids(&body)), (200, vec![10_001]));
        assert_eq!(body["clients"][0], other.client(10_001).expect("seeded"));
        assert_eq!(other.requests()[0].path_and_query, "/clients?page_size=5");
    }

    #[tokio::test]
    async fn paging_repeat_page_answers_the_first_page_for_ever() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(10, 0);
        let (_, body) = get_json(&server, "/clients", &[("page", "2"), ("page_size", "3")]).await;
        assert_eq!(ids(&body), vec![10_004, 10_005, 10_006], "off by default");

        put_faults(&server, json!({"paging": "repeat_page"})).await;
        for page in [1, 2, 3, 4, 50] {
            let query = [("page", &*page.to_string()), ("page_size", "3")];
            let (status, body) = get_json(&server, "/clients", &query).await;
            assert_eq!(status, 200);
            assert_eq!(ids(&body), vec![10_001, 10_002, 10_003], "page {page}");
            assert_eq!(body["pagination"], pagination(page, 3, true));
        }
        // A keyset search gets the lowest ids whatever its cursor, its other conditions kept.
        let active: Vec<i64> = sim
            .clients()
            .iter()
            .filter(|c| c["client_status_id"] == 10)
            .map(|c| c["id"].as_i64().expect("id"))
            .take(2)
            .collect();
        for cursor in ["id|gt|0", "id|gt|10006", "id|gte|10009"] {
            let q = format!("{cursor};client_status_id|eq|10");
            let query = [("q", q.as_str()), ("sort", "id"), ("page_size", "2")];
            let (_, body) = get_json(&server, "/clients/search", &query).await;
            assert_eq!(ids(&body), active, "{q}");
            assert_eq!(body["pagination"], pagination(1, 2, true));
        }
    }

    #[tokio::test]
    async fn paging_empty_has_more_keeps_has_more_true_past_the_end() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        let (_, body) = get_json(&server, "/clients", &[("page", "2"), ("page_size", "3")]).await;
        assert_eq!(body["pagination"]["has_more"], false, "off by default");

        put_faults(&server, json!({"paging": "empty_has_more"})).await;
        let (_, body) = get_json(&server, "/clients", &[("page", "1"), ("page_size", "3")]).await;
        assert_eq!(ids(&body), vec![10_001, 10_002, 10_003]);
        assert_eq!(body["pagination"], pagination(1, 3, true));
        let (_, body) = get_json(&server, "/clients", &[("page", "2"), ("page_size", "3")]).await;
        assert_eq!(ids(&body), vec![10_004, 10_005]);
        assert_eq!(body["pagination"], pagination(2, 3, true));
        for page in [3, 4, 99] {
            let query = [("page", &*page.to_string()), ("page_size", "3")];
            let (status, body) = get_json(&server, "/clients", &query).await;
            assert_eq!(status, 200);
            assert_eq!(
                body,
                json!({"clients": [], "pagination": pagination(page, 3, true)})
            );
        }
        let query = [("q", "id|gt|10005"), ("sort", "id")];
        let (_, body) = get_json(&server, "/clients/search", &query).await;
        assert_eq!(
            body,
            json!({"clients": [], "pagination": pagination(1, 100, true)})
        );
    }

    #[tokio::test]
    async fn paging_no_pagination_and_no_has_more_leave_the_fields_out() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        let query = [("page_size", "2")];
        let (_, body) = get_json(&server, "/clients", &query).await;
        assert_eq!(body["pagination"], pagination(1, 2, true), "off by default");

        put_faults(&server, json!({"paging": "no_pagination"})).await;
        for path in ["/clients", "/clients/search"] {
            let query = [("page_size", "2"), ("q", "id|gt|0")];
            let (_, body) = get_json(&server, path, &query).await;
            let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
            assert_eq!(keys, ["clients"], "{path}");
            assert_eq!(ids(&body), vec![10_001, 10_002]);
        }

        put_faults(&server, json!({"paging": "no_has_more"})).await;
        let (_, body) = get_json(&server, "/clients", &query).await;
        assert_eq!(body["pagination"], json!({"page": 1, "page_size": 2}));
        let search = [("page_size", "2"), ("q", "id|gt|10003")];
        let (_, body) = get_json(&server, "/clients/search", &search).await;
        assert_eq!(body["pagination"], json!({"page": 1, "page_size": 2}));
        assert_eq!(ids(&body), vec![10_004, 10_005]);
    }

    #[tokio::test]
    async fn paging_unsorted_search_answers_descending_ids() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(10, 0);
        let page = |page: &'static str| {
            [
                ("q", "id|gt|10002"),
                ("sort", "id"),
                ("page_size", "3"),
                ("page", page),
            ]
        };
        let (_, body) = get_json(&server, "/clients/search", &page("1")).await;
        assert_eq!(ids(&body), vec![10_003, 10_004, 10_005], "off by default");

        put_faults(&server, json!({"paging": "unsorted"})).await;
        let (_, body) = get_json(&server, "/clients/search", &page("1")).await;
        assert_eq!(ids(&body), vec![10_005, 10_004, 10_003]);
        assert_eq!(body["pagination"], pagination(1, 3, true));
        let (_, body) = get_json(&server, "/clients/search", &page("2")).await;
        assert_eq!(ids(&body), vec![10_008, 10_007, 10_006]);
        // The plain listing still sorts.
        let query = [("sort", "id"), ("page_size", "3")];
        let (_, body) = get_json(&server, "/clients", &query).await;
        assert_eq!(ids(&body), vec![10_001, 10_002, 10_003]);
    }

    #[tokio::test]
    async fn inject_appends_values_to_the_first_page_only() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(4, 0);
        let first = [("page_size", "2")];
        let (_, body) = get_json(&server, "/clients", &first).await;
        assert_eq!(ids(&body), vec![10_001, 10_002], "off by default");

        let injected = json!([null, 42, "a string", {"id": "x"}, {"first_name": "no id"}]);
        put_faults(&server, json!({"inject": injected})).await;
        let real = |id| sim.client(id).expect("seeded");
        let mut expected = vec![real(10_001), real(10_002)];
        expected.extend(injected.as_array().expect("array").iter().cloned());
        let (_, body) = get_json(&server, "/clients", &first).await;
        assert_eq!(body["clients"], Value::Array(expected.clone()));
        assert_eq!(body["pagination"], pagination(1, 2, true));
        let (_, body) = get_json(&server, "/clients", &[("page_size", "2"), ("page", "2")]).await;
        assert_eq!(ids(&body), vec![10_003, 10_004]);

        // A keyset search's first page is the one from `id|gt|0`.
        let search = |q| [("q", q), ("sort", "id"), ("page_size", "2")];
        let (_, body) = get_json(&server, "/clients/search", &search("id|gt|0")).await;
        assert_eq!(body["clients"], Value::Array(expected));
        let (_, body) = get_json(&server, "/clients/search", &search("id|gt|10002")).await;
        assert_eq!(ids(&body), vec![10_003, 10_004]);
        assert_eq!(sim.clients().len(), 4, "injected values are not stored");
    }

    #[tokio::test]
    async fn inject_raw_splices_texts_unparsed_into_the_first_page() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(2, 0);
        let (_, _, plain) = get_bytes(&server, "/clients", &[]).await;
        let client = |id| serde_json::to_string(&sim.client(id).expect("seeded")).expect("JSON");
        let pages = |page: u64, has_more| {
            serde_json::to_string(&pagination(page, 100, has_more)).expect("JSON")
        };
        let (one, two) = (client(10_001), client(10_002));
        let body = format!(
            r#"{{"clients":[{one},{two}],"pagination":{}}}"#,
            pages(1, false)
        );
        assert_eq!(
            String::from_utf8(plain).expect("UTF-8"),
            body,
            "off by default"
        );

        let surrogate = r#"{"id": 999001, "first_name": "\ud800"}"#;
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let faults = json!({"inject": [7], "inject_raw": [surrogate, deep]});
        put_faults(&server, faults).await;
        let (status, content_type, bytes) = get_bytes(&server, "/clients", &[]).await;
        assert_eq!((status, content_type.as_str()), (200, "application/json"));
        let expected = format!(
            r#"{{"clients":[{one},{two},7,{surrogate},{deep}],"pagination":{}}}"#,
            pages(1, false)
        );
        assert_eq!(String::from_utf8(bytes.clone()).expect("UTF-8"), expected);
        assert!(
            serde_json::from_slice::<Value>(&bytes).is_err(),
            "as serde_json sees it"
        );

        // No leading comma on an empty page, and nothing on later pages.
        let query = [("q", "id|gt|0;first_name|eq|'Nobody'")];
        let (_, _, bytes) = get_bytes(&server, "/clients/search", &query).await;
        let expected = format!(
            r#"{{"clients":[7,{surrogate},{deep}],"pagination":{}}}"#,
            pages(1, false)
        );
        assert_eq!(String::from_utf8(bytes).expect("UTF-8"), expected);
        let query = [("page", "2"), ("page_size", "1")];
        let (_, body) = get_json(&server, "/clients", &query).await;
        assert_eq!(
            body["clients"],
            json!([sim.client(10_002).expect("seeded")])
        );
    }

    #[tokio::test]
    async fn corrupt_utf8_ids_put_an_invalid_byte_into_last_name() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(4, 0);
        sim.put_client(client_with(10_002, json!({"last_name": "Zyxwv"})));
        sim.put_client(client_with(10_003, json!({"last_name": "\"Q\" é"})));
        sim.put_client(client_with(10_004, json!({"last_name": ""})));
        let (_, _, plain) = get_bytes(&server, "/clients", &[]).await;
        let plain = String::from_utf8(plain).expect("valid UTF-8 by default");

        put_faults(
            &server,
            json!({"corrupt_utf8_ids": [10_002, 10_003, 10_004]}),
        )
        .await;
        let (status, content_type, bytes) = get_bytes(&server, "/clients", &[]).await;
        assert_eq!((status, content_type.as_str()), (200, "application/json"));
        assert!(std::str::from_utf8(&bytes).is_err());
        // One byte each, in place: the first that is not part of an escape (`\"` is kept);
        // an empty name gains the byte.
        let mut expected = plain.into_bytes();
        for (from, to) in [
            (
                r#""last_name":"Zyxwv""#.as_bytes(),
                b"\"last_name\":\"\xFFyxwv\"".as_slice(),
            ),
            (
                r#""last_name":"\"Q\" é""#.as_bytes(),
                b"\"last_name\":\"\\\"\xFF\\\" \xC3\xA9\"",
            ),
            (r#""last_name":"""#.as_bytes(), b"\"last_name\":\"\xFF\""),
        ] {
            let at = expected
                .windows(from.len())
                .position(|window| window == from)
                .expect("present once");
            expected.splice(at..at + from.len(), to.iter().copied());
        }
        assert_eq!(bytes, expected);
        let lossy: Value = serde_json::from_str(&String::from_utf8_lossy(&bytes)).expect("JSON");
        assert_eq!(lossy["clients"][1]["last_name"], "\u{FFFD}yxwv");
        assert_eq!(lossy["clients"][2]["last_name"], "\"\u{FFFD}\" é");
        assert_eq!(lossy["clients"][3]["last_name"], "\u{FFFD}");
        assert_eq!(lossy["clients"][0], sim.client(10_001).expect("seeded"));

        // Wherever the client is listed, and in the detail; others stay valid.
        let query = [
            ("q", "id|gt|10001"),
            ("sort", "desc_id"),
            ("page_size", "3"),
        ];
        let (_, _, bytes) = get_bytes(&server, "/clients/search", &query).await;
        assert_eq!(bytes.iter().filter(|b| **b == 0xFF).count(), 3);
        let (status, _, bytes) = get_bytes(&server, "/clients/10002", &[]).await;
        assert_eq!(status, 200);
        let detail = String::from_utf8_lossy(&bytes);
        assert!(
            detail.contains("\"last_name\":\"\u{FFFD}yxwv\""),
            "{detail}"
        );
        assert!(detail.contains("\"created\":"), "still the detail shape");
        let (_, _, bytes) = get_bytes(&server, "/clients/10001", &[]).await;
        assert!(std::str::from_utf8(&bytes).is_ok());
        assert_eq!(sim.client(10_002).expect("stored")["last_name"], "Zyxwv");
    }
}
