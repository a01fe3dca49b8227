//! PracticeHub patients: incremental listing by `updated=gte:` in the server's own clock, a
//! nightly full scan, and a PHI-proof allowlist.
//!
//! **No PHI leaves a clinic (invariant 7).** A listed patient is cut down to
//! [`PatientRecord`] inside [`Source::fetch`], before it leaves this module: that type has a
//! field for each allowlisted attribute (email, names, phone, patient number, lifecycle flags,
//! the `updated` time) and nothing else, so notes, dates of birth, addresses, insurers,
//! balances, appointments and clinical text are dropped with the raw JSON of the page
//! (`patient`). The source-field table (`config::FIELDS`) can be re-pointed by config
//! (`[sources.fields] phone = "home_phone"`), but only for these logical fields, and never at
//! an attribute whose name says PHI (`config`).
//!
//! **Two namings.** Live keys name attributes otherwise than the documented shape (`phone`,
//! `updated_at`, `created_at` for `mobile`, `updated`, `created`; `config::NAMINGS`). A field
//! the config does not name is read from either; the rows of each listing's first page decide
//! which naming the clinic's API uses, the choice is kept in the cursor (the state file), said
//! once in the log, shown by `status` and `check-config --connect`, and the filter is sent on
//! the attribute the rows carry (a filter on an unknown attribute is silently ignored).
//!
//! **The cursor lives in the server's clock.** A completed listing leaves the mark for the
//! next: the newest `updated` it saw (at most the server's `Date` when the listing started),
//! in whole seconds, minus [`MARK_OVERLAP`] — more than the hour a naive local time jumps back
//! in October. It is sent as the server writes times (`stamp`): naive local if the rows are
//! naive, RFC 3339 if not; nothing of this host's clock enters it, so a server clock behind or
//! ahead of the host's loses nothing. The filter is put back on every page requested, since
//! `links.next` may carry `?page=N` alone. The mark advances only when a listing completes; a
//! crash resumes from the saved `links.next`.
//!
//! **Every row is checked against the filter**, at the precision it was sent: one older than
//! the mark means PracticeHub ignored the filter, and one warning per listing says so (the
//! listing then reads the whole table; change detection keeps it cheap). A row without a
//! readable `updated` is neither: it is counted and reported once per listing.
//!
//! **Full listings** (no filter) are the first, a `--resync` ([`Source::full_listing`]), and
//! one whenever the source's `full_scan_schedule` fired since the last one started (this
//! host's cron: in the daemon its tick starts the poll; a `--once` after it does one). A full
//! listing finds whatever an incremental one missed and tells the poll loop which patients
//! vanished ([`Source::completed_full_scan`]).

mod config;
mod patient;
mod stamp;

pub use config::{
    DEFAULT_TIMEZONE, FIELDS, NAMINGS, PracticeHubKind, PracticeHubOptions,
    validate_field_overrides,
};
pub use patient::{PatientBody, PatientMetadata, PatientRecord, map_patient};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
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
use patient::{Attributes, Naming};
use stamp::Stamp;

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
/// How far before the newest `updated` a completed listing saw the next listing's filter
/// reaches back: more than the hour a naive local time jumps back when the clocks change, and
/// ten minutes for a change committed with an earlier stamp than one already listed.
pub const MARK_OVERLAP: Duration = Duration::from_secs(70 * 60);
/// Patients a `check-config --connect` probe reads to tell the naming apart.
const PROBE_PAGE_SIZE: &str = "10";

/// A PracticeHub clinic account.
pub struct PracticeHub {
    http: reqwest::Client,
    endpoint: super::Endpoint,
    base: Url,
    api_key: SecretCell,
    app_details: String,
    default_country: String,
    /// Attribute name for each logical field, after config overrides, and the clinic's zone.
    attributes: Attributes,
    /// When a listing reads everything (`None`: only the first and a `--resync`).
    full_scan_schedule: Option<String>,
    source: String,
}

