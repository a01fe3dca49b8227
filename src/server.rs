//! The daemon's HTTP server: `/healthz`, `/readyz`, `/metrics` and the signed push feed.
//!
//! `POST /v1/changes/{source}` takes ids only (`{"events": [{"external_id": "12345"}]}`),
//! signed with `X-Sync-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{raw body}">`. The daemon
//! re-reads each record from the source API itself, so a push can never inject data the source
//! does not hold. 202 is answered only after the events are committed to the state file; a
//! rejected body is never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, KeyInit, Mac};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::clock::now_ms;
use crate::health::Health;
use crate::secret::SecretCell;
use crate::sources::Source;
use crate::store::{PushRecorded, Store};

/// Largest push body accepted.
pub const PUSH_BODY_LIMIT: usize = 1024 * 1024;
/// How far a push signature's timestamp may be from now.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// How recently every loop must have beaten for `/healthz` to answer 200.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(30);
/// The longest `X-Sync-Signature` read: `t=` and four 64-digit signatures fit in 300 bytes.
pub const MAX_SIGNATURE_HEADER: usize = 1024;
/// Signatures per request: rotation needs two (old and new secret); each costs an HMAC over
/// the whole body, so a header cannot ask for thousands.
pub const MAX_SIGNATURES: usize = 4;
/// Events per push request (413 beyond): a change feed sends a few at a time.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;
/// Push events waiting to be fetched, per source (503 with `Retry-After` beyond): each is a GET
/// to the source, and 5,000 is about 17 minutes of Wodify's documented 5 requests a second. A
/// change missed while the feed is refused is still found by the next scheduled scan.
pub const MAX_PENDING_PUSH: usize = 5000;
/// What a sender refused for a full backlog is told to wait.
pub const PUSH_RETRY_AFTER_SECS: u64 = 60;
/// How long a push waits for the state file (locked by a `replay` or a backup) before 503.
pub const PUSH_STORE_PATIENCE: Duration = Duration::from_secs(15);
/// How long a connection may take to send a request's headers, and may sit idle between
/// requests, before it is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, body included (408 beyond).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections at once. Far below the 1,024 descriptors a process gets by default (the
/// systemd unit raises it to 8,192): outbound requests and the state file keep theirs.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a new connection waits, at the cap, for the connection it evicted to close.
const EVICTION_PATIENCE: Duration = Duration::from_secs(1);
/// Request headers larger than this are answered 431 without being read further.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// At most one log line a minute about refused requests.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// A source's push feed.
pub struct PushFeed {
    pub secret: SecretCell,
    pub adapter: Arc<dyn Source>,
    /// Woken when events are committed.
    pub wake: Arc<Notify>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub health: Arc<Health>,
    /// The sending store, for committing push events.
    pub writer: Store,
    /// A read-only connection for readiness and metrics: never blocks the writer.
    pub reader: Store,
    pub metrics: PrometheusHandle,
    pub push: Arc<HashMap<String, PushFeed>>,
    /// Configured source names (an unknown one is a 404 on the push route).
    pub sources: Arc<Vec<String>>,
    /// Why the daemon is going down, once one of its loops died: not ready from that moment.
    pub fatal: Arc<std::sync::Mutex<Option<String>>>,
    /// Refused requests, summarised in the log once a minute at most.
    pub refusals: Arc<RefusalLog>,
}

/// The router (exposed for tests that drive it without a socket).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/changes/{source}",
            post(push).layer(DefaultBodyLimit::max(PUSH_BODY_LIMIT)),
        )
        .with_state(state)
}

