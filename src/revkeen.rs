//! The RevKeen client: single and batch upserts, idempotency keys, and the mapping of every
//! answer onto the failure policy in ARCHITECTURE.md.
//!
//! The client only speaks HTTP and classifies; it never retries or waits. Rate limiting lives in
//! [`crate::limiter`], and what to do with each [`Answer`] (ack, dead letter, retry, halt) in
//! [`crate::worker`].

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::config::RevKeenConfig;
use crate::http::{Probe, Transport, probe_request, send_measured};
use crate::secret::{SecretCell, redact};

/// RevKeen's error object (`{"error": {...}}`), reduced to what the daemon keeps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub fields: Option<serde_json::Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}: {}", self.status, self.code, self.message)
    }
}

/// Totals of a batch answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct BatchResult {
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    /// `(external_id, error)` for items RevKeen refused.
    pub failed: Vec<(String, String)>,
}

/// Every answer RevKeen can give, classified for the failure policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    /// 2xx, written. `created` tells a new customer from an update; `id` is RevKeen's id for
    /// the customer (`data.id`), kept when it is a plausible id (at most 128 printable
    /// characters).
    Applied { created: bool, id: Option<String> },
    /// 2xx `stale_update`: RevKeen already holds newer data. Success.
    Stale,
    /// 200 answer to a batch.
    Batch(BatchResult),
    /// 400/422 (and other final 4xx): dead letter with RevKeen's reasons.
    Refused(ApiError),
    /// 401/403: halt sending with this key.
    AuthRefused(ApiError),
    /// 409 `idempotency_in_progress`: the first attempt is still running; retry shortly.
    InProgress,
    /// 409 `idempotency_conflict`: one key, two bodies. A bug in this daemon.
    Conflict(ApiError),
    /// 429: pause the host.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeout, connection error, a cut-off answer: retry with backoff.
    Transient(String),
    /// A 2xx that is not the documented answer: nothing can be marked delivered on it. Retried
    /// like a 5xx (a batch is split into singles, whose answers are per customer).
    Unexpected(String),
    /// The configured address does not lead to RevKeen: a redirect (never followed) or a TLS
    /// certificate that is not trusted. Sending stops until it is fixed.
    Misdirected(String),
}

/// A RevKeen API client bound to one base URL and key.
#[derive(Clone)]
pub(crate) struct RevKeenClient {
    http: reqwest::Client,
    base: Url,
    api_key: SecretCell,
    api_version: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Option<ErrorDetails>,
}

#[derive(Deserialize)]
struct ErrorDetails {
    #[serde(default)]
    fields: Option<serde_json::Value>,
}

/// A single upsert's 2xx, in either documented shape: applied (`data` with an `id`) or stale.
#[derive(Deserialize)]
#[serde(untagged)]
enum SingleAnswer {
    Applied {
        data: AppliedCustomer,
        #[serde(default)]
        created: Option<bool>,
    },
    Stale {
        ignored: bool,
        #[serde(default)]
        reason: Option<String>,
    },
}

#[derive(Deserialize)]
struct AppliedCustomer {
    id: String,
}

/// A batch's 200: every count is required.
#[derive(Deserialize)]
struct BatchAnswer {
    created: u64,
    updated: u64,
    skipped: u64,
    failed: Vec<BatchFailure>,
}

/// What a request expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A single upsert's answer.
    Single,
    /// A batch answer accounting for this many customers.
    Batch(usize),
}

#[derive(Deserialize)]
struct BatchFailure {
    external_id: serde_json::Value,
    #[serde(default)]
    error: serde_json::Value,
}