/// Where a listing stands, as JSON in the state file. Every field may be missing, so a cursor
/// an older version wrote stays readable (its RFC 3339 `mark` is read as a zoned stamp, its
/// `started` as the listing's start).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    /// The filter value of the current listing (`<updated>=gte:<mark>`) as sent: the newest
    /// `updated` the last complete listing saw, minus [`MARK_OVERLAP`], in the server's own
    /// form. `None` lists everything.
    #[serde(default)]
    mark: Option<String>,
    /// When the current listing started (this host's clock: only full scans are timed by it).
    #[serde(default)]
    started: Option<DateTime<Utc>>,
    /// `links.next` of the last page read, to resume a listing.
    #[serde(default)]
    next: Option<String>,
    /// The current listing reads every patient (no filter).
    #[serde(default, skip_serializing_if = "is_false")]
    full: bool,
    /// A full listing was asked for (`--resync`): the next listing is one.
    #[serde(default, skip_serializing_if = "is_false")]
    full_requested: bool,
    /// The newest `updated` the current listing has seen, as the server wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    newest: Option<String>,
    /// The server's clock when the current listing started (its first answer's `Date`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_start: Option<DateTime<Utc>>,
    /// Patients of the current listing without a readable `updated`.
    #[serde(default, skip_serializing_if = "is_zero")]
    undated: u64,
    /// The current listing has warned that the filter was ignored.
    #[serde(default, skip_serializing_if = "is_false")]
    ignored: bool,
    /// When the last complete full listing started (this host's clock, which the full-scan
    /// schedule runs on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    full_at: Option<DateTime<Utc>>,
    /// Complete listings since the last full one.
    #[serde(default, skip_serializing_if = "is_zero")]
    since_full: i64,
    /// On the cursor a full listing completed with: how many complete listings ago the
    /// previous full one completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    full_gap: Option<i64>,
    /// The attribute each field with two namings is read from on this clinic's API, as the
    /// rows showed (`updated` → `updated_at`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    names: BTreeMap<String, String>,
}

fn is_false(flag: &bool) -> bool {
    !flag
}

fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
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
/// digest of its row when it has no usable id (what names it then), the record or what is wrong
/// with the row (never quoting it), and which naming it carries.
#[derive(Debug)]
pub(crate) struct Row {
    place: String,
    /// Made only for a row without a usable id, the one kind of row it names.
    digest: Option<String>,
    read: Result<PatientRecord, String>,
    naming: Naming,
}