/// Serves until `shutdown`, one task per connection, HTTP/1.1 only.
///
/// Bounded against slow and abusive clients: a connection must send a request's headers
/// within [`HEADER_READ_TIMEOUT`] (hyper starts that clock at accept and again while a
/// keep-alive connection waits for its next request, so it is the idle timeout too); a request
/// must be answered within [`REQUEST_TIMEOUT`] (a body dripped byte by byte gets 408); at most
/// [`MAX_CONNECTIONS`] are open at once, and at the cap a new connection evicts the oldest one
/// that never completed a request, so a flood of half-open connections cannot keep a probe out
/// or take the descriptors the daemon needs for its own requests and the state file.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let refusals = state.refusals.clone();
    let app = router(state);
    let mut slots = Slots::new(MAX_CONNECTIONS);
    // One permit per open connection, released when its task is dropped (its socket closed): an
    // evicted connection's abort takes effect only when the runtime next drops that task, so
    // the cap on descriptors is the permits, not the slots.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let mut summary = tokio::time::interval(REFUSAL_SUMMARY_INTERVAL);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = summary.tick() => {
                refusals.flush(tokio::time::Instant::now());
                continue;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                // Out of descriptors or a connection reset before accept: wait a moment and go
                // on; the server never dies of one failed accept.
                Err(error) => {
                    tracing::warn!(%error, "Accepting a connection failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(served) = slots.admit() else {
            refusals.record(
                "-",
                503,
                "connection cap reached: every slot is serving a request",
                tokio::time::Instant::now(),
            );
            drop(stream);
            continue;
        };
        // After an eviction, wait (briefly) until the evicted connection is really closed.
        let permit =
            match tokio::time::timeout(EVICTION_PATIENCE, permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    refusals.record(
                        "-",
                        503,
                        "connection cap reached: no connection closed in time",
                        tokio::time::Instant::now(),
                    );
                    drop(stream);
                    continue;
                }
            };
        let app = app.clone();
        let stop = shutdown.clone();
        let handle = connections.spawn(serve_connection(stream, app, served.clone(), stop, permit));
        slots.opened(served, handle);
    }
    // Stop accepting; close connections that never sent a request and let open requests
    // finish (the daemon bounds how long it waits).
    slots.close_unserved();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection: hyper's HTTP/1 server with the timeouts above.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    served: Arc<AtomicBool>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let service = hyper::service::service_fn(move |request: axum::http::Request<Incoming>| {
        served.store(true, Ordering::Relaxed);
        let app = app.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(request)).await;
            Ok::<_, std::convert::Infallible>(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => json(
                    StatusCode::REQUEST_TIMEOUT,
                    serde_json::json!({"error": format!("the request was not complete within {} s", REQUEST_TIMEOUT.as_secs())}),
                ),
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// The open connections, oldest first, and whether each has completed a request.
struct Slots {
    max: usize,
    open: std::collections::VecDeque<(Arc<AtomicBool>, tokio::task::AbortHandle)>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max,
            open: std::collections::VecDeque::with_capacity(max),
        }
    }

    /// Room for one more connection: forgets closed ones and, at the cap, evicts the oldest
    /// that never completed a request. `None` when every slot is serving a request.
    fn admit(&mut self) -> Option<Arc<AtomicBool>> {
        self.open.retain(|(_, handle)| !handle.is_finished());
        if self.open.len() >= self.max {
            let idle = self
                .open
                .iter()
                .position(|(served, _)| !served.load(Ordering::Relaxed))?;
            if let Some((_, handle)) = self.open.remove(idle) {
                handle.abort();
            }
        }
        Some(Arc::new(AtomicBool::new(false)))
    }

    fn opened(&mut self, served: Arc<AtomicBool>, handle: tokio::task::AbortHandle) {
        self.open.push_back((served, handle));
    }

    fn close_unserved(&mut self) {
        for (served, handle) in self.open.drain(..) {
            if !served.load(Ordering::Relaxed) {
                handle.abort();
            }
        }
    }
}

/// Refused requests, counted per source and status and written to the log as one line a minute
/// at most, so a flood of bad requests cannot flood the log. The first refusal after a quiet
/// minute is logged at once.
#[derive(Default)]
pub struct RefusalLog {
    inner: std::sync::Mutex<RefusalCounts>,
}

#[derive(Default)]
struct RefusalCounts {
    /// (source or "-", status) → (count, the last problem).
    counts: std::collections::BTreeMap<(String, u16), (u64, String)>,
    last_line: Option<tokio::time::Instant>,
}

