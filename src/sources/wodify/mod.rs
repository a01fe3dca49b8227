//! Wodify clients: a resumable full scan. The client → customer mapping is in `client`, the
//! settings in `config`.
//!
//! Wodify has no change feed and no documented updated-since filter, so every poll scans all
//! clients; change detection in the store makes the rescan cost nothing at RevKeen. The scan is
//! keyset-paged (`/clients/search?q=id|gt|N&sort=id`), which stays correct when clients are
//! added mid-scan, and the cursor is the last id read, so a crash resumes mid-scan. Page numbers
//! (`/clients?page=N&sort=id`) are the fallback (`scan = "pages"`).
//!
//! Every 2xx body is checked for Wodify's error envelope before it is read as data: an error can
//! arrive with HTTP 200.

mod client;
mod config;

pub use client::{Client, map_client};
pub use config::{Scan, WodifyKind, WodifyOptions};

use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use super::{BoxFuture, BuildError, Kind, Mapped, Page, Record, Source, SourceError};
use crate::config::{Secret, SourceConfig};
use crate::http::{self, Probe};
use crate::store::{PageItem, PageItemOutcome};

/// The `wodify` kind, as [`super::KINDS`] lists it.
pub static KIND: WodifyKind = WodifyKind;

impl Kind for WodifyKind {
    fn build(&self, source: &SourceConfig) -> Result<Arc<dyn Source>, BuildError> {
        super::build_with(source, Wodify::new)
    }

    fn full_scan(&self) -> bool {
        true
    }

    fn describe_cursor(&self, cursor: &str, passes: i64) -> String {
        Wodify::describe_cursor(cursor, passes)
    }
}

/// Clients per request: Wodify's documented maximum.
pub const PAGE_SIZE: u32 = 100;

/// A Wodify account.
pub struct Wodify {
    http: reqwest::Client,
    base: Url,
    api_key: Secret,
    scan: Scan,
    default_country: String,
}

#[derive(Debug, Deserialize)]
struct Pagination {
    #[serde(default)]
    has_more: bool,
}

/// Where a scan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// Keyset: the last id read (0 at the start).
    After(i64),
    /// Page numbers: the next page (1 at the start).
    Page(u64),
}

impl Cursor {
    fn parse(text: &str) -> Option<Cursor> {
        let value: Value = serde_json::from_str(text).ok()?;
        if let Some(after) = value.get("after_id").and_then(Value::as_i64) {
            return Some(Cursor::After(after));
        }
        value.get("page").and_then(Value::as_u64).map(Cursor::Page)
    }

