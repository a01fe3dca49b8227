//! PracticeHub patients: incremental listing by `updated=gte:` and a PHI-proof allowlist.
//!
//! **No PHI leaves a clinic (invariant 7).** A listed patient is cut down to
//! [`PatientRecord`] inside [`Source::fetch`], before it leaves this module: that type has a
//! field for each allowlisted attribute (email, names, phone, patient number, lifecycle flags)
//! and nothing else, so notes, dates of birth, addresses and clinical text are dropped with the
//! raw JSON of the page (`patient`). The source-field table (`config::FIELDS`) can be
//! re-pointed by config (`[sources.fields] phone = "home_phone"`), but only for these logical
//! fields, and never at an attribute whose name says PHI (`config`).
//!
//! Incremental polling: the first listing reads the whole table; later ones ask for
//! `updated=gte:<mark>`, where the mark is when the previous complete listing *started* (minus
//! a margin for clock skew), so a patient changed while a listing ran is read again next time.
//! The mark advances only when a listing completes; a crash resumes from the saved `links.next`.
//! PracticeHub silently ignores filters it does not understand, so every row is checked
//! against the filter: if one is older than the mark, the filter was ignored, the poll becomes
//! a full scan (change detection keeps it cheap) and one warning says so.

mod config;
mod patient;

pub use config::{FIELDS, PracticeHubKind, PracticeHubOptions, validate_field_overrides};
pub use patient::{PatientBody, PatientMetadata, PatientRecord, map_patient};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use serde_json::value::RawValue;

use super::raw::{self, RawRecord};
use super::{BoxFuture, BuildError, Kind, Mapped, Page, Record, Source, SourceError};
use crate::config::SourceConfig;
use crate::http::{self, Probe};
use crate::secret::SecretCell;
use crate::store::{PageItem, PageItemOutcome};
use patient::Attributes;

/// The `practicehub` kind, as [`super::KINDS`] lists it.
pub static KIND: PracticeHubKind = PracticeHubKind;

impl Kind for PracticeHubKind {
    fn build(&self, source: &SourceConfig) -> Result<Arc<dyn Source>, BuildError> {
        super::build_with(source, PracticeHub::new)
    }

    fn describe_cursor(&self, cursor: &str, _passes: i64) -> String {
        PracticeHub::describe_cursor(cursor)
    }
}

/// Patients per request: PracticeHub's documented maximum.
pub const PAGE_SIZE: u32 = 100;
/// How far before a listing's start the next one's `updated` filter reaches back, to absorb
/// clock skew between this host and PracticeHub.
pub const MARK_MARGIN: Duration = Duration::from_secs(120);

/// A PracticeHub clinic account.
pub struct PracticeHub {
    http: reqwest::Client,
    endpoint: super::Endpoint,
    base: Url,
    api_key: SecretCell,
    app_details: String,
    default_country: String,
    /// Attribute name for each logical field, after config overrides.
    attributes: Attributes,
    /// Whether this listing already said the filter was ignored (one warning per listing).
    warned: AtomicBool,
    source: String,
}

/// Where a listing stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    /// `updated=gte:` value of the current listing; `None` lists everything.
    #[serde(default)]
    mark: Option<DateTime<Utc>>,
    /// When the current listing started (the next mark).
    #[serde(default)]
    started: Option<DateTime<Utc>>,
    /// `links.next` of the last page read, to resume a listing.
    #[serde(default)]
    next: Option<String>,
}

/// A listing's envelope: every row kept as raw text, cut down on its own.
#[derive(Deserialize)]
struct Listing<'a> {
    #[serde(borrow, default)]
    data: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    links: Option<Links>,
}

#[derive(Deserialize)]
struct Links {
    #[serde(default)]
    next: Option<Value>,
}

/// One listed patient, cut down to the allowlist on its own: its position for messages, a
/// digest of its row (which names it when it has no usable id), and the record or what is
/// wrong with the row (never quoting it).
#[derive(Debug)]
pub(crate) struct Row {
    place: String,
    digest: String,
    read: Result<PatientRecord, String>,
}

impl Row {
    fn id(&self) -> Option<String> {
        self.read.as_ref().ok().and_then(|r| r.id.clone())
    }
}

