//! In-memory simulator of the RevKeen v2 customer API as documented in `shared/api/revkeen.md`:
//! `x-api-key` auth, a token bucket per key, the idempotency store (scoped per key, method and
//! path, replay with `Idempotency-Replayed: true`, 409 on a different body or while the first
//! request is still running), snake_case body validation with `details.fields`, stale protection
//! by `external_updated_at`, the batch endpoint, and the error envelope. On top of that it injects
//! [`Faults`], lets tests refuse chosen records with [`Rejection`] rules, and exposes its state
//! under `/_sim/…` and through [`RevKeenSim`].
//!
//! Where RevKeen documents nothing, the simulator picks one behaviour and sticks to it: 201 for
//! a created customer and 200 otherwise; a batch with more than 100 items, a duplicate
//! `external_id` or any item failing the schema is refused whole with a 400; `GET /customers/{id}`
//! answers `{"data": Customer}` and the list adds `pagination {limit, offset, total, hasMore}`;
//! `error.type` is Stripe-like (`invalid_request_error`, `authentication_error`, …); `null` is
//! refused for string and object fields because the schema does not mark them nullable; a
//! different body under a key still in progress is a conflict rather than "in progress".
//!
//! RevKeen's own hosted sync (`GET /integrations/{provider}`, the other writer) is off for every
//! provider unless a test switches it on with [`RevKeenSim::set_hosted_sync`] (or
//! `PUT /_sim/integrations/{provider}`); the answer is `{"success": true, "data": {…}}` in
//! camelCase, an unknown provider a 404 and, with [`RevKeenSim::set_integrations_readable`]
//! off, a 403, both as `{"success": false, "error": "…"}`.
//!
//! Deliberate differences from the real service: only the customer endpoints the daemon uses
//! and the integration read exist; keys carry no scopes or environment (so there is no 403
//! except the integration read's); a 5xx is only ever injected
//! before any work, so no 5xx is ever stored for replay. The fault latency is spent with the
//! idempotency key already claimed, and a dropped connection happens after the write is applied
//! and stored, because those are the windows that make retries interesting. Requests run in
//! their own task so a client that gives up does not cancel a write (as on a real server).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Bucket, Faults, SimServer, dropped_connection, retry_after_secs};

/// Every simulated customer belongs to this one merchant.
const MERCHANT_ID: &str = "mer_sim";
/// Bodies above this are refused; far beyond a 100-item batch, so only a broken client hits it.
const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
const MAX_BATCH_ITEMS: usize = 100;
/// `GET /customers` page size when `limit` is absent (undocumented).
const DEFAULT_LIST_LIMIT: usize = 20;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// The string fields a customer body may carry.
#[rustfmt::skip]
const STRING_FIELDS: [&str; 12] = [
    "email", "name", "phone", "address_line1", "address_line2", "city", "state", "postal_code",
    "country", "tax_id", "tax_id_country", "notes",
];

/// What a customer's fields arrive in, which decides the fields they may include.
#[derive(Clone, Copy)]
enum BodyKind {
    /// A single upsert: the string fields, `metadata`, `custom_fields`, `external_updated_at`.
    Single,
    /// A batch item: the single body plus `external_id`, without `custom_fields`.
    BatchItem,
}

impl BodyKind {
    /// Whether `field` may appear in this body; any other field is a 400.
    fn allows(self, field: &str) -> bool {
        match field {
            "metadata" | "external_updated_at" => true,
            "custom_fields" => matches!(self, BodyKind::Single),
            "external_id" => matches!(self, BodyKind::BatchItem),
            _ => STRING_FIELDS.contains(&field),
        }
    }
}

/// How a [`RevKeenSim`] starts; everything but the TTL and body recording can be changed later.
#[derive(Clone, Debug)]
pub struct RevKeenOptions {
    /// Accepted `x-api-key` values.
    pub api_keys: Vec<String>,
    /// Requests per minute allowed per API key; 0 means unlimited.
    pub requests_per_minute: u32,
    /// Requests a key may send at once before the per-minute rate applies.
    pub burst: u32,
    /// How long an `Idempotency-Key` is remembered from its first use.
    pub idempotency_ttl: Duration,
    /// Keep request bodies in the request log (turn off for large load tests).
    pub record_bodies: bool,
}

impl Default for RevKeenOptions {
    /// A sandbox key and RevKeen's documented production limits (1000/min, burst 2000, 24 h).
    fn default() -> Self {
        RevKeenOptions {
            api_keys: vec!["rk_sandbox_sim".into()],
            requests_per_minute: 1000,
            burst: 2000,
            idempotency_ttl: Duration::from_secs(24 * 60 * 60),
            record_bodies: true,
        }
    }
}

/// RevKeen's own hosted sync for one provider, as `GET /integrations/{provider}` answers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostedSync {
    pub is_active: bool,
    pub sync_enabled: bool,
    pub status: String,
    #[serde(default)]
    pub last_sync_at: Option<String>,
}

impl HostedSync {
    /// Connected and syncing every few minutes, as right after a merchant activates it.
    pub fn active() -> HostedSync {
        HostedSync {
            is_active: true,
            sync_enabled: true,
            status: "connected".into(),
            last_sync_at: Some("2026-12-01T09:00:00.000Z".into()),
        }
    }
}

/// A customer as the simulator stores it, keyed by (`source`, `external_id`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SimCustomer {
    /// UUID assigned at creation.
    pub id: String,
    /// The source named in the request path or batch body.
    pub source: String,
    /// The source's id for the record (percent-decoded).
    pub external_id: String,
    /// The body fields last written, exactly as sent (snake_case).
    pub fields: Map<String, Value>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last write.
    pub updated_at: String,
    /// Times this customer was created or updated; replays and stale updates do not count.
    pub writes: u64,
}

/// Counters since the simulator started or since [`RevKeenSim::clear_log`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RevKeenStats {
    /// Every request to the customer API (not `/_sim`, not the integration read).
    pub requests: u64,
    /// Customers created (batch items count individually).
    pub created: u64,
    /// Customers updated.
    pub updated: u64,
    /// Writes ignored because `external_updated_at` was older than the stored one.
    pub stale: u64,
    /// Answers replayed from the idempotency store.
    pub replayed: u64,
    /// 409 `idempotency_conflict` answered; a correct client never causes one.
    pub conflicts: u64,
    /// 409 `idempotency_in_progress` answered.
    pub in_progress: u64,
    /// 400 answered for malformed or invalid requests (not rejection rules).
    pub validation_errors: u64,
    /// Records refused by a [`Rejection`] rule (single answers and batch `failed[]` items).
    pub rejected: u64,
    /// 401 answered.
    pub auth_failures: u64,
    /// 429 answered, by the limiter or by the `rate_429` fault.
    pub rate_limited: u64,
    /// 5xx injected by the `error_rate` fault.
    pub server_errors: u64,
    /// Connections dropped by the `drop_rate` fault (after the request was applied).
    pub dropped: u64,
    /// Requests to `PUT /customers/external/batch`, whatever their outcome.
    pub batch_requests: u64,
    /// Requests to `PUT /customers/external/{source}/{externalId}`, whatever their outcome.
    pub single_requests: u64,
    /// Answered 307 by the `redirect_to` fault, without doing anything else.
    pub redirected: u64,
    /// Upserts answered 200 with the `bad_2xx_body` of the `bad_2xx_rate` fault, not applied.
    pub bad_answers: u64,
    /// Reads of `GET /integrations/{provider}` (RevKeen's own hosted sync). Counted here only:
    /// not in `requests` nor the request log, which are the customer API's, and never faulted
    /// or rate limited.
    #[serde(default)]
    pub integration_reads: u64,
}

impl RevKeenStats {
    /// Customers written (created or updated).
    pub fn writes(&self) -> u64 {
        self.created + self.updated
    }
}

/// One API request as the simulator saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Path as received, still percent-encoded, without the query.
    pub path: String,
    /// The `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
    /// Status the simulator answered; for a dropped connection, the status it would have sent.
    /// 0 while the request is still being processed.
    pub status: u16,
    /// True when the answer came from the idempotency store.
    pub replayed: bool,
    /// The body (lossy UTF-8); `None` when empty or when bodies are not recorded.
    pub body: Option<String>,
    /// Arrival time in milliseconds since the simulator started.
    pub at_ms: u64,
}

/// A record RevKeen refuses for a business rule, so tests can exercise dead-lettering.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rejection {
    /// Match records with this external id (in any source) …
    pub external_id: Option<String>,
    /// … or with this email (exact, case-insensitive). A rule with neither matches nothing.
    pub email: Option<String>,
    /// Status for a single upsert, 400 or 422 (any other value answers 422). Batch items always
    /// land in `failed[]`.
    pub status: u16,
    /// `error.code` of the answer, e.g. `validation_error`.
    pub code: String,
    /// `error.message` of the answer.
    pub message: String,
    /// If set, the answer carries `details.fields = {field: message}`.
    pub field: Option<String>,
}

impl Rejection {
    fn matches(&self, external_id: &str, email: Option<&str>) -> bool {
        let by_id = self.external_id.as_deref() == Some(external_id);
        let by_email = match (&self.email, email) {
            (Some(rule), Some(email)) => rule.to_lowercase() == email.to_lowercase(),
            _ => false,
        };
        by_id || by_email
    }
}

/// Handle to a running RevKeen simulator; clones share the same state.
#[derive(Clone)]
pub struct RevKeenSim {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    idempotency_ttl: Duration,
    record_bodies: bool,
    state: Mutex<SimState>,
}

struct SimState {
    api_keys: HashSet<String>,
    requests_per_minute: u32,
    burst: u32,
    buckets: HashMap<String, Arc<Bucket>>,
    faults: Faults,
    rejections: Vec<Rejection>,
    customers: BTreeMap<(String, String), StoredCustomer>,
    next_seq: u64,
    idempotency: HashMap<IdempotencyScope, IdempotencyEntry>,
    /// Size of the idempotency store after its last sweep of expired keys.
    idempotency_swept_len: usize,
    stats: RevKeenStats,
    /// Entries carry an id so a request finishing after [`RevKeenSim::clear_log`] (or after a
    /// later arrival) updates its own line and keeps the log in arrival order.
    log: Vec<(u64, LoggedRequest)>,
    next_log_id: u64,
    /// Providers with RevKeen's own hosted sync configured; others answer 404.
    hosted_sync: BTreeMap<String, HostedSync>,
    /// Whether the integration read is allowed (off: a key without `integrations:read`, 403).
    integrations_readable: bool,
}

