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

use serde_json::value::RawValue;

use super::raw::{self, RawRecord};
use super::{BoxFuture, BuildError, Kind, Mapped, Page, Record, Source, SourceError};
use crate::config::SourceConfig;
use crate::http::{self, Probe};
use crate::secret::SecretCell;
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
    /// The source's configured name, for logs.
    name: String,
    http: reqwest::Client,
    endpoint: super::Endpoint,
    base: Url,
    api_key: SecretCell,
    scan: Scan,
    default_country: String,
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
            name: config.name.clone(),
            http: http::client(Duration::from_secs(config.timeout_secs))?,
            endpoint: super::Endpoint::new("wodify", "Wodify", config),
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

    /// One GET, with the answer checked for errors (including an envelope inside a 200); the
    /// body, for the caller to read.
    async fn get(&self, url: Url) -> Result<Vec<u8>, SourceError> {
        self.get_with(url, |status, body, retry_after| {
            read_answer(status, body, retry_after).map(|_| body.to_vec())
        })
        .await
    }

    /// One GET whose answer `read` turns into a value or an error.
    async fn get_with<T>(
        &self,
        url: Url,
        read: impl FnOnce(StatusCode, &[u8], Option<Duration>) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        self.endpoint.get(self.request(url), read).await
    }

    /// A GET of `url` with the key.
    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        self.http
            .get(url)
            .header("x-api-key", self.api_key.current().expose())
            .header("accept", "application/json")
    }
}

/// A listing answer's envelope: every client kept as raw text, read on its own later, with the
/// envelope's error keys alongside so an error inside a 200 is still seen.
#[derive(Deserialize)]
struct ListingEnvelope<'a> {
    #[serde(rename = "HTTPCode", default)]
    http_code: Option<serde::de::IgnoredAny>,
    #[serde(rename = "ErrorCode", default)]
    error_code: Option<serde::de::IgnoredAny>,
    #[serde(rename = "APIError", default)]
    api_error: Option<serde::de::IgnoredAny>,
    #[serde(borrow, default)]
    clients: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    pagination: Option<PaginationEnvelope>,
}

#[derive(Deserialize)]
struct PaginationEnvelope {
    #[serde(default)]
    has_more: Option<bool>,
}

/// One listed client, read on its own: its position for messages, a digest of its text when it
/// has no usable id (what names it then), and the client or what is wrong with it.
#[derive(Debug)]
pub(crate) struct Row {
    /// Where it was listed, e.g. `client 3 of the page after client id 10500`.
    place: String,
    /// Made only for a client without a usable id, the one kind of row it names (hashing
    /// every record's text was 2.8 % of a 100k first sync's profile samples, its benchmark
    /// effect within the spread).
    digest: Option<String>,
    read: Result<Client, String>,
}

impl Row {
    fn read(raw: &RawRecord<'_>, place: String) -> Row {
        let read = if raw.damaged {
            Err("holds bytes that are not UTF-8".to_string())
        } else {
            serde_json::from_str::<Client>(raw.text.get()).map_err(|e| raw::json_problem(&e))
        };
        let digest = read
            .as_ref()
            .map_or(true, |client| client.id.is_none())
            .then(|| raw.digest());
        Row {
            place,
            digest,
            read,
        }
    }

    /// The digest that names a client without a usable id (`unknown` is never reached: such a
    /// client always has one).
    fn digest(&self) -> &str {
        self.digest.as_deref().unwrap_or("unknown")
    }

    /// The client's id, when it has a usable one.
    fn id(&self) -> Option<i64> {
        self.read.as_ref().ok().and_then(|client| client.id)
    }
}