impl PracticeHub {
    /// An adapter for one configured PracticeHub source.
    pub fn new(
        config: &SourceConfig,
        options: &PracticeHubOptions,
    ) -> Result<PracticeHub, reqwest::Error> {
        // Exported at zero from the start, so the first fallback is an increase.
        metrics::counter!(crate::metrics::FILTER_IGNORED, "source" => config.name.clone())
            .increment(0);
        Ok(PracticeHub {
            http: http::client(Duration::from_secs(config.timeout_secs))?,
            endpoint: super::Endpoint::new("practicehub", "PracticeHub", config),
            base: config.base_url.clone(),
            api_key: config.api_key.clone(),
            app_details: options.app_details.clone(),
            default_country: config.default_country.clone(),
            attributes: Attributes::new(&options.fields),
            warned: AtomicBool::new(false),
            source: config.name.clone(),
        })
    }

    fn attribute<'a>(&'a self, field: &'a str) -> &'a str {
        self.attributes.get(field)
    }

    fn first_page(&self, mark: Option<DateTime<Utc>>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("patients");
        }
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("page", "1")
                .append_pair("page_size", &PAGE_SIZE.to_string());
            if let Some(mark) = mark {
                query.append_pair(
                    self.attribute("updated"),
                    &format!("gte:{}", mark.to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
            }
        }
        url
    }

    /// GET with both mandatory headers; only ever GET (a PracticeHub key can delete data).
    /// The body, once the status says it is an answer.
    async fn get(&self, url: Url) -> Result<Vec<u8>, SourceError> {
        self.endpoint
            .get(self.request(url), |status, body, retry_after| {
                read_answer(status, body, retry_after).map(|()| body.to_vec())
            })
            .await
    }

    /// A GET of `url` with the key and the app details.
    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        self.http
            .get(url)
            .header("x-practicehub-key", self.api_key.current().expose())
            .header("x-app-details", &self.app_details)
            .header("accept", "application/json")
    }

    /// Whether a `links.next` URL points at the configured API (the key goes with it).
    fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
    }
}

impl PracticeHub {
    /// `GET /patients?page_size=1`: one authenticated read for `check-config --connect`.
    async fn probe(&self) -> Probe {
        let request = self.request(super::probe_url(&self.base, "patients"));
        self.endpoint
            .probe(request, |status, body| {
                read_answer(status, body, None).map(drop)
            })
            .await
    }

    /// Describes a saved cursor in words, for `status`.
    fn describe_cursor(cursor: &str) -> String {
        let Ok(at) = serde_json::from_str::<Cursor>(cursor) else {
            return "PracticeHub position unreadable: the next poll lists everything".to_string();
        };
        let mark = at
            .mark
            .map(|m| format!("updated ≥ {}", m.to_rfc3339_opts(SecondsFormat::Secs, true)));
        match (mark, at.next) {
            (None, None) => "PracticeHub: first full listing not yet complete".to_string(),
            (Some(mark), None) => format!("PracticeHub {mark}"),
            (None, Some(_)) => "PracticeHub first full listing in progress".to_string(),
            (Some(mark), Some(_)) => format!("PracticeHub listing {mark} in progress"),
        }
    }
}