struct StoredCustomer {
    customer: SimCustomer,
    /// Creation order, which `GET /customers` pages through.
    seq: u64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct IdempotencyScope {
    api_key: String,
    method: String,
    path: String,
    key: String,
}

struct IdempotencyEntry {
    body_sha256: Vec<u8>,
    first_used: Instant,
    /// `None` while the first request is still being processed.
    answer: Option<Answer>,
}

/// A response kept as plain parts so the idempotency store can replay it.
#[derive(Clone, Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(status: StatusCode, value: &Value) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = serde_json::to_vec(value).expect("a serde_json::Value always serializes");
        Answer {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// A non-2xx answer before it is rendered into RevKeen's error envelope.
struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    param: Option<String>,
    fields: Option<Map<String, Value>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
            param: None,
            fields: None,
        }
    }

    fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "validation_error", message)
    }

    /// A 400 listing every offending field; `param` names the first one.
    fn fields(fields: Map<String, Value>) -> ApiError {
        let mut error = ApiError::validation("Request validation failed");
        error.param = fields.keys().next().cloned();
        error.fields = Some(fields);
        error
    }

    fn param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_owned());
        self
    }

    fn into_answer(self, request_id: &str) -> Answer {
        let kind = match self.status.as_u16() {
            401 | 403 => "authentication_error",
            409 => "idempotency_error",
            429 => "rate_limit_error",
            500.. => "api_error",
            _ => "invalid_request_error",
        };
        let mut error = Map::new();
        error.insert("type".into(), kind.into());
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        if let Some(param) = self.param {
            error.insert("param".into(), param.into());
        }
        if let Some(fields) = self.fields {
            error.insert("details".into(), json!({ "fields": fields }));
        }
        error.insert("request_id".into(), request_id.into());
        Answer::json(self.status, &json!({ "error": error }))
    }

    /// A 429 telling the client how long to wait (`None` sends no `Retry-After`).
    fn rate_limited(message: &str, retry_after: Option<HeaderValue>, request_id: &str) -> Answer {
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            message,
        );
        let mut answer = error.into_answer(request_id);
        if let Some(retry_after) = retry_after {
            answer.headers.insert(header::RETRY_AFTER, retry_after);
        }
        answer
    }
}

/// What a request path and method address.
enum Route {
    Write(Write),
    List,
    Get {
        id: String,
    },
    /// A known route whose path segment is not valid percent-encoded UTF-8.
    BadPath,
    NotFound,
}

/// The two PUT endpoints, the only ones that write and honour `Idempotency-Key`.
enum Write {
    Single { source: String, external_id: String },
    Batch,
}

impl Route {
    fn parse(method: &str, path: &str) -> Route {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        match (method, segments.as_slice()) {
            ("PUT", ["customers", "external", "batch"]) => Route::Write(Write::Batch),
            ("PUT", ["customers", "external", source, external_id])
                if !source.is_empty() && !external_id.is_empty() =>
            {
                match (percent_decode(source), percent_decode(external_id)) {
                    (Some(source), Some(external_id)) => Route::Write(Write::Single {
                        source,
                        external_id,
                    }),
                    _ => Route::BadPath,
                }
            }
            ("GET", ["customers"]) => Route::List,
            ("GET", ["customers", id]) if !id.is_empty() => match percent_decode(id) {
                Some(id) => Route::Get { id },
                None => Route::BadPath,
            },
            _ => Route::NotFound,
        }
    }
}

/// The provider of `GET /integrations/{provider}` (RevKeen's own hosted sync), which is
/// answered apart from the customer API.
fn integration_path(method: &str, path: &str) -> Option<String> {
    match (method, path.strip_prefix("/integrations/")) {
        ("GET", Some(provider)) if !provider.is_empty() && !provider.contains('/') => {
            percent_decode(provider)
        }
        _ => None,
    }
}

/// Per-request facts the processing steps share.
struct Ctx {
    request_id: String,
    method: String,
    path: String,
    /// `Some(Err)` when the header is present but not visible ASCII.
    idempotency_key: Option<Result<String, ()>>,
    faults: Faults,
}

/// The answer to a request and how it was reached.
struct Outcome {
    answer: Answer,
    replayed: bool,
    /// Passed faults, auth and rate limit: only such requests can have their connection dropped,
    /// since only they can have done anything worth retrying.
    admitted: bool,
}

impl Outcome {
    fn refused(answer: Answer) -> Outcome {
        Outcome {
            answer,
            replayed: false,
            admitted: false,
        }
    }

    fn answered(answer: Answer) -> Outcome {
        Outcome {
            answer,
            replayed: false,
            admitted: true,
        }
    }
}

/// The idempotency store's verdict on a keyed request.
enum Claim {
    /// The key is ours; the entry was stamped with this instant.
    Claimed(Instant),
    /// Answer without processing: a replay or a 409.
    Answered(Outcome),
}

enum Reply {
    Answer(Answer),
    Dropped,
}

/// The result of writing one customer.
enum Applied {
    Written {
        customer: Box<SimCustomer>,
        created: bool,
    },
    Stale {
        stored: String,
        incoming: String,
    },
}

impl RevKeenSim {
    /// A simulator with no customers, configured by `options`.
    pub fn new(options: RevKeenOptions) -> Self {
        let state = SimState {
            api_keys: options.api_keys.into_iter().collect(),
            requests_per_minute: options.requests_per_minute,
            burst: options.burst,
            buckets: HashMap::new(),
            faults: Faults::default(),
            rejections: Vec::new(),
            customers: BTreeMap::new(),
            next_seq: 0,
            idempotency: HashMap::new(),
            idempotency_swept_len: 0,
            stats: RevKeenStats::default(),
            log: Vec::new(),
            next_log_id: 0,
            hosted_sync: BTreeMap::new(),
            integrations_readable: true,
        };
        RevKeenSim {
            inner: Arc::new(Inner {
                started: Instant::now(),
                idempotency_ttl: options.idempotency_ttl,
                record_bodies: options.record_bodies,
                state: Mutex::new(state),
            }),
        }
    }