impl RefusalLog {
    /// Counts one refusal; returns (and logs) the summary line if one is due.
    pub fn record(
        &self,
        source: &str,
        status: u16,
        problem: &str,
        now: tokio::time::Instant,
    ) -> Option<String> {
        let mut inner = self.lock();
        let entry = inner
            .counts
            .entry((source.to_string(), status))
            .or_insert((0, String::new()));
        entry.0 += 1;
        if entry.1 != problem {
            entry.1 = problem.to_string();
        }
        Self::emit(&mut inner, now)
    }

    /// Logs what was counted since the last line, if a minute has passed.
    pub fn flush(&self, now: tokio::time::Instant) -> Option<String> {
        Self::emit(&mut self.lock(), now)
    }

    fn emit(inner: &mut RefusalCounts, now: tokio::time::Instant) -> Option<String> {
        let due = inner
            .last_line
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_SUMMARY_INTERVAL);
        if !due || inner.counts.is_empty() {
            return None;
        }
        let parts: Vec<String> = std::mem::take(&mut inner.counts)
            .into_iter()
            .map(|((source, status), (count, problem))| {
                let feed = if source == "-" {
                    String::new()
                } else {
                    format!(" on {source}")
                };
                format!("{count} × {status}{feed} ({problem})")
            })
            .collect();
        let line = format!("Requests refused: {}.", parts.join("; "));
        inner.last_line = Some(now);
        tracing::warn!("{line}");
        Some(line)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RefusalCounts> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.health.alive(LIVENESS_WINDOW) {
        json(StatusCode::OK, serde_json::json!({"status": "alive"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "stalled", "reason": "a daemon loop made no progress for 30 s"}),
        )
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let fatal = state
        .fatal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(reason) = fatal {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reason": format!("a daemon loop ended: {reason}; the daemon is exiting")}),
        );
    }
    if let Some(problem) = state.writer.write_problem() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reason": format!("the state file cannot be written: {problem}")}),
        );
    }
    match state.reader.call(|s| s.halts()).await {
        Err(error) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reason": format!("state file unavailable: {error}")}),
        ),
        Ok(halts) if !halts.is_empty() => {
            let reasons: Vec<String> = halts
                .iter()
                .map(|h| format!("{}: {}", h.target, h.message))
                .collect();
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not_ready", "reason": format!("halted: {}", reasons.join("; "))}),
            )
        }
        Ok(_) => json(StatusCode::OK, serde_json::json!({"status": "ready"})),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    use crate::metrics as m;
    // Queue figures and halts live in the state file; read them at scrape time so they are
    // exact (and agree with `status` and `/readyz`).
    if let Ok(summaries) = state.reader.call(|s| s.queue_summary()).await {
        let now = now_ms();
        for source in state.sources.iter() {
            let summary = summaries.iter().find(|s| &s.source == source);
            let (depth, oldest, rejected, dead) = summary
                .map(|s| (s.depth, s.oldest_enqueued_at, s.rejected, s.dead_letters))
                .unwrap_or_default();
            let age = oldest
                .map(|t| (now - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics::gauge!(m::QUEUE_DEPTH, "source" => source.clone()).set(depth as f64);
            metrics::gauge!(m::OLDEST_PENDING_AGE, "source" => source.clone()).set(age);
            metrics::gauge!(m::DEAD_LETTERS, "source" => source.clone()).set(dead as f64);
            metrics::gauge!(m::REJECTED_RECORDS, "source" => source.clone()).set(rejected as f64);
        }
    }
    if let Ok(halts) = state.reader.call(|s| s.halts()).await {
        let targets = std::iter::once(m::REVKEEN).chain(state.sources.iter().map(String::as_str));
        for target in targets {
            // A halt for a misdirected RevKeen address is not a refused key.
            let refused = halts
                .iter()
                .any(|h| h.target == target && h.code != crate::worker::MISDIRECTED);
            metrics::gauge!(m::AUTH_HALTED, "target" => target.to_string()).set(if refused {
                1.0
            } else {
                0.0
            });
        }
    }
    if let Ok(pending) = state.reader.call(|s| s.push_pending()).await {
        for source in state.push.keys() {
            let count = pending
                .iter()
                .find(|(name, _)| name == source)
                .map_or(0, |(_, count)| *count);
            metrics::gauge!(m::PUSH_PENDING, "source" => source.clone()).set(count as f64);
        }
    }
    m::collect_on_scrape();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    events: Vec<PushEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushEvent {
    external_id: ExternalId,
}

/// An id sent as a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExternalId {
    Text(String),
    Number(i64),
}

impl ExternalId {
    fn into_string(self) -> String {
        match self {
            ExternalId::Text(text) => text.trim().to_string(),
            ExternalId::Number(n) => n.to_string(),
        }
    }
}

async fn push(
    State(state): State<AppState>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let refusals = state.refusals.clone();
    let feed_name = if state.sources.contains(&source) {
        source.as_str()
    } else {
        "-"
    };
    let refuse = |status: StatusCode, message: &str| {
        metrics::counter!(crate::metrics::PUSH_REFUSED, "status" => status.as_u16().to_string())
            .increment(1);
        refusals.record(
            feed_name,
            status.as_u16(),
            message,
            tokio::time::Instant::now(),
        );
        json(status, serde_json::json!({"error": message}))
    };
    let Some(feed) = state.push.get(&source) else {
        let message = if state.sources.contains(&source) {
            "this source has no push feed: set push_secret for it"
        } else {
            "no such source"
        };
        return refuse(StatusCode::NOT_FOUND, message);
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body over 1 MiB: send at most 1000 events per request",
            );
        }
        Err(rejection) => return refuse(rejection.status(), &rejection.body_text()),
    };
    // Read the header's shape first: a refused one costs no HMAC.
    let signature = match headers.get("x-sync-signature").map(|v| v.to_str()) {
        None => "",
        Some(Ok(text)) => text,
        Some(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "X-Sync-Signature is not ASCII: expected t=<unix seconds>,v1=<hex>",
            );
        }
    };
    let signature = match parse_signature(signature) {
        Ok(parsed) => parsed,
        Err(SignatureError::TooLong(problem)) => return refuse(StatusCode::BAD_REQUEST, problem),
        Err(SignatureError::Malformed(problem)) => {
            return refuse(StatusCode::UNAUTHORIZED, problem);
        }
    };
    // An HMAC over up to 1 MiB per candidate: off the runtime's reactor threads.
    let verified = {
        let (secret, body) = (feed.secret.current(), body.clone());
        tokio::task::spawn_blocking(move || {
            verify_parsed(secret.expose(), &signature, &body, now_ms() / 1000)
        })
        .await
        .unwrap_or(Err("the signature check was interrupted"))
    };
    if let Err(problem) = verified {
        return refuse(StatusCode::UNAUTHORIZED, problem);
    }
    let parsed: PushBody = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(error) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"events\": [{{\"external_id\": \"…\"}}]}}: {error}"),
            );
        }
    };
    if parsed.events.len() > MAX_EVENTS_PER_REQUEST {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "{} events in one request: send at most {MAX_EVENTS_PER_REQUEST} per request",
                parsed.events.len()
            ),
        );
    }
    // The source's id rule, the one its polls use; ids are stored in canonical form.
    let mut ids: Vec<String> = Vec::with_capacity(parsed.events.len());
    for (index, event) in parsed.events.into_iter().enumerate() {
        let text = event.external_id.into_string();
        match (text.len() <= 255)
            .then(|| feed.adapter.external_id(&text))
            .flatten()
        {
            Some(id) => ids.push(id),
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "events[{index}].external_id is not an id this source uses (a positive integer)"
                    ),
                );
            }
        }
    }
    let count = ids.len();
    // Bounded below the request timeout: a file locked by another process for longer gets a
    // 503 the sender retries (an event stored late is only fetched once more: harmless).
    let committed = {
        let (source, writer, wake) = (source.clone(), state.writer.clone(), feed.wake.clone());
        // The push loop waits for this wake with no timer: a commit that lands after the
        // request gave up waiting wakes it too.
        let write = tokio::spawn(async move {
            let recorded = writer
                .call(move |s| s.record_push(&source, &ids, MAX_PENDING_PUSH))
                .await;
            if matches!(recorded, Ok(PushRecorded::Accepted { .. })) {
                wake.notify_one();
            }
            recorded
        });
        tokio::time::timeout(PUSH_STORE_PATIENCE, write)
            .await
            .map_err(|_| {
                format!(
                    "the state file stayed locked by another process for {} s",
                    PUSH_STORE_PATIENCE.as_secs()
                )
            })
            // A panic's message is not an answer to a client.
            .and_then(|joined| joined.map_err(|_| "storing the events failed".to_string()))
            .and_then(|result| result.map_err(|error| error.to_string()))
    };
    match committed {
        Ok(PushRecorded::Accepted { .. }) => {
            metrics::counter!(crate::metrics::PUSH_EVENTS, "source" => source.clone())
                .increment(count as u64);
            tracing::info!(source = %source, events = count, "Push events accepted.");
            json(StatusCode::ACCEPTED, serde_json::json!({"accepted": count}))
        }
        Ok(PushRecorded::Full { pending }) => {
            let mut answer = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "{pending} events of this source are waiting to be fetched (at most {MAX_PENDING_PUSH}): retry later; the daemon's scheduled scan also finds every change"
                ),
            );
            answer.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(PUSH_RETRY_AFTER_SECS),
            );
            answer
        }
        Err(error) => {
            tracing::error!(source = %source, error, "Push events could not be stored.");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the state file is unavailable; retry later",
            )
        }
    }
}

