//! Wodify clients: a resumable full scan and the client → customer mapping.
//!
//! Wodify has no change feed and no documented updated-since filter, so every poll scans all
//! clients; change detection in the store makes the rescan cost nothing at RevKeen. The scan is
//! keyset-paged (`/clients/search?q=id|gt|N&sort=id`), which stays correct when clients are
//! added mid-scan, and the cursor is the last id read, so a crash resumes mid-scan. Page numbers
//! (`/clients?page=N&sort=id`) are the fallback (`scan = "pages"`).
//!
//! Every 2xx body is checked for Wodify's error envelope before it is read as data: an error can
//! arrive with HTTP 200.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use super::{Adapter, Fetched, Mapped, SourceError};
use crate::config::{Secret, SourceConfig, WodifyScan};
use crate::customer::{self, Customer, Phone, Rejection};
use crate::http;
use crate::store::{PageItem, PageItemOutcome};

/// Clients per request: Wodify's documented maximum.
pub const PAGE_SIZE: u32 = 100;

/// A Wodify account.
pub struct Wodify {
    http: reqwest::Client,
    base: Url,
    api_key: Secret,
    scan: WodifyScan,
    default_country: String,
}

/// A client as listed. Every field is optional and leniently typed: a value of an unexpected
/// type is dropped rather than failing the page.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Client {
    #[serde(default, deserialize_with = "lenient::id")]
    pub id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub first_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub last_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub phone_number: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub client_status: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub location: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub street_address_1: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub street_address_2: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub city: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub state: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub zipcode: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub country: Option<String>,
    #[serde(default, deserialize_with = "lenient::tags")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub updated: Option<Updated>,
}