    /// The API routes plus the unauthenticated `/_sim/…` routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_sim/stats", get(sim_stats))
            .route("/_sim/customers", get(sim_customers))
            .route("/_sim/requests", get(sim_requests))
            .route("/_sim/reset-log", post(sim_reset_log))
            .route("/_sim/faults", put(sim_set_faults).get(sim_get_faults))
            .route("/_sim/keys", put(sim_set_keys))
            .route("/_sim/rate-limit", put(sim_set_rate_limit))
            .route("/_sim/integrations/{provider}", put(sim_set_integration))
            .route(
                "/_sim/rejections",
                put(sim_set_rejections).get(sim_get_rejections),
            )
            // The API is one fallback because every request, even to an unknown path, must be
            // counted, faulted and authenticated before routing, and the path must stay raw.
            .fallback(api)
            .with_state(self.clone())
    }

    /// Serves the simulator on `addr` (port 0 picks a free port).
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        SimServer::spawn(self.router(), addr).await
    }

    /// Replaces the injected faults; applies to requests arriving from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The faults currently injected.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Replaces the accepted `x-api-key` values (revoking a key makes it a 401).
    pub fn set_api_keys(&self, keys: Vec<String>) {
        self.lock().api_keys = keys.into_iter().collect();
    }

    /// Changes the per-key limit; every key starts again with a full bucket. 0 is unlimited.
    pub fn set_rate_limit(&self, requests_per_minute: u32, burst: u32) {
        let mut state = self.lock();
        state.requests_per_minute = requests_per_minute;
        state.burst = burst;
        for bucket in state.buckets.values() {
            bucket.set(requests_per_minute, Duration::from_secs(60), burst);
        }
    }

    /// Switches RevKeen's own hosted sync for `provider` (`wodify`, `practicehub`) on, or with
    /// `None` removes it (its read answers 404).
    pub fn set_hosted_sync(&self, provider: &str, sync: Option<HostedSync>) {
        let mut state = self.lock();
        match sync {
            Some(sync) => state.hosted_sync.insert(provider.to_owned(), sync),
            None => state.hosted_sync.remove(provider),
        };
    }

    /// Whether keys may read `GET /integrations/{provider}` (off: 403, a key without the
    /// `integrations:read` scope).
    pub fn set_integrations_readable(&self, readable: bool) {
        self.lock().integrations_readable = readable;
    }

    /// Replaces the business-rule rejections; an empty list refuses nothing.
    pub fn set_rejections(&self, rules: Vec<Rejection>) {
        self.lock().rejections = rules;
    }

    /// The customers of `source`, sorted by external id.
    pub fn customers(&self, source: &str) -> Vec<SimCustomer> {
        self.lock()
            .customers
            .iter()
            .filter(|((stored_source, _), _)| stored_source == source)
            .map(|(_, stored)| stored.customer.clone())
            .collect()
    }

    /// One customer by (`source`, `external_id`), with the external id percent-decoded.
    pub fn customer(&self, source: &str, external_id: &str) -> Option<SimCustomer> {
        self.lock()
            .customers
            .get(&(source.to_owned(), external_id.to_owned()))
            .map(|stored| stored.customer.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RevKeenStats {
        self.lock().stats.clone()
    }

    /// The API requests received, in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock()
            .log
            .iter()
            .map(|(_, logged)| logged.clone())
            .collect()
    }

    /// Clears the request log and zeroes the counters; customers and the idempotency store stay,
    /// so a test can measure one phase without losing what earlier phases wrote.
    pub fn clear_log(&self) {
        let mut state = self.lock();
        state.log.clear();
        state.stats = RevKeenStats::default();
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.inner
            .state
            .lock()
            .expect("revkeen sim state lock poisoned by a panicking request")
    }

    fn millis_since_start(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One API request from arrival to reply.
    async fn handle(&self, parts: Parts, body: Result<Bytes, String>) -> Reply {
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        if let Some(provider) = integration_path(&method, &path) {
            return Reply::Answer(self.integration_read(&provider, &parts.headers));
        }
        let route = Route::parse(&method, &path);
        let idempotency_key = parts
            .headers
            .get("idempotency-key")
            .map(|value| value.to_str().map(str::to_owned).map_err(|_| ()));
        let (faults, log_id) = {
            let mut state = self.lock();
            state.stats.requests += 1;
            match route {
                Route::Write(Write::Batch) => state.stats.batch_requests += 1,
                Route::Write(Write::Single { .. }) => state.stats.single_requests += 1,
                _ => {}
            }
            let log_id = state.next_log_id;
            state.next_log_id += 1;
            let recorded_body = match &body {
                Ok(bytes) if self.inner.record_bodies && !bytes.is_empty() => {
                    Some(String::from_utf8_lossy(bytes).into_owned())
                }
                _ => None,
            };
            let logged_key = parts
                .headers
                .get("idempotency-key")
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
            state.log.push((
                log_id,
                LoggedRequest {
                    method: method.clone(),
                    path: path.clone(),
                    idempotency_key: logged_key,
                    status: 0,
                    replayed: false,
                    body: recorded_body,
                    at_ms: self.millis_since_start(),
                },
            ));
            (state.faults.clone(), log_id)
        };
        if let Some(headers) = faults.redirect_headers(&parts.uri) {
            // Before faults, auth and routing: a redirecting front does nothing of the API.
            let mut state = self.lock();
            state.stats.redirected += 1;
            if let Some((_, logged)) = state.log.iter_mut().rev().find(|(id, _)| *id == log_id) {
                logged.status = StatusCode::TEMPORARY_REDIRECT.as_u16();
            }
            return Reply::Answer(Answer {
                status: StatusCode::TEMPORARY_REDIRECT,
                headers,
                body: Bytes::new(),
            });
        }
        let ctx = Ctx {
            request_id: new_request_id(),
            method,
            path,
            idempotency_key,
            faults,
        };

        let mut outcome = self.respond(&ctx, &parts, route, body).await;
        // Echoed after storing so a replay echoes the version of the request it answers.
        if let Some(version) = parts.headers.get("revkeen-version") {
            outcome
                .answer
                .headers
                .insert("revkeen-version", version.clone());
        }
        let dropped = outcome.admitted && Faults::roll(ctx.faults.drop_rate);
        {
            let mut state = self.lock();
            if dropped {
                state.stats.dropped += 1;
            }
            if let Some((_, logged)) = state.log.iter_mut().rev().find(|(id, _)| *id == log_id) {
                logged.status = outcome.answer.status.as_u16();
                logged.replayed = outcome.replayed;
            }
        }
        if dropped {
            Reply::Dropped
        } else {
            Reply::Answer(outcome.answer)
        }
    }

    async fn respond(
        &self,
        ctx: &Ctx,
        parts: &Parts,
        route: Route,
        body: Result<Bytes, String>,
    ) -> Outcome {
        let api_key = match self.admit(ctx, &parts.headers) {
            Ok(api_key) => api_key,
            Err(answer) => {
                ctx.faults.delay().await;
                return Outcome::refused(*answer);
            }
        };
        match route {
            Route::Write(write) => self.write(ctx, &api_key, write, body).await,
            Route::List => {
                ctx.faults.delay().await;
                Outcome::answered(self.list(ctx, &parts.uri))
            }
            Route::Get { id } => {
                ctx.faults.delay().await;
                Outcome::answered(self.get_by_id(ctx, &id))
            }
            Route::BadPath => {
                ctx.faults.delay().await;
                self.lock().stats.validation_errors += 1;
                let error = ApiError::validation("path segment is not valid percent-encoded UTF-8");
                Outcome::answered(error.into_answer(&ctx.request_id))
            }
            Route::NotFound => {
                ctx.faults.delay().await;
                let error = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "resource_not_found",
                    format!("no route for {} {}", ctx.method, ctx.path),
                );
                Outcome::answered(error.into_answer(&ctx.request_id))
            }
        }
    }

    /// Injected faults, auth and the rate limit, in that order; returns the caller's API key.
    fn admit(&self, ctx: &Ctx, headers: &HeaderMap) -> Result<String, Box<Answer>> {
        let refuse = |error: ApiError| Box::new(error.into_answer(&ctx.request_id));
        let (api_key, bucket) = {
            let mut state = self.lock();
            if Faults::roll(ctx.faults.error_rate) {
                state.stats.server_errors += 1;
                return Err(refuse(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the service is temporarily unavailable; retry with backoff",
                )));
            }
            if Faults::roll(ctx.faults.rate_429) {
                state.stats.rate_limited += 1;
                return Err(Box::new(ApiError::rate_limited(
                    "too many requests; retry after the Retry-After delay",
                    ctx.faults
                        .injected_retry_after(Some(HeaderValue::from(1u64))),
                    &ctx.request_id,
                )));
            }
            let api_key = headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok());
            let Some(api_key) = api_key.filter(|key| state.api_keys.contains(*key)) else {
                state.stats.auth_failures += 1;
                let message = match (api_key, headers.contains_key(header::AUTHORIZATION)) {
                    (Some(_), _) => "the x-api-key is not valid",
                    (None, true) => {
                        "missing x-api-key header; Authorization: Bearer is not accepted"
                    }
                    (None, false) => "missing x-api-key header",
                };
                return Err(refuse(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    message,
                )));
            };
            let (rate, burst) = (state.requests_per_minute, state.burst);
            let bucket = state
                .buckets
                .entry(api_key.to_owned())
                .or_insert_with(|| Arc::new(Bucket::new(rate, Duration::from_secs(60), burst)))
                .clone();
            (api_key.to_owned(), bucket)
        };
        if let Err(wait) = bucket.check() {
            self.lock().stats.rate_limited += 1;
            return Err(Box::new(ApiError::rate_limited(
                "rate limit exceeded for this API key; retry after the Retry-After delay",
                Some(HeaderValue::from(retry_after_secs(wait))),
                &ctx.request_id,
            )));
        }
        Ok(api_key)
    }

    /// A PUT: idempotency, then latency, then validation and the write.
    async fn write(
        &self,
        ctx: &Ctx,
        api_key: &str,
        write: Write,
        body: Result<Bytes, String>,
    ) -> Outcome {
        if Faults::roll(ctx.faults.bad_2xx_rate) {
            // Not processed at all: no key claimed, nothing validated or stored. Not
            // "admitted" either, since there is nothing a dropped answer could hide.
            ctx.faults.delay().await;
            self.lock().stats.bad_answers += 1;
            return Outcome::refused(bad_2xx_answer(&ctx.faults));
        }
        let key = match &ctx.idempotency_key {
            None => None,
            Some(Ok(key)) if (1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&key.chars().count()) => {
                Some(key.clone())
            }
            Some(_) => {
                ctx.faults.delay().await;
                self.lock().stats.validation_errors += 1;
                let error = ApiError::validation(format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII \
                     characters"
                ))
                .param("Idempotency-Key");
                return Outcome::answered(error.into_answer(&ctx.request_id));
            }
        };
        let body = match body {
            Ok(body) => body,
            Err(reason) => {
                ctx.faults.delay().await;
                self.lock().stats.validation_errors += 1;
                let error = ApiError::validation(reason);
                return Outcome::answered(error.into_answer(&ctx.request_id));
            }
        };
        let body_sha256 = Sha256::digest(&body).to_vec();
        let scope = key.map(|key| IdempotencyScope {
            api_key: api_key.to_owned(),
            method: ctx.method.clone(),
            path: ctx.path.clone(),
            key,
        });

        let mut claim = None;
        if let Some(scope) = scope {
            match self.claim(ctx, &scope, &body_sha256) {
                Claim::Claimed(claimed_at) => claim = Some((scope, claimed_at)),
                Claim::Answered(outcome) => {
                    ctx.faults.delay().await;
                    return outcome;
                }
            }
        }

        // The latency is the time the request spends "being processed", with its key claimed.
        ctx.faults.delay().await;

        let mut state = self.lock();
        let answer = match write {
            Write::Batch => state.batch(&body, &ctx.request_id),
            Write::Single {
                source,
                external_id,
            } => state.upsert(&source, &external_id, &body, &ctx.request_id),
        };
        if let Some((scope, claimed_at)) = claim {
            let status = answer.status;
            let storable = status.is_success()
                || status == StatusCode::BAD_REQUEST
                || status == StatusCode::UNPROCESSABLE_ENTITY;
            // With a TTL shorter than the latency, a later request may have re-claimed the
            // expired key; that entry is not ours to fill in or remove.
            let ours = state
                .idempotency
                .get_mut(&scope)
                .filter(|entry| entry.first_used == claimed_at);
            match ours {
                Some(entry) if storable => entry.answer = Some(answer.clone()),
                Some(_) => {
                    state.idempotency.remove(&scope);
                }
                None => {}
            }
        }
        Outcome::answered(answer)
    }

    /// Looks the key up and claims it if it is new (or expired); otherwise answers with a
    /// replay, a conflict, or "the first request is still running".
    fn claim(&self, ctx: &Ctx, scope: &IdempotencyScope, body_sha256: &[u8]) -> Claim {
        let ttl = self.inner.idempotency_ttl;
        let now = Instant::now();
        let mut state = self.lock();
        let live = |entry: &IdempotencyEntry| now.duration_since(entry.first_used) < ttl;
        let Some(entry) = state.idempotency.get(scope).filter(|entry| live(entry)) else {
            // Expired keys are dropped in sweeps whenever the store has doubled since the last
            // one, so memory stays bounded without scanning the store on every request.
            if state.idempotency.len() >= state.idempotency_swept_len.saturating_mul(2).max(1024) {
                state.idempotency.retain(|_, entry| live(entry));
                state.idempotency_swept_len = state.idempotency.len();
            }
            state.idempotency.insert(
                scope.clone(),
                IdempotencyEntry {
                    body_sha256: body_sha256.to_vec(),
                    first_used: now,
                    answer: None,
                },
            );
            return Claim::Claimed(now);
        };
        // A different body is a client bug whether or not the first request has finished, so
        // it takes precedence over "in progress".
        if entry.body_sha256 != body_sha256 {
            state.stats.conflicts += 1;
            let error = ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "this Idempotency-Key was already used with a different request body",
            )
            .param("Idempotency-Key");
            return Claim::Answered(Outcome::answered(error.into_answer(&ctx.request_id)));
        }
        match &entry.answer {
            None => {
                state.stats.in_progress += 1;
                let error = ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                )
                .param("Idempotency-Key");
                Claim::Answered(Outcome::answered(error.into_answer(&ctx.request_id)))
            }
            Some(stored) => {
                let mut answer = stored.clone();
                answer
                    .headers
                    .insert("idempotency-replayed", HeaderValue::from_static("true"));
                state.stats.replayed += 1;
                Claim::Answered(Outcome {
                    answer,
                    replayed: true,
                    admitted: true,
                })
            }
        }
    }

    /// `GET /integrations/{provider}` from arrival: counted on its own, the key checked.
    fn integration_read(&self, provider: &str, headers: &HeaderMap) -> Answer {
        let known = {
            let mut state = self.lock();
            state.stats.integration_reads += 1;
            headers
                .get("x-api-key")
                .and_then(|key| key.to_str().ok())
                .is_some_and(|key| state.api_keys.contains(key))
        };
        if !known {
            return Answer::json(
                StatusCode::UNAUTHORIZED,
                &json!({ "success": false, "error": "Invalid API key" }),
            );
        }
        self.integration(provider)
    }

    /// `GET /integrations/{provider}`, in the integration endpoints' own envelope.
    fn integration(&self, provider: &str) -> Answer {
        let state = self.lock();
        if !state.integrations_readable {
            return Answer::json(
                StatusCode::FORBIDDEN,
                &json!({ "success": false, "error": "Insufficient scope: integrations:read" }),
            );
        }
        match state.hosted_sync.get(provider) {
            Some(sync) => Answer::json(
                StatusCode::OK,
                &json!({ "success": true, "data": {
                    "provider": provider,
                    "isActive": sync.is_active,
                    "syncEnabled": sync.sync_enabled,
                    "status": sync.status,
                    "lastSyncAt": sync.last_sync_at,
                    "syncHealth": "healthy",
                    "syncInterval": { "intervalMs": 300_000, "nextRun": null },
                }}),
            ),
            None => Answer::json(
                StatusCode::NOT_FOUND,
                &json!({ "success": false, "error": format!("Integration {provider} not found") }),
            ),
        }
    }

    fn list(&self, ctx: &Ctx, uri: &Uri) -> Answer {
        let refuse = |state: &mut SimState, error: ApiError| {
            state.stats.validation_errors += 1;
            error.into_answer(&ctx.request_id)
        };
        let mut state = self.lock();
        let query = match Query::<HashMap<String, String>>::try_from_uri(uri) {
            Ok(Query(query)) => query,
            Err(_) => return refuse(&mut state, ApiError::validation("malformed query string")),
        };
        let limit = match query.get("limit").map(|limit| limit.parse::<usize>()) {
            None => DEFAULT_LIST_LIMIT,
            Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
            Some(_) => {
                let error = ApiError::validation("limit must be an integer from 1 to 100");
                return refuse(&mut state, error.param("limit"));
            }
        };
        let offset = match query.get("offset").map(|offset| offset.parse::<usize>()) {
            None => 0,
            Some(Ok(offset)) => offset,
            Some(Err(_)) => {
                let error = ApiError::validation("offset must be a non-negative integer");
                return refuse(&mut state, error.param("offset"));
            }
        };
        let search = query.get("search").map(|search| search.to_lowercase());
        let mut matching: Vec<&StoredCustomer> = state
            .customers
            .values()
            .filter(|stored| match &search {
                None => true,
                Some(search) => ["email", "name"].iter().any(|field| {
                    stored
                        .customer
                        .fields
                        .get(*field)
                        .and_then(Value::as_str)
                        .is_some_and(|text| text.to_lowercase().contains(search.as_str()))
                }),
            })
            .collect();
        matching.sort_by_key(|stored| stored.seq);
        let total = matching.len();
        let data: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|stored| customer_json(&stored.customer))
            .collect();
        Answer::json(
            StatusCode::OK,
            &json!({
                "data": data,
                "pagination": {
                    "limit": limit,
                    "offset": offset,
                    "total": total,
                    "hasMore": offset.saturating_add(limit) < total,
                },
            }),
        )
    }

    fn get_by_id(&self, ctx: &Ctx, id: &str) -> Answer {
        let state = self.lock();
        match state
            .customers
            .values()
            .find(|stored| stored.customer.id == id)
        {
            Some(stored) => Answer::json(
                StatusCode::OK,
                &json!({ "data": customer_json(&stored.customer) }),
            ),
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "resource_not_found",
                format!("no customer with id {id}"),
            )
            .param("id")
            .into_answer(&ctx.request_id),
        }
    }
}

