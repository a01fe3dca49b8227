//! Shared HTTP plumbing for every upstream: client construction, send-and-measure, the
//! connection probe of `check-config --connect`, transport errors in words, and `Retry-After`.
//!
//! Every byte from an upstream is untrusted. So: redirects are never followed (the keys travel
//! in custom headers, and none of the three APIs documents one): a 3xx is an answer to report,
//! naming where it pointed. An answer is read up to [`MAX_BODY`] bytes, no more. A certificate
//! the system does not trust is a [`Transport::Untrusted`] (retrying cannot help), not a
//! passing failure. `Retry-After` is read with arithmetic that cannot overflow; the caller caps
//! the wait. Nothing here knows which API it talks to: the RevKeen client and the source
//! adapters build their requests and read their answers themselves.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};

/// The most an answer may weigh. A page of 100 clients is about 100 KB; anything past this is
/// not an answer the daemon can use.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;

/// The outcome of `check-config --connect`'s read.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Ok,
    KeyRefused(String),
    Unreachable(String),
    Tls(String),
    Unexpected(String),
}

/// Builds the shared reqwest client: rustls, a timeout, no redirects, and a user agent naming
/// the version.
pub(crate) fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    client_with_agent(timeout, concat!("sync-daemon/", env!("CARGO_PKG_VERSION")))
}

/// [`client`] with its own `User-Agent`.
pub(crate) fn client_with_agent(
    timeout: Duration,
    user_agent: &str,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(user_agent)
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// An answer, read in full.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: StatusCode,
    /// `Retry-After` as the server gave it (seconds or a date), not yet capped.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
    /// For a 3xx: the host its `Location` names (`None` when it names none).
    pub redirected_to: Option<String>,
    /// The server's clock, from its `Date` header (`None` when absent or unreadable).
    pub date: Option<chrono::DateTime<chrono::Utc>>,
}

impl Reply {
    /// For a 3xx, the problem in words: `"{api} answered 307 to other.example: sync-daemon does
    /// not follow redirects; check {key}"`.
    pub(crate) fn redirect(&self, api: &str, key: &str) -> Option<String> {
        if !self.status.is_redirection() {
            return None;
        }
        let target = self
            .redirected_to
            .as_deref()
            .map(|host| format!(" to {host}"))
            .unwrap_or_default();
        Some(format!(
            "{api} answered {}{target}: sync-daemon does not follow redirects; check {key}",
            self.status.as_u16()
        ))
    }
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    /// The server's TLS certificate was not accepted: retrying cannot help.
    Untrusted { host: String, detail: String },
    /// A timeout, a refused or reset connection, an answer cut off or too large: may pass.
    Failed(String),
}

impl Transport {
    /// The failure in words, for `api` (whose base URL is `key`), scrubbed of secrets.
    pub(crate) fn describe(&self, api: &str, key: &str) -> String {
        crate::secret::redact(&match self {
            Transport::Untrusted { host, detail } => format!(
                "{api}'s TLS certificate for {host} is not trusted ({detail}): check {key} and \
                 any TLS-intercepting proxy; sync-daemon does not retry an untrusted certificate"
            ),
            Transport::Failed(detail) => detail.clone(),
        })
    }
}

/// Sends one request and reads the whole answer (up to [`MAX_BODY`]), or says why none came.
/// Records the request's duration under `target` and its count under `target`, `endpoint`
/// and the status (`error` when no answer came).
pub(crate) async fn send_measured(
    request: reqwest::RequestBuilder,
    target: &'static str,
    endpoint: &'static str,
) -> Result<Reply, Transport> {
    let started = Instant::now();
    let mut status_label = "error".to_string();
    let result = match request.send().await {
        Err(error) => Err(transport_error(&error)),
        Ok(response) => {
            status_label = response.status().as_u16().to_string();
            read(response).await
        }
    };
    metrics::histogram!(crate::metrics::REQUEST_DURATION, "target" => target)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "target" => target,
        "endpoint" => endpoint, "status" => status_label)
    .increment(1);
    result
}