impl RevKeenClient {
    /// A client for the configured API.
    pub(crate) fn new(config: &RevKeenConfig) -> reqwest::Result<Self> {
        Ok(RevKeenClient {
            http: crate::http::client(Duration::from_secs(config.timeout_secs))?,
            base: config.base_url.clone(),
            api_key: config.api_key.clone(),
            api_version: config.api_version.clone(),
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Percent-encodes each segment: an external id may hold '/', '?', spaces.
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn headers(&self, idempotency_key: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(mut key) = HeaderValue::from_str(self.api_key.current().expose()) {
            key.set_sensitive(true);
            headers.insert("x-api-key", key);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(version) = HeaderValue::from_str(&self.api_version) {
            headers.insert("revkeen-version", version);
        }
        if let Some(key) = idempotency_key.and_then(|k| HeaderValue::from_str(k).ok()) {
            headers.insert("idempotency-key", key);
        }
        headers
    }

    /// `PUT /customers/external/{source}/{externalId}` with the stored body bytes.
    pub(crate) async fn upsert(
        &self,
        revkeen_source: &str,
        external_id: &str,
        body: &[u8],
        idempotency_key: &str,
    ) -> Answer {
        let url = self.url(&["customers", "external", revkeen_source, external_id]);
        self.put(url, body, idempotency_key, Expect::Single).await
    }

    /// `PUT /customers/external/batch` with a recorded batch body of `members` customers.
    pub(crate) async fn upsert_batch(
        &self,
        body: &[u8],
        idempotency_key: &str,
        members: usize,
    ) -> Answer {
        let url = self.url(&["customers", "external", "batch"]);
        self.put(url, body, idempotency_key, Expect::Batch(members))
            .await
    }

    async fn put(&self, url: Url, body: &[u8], idempotency_key: &str, expect: Expect) -> Answer {
        let request = self
            .http
            .put(url)
            .headers(self.headers(Some(idempotency_key)))
            .body(body.to_vec());
        let endpoint = match expect {
            Expect::Single => "single",
            Expect::Batch(_) => "batch",
        };
        match send_measured(request, "revkeen", endpoint).await {
            Ok(reply) => match reply.redirect("RevKeen", BASE_URL_KEY) {
                Some(problem) => Answer::Misdirected(problem),
                None => classify(reply.status, &reply.body, reply.retry_after, expect),
            },
            Err(transport @ Transport::Untrusted { .. }) => {
                Answer::Misdirected(transport.describe("RevKeen", BASE_URL_KEY))
            }
            Err(Transport::Failed(detail)) => Answer::Transient(detail),
        }
    }

    /// `GET /customers?limit=1`: one authenticated read to prove the key and the address.
    pub(crate) async fn probe(&self) -> Probe {
        let mut url = self.url(&["customers"]);
        url.set_query(Some("limit=1"));
        probe_request(
            self.http.get(url).headers(self.headers(None)),
            "RevKeen",
            BASE_URL_KEY,
            |status, body| match status.as_u16() {
                200..=299 => Probe::Ok,
                401 | 403 => Probe::KeyRefused(parse_error(status, body).to_string()),
                _ => Probe::Unexpected(parse_error(status, body).to_string()),
            },
        )
        .await
    }
}

impl RevKeenClient {
    /// `GET /integrations/{provider}`: whether RevKeen's own hosted sync for `provider`
    /// (`wodify`, `practicehub`) is writing this merchant's customers too. Never writes
    /// anything (in particular never `sync-state`, that sync's own cursor store).
    pub(crate) async fn hosted_sync(&self, provider: &str) -> HostedSync {
        let request = self
            .http
            .get(self.url(&["integrations", provider]))
            .headers(self.headers(None));
        match send_measured(request, "revkeen", "integration").await {
            Ok(reply) if reply.status.is_redirection() => {
                HostedSync::Unknown(format!("HTTP {}: a redirect, not followed", reply.status))
            }
            Ok(reply) => hosted_sync_answer(reply.status, &reply.body),
            Err(transport) => HostedSync::Unknown(transport.describe("RevKeen", BASE_URL_KEY)),
        }
    }
}

/// What RevKeen says of its own hosted sync for one provider.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostedSync {
    /// Active with sync enabled: it and this daemon upsert the same customers.
    Active {
        status: Option<String>,
        last_sync_at: Option<String>,
    },
    /// Configured but not syncing (inactive or sync disabled).
    Off,
    /// Not known: a 403 (a key without `integrations:read`), a 404 (none configured, or an
    /// older API), an error or an answer in no documented shape. Changes nothing.
    Unknown(String),
}

/// The integration read's answer: `{"success": true, "data": {...}}` or the object itself,
/// with `isActive` and `syncEnabled` (camelCase, or snake_case as later specs write them).
fn hosted_sync_answer(status: StatusCode, body: &[u8]) -> HostedSync {
    let text = || redact(&String::from_utf8_lossy(&body[..body.len().min(300)]));
    if !status.is_success() {
        return HostedSync::Unknown(format!("HTTP {}: {}", status.as_u16(), text()));
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return HostedSync::Unknown(format!("HTTP {}: not JSON", status.as_u16()));
    };
    if value.get("success") == Some(&serde_json::Value::Bool(false)) {
        return HostedSync::Unknown(format!("HTTP {}: {}", status.as_u16(), text()));
    }
    let integration = value
        .get("data")
        .filter(|d| d.is_object())
        .unwrap_or(&value);
    let flag = |camel: &str, snake: &str| {
        integration
            .get(camel)
            .or_else(|| integration.get(snake))
            .and_then(serde_json::Value::as_bool)
    };
    let text_of = |camel: &str, snake: &str| {
        integration
            .get(camel)
            .or_else(|| integration.get(snake))
            .and_then(serde_json::Value::as_str)
            .map(|s| redact(&s.chars().take(100).collect::<String>()))
    };
    match (
        flag("isActive", "is_active"),
        flag("syncEnabled", "sync_enabled"),
    ) {
        (Some(true), Some(true)) => HostedSync::Active {
            status: text_of("status", "status"),
            last_sync_at: text_of("lastSyncAt", "last_sync_at"),
        },
        (Some(_), Some(_)) => HostedSync::Off,
        _ => HostedSync::Unknown(format!(
            "HTTP {}: no isActive/syncEnabled in the answer",
            status.as_u16()
        )),
    }
}

/// The config key a misdirected answer tells the operator to check.
const BASE_URL_KEY: &str = "revkeen.base_url";

/// Classifies an answer per the failure policy (ARCHITECTURE.md). A 2xx counts only in its
/// documented shape: a single upsert applied (`data` with an `id`) or stale (`ignored`), a
/// batch whose counts account for every customer sent. Anything else is
/// [`Answer::Unexpected`]: nothing is ever marked delivered on an answer that cannot be read.
pub(crate) fn classify(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    expect: Expect,
) -> Answer {
    if status.is_success() {
        return match expect {
            Expect::Single => single_answer(status, body),
            Expect::Batch(members) => batch_answer(status, body, members),
        };
    }
    if status.is_redirection() {
        return Answer::Misdirected(format!(
            "RevKeen answered {}: sync-daemon does not follow redirects; check {BASE_URL_KEY}",
            status.as_u16()
        ));
    }
    let error = parse_error(status, body);
    match status.as_u16() {
        401 | 403 => Answer::AuthRefused(error),
        409 if error.code == "idempotency_in_progress" => Answer::InProgress,
        409 if error.code == "idempotency_conflict" => Answer::Conflict(error),
        429 => Answer::RateLimited { retry_after },
        408 => Answer::Transient(error.to_string()),
        500..=599 => Answer::Transient(error.to_string()),
        _ => Answer::Refused(error),
    }
}

/// A single upsert's 2xx: applied or stale, in the documented shape, or unexpected.
fn single_answer(status: StatusCode, body: &[u8]) -> Answer {
    match serde_json::from_slice::<SingleAnswer>(body) {
        Ok(SingleAnswer::Applied { data, created }) if !data.id.trim().is_empty() => {
            let id = data.id.trim();
            let plausible = id.len() <= 128 && !id.chars().any(char::is_control);
            Answer::Applied {
                created: created.unwrap_or(status == StatusCode::CREATED),
                id: plausible.then(|| id.to_string()),
            }
        }
        Ok(SingleAnswer::Stale {
            ignored: true,
            reason,
        }) if reason.as_deref().is_none_or(|r| r == "stale_update") => Answer::Stale,
        _ => Answer::Unexpected(format!(
            "RevKeen answered {} with {}, which is neither an applied upsert (`data` with an \
             `id`) nor a stale one (`ignored`)",
            status.as_u16(),
            excerpt(body)
        )),
    }
}

/// A batch's 200: only when its counts account for every customer sent, each failure naming
/// one of them once.
fn batch_answer(status: StatusCode, body: &[u8], members: usize) -> Answer {
    let answer = match serde_json::from_slice::<BatchAnswer>(body) {
        Ok(answer) => answer,
        Err(_) => {
            return Answer::Unexpected(format!(
                "RevKeen answered {} to a batch with {}, which is not a batch answer \
                 (`created`, `updated`, `skipped`, `failed`)",
                status.as_u16(),
                excerpt(body)
            ));
        }
    };
    let counted = answer
        .created
        .saturating_add(answer.updated)
        .saturating_add(answer.skipped)
        .saturating_add(answer.failed.len() as u64);
    if counted != members as u64 {
        return Answer::Unexpected(format!(
            "RevKeen's batch answer accounts for {counted} customers (created {}, updated {}, \
             skipped {}, failed {}) where {members} were sent",
            answer.created,
            answer.updated,
            answer.skipped,
            answer.failed.len()
        ));
    }
    Answer::Batch(BatchResult {
        created: answer.created,
        updated: answer.updated,
        skipped: answer.skipped,
        failed: answer
            .failed
            .into_iter()
            .map(|f| (json_text(&f.external_id), json_text(&f.error)))
            .collect(),
    })
}

/// The first bytes of an answer, quoted and escaped, for a message.
pub(crate) fn excerpt(body: &[u8]) -> String {
    const SHOWN: usize = 120;
    let text = redact(&String::from_utf8_lossy(&body[..body.len().min(SHOWN)]));
    let more = if body.len() > SHOWN { "…" } else { "" };
    format!("{:?}{more} ({} bytes)", text, body.len())
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// RevKeen's error object, every text in it scrubbed of configured secrets (an error body may
/// echo the key it was sent).
fn parse_error(status: StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(envelope) => ApiError {
            status: status.as_u16(),
            code: if envelope.error.code.is_empty() {
                status_code_name(status)
            } else {
                redact(&envelope.error.code)
            },
            message: redact(&envelope.error.message),
            fields: envelope
                .error
                .details
                .and_then(|d| d.fields)
                .and_then(|fields| serde_json::from_str(&redact(&fields.to_string())).ok()),
        },
        Err(_) => ApiError {
            status: status.as_u16(),
            code: status_code_name(status),
            message: redact(&String::from_utf8_lossy(&body[..body.len().min(200)])),
            fields: None,
        },
    }
}

fn status_code_name(status: StatusCode) -> String {
    format!("http_{}", status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosted_sync_is_active_only_when_both_flags_say_so_in_either_shape() {
        let answer = |status: u16, body: &str| {
            hosted_sync_answer(
                StatusCode::from_u16(status).expect("status"),
                body.as_bytes(),
            )
        };
        let wrapped = r#"{"success": true, "data": {"isActive": true, "syncEnabled": true,
            "status": "connected", "lastSyncAt": "2026-12-01T09:00:00Z"}}"#;
        assert_eq!(
            answer(200, wrapped),
            HostedSync::Active {
                status: Some("connected".into()),
                last_sync_at: Some("2026-12-01T09:00:00Z".into())
            }
        );
        let flat = r#"{"is_active": true, "sync_enabled": true}"#;
        assert!(matches!(answer(200, flat), HostedSync::Active { .. }));
        let paused = r#"{"success": true, "data": {"isActive": true, "syncEnabled": false}}"#;
        assert_eq!(answer(200, paused), HostedSync::Off);
        for (status, body) in [
            (403, r#"{"success": false, "error": "Insufficient scope"}"#),
            (404, r#"{"success": false, "error": "not found"}"#),
            (200, r#"{"success": false, "error": "odd"}"#),
            (200, r#"{"data": {"isActive": "yes"}}"#),
            (200, "<html>"),
            (500, ""),
        ] {
            assert!(
                matches!(answer(status, body), HostedSync::Unknown(_)),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn answers_follow_the_failure_policy() {
        let ok = |status: u16, body: &str| {
            classify(
                StatusCode::from_u16(status).expect("status"),
                body.as_bytes(),
                None,
                Expect::Single,
            )
        };
        assert_eq!(
            ok(201, r#"{"data":{"id":"c_1"},"created":true}"#),
            Answer::Applied {
                created: true,
                id: Some("c_1".into())
            }
        );
        assert_eq!(
            ok(200, r#"{"data":{"id":"c_1"},"created":false}"#),
            Answer::Applied {
                created: false,
                id: Some("c_1".into())
            }
        );
        // Delivered, but an id no RevKeen would give is not kept (nor ever shown).
        let long = format!(
            r#"{{"data":{{"id":"{}"}},"created":false}}"#,
            "x".repeat(300)
        );
        assert_eq!(
            ok(200, &long),
            Answer::Applied {
                created: false,
                id: None
            }
        );
        assert_eq!(
            ok(200, r#"{"ignored":true,"reason":"stale_update"}"#),
            Answer::Stale
        );
        let refused = ok(
            400,
            r#"{"error":{"type":"invalid_request","code":"validation_error","message":"bad","details":{"fields":{"email":"required"}}}}"#,
        );
        let Answer::Refused(error) = refused else {
            panic!("400 must be a refusal: {refused:?}");
        };
        assert_eq!(error.code, "validation_error");
        assert_eq!(error.fields, Some(serde_json::json!({"email": "required"})));
        assert!(matches!(ok(422, "{}"), Answer::Refused(_)));
        assert!(
            matches!(ok(401, r#"{"error":{"code":"invalid_api_key","message":"no"}}"#), Answer::AuthRefused(e) if e.code == "invalid_api_key")
        );
        assert!(matches!(ok(403, "{}"), Answer::AuthRefused(_)));
        assert_eq!(
            ok(409, r#"{"error":{"code":"idempotency_in_progress"}}"#),
            Answer::InProgress
        );
        assert!(matches!(
            ok(409, r#"{"error":{"code":"idempotency_conflict"}}"#),
            Answer::Conflict(_)
        ));
        assert!(matches!(ok(429, "{}"), Answer::RateLimited { .. }));
        assert!(matches!(ok(503, "<html>"), Answer::Transient(_)));
        let batch = classify(
            StatusCode::OK,
            br#"{"created":2,"updated":1,"skipped":1,"failed":[{"external_id":"9","error":"validation_error: bad"}]}"#,
            None,
            Expect::Batch(5),
        );
        assert_eq!(
            batch,
            Answer::Batch(BatchResult {
                created: 2,
                updated: 1,
                skipped: 1,
                failed: vec![("9".into(), "validation_error: bad".into())],
            })
        );
    }

    #[test]
    fn a_2xx_counts_only_in_its_documented_shape() {
        let single = |body: &str| classify(StatusCode::OK, body.as_bytes(), None, Expect::Single);
        for body in [
            "{}",
            "OK",
            "<html>hello</html>",
            r#"{"data":{}}"#,
            r#"{"data":{"id":""}}"#,
            r#"{"created":true}"#,
            r#"{"ignored":false}"#,
            r#"{"ignored":true,"reason":"other"}"#,
        ] {
            assert!(
                matches!(single(body), Answer::Unexpected(ref m) if m.contains("200")),
                "{body}: {:?}",
                single(body)
            );
        }
        let batch = |body: &str, members| {
            classify(
                StatusCode::OK,
                body.as_bytes(),
                None,
                Expect::Batch(members),
            )
        };
        assert!(matches!(batch("{}", 3), Answer::Unexpected(_)));
        let zero = r#"{"created":0,"updated":0,"skipped":0,"failed":[]}"#;
        assert!(
            matches!(batch(zero, 3), Answer::Unexpected(ref m) if m.contains("accounts for 0")),
            "{:?}",
            batch(zero, 3)
        );
        let all =
            r#"{"created":2,"updated":0,"skipped":0,"failed":[{"external_id":"3","error":"x"}]}"#;
        assert!(matches!(batch(all, 3), Answer::Batch(_)));
        // A redirect is never an answer to act on.
        assert!(matches!(
            classify(StatusCode::FOUND, b"", None, Expect::Single),
            Answer::Misdirected(_)
        ));
    }

    #[test]
    fn external_ids_are_percent_encoded_in_the_path() {
        let client = RevKeenClient {
            http: reqwest::Client::new(),
            base: Url::parse("https://api.revkeen.com/v2/").expect("url"),
            api_key: SecretCell::new(crate::secret::Secret::new("k")),
            api_version: "2026-05-01".into(),
        };
        let url = client.url(&["customers", "external", "wodify", "a/b c?"]);
        assert_eq!(
            url.as_str(),
            "https://api.revkeen.com/v2/customers/external/wodify/a%2Fb%20c%3F"
        );
    }
}