impl SimState {
    /// Whether [`Faults::schema_refuse`] names `external_id`.
    fn schema_refuses(&self, external_id: &str) -> bool {
        self.faults.schema_refuse.iter().any(|id| id == external_id)
    }

    fn rejection_for(&self, external_id: &str, fields: &Map<String, Value>) -> Option<Rejection> {
        let email = fields.get("email").and_then(Value::as_str);
        self.rejections
            .iter()
            .find(|rule| rule.matches(external_id, email))
            .cloned()
    }

    fn upsert(&mut self, source: &str, external_id: &str, body: &[u8], request_id: &str) -> Answer {
        let fields = match parse_single(body) {
            Ok(fields) => fields,
            Err(error) => {
                self.stats.validation_errors += 1;
                return error.into_answer(request_id);
            }
        };
        if self.schema_refuses(external_id) {
            self.stats.validation_errors += 1;
            return schema_refusal("name").into_answer(request_id);
        }
        if let Some(rule) = self.rejection_for(external_id, &fields) {
            self.stats.rejected += 1;
            let status = match rule.status {
                400 => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let mut error = ApiError::new(status, &rule.code, rule.message.clone());
            if let Some(field) = rule.field {
                let mut fields = Map::new();
                fields.insert(field.clone(), rule.message.into());
                error.param = Some(field);
                error.fields = Some(fields);
            }
            return error.into_answer(request_id);
        }
        match self.apply(source, external_id, fields) {
            Applied::Written { customer, created } => {
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Answer::json(
                    status,
                    &json!({ "data": customer_json(&customer), "created": created }),
                )
            }
            Applied::Stale { stored, incoming } => Answer::json(
                StatusCode::OK,
                &json!({
                    "ignored": true,
                    "reason": "stale_update",
                    "stored_timestamp": stored,
                    "incoming_timestamp": incoming,
                }),
            ),
        }
    }

    fn batch(&mut self, body: &[u8], request_id: &str) -> Answer {
        let (source, items) = match parse_batch(body) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.stats.validation_errors += 1;
                return error.into_answer(request_id);
            }
        };
        if let Some(index) = items.iter().position(|(id, _)| self.schema_refuses(id)) {
            self.stats.validation_errors += 1;
            return schema_refusal(&format!("customers[{index}].name")).into_answer(request_id);
        }
        let (mut created, mut updated, mut skipped) = (0u64, 0u64, 0u64);
        let mut failed = Vec::new();
        for (external_id, fields) in items {
            if let Some(rule) = self.rejection_for(&external_id, &fields) {
                self.stats.rejected += 1;
                failed.push(json!({
                    "external_id": external_id,
                    "error": format!("{}: {}", rule.code, rule.message),
                }));
                continue;
            }
            match self.apply(&source, &external_id, fields) {
                Applied::Written { created: true, .. } => created += 1,
                Applied::Written { created: false, .. } => updated += 1,
                Applied::Stale { .. } => skipped += 1,
            }
        }
        Answer::json(
            StatusCode::OK,
            &json!({
                "created": created,
                "updated": updated,
                "skipped": skipped,
                "failed": failed,
            }),
        )
    }

    /// Creates, replaces or (when stale) ignores one customer, counting the outcome.
    fn apply(&mut self, source: &str, external_id: &str, fields: Map<String, Value>) -> Applied {
        let now = now_rfc3339();
        let key = (source.to_owned(), external_id.to_owned());
        if let Some(stored) = self.customers.get_mut(&key) {
            if let Some((stored_ts, incoming_ts)) = stale(&stored.customer.fields, &fields) {
                self.stats.stale += 1;
                return Applied::Stale {
                    stored: stored_ts,
                    incoming: incoming_ts,
                };
            }
            stored.customer.fields = fields;
            stored.customer.updated_at = now;
            stored.customer.writes += 1;
            self.stats.updated += 1;
            return Applied::Written {
                customer: Box::new(stored.customer.clone()),
                created: false,
            };
        }
        let customer = SimCustomer {
            id: new_uuid(),
            source: key.0.clone(),
            external_id: key.1.clone(),
            fields,
            created_at: now.clone(),
            updated_at: now,
            writes: 1,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.customers.insert(
            key,
            StoredCustomer {
                customer: customer.clone(),
                seq,
            },
        );
        self.stats.created += 1;
        Applied::Written {
            customer: Box::new(customer),
            created: true,
        }
    }
}

/// The `200` of the `bad_2xx_rate` fault: `bad_2xx_body` (default `{}`) as JSON, whatever it
/// holds.
fn bad_2xx_answer(faults: &Faults) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = faults.bad_2xx_body.as_deref().unwrap_or("{}");
    Answer {
        status: StatusCode::OK,
        headers,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// The (stored, incoming) timestamps when the incoming write is strictly older than the stored
/// data. Either side missing means there is nothing to protect, so the write goes through.
fn stale(stored: &Map<String, Value>, incoming: &Map<String, Value>) -> Option<(String, String)> {
    let stored = stored.get("external_updated_at")?.as_str()?;
    let incoming = incoming.get("external_updated_at")?.as_str()?;
    let older =
        DateTime::parse_from_rfc3339(incoming).ok()? < DateTime::parse_from_rfc3339(stored).ok()?;
    older.then(|| (stored.to_owned(), incoming.to_owned()))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::validation(format!("malformed JSON: {error}")))
}

/// Validates a single upsert body and returns its fields.
fn parse_single(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(fields) = parse_json(body)? else {
        return Err(ApiError::validation(
            "the request body must be a JSON object",
        ));
    };
    let mut errors = Map::new();
    check_customer(&fields, BodyKind::Single, "", &mut errors);
    if errors.is_empty() {
        Ok(fields)
    } else {
        Err(ApiError::fields(errors))
    }
}

/// A batch's items as (external id, body fields without `external_id`).
type BatchItems = Vec<(String, Map<String, Value>)>;

/// Validates a batch body and returns its source and (external id, fields) items. Any invalid
/// item refuses the whole batch, so the simulator never half-applies a malformed request.
fn parse_batch(body: &[u8]) -> Result<(String, BatchItems), ApiError> {
    let Value::Object(mut top) = parse_json(body)? else {
        return Err(ApiError::validation(
            "the request body must be a JSON object",
        ));
    };
    let mut errors = Map::new();
    for key in top.keys() {
        if key != "source" && key != "customers" {
            errors.insert(key.clone(), "unknown field".into());
        }
    }
    let source = match top.get("source") {
        Some(Value::String(source)) if !source.is_empty() => Some(source.clone()),
        None => {
            errors.insert("source".into(), "is required".into());
            None
        }
        Some(_) => {
            errors.insert("source".into(), "must be a non-empty string".into());
            None
        }
    };
    let items = match top.remove("customers") {
        Some(Value::Array(items)) => items,
        None => {
            errors.insert("customers".into(), "is required".into());
            Vec::new()
        }
        Some(_) => {
            errors.insert("customers".into(), "must be an array".into());
            Vec::new()
        }
    };
    if items.len() > MAX_BATCH_ITEMS {
        errors.insert(
            "customers".into(),
            format!("must contain at most {MAX_BATCH_ITEMS} items").into(),
        );
    }
    let mut seen = HashSet::new();
    let mut parsed = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let prefix = format!("customers[{index}].");
        let Value::Object(mut item) = item else {
            errors.insert(format!("customers[{index}]"), "must be an object".into());
            continue;
        };
        check_customer(&item, BodyKind::BatchItem, &prefix, &mut errors);
        match item.remove("external_id") {
            Some(Value::String(id)) if !id.is_empty() => {
                if !seen.insert(id.clone()) {
                    errors.insert(
                        format!("{prefix}external_id"),
                        "duplicate external_id in this batch".into(),
                    );
                }
                parsed.push((id, item));
            }
            None => {
                errors.insert(format!("{prefix}external_id"), "is required".into());
            }
            Some(_) => {
                errors.insert(
                    format!("{prefix}external_id"),
                    "must be a non-empty string".into(),
                );
            }
        }
    }
    match source {
        Some(source) if errors.is_empty() => Ok((source, parsed)),
        _ => Err(ApiError::fields(errors)),
    }
}