/// Reads a listing page: the envelope must be the documented one (`clients` and
/// `pagination.has_more`); each client is read on its own. Anything but a clean listing goes
/// through [`read_answer`] for its error.
fn read_listing(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    where_: &str,
) -> Result<(Vec<Row>, bool), SourceError> {
    let (text, lossy) = raw::text(body);
    let envelope = serde_json::from_str::<ListingEnvelope<'_>>(&text);
    let errors = envelope.as_ref().map_or(true, |e| {
        e.http_code.is_some() || e.error_code.is_some() || e.api_error.is_some()
    });
    if !status.is_success() || errors {
        read_answer(status, body, retry_after)?;
    }
    let envelope = envelope.map_err(|e| {
        SourceError::Transient(format!(
            "Wodify's listing is not JSON ({})",
            raw::json_problem(&e)
        ))
    })?;
    let missing = |what: &str| {
        SourceError::Transient(format!(
            "Wodify's listing has no {what}: it is not in the documented shape \
             ({{\"clients\": [...], \"pagination\": {{\"has_more\": ...}}}}); the page is \
             retried, never taken for the end of the listing"
        ))
    };
    let clients = envelope.clients.ok_or_else(|| missing("`clients` array"))?;
    let has_more = envelope
        .pagination
        .ok_or_else(|| missing("`pagination`"))?
        .has_more
        .ok_or_else(|| missing("`pagination.has_more`"))?;
    let rows = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            Row::read(
                &RawRecord::new(client, lossy),
                format!("client {} of {where_}", i + 1),
            )
        })
        .collect();
    Ok((rows, has_more))
}