    fn render(self) -> String {
        match self {
            Cursor::After(id) => format!(r#"{{"after_id":{id}}}"#),
            Cursor::Page(page) => format!(r#"{{"page":{page}}}"#),
        }
    }
}

impl Wodify {
    /// An adapter for one configured Wodify source.
    pub fn new(config: &SourceConfig, options: &WodifyOptions) -> Result<Wodify, reqwest::Error> {
        Ok(Wodify {
            http: http::client(Duration::from_secs(config.timeout_secs))?,
            base: config.base_url.clone(),
            api_key: config.api_key.clone(),
            scan: options.scan,
            default_country: config.default_country.clone(),
        })
    }

    fn start(&self) -> Cursor {
        match self.scan {
            Scan::Keyset => Cursor::After(0),
            Scan::Pages => Cursor::Page(1),
        }
    }

    fn url(&self, cursor: Cursor) -> Url {
        let mut url = self.base.clone();
        let page_size = PAGE_SIZE.to_string();
        match cursor {
            Cursor::After(after) => {
                if let Ok(mut path) = url.path_segments_mut() {
                    path.pop_if_empty().extend(["clients", "search"]);
                }
                url.query_pairs_mut()
                    .append_pair("q", &format!("id|gt|{after}"))
                    .append_pair("sort", "id")
                    .append_pair("page", "1")
                    .append_pair("page_size", &page_size);
            }
            Cursor::Page(page) => {
                if let Ok(mut path) = url.path_segments_mut() {
                    path.pop_if_empty().push("clients");
                }
                url.query_pairs_mut()
                    .append_pair("page", &page.to_string())
                    .append_pair("page_size", &page_size)
                    .append_pair("sort", "id");
            }
        }
        url
    }

    /// One GET, with the answer checked for errors (including an envelope inside a 200).
    pub async fn get(&self, url: Url) -> Result<Value, SourceError> {
        self.get_with(url, read_answer).await
    }

    /// One GET whose answer `read` turns into a value or an error.
    async fn get_with<T>(
        &self,
        url: Url,
        read: impl FnOnce(StatusCode, &[u8], Option<Duration>) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        super::send_get(self.request(url), "wodify", read).await
    }

    /// A GET of `url` with the key.
    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        self.http
            .get(url)
            .header("x-api-key", self.api_key.expose())
            .header("accept", "application/json")
    }
}

/// A listing answer read straight into typed clients, with the envelope's keys alongside so an
/// error inside a 200 is still seen.
#[derive(Debug, Deserialize)]
struct ListingAnswer {
    #[serde(rename = "HTTPCode", default)]
    http_code: Option<Value>,
    #[serde(rename = "ErrorCode", default)]
    error_code: Option<Value>,
    #[serde(default)]
    clients: Option<Vec<Client>>,
    #[serde(default)]
    pagination: Option<Pagination>,
}

/// Reads a listing page; anything but a clean listing goes through [`read_answer`] for its
/// error.
fn read_listing(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(Vec<Client>, bool), SourceError> {
    if status.is_success()
        && let Ok(answer) = serde_json::from_slice::<ListingAnswer>(body)
        && answer.http_code.is_none()
        && answer.error_code.is_none()
        && let Some(clients) = answer.clients
    {
        return Ok((clients, answer.pagination.is_some_and(|p| p.has_more)));
    }
    read_answer(status, body, retry_after)?;
    Err(SourceError::Transient(
        "Wodify listing is not in the documented shape ({\"clients\": [...], \"pagination\": {...}})"
            .to_string(),
    ))
}

impl Wodify {
    /// `GET /clients?page_size=1`: one authenticated read for `check-config --connect`.
    async fn probe(&self) -> Probe {
        let request = self.request(super::probe_url(&self.base, "clients"));
        http::probe_request(request, |status, body| {
            SourceError::probe(read_answer(status, body, None))
        })
        .await
    }

    /// Describes a saved cursor in words, for `status`.
    fn describe_cursor(cursor: &str, passes: i64) -> String {
        let done = match passes {
            0 => "no complete scan yet".to_string(),
            1 => "1 complete scan".to_string(),
            n => format!("{n} complete scans"),
        };
        match Cursor::parse(cursor) {
            Some(Cursor::After(0)) | Some(Cursor::Page(1)) => {
                format!("Wodify scan at the start ({done})")
            }
            Some(Cursor::After(id)) => format!("Wodify scan at client id {id} ({done})"),
            Some(Cursor::Page(page)) => format!("Wodify scan at page {page} ({done})"),
            None => "Wodify scan position unreadable: the next poll starts over".to_string(),
        }
    }
}

/// Reads an answer: HTTP errors and error envelopes become [`SourceError`]s.
fn read_answer(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Value, SourceError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    // An error envelope can come with any status, 200 included.
    if let Some(envelope) = parsed.as_ref().and_then(envelope_code) {
        return Err(classify(envelope.0, &envelope.1, retry_after));
    }
    if !status.is_success() {
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if status == StatusCode::FORBIDDEN && message == "Missing Authentication Token" {
            // The gateway's answer to a path it does not know: the key was never looked at.
            return Err(SourceError::Permanent(
                "Wodify answered 403 Missing Authentication Token, which means an unknown path: check the source's base_url (e.g. https://api.wodify.com/v1)".to_string(),
            ));
        }
        return Err(classify(status.as_u16(), &message, retry_after));
    }
    parsed.ok_or_else(|| {
        SourceError::Transient(format!(
            "HTTP {status} with a body that is not JSON ({} bytes)",
            body.len()
        ))
    })
}

/// `(HTTPCode, message)` when the body is Wodify's error envelope.
fn envelope_code(value: &Value) -> Option<(u16, String)> {
    let object = value.as_object()?;
    if !object.contains_key("HTTPCode") && !object.contains_key("ErrorCode") {
        return None;
    }
    let code = object
        .get("HTTPCode")
        .and_then(|c| {
            c.as_u64()
                .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
        })
        .and_then(|c| u16::try_from(c).ok())
        .unwrap_or(500);
    let message = ["DeveloperMessage", "UserMessage", "ErrorCode"]
        .iter()
        .filter_map(|k| object.get(*k).and_then(Value::as_str))
        .find(|m| !m.is_empty())
        .unwrap_or("")
        .to_string();
    Some((code, message))
}

fn classify(code: u16, message: &str, retry_after: Option<Duration>) -> SourceError {
    let detail = if message.is_empty() {
        format!("Wodify error {code}")
    } else {
        format!("Wodify error {code}: {message}")
    };
    match code {
        401 | 403 => SourceError::AuthRefused(format!(
            "{detail}; check the source's api_key / api_key_file"
        )),
        429 => SourceError::RateLimited(retry_after),
        408 | 500..=599 => SourceError::Transient(detail),
        404 => SourceError::NotFound,
        _ => SourceError::Permanent(detail),
    }
}

impl Wodify {
    async fn fetch_page(&self, cursor: &str) -> Result<Page, SourceError> {
        let at = match Cursor::parse(cursor) {
            // A cursor of the other scan mode (the config changed): start over in this one.
            Some(Cursor::After(_)) if self.scan == Scan::Pages => self.start(),
            Some(Cursor::Page(_)) if self.scan == Scan::Keyset => self.start(),
            Some(at) => at,
            None => self.start(),
        };
        let (clients, has_more) = self.get_with(self.url(at), read_listing).await?;
        let next = match at {
            _ if !has_more => self.start(),
            Cursor::After(after) => {
                Cursor::After(clients.iter().filter_map(|c| c.id).max().unwrap_or(after))
            }
            Cursor::Page(page) => Cursor::Page(page + 1),
        };
        // `has_more` with an empty page would loop forever on the same cursor.
        let pass_complete = !has_more || (clients.is_empty() && next == at);
        Ok(Page {
            records: clients.into_iter().map(Record::new).collect(),
            next: if pass_complete { self.start() } else { next }.render(),
            pass_complete,
        })
    }

    async fn fetch_client(&self, external_id: &str) -> Result<Option<Record>, SourceError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["clients", external_id]);
        }
        let value = self.get(url).await?;
        let client: Client = serde_json::from_value(value).map_err(|e| {
            SourceError::Transient(format!("Wodify client is not in the documented shape: {e}"))
        })?;
        // The record must be the one asked for: a push can never inject another.
        let asked_for = client.id.map(|id| id.to_string()).as_deref() == Some(external_id);
        Ok(asked_for.then(|| Record::new(client)))
    }
}