/// The 400 for a body [`Faults::schema_refuse`] names, pinned on `field`.
fn schema_refusal(field: &str) -> ApiError {
    let mut fields = Map::new();
    fields.insert(field.to_owned(), "is not accepted".into());
    ApiError::fields(fields)
}

/// Adds an error per offending field of one customer body to `errors`, keyed `{prefix}{field}`.
fn check_customer(
    item: &Map<String, Value>,
    kind: BodyKind,
    prefix: &str,
    errors: &mut Map<String, Value>,
) {
    let mut note = |field: &str, message: &str| {
        errors
            .entry(format!("{prefix}{field}"))
            .or_insert_with(|| message.into());
    };
    for key in item.keys() {
        if !kind.allows(key) {
            note(key, "unknown field");
        }
    }
    match item.get("email") {
        None => note("email", "is required"),
        Some(Value::String(email)) if !valid_email(email) => {
            note("email", "must be a valid email address");
        }
        _ => {}
    }
    for field in STRING_FIELDS {
        if item.get(field).is_some_and(|value| !value.is_string()) {
            note(field, "must be a string");
        }
    }
    if let Some(Value::String(country)) = item.get("country")
        && !(country.len() == 2 && country.bytes().all(|byte| byte.is_ascii_uppercase()))
    {
        note(
            "country",
            "must be an ISO 3166-1 alpha-2 code (two uppercase letters)",
        );
    }
    for field in ["metadata", "custom_fields"] {
        if kind.allows(field) && item.get(field).is_some_and(|value| !value.is_object()) {
            note(field, "must be an object");
        }
    }
    match item.get("external_updated_at") {
        Some(Value::String(at)) if DateTime::parse_from_rfc3339(at).is_err() => {
            note("external_updated_at", "must be an RFC 3339 date-time");
        }
        Some(value) if !value.is_string() => note("external_updated_at", "must be a string"),
        _ => {}
    }
}

/// One `@` with text on both sides and a dot in the domain: the check the docs imply, no more.
fn valid_email(email: &str) -> bool {
    let mut parts = email.split('@');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(local), Some(domain), None)
            if !local.is_empty() && !domain.is_empty() && domain.contains('.')
    )
}

/// The camelCase `Customer` of the March 2026 API.
fn customer_json(customer: &SimCustomer) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), customer.id.clone().into());
    out.insert("merchantId".into(), MERCHANT_ID.into());
    for (field, name) in [
        ("email", "email"),
        ("name", "name"),
        ("phone", "phone"),
        ("metadata", "metadata"),
        ("custom_fields", "customFields"),
    ] {
        if let Some(value) = customer.fields.get(field) {
            out.insert(name.into(), value.clone());
        }
    }
    out.insert("createdAt".into(), customer.created_at.clone().into());
    out.insert("updatedAt".into(), customer.updated_at.clone().into());
    Value::Object(out)
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes.get(index + 1..index + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A random (version 4) UUID without enabling uuid's `v4` feature.
fn new_uuid() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .to_string()
}

fn new_request_id() -> String {
    format!("req_{:032x}", fastrand::u128(..))
}

/// Entry point of every API request (see [`RevKeenSim::router`]).
async fn api(State(sim): State<RevKeenSim>, request: Request) -> Response {
    if request.uri().path().starts_with("/_sim/") {
        return sim_error(StatusCode::NOT_FOUND, "no such /_sim route");
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            format!("the request body could not be read or exceeds {MAX_BODY_BYTES} bytes")
        });
    // Processing runs in its own task so a client hanging up mid-request does not cancel a
    // write halfway, exactly as a real server keeps going.
    let task = tokio::spawn(async move { sim.handle(parts, body).await });
    match task.await {
        Ok(Reply::Answer(answer)) => answer.into_response(),
        Ok(Reply::Dropped) => dropped_connection(),
        Err(_) => sim_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the simulator failed while handling this request",
        ),
    }
}

fn sim_error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "error": { "code": "sim_error", "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Parses a `/_sim` request body; the error is the JSON 400 to answer.
fn sim_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|error| {
        Box::new(sim_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid body: {error}"),
        ))
    })
}

#[derive(Deserialize)]
struct SourceQuery {
    source: Option<String>,
}

/// Body of `PUT /_sim/rate-limit`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimit {
    requests_per_minute: u32,
    burst: u32,
}

/// `PUT /_sim/integrations/{provider}`: a [`HostedSync`] (camelCase) switches RevKeen's own
/// sync for the provider on; `null` removes it.
async fn sim_set_integration(
    State(sim): State<RevKeenSim>,
    axum::extract::Path(provider): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    match sim_body::<Option<HostedSync>>(&body) {
        Ok(sync) => {
            sim.set_hosted_sync(&provider, sync);
            axum::Json(json!({ "ok": true })).into_response()
        }
        Err(response) => *response,
    }
}

async fn sim_stats(State(sim): State<RevKeenSim>) -> Response {
    axum::Json(sim.stats()).into_response()
}

/// All customers of `?source=`, or of every source (sorted by source, then id) without it.
async fn sim_customers(State(sim): State<RevKeenSim>, uri: Uri) -> Response {
    let Ok(Query(query)) = Query::<SourceQuery>::try_from_uri(&uri) else {
        return sim_error(StatusCode::BAD_REQUEST, "malformed query string");
    };
    let customers: Vec<SimCustomer> = match query.source {
        Some(source) => sim.customers(&source),
        None => sim
            .lock()
            .customers
            .values()
            .map(|stored| stored.customer.clone())
            .collect(),
    };
    axum::Json(customers).into_response()
}

async fn sim_requests(State(sim): State<RevKeenSim>) -> Response {
    axum::Json(sim.requests()).into_response()
}

async fn sim_reset_log(State(sim): State<RevKeenSim>) -> Response {
    sim.clear_log();
    axum::Json(json!({ "ok": true })).into_response()
}

async fn sim_get_faults(State(sim): State<RevKeenSim>) -> Response {
    axum::Json(sim.faults()).into_response()
}

async fn sim_set_faults(State(sim): State<RevKeenSim>, body: Bytes) -> Response {
    match sim_body::<Faults>(&body) {
        Ok(faults) => {
            sim.set_faults(faults.clone());
            axum::Json(faults).into_response()
        }
        Err(response) => *response,
    }
}

async fn sim_set_keys(State(sim): State<RevKeenSim>, body: Bytes) -> Response {
    match sim_body::<Vec<String>>(&body) {
        Ok(keys) => {
            sim.set_api_keys(keys.clone());
            axum::Json(keys).into_response()
        }
        Err(response) => *response,
    }
}

async fn sim_set_rate_limit(State(sim): State<RevKeenSim>, body: Bytes) -> Response {
    match sim_body::<RateLimit>(&body) {
        Ok(limit) => {
            sim.set_rate_limit(limit.requests_per_minute, limit.burst);
            axum::Json(limit).into_response()
        }
        Err(response) => *response,
    }
}

async fn sim_get_rejections(State(sim): State<RevKeenSim>) -> Response {
    axum::Json(sim.lock().rejections.clone()).into_response()
}