/// `X-Sync-Signature` read but not yet checked: the timestamp and the candidate signatures.
pub struct ParsedSignature {
    t: i64,
    candidates: Vec<Vec<u8>>,
}

/// Why `X-Sync-Signature` was refused before any HMAC was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// Over [`MAX_SIGNATURE_HEADER`] bytes or [`MAX_SIGNATURES`] signatures (a 400).
    TooLong(&'static str),
    /// Missing or not `t=…,v1=…` (a 401, like a wrong signature).
    Malformed(&'static str),
}

impl SignatureError {
    fn message(self) -> &'static str {
        match self {
            SignatureError::TooLong(message) | SignatureError::Malformed(message) => message,
        }
    }
}

/// Reads `t=<unix>,v1=<hex>[,v1=<hex>…]` without computing anything: a header over
/// [`MAX_SIGNATURE_HEADER`] bytes or with more than [`MAX_SIGNATURES`] signatures is refused
/// here, before any HMAC.
pub fn parse_signature(header: &str) -> Result<ParsedSignature, SignatureError> {
    if header.len() > MAX_SIGNATURE_HEADER {
        return Err(SignatureError::TooLong(
            "X-Sync-Signature is over 1024 bytes: send t=<unix seconds>,v1=<hex> with at most 4 signatures",
        ));
    }
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.trim().parse::<i64>().ok(),
            Some(("v1", value)) => {
                if candidates.len() == MAX_SIGNATURES {
                    return Err(SignatureError::TooLong(
                        "X-Sync-Signature carries more than 4 v1= signatures: sign with the current secret (and the previous one while rotating)",
                    ));
                }
                // A candidate that is not hex can never match: skip it.
                if let Ok(bytes) = hex::decode(value.trim()) {
                    candidates.push(bytes);
                }
            }
            _ => {}
        }
    }
    match timestamp {
        Some(t) if !candidates.is_empty() => Ok(ParsedSignature { t, candidates }),
        _ => Err(SignatureError::Malformed(
            "missing or malformed X-Sync-Signature: expected t=<unix seconds>,v1=<hex>",
        )),
    }
}