/// Reads an answer's status: a success is for the caller to read; an error becomes a
/// [`SourceError`], with PracticeHub's `message` when it gave one.
fn read_answer(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(), SourceError> {
    if status.is_success() {
        return Ok(());
    }
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = crate::secret::redact(
        parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    let detail = format!("PracticeHub answered HTTP {}: {message}", status.as_u16());
    Err(match status.as_u16() {
        401 | 403 => SourceError::AuthRefused(format!(
            "{detail}; check the source's api_key / api_key_file"
        )),
        429 => SourceError::RateLimited(retry_after),
        408 | 500..=599 => SourceError::Transient(detail),
        400 => SourceError::Permanent(format!("{detail}; check the source's app_details")),
        404 => SourceError::Permanent(format!(
            "{detail}; check the source's base_url (https://{{account}}.neptune.practicehub.io/api)"
        )),
        _ => SourceError::Permanent(detail),
    })
}

/// A cursor as the state file stores it.
fn render(cursor: &Cursor) -> String {
    serde_json::to_string(cursor).expect("a struct of strings and times always serializes")
}

impl PracticeHub {
    async fn fetch_page(&self, cursor: &str) -> Result<Page, SourceError> {
        let mut at: Cursor = serde_json::from_str(cursor).unwrap_or_default();
        let url = match at.next.as_deref().map(Url::parse) {
            Some(Ok(url)) if self.same_origin(&url) => url,
            Some(Ok(url)) => {
                return Err(SourceError::Permanent(format!(
                    "PracticeHub's next link points at another host ({}); refusing to send the key there",
                    url.host_str().unwrap_or("?")
                )));
            }
            Some(Err(_)) | None => {
                // A fresh listing: it starts now, and its start is the next listing's mark.
                at.started = Some(crate::clock::now());
                at.next = None;
                self.warned.store(false, Ordering::Relaxed);
                self.first_page(at.mark)
            }
        };
        let body = self.get(url.clone()).await?;
        let (rows, next_link) = self.read_listing(&body, &url, "a page")?;
        if let Some(mark) = at.mark {
            let ignored = rows.iter().any(|row| {
                row.read
                    .as_ref()
                    .is_ok_and(|r| r.updated.is_some_and(|updated| updated < mark))
            });
            if ignored && !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    source = %self.source,
                    "PracticeHub ignored the updated filter; this poll reads the whole patient list (unchanged patients are not sent)."
                );
                metrics::counter!(crate::metrics::FILTER_IGNORED, "source" => self.source.clone())
                    .increment(1);
            }
        }
        let pass_complete = next_link.is_none();
        let next = if pass_complete {
            Cursor {
                mark: at
                    .started
                    .map(|s| s - chrono::Duration::from_std(MARK_MARGIN).unwrap_or_default()),
                started: None,
                next: None,
            }
        } else {
            Cursor {
                next: next_link,
                ..at
            }
        };
        Ok(Page {
            ids: rows.iter().map(Row::id).collect(),
            records: rows.into_iter().map(Record::new).collect(),
            next: render(&next),
            pass_complete,
        })
    }

    /// Reads a listing answered for `url`: the envelope must hold `data`; each row is cut down
    /// on its own; `links.next`, if any, is resolved against `url` (a relative link is a page
    /// of this listing, never "start over").
    fn read_listing(
        &self,
        body: &[u8],
        url: &Url,
        where_: &str,
    ) -> Result<(Vec<Row>, Option<String>), SourceError> {
        let (text, lossy) = raw::text(body);
        let listing = serde_json::from_str::<Listing<'_>>(&text).map_err(|e| {
            SourceError::Transient(format!(
                "PracticeHub's listing is not JSON ({}); the page is retried",
                raw::json_problem(&e)
            ))
        })?;
        let data = listing.data.ok_or_else(|| {
            SourceError::Transient(
                "PracticeHub's listing has no `data` array: it is not in the documented shape \
                 ({\"data\": [...], \"links\": {...}}); the page is retried, never taken for \
                 the end of the listing"
                    .to_string(),
            )
        })?;
        let rows = data
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let raw = RawRecord::new(row, lossy);
                let read = if raw.damaged {
                    Err("holds bytes that are not UTF-8".to_string())
                } else {
                    patient::cut_row(raw.text.get(), &self.attributes)
                };
                Row {
                    place: format!("patient {} of {where_}", i + 1),
                    digest: raw.digest(),
                    read,
                }
            })
            .collect();
        let next = match listing.links.and_then(|l| l.next) {
            None | Some(Value::Null) => None,
            Some(Value::String(link)) if link.trim().is_empty() => None,
            Some(Value::String(link)) => Some(
                url.join(link.trim())
                    .map_err(|_| {
                        SourceError::Transient(
                            "PracticeHub's links.next is not a URL; the page is retried"
                                .to_string(),
                        )
                    })?
                    .to_string(),
            ),
            Some(_) => {
                return Err(SourceError::Transient(
                    "PracticeHub's links.next is not a string; the page is retried".to_string(),
                ));
            }
        };
        Ok((rows, next))
    }

    async fn fetch_patient(&self, external_id: &str) -> Result<Option<Record>, SourceError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("patients");
        }
        url.query_pairs_mut()
            .append_pair(self.attribute("id"), &format!("eq:{external_id}"));
        let body = self.get(url.clone()).await?;
        let (rows, _) = self.read_listing(&body, &url, "the answer to a push fetch")?;
        let listed = rows.len();
        let row = rows
            .into_iter()
            .find(|row| row.id().as_deref() == Some(external_id));
        if row.is_none() && listed > 0 {
            tracing::warn!(
                source = %self.source,
                "PracticeHub ignored the id filter of a push event; the next poll picks the patient up."
            );
        }
        Ok(row.map(Record::new))
    }
}

impl Source for PracticeHub {
    fn start_cursor(&self) -> String {
        render(&Cursor::default())
    }

    fn fetch<'a>(&'a self, cursor: &'a str) -> BoxFuture<'a, Result<Page, SourceError>> {
        Box::pin(self.fetch_page(cursor))
    }

    fn fetch_one<'a>(
        &'a self,
        external_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Record>, SourceError>> {
        Box::pin(self.fetch_patient(external_id))
    }