/// `updated: {updated_by_id, updated_by, updated_on_datetime}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Updated {
    #[serde(default, deserialize_with = "lenient::text")]
    pub updated_on_datetime: Option<String>,
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
    pub fn new(config: &SourceConfig) -> Result<Wodify, reqwest::Error> {
        Ok(Wodify {
            http: http::client(Duration::from_secs(config.timeout_secs))?,
            base: config.base_url.clone(),
            api_key: config.api_key.clone(),
            scan: config.scan,
            default_country: config.default_country.clone(),
        })
    }

    fn start(&self) -> Cursor {
        match self.scan {
            WodifyScan::Keyset => Cursor::After(0),
            WodifyScan::Pages => Cursor::Page(1),
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
    pub async fn probe(&self) -> crate::http::Probe {
        let request = self.request(super::probe_url(&self.base, "clients"));
        crate::http::probe_request(request, |status, body| {
            SourceError::probe(read_answer(status, body, None))
        })
        .await
    }

    /// Describes a saved cursor in words, for `status`.
    pub fn describe_cursor(cursor: &str, passes: i64) -> String {
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

impl Adapter for Wodify {
    type Record = Client;
    const FULL_SCAN: bool = true;

    fn start_cursor(&self) -> String {
        self.start().render()
    }

    async fn fetch(&self, cursor: &str) -> Result<Fetched<Client>, SourceError> {
        let at = match Cursor::parse(cursor) {
            // A cursor of the other scan mode (the config changed): start over in this one.
            Some(Cursor::After(_)) if self.scan == WodifyScan::Pages => self.start(),
            Some(Cursor::Page(_)) if self.scan == WodifyScan::Keyset => self.start(),
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
        Ok(Fetched {
            records: clients,
            next: if pass_complete { self.start() } else { next }.render(),
            pass_complete,
        })
    }

    async fn fetch_one(&self, external_id: &str) -> Result<Option<Client>, SourceError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["clients", external_id]);
        }
        let value = self.get(url).await?;
        let client: Client = serde_json::from_value(value).map_err(|e| {
            SourceError::Transient(format!("Wodify client is not in the documented shape: {e}"))
        })?;
        // The record must be the one asked for: a push can never inject another.
        Ok((client.id.map(|id| id.to_string()).as_deref() == Some(external_id)).then_some(client))
    }

    fn valid_id(&self, external_id: &str) -> bool {
        external_id.parse::<i64>().is_ok_and(|id| id > 0)
    }

    fn map(&self, client: &Client) -> Mapped {
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

    fn covers(&self, resumed_at: &str, cursor: &str) -> bool {
        match (Cursor::parse(resumed_at), Cursor::parse(cursor)) {
            (Some(Cursor::After(stop)), Some(Cursor::After(now))) => now >= stop,
            (Some(Cursor::Page(stop)), Some(Cursor::Page(now))) => now >= stop,
            _ => true,
        }
    }
}

/// Maps a Wodify client to a customer, or says why it cannot be one.
pub fn map_client(
    client: &Client,
    default_country: &str,
) -> Result<(Customer, Vec<&'static str>), Rejection> {
    if client.id.is_none() {
        return Err(Rejection {
            code: "no_id",
            reason: "Wodify returned a client without an id".to_string(),
            hint: "report this to Wodify support: every client should have an id".to_string(),
        });
    }
    let email = customer::normalize_email(client.email.as_deref()).map_err(|problem| {
        if problem == "no email" {
            Rejection {
                code: "no_email",
                reason: "no email in Wodify".to_string(),
                hint: "add an email in the client's Wodify profile; it syncs on the next poll"
                    .to_string(),
            }
        } else {
            Rejection {
                code: "invalid_email",
                reason: "the email in Wodify is not a valid address".to_string(),
                hint: "correct the email in the client's Wodify profile; it syncs on the next poll"
                    .to_string(),
            }
        }
    })?;
    let mut warnings = Vec::new();
    let phone = match customer::normalize_phone(client.phone_number.as_deref(), default_country) {
        Phone::E164(number) => Some(number),
        Phone::Absent => None,
        Phone::Invalid => {
            warnings.push("phone_unparseable");
            None
        }
    };
    let country = customer::normalize_country(client.country.as_deref());
    if country.is_none() && customer::text(client.country.as_deref()).is_some() {
        warnings.push("country_unrecognised");
    }
    let mut metadata = std::collections::BTreeMap::new();
    if let Some(status) = customer::text(client.client_status.as_deref()) {
        metadata.insert("source_status".to_string(), Value::String(status));
    }
    if let Some(location) = customer::text(client.location.as_deref()) {
        metadata.insert("location".to_string(), Value::String(location));
    }
    if !client.tags.is_empty() {
        metadata.insert(
            "tags".to_string(),
            Value::Array(client.tags.iter().cloned().map(Value::String).collect()),
        );
    }
    let customer = Customer {
        email,
        name: customer::full_name(client.first_name.as_deref(), client.last_name.as_deref()),
        phone,
        address_line1: customer::text(client.street_address_1.as_deref()),
        address_line2: customer::text(client.street_address_2.as_deref()),
        city: customer::text(client.city.as_deref()),
        state: customer::text(client.state.as_deref()),
        postal_code: customer::text(client.zipcode.as_deref()),
        country,
        metadata,
        external_updated_at: customer::normalize_timestamp(
            client
                .updated
                .as_ref()
                .and_then(|u| u.updated_on_datetime.as_deref()),
        ),
    };
    Ok((customer, warnings))
}

/// Deserializers that take what a field usually is and let anything else through as absent.
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    }

    pub fn id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    }

    pub fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Value {
        serde_json::json!({"id": 12345, "first_name": "John", "last_name": "Doe",
            "email": " John.Doe@Example.com ", "phone_number": "555-867-5309",
            "client_status_id": 10, "client_status": "Active", "location_id": 20,
            "location": "Main Street Gym", "date_of_birth": "1900-01-01",
            "timezone": "America/Chicago", "is_email_subscribed": true, "is_sms_subscribed": false,
            "tags": ["vip"], "member_since": "2022-01-16",
            "street_address_1": "1 Main St", "zipcode": 60601, "country": "United States",
            "created_on": {"created_by_id": 80, "created_by": "Admin", "created_on_datetime": "2022-01-15T08:30:00"},
            "updated": {"updated_by_id": 81, "updated_by": "Staff", "updated_on_datetime": "2024-03-10T14:45:00Z"}})
    }

    #[test]
    fn documented_example_maps_to_only_accepted_fields() {
        let client: Client = serde_json::from_value(example()).expect("parses");
        let (customer, warnings) = map_client(&client, "US").expect("maps");
        let body: Value = serde_json::from_slice(&customer.to_body()).expect("json");
        // 555-867-5309 is a fictional number libphonenumber rightly refuses.
        assert_eq!(warnings, vec!["phone_unparseable"]);
        assert_eq!(
            body,
            serde_json::json!({
                "email": "john.doe@example.com",
                "name": "John Doe",
                "address_line1": "1 Main St",
                "postal_code": "60601",
                "country": "US",
                "metadata": {"location": "Main Street Gym", "source_status": "Active", "tags": ["vip"]},
                "external_updated_at": "2024-03-10T14:45:00Z"
            })
        );
    }

    #[test]
    fn a_client_without_email_is_rejected_with_a_hint() {
        let mut value = example();
        value["email"] = Value::String(String::new());
        let client: Client = serde_json::from_value(value).expect("parses");
        let rejection = map_client(&client, "US").expect_err("rejected");
        assert_eq!(rejection.code, "no_email");
        assert!(rejection.hint.contains("Wodify profile"));
    }

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
        )
        .expect("config");
        let wodify = Wodify::new(&config.sources[0]).expect("client");
        let at = Cursor::After(500).render();
        assert!(!wodify.covers(&at, &Cursor::After(400).render()));
        assert!(wodify.covers(&at, &Cursor::After(500).render()));
        assert_eq!(
            wodify.url(Cursor::After(500)).as_str(),
            "https://api.wodify.com/v1/clients/search?q=id%7Cgt%7C500&sort=id&page=1&page_size=100"
        );
    }
}