/// Refuses rules that could never match or name a status RevKeen does not use for them, since
/// over HTTP a silently inert rule would be hard to notice.
async fn sim_set_rejections(State(sim): State<RevKeenSim>, body: Bytes) -> Response {
    let rules = match sim_body::<Vec<Rejection>>(&body) {
        Ok(rules) => rules,
        Err(response) => return *response,
    };
    for (index, rule) in rules.iter().enumerate() {
        if rule.external_id.is_none() && rule.email.is_none() {
            let message = format!("rule {index} needs external_id or email");
            return sim_error(StatusCode::BAD_REQUEST, &message);
        }
        if rule.status != 400 && rule.status != 422 {
            let message = format!("rule {index}: status must be 400 or 422");
            return sim_error(StatusCode::BAD_REQUEST, &message);
        }
    }
    sim.set_rejections(rules.clone());
    axum::Json(rules).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_dropped, send_json, send_status};

    const KEY: &str = "rk_sandbox_sim";

    struct Harness {
        sim: RevKeenSim,
        server: SimServer,
        client: reqwest::Client,
    }

    impl Harness {
        async fn start() -> Harness {
            Harness::with(RevKeenOptions::default()).await
        }

        async fn with(options: RevKeenOptions) -> Harness {
            let sim = RevKeenSim::new(options);
            let server = sim
                .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .unwrap();
            Harness {
                sim,
                server,
                client: reqwest::Client::new(),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("{}{}", self.server.url(), path)
        }

        fn put_request(
            &self,
            path: &str,
            body: &Value,
            key: Option<&str>,
        ) -> reqwest::RequestBuilder {
            let mut request = self
                .client
                .put(self.url(path))
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            request
        }

        async fn put(
            &self,
            path: &str,
            body: &Value,
            key: Option<&str>,
        ) -> (u16, HeaderMap, Value) {
            let response = self.put_request(path, body, key).send().await.unwrap();
            read(response).await
        }

        async fn get(&self, path: &str) -> (u16, Value) {
            let response = self
                .client
                .get(self.url(path))
                .header("x-api-key", KEY)
                .send()
                .await
                .unwrap();
            let (status, _, body) = read(response).await;
            (status, body)
        }
    }

    #[tokio::test]
    async fn the_hosted_sync_read_answers_404_until_switched_on_and_403_without_the_scope() {
        let h = Harness::start().await;
        let (status, body) = h.get("/integrations/wodify").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["success"], false);

        h.sim.set_hosted_sync("wodify", Some(HostedSync::active()));
        let (status, body) = h.get("/integrations/wodify").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["isActive"], true);
        assert_eq!(body["data"]["syncEnabled"], true);
        let (status, _) = h.get("/integrations/practicehub").await;
        assert_eq!(status, 404);

        // The /_sim switch is the same as the method.
        let response = h
            .client
            .put(h.url("/_sim/integrations/wodify"))
            .body("null")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(h.get("/integrations/wodify").await.0, 404);

        h.sim.set_integrations_readable(false);
        let (status, body) = h.get("/integrations/wodify").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["success"], false);
        // Counted apart from the customer API.
        let stats = h.sim.stats();
        assert_eq!((stats.requests, stats.integration_reads), (0, 5));
        assert!(h.sim.requests().is_empty());
    }

    async fn read(response: reqwest::Response) -> (u16, HeaderMap, Value) {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json::<Value>().await.unwrap();
        (status, headers, body)
    }

    fn upsert_path(source: &str, external_id: &str) -> String {
        format!("/customers/external/{source}/{external_id}")
    }

    fn error_code(body: &Value) -> &str {
        body["error"]["code"].as_str().unwrap()
    }

    fn item(external_id: &str, email: &str) -> Value {
        json!({ "external_id": external_id, "email": email })
    }

    #[tokio::test]
    async fn create_then_update_replaces_fields() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let first = json!({ "email": "ann@example.com", "name": "Ann", "phone": "+15550100" });
        let response = h
            .put_request(&path, &first, None)
            .header("RevKeen-Version", "2026-05-01")
            .send()
            .await
            .unwrap();
        let (status, headers, body) = read(response).await;
        assert_eq!(status, 201);
        assert_eq!(headers["revkeen-version"], "2026-05-01");
        assert_eq!(body["created"], true);
        assert_eq!(body["data"]["email"], "ann@example.com");
        assert_eq!(body["data"]["merchantId"], MERCHANT_ID);
        let id = body["data"]["id"].as_str().unwrap().to_owned();

        let second = json!({ "email": "ann@example.com", "name": "Ann B" });
        let (status, _, body) = h.put(&path, &second, None).await;
        assert_eq!(status, 200);
        assert_eq!(body["created"], false);
        assert_eq!(body["data"]["id"], id.as_str());

        let stored = h.sim.customer("wodify", "C1").unwrap();
        assert_eq!(stored.writes, 2);
        assert_eq!(stored.fields["name"], "Ann B");
        assert!(
            !stored.fields.contains_key("phone"),
            "absent fields are removed"
        );
        let stats = h.sim.stats();
        assert_eq!(
            (stats.created, stats.updated, stats.single_requests),
            (1, 1, 2)
        );

        let (status, body) = h.get(&format!("/customers/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["name"], "Ann B");
        let (status, body) = h.get("/customers?limit=10").await;
        assert_eq!(status, 200);
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
        assert_eq!(body["pagination"]["total"], 1);
        let (status, body) = h.get("/customers?limit=0").await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["param"], "limit");
    }

    #[tokio::test]
    async fn older_external_updated_at_is_ignored() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let at = |name: &str, at: &str| {
            json!({
                "email": "a@b.co",
                "name": name,
                "external_updated_at": at,
            })
        };
        let newer = at("New", "2026-01-02T00:00:00Z");
        assert_eq!(h.put(&path, &newer, None).await.0, 201);
        let older = at("Old", "2026-01-01T23:00:00-02:00");
        // -02:00 makes it 2026-01-02T01:00Z, newer than stored: not stale.
        let (status, _, body) = h.put(&path, &older, None).await;
        assert_eq!((status, &body["created"]), (200, &json!(false)));
        let really_older = at("Old", "2026-01-01T00:00:00Z");
        let (status, _, body) = h.put(&path, &really_older, None).await;
        assert_eq!(status, 200);
        assert_eq!(body["ignored"], true);
        assert_eq!(body["reason"], "stale_update");
        assert_eq!(body["stored_timestamp"], "2026-01-01T23:00:00-02:00");
        assert_eq!(body["incoming_timestamp"], "2026-01-01T00:00:00Z");
        let stored = h.sim.customer("wodify", "C1").unwrap();
        assert_eq!(stored.fields["name"], "Old");
        assert_eq!(stored.writes, 2);
        assert_eq!(h.sim.stats().stale, 1);
    }

    #[tokio::test]
    async fn same_key_and_body_is_replayed_without_a_second_write() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" });
        let (status, headers, first) = h.put(&path, &body, Some("k-1")).await;
        assert_eq!(status, 201);
        assert!(headers.get("idempotency-replayed").is_none());
        let (status, headers, second) = h.put(&path, &body, Some("k-1")).await;
        assert_eq!(status, 201);
        assert_eq!(headers["idempotency-replayed"], "true");
        assert_eq!(first, second);
        assert_eq!(h.sim.customer("wodify", "C1").unwrap().writes, 1);
        let stats = h.sim.stats();
        assert_eq!((stats.created, stats.replayed), (1, 1));
        let replayed: Vec<bool> = h.sim.requests().iter().map(|r| r.replayed).collect();
        assert_eq!(replayed, [false, true]);
        // The key is scoped per path: the same key elsewhere is a fresh request.
        let (status, headers, _) = h
            .put(&upsert_path("wodify", "C2"), &body, Some("k-1"))
            .await;
        assert_eq!(status, 201);
        assert!(headers.get("idempotency-replayed").is_none());
    }

    #[tokio::test]
    async fn same_key_with_a_different_body_is_a_conflict() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        assert_eq!(
            h.put(&path, &json!({ "email": "a@b.co" }), Some("k"))
                .await
                .0,
            201
        );
        let (status, _, body) = h.put(&path, &json!({ "email": "z@b.co" }), Some("k")).await;
        assert_eq!(status, 409);
        assert_eq!(error_code(&body), "idempotency_conflict");
        assert_eq!(
            h.sim.customer("wodify", "C1").unwrap().fields["email"],
            "a@b.co"
        );
        assert_eq!(h.sim.stats().conflicts, 1);
    }

    #[tokio::test]
    async fn expired_key_is_forgotten() {
        let options = RevKeenOptions {
            idempotency_ttl: Duration::ZERO,
            ..RevKeenOptions::default()
        };
        let h = Harness::with(options).await;
        let path = upsert_path("wodify", "C1");
        assert_eq!(
            h.put(&path, &json!({ "email": "a@b.co" }), Some("k"))
                .await
                .0,
            201
        );
        let (status, _, body) = h.put(&path, &json!({ "email": "z@b.co" }), Some("k")).await;
        assert_eq!((status, &body["created"]), (200, &json!(false)));
    }

    #[tokio::test]
    async fn retry_while_first_is_processing_is_in_progress() {
        let h = Harness::start().await;
        h.sim.set_faults(Faults {
            latency_ms: 600,
            ..Faults::default()
        });
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" });
        let first = tokio::spawn(h.put_request(&path, &body, Some("k")).send());
        while h.sim.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The key is claimed synchronously right after arrival; this margin only covers
        // scheduling, far below the 600 ms the first request is held for.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _, answer) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 409);
        assert_eq!(error_code(&answer), "idempotency_in_progress");
        let (status, _, answer) = read(first.await.unwrap().unwrap()).await;
        assert_eq!((status, &answer["created"]), (201, &json!(true)));
        assert_eq!(h.sim.stats().in_progress, 1);
        // Once finished, the same retry is a replay.
        h.sim.set_faults(Faults::default());
        let (status, headers, _) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 201);
        assert_eq!(headers["idempotency-replayed"], "true");
    }

    #[tokio::test]
    async fn unknown_field_is_a_400_with_field_details_and_is_replayed() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co", "favourite_colour": "blue" });
        let (status, _, answer) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 400);
        assert_eq!(error_code(&answer), "validation_error");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        assert_eq!(
            answer["error"]["details"]["fields"],
            json!({ "favourite_colour": "unknown field" })
        );
        assert!(answer["error"]["request_id"].is_string());
        assert!(h.sim.customer("wodify", "C1").is_none());
        let (status, headers, again) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 400);
        assert_eq!(headers["idempotency-replayed"], "true");
        assert_eq!(answer, again);
        assert_eq!(h.sim.stats().validation_errors, 1);
    }

    #[tokio::test]
    async fn missing_or_invalid_fields_are_400() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let cases = [
            (json!({ "name": "Ann" }), "email"),
            (json!({ "email": "not-an-email" }), "email"),
            (json!({ "email": "a@localhost" }), "email"),
            (json!({ "email": "a@b.co", "country": "us" }), "country"),
            (json!({ "email": "a@b.co", "name": 7 }), "name"),
            (json!({ "email": "a@b.co", "metadata": [] }), "metadata"),
            (
                json!({ "email": "a@b.co", "external_updated_at": "yesterday" }),
                "external_updated_at",
            ),
        ];
        for (body, field) in cases {
            let (status, _, answer) = h.put(&path, &body, None).await;
            assert_eq!(status, 400, "{body}");
            assert!(
                answer["error"]["details"]["fields"][field].is_string(),
                "{body}: {answer}"
            );
        }
        let response = h
            .client
            .put(h.url(&path))
            .header("x-api-key", KEY)
            .body("{not json")
            .send()
            .await
            .unwrap();
        let (status, _, answer) = read(response).await;
        assert_eq!((status, error_code(&answer)), (400, "validation_error"));
        let long_key = "k".repeat(256);
        let (status, _, answer) = h
            .put(&path, &json!({ "email": "a@b.co" }), Some(&long_key))
            .await;
        assert_eq!(
            (status, &answer["error"]["param"]),
            (400, &json!("Idempotency-Key"))
        );
        assert!(h.sim.customers("wodify").is_empty());
        assert_eq!(h.sim.stats().validation_errors, 9);
    }

    #[tokio::test]
    async fn bad_key_and_bearer_auth_are_401() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" }).to_string();
        let bad = h
            .client
            .put(h.url(&path))
            .header("x-api-key", "rk_live_wrong")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let bearer = h
            .client
            .put(h.url(&path))
            .header("authorization", format!("Bearer {KEY}"))
            .body(body)
            .send()
            .await
            .unwrap();
        for response in [bad, bearer] {
            let (status, _, answer) = read(response).await;
            assert_eq!((status, error_code(&answer)), (401, "invalid_api_key"));
        }
        assert!(h.sim.customer("wodify", "C1").is_none());
        assert_eq!(h.sim.stats().auth_failures, 2);
    }

    #[tokio::test]
    async fn over_the_rate_limit_is_429_with_retry_after_per_key() {
        let h = Harness::start().await;
        h.sim
            .set_api_keys(vec![KEY.into(), "rk_sandbox_other".into()]);
        h.sim.set_rate_limit(60, 2);
        let body = json!({ "email": "a@b.co" });
        let path = upsert_path("wodify", "C1");
        assert_eq!(h.put(&path, &body, None).await.0, 201);
        assert_eq!(h.put(&path, &body, None).await.0, 200);
        let (status, headers, answer) = h.put(&path, &body, Some("k")).await;
        assert_eq!((status, error_code(&answer)), (429, "rate_limit_exceeded"));
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        assert_eq!(h.sim.customer("wodify", "C1").unwrap().writes, 2);
        // The 429 was not stored: the key is still unused once the bucket refills.
        assert!(h.sim.lock().idempotency.is_empty());
        let other = h
            .client
            .put(h.url(&path))
            .header("x-api-key", "rk_sandbox_other")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 200);
        assert_eq!(h.sim.stats().rate_limited, 1);
    }

    #[tokio::test]
    async fn dropped_connection_applies_the_write_and_the_retry_is_a_replay() {
        let h = Harness::start().await;
        h.sim.set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        });
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" });
        assert_dropped(h.put_request(&path, &body, Some("k")).send().await).await;
        assert_eq!(h.sim.customer("wodify", "C1").unwrap().writes, 1);
        assert_eq!(h.sim.stats().dropped, 1);
        h.sim.set_faults(Faults::default());
        let (status, headers, answer) = h.put(&path, &body, Some("k")).await;
        assert_eq!((status, &answer["created"]), (201, &json!(true)));
        assert_eq!(headers["idempotency-replayed"], "true");
        assert_eq!(h.sim.customer("wodify", "C1").unwrap().writes, 1);
    }

    #[tokio::test]
    async fn injected_errors_do_nothing_and_unknown_routes_are_404() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" });
        h.sim.set_faults(Faults {
            error_rate: 1.0,
            ..Faults::default()
        });
        let (status, _, answer) = h.put(&path, &body, Some("k")).await;
        assert_eq!((status, error_code(&answer)), (503, "service_unavailable"));
        h.sim.set_faults(Faults {
            rate_429: 1.0,
            ..Faults::default()
        });
        let (status, headers, _) = h.put(&path, &body, Some("k")).await;
        assert_eq!(
            (status, headers["retry-after"].to_str().unwrap()),
            (429, "1")
        );
        h.sim.set_faults(Faults::default());
        assert!(h.sim.customer("wodify", "C1").is_none());
        // Neither fault touched the idempotency store, so the key is fresh.
        let (status, headers, _) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 201);
        assert!(headers.get("idempotency-replayed").is_none());
        let (status, answer) = h.get("/invoices").await;
        assert_eq!((status, error_code(&answer)), (404, "resource_not_found"));
        let stats = h.sim.stats();
        assert_eq!(
            (stats.requests, stats.server_errors, stats.rate_limited),
            (4, 1, 1)
        );
    }

    #[tokio::test]
    async fn percent_encoded_external_id_is_decoded() {
        let h = Harness::start().await;
        let path = "/customers/external/practicehub/a%2Fb%20c";
        let (status, _, _) = h.put(path, &json!({ "email": "a@b.co" }), None).await;
        assert_eq!(status, 201);
        let stored = h.sim.customer("practicehub", "a/b c").unwrap();
        assert_eq!(stored.external_id, "a/b c");
        assert_eq!(h.sim.requests()[0].path, path);
        let (status, _, _) = h
            .put(
                "/customers/external/practicehub/%ZZ",
                &json!({ "email": "a@b.co" }),
                None,
            )
            .await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn batch_creates_updates_and_skips_stale_items() {
        let h = Harness::start().await;
        let batch = json!({ "source": "wodify", "customers": [
            {
                "external_id": "1",
                "email": "one@b.co",
                "external_updated_at": "2026-02-01T00:00:00Z",
            },
            item("2", "two@b.co"),
            item("3", "three@b.co"),
        ]});
        let (status, _, answer) = h.put("/customers/external/batch", &batch, Some("b1")).await;
        assert_eq!(status, 200);
        assert_eq!(
            answer,
            json!({ "created": 3, "updated": 0, "skipped": 0, "failed": [] })
        );
        let batch = json!({ "source": "wodify", "customers": [
            {
                "external_id": "1",
                "email": "old@b.co",
                "external_updated_at": "2026-01-01T00:00:00Z",
            },
            item("2", "two@b.co"),
            item("4", "four@b.co"),
        ]});
        let (_, _, answer) = h.put("/customers/external/batch", &batch, Some("b2")).await;
        assert_eq!(
            answer,
            json!({ "created": 1, "updated": 1, "skipped": 1, "failed": [] })
        );
        let ids: Vec<String> = h
            .sim
            .customers("wodify")
            .into_iter()
            .map(|c| c.external_id)
            .collect();
        assert_eq!(ids, ["1", "2", "3", "4"]);
        assert_eq!(
            h.sim.customer("wodify", "1").unwrap().fields["email"],
            "one@b.co"
        );
        assert!(
            !h.sim
                .customer("wodify", "2")
                .unwrap()
                .fields
                .contains_key("external_id")
        );
        let stats = h.sim.stats();
        assert_eq!(
            (
                stats.batch_requests,
                stats.created,
                stats.updated,
                stats.stale
            ),
            (2, 4, 1, 1)
        );
    }

    #[tokio::test]
    async fn batch_item_matching_a_rejection_lands_in_failed() {
        let h = Harness::start().await;
        h.sim.set_rejections(vec![Rejection {
            external_id: None,
            email: Some("Blocked@B.co".into()),
            status: 422,
            code: "customer_blocked".into(),
            message: "this customer is blocked".into(),
            field: None,
        }]);
        let batch = json!({
            "source": "wodify",
            "customers": [item("1", "ok@b.co"), item("2", "blocked@b.co")],
        });
        let (status, _, answer) = h.put("/customers/external/batch", &batch, None).await;
        assert_eq!(status, 200);
        assert_eq!(answer["created"], 1);
        assert_eq!(
            answer["failed"],
            json!([{ "external_id": "2", "error": "customer_blocked: this customer is blocked" }])
        );
        assert!(h.sim.customer("wodify", "2").is_none());
        assert_eq!(h.sim.stats().rejected, 1);
    }

    #[tokio::test]
    async fn invalid_batch_item_refuses_the_whole_batch() {
        let h = Harness::start().await;
        let batch = json!({ "source": "wodify", "customers": [
            item("1", "ok@b.co"),
            { "external_id": "2", "email": "x@b.co", "custom_fields": {} },
        ]});
        let (status, _, answer) = h.put("/customers/external/batch", &batch, None).await;
        assert_eq!(status, 400);
        assert_eq!(
            answer["error"]["details"]["fields"],
            json!({ "customers[1].custom_fields": "unknown field" })
        );
        let duplicate =
            json!({ "source": "wodify", "customers": [item("1", "a@b.co"), item("1", "b@b.co")] });
        let (status, _, answer) = h.put("/customers/external/batch", &duplicate, None).await;
        assert_eq!(status, 400);
        assert!(answer["error"]["details"]["fields"]["customers[1].external_id"].is_string());
        assert!(h.sim.customers("wodify").is_empty());
    }

    #[tokio::test]
    async fn batch_over_100_items_is_400() {
        let h = Harness::start().await;
        let items: Vec<Value> = (0..101).map(|n| item(&n.to_string(), "a@b.co")).collect();
        let batch = json!({ "source": "wodify", "customers": items });
        let (status, _, answer) = h.put("/customers/external/batch", &batch, None).await;
        assert_eq!(status, 400);
        assert!(answer["error"]["details"]["fields"]["customers"].is_string());
        assert!(h.sim.customers("wodify").is_empty());
        let items: Vec<Value> = (0..100).map(|n| item(&n.to_string(), "a@b.co")).collect();
        let batch = json!({ "source": "wodify", "customers": items });
        let (status, _, answer) = h.put("/customers/external/batch", &batch, None).await;
        assert_eq!((status, &answer["created"]), (200, &json!(100)));
    }

    #[tokio::test]
    async fn rejection_rules_refuse_singles_with_their_status_and_field() {
        let h = Harness::start().await;
        h.sim.set_rejections(vec![
            Rejection {
                external_id: Some("P-9".into()),
                email: None,
                status: 422,
                code: "invalid_phone".into(),
                message: "phone number is not reachable".into(),
                field: Some("phone".into()),
            },
            Rejection {
                external_id: None,
                email: Some("spam@b.co".into()),
                status: 400,
                code: "validation_error".into(),
                message: "email is on a block list".into(),
                field: None,
            },
        ]);
        let (status, _, answer) = h
            .put(
                &upsert_path("practicehub", "P-9"),
                &json!({ "email": "a@b.co" }),
                Some("r"),
            )
            .await;
        assert_eq!((status, error_code(&answer)), (422, "invalid_phone"));
        assert_eq!(
            answer["error"]["details"]["fields"],
            json!({ "phone": "phone number is not reachable" })
        );
        let (status, _, answer) = h
            .put(
                &upsert_path("practicehub", "P-1"),
                &json!({ "email": "SPAM@b.co" }),
                None,
            )
            .await;
        assert_eq!((status, error_code(&answer)), (400, "validation_error"));
        assert!(answer["error"].get("details").is_none());
        // A 422 is stored like any 4xx.
        let (status, headers, _) = h
            .put(
                &upsert_path("practicehub", "P-9"),
                &json!({ "email": "a@b.co" }),
                Some("r"),
            )
            .await;
        assert_eq!(
            (status, &headers["idempotency-replayed"]),
            (422, &HeaderValue::from_static("true"))
        );
        assert!(h.sim.customers("practicehub").is_empty());
        let stats = h.sim.stats();
        assert_eq!((stats.rejected, stats.validation_errors), (2, 0));
    }

    #[tokio::test]
    async fn a_schema_refusal_is_a_400_alone_and_refuses_a_batch_whole() {
        let h = Harness::start().await;
        h.sim.set_faults(Faults {
            schema_refuse: vec!["W-2".into()],
            ..Faults::default()
        });
        let (status, _, answer) = h
            .put(
                &upsert_path("wodify", "W-2"),
                &json!({ "email": "a@b.co" }),
                None,
            )
            .await;
        assert_eq!((status, error_code(&answer)), (400, "validation_error"));
        assert_eq!(
            answer["error"]["details"]["fields"],
            json!({ "name": "is not accepted" })
        );
        let batch = json!({
            "source": "wodify",
            "customers": [
                { "external_id": "W-1", "email": "a@b.co" },
                { "external_id": "W-2", "email": "b@b.co" },
            ],
        });
        let (status, _, answer) = h.put("/customers/external/batch", &batch, None).await;
        assert_eq!(status, 400);
        assert_eq!(
            answer["error"]["details"]["fields"],
            json!({ "customers[1].name": "is not accepted" })
        );
        assert!(h.sim.customers("wodify").is_empty(), "nothing applied");
        assert_eq!(h.sim.stats().validation_errors, 2);
    }

    #[tokio::test]
    async fn sim_routes_round_trip() {
        let h = Harness::start().await;
        let put_json = |path: &str, body: Value| h.client.put(h.url(path)).json(&body);
        let get = |path: &str| h.client.get(h.url(path));

        let faults = json!({
            "error_rate": 0.0,
            "rate_429": 0.0,
            "latency_ms": 5,
            "drop_rate": 0.0,
            "envelope_rate": 0.0,
        });
        assert_eq!(
            send_status(put_json("/_sim/faults", faults.clone())).await,
            200
        );
        assert_eq!(h.sim.faults().latency_ms, 5);
        let got: Value = send_json(get("/_sim/faults")).await;
        assert_eq!(got, faults);
        let bad = put_json("/_sim/faults", json!({ "nope": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        assert!(bad.json::<Value>().await.unwrap()["error"]["message"].is_string());

        assert_eq!(
            send_status(put_json("/_sim/keys", json!(["rk_new"]))).await,
            200
        );
        let body = json!({ "email": "a@b.co" });
        assert_eq!(h.put(&upsert_path("s", "old"), &body, None).await.0, 401);
        let created = h
            .client
            .put(h.url(&upsert_path("s", "1")))
            .header("x-api-key", "rk_new")
            .json(&body);
        assert_eq!(send_status(created).await, 201);

        let limit = json!({ "requests_per_minute": 0, "burst": 1 });
        assert_eq!(send_status(put_json("/_sim/rate-limit", limit)).await, 200);

        let rule = |external_id: Option<&str>| {
            json!({
                "external_id": external_id,
                "email": null,
                "status": 422,
                "code": "c",
                "message": "m",
                "field": null,
            })
        };
        let rules = json!([rule(Some("X"))]);
        let set_rules = put_json("/_sim/rejections", rules.clone());
        assert_eq!(send_status(set_rules).await, 200);
        let got: Value = send_json(get("/_sim/rejections")).await;
        assert_eq!(got, rules);
        let inert = json!([rule(None)]);
        assert_eq!(send_status(put_json("/_sim/rejections", inert)).await, 400);

        let customers: Vec<SimCustomer> = send_json(get("/_sim/customers?source=s")).await;
        assert_eq!(customers, h.sim.customers("s"));
        assert_eq!(customers.len(), 1);
        let stats: RevKeenStats = send_json(get("/_sim/stats")).await;
        assert_eq!(
            (stats.requests, stats.created, stats.auth_failures),
            (2, 1, 1)
        );
        let requests: Vec<LoggedRequest> = send_json(get("/_sim/requests")).await;
        assert_eq!(requests, h.sim.requests());
        assert_eq!(
            requests.iter().map(|r| r.status).collect::<Vec<_>>(),
            [401, 201]
        );
        assert_eq!(requests[1].body.as_deref(), Some(r#"{"email":"a@b.co"}"#));

        let reset = h.client.post(h.url("/_sim/reset-log"));
        assert_eq!(send_status(reset).await, 200);
        assert_eq!(h.sim.stats(), RevKeenStats::default());
        assert!(h.sim.requests().is_empty());
        assert_eq!(
            h.sim.customers("s").len(),
            1,
            "customers survive a log reset"
        );
    }

    /// Replaces the faults through `PUT /_sim/faults`, as a test against a running simulator
    /// would.
    async fn put_faults(h: &Harness, faults: Value) {
        let request = h.client.put(h.url("/_sim/faults")).json(&faults);
        assert_eq!(send_status(request).await, 200, "{faults}");
    }

    /// A PUT's status, headers and raw body.
    async fn put_raw(
        h: &Harness,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> (u16, HeaderMap, Bytes) {
        let response = h.put_request(path, body, key).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await.unwrap())
    }

    #[tokio::test]
    async fn an_injected_429_sends_the_retry_after_fault() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co" });
        put_faults(&h, json!({ "rate_429": 1.0 })).await;
        let (status, headers, _) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "1", "off by default");

        for value in [
            "18446744073709551615",
            "86400",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            put_faults(&h, json!({ "rate_429": 1.0, "retry_after": value })).await;
            let (status, headers, answer) = h.put(&path, &body, Some("k")).await;
            assert_eq!((status, error_code(&answer)), (429, "rate_limit_exceeded"));
            assert_eq!(headers["retry-after"], value);
        }
        assert!(h.sim.customer("wodify", "C1").is_none());

        // Alone it changes nothing, and the limiter's own 429 keeps its computed value.
        put_faults(&h, json!({ "retry_after": "86400" })).await;
        assert_eq!(h.put(&path, &body, Some("k")).await.0, 201);
        h.sim.set_rate_limit(60, 1);
        assert_eq!(h.put(&path, &body, None).await.0, 200);
        let (status, headers, _) = h.put(&path, &body, None).await;
        assert_eq!(status, 429);
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry_after), "{retry_after}");
    }

    #[tokio::test]
    async fn redirect_to_answers_307_and_does_nothing_else() {
        let h = Harness::start().await;
        let body = json!({ "email": "a@b.co" });
        assert_eq!(
            h.put(&upsert_path("wodify", "C0"), &body, None).await.0,
            201,
            "off by default"
        );
        h.sim.clear_log();

        let faults = json!({ "redirect_to": "https://api.example.com/v2", "error_rate": 1.0 });
        put_faults(&h, faults).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let batch = json!({ "source": "wodify", "customers": [item("C2", "b@b.co")] });
        let sent = [
            ("PUT", "/customers/external/wodify/C1?dry_run=false", &body),
            ("PUT", "/customers/external/batch", &batch),
            ("GET", "/customers?limit=5", &Value::Null),
            ("GET", "/invoices", &Value::Null),
        ];
        for (method, path_and_query, body) in sent {
            // No key: a redirecting front answers before anything is checked.
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut request = http.request(method, h.url(path_and_query));
            if !body.is_null() {
                request = request.header("idempotency-key", "k").json(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 307, "{path_and_query}");
            assert_eq!(
                response.headers()[header::LOCATION],
                format!("https://api.example.com/v2{path_and_query}").as_str()
            );
            assert!(response.bytes().await.unwrap().is_empty());
        }
        assert!(h.sim.customer("wodify", "C1").is_none());
        assert!(h.sim.customer("wodify", "C2").is_none());
        assert!(h.sim.lock().idempotency.is_empty(), "no key claimed");
        let stats: RevKeenStats = send_json(h.client.get(h.url("/_sim/stats"))).await;
        assert_eq!((stats.requests, stats.redirected), (4, 4));
        assert_eq!((stats.single_requests, stats.batch_requests), (1, 1));
        assert_eq!(
            (stats.server_errors, stats.auth_failures, stats.writes()),
            (0, 0, 0)
        );
        let log: Vec<(String, u16)> = h
            .sim
            .requests()
            .into_iter()
            .map(|r| (r.path, r.status))
            .collect();
        let paths = ["/customers/external/wodify/C1", "/customers/external/batch"];
        let expected: Vec<(String, u16)> = paths
            .into_iter()
            .chain(["/customers", "/invoices"])
            .map(|path| (path.to_owned(), 307))
            .collect();
        assert_eq!(log, expected);

        // Nothing was claimed: the same key is fresh once the redirect is gone.
        h.sim.set_faults(Faults::default());
        let path = upsert_path("wodify", "C1");
        let (status, headers, _) = h.put(&path, &body, Some("k")).await;
        assert_eq!(status, 201);
        assert!(headers.get("idempotency-replayed").is_none());
    }

    #[tokio::test]
    async fn bad_2xx_answers_200_without_writing_or_keeping_the_key() {
        let h = Harness::start().await;
        let path = upsert_path("wodify", "C1");
        let body = json!({ "email": "a@b.co", "name": "Ann" });
        assert_eq!(
            h.put(&path, &body, Some("k0")).await.0,
            201,
            "off by default"
        );

        put_faults(&h, json!({ "bad_2xx_rate": 1.0 })).await;
        let update = json!({ "email": "a@b.co", "name": "Ann B" });
        let (status, headers, answer) = put_raw(&h, &path, &update, Some("k1")).await;
        assert_eq!((status, &answer[..]), (200, &b"{}"[..]));
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(headers.get("idempotency-replayed").is_none());
        for bad in [
            "OK",
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            "",
        ] {
            put_faults(&h, json!({ "bad_2xx_rate": 1.0, "bad_2xx_body": bad })).await;
            let (status, headers, answer) = put_raw(&h, &path, &update, Some("k1")).await;
            assert_eq!((status, &answer[..]), (200, bad.as_bytes()));
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        }
        // Not even validated: the request is never processed.
        let invalid = json!({ "nope": 1 });
        assert_eq!(put_raw(&h, &path, &invalid, None).await.0, 200);

        let stored = h.sim.customer("wodify", "C1").unwrap();
        assert_eq!((stored.writes, &stored.fields["name"]), (1, &json!("Ann")));
        let stats = h.sim.stats();
        assert_eq!((stats.bad_answers, stats.single_requests), (5, 6));
        assert_eq!((stats.updated, stats.validation_errors), (0, 0));
        let statuses: Vec<u16> = h.sim.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [201, 200, 200, 200, 200, 200]);

        // No idempotency record was kept, so the retry under the same key is processed afresh.
        put_faults(&h, json!({})).await;
        let (status, headers, answer) = h.put(&path, &update, Some("k1")).await;
        assert_eq!((status, &answer["data"]["name"]), (200, &json!("Ann B")));
        assert!(headers.get("idempotency-replayed").is_none());
        assert_eq!(h.sim.customer("wodify", "C1").unwrap().writes, 2);
    }

    #[tokio::test]
    async fn bad_2xx_answers_a_batch_with_the_configured_body() {
        let h = Harness::start().await;
        let batch = json!({ "source": "wodify", "customers": [
            item("1", "one@b.co"),
            item("2", "two@b.co"),
            item("3", "three@b.co"),
        ]});
        let short = r#"{"created":1,"updated":0,"skipped":0,"failed":[]}"#;
        put_faults(&h, json!({ "bad_2xx_rate": 1.0, "bad_2xx_body": short })).await;
        let path = "/customers/external/batch";
        let (status, headers, answer) = put_raw(&h, path, &batch, Some("b")).await;
        assert_eq!((status, &answer[..]), (200, short.as_bytes()));
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(h.sim.customers("wodify").is_empty());
        // Reads are not upserts and are served as usual.
        let (status, listed) = h.get("/customers").await;
        assert_eq!((status, &listed["data"]), (200, &json!([])));
        let stats = h.sim.stats();
        assert_eq!((stats.bad_answers, stats.batch_requests), (1, 1));

        put_faults(&h, json!({ "bad_2xx_rate": 0.0 })).await;
        let (status, headers, answer) = h.put(path, &batch, Some("b")).await;
        assert_eq!(status, 200);
        assert!(headers.get("idempotency-replayed").is_none());
        assert_eq!(
            answer,
            json!({ "created": 3, "updated": 0, "skipped": 0, "failed": [] })
        );
    }
}