    fn probe(&self) -> BoxFuture<'_, Probe> {
        Box::pin(PracticeHub::probe(self))
    }

    fn external_id(&self, text: &str) -> Option<String> {
        super::positive_id_text(text)
    }

    /// A listing is interrupted when a `links.next` was saved; a cursor holding only a mark is
    /// a completed listing, and the next poll starts an incremental one.
    fn mid_listing(&self, cursor: &str) -> bool {
        serde_json::from_str::<Cursor>(cursor).is_ok_and(|c| c.next.is_some())
    }

    /// A resumed listing covers only what changed since the crashed one began, from where it
    /// stopped: patients on the pages it had already read may have changed since. One more,
    /// incremental listing from the resumed one's mark picks them up (a few requests).
    fn covers(&self, _resumed_at: &str, _cursor: &str) -> bool {
        false
    }

    fn map(&self, record: &Record) -> Mapped {
        let Some(row) = record.get::<Row>() else {
            return super::foreign_record("(unknown)");
        };
        let record = match &row.read {
            Ok(record) => record,
            Err(problem) => {
                return super::unreadable(
                    None,
                    &row.digest,
                    format!("{} {problem}", row.place),
                    "the row is read again on every poll; check the patient in PracticeHub",
                );
            }
        };
        let Some(external_id) = record.id.clone() else {
            return super::unreadable(
                None,
                &row.digest,
                format!("{} has no usable id (a positive integer)", row.place),
                "check the source's [fields] id mapping",
            );
        };
        let (outcome, warnings) = match map_patient(record, &self.default_country) {
            Ok((body, warnings)) => (
                PageItemOutcome::Customer {
                    body: body.to_body(),
                    update_only: record.deleted,
                },
                warnings,
            ),
            // A deleted patient without an email is simply gone: nothing to send or fix.
            Err(_) if record.deleted => (PageItemOutcome::Ignored, Vec::new()),
            Err(rejection) => (PageItemOutcome::Rejected(rejection), Vec::new()),
        };
        Mapped {
            item: PageItem {
                external_id,
                outcome,
            },
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    impl PracticeHub {
        /// A listed patient as the adapter cuts it.
        fn record(&self, value: &Value) -> PatientRecord {
            patient::cut_row(&value.to_string(), &self.attributes).expect("a patient")
        }

        /// A listed patient as the poll loop hands it to `map`.
        fn row(&self, value: &Value) -> Record {
            Record::new(Row {
                place: "patient 1 of a page".to_string(),
                digest: "0".repeat(12),
                read: Ok(self.record(value)),
            })
        }
    }

    fn adapter(fields: &str) -> PracticeHub {
        let config = crate::config::Config::from_toml(
            &format!(
                "[revkeen]\napi_key='k'\n[[sources]]\nname='clinic'\nkind='practicehub'\n\
                 base_url='https://bayside.practicehub.io'\napi_key='p'\n\
                 app_details='sync=ops@bayside.example'\n{fields}"
            ),
            &crate::config::Environment::default(),
            &crate::sources::config_kinds(),
        )
        .expect("config");
        let source = &config.sources[0];
        let options = source.options::<PracticeHubOptions>().expect("options");
        PracticeHub::new(source, options).expect("client")
    }

    fn patient() -> Value {
        serde_json::json!({
            "id": 42, "patient_number": 1042, "custom_reference": "INS-1",
            "first_name": "Ada", "last_name": "Byron", "email": "Ada@Example.co.uk ",
            "mobile": "07911 123456", "home_phone": null,
            "note": "<p>PHI-NOTE-MARKER</p>", "date_of_birth": "1815-12-10",
            "address": "PHI-ADDRESS-MARKER",
            "created": "2024-01-01T00:00:00+00:00", "updated": "2025-02-01T10:00:00+00:00",
            "deleted": 0, "active": true
        })
    }

    #[test]
    fn a_patient_becomes_an_allowlisted_body() {
        let hub = adapter("");
        let record = hub.record(&patient());
        let (body, warnings) = map_patient(&record, "GB").expect("maps");
        assert!(warnings.is_empty());
        let json = serde_json::to_string(&body).expect("json");
        assert_eq!(
            json,
            r#"{"email":"ada@example.co.uk","name":"Ada Byron","phone":"+447911123456","metadata":{"patient_number":"1042","source_status":"active"},"external_updated_at":"2025-02-01T10:00:00Z"}"#
        );
        assert!(!format!("{record:?}").contains("MARKER"));
    }

    #[test]
    fn deleted_patients_are_update_only_and_without_email_ignored() {
        let hub = adapter("");
        let mut value = patient();
        value["deleted"] = Value::Bool(true);
        let mapped = hub.map(&hub.row(&value));
        assert!(matches!(
            mapped.item.outcome,
            PageItemOutcome::Customer { update_only: true, ref body } if String::from_utf8_lossy(body).contains("\"deleted\"")
        ));
        value["email"] = Value::Null;
        assert!(matches!(
            hub.map(&hub.row(&value)).item.outcome,
            PageItemOutcome::Ignored
        ));
    }

    #[test]
    fn field_overrides_are_limited_to_billing_safe_fields() {
        let mut overrides = BTreeMap::new();
        overrides.insert("phone".to_string(), "home_phone".to_string());
        assert!(validate_field_overrides(&overrides).is_ok());
        overrides.insert("first_name".to_string(), "note".to_string());
        assert!(
            validate_field_overrides(&overrides)
                .expect_err("PHI")
                .contains("clinical")
        );
        let mut unknown = BTreeMap::new();
        unknown.insert("date_of_birth".to_string(), "date_of_birth".to_string());
        assert!(validate_field_overrides(&unknown).is_err());
        let hub = adapter("[sources.fields]\nphone = 'home_phone'\n");
        let mut value = patient();
        value["home_phone"] = Value::String("020 7946 0018".into());
        let record = hub.record(&value);
        assert_eq!(record.phone.as_deref(), Some("020 7946 0018"));
    }

    #[test]
    fn the_first_page_carries_the_filter_and_next_links_must_stay_on_the_host() {
        let hub = adapter("");
        let mark = DateTime::parse_from_rfc3339("2025-02-01T00:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            hub.first_page(Some(mark)).as_str(),
            "https://bayside.neptune.practicehub.io/api/patients?page=1&page_size=100&updated=gte%3A2025-02-01T00%3A00%3A00Z"
        );
        assert!(hub.same_origin(
            &Url::parse("https://bayside.neptune.practicehub.io/api/patients?page=2").expect("url")
        ));
        assert!(
            !hub.same_origin(&Url::parse("https://evil.example/api/patients?page=2").expect("url"))
        );
    }

    #[test]
    fn practicehub_urls_are_normalized_and_app_details_required() {
        let toml = r#"
[revkeen]
api_key = "rk"
[[sources]]
name = "clinic"
kind = "practicehub"
base_url = "https://bayside.practicehub.io"
api_key = "p"
"#;
        let load = |toml: &str| {
            crate::config::Config::from_toml(
                toml,
                &crate::config::Environment::default(),
                &crate::sources::config_kinds(),
            )
        };
        let error = load(toml).expect_err("app_details is required");
        assert_eq!(error.key, "sources[0].app_details");
        let config = load(&format!(
            "{toml}app_details = \"sync=ops@bayside.example\"\n"
        ))
        .expect("valid");
        assert_eq!(
            config.sources[0].base_url.as_str(),
            "https://bayside.neptune.practicehub.io/api/"
        );
    }

    /// The attributes a patient is read from, and some it never reads.
    const PATIENT_KEYS: &[&str] = &[
        "id",
        "email",
        "first_name",
        "last_name",
        "mobile",
        "home_phone",
        "patient_number",
        "updated",
        "deleted",
        "active",
        "note",
        "address",
        "date_of_birth",
    ];

    /// A listing envelope in the documented shape around `data`.
    fn listing(data: Vec<Value>, extra: Value) -> Value {
        let next = if extra.is_string() {
            extra.clone()
        } else {
            Value::Null
        };
        serde_json::json!({
            "data": data,
            "links": { "self": "https://bayside.neptune.practicehub.io/api/patients?page=1",
                       "next": next },
            "meta": { "extra": extra },
        })
    }

    proptest::proptest! {
        /// Whatever a listing holds, nothing panics: a documented envelope is read with one row
        /// per patient, each row becomes a customer that can be sent under its own id, a
        /// rejection that says why, or nothing (a deleted patient without an email); a damaged
        /// body is at worst an error for the page.
        #[test]
        fn any_listing_is_read_patient_by_patient_without_a_panic(
            (body, built) in crate::testing::listing_body(
                crate::testing::json_record(PATIENT_KEYS), listing, PATIENT_KEYS)
        ) {
            let adapter = adapter("");
            let url = Url::parse("https://bayside.neptune.practicehub.io/api/patients?page=1")
                .expect("URL");
            match adapter.read_listing(&body, &url, "the first page") {
                Ok((rows, _)) => {
                    if let Some(count) = built {
                        proptest::prop_assert_eq!(rows.len(), count);
                    }
                    for row in rows {
                        let id = row.id();
                        crate::sources::assert_mapped(id, adapter.map(&Record::new(row)))?;
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
