//! The daemon's HTTP server: `/healthz`, `/readyz`, `/metrics` and the signed push feed.
//!
//! `POST /v1/changes/{source}` takes ids only (`{"events": [{"external_id": "12345"}]}`),
//! signed with `X-Sync-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{raw body}">`. The daemon
//! re-reads each record from the source API itself, so a push can never inject data the source
//! does not hold. 202 is answered only after the events are committed to the state file; a
//! rejected body is never logged.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, KeyInit, Mac};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::health::Health;
use crate::secret::Secret;
use crate::sources::Source;
use crate::store::Store;

/// Largest push body accepted.
pub const PUSH_BODY_LIMIT: usize = 1024 * 1024;
/// How far a push signature's timestamp may be from now.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// How recently every loop must have beaten for `/healthz` to answer 200.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(30);

/// A source's push feed.
pub struct PushFeed {
    pub secret: Secret,
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
}

/// The process-wide Prometheus recorder (installed once; later calls reuse it).
pub fn metrics_handle() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("sync_daemon_request_duration_seconds".to_string()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
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

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
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
    // Queue figures live in the state file; read them at scrape time so they are exact.
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
            metrics::gauge!("sync_daemon_queue_depth", "source" => source.clone())
                .set(depth as f64);
            metrics::gauge!("sync_daemon_oldest_pending_age_seconds", "source" => source.clone())
                .set(age);
            metrics::gauge!("sync_daemon_dead_letters", "source" => source.clone())
                .set(dead as f64);
            metrics::gauge!("sync_daemon_rejected_records", "source" => source.clone())
                .set(rejected as f64);
        }
    }
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
    let refuse = |status: StatusCode, message: &str| {
        metrics::counter!("sync_daemon_push_refused_total", "status" => status.as_u16().to_string())
            .increment(1);
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
                "body over 1 MiB: send at most a few thousand events per request",
            );
        }
        Err(rejection) => return refuse(rejection.status(), &rejection.body_text()),
    };
    let signature = headers
        .get("x-sync-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Err(problem) = verify_signature(feed.secret.expose(), signature, &body, now_ms() / 1000)
    {
        tracing::warn!(source = %source, problem, "Push refused: bad signature.");
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
    let committed = {
        let source = source.clone();
        state
            .writer
            .call(move |s| s.record_push(&source, &ids))
            .await
    };
    match committed {
        Ok(_) => {
            feed.wake.notify_one();
            metrics::counter!("sync_daemon_push_events_total", "source" => source.clone())
                .increment(count as u64);
            tracing::info!(source = %source, events = count, "Push events accepted.");
            json(StatusCode::ACCEPTED, serde_json::json!({"accepted": count}))
        }
        Err(error) => {
            tracing::error!(source = %source, %error, "Push events could not be stored.");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the state file is unavailable; retry later",
            )
        }
    }
}

/// Checks `t=<unix>,v1=<hex>[,v1=<hex>…]` against HMAC-SHA256 of `"{t}.{body}"`. Several `v1`
/// values are accepted so a sender can sign with an old and a new secret while rotating.
pub fn verify_signature(
    secret: &str,
    header: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), &'static str> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.trim().parse::<i64>().ok(),
            Some(("v1", value)) => candidates.push(value.trim()),
            _ => {}
        }
    }
    let (Some(t), false) = (timestamp, candidates.is_empty()) else {
        return Err("missing or malformed X-Sync-Signature: expected t=<unix seconds>,v1=<hex>");
    };
    if (now_secs - t).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err("signature timestamp is more than 5 minutes from now (stale or replayed)");
    }
    for candidate in candidates {
        let Ok(expected) = hex::decode(candidate) else {
            continue;
        };
        // verify_slice compares in constant time.
        if signature_mac(secret, t, body)
            .verify_slice(&expected)
            .is_ok()
        {
            return Ok(());
        }
    }
    Err("signature does not match")
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
        let store = Store::open_in_memory().expect("store");
        let state = AppState {
            health: Arc::new(Health::default()),
            writer: store.clone(),
            reader: store,
            metrics: metrics_handle().expect("recorder"),
            push: Arc::default(),
            sources: Arc::default(),
            fatal: Arc::default(),
        };
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
