//! Shared HTTP plumbing for every upstream: client construction, send-and-measure, the
//! connection probe of `check-config --connect`, transport errors in words, and `Retry-After`.
//!
//! Nothing here knows which API it talks to; the RevKeen client and the source adapters build
//! their requests and read their answers themselves.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The outcome of `check-config --connect`'s read.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Ok,
    KeyRefused(String),
    Unreachable(String),
    Tls(String),
    Unexpected(String),
}

/// Builds the shared reqwest client: rustls, a timeout, and a user agent naming the version.
pub(crate) fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("sync-daemon/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// Sends one request and reads the whole answer: its status, `Retry-After` and body, or the
/// transport failure in words. Records the request's duration under `target` and its count
/// under `target`, `endpoint` and the status (`error` when no answer came).
pub(crate) async fn send_measured(
    request: reqwest::RequestBuilder,
    target: &'static str,
    endpoint: &'static str,
) -> Result<(StatusCode, Option<Duration>, bytes::Bytes), String> {
    let started = Instant::now();
    let mut status_label = "error".to_string();
    let result = match request.send().await {
        Err(error) => Err(describe_transport_error(&error)),
        Ok(response) => {
            let status = response.status();
            status_label = status.as_u16().to_string();
            let retry_after = parse_retry_after(response.headers());
            response
                .bytes()
                .await
                .map(|body| (status, retry_after, body))
                .map_err(|error| {
                    format!(
                        "HTTP {status}: answer cut off: {}",
                        describe_transport_error(&error)
                    )
                })
        }
    };
    metrics::histogram!("sync_daemon_request_duration_seconds", "target" => target)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("sync_daemon_http_requests_total", "target" => target,
        "endpoint" => endpoint, "status" => status_label)
    .increment(1);
    result
}

/// Sends one probe request; transport failures become unreachable / TLS, answers go to
/// `classify`.
pub(crate) async fn probe_request(
    request: reqwest::RequestBuilder,
    classify: impl FnOnce(StatusCode, &[u8]) -> Probe,
) -> Probe {
    match request.send().await {
        Err(error) => probe_transport_error(&error),
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(body) => classify(status, &body),
                Err(error) => probe_transport_error(&error),
            }
        }
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - crate::clock::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// A transport error in words an operator can act on, without the URL (it is in the config).
pub(crate) fn describe_transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_string();
    }
    if error.is_connect() {
        return format!("cannot connect: {}", root_cause(error));
    }
    root_cause(error)
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Sorts a transport error into unreachable / TLS for `check-config --connect`. reqwest does
/// not type TLS failures, so the whole cause chain is read for rustls's wording (a plain-HTTP
/// server answering a TLS hello shows up as "received corrupt message of type
/// InvalidContentType").
pub(crate) fn probe_transport_error(error: &reqwest::Error) -> Probe {
    let mut chain = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        chain.push(current.to_string().to_ascii_lowercase());
        cause = current.source();
    }
    let tls = chain.iter().any(|text| {
        [
            "certificate",
            "tls",
            "handshake",
            "corrupt message",
            "invalidcontenttype",
            "alert",
            "peer is incompatible",
        ]
        .iter()
        .any(|marker| text.contains(marker))
    });
    if tls {
        Probe::Tls(root_cause(error))
    } else {
        Probe::Unreachable(describe_transport_error(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_accepts_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
    }
}