/// Reads a response: its status, `Retry-After`, where a 3xx points, and the body.
async fn read(mut response: reqwest::Response) -> Result<Reply, Transport> {
    let status = response.status();
    let retry_after = parse_retry_after(response.headers());
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| chrono::DateTime::parse_from_rfc2822(text).ok())
        .map(|date| date.with_timezone(&chrono::Utc));
    let redirected_to = status
        .is_redirection()
        .then(|| redirect_host(response.url(), response.headers()))
        .flatten();
    if response
        .content_length()
        .is_some_and(|length| length > MAX_BODY as u64)
    {
        return Err(too_large(status));
    }
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_BODY => {
                return Err(too_large(status));
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(error) => {
                return Err(Transport::Failed(format!(
                    "HTTP {status}: answer cut off: {}",
                    describe_transport_error(&error)
                )));
            }
        }
    }
    Ok(Reply {
        status,
        retry_after,
        body: body.freeze(),
        redirected_to,
        date,
    })
}

fn too_large(status: StatusCode) -> Transport {
    Transport::Failed(format!(
        "HTTP {status}: the answer is larger than {} MiB; not read",
        MAX_BODY >> 20
    ))
}

/// The host a 3xx's `Location` names, resolved against the request's URL.
fn redirect_host(url: &Url, headers: &HeaderMap) -> Option<String> {
    let location = headers.get(LOCATION)?.to_str().ok()?;
    let target = url.join(location).ok()?;
    let host = target.host_str()?;
    Some(match target.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// Sends one probe request; transport failures become unreachable / TLS, a redirect is
/// unexpected, other answers go to `classify`.
pub(crate) async fn probe_request(
    request: reqwest::RequestBuilder,
    api: &str,
    key: &str,
    classify: impl FnOnce(StatusCode, &[u8]) -> Probe,
) -> Probe {
    match request.send().await {
        Err(error) => match transport_error(&error) {
            untrusted @ Transport::Untrusted { .. } => Probe::Tls(untrusted.describe(api, key)),
            Transport::Failed(_) => Probe::Unreachable(describe_transport_error(&error)),
        },
        Ok(response) => match read(response).await {
            Ok(reply) => match reply.redirect(api, key) {
                Some(problem) => Probe::Unexpected(problem),
                None => classify(reply.status, &reply.body),
            },
            Err(transport) => Probe::Unreachable(transport.describe(api, key)),
        },
    }
}

/// `Retry-After` as seconds or an HTTP date. Neither can overflow here: seconds become a
/// `Duration` as they are, a date is subtracted as calendar time; capping is the caller's.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - crate::clock::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// A transport error in words an operator can act on, without the URL (it is in the config),
/// scrubbed of secrets.
pub(crate) fn describe_transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_string();
    }
    if error.is_connect() {
        return crate::secret::redact(&format!("cannot connect: {}", root_cause(error)));
    }
    crate::secret::redact(&root_cause(error))
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Sorts a transport error: an untrusted certificate, or a failure that may pass. reqwest does
/// not type TLS failures, so the whole cause chain is read for rustls's wording (a plain-HTTP
/// server answering a TLS hello shows up as "received corrupt message of type
/// InvalidContentType").
fn transport_error(error: &reqwest::Error) -> Transport {
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
        Transport::Untrusted {
            host: error
                .url()
                .and_then(|url| url.host_str())
                .unwrap_or("the server")
                .to_string(),
            detail: root_cause(error),
        }
    } else {
        Transport::Failed(describe_transport_error(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_accepts_seconds_and_dates_without_overflow() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(
            parse_retry_after(&headers),
            Some(Duration::from_secs(u64::MAX))
        );
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        let far = parse_retry_after(&headers).expect("a date");
        assert!(far > Duration::from_secs(7000 * 365 * 86_400), "{far:?}");
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn a_redirect_names_its_target() {
        let url = Url::parse("https://api.revkeen.com/v2/customers").expect("url");
        let mut headers = HeaderMap::new();
        headers.insert(
            LOCATION,
            HeaderValue::from_static("http://other.example:8080/v2/customers"),
        );
        assert_eq!(
            redirect_host(&url, &headers).as_deref(),
            Some("other.example:8080")
        );
        headers.insert(LOCATION, HeaderValue::from_static("/v3/customers"));
        assert_eq!(
            redirect_host(&url, &headers).as_deref(),
            Some("api.revkeen.com")
        );
        let reply = Reply {
            status: StatusCode::TEMPORARY_REDIRECT,
            retry_after: None,
            body: Bytes::new(),
            redirected_to: Some("other.example".into()),
            date: None,
        };
        assert_eq!(
            reply.redirect("RevKeen", "revkeen.base_url").as_deref(),
            Some(
                "RevKeen answered 307 to other.example: sync-daemon does not follow redirects; \
                 check revkeen.base_url"
            )
        );
    }
}