impl Wodify {
    /// `GET /clients?page_size=1`: one authenticated read for `check-config --connect`.
    async fn probe(&self) -> Probe {
        let request = self.request(super::probe_url(&self.base, "clients"));
        self.endpoint
            .probe(request, |status, body| {
                read_answer(status, body, None).map(drop)
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
    if let Some(envelope) = parsed.as_ref().and_then(|v| envelope_code(v, status)) {
        return Err(classify(envelope.0, &envelope.1, retry_after));
    }
    if !status.is_success() {
        let message = crate::secret::redact(
            parsed
                .as_ref()
                .and_then(|v| v.get("message"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
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

/// `(HTTPCode, message)` when the body is one of Wodify's error envelopes: `{"HTTPCode",
/// "DeveloperMessage", …}`, or `{"APIError": {"ErrorMessage": …}}`, which carries no code (the
/// HTTP status stands for it, a 500 when that is a 2xx: retried).
fn envelope_code(value: &Value, status: StatusCode) -> Option<(u16, String)> {
    let object = value.as_object()?;
    if let Some(api_error) = object.get("APIError") {
        let code = if status.is_success() {
            500
        } else {
            status.as_u16()
        };
        let message = api_error
            .get("ErrorMessage")
            .and_then(Value::as_str)
            .or_else(|| api_error.as_str())
            .unwrap_or("");
        return Some((code, crate::secret::redact(message)));
    }
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
        .unwrap_or("");
    Some((code, crate::secret::redact(message)))
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
        // The API gateway's "the period's quota is spent" (a plain throttle says `Too Many
        // Requests`): nothing succeeds until the month turns, so it is not retried.
        429 if message.eq_ignore_ascii_case("Limit Exceeded") => SourceError::QuotaSpent(
            "Wodify answered 429 Limit Exceeded: the API key's monthly request quota (500,000 \
             documented, shared with Wodify Workflows and the gym's other integrations) is spent"
                .to_string(),
        ),
        429 => SourceError::RateLimited(retry_after),
        408 | 500..=599 => SourceError::Transient(detail),
        404 => SourceError::NotFound,
        _ => SourceError::Permanent(detail),
    }
}

/// A keyset page must list ids above its cursor in ascending order, or moving the cursor to the
/// highest id would skip clients the search has not shown yet (a search that ignores `sort`, as
/// live integrations report). The first id out of order, with the one before it.
fn out_of_order(rows: &[Row], after: i64) -> Option<(i64, i64)> {
    let mut last = after;
    for id in rows.iter().filter_map(Row::id) {
        if id <= last {
            return Some((id, last));
        }
        last = id;
    }
    None
}

impl Wodify {
    async fn fetch_page(&self, cursor: &str) -> Result<Page, SourceError> {
        let at = match Cursor::parse(cursor) {
            // A keyset cursor under scan = "pages" (the config changed): start over by pages. A
            // page cursor under keyset is a scan that fell back to pages: it goes on so.
            Some(Cursor::After(_)) if self.scan == Scan::Pages => self.start(),
            Some(at) => at,
            None => self.start(),
        };
        let where_ = match at {
            Cursor::After(0) | Cursor::Page(1) => "the first page".to_string(),
            Cursor::After(after) => format!("the page after client id {after}"),
            Cursor::Page(page) => format!("page {page}"),
        };
        let (rows, has_more) = self
            .get_with(self.url(at), |status, body, retry_after| {
                read_listing(status, body, retry_after, &where_)
            })
            .await?;
        // Keyset ids out of order: the page's clients are real and kept, but the rest of this
        // scan reads page numbers from the first page (`/clients?page=N&sort=id`), which the
        // cursor can follow without skipping anyone. The next scan tries the search again.
        // A last page (no `has_more`) showed every client left, in whatever order.
        let fallback = match at {
            Cursor::After(after) if has_more => out_of_order(&rows, after),
            _ => None,
        };
        if let Some((id, last)) = fallback {
            tracing::warn!(
                source = %self.name,
                "Wodify's client search answered {where_} out of id order (client id {id} after \
                 {last}), so a keyset scan would skip clients: this scan goes on by page numbers \
                 from the first page. Set scan = \"pages\" for this source to skip the search."
            );
        }
        let next = match at {
            _ if !has_more => self.start(),
            Cursor::After(_) if fallback.is_some() => Cursor::Page(1),
            // The keyset moves to the highest id read; a page that does not raise it is caught
            // by the poll loop as a page that does not advance the scan.
            Cursor::After(after) => {
                Cursor::After(rows.iter().filter_map(Row::id).fold(after, i64::max))
            }
            Cursor::Page(page) => Cursor::Page(page.saturating_add(1)),
        };
        // An empty page ends the listing, whatever `has_more` says (as live integrations do).
        let pass_complete = !has_more || rows.is_empty();
        Ok(Page {
            ids: rows
                .iter()
                .map(|r| r.id().map(|id| id.to_string()))
                .collect(),
            records: rows.into_iter().map(Record::new).collect(),
            next: if pass_complete { self.start() } else { next }.render(),
            pass_complete,
        })
    }

    async fn fetch_client(&self, external_id: &str) -> Result<Option<Record>, SourceError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["clients", external_id]);
        }
        let body = self.get(url).await?;
        let (text, lossy) = raw::text(&body);
        let client: &RawValue = serde_json::from_str(&text).map_err(|e| {
            SourceError::Transient(format!(
                "Wodify's client is not JSON ({})",
                raw::json_problem(&e)
            ))
        })?;
        let row = Row::read(
            &RawRecord::new(client, lossy),
            format!("client {external_id}"),
        );
        // The record must be the one asked for: a push can never inject another.
        let asked_for = row.id().map(|id| id.to_string()).as_deref() == Some(external_id);
        Ok(asked_for.then(|| Record::new(row)))
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

    fn external_id(&self, text: &str) -> Option<String> {
        super::positive_id_text(text)
    }

    fn map(&self, record: &Record) -> Mapped {
        let Some(row) = record.get::<Row>() else {
            return super::foreign_record("(unknown)");
        };
        let client = match &row.read {
            Ok(client) => client,
            Err(problem) => {
                return super::unreadable(
                    None,
                    row.digest(),
                    format!("{} {problem}", row.place),
                    "the record is read again on every poll; report it to Wodify support if it persists",
                );
            }
        };
        let Some(id) = client.id else {
            return super::unreadable(
                None,
                row.digest(),
                format!("{} has no usable id (a positive integer)", row.place),
                "report this to Wodify support: every client should have an id",
            );
        };
        let external_id = id.to_string();
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
            // A keyset scan that fell back to pages covers the rest only at the pass's end.
            (Some(Cursor::After(_)), Some(Cursor::Page(_))) => false,
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
    fn a_spent_quota_is_told_from_a_throttle_and_the_apierror_envelope_is_an_error() {
        let spent = read_answer(
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"message": "Limit Exceeded"}"#,
            None,
        );
        assert!(
            matches!(&spent, Err(SourceError::QuotaSpent(m)) if m.contains("monthly request quota")),
            "{spent:?}"
        );
        let throttled = read_answer(
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"message": "Too Many Requests"}"#,
            None,
        );
        assert_eq!(throttled.err(), Some(SourceError::RateLimited(None)));
        let api_error = br#"{"APIError": {"ErrorMessage": "Something broke"}}"#;
        let inside_a_200 = read_answer(StatusCode::OK, api_error, None);
        assert!(
            matches!(&inside_a_200, Err(SourceError::Transient(m)) if m.contains("Something broke")),
            "{inside_a_200:?}"
        );
        let listing = read_listing(StatusCode::OK, api_error, None, "the first page");
        assert!(matches!(listing, Err(SourceError::Transient(_))));
        let refused = read_answer(StatusCode::UNAUTHORIZED, api_error, None);
        assert!(matches!(refused, Err(SourceError::AuthRefused(_))));
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

    fn adapter() -> Wodify {
        let config = crate::config::Config::from_toml(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='g'\nkind='wodify'\nbase_url='https://api.wodify.com/v1'\napi_key='w'\n",
            &crate::config::Environment::default(),
            &crate::sources::config_kinds(),
        )
        .expect("config");
        let source = &config.sources[0];
        let options = source.options::<WodifyOptions>().expect("wodify options");
        Wodify::new(source, options).expect("client")
    }

    #[test]
    fn keyset_cursor_covers_once_past_the_resume_point() {
        let wodify = adapter();
        let at = Cursor::After(500).render();
        assert!(!wodify.covers(&at, &Cursor::After(400).render()));
        assert!(wodify.covers(&at, &Cursor::After(500).render()));
        assert_eq!(
            wodify.url(Cursor::After(500)).as_str(),
            "https://api.wodify.com/v1/clients/search?q=id%7Cgt%7C500&sort=id&page=1&page_size=100"
        );
    }

    #[test]
    fn a_client_without_a_usable_id_is_rejected_alone_under_a_name_stable_across_polls() {
        let wodify = adapter();
        let body = br#"{"clients": [{"id": 7, "email": "a@example.com"}, {"email": "b@example.com"}, {"id": "x"}], "pagination": {"has_more": false}}"#;
        let read = || {
            let (rows, _) =
                read_listing(StatusCode::OK, body, None, "the first page").expect("a listing");
            rows.into_iter()
                .map(|row| (row.digest.is_some(), wodify.map(&Record::new(row)).item))
                .collect::<Vec<_>>()
        };
        let (first, again) = (read(), read());
        let names = |items: &[(bool, PageItem)]| {
            items
                .iter()
                .map(|(_, item)| item.external_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&first),
            names(&again),
            "the same rows get the same names"
        );
        let hashed: Vec<bool> = first.iter().map(|(hashed, _)| *hashed).collect();
        assert_eq!(
            hashed,
            [false, true, true],
            "only rows without an id are hashed"
        );
        assert_eq!(first[0].1.external_id, "7");
        assert!(matches!(
            first[0].1.outcome,
            PageItemOutcome::Customer { .. }
        ));
        for (_, item) in &first[1..] {
            assert!(
                item.external_id.starts_with("no-id-"),
                "{}",
                item.external_id
            );
            assert!(
                matches!(item.outcome, PageItemOutcome::Rejected(_)),
                "{item:?}"
            );
        }
        assert_ne!(first[1].1.external_id, first[2].1.external_id);
    }

    /// The fields a client is read from, where the generated values go.
    const CLIENT_KEYS: &[&str] = &[
        "id",
        "first_name",
        "last_name",
        "email",
        "phone_number",
        "client_status",
        "location",
        "street_address_1",
        "street_address_2",
        "city",
        "state",
        "zipcode",
        "country",
        "tags",
        "updated",
        "updated_on_datetime",
    ];

    /// A listing envelope in the documented shape around `clients`.
    fn listing(clients: Vec<Value>, extra: Value) -> Value {
        let has_more = extra.as_bool().unwrap_or(true);
        serde_json::json!({
            "clients": clients,
            "pagination": { "page": 1, "page_size": 100, "has_more": has_more, "extra": extra },
        })
    }

    proptest::proptest! {
        /// Whatever a listing holds, nothing panics: a documented envelope is read with one row
        /// per client, each row becomes a customer that can be sent under its own id, or a
        /// rejection that says why; a damaged body is at worst an error for the page.
        #[test]
        fn any_listing_is_read_client_by_client_without_a_panic(
            (body, built) in crate::testing::listing_body(
                crate::testing::json_record(CLIENT_KEYS), listing, CLIENT_KEYS)
        ) {
            let wodify = adapter();
            match read_listing(StatusCode::OK, &body, None, "the first page") {
                Ok((rows, _)) => {
                    if let Some(count) = built {
                        proptest::prop_assert_eq!(rows.len(), count);
                    }
                    for row in rows {
                        let id = row.id().map(|id| id.to_string());
                        crate::sources::assert_mapped(id, wodify.map(&Record::new(row)))?;
                    }
                }
                Err(error) => proptest::prop_assert!(
                    built.is_none(),
                    "a documented envelope was refused: {error:?}"
                ),
            }
        }
    }
}