/// Checks a parsed signature against HMAC-SHA256 of `"{t}.{body}"`.
fn verify_parsed(
    secret: &str,
    signature: &ParsedSignature,
    body: &[u8],
    now_secs: i64,
) -> Result<(), &'static str> {
    if (now_secs - signature.t).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err("signature timestamp is more than 5 minutes from now (stale or replayed)");
    }
    let mac = signature_mac(secret, signature.t, body);
    // verify_slice compares in constant time.
    if signature
        .candidates
        .iter()
        .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    {
        Ok(())
    } else {
        Err("signature does not match")
    }
}

/// Checks `t=<unix>,v1=<hex>[,v1=<hex>…]` against HMAC-SHA256 of `"{t}.{body}"`. Several `v1`
/// values (at most [`MAX_SIGNATURES`]) are accepted so a sender can sign with an old and a new
/// secret while rotating.
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), &'static str> {
    let parsed = parse_signature(header).map_err(SignatureError::message)?;
    verify_parsed(secret, &parsed, body, now_secs)
}

/// `t=<now>,v1=<hex>` for a body: what a sender puts in `X-Sync-Signature`.
pub fn sign(secret: &str, body: &[u8], t: i64) -> String {
    let mac = signature_mac(secret, t, body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// HMAC-SHA256 of `"{t}.{body}"` under `secret`.
fn signature_mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn once_a_loop_died_readyz_and_healthz_fail_naming_the_cause() {
        let state = test_state();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, state.clone(), stop.clone()));
        let get = |path: &'static str| async move {
            let answer = reqwest::get(format!("http://{addr}{path}"))
                .await
                .expect("answer");
            let status = answer.status().as_u16();
            (status, answer.text().await.expect("body"))
        };
        state.health.beat_worker();
        state.health.beat_scheduler();
        assert_eq!(get("/readyz").await.0, 200);
        assert_eq!(get("/healthz").await.0, 200);

        // What the daemon does when a loop dies, before it drains and exits 1.
        *state.fatal.lock().expect("lock") = Some("the worker stopped: disk I/O error".into());
        state.health.failed();
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503);
        let reason: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            reason["reason"],
            "a daemon loop ended: the worker stopped: disk I/O error; the daemon is exiting"
        );
        assert_eq!(get("/healthz").await.0, 503);
        stop.cancel();
        server.await.expect("joins").expect("served");
    }

    fn test_state() -> AppState {
        let store = Store::open_in_memory().expect("store");
        AppState {
            health: Arc::new(Health::default()),
            writer: store.clone(),
            reader: store,
            metrics: crate::metrics::install().expect("recorder"),
            push: Arc::default(),
            sources: Arc::default(),
            fatal: Arc::default(),
            refusals: Arc::default(),
        }
    }

    #[test]
    fn a_signature_header_too_long_or_with_too_many_candidates_is_refused_before_any_hmac() {
        let body = br#"{"events":[{"external_id":"1"}]}"#;
        let now = 1_800_000_000;
        let good = sign("s3cret", body, now);
        let v1 = good.split(',').nth(1).expect("v1");
        // Rotation's two signatures, and up to four, verify.
        let four = format!("{good},{v1},{v1},{v1}");
        assert_eq!(verify_signature("s3cret", &four, body, now), Ok(()));
        let five = format!("{four},{v1}");
        assert!(matches!(
            parse_signature(&five),
            Err(SignatureError::TooLong(message)) if message.contains("more than 4")
        ));
        let long = format!("{good},{}", "x".repeat(MAX_SIGNATURE_HEADER));
        assert!(matches!(
            parse_signature(&long),
            Err(SignatureError::TooLong(message)) if message.contains("over 1024 bytes")
        ));
        assert!(matches!(
            parse_signature("v1=00"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn refusals_are_logged_once_at_first_then_summarised_at_most_once_a_minute() {
        let log = RefusalLog::default();
        let start = tokio::time::Instant::now();
        let first = log
            .record("gym", 401, "signature does not match", start)
            .expect("the first refusal is logged at once");
        assert_eq!(
            first,
            "Requests refused: 1 × 401 on gym (signature does not match)."
        );
        let mut lines = 0;
        for i in 1..20_000u64 {
            let at = start + Duration::from_millis(i * 2);
            lines += usize::from(
                log.record("gym", 401, "signature does not match", at)
                    .is_some(),
            );
        }
        log.record("-", 404, "no such source", start + Duration::from_secs(50));
        assert_eq!(lines, 0, "nothing more within the minute");
        assert_eq!(log.flush(start + Duration::from_secs(59)), None);
        let summary = log
            .flush(start + Duration::from_secs(60))
            .expect("a summary once the minute is over");
        assert_eq!(
            summary,
            "Requests refused: 1 × 404 (no such source); 19999 × 401 on gym (signature does not match)."
        );
        assert_eq!(
            log.flush(start + Duration::from_secs(200)),
            None,
            "nothing to say"
        );
    }

    /// A healthy server on a loopback port: its address, its stop and its task.
    async fn serving() -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let state = test_state();
        state.health.beat_worker();
        state.health.beat_scheduler();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, state, stop.clone()));
        (addr, stop, server)
    }

    /// Connects and sends the start of a request that never ends.
    async fn half_open(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt as _;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /v1/changes/gym HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        stream
    }

    /// Reads until the server closes the connection.
    async fn until_closed(stream: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt as _;
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    }

    async fn healthz(addr: std::net::SocketAddr) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_finishes_its_headers_or_sits_idle_is_closed_after_5_s() {
        let (addr, stop, server) = serving().await;

        let started = tokio::time::Instant::now();
        let mut slow = half_open(addr).await;
        until_closed(&mut slow).await;
        let waited = started.elapsed();
        assert!(
            waited >= HEADER_READ_TIMEOUT && waited < HEADER_READ_TIMEOUT + Duration::from_secs(1),
            "closed after {waited:?}"
        );

        // A keep-alive connection that sent one request and then nothing.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.expect("answer");
        assert_eq!(&first, b"HTTP/1.1 200");
        let answered = tokio::time::Instant::now();
        until_closed(&mut idle).await;
        let idled = answered.elapsed();
        assert!(
            idled >= HEADER_READ_TIMEOUT && idled < HEADER_READ_TIMEOUT + Duration::from_secs(1),
            "idle connection closed after {idled:?}"
        );
        stop.cancel();
        server.await.expect("joins").expect("served");
    }

    #[tokio::test]
    async fn at_the_connection_cap_a_probe_evicts_the_oldest_half_open_connection() {
        let (addr, stop, server) = serving().await;
        let mut attackers = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 20 {
            attackers.push(half_open(addr).await);
        }
        // Every probe gets in, at once: none waits for a header timeout.
        let t = std::time::Instant::now();
        for _ in 0..5 {
            assert_eq!(healthz(addr).await, 200);
        }
        assert!(t.elapsed() < HEADER_READ_TIMEOUT, "{:?}", t.elapsed());
        // The oldest half-open connections were closed to make room; the newest are still open.
        until_closed(&mut attackers[0]).await;
        stop.cancel();
        server.await.expect("joins").expect("served");
    }

    #[test]
    fn signatures_verify_with_tolerance_and_rotation() {
        let body = br#"{"events":[{"external_id":"1"}]}"#;
        let now = 1_800_000_000;
        let good = sign("s3cret", body, now);
        assert_eq!(verify_signature("s3cret", &good, body, now), Ok(()));
        assert_eq!(verify_signature("s3cret", &good, body, now + 299), Ok(()));
        assert!(
            verify_signature("s3cret", &good, body, now + 301).is_err(),
            "stale"
        );
        assert!(
            verify_signature("other", &good, body, now).is_err(),
            "wrong secret"
        );
        assert!(
            verify_signature("s3cret", &good, b"{}", now).is_err(),
            "other body"
        );
        // Rotation: old and new secret both sign; either verifies.
        let old = sign("old", body, now);
        let new = sign("s3cret", body, now);
        let both = format!("{},{}", old, new.split(',').nth(1).expect("v1"));
        assert_eq!(verify_signature("s3cret", &both, body, now), Ok(()));
        assert_eq!(verify_signature("old", &both, body, now), Ok(()));
        assert!(verify_signature("s3cret", "garbage", body, now).is_err());
    }
}