impl Source for Wodify {
    fn start_cursor(&self) -> String {
        self.start().render()
    }

    fn fetch<'a>(&'a self, cursor: &'a str) -> BoxFuture<'a, Result<Page, SourceError>> {
        Box::pin(self.fetch_page(cursor))
    }

    fn fetch_one<'a>(
        &'a self,
        external_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Record>, SourceError>> {
        Box::pin(self.fetch_client(external_id))
    }

    fn valid_id(&self, external_id: &str) -> bool {
        external_id.parse::<i64>().is_ok_and(|id| id > 0)
    }

    fn map(&self, record: &Record) -> Mapped {
        let Some(client) = record.get::<Client>() else {
            return super::foreign_record("(unknown)");
        };
        let external_id = client
            .id
            .map(|id| id.to_string())
            .unwrap_or_else(|| "(no id)".to_string());
        match map_client(client, &self.default_country) {
            Ok((customer, warnings)) => Mapped {
                item: PageItem {
                    external_id,
                    outcome: PageItemOutcome::Customer {
                        body: customer.to_body(),
                        update_only: false,
                    },
                },
                warnings,
            },
            Err(rejection) => Mapped {
                item: PageItem {
                    external_id,
                    outcome: PageItemOutcome::Rejected(rejection),
                },
                warnings: Vec::new(),
            },
        }
    }

    fn probe(&self) -> BoxFuture<'_, Probe> {
        Box::pin(Wodify::probe(self))
    }

    fn covers(&self, resumed_at: &str, cursor: &str) -> bool {
        match (Cursor::parse(resumed_at), Cursor::parse(cursor)) {
            (Some(Cursor::After(stop)), Some(Cursor::After(now))) => now >= stop,
            (Some(Cursor::Page(stop)), Some(Cursor::Page(now))) => now >= stop,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_inside_a_200_is_an_error() {
        let body = br#"{"HTTPCode": 500, "DeveloperMessage": "boom", "UserMessage": "", "MoreInfo": "", "ErrorCode": "InternalError"}"#;
        let error = read_answer(StatusCode::OK, body, None).expect_err("envelope");
        assert!(
            matches!(error, SourceError::Transient(ref m) if m.contains("boom")),
            "{error:?}"
        );
        let auth = br#"{"HTTPCode": 401, "DeveloperMessage": "bad key"}"#;
        assert!(matches!(
            read_answer(StatusCode::OK, auth, None),
            Err(SourceError::AuthRefused(_))
        ));
    }

    #[test]
    fn unknown_path_is_not_mistaken_for_a_bad_key() {
        let error = read_answer(
            StatusCode::FORBIDDEN,
            br#"{"message":"Missing Authentication Token"}"#,
            None,
        )
        .expect_err("refused");
        assert!(matches!(error, SourceError::Permanent(ref m) if m.contains("base_url")));
    }

    #[test]
    fn keyset_cursor_covers_once_past_the_resume_point() {
        let config = crate::config::Config::from_toml(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='g'\nkind='wodify'\nbase_url='https://api.wodify.com/v1'\napi_key='w'\n",
            &crate::config::Environment::default(),
            &crate::sources::config_kinds(),
        )
        .expect("config");
        let source = &config.sources[0];
        let options = source.options::<WodifyOptions>().expect("wodify options");
        let wodify = Wodify::new(source, options).expect("client");
        let at = Cursor::After(500).render();
        assert!(!wodify.covers(&at, &Cursor::After(400).render()));
        assert!(wodify.covers(&at, &Cursor::After(500).render()));
        assert_eq!(
            wodify.url(Cursor::After(500)).as_str(),
            "https://api.wodify.com/v1/clients/search?q=id%7Cgt%7C500&sort=id&page=1&page_size=100"
        );
    }
}