impl Row {
    /// The digest that names a row without a usable id (`unknown` is never reached: such a
    /// row always has one).
    fn digest(&self) -> &str {
        self.digest.as_deref().unwrap_or("unknown")
    }

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
            // PracticeHub's guide asks for a User-Agent naming the app and a contact: the
            // same `app=email` as x-app-details.
            http: http::client_with_agent(
                Duration::from_secs(config.timeout_secs),
                &options.app_details,
            )?,
            endpoint: super::Endpoint::new("practicehub", "PracticeHub", config),
            base: config.base_url.clone(),
            api_key: config.api_key.clone(),
            app_details: options.app_details.clone(),
            default_country: config.default_country.clone(),
            attributes: Attributes::new(&options.fields, options.timezone),
            full_scan_schedule: config.full_scan_schedule.clone(),
            source: config.name.clone(),
        })
    }

    fn attribute<'a>(&'a self, field: &'a str) -> &'a str {
        self.attributes.get(field)
    }

    /// `/patients?page=1`, before [`with_filter`] puts the page size and filter on it.
    fn first_page(&self) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("patients");
        }
        url.query_pairs_mut().append_pair("page", "1");
        url
    }

    /// GET with both mandatory headers; only ever GET (a PracticeHub key can delete data).
    /// The body, once the status says it is an answer, and the server's `Date`.
    async fn get(&self, url: Url) -> Result<(Vec<u8>, Option<DateTime<Utc>>), SourceError> {
        self.endpoint
            .get_reply(self.request(url), |reply| {
                read_answer(reply.status, &reply.body, reply.retry_after)
                    .map(|()| (reply.body.to_vec(), reply.date))
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

    /// Whether `full_scan_schedule` fired after the last full listing started (or none ever
    /// completed).
    fn full_scan_due(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        let Some(schedule) = &self.full_scan_schedule else {
            return false;
        };
        match last {
            None => true,
            Some(last) => crate::schedule::next_after(schedule, last).is_some_and(|due| due <= now),
        }
    }
}

/// `url` with PracticeHub's page size and, when there is one, the listing's filter, whatever
/// of either it carried replaced: the documented `links.next` may carry `?page=N` alone.
fn with_filter(mut url: Url, filter: Option<(&str, &Stamp)>) -> Url {
    let attribute = filter.map(|(attribute, _)| attribute);
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| key != "page_size" && Some(key.as_ref()) != attribute)
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    {
        let mut query = url.query_pairs_mut();
        query.clear().extend_pairs(kept);
        query.append_pair("page_size", &PAGE_SIZE.to_string());
        if let Some((attribute, mark)) = filter {
            query.append_pair(attribute, &format!("gte:{}", mark.render()));
        }
    }
    url
}

impl PracticeHub {
    /// `GET /patients?page_size=10`: one authenticated read for `check-config --connect`, and
    /// what its rows say about the naming.
    async fn probe_with_naming(&self) -> (Probe, Vec<String>) {
        let mut url = super::probe_url(&self.base, "patients");
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(pairs.into_iter().map(|(k, v)| {
                if k == "page_size" {
                    (k, PROBE_PAGE_SIZE.to_string())
                } else {
                    (k, v)
                }
            }));
        let mut notes = Vec::new();
        let answered = url.clone();
        let probe = self
            .endpoint
            .probe(self.request(url), |status, body| {
                read_answer(status, body, None)?;
                if let Ok((rows, _)) =
                    self.read_listing(body, &answered, "the probe", &self.attributes)
                {
                    let names = self.decide_naming(&rows, &BTreeMap::new());
                    let naive = rows
                        .iter()
                        .find_map(|r| r.read.as_ref().ok().and_then(|r| r.stamp))
                        .map(|s| s.is_naive());
                    notes.push(self.describe_naming(&names, naive));
                }
                Ok(())
            })
            .await;
        (probe, notes)
    }

    /// The naming a page's rows carry for each field the config does not name: the name more
    /// rows carry, `current` where no row carries either.
    fn decide_naming(
        &self,
        rows: &[Row],
        current: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut chosen = current.clone();
        for (field, documented, live) in NAMINGS {
            if self.attributes.is_overridden(field) {
                chosen.remove(*field);
                continue;
            }
            let count = |name: &str| {
                rows.iter()
                    .filter(|row| row.naming.contains(&(*field, name)))
                    .count()
            };
            let (documented_rows, live_rows) = (count(documented), count(live));
            if documented_rows + live_rows == 0 {
                continue;
            }
            let name = if live_rows > documented_rows {
                live
            } else {
                documented
            };
            chosen.insert(field.to_string(), name.to_string());
        }
        chosen
    }

    /// The naming in words: `phone from "phone", updated from "updated_at" (…)`.
    fn describe_naming(&self, names: &BTreeMap<String, String>, naive: Option<bool>) -> String {
        let mut parts = Vec::new();
        let mut live = 0;
        for (field, documented, live_name) in NAMINGS {
            let (name, how) = if self.attributes.is_overridden(field) {
                (self.attribute(field).to_string(), " (configured)")
            } else {
                match names.get(*field) {
                    Some(name) => (name.clone(), ""),
                    None => (documented.to_string(), " (not seen yet)"),
                }
            };
            if name == *live_name {
                live += 1;
            }
            parts.push(format!("{field} from `{name}`{how}"));
        }
        let which = match live {
            0 => "the documented names",
            n if n == NAMINGS.len() => "the names live integrations see",
            _ => "a mix of both namings",
        };
        let times = match naive {
            Some(true) => format!(
                "; times are naive local times, read as {}",
                self.attributes.zone().name()
            ),
            Some(false) => "; times are RFC 3339".to_string(),
            None => String::new(),
        };
        format!("patients carry {which}: {}{times}", parts.join(", "))
    }

    /// Describes a saved cursor in words, for `status`.
    fn describe_cursor(cursor: &str) -> String {
        let Ok(at) = serde_json::from_str::<Cursor>(cursor) else {
            return "PracticeHub position unreadable: the next poll lists everything".to_string();
        };
        let updated = at.names.get("updated").map_or("updated", String::as_str);
        let mark = at.mark.as_deref().map(|m| {
            let shown = Stamp::parse(m).map_or_else(|| m.to_string(), |s| s.display());
            format!("{updated} ≥ {shown}")
        });
        let mut text = match (mark, at.next.is_some(), at.full) {
            (None, false, _) => "PracticeHub: first full listing not yet complete".to_string(),
            (None, true, _) => "PracticeHub first full listing in progress".to_string(),
            (Some(_), true, true) => "PracticeHub full scan in progress".to_string(),
            (Some(mark), true, false) => format!("PracticeHub listing {mark} in progress"),
            (Some(mark), false, _) => format!("PracticeHub {mark}"),
        };
        if let Some(full_at) = at.full_at {
            text.push_str(&format!(
                "; last full scan {}",
                full_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ));
        }
        if at.full_requested {
            text.push_str("; a full listing is due (--resync)");
        }
        text
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
        // A saved link that is not a URL cannot be resumed: the listing starts over.
        if at
            .next
            .as_deref()
            .is_some_and(|link| Url::parse(link).is_err())
        {
            at.next = None;
        }
        let fresh = at.next.is_none();
        if fresh {
            self.start_listing(&mut at);
        }
        let attributes = self.attributes.preferring(&at.names);
        let mark = if at.full {
            None
        } else {
            at.mark.as_deref().and_then(Stamp::parse)
        };
        let filter = mark.as_ref().map(|mark| (attributes.get("updated"), mark));
        let url = match at.next.as_deref().map(Url::parse) {
            Some(Ok(url)) if !self.same_origin(&url) => {
                return Err(SourceError::Permanent(format!(
                    "PracticeHub's next link points at another host ({}); refusing to send the key there",
                    url.host_str().unwrap_or("?")
                )));
            }
            Some(Ok(url)) => url,
            Some(Err(_)) | None => self.first_page(),
        };
        let url = with_filter(url, filter);
        let (body, date) = self.get(url.clone()).await?;
        let (rows, next_link) = self.read_listing(&body, &url, "a page", &attributes)?;
        if fresh {
            at.server_start = date;
            let names = self.decide_naming(&rows, &at.names);
            if names != at.names {
                let naive = rows
                    .iter()
                    .find_map(|r| r.read.as_ref().ok().and_then(|r| r.stamp))
                    .map(|s| s.is_naive());
                tracing::info!(
                    source = %self.source,
                    "PracticeHub {}; sync-daemon reads and filters by those.",
                    self.describe_naming(&names, naive)
                );
                at.names = names;
            }
        }
        self.check_rows(&mut at, &rows, mark.as_ref());
        let pass_complete = next_link.is_none();
        let next = if pass_complete {
            self.complete(at)
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

    /// Starts a listing: a full one for the first, when asked for (`--resync`), when the mark
    /// cannot be read, or when the full-scan schedule fired since the last full one.
    fn start_listing(&self, at: &mut Cursor) {
        let now = crate::clock::now();
        let readable_mark = at.mark.as_deref().and_then(Stamp::parse).is_some();
        let due = self.full_scan_due(at.full_at, now);
        at.full = !readable_mark || at.full_requested || due;
        if at.full && readable_mark {
            let why = if at.full_requested {
                "asked for by --resync"
            } else {
                "due by full_scan_schedule"
            };
            tracing::info!(source = %self.source, "This poll lists every PracticeHub patient ({why}): changes a filtered listing missed are found, vanished patients are seen.");
        }
        at.full_requested = false;
        at.started = Some(now);
        at.newest = None;
        at.server_start = None;
        at.undated = 0;
        at.ignored = false;
        at.full_gap = None;
    }

    /// Checks each row of a page against the filter (`mark`, as sent) and follows the listing's
    /// newest `updated`; a row without one is counted, never taken for either.
    fn check_rows(&self, at: &mut Cursor, rows: &[Row], mark: Option<&Stamp>) {
        let zone = self.attributes.zone();
        let mut newest = at.newest.as_deref().and_then(Stamp::parse);
        let mut ignored = false;
        for record in rows.iter().filter_map(|row| row.read.as_ref().ok()) {
            let Some(stamp) = record.stamp else {
                at.undated += 1;
                continue;
            };
            ignored |= mark.is_some_and(|mark| stamp.before(mark, zone));
            if newest.is_none_or(|n| stamp.after(&n, zone)) {
                newest = Some(stamp);
            }
        }
        // Kept as the server wrote it (whole seconds and all), so its form is the mark's.
        at.newest = newest.map(|n| match n {
            Stamp::Zoned(zoned) => zoned.to_rfc3339_opts(SecondsFormat::AutoSi, false),
            Stamp::Naive(naive) => naive.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
        });
        if ignored && !at.ignored {
            at.ignored = true;
            tracing::warn!(
                source = %self.source,
                "PracticeHub ignored the updated filter; this poll reads the whole patient list (unchanged patients are not sent)."
            );
            metrics::counter!(crate::metrics::FILTER_IGNORED, "source" => self.source.clone())
                .increment(1);
        }
    }

    /// The cursor a completed listing leaves: the next mark in the server's terms (the newest
    /// `updated` seen, at most the server's clock, minus the overlap; the old mark when the
    /// listing saw none), and the full-scan bookkeeping.
    fn complete(&self, at: Cursor) -> Cursor {
        let zone = self.attributes.zone();
        let overlap = TimeDelta::from_std(MARK_OVERLAP).expect("70 minutes fit a TimeDelta");
        let mark = match at.newest.as_deref().and_then(Stamp::parse) {
            Some(newest) => Some(newest.mark(at.server_start, overlap, zone).render()),
            None => at.mark.clone(),
        };
        if at.undated > 0 {
            let updated = at.names.get("updated").map_or("updated", String::as_str);
            tracing::warn!(
                source = %self.source,
                patients = at.undated,
                "{} PracticeHub patients have no readable `{updated}`: they are synced, but a filtered poll cannot see their changes; full scans (full_scan_schedule) do.",
                at.undated
            );
        }
        let (full_at, since_full, full_gap) = if at.full {
            (at.started, 0, Some(at.since_full.saturating_add(1)))
        } else {
            (at.full_at, at.since_full.saturating_add(1), None)
        };
        Cursor {
            mark,
            full_at,
            since_full,
            full_gap,
            names: at.names,
            ..Cursor::default()
        }
    }

    /// Reads a listing answered for `url`: the envelope must hold `data`; each row is cut down
    /// on its own; `links.next`, if any, is resolved against `url` (a relative link is a page
    /// of this listing, never "start over").
    fn read_listing(
        &self,
        body: &[u8],
        url: &Url,
        where_: &str,
        attributes: &Attributes,
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
                let (read, naming) = if raw.damaged {
                    (
                        Err("holds bytes that are not UTF-8".to_string()),
                        Vec::new(),
                    )
                } else {
                    match patient::cut_row(raw.text.get(), attributes) {
                        Ok((record, naming)) => (Ok(record), naming),
                        Err(problem) => (Err(problem), Vec::new()),
                    }
                };
                let digest = read
                    .as_ref()
                    .map_or(true, |record| record.id.is_none())
                    .then(|| raw.digest());
                Row {
                    place: format!("patient {} of {where_}", i + 1),
                    digest,
                    read,
                    naming,
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
        let (body, _) = self.get(url.clone()).await?;
        let (rows, _) =
            self.read_listing(&body, &url, "the answer to a push fetch", &self.attributes)?;
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
        Box::pin(async move { self.probe_with_naming().await.0 })
    }

    /// The probe, and the naming and time form its rows show.
    fn probe_details(&self) -> BoxFuture<'_, (Probe, Vec<String>)> {
        Box::pin(self.probe_with_naming())
    }

    /// The next listing reads every patient (no filter), wherever the saved one stood; the
    /// mark, the naming and the full-scan bookkeeping are kept.
    fn full_listing(&self, cursor: &str) -> String {
        let at: Cursor = serde_json::from_str(cursor).unwrap_or_default();
        render(&Cursor {
            full_requested: true,
            mark: at.mark,
            full_at: at.full_at,
            since_full: at.since_full,
            names: at.names,
            ..Cursor::default()
        })
    }

    fn completed_full_scan(&self, cursor: &str) -> bool {
        serde_json::from_str::<Cursor>(cursor).is_ok_and(|c| c.full_gap.is_some())
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
                    row.digest(),
                    format!("{} {problem}", row.place),
                    "the row is read again on every poll; check the patient in PracticeHub",
                );
            }
        };
        let Some(external_id) = record.id.clone() else {
            return super::unreadable(
                None,
                row.digest(),
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
            patient::cut_row(&value.to_string(), &self.attributes)
                .expect("a patient")
                .0
        }

        /// A listed patient as the poll loop hands it to `map`.
        fn row(&self, value: &Value) -> Record {
            Record::new(Row {
                place: "patient 1 of a page".to_string(),
                digest: None,
                read: Ok(self.record(value)),
                naming: Vec::new(),
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
    fn every_page_carries_the_filter_in_the_servers_form_and_next_links_must_stay_on_the_host() {
        let hub = adapter("");
        let zoned = Stamp::parse("2025-02-01T00:00:00Z").expect("time");
        assert_eq!(
            with_filter(hub.first_page(), Some(("updated", &zoned))).as_str(),
            "https://bayside.neptune.practicehub.io/api/patients?page=1&page_size=100&updated=gte%3A2025-02-01T00%3A00%3A00%2B00%3A00"
        );
        // A `links.next` with `?page=N` alone gets the page size and the filter back; one
        // that carries them gets ours instead, other parameters kept.
        let naive = Stamp::parse("2025-02-01 00:00:00").expect("time");
        let page_only =
            Url::parse("https://bayside.neptune.practicehub.io/api/patients?page=2").expect("url");
        assert_eq!(
            with_filter(page_only, Some(("updated_at", &naive))).as_str(),
            "https://bayside.neptune.practicehub.io/api/patients?page=2&page_size=100&updated_at=gte%3A2025-02-01+00%3A00%3A00"
        );
        let echoed = Url::parse(
            "https://bayside.neptune.practicehub.io/api/patients?page=3&page_size=20&updated_at=gte:2020-01-01&x=1",
        )
        .expect("url");
        assert_eq!(
            with_filter(echoed, Some(("updated_at", &naive))).as_str(),
            "https://bayside.neptune.practicehub.io/api/patients?page=3&x=1&page_size=100&updated_at=gte%3A2025-02-01+00%3A00%3A00"
        );
        assert!(hub.same_origin(
            &Url::parse("https://bayside.neptune.practicehub.io/api/patients?page=2").expect("url")
        ));
        assert!(
            !hub.same_origin(&Url::parse("https://evil.example/api/patients?page=2").expect("url"))
        );
    }

    /// A live key's row (the names public integrations read), with PHI in every other
    /// attribute.
    fn live_patient(id: i64, updated: Value) -> Value {
        serde_json::json!({
            "id": id, "patient_number": "P1", "first_name": "Ada", "last_name": "Byron",
            "email": "ada@example.co.uk", "phone": "07911 123456", "sex": "PHI-SEX",
            "dob": "1815-12-10", "medical_insurance": "PHI-INSURER", "total_balance": 12.5,
            "last_apt": "2025-01-01 09:00:00", "next_apt": null,
            "created_at": "2024-01-01 09:00:00", "updated_at": updated,
            "address_num": "PHI-NUM", "address_str": "PHI-STREET"
        })
    }

    /// Rows of a page as the adapter reads them.
    fn rows(hub: &PracticeHub, values: &[Value]) -> Vec<Row> {
        let body = serde_json::json!({ "data": values }).to_string();
        let url =
            Url::parse("https://bayside.neptune.practicehub.io/api/patients?page=1").expect("URL");
        hub.read_listing(body.as_bytes(), &url, "a page", &hub.attributes)
            .expect("a listing")
            .0
    }

    #[test]
    fn either_naming_is_read_and_the_rows_decide_which_one_is_used() {
        let hub = adapter("");
        let live = rows(
            &hub,
            &[
                live_patient(1, "2025-07-01 12:00:00".into()),
                live_patient(2, Value::Null),
            ],
        );
        let record = live[0].read.as_ref().expect("read");
        assert_eq!(record.phone.as_deref(), Some("07911 123456"));
        assert_eq!(
            record.updated.map(|t| t.to_rfc3339()),
            Some("2025-07-01T11:00:00+00:00".to_string()),
            "a naive time is London's"
        );
        assert!(!format!("{record:?}").contains("PHI"));
        let names = hub.decide_naming(&live, &BTreeMap::new());
        assert_eq!(
            names,
            BTreeMap::from([
                ("created".to_string(), "created_at".to_string()),
                ("phone".to_string(), "phone".to_string()),
                ("updated".to_string(), "updated_at".to_string()),
            ])
        );
        assert_eq!(
            hub.attributes.preferring(&names).get("updated"),
            "updated_at"
        );
        assert!(hub.describe_naming(&names, Some(true)).contains(
            "the names live integrations see: phone from `phone`, updated from `updated_at`"
        ));
        // The documented rows switch it back; a page without patients changes nothing.
        let documented = rows(&hub, &[patient()]);
        assert_eq!(hub.decide_naming(&documented, &names)["updated"], "updated");
        assert_eq!(hub.decide_naming(&[], &names), names);
        // `[sources.fields]` wins: a configured field is never decided by the rows.
        let configured = adapter("[sources.fields]\nupdated = 'modified_at'\n");
        let decided = configured.decide_naming(
            &rows(&configured, &[live_patient(1, Value::Null)]),
            &BTreeMap::new(),
        );
        assert!(!decided.contains_key("updated"), "{decided:?}");
        assert_eq!(
            configured.attributes.preferring(&decided).get("updated"),
            "modified_at"
        );
    }

    #[test]
    fn the_filter_warning_compares_at_the_precision_sent_and_undated_rows_are_counted_apart() {
        let hub = adapter("");
        let mark = Stamp::parse("2025-02-01 10:00:00").expect("mark");
        let mut at = Cursor::default();
        // Within the mark's second, and without an `updated`: neither is the filter ignored.
        let page = rows(
            &hub,
            &[
                live_patient(1, "2025-02-01 10:00:00.400".into()),
                live_patient(2, Value::Null),
                live_patient(3, "2025-02-01 10:05:00".into()),
            ],
        );
        hub.check_rows(&mut at, &page, Some(&mark));
        assert!(!at.ignored);
        assert_eq!(at.undated, 1);
        assert_eq!(at.newest.as_deref(), Some("2025-02-01 10:05:00"));
        // A row from before the mark: the server ignored it.
        let page = rows(&hub, &[live_patient(4, "2025-02-01 09:59:59".into())]);
        hub.check_rows(&mut at, &page, Some(&mark));
        assert!(at.ignored);
        assert_eq!(at.newest.as_deref(), Some("2025-02-01 10:05:00"));
    }

    #[test]
    fn a_completed_listing_leaves_a_mark_in_the_servers_clock_and_form() {
        let hub = adapter("");
        let server_start = DateTime::parse_from_rfc3339("2025-02-01T11:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let at = Cursor {
            mark: Some("2025-01-31 00:00:00".into()),
            newest: Some("2025-02-01 10:05:00.900".into()),
            server_start: Some(server_start),
            started: Some(server_start - TimeDelta::days(400)),
            ..Cursor::default()
        };
        let next = hub.complete(at.clone());
        assert_eq!(next.mark.as_deref(), Some("2025-02-01 08:55:00"));
        assert_eq!((next.since_full, next.full_gap), (1, None));
        // Nothing seen: the mark stays.
        let quiet = hub.complete(Cursor {
            newest: None,
            ..at.clone()
        });
        assert_eq!(quiet.mark.as_deref(), Some("2025-01-31 00:00:00"));
        // A full listing records when it started and how far back the previous full one was.
        let full = hub.complete(Cursor {
            full: true,
            since_full: 4,
            ..at
        });
        assert_eq!(full.full_gap, Some(5));
        assert_eq!(full.since_full, 0);
        assert_eq!(full.full_at, Some(server_start - TimeDelta::days(400)));
        assert!(hub.completed_full_scan(&render(&full)));
    }

    #[test]
    fn an_older_cursor_stays_readable_and_a_full_listing_is_due_by_schedule_or_resync() {
        let hub = adapter("");
        let old = r#"{"mark":"2025-02-01T10:00:00.123456789Z","started":null,"next":null}"#;
        assert!(!hub.mid_listing(old));
        assert!(
            PracticeHub::describe_cursor(old).contains("updated ≥ 2025-02-01T10:00:00Z"),
            "{}",
            PracticeHub::describe_cursor(old)
        );
        // No full scan recorded: the first listing after an upgrade reads everything.
        let mut at: Cursor = serde_json::from_str(old).expect("readable");
        hub.start_listing(&mut at);
        assert!(at.full);
        // After a full scan, the next one waits for the schedule (03:30 UTC).
        let now = crate::clock::now();
        assert!(!hub.full_scan_due(Some(now), now));
        assert!(hub.full_scan_due(Some(now - TimeDelta::days(1)), now));
        let off = adapter("full_scan_schedule = 'off'\n");
        assert!(!off.full_scan_due(None, now));
        // --resync: the next listing is full, whatever the saved one was doing.
        let mut at: Cursor = serde_json::from_str(&hub.full_listing(
            r#"{"mark":"2025-02-01 08:00:00","next":"https://bayside.neptune.practicehub.io/api/patients?page=4","full_at":"2026-01-01T03:30:00Z","names":{"updated":"updated_at"}}"#,
        ))
        .expect("cursor");
        assert!(at.next.is_none() && at.full_requested);
        assert_eq!(at.names["updated"], "updated_at");
        at.full_at = Some(now);
        hub.start_listing(&mut at);
        assert!(at.full && !at.full_requested);
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
            match adapter.read_listing(&body, &url, "the first page", &adapter.attributes) {
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
