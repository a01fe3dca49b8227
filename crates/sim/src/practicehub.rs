//! Simulator of the PracticeHub patient API (`shared/api/practicehub.md`): the two required
//! headers (`x-practicehub-key`, `x-app-details: name=email`), `GET /api/patients` with
//! `total_entries`, `data` and absolute `links` (`next`/`previous` only when relevant, every query
//! parameter but `page` kept), `?attribute=op:value` filters that are **silently ignored** when
//! invalid, the documented `?updated=<timestamp>` poll form, and 429 with `Retry-After` when a
//! client bursts. Generated patients carry the quirks the daemon must cope with: a
//! `patient_number` that is sometimes a JSON number, null names and emails, UK phones in many
//! formats, an HTML clinical note (PHI), and `deleted` as a bool or as 0/1.
//!
//! Where it deliberately differs or has to guess: the rate limit is undocumented upstream, so
//! 3 rps / burst 5 is our reading of "~350 ms spacing avoids it"; rows come in id order although
//! the API promises no order; filters on one attribute repeated (`updated=gte:a&updated=lte:b`)
//! all apply, where the real server's parameter parsing may keep only the last; comparisons
//! follow SQL (a null matches only `null`, not even `ne`; `like` is case-sensitive with `%` and
//! `_`); a bad `page`/`page_size` falls back to the default, in keeping with the API's leniency;
//! unknown paths answer 404 before the headers are checked; `soft_delete` writes `deleted: true`
//! even on a patient whose flag was 0/1. [`PracticeHubSim::set_ignore_filters`] turns the
//! simulator into a server that supports no filter at all.
//! Generated mobiles are valid UK ranges rather than Ofcom's 07700 900xxx drama range, which
//! libphonenumber rejects, and generated timestamps lie in the year before a fixed instant
//! (2026-01-01) so a seed gives the same data on any day.
//!
//! **The live variant** ([`PracticeHubOptions::live`], [`PracticeHubSim::set_live`],
//! `PUT /_sim/variant`, `sync-daemon sim --practicehub-live`) is the API as public code that
//! calls the real one sees it (the doc's "Newer evidence" and "Timestamps, clocks and links"):
//! patients carry `id, patient_number, first_name, last_name, email, phone, sex, dob,
//! medical_insurance, total_balance, last_apt, next_apt, created_at, updated_at, address_num,
//! address_str`; times are naive `YYYY-MM-DD HH:MM:SS` in the clinic's time zone
//! ([`PracticeHubOptions::timezone`], Europe/London), compared as such (so they jump back an
//! hour in October); filters name those attributes (`updated_at=gte:…`; `updated` is unknown,
//! so silently ignored); and `links` carry `?page=N` alone, the caller's filters dropped.
//! Switch it before seeding: seeding generates the variant's shape, and stored patients are
//! served as stored. Independently, [`PracticeHubSim::set_clock_offset`] runs the server's
//! clock ahead of (or behind) this host's: it moves the stamps changes get and the `Date`
//! header every answer carries.

use std::cmp::Ordering;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering as AtomicOrdering};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::put;
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::source::{
    self, GENERATED_UNTIL_SECS, Outcome, Source, SourceCore, SourceRequest, SourceStats,
    capitalized, email_part, injected, listing_body, message, page_of, pick, query_pairs,
    raw_json_response, record_rng, write_json,
};
use super::{Faults, NextLinkFault, SimServer, dropped_connection, retry_after_secs};

/// Settings a [`PracticeHubSim`] starts with; all can be changed later.
#[derive(Clone, Debug)]
pub struct PracticeHubOptions {
    /// The key requests must send in `x-practicehub-key`.
    pub api_key: String,
    /// Sustained requests per second before 429s; 0 is unlimited.
    pub requests_per_second: u32,
    /// Requests allowed at once before the sustained rate applies.
    pub burst: u32,
    /// Serve the live variant (see the module documentation) instead of the documented shapes.
    pub live: bool,
    /// Seconds the server's clock runs ahead of this host's (negative: behind).
    pub clock_offset_secs: i64,
    /// The clinic's time zone: what the live variant's naive times are local to.
    pub timezone: Tz,
}

impl Default for PracticeHubOptions {
    fn default() -> Self {
        PracticeHubOptions {
            api_key: "practicehub_sim_key".to_owned(),
            requests_per_second: 3,
            burst: 5,
            live: false,
            clock_offset_secs: 0,
            timezone: chrono_tz::Europe::London,
        }
    }
}

/// The most rows a page holds; larger `page_size` values are clamped to it.
const MAX_PAGE_SIZE: u64 = 100;

/// The one API path.
const PATIENTS_PATH: &str = "/api/patients";

/// Handle to a simulated PracticeHub clinic; clones share state.
#[derive(Clone)]
pub struct PracticeHubSim {
    inner: Arc<Inner>,
}

struct Inner {
    core: SourceCore<PracticeHubSim>,
    ignore_filters: AtomicBool,
    live: AtomicBool,
    clock_offset_secs: AtomicI64,
    timezone: Tz,
}

/// How the server writes and compares times: the documented RFC 3339 in UTC, or the live
/// variant's naive local times in the clinic's zone.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Times {
    Utc,
    Local(Tz),
}

impl PracticeHubSim {
    /// A clinic with no patients; call [`PracticeHubSim::seed`] or [`PracticeHubSim::put_patient`].
    pub fn new(options: PracticeHubOptions) -> Self {
        PracticeHubSim {
            inner: Arc::new(Inner {
                core: SourceCore::new(options.api_key, options.requests_per_second, options.burst),
                ignore_filters: AtomicBool::new(false),
                live: AtomicBool::new(options.live),
                clock_offset_secs: AtomicI64::new(options.clock_offset_secs),
                timezone: options.timezone,
            }),
        }
    }

    /// `/api/patients` plus the `/_sim` control surface (outside `/api`).
    pub fn router(&self) -> Router {
        let extra = Router::new()
            .route("/ignore-filters", put(sim_ignore_filters))
            .route("/variant", put(sim_variant));
        source::router(self, extra)
    }

    /// Serves [`PracticeHubSim::router`] on `addr` (port 0 picks a free one); the base URL to
    /// configure is the server's URL plus `/api`.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SimServer> {
        SimServer::spawn(self.router(), addr).await
    }

    /// Replaces the injected faults (the Wodify- and RevKeen-only ones do not apply here).
    pub fn set_faults(&self, faults: Faults) {
        self.core().set_faults(faults);
    }

    /// Changes the key requests must send.
    pub fn set_api_key(&self, key: &str) {
        self.core().set_api_key(key);
    }

    /// Changes the rate limit (0 = unlimited); the bucket starts full.
    pub fn set_rate_limit(&self, requests_per_second: u32, burst: u32) {
        self.core().set_rate_limit(requests_per_second, burst);
    }

    /// When on, every filter is treated as invalid and every query returns the whole table:
    /// what a server that does not support a filter the daemon relies on looks like.
    pub fn set_ignore_filters(&self, ignore: bool) {
        self.inner
            .ignore_filters
            .store(ignore, AtomicOrdering::Relaxed);
    }

    /// Serves the live variant (see the module documentation) when on, the documented shapes
    /// when off. Patients already stored are served as stored: switch before seeding.
    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, AtomicOrdering::Relaxed);
    }

    /// Whether the live variant is on.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(AtomicOrdering::Relaxed)
    }

    /// Runs the server's clock `secs` ahead of this host's (negative: behind): the stamps of
    /// changes and every answer's `Date` header follow it.
    pub fn set_clock_offset(&self, secs: i64) {
        self.inner
            .clock_offset_secs
            .store(secs, AtomicOrdering::Relaxed);
    }

    /// Now on the server's clock.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::seconds(self.inner.clock_offset_secs.load(AtomicOrdering::Relaxed))
    }

    /// The clinic's time zone.
    pub fn timezone(&self) -> Tz {
        self.inner.timezone
    }

    /// `instant` as this server writes times: RFC 3339 UTC, or naive local time in the live
    /// variant (what a test puts into a patient it stores).
    pub fn format_time(&self, instant: DateTime<Utc>) -> String {
        format_time(self.times(), instant)
    }

    /// A time this server wrote (either form), as an instant.
    pub fn parse_time(&self, text: &str) -> Option<DateTime<Utc>> {
        parse_time(self.times(), text)
    }

    fn times(&self) -> Times {
        if self.is_live() {
            Times::Local(self.inner.timezone)
        } else {
            Times::Utc
        }
    }

    /// Replaces all patients by `count` generated ones with ids `1..=count`, in the shape of
    /// the variant in force.
    pub fn seed(&self, count: usize, seed: u64) {
        self.core().seed(count, seed);
        if self.is_live() {
            let zone = self.inner.timezone;
            let mut shared = self.core().lock();
            for (id, patient) in shared.records.iter_mut() {
                *patient = live_patient(patient, *id, seed, zone);
            }
        }
    }

    /// All patients, sorted by id.
    pub fn patients(&self) -> Vec<Value> {
        self.core().records()
    }

    /// One patient.
    pub fn patient(&self, id: i64) -> Option<Value> {
        self.core().record(id)
    }

    /// Inserts or replaces the patient with the same integer `"id"`, stored as given. A value
    /// without one cannot be stored and is dropped with a warning.
    pub fn put_patient(&self, patient: Value) {
        self.core().put(patient);
    }

    /// Merges the top-level keys of `patch` into patient `id` and sets `updated` (`updated_at`
    /// where the patient has that) to now on the server's clock, or one second after its
    /// previous value if that is not earlier than now, so a cursor on it always sees the
    /// change; in the patient's own time format. False if absent or `patch` is not an object.
    pub fn update_patient(&self, id: i64, patch: Value) -> bool {
        self.patch_record(id, patch).is_some()
    }

    /// Removes patient `id` outright, as a clinic that purges records would; false if absent.
    pub fn remove_patient(&self, id: i64) -> bool {
        self.core().remove(id)
    }

    /// Marks patient `id` deleted (`deleted: true`) and bumps `updated` as
    /// [`PracticeHubSim::update_patient`] does. False if absent.
    pub fn soft_delete(&self, id: i64) -> bool {
        self.update_patient(id, json!({"deleted": true}))
    }

    /// The API requests served, oldest first.
    pub fn requests(&self) -> Vec<SourceRequest> {
        self.core().requests()
    }

    /// Counters over the API requests served.
    pub fn stats(&self) -> SourceStats {
        self.core().stats()
    }

    /// Forgets the request log and zeroes the stats.
    pub fn clear_log(&self) {
        self.core().clear_log();
    }

    /// One page of patients matching the valid filters, with links to its neighbours and the
    /// `next_link`, `inject`, `inject_raw` and `deep_nesting` faults applied.
    fn list(&self, uri: &Uri, host: &str, faults: &Faults) -> Response {
        // Like the real server, be lenient: a malformed query string or paging value falls
        // back to the defaults instead of failing.
        let pairs = query_pairs(uri).unwrap_or_default();
        let number = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .and_then(|(_, value)| value.trim().parse::<u64>().ok())
                .filter(|value| *value >= 1)
        };
        let page = number("page").unwrap_or(1);
        let page_size = number("page_size")
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE);

        let (live, times) = (self.is_live(), self.times());
        let filters: Vec<Filter> = if self.inner.ignore_filters.load(AtomicOrdering::Relaxed) {
            Vec::new()
        } else {
            pairs
                .iter()
                .filter_map(|(key, value)| Filter::parse(key, value, live, times))
                .collect()
        };
        let shared = self.core().lock();
        let matching: Vec<&Value> = shared
            .records
            .values()
            .filter(|patient| filters.iter().all(|filter| filter.matches(patient, times)))
            .collect();
        let total = matching.len();
        let (data, has_next) = page_of(&matching, page, page_size);
        let data: Vec<Value> = data.iter().map(|p| (*p).clone()).collect();
        drop(shared);

        let kept: Vec<&str> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|segment| !segment.is_empty())
            .filter(|segment| segment.split('=').next() != Some("page"))
            .collect();
        let link = |page: u64| {
            let mut url = match faults.next_link {
                Some(NextLinkFault::Relative) => format!("?page={page}"),
                _ => format!("http://{host}{PATIENTS_PATH}?page={page}"),
            };
            // The live variant's links carry `?page=N` alone, as the documented examples do.
            if faults.next_link != Some(NextLinkFault::PageOnly) && !live {
                for segment in &kept {
                    url.push('&');
                    url.push_str(segment);
                }
            }
            Value::String(url)
        };
        let next = match faults.next_link {
            Some(NextLinkFault::SelfLink) => has_next.then_some(page),
            Some(NextLinkFault::Cycle) if page == 1 => Some(if has_next { 2 } else { 1 }),
            Some(NextLinkFault::Cycle) if page == 2 => Some(1),
            _ => has_next.then_some(page + 1),
        };
        let mut links = Map::new();
        links.insert("self".to_owned(), link(page));
        if page > 1 {
            links.insert("previous".to_owned(), link(page - 1));
        }
        if let Some(next) = next {
            links.insert("next".to_owned(), link(next));
        }

        let raw = if page == 1 {
            injected(faults)
        } else {
            Vec::new()
        };
        let history = faults.deep_nesting.then(deeply_nested);
        let members = [
            ("links", Value::Object(links)),
            ("total_entries", Value::from(total)),
        ];
        let body = listing_body("data", &data, &raw, &members, |out, patient| {
            match (&history, patient) {
                (Some(history), Value::Object(object)) => {
                    let mut patient = object.clone();
                    patient.insert("custom_history".to_owned(), history.clone());
                    write_json(out, &Value::Object(patient));
                }
                _ => write_json(out, patient),
            }
        });
        raw_json_response(StatusCode::OK, body)
    }
}

impl Source for PracticeHubSim {
    const SERVICE: &'static str = "PracticeHub";
    const RECORD: &'static str = "patient";
    const RECORDS: &'static str = "patients";
    const FIRST_ID: i64 = 1;
    /// The text of `updated` or `updated_at`, read in the server's time format when moved.
    type Stamp = String;

    fn generate(id: i64, seed: u64) -> Value {
        generate_patient(id, seed)
    }

    fn updated(patient: &Value) -> Option<String> {
        UPDATED_NAMES
            .iter()
            .find_map(|name| patient.get(*name).and_then(Value::as_str))
            .map(str::to_owned)
    }

    /// Sets `updated` to now (RFC 3339, this host's clock), or one second after `previous`
    /// if that is not earlier than now. The simulator itself moves stamps with
    /// [`PracticeHubSim::patch_record`], which follows its clock and variant.
    fn bump_updated(patient: &mut Map<String, Value>, previous: Option<String>) {
        let previous = previous.as_deref().and_then(parse_instant);
        let stamp = format_instant(bumped(Utc::now(), previous));
        patient.insert("updated".to_owned(), Value::String(stamp));
    }

    fn core(&self) -> &SourceCore<Self> {
        &self.inner.core
    }

    fn seed_records(&self, count: usize, seed: u64) {
        self.seed(count, seed);
    }

    /// Moves the stamp on the server's clock, in the patient's own attribute and format.
    fn patch_record(&self, id: i64, patch: Value) -> Option<Value> {
        let (now, times, live) = (self.now(), self.times(), self.is_live());
        self.core().update_with(id, patch, |patient, previous| {
            let name = match (
                patient.contains_key("updated_at"),
                patient.contains_key("updated"),
            ) {
                (true, _) => "updated_at",
                (false, true) => "updated",
                (false, false) if live => "updated_at",
                (false, false) => "updated",
            };
            // A naive stamp stays naive: the patient is in the live shape whatever the switch.
            let times = match (&previous, times) {
                (Some(text), Times::Utc) if is_naive(text) => Times::Local(self.inner.timezone),
                _ => times,
            };
            let previous = previous.as_deref().and_then(|text| parse_time(times, text));
            let stamp = format_time(times, bumped_local(times, now, previous));
            patient.insert(name.to_owned(), Value::String(stamp));
        })
    }

    fn delete(&self, id: i64) -> bool {
        self.soft_delete(id)
    }

    /// Runs one API request through routing, faults, headers, method, rate limit and latency;
    /// every answer carries `Date` on the server's clock.
    async fn answer(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> (Response, Outcome) {
        let (mut response, outcome) = self.answer_request(method, uri, headers).await;
        let date = self.now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        if let Ok(date) = HeaderValue::from_str(&date) {
            response.headers_mut().insert(header::DATE, date);
        }
        (response, outcome)
    }
}

impl PracticeHubSim {
    async fn answer_request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> (Response, Outcome) {
        if uri.path() != PATIENTS_PATH {
            return (
                message(StatusCode::NOT_FOUND, "Not found"),
                Outcome::Answered,
            );
        }
        let presented = headers
            .get("x-practicehub-key")
            .and_then(|v| v.to_str().ok());
        let (faults, key_ok) = self.core().faults_and_key(presented);
        if Faults::roll(faults.error_rate) {
            let response = message(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error");
            return (response, Outcome::Error);
        }
        if Faults::roll(faults.rate_429) {
            let retry_after = faults.injected_retry_after(Some(HeaderValue::from(1u64)));
            return (too_many_requests(retry_after), Outcome::RateLimited);
        }
        if !key_ok {
            return (
                message(StatusCode::UNAUTHORIZED, "Invalid API key"),
                Outcome::AuthFailure,
            );
        }
        if !headers
            .get("x-app-details")
            .and_then(|v| v.to_str().ok())
            .is_some_and(valid_app_details)
        {
            let response = message(
                StatusCode::BAD_REQUEST,
                "x-app-details header is required: <appname>=<contact email>",
            );
            return (response, Outcome::Answered);
        }
        if method != Method::GET {
            let mut response = message(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("Method {method} not allowed; the simulator serves GET only"),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return (response, Outcome::Answered);
        }
        if let Err(wait) = self.core().check_rate() {
            let retry_after = HeaderValue::from(retry_after_secs(wait));
            return (too_many_requests(Some(retry_after)), Outcome::RateLimited);
        }
        faults.delay().await;
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("127.0.0.1");
        let response = self.list(uri, host, &faults);
        if Faults::roll(faults.drop_rate) {
            return (dropped_connection(), Outcome::Dropped);
        }
        (response, Outcome::Answered)
    }
}

/// `name=email` with both parts present and something email-like on the right.
fn valid_app_details(value: &str) -> bool {
    let Some((name, email)) = value.split_once('=') else {
        return false;
    };
    let email = email.trim();
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !name.trim().is_empty() && !local.is_empty() && !domain.is_empty() && !domain.contains('@')
}

/// A 429, with `Retry-After` when one is given (always, unless a fault's value was unusable).
fn too_many_requests(retry_after: Option<HeaderValue>) -> Response {
    let mut response = message(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

/// Arrays nested around the `1` of the `deep_nesting` fault's `custom_history`.
const DEEP_NESTING_LEVELS: usize = 200;

/// `[[[…1…]]]`, [`DEEP_NESTING_LEVELS`] arrays deep.
fn deeply_nested() -> Value {
    (0..DEEP_NESTING_LEVELS).fold(json!(1), |inner, _| Value::Array(vec![inner]))
}

/// An instant as the API writes it: RFC 3339, UTC, whole seconds, `+00:00`.
fn format_instant(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

/// An instant in any form a client may send: RFC 3339 (`Z` or an offset), naive (read as
/// UTC, `T` or a space between date and time, optional fraction) or a bare date (midnight
/// UTC).
fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Some(instant.with_timezone(&Utc));
    }
    parse_naive(text).map(|naive| naive.and_utc())
}

/// A naive date and time (`T` or a space between them, optional fraction) or a bare date.
fn parse_naive(text: &str) -> Option<NaiveDateTime> {
    let text = text.trim();
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|date| date.and_hms_opt(0, 0, 0))
        })
}

/// Whether a time is written without a zone.
fn is_naive(text: &str) -> bool {
    DateTime::parse_from_rfc3339(text.trim()).is_err() && parse_naive(text).is_some()
}

/// A time as a server with `times` compares it: UTC, or the wall clock in the clinic (an
/// RFC 3339 value is converted; a naive one is taken as written).
fn comparable(times: Times, text: &str) -> Option<NaiveDateTime> {
    match times {
        Times::Utc => parse_instant(text).map(|instant| instant.naive_utc()),
        Times::Local(zone) => match DateTime::parse_from_rfc3339(text.trim()) {
            Ok(instant) => Some(instant.with_timezone(&zone).naive_local()),
            Err(_) => parse_naive(text),
        },
    }
}

/// `instant` as a server with `times` writes it: RFC 3339 UTC, or naive local time.
fn format_time(times: Times, instant: DateTime<Utc>) -> String {
    match times {
        Times::Utc => format_instant(instant),
        Times::Local(zone) => instant
            .with_timezone(&zone)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
    }
}

/// A time a server with `times` wrote, as an instant (a naive local time in the hour the
/// clocks go back is its first occurrence; one in the hour they skip, an hour later).
fn parse_time(times: Times, text: &str) -> Option<DateTime<Utc>> {
    match times {
        Times::Utc => parse_instant(text),
        Times::Local(zone) => match DateTime::parse_from_rfc3339(text.trim()) {
            Ok(instant) => Some(instant.with_timezone(&Utc)),
            Err(_) => {
                let naive = parse_naive(text)?;
                zone.from_local_datetime(&naive)
                    .earliest()
                    .or_else(|| {
                        zone.from_local_datetime(&(naive + TimeDelta::hours(1)))
                            .earliest()
                    })
                    .map(|local| local.with_timezone(&Utc))
            }
        },
    }
}

/// `now`, whole seconds, but strictly after `previous`: a change must move `updated` forward
/// even twice within a second, or a `gte` cursor could still see it but a `gt` one would not.
fn bumped(now: DateTime<Utc>, previous: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let now = now - TimeDelta::nanoseconds(i64::from(now.timestamp_subsec_nanos()));
    match previous {
        Some(previous) if previous >= now => previous + TimeDelta::seconds(1),
        _ => now,
    }
}

/// [`bumped`] where "after" is judged as the server compares times (for naive local times,
/// on the wall clock).
fn bumped_local(
    times: Times,
    now: DateTime<Utc>,
    previous: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let wall = |instant: DateTime<Utc>| format_time(times, instant);
    let candidate = bumped(now, None);
    match previous {
        Some(previous)
            if comparable(times, &wall(previous)) >= comparable(times, &wall(candidate)) =>
        {
            previous + TimeDelta::seconds(1)
        }
        _ => candidate,
    }
}

/// What type an attribute's filter values are read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Integer,
    /// Compared as text; a JSON number (`patient_number`'s quirk) counts as its digits.
    Text,
    Instant,
    Date,
    /// `true`/`false` or `1`/`0`.
    Flag,
}

/// The attributes the `updated` stamp may be under, documented name first.
const UPDATED_NAMES: &[&str] = &["updated", "updated_at"];

/// The live variant's attributes (the doc's "Newer evidence"), and `deleted`, which
/// [`PracticeHubSim::soft_delete`] writes.
const LIVE_ATTRIBUTES: &[(&str, Kind)] = &[
    ("id", Kind::Integer),
    ("patient_number", Kind::Text),
    ("first_name", Kind::Text),
    ("last_name", Kind::Text),
    ("email", Kind::Text),
    ("phone", Kind::Text),
    ("sex", Kind::Text),
    ("dob", Kind::Date),
    ("medical_insurance", Kind::Text),
    ("last_apt", Kind::Instant),
    ("next_apt", Kind::Instant),
    ("created_at", Kind::Instant),
    ("updated_at", Kind::Instant),
    ("address_num", Kind::Text),
    ("address_str", Kind::Text),
    ("deleted", Kind::Flag),
];

const ATTRIBUTES: &[(&str, Kind)] = &[
    ("id", Kind::Integer),
    ("patient_number", Kind::Text),
    ("custom_reference", Kind::Text),
    ("first_name", Kind::Text),
    ("last_name", Kind::Text),
    ("email", Kind::Text),
    ("mobile", Kind::Text),
    ("home_phone", Kind::Text),
    ("note", Kind::Text),
    ("date_of_birth", Kind::Date),
    ("created", Kind::Instant),
    ("updated", Kind::Instant),
    ("deleted", Kind::Flag),
    ("active", Kind::Flag),
];

/// A filter operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    Null,
    NotNull,
    Like,
    In,
    NotIn,
    Between,
}

impl Op {
    fn parse(raw: &str) -> Option<Op> {
        Some(match raw {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "null" => Op::Null,
            "not-null" => Op::NotNull,
            "like" => Op::Like,
            "in" => Op::In,
            "not-in" => Op::NotIn,
            "between" => Op::Between,
            _ => return None,
        })
    }
}

/// A typed value: a filter operand or a patient's attribute read for comparison.
#[derive(Clone, Debug, PartialEq)]
enum Scalar {
    Integer(i64),
    Text(String),
    /// As the server compares times ([`comparable`]).
    Instant(NaiveDateTime),
    Date(NaiveDate),
    Flag(bool),
}

impl Scalar {
    /// A filter operand, or `None` if it does not parse (which makes the filter invalid).
    fn parse(kind: Kind, raw: &str, times: Times) -> Option<Scalar> {
        Some(match kind {
            Kind::Integer => Scalar::Integer(raw.trim().parse().ok()?),
            Kind::Text => Scalar::Text(raw.to_owned()),
            Kind::Instant => Scalar::Instant(comparable(times, raw)?),
            Kind::Date => Scalar::Date(NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d").ok()?),
            Kind::Flag => Scalar::Flag(match raw.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return None,
            }),
        })
    }

    /// A patient's attribute, or `None` if it is not of the attribute's type.
    fn read(kind: Kind, value: &Value, times: Times) -> Option<Scalar> {
        Some(match (kind, value) {
            (Kind::Integer, value) => Scalar::Integer(value.as_i64()?),
            (Kind::Text, Value::String(text)) => Scalar::Text(text.clone()),
            (Kind::Text, Value::Number(number)) => Scalar::Text(number.to_string()),
            (Kind::Instant, Value::String(text)) => Scalar::Instant(comparable(times, text)?),
            (Kind::Date, Value::String(text)) => {
                Scalar::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?)
            }
            (Kind::Flag, Value::Bool(flag)) => Scalar::Flag(*flag),
            (Kind::Flag, Value::Number(number)) => Scalar::Flag(number.as_i64()? != 0),
            _ => return None,
        })
    }

    fn compare(&self, other: &Scalar) -> Option<Ordering> {
        match (self, other) {
            (Scalar::Integer(a), Scalar::Integer(b)) => Some(a.cmp(b)),
            (Scalar::Text(a), Scalar::Text(b)) => Some(a.cmp(b)),
            (Scalar::Instant(a), Scalar::Instant(b)) => Some(a.cmp(b)),
            (Scalar::Date(a), Scalar::Date(b)) => Some(a.cmp(b)),
            (Scalar::Flag(a), Scalar::Flag(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

/// One valid `attribute=op:value` filter.
#[derive(Clone, Debug, PartialEq)]
struct Filter {
    attribute: &'static str,
    kind: Kind,
    op: Op,
    operands: Vec<Scalar>,
}

impl Filter {
    /// The filter a query parameter asks for, or `None` if it is not a valid one — which the
    /// API answers by ignoring it, not by an error.
    fn parse(key: &str, value: &str, live: bool, times: Times) -> Option<Filter> {
        let attributes = if live { LIVE_ATTRIBUTES } else { ATTRIBUTES };
        let &(attribute, kind) = attributes.iter().find(|(name, _)| *name == key)?;
        let with_op = value
            .split_once(':')
            .and_then(|(op, raw)| Some((Op::parse(op)?, raw)));
        let (op, raw) = match with_op {
            Some(with_op) => with_op,
            // `null`/`not-null` need no operand, so the colon is optional.
            None if matches!(value, "null" | "not-null") => (Op::parse(value)?, ""),
            // The documented poll form: `?updated=<timestamp>` means "new or updated since".
            None if UPDATED_NAMES.contains(&attribute) && comparable(times, value).is_some() => {
                (Op::Gte, value)
            }
            None => return None,
        };
        let list = || -> Option<Vec<Scalar>> {
            raw.split(',')
                .map(|item| Scalar::parse(kind, item, times))
                .collect()
        };
        let operands = match op {
            Op::Null | Op::NotNull => Vec::new(),
            Op::Like if kind == Kind::Text => vec![Scalar::Text(raw.to_owned())],
            Op::Like => return None,
            Op::In | Op::NotIn => list()?,
            Op::Between => {
                let operands = list()?;
                if operands.len() != 2 {
                    return None;
                }
                operands
            }
            _ => vec![Scalar::parse(kind, raw, times)?],
        };
        Some(Filter {
            attribute,
            kind,
            op,
            operands,
        })
    }

    fn matches(&self, patient: &Value, times: Times) -> bool {
        let raw = patient.get(self.attribute).filter(|value| !value.is_null());
        // Like SQL: a null (or a value of the wrong type) satisfies no comparison, not even ne.
        let value = raw.and_then(|raw| Scalar::read(self.kind, raw, times));
        let order = |operand: &Scalar| value.as_ref()?.compare(operand);
        let equals = |operand: &Scalar| order(operand) == Some(Ordering::Equal);
        let first = self.operands.first();
        match self.op {
            Op::Null => raw.is_none(),
            Op::NotNull => raw.is_some(),
            Op::Eq => first.is_some_and(equals),
            Op::Ne => first.is_some_and(|operand| order(operand).is_some_and(Ordering::is_ne)),
            Op::Gt => first.and_then(order) == Some(Ordering::Greater),
            Op::Gte => first.and_then(order).is_some_and(Ordering::is_ge),
            Op::Lt => first.and_then(order) == Some(Ordering::Less),
            Op::Lte => first.and_then(order).is_some_and(Ordering::is_le),
            Op::In => self.operands.iter().any(equals),
            // Every comparison must be possible (non-null, right type) and unequal.
            Op::NotIn => self
                .operands
                .iter()
                .all(|operand| order(operand).is_some_and(Ordering::is_ne)),
            Op::Between => match self.operands.as_slice() {
                [low, high] => {
                    order(low).is_some_and(Ordering::is_ge)
                        && order(high).is_some_and(Ordering::is_le)
                }
                _ => false,
            },
            Op::Like => match (value.as_ref(), first) {
                (Some(Scalar::Text(text)), Some(Scalar::Text(pattern))) => like(text, pattern),
                _ => false,
            },
        }
    }
}

/// SQL `LIKE`: `%` matches any run of characters, `_` exactly one; case-sensitive.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    let (mut t, mut p) = (0, 0);
    // Where the last `%` was and how much text it had swallowed, to backtrack to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('%') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '_' || c == text[t] => {
                t += 1;
                p += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '%')
}

/// Body of `PUT /_sim/ignore-filters`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IgnoreFiltersBody {
    ignore: bool,
}

/// Body of `PUT /_sim/variant`: the live variant on or off, and the server clock's offset.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantBody {
    live: bool,
    #[serde(default)]
    clock_offset_secs: i64,
}

async fn sim_variant(
    State(sim): State<PracticeHubSim>,
    Json(body): Json<VariantBody>,
) -> StatusCode {
    sim.set_live(body.live);
    sim.set_clock_offset(body.clock_offset_secs);
    StatusCode::NO_CONTENT
}

async fn sim_ignore_filters(
    State(sim): State<PracticeHubSim>,
    Json(body): Json<IgnoreFiltersBody>,
) -> StatusCode {
    sim.set_ignore_filters(body.ignore);
    StatusCode::NO_CONTENT
}

#[rustfmt::skip]
const FIRST_NAMES: &[&str] = &[
    "Oliver", "Amelia", "George", "Isla", "Harry", "Ava", "Jack", "Mia", "Charlie", "Ivy",
    "Freddie", "Grace", "Alfie", "Sophie", "Thomas", "Emily", "Siobhan", "Niamh", "Rhys", "Ffion",
    "Aled", "Priya", "Mohammed", "Aisha", "Callum", "Eilidh", "Zoë", "Seán",
];

#[rustfmt::skip]
const LAST_NAMES: &[&str] = &[
    "Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Wilson", "Thomas",
    "Johnson", "Roberts", "Robinson", "Thompson", "Wright", "Walker", "White", "Edwards", "Hughes",
    "Green", "Hall", "O'Connor", "Macdonald", "Patel", "Khan", "Ahmed", "Fitzgerald-Hughes",
    "Ó Súilleabháin",
];

const NOTES: &[&str] = &[
    "<p>Lower back pain, referred by GP</p>",
    "<p>Left knee ACL reconstruction &ndash; week 6 rehab</p>",
    "<p>Neck stiffness after RTA. <strong>Check insurer details</strong></p>",
    "<p>Prefers morning appointments</p>",
    "<p>Plantar fasciitis, right foot</p><ul><li>orthotics fitted</li></ul>",
    "<p>Pregnant (28 weeks) &ndash; no prone positioning</p>",
    "<p>Allergic to latex</p>",
    "<p>Shoulder impingement; desk worker</p>",
    "<p>Migraine history. Hypertension &ndash; on amlodipine</p>",
    "",
];

/// The digits after `07` of a UK mobile in a range libphonenumber accepts (0740-0749 but not
/// 0745, 0771-0777, 0780/0781/0784-0789, 0790/0792/0794-0799).
fn uk_mobile_digits(rng: &mut fastrand::Rng) -> String {
    let prefix = *pick(
        rng,
        &[
            "40", "41", "42", "43", "44", "46", "47", "48", "49", "71", "72", "73", "74", "75",
            "76", "77", "80", "81", "84", "85", "86", "87", "88", "89", "90", "92", "94", "95",
            "96", "97", "98", "99",
        ],
    );
    format!("{prefix}{:07}", rng.u32(0..10_000_000))
}

fn uk_mobile(rng: &mut fastrand::Rng) -> String {
    // 9 digits after the 0 7 / +44 7: split as UK people write them, 7xxx xxxxxx.
    let digits = uk_mobile_digits(rng);
    let (head, tail) = digits.split_at(3);
    match rng.u8(0..8) {
        0 => format!("07{head} {tail}"),
        1 => format!("+44 7{head} {tail}"),
        2 => format!("07{digits}"),
        3 => format!("+447{digits}"),
        4 => format!("07{head} {} {}", &tail[..3], &tail[3..]),
        5 => format!("0044 7{head} {tail}"),
        6 => format!("+44 (0)7{head} {tail}"),
        _ => format!("(07{head}) {tail}"),
    }
}

/// A UK landline in a real geographic range.
fn uk_landline(rng: &mut fastrand::Rng) -> String {
    match rng.u8(0..4) {
        0 => format!("020 {} {:04}", rng.u16(7000..=8999), rng.u16(0..=9999)),
        1 => format!("0161 {} {:04}", rng.u16(200..=999), rng.u16(0..=9999)),
        2 => format!("0131 {} {:04}", rng.u16(200..=899), rng.u16(0..=9999)),
        _ => format!("0117 {} {:04}", rng.u16(900..=999), rng.u16(0..=9999)),
    }
}

/// One generated patient; the same `(id, seed)` always gives the same patient.
pub fn generate_patient(id: i64, seed: u64) -> Value {
    let rng = &mut record_rng(id, seed);
    let first = *pick(rng, FIRST_NAMES);
    let last = *pick(rng, LAST_NAMES);

    let patient_number = if rng.f64() < 0.1 {
        json!(id)
    } else {
        json!(format!("P{id:05}"))
    };
    let custom_reference = match rng.u8(0..10) {
        0..=2 => json!(format!("INS-{:06}", rng.u32(0..1_000_000))),
        3 => json!(format!("REF/{}", rng.u16(100..=9999))),
        _ => Value::Null,
    };
    let last_name = if rng.f64() < 0.02 {
        Value::Null
    } else {
        json!(last)
    };
    let email = match rng.f64() {
        roll if roll < 0.07 => Value::Null,
        roll if roll < 0.1 => json!(""),
        _ => {
            let (first, last) = (email_part(first), email_part(last));
            let domain = *pick(rng, &["example.co.uk", "example.com", "example.org"]);
            json!(match rng.f64() {
                roll if roll < 0.7 => format!("{first}.{last}{id}@{domain}"),
                roll if roll < 0.9 => format!(
                    "{}.{}{id}@{domain}",
                    capitalized(&first),
                    capitalized(&last)
                ),
                _ => format!("{first}.{last}{id}@{domain}").to_uppercase(),
            })
        }
    };
    let mobile = match rng.f64() {
        roll if roll < 0.1 => Value::Null,
        roll if roll < 0.12 => json!(*pick(rng, &["no mobile", "07700", "see notes", "n/a"])),
        _ => json!(uk_mobile(rng)),
    };
    let home_phone = if rng.f64() < 0.15 {
        json!(uk_landline(rng))
    } else {
        Value::Null
    };
    let date_of_birth = format!(
        "{}-{:02}-{:02}",
        rng.u16(1940..=2015),
        rng.u8(1..=12),
        rng.u8(1..=28)
    );
    const YEAR: i64 = 365 * 24 * 3600;
    let updated = GENERATED_UNTIL_SECS - rng.i64(1..YEAR);
    let created = updated - rng.i64(0..2 * YEAR);
    let instant = |secs: i64| {
        format_instant(
            DateTime::<Utc>::from_timestamp(secs, 0).expect("generated instants lie around 2025"),
        )
    };
    let is_deleted = rng.f64() < 0.02;
    let deleted = if rng.bool() {
        json!(i64::from(is_deleted))
    } else {
        json!(is_deleted)
    };

    json!({
        "id": id,
        "patient_number": patient_number,
        "custom_reference": custom_reference,
        "first_name": first,
        "last_name": last_name,
        "email": email,
        "mobile": mobile,
        "home_phone": home_phone,
        "note": *pick(rng, NOTES),
        "date_of_birth": date_of_birth,
        "created": instant(created),
        "updated": instant(updated),
        "deleted": deleted,
        "active": rng.f64() >= 0.03,
    })
}

#[rustfmt::skip]
const STREETS: &[&str] = &[
    "High Street", "Station Road", "Church Lane", "Victoria Road", "Mill Lane", "The Green",
    "Park Avenue", "Queen's Road", "Heol y Frenhines",
];

const INSURERS: &[&str] = &[
    "Bupa",
    "AXA Health",
    "Vitality",
    "Aviva",
    "WPA",
    "Simplyhealth",
];

/// A generated patient (documented shape) in the live variant's shape: the attributes public
/// code reads from a live key, times as naive local time in `zone`, and the PHI the live rows
/// carry (sex, date of birth, insurer, balance, appointments, address) generated from the same
/// `(id, seed)`. The documented-only attributes (`custom_reference`, `home_phone`, `note`,
/// `deleted`, `active`) are not part of it.
fn live_patient(documented: &Value, id: i64, seed: u64, zone: Tz) -> Value {
    let rng = &mut record_rng(id, seed ^ 0x6C69_7665);
    let field = |name: &str| documented.get(name).cloned().unwrap_or(Value::Null);
    let local = |name: &str| {
        documented
            .get(name)
            .and_then(Value::as_str)
            .and_then(parse_instant)
            .map_or(Value::Null, |instant| {
                Value::String(format_time(Times::Local(zone), instant))
            })
    };
    let appointment = |rng: &mut fastrand::Rng, days: std::ops::Range<i64>| {
        let secs = GENERATED_UNTIL_SECS + rng.i64(days) * 86_400 + rng.i64(8..18) * 3600;
        DateTime::<Utc>::from_timestamp(secs, 0).map_or(Value::Null, |at| {
            Value::String(format_time(Times::Local(zone), at))
        })
    };
    let insurance = if rng.f64() < 0.4 {
        json!(format!(
            "{} {:08}",
            pick(rng, INSURERS),
            rng.u32(0..100_000_000)
        ))
    } else {
        Value::Null
    };
    let next_apt = if rng.bool() {
        appointment(rng, 1..60)
    } else {
        Value::Null
    };
    json!({
        "id": id,
        "patient_number": field("patient_number"),
        "first_name": field("first_name"),
        "last_name": field("last_name"),
        "email": field("email"),
        "phone": field("mobile"),
        "sex": *pick(rng, &["M", "F", "U"]),
        "dob": field("date_of_birth"),
        "medical_insurance": insurance,
        "total_balance": f64::from(rng.u32(0..50_000)) / 100.0,
        "last_apt": appointment(rng, -300..0),
        "next_apt": next_apt,
        "created_at": local("created"),
        "updated_at": local("updated"),
        "address_num": rng.u16(1..300).to_string(),
        "address_str": *pick(rng, STREETS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::merge_top_level;
    use crate::source::testing::shared_control_routes;
    use crate::testing::{assert_dropped, send_json, send_status};
    use std::net::Ipv4Addr;

    const KEY: &str = "practicehub_sim_key";
    const APP: &str = "revkeen-sync=ops@clinic.example";

    fn unlimited() -> PracticeHubOptions {
        PracticeHubOptions {
            requests_per_second: 0,
            ..PracticeHubOptions::default()
        }
    }

    async fn start(options: PracticeHubOptions) -> (PracticeHubSim, SimServer) {
        let sim = PracticeHubSim::new(options);
        let server = sim
            .spawn(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind a loopback port");
        (sim, server)
    }

    /// GETs an absolute URL with both required headers.
    async fn fetch(url: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(url)
            .header("x-practicehub-key", KEY)
            .header("x-app-details", APP)
            .send()
            .await
            .expect("send request")
    }

    /// GETs `/api/patients` with `query` percent-encoded.
    async fn patients(server: &SimServer, query: &[(&str, &str)]) -> (u16, Value) {
        let base = format!("{}/api/patients", server.url());
        let url = reqwest::Url::parse_with_params(&base, query).expect("valid URL");
        let response = fetch(url.as_str()).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    async fn ids_for(server: &SimServer, query: &[(&str, &str)]) -> Vec<i64> {
        let (status, body) = patients(server, query).await;
        assert_eq!(status, 200, "{query:?}: {body}");
        ids(&body)
    }

    fn ids(body: &Value) -> Vec<i64> {
        body["data"]
            .as_array()
            .expect("data array")
            .iter()
            .map(|patient| patient["id"].as_i64().expect("integer id"))
            .collect()
    }

    /// Query parameters, unencoded.
    type Query<'a> = &'a [(&'a str, &'a str)];

    /// A generated patient with `fields` overridden.
    fn patient_with(id: i64, fields: Value) -> Value {
        let mut patient = generate_patient(id, 0);
        assert!(merge_top_level(&mut patient, fields));
        patient
    }

    fn updated(sim: &PracticeHubSim, id: i64) -> DateTime<Utc> {
        let patient = sim.patient(id).expect("patient");
        let text = patient["updated"].as_str().expect("updated string");
        DateTime::parse_from_rfc3339(text)
            .expect("RFC 3339")
            .with_timezone(&Utc)
    }

    #[tokio::test]
    async fn links_next_pages_to_the_end_keeping_filters() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(250, 5);
        let expected: Vec<i64> = sim
            .patients()
            .iter()
            .filter(|p| p["active"] == true)
            .map(|p| p["id"].as_i64().expect("id"))
            .collect();
        assert!(expected.len() > 200);

        let base = format!("{}/api/patients", server.url());
        let mut url = format!("{base}?page_size=40&active=eq:true");
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let body: Value = fetch(&url).await.json().await.expect("JSON");
            pages += 1;
            assert_eq!(body["total_entries"], expected.len());
            seen.extend(ids(&body));
            let links = &body["links"];
            assert!(links["self"].as_str().expect("self").starts_with(&base));
            assert_eq!(links.get("previous").is_some(), pages > 1, "{links}");
            match links.get("next").and_then(Value::as_str) {
                Some(next) => {
                    assert!(
                        next.starts_with(&format!("{base}?page={}", pages + 1)),
                        "{next}"
                    );
                    assert!(next.contains("&page_size=40") && next.contains("&active=eq:true"));
                    url = next.to_owned();
                }
                None => break,
            }
        }
        assert_eq!(pages, expected.len().div_ceil(40));
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn updated_gte_returns_rows_changed_since_in_any_instant_form() {
        let (sim, server) = start(unlimited()).await;
        for (id, stamp) in [
            (1, "2025-01-10T00:00:00+00:00"),
            (2, "2025-02-01T00:00:00+00:00"),
            (3, "2025-03-01T12:00:00+00:00"),
        ] {
            sim.put_patient(patient_with(id, json!({"updated": stamp})));
        }
        for cursor in [
            "gte:2025-02-01T00:00:00Z",
            "gte:2025-02-01T00:00:00+00:00",
            "gte:2025-02-01T01:00:00+01:00",
            "gte:2025-02-01T00:00:00",
            // The documented poll form: a bare timestamp means "new or updated since".
            "2025-02-01T00:00:00Z",
        ] {
            assert_eq!(
                ids_for(&server, &[("updated", cursor)]).await,
                vec![2, 3],
                "{cursor}"
            );
        }
        assert_eq!(
            ids_for(&server, &[("updated", "gt:2025-02-01T00:00:00Z")]).await,
            vec![3]
        );

        // An unencoded `+` arrives as a space, which no longer parses: the filter is dropped
        // and the whole table comes back, as upstream.
        let url = format!(
            "{}/api/patients?updated=gte:2025-02-01T00:00:00+00:00",
            server.url()
        );
        let body: Value = fetch(&url).await.json().await.expect("JSON");
        assert_eq!(ids(&body), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn filters_apply_each_documented_operator() {
        let (sim, server) = start(unlimited()).await;
        sim.put_patient(patient_with(
            1,
            json!({"email": null, "last_name": "Smith", "patient_number": "P00001", "deleted": false}),
        ));
        sim.put_patient(patient_with(
            2,
            json!({"email": "a@example.com", "last_name": "Smythe", "patient_number": 2, "deleted": 1}),
        ));
        sim.put_patient(patient_with(
            3,
            json!({"email": "", "last_name": null, "patient_number": "P00003", "deleted": 0}),
        ));
        sim.put_patient(patient_with(
            4,
            json!({"email": "B@Example.com", "last_name": "Jones", "patient_number": "P00004", "deleted": true}),
        ));
        let cases: &[(Query, &[i64])] = &[
            (&[("id", "eq:3")], &[3]),
            (&[("id", "ne:3")], &[1, 2, 4]),
            (&[("id", "gt:2")], &[3, 4]),
            (&[("id", "lte:2")], &[1, 2]),
            (&[("id", "in:1,4")], &[1, 4]),
            (&[("id", "not-in:1,2")], &[3, 4]),
            (&[("id", "between:2,3")], &[2, 3]),
            (&[("email", "null")], &[1]),
            (&[("email", "null:")], &[1]),
            (&[("email", "not-null:")], &[2, 3, 4]),
            (&[("last_name", "like:Sm%")], &[1, 2]),
            (&[("last_name", "like:Sm_th")], &[1]),
            (&[("last_name", "like:%s")], &[4]),
            (&[("last_name", "ne:Smith")], &[2, 4]),
            (&[("patient_number", "eq:2")], &[2]),
            (&[("deleted", "eq:true")], &[2, 4]),
            (&[("deleted", "eq:0")], &[1, 3]),
            (&[("id", "gt:2"), ("last_name", "like:J%")], &[4]),
        ];
        for (query, expected) in cases {
            assert_eq!(ids_for(&server, query).await, *expected, "{query:?}");
        }
    }

    #[tokio::test]
    async fn invalid_filters_are_silently_ignored() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(10, 1);
        let all: Vec<i64> = (1..=10).collect();
        for (attribute, filter) in [
            ("colour", "eq:red"),
            ("id", "approx:3"),
            ("id", "eq:three"),
            ("id", "3"),
            ("updated", "gte:yesterday"),
            ("id", "between:1"),
            ("deleted", "like:t%"),
            ("sort", "id"),
        ] {
            let (status, body) = patients(&server, &[(attribute, filter)]).await;
            assert_eq!(status, 200);
            assert_eq!(body["total_entries"], 10, "{attribute}={filter}");
            assert_eq!(ids(&body), all);
        }
        // Valid filters still apply next to an ignored one.
        let query = [("id", "eq:3"), ("colour", "eq:red")];
        assert_eq!(ids_for(&server, &query).await, vec![3]);
    }

    #[tokio::test]
    async fn the_ignore_filters_switch_returns_the_whole_table() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(10, 1);
        sim.set_ignore_filters(true);
        assert_eq!(ids_for(&server, &[("id", "eq:3")]).await.len(), 10);
        let (_, body) = patients(&server, &[("id", "eq:3"), ("page_size", "4")]).await;
        assert_eq!(body["total_entries"], 10);
        assert_eq!(ids(&body), vec![1, 2, 3, 4]);

        let switched = reqwest::Client::new()
            .put(format!("{}/_sim/ignore-filters", server.url()))
            .json(&json!({"ignore": false}))
            .send()
            .await
            .expect("send");
        assert_eq!(switched.status(), 204);
        assert_eq!(ids_for(&server, &[("id", "eq:3")]).await, vec![3]);
    }

    #[tokio::test]
    async fn missing_or_bad_headers_are_refused() {
        let (sim, server) = start(unlimited()).await;
        let url = format!("{}/api/patients", server.url());
        let http = reqwest::Client::new();
        let send = |key: Option<&str>, app: Option<&str>| {
            let mut request = http.get(&url);
            if let Some(key) = key {
                request = request.header("x-practicehub-key", key);
            }
            if let Some(app) = app {
                request = request.header("x-app-details", app);
            }
            request.send()
        };
        let invalid_key = json!({"message": "Invalid API key"});
        let response = send(None, Some(APP)).await.expect("send");
        assert_eq!(response.status(), 401);
        assert_eq!(response.json::<Value>().await.expect("JSON"), invalid_key);
        let response = send(Some("wrong"), Some(APP)).await.expect("send");
        assert_eq!(response.status(), 401);

        let app_required =
            json!({"message": "x-app-details header is required: <appname>=<contact email>"});
        for app in [
            None,
            Some("revkeen-sync"),
            Some("=ops@clinic.example"),
            Some("sync=nobody"),
        ] {
            let response = send(Some(KEY), app).await.expect("send");
            assert_eq!(response.status(), 400, "{app:?}");
            assert_eq!(response.json::<Value>().await.expect("JSON"), app_required);
        }
        assert_eq!(
            send(Some(KEY), Some(APP)).await.expect("send").status(),
            200
        );

        sim.set_api_key("rotated");
        assert_eq!(
            send(Some(KEY), Some(APP)).await.expect("send").status(),
            401
        );
        assert_eq!(sim.stats().auth_failures, 3);
    }

    #[tokio::test]
    async fn writes_get_405_unknown_paths_404_and_both_are_logged() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(1, 0);
        let http = reqwest::Client::new();
        for method in [Method::POST, Method::DELETE] {
            let response = http
                .request(method.clone(), format!("{}/api/patients", server.url()))
                .header("x-practicehub-key", KEY)
                .header("x-app-details", APP)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 405, "{method}");
            assert!(response.json::<Value>().await.expect("JSON")["message"].is_string());
        }
        let missing = fetch(&format!("{}/api/appointments", server.url())).await;
        assert_eq!(missing.status(), 404);
        assert_eq!(
            missing.json::<Value>().await.expect("JSON"),
            json!({"message": "Not found"})
        );

        let stats = sim.stats();
        assert_eq!((stats.requests, stats.non_get), (3, 2));
        let log = sim.requests();
        assert_eq!((log[1].method.as_str(), log[1].status), ("DELETE", 405));
        assert_eq!(
            (log[2].path_and_query.as_str(), log[2].status),
            ("/api/appointments", 404)
        );
        assert!(sim.patient(1).is_some_and(|p| p["deleted"] != true));
    }

    #[tokio::test]
    async fn bursts_get_429_with_retry_after() {
        let (sim, server) = start(PracticeHubOptions {
            requests_per_second: 1,
            burst: 2,
            ..PracticeHubOptions::default()
        })
        .await;
        let url = format!("{}/api/patients", server.url());
        let mut statuses = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let response = fetch(&url).await;
            statuses.push(response.status().as_u16());
            last = Some(response);
        }
        assert_eq!(statuses, vec![200, 200, 429]);
        let limited = last.expect("three responses");
        let seconds: u64 = limited.headers()[header::RETRY_AFTER]
            .to_str()
            .expect("ASCII")
            .parse()
            .expect("whole seconds");
        assert!((1..=2).contains(&seconds), "{seconds}");
        let body: Value = limited.json().await.expect("JSON");
        assert_eq!(body, json!({"message": "Too many requests"}));
        assert_eq!(sim.stats().rate_limited, 1);

        sim.set_faults(Faults {
            rate_429: 1.0,
            ..Faults::default()
        });
        sim.set_rate_limit(0, 0);
        let limited = fetch(&url).await;
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn injected_errors_and_drops() {
        let (sim, server) = start(unlimited()).await;
        let url = format!("{}/api/patients", server.url());
        sim.set_faults(Faults {
            error_rate: 1.0,
            ..Faults::default()
        });
        let failed = fetch(&url).await;
        assert_eq!(failed.status(), 500);
        assert!(failed.json::<Value>().await.expect("JSON")["message"].is_string());

        sim.set_faults(Faults {
            drop_rate: 1.0,
            ..Faults::default()
        });
        let dropped = reqwest::Client::new()
            .get(&url)
            .header("x-practicehub-key", KEY)
            .header("x-app-details", APP)
            .send()
            .await;
        assert_dropped(dropped).await;
        let stats = sim.stats();
        assert_eq!((stats.errors, stats.dropped), (1, 1));
    }

    #[tokio::test]
    async fn soft_delete_and_updates_move_updated_strictly_forward() {
        let (sim, server) = start(unlimited()).await;
        sim.put_patient(patient_with(
            1,
            json!({"updated": "2025-01-01T00:00:00+00:00", "deleted": false}),
        ));
        sim.put_patient(patient_with(
            2,
            json!({"updated": "2025-01-01T00:00:00+00:00"}),
        ));
        let cursor = Utc::now() - TimeDelta::seconds(1);

        assert!(sim.soft_delete(1));
        let first = updated(&sim, 1);
        assert!(first >= cursor, "{first}");
        assert_eq!(sim.patient(1).expect("kept")["deleted"], true);
        assert!(sim.soft_delete(1));
        let second = updated(&sim, 1);
        assert!(second > first, "{second} is not after {first}");
        assert!(sim.update_patient(1, json!({"email": "new@example.com"})));
        assert!(updated(&sim, 1) > second);
        assert!(!sim.soft_delete(99));
        assert!(!sim.update_patient(99, json!({})));

        let since = format!("gte:{}", format_instant(cursor));
        let (_, body) = patients(&server, &[("updated", &since)]).await;
        assert_eq!(ids(&body), vec![1]);
        assert_eq!(body["data"][0]["deleted"], true);

        // The same through the control surface.
        let deleted = reqwest::Client::new()
            .delete(format!("{}/_sim/patients/2", server.url()))
            .send()
            .await
            .expect("send");
        assert_eq!(deleted.status(), 204);
        assert_eq!(sim.patient(2).expect("kept")["deleted"], true);
        assert!(updated(&sim, 2) >= cursor);
        assert_eq!(ids_for(&server, &[("updated", &since)]).await, vec![1, 2]);
    }

    #[test]
    fn seeding_is_deterministic_and_quirky() {
        let sim = PracticeHubSim::new(unlimited());
        sim.seed(40, 9);
        let first = sim.patients();
        sim.seed(40, 9);
        assert_eq!(sim.patients(), first);
        assert_eq!(first[0], generate_patient(1, 9));
        assert_eq!(first[39]["id"], 40);
        sim.seed(40, 10);
        assert_ne!(sim.patients(), first);

        let patients: Vec<Value> = (1..=2000).map(|id| generate_patient(id, 3)).collect();
        let count = |test: &dyn Fn(&Value) -> bool| patients.iter().filter(|p| test(p)).count();
        let share = |n: usize| n as f64 / patients.len() as f64;
        assert!((0.05..0.15).contains(&share(count(&|p| p["patient_number"].is_number()))));
        assert!((0.4..0.6).contains(&share(count(&|p| p["deleted"].is_number()))));
        let deleted = |p: &Value| p["deleted"] == true || p["deleted"] == 1;
        assert!((0.005..0.04).contains(&share(count(&deleted))));
        assert!((0.01..0.06).contains(&share(count(&|p| p["active"] == false))));
        assert!(count(&|p| p["last_name"].is_null()) > 0);
        assert!(count(&|p| p["email"].is_null()) > 50);
        assert!(count(&|p| p["email"] == "") > 10);
        assert!(count(&|p| p["mobile"].is_null()) > 100);
        assert!(share(count(&|p| p["home_phone"].is_null())) > 0.7);
        assert!(patients.iter().all(|p| {
            p["note"]
                .as_str()
                .is_some_and(|n| n.is_empty() || n.starts_with("<p>"))
        }));

        let until = DateTime::<Utc>::from_timestamp(GENERATED_UNTIL_SECS, 0).expect("anchor");
        for patient in &patients {
            let instant = |key: &str| {
                DateTime::parse_from_rfc3339(patient[key].as_str().expect("instant"))
                    .expect("RFC 3339")
                    .with_timezone(&Utc)
            };
            assert!(
                patient["updated"]
                    .as_str()
                    .expect("updated")
                    .ends_with("+00:00")
            );
            assert!(instant("created") <= instant("updated"));
            assert!(
                instant("updated") < until && instant("updated") > until - TimeDelta::days(366)
            );
            NaiveDate::parse_from_str(patient["date_of_birth"].as_str().expect("dob"), "%Y-%m-%d")
                .expect("date of birth");

            let junk = ["no mobile", "07700", "see notes", "n/a"];
            for field in ["mobile", "home_phone"] {
                let Some(phone) = patient[field].as_str() else {
                    continue;
                };
                if junk.contains(&phone) {
                    continue;
                }
                let parsed = phonenumber::parse(Some(phonenumber::country::Id::GB), phone)
                    .unwrap_or_else(|error| panic!("{phone}: {error}"));
                assert!(
                    phonenumber::is_valid(&parsed),
                    "{phone} is not a valid UK number"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_control_surface_changes_state_without_being_logged() {
        let (sim, server) = start(unlimited()).await;
        let http = reqwest::Client::new();
        let url = |path: &str| format!("{}/_sim{path}", server.url());
        let seed = json!({"count": 4, "seed": 2});
        assert_eq!(
            send_status(http.post(url("/patients/seed")).json(&seed)).await,
            204
        );
        let listed: Vec<Value> = send_json(http.get(url("/patients"))).await;
        assert_eq!(listed, sim.patients());
        assert_eq!(listed.len(), 4);

        let patient = patient_with(0, json!({"first_name": "Put"}));
        assert_eq!(
            send_status(http.put(url("/patients/9")).json(&patient)).await,
            200
        );
        assert_eq!(sim.patient(9).expect("stored")["first_name"], "Put");
        let before = updated(&sim, 9);
        let patch = json!({"first_name": "Patched"});
        let patched: Value = send_json(http.patch(url("/patients/9")).json(&patch)).await;
        assert_eq!(patched["first_name"], "Patched");
        assert!(updated(&sim, 9) > before);
        let missing = http.patch(url("/patients/99")).json(&json!({}));
        assert_eq!(send_status(missing).await, 404);
        assert!(sim.requests().is_empty());

        let patients_url = format!("{}/api/patients", server.url());
        let api = async || fetch(&patients_url).await.status().as_u16();
        shared_control_routes(&sim, &server, KEY, api).await;
    }

    /// Replaces the faults through `PUT /_sim/faults`, as a test against a running simulator
    /// would.
    async fn put_faults(server: &SimServer, faults: Value) {
        let request = reqwest::Client::new()
            .put(format!("{}/_sim/faults", server.url()))
            .json(&faults);
        assert_eq!(send_status(request).await, 204, "{faults}");
    }

    /// The content type and raw body of a GET that must answer 200.
    async fn fetch_bytes(url: &str) -> (String, Vec<u8>) {
        let response = fetch(url).await;
        assert_eq!(response.status(), 200, "{url}");
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .expect("ASCII")
            .to_owned();
        (content_type, response.bytes().await.expect("body").to_vec())
    }

    async fn fetch_json(url: &str) -> Value {
        let response = fetch(url).await;
        assert_eq!(response.status(), 200, "{url}");
        response.json().await.expect("JSON")
    }

    #[tokio::test]
    async fn an_injected_429_sends_the_retry_after_fault() {
        let (sim, server) = start(unlimited()).await;
        let url = format!("{}/api/patients", server.url());
        put_faults(&server, json!({"rate_429": 1.0})).await;
        let limited = fetch(&url).await;
        assert_eq!(limited.status(), 429);
        assert_eq!(
            limited.headers()[header::RETRY_AFTER],
            "1",
            "off by default"
        );

        for value in [
            "18446744073709551615",
            "86400",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            put_faults(&server, json!({"rate_429": 1.0, "retry_after": value})).await;
            let limited = fetch(&url).await;
            assert_eq!(limited.status(), 429);
            assert_eq!(limited.headers()[header::RETRY_AFTER], value);
            let body: Value = limited.json().await.expect("JSON");
            assert_eq!(body, json!({"message": "Too many requests"}));
        }

        // Alone it changes nothing, and the limiter's own 429 keeps its computed value.
        put_faults(&server, json!({"retry_after": "86400"})).await;
        sim.set_rate_limit(1, 1);
        assert_eq!(fetch(&url).await.status(), 200);
        let limited = fetch(&url).await;
        assert_eq!(limited.status(), 429);
        let seconds: u64 = limited.headers()[header::RETRY_AFTER]
            .to_str()
            .expect("ASCII")
            .parse()
            .expect("whole seconds");
        assert!((1..=2).contains(&seconds), "{seconds}");
    }

    #[tokio::test]
    async fn redirect_to_answers_307_before_routing_and_headers() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(3, 0);
        let url = format!("{}/api/patients", server.url());
        assert_eq!(fetch(&url).await.status(), 200, "off by default");
        sim.clear_log();

        let faults = json!({"redirect_to": "https://moved.example", "rate_429": 1.0});
        put_faults(&server, faults).await;
        let sent = [
            (
                Method::GET,
                "/api/patients?page=2&updated=gte:2025-01-01T00:00:00Z",
            ),
            (Method::GET, "/api/patients"),
            (Method::GET, "/elsewhere"),
            (Method::POST, "/api/patients"),
        ];
        crate::source::testing::redirects_everything(
            &sim,
            &server,
            "https://moved.example",
            &sent,
            "/patients",
        )
        .await;
    }

    #[tokio::test]
    async fn next_link_self_link_repeats_the_page_itself() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        let base = format!("{}/api/patients", server.url());
        let body = fetch_json(&format!("{base}?page_size=2")).await;
        let next = format!("{base}?page=2&page_size=2");
        assert_eq!(body["links"]["next"], next.as_str(), "off by default");

        put_faults(&server, json!({"next_link": "self_link"})).await;
        for page in 1..=2 {
            let body = fetch_json(&format!("{base}?page={page}&page_size=2")).await;
            let own = format!("{base}?page={page}&page_size=2");
            assert_eq!(body["links"]["self"], own.as_str());
            assert_eq!(body["links"]["next"], own.as_str());
        }
        let last = fetch_json(&format!("{base}?page=3&page_size=2")).await;
        assert_eq!(ids(&last), vec![5]);
        assert!(last["links"].get("next").is_none(), "{last}");
        assert_eq!(
            last["links"]["previous"],
            format!("{base}?page=2&page_size=2").as_str()
        );
    }

    #[tokio::test]
    async fn next_link_cycle_goes_from_page_two_back_to_page_one() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        let base = format!("{}/api/patients", server.url());
        let body = fetch_json(&format!("{base}?page=2&page_size=2")).await;
        let next = format!("{base}?page=3&page_size=2");
        assert_eq!(body["links"]["next"], next.as_str(), "off by default");

        put_faults(&server, json!({"next_link": "cycle"})).await;
        let mut url = format!("{base}?page_size=2");
        let mut visited = Vec::new();
        for _ in 0..6 {
            let body = fetch_json(&url).await;
            visited.push(ids(&body));
            url = body["links"]["next"].as_str().expect("a next").to_owned();
        }
        let (one, two) = (vec![1, 2], vec![3, 4]);
        assert_eq!(
            visited,
            [&one, &two, &one, &two, &one, &two].map(Clone::clone)
        );
        assert_eq!(url, format!("{base}?page=1&page_size=2"));
        // Asked for directly, the last page is normal.
        let last = fetch_json(&format!("{base}?page=3&page_size=2")).await;
        assert!(last["links"].get("next").is_none(), "{last}");

        // With a single page, page 1 is its own next.
        let body = fetch_json(&format!("{base}?page_size=10")).await;
        assert_eq!(
            body["links"]["next"],
            format!("{base}?page=1&page_size=10").as_str()
        );
        sim.seed(0, 0);
        let body = fetch_json(&base).await;
        assert_eq!(body["links"]["next"], format!("{base}?page=1").as_str());
    }

    #[tokio::test]
    async fn next_link_relative_drops_scheme_host_and_path() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(5, 0);
        let base = format!("{}/api/patients", server.url());
        let url = format!("{base}?page=2&page_size=2&id=gt:0");
        let body = fetch_json(&url).await;
        let next = format!("{base}?page=3&page_size=2&id=gt:0");
        assert_eq!(body["links"]["next"], next.as_str(), "off by default");

        put_faults(&server, json!({"next_link": "relative"})).await;
        let body = fetch_json(&url).await;
        assert_eq!(
            body["links"],
            json!({
                "self": "?page=2&page_size=2&id=gt:0",
                "previous": "?page=1&page_size=2&id=gt:0",
                "next": "?page=3&page_size=2&id=gt:0",
            })
        );
        // Resolved against the request's URL, it is the absolute link.
        let relative = body["links"]["next"].as_str().expect("next");
        let resolved = reqwest::Url::parse(&url)
            .and_then(|url| url.join(relative))
            .expect("a relative reference");
        assert_eq!(resolved.as_str(), next);
        let last = fetch_json(resolved.as_str()).await;
        assert_eq!(ids(&last), vec![5]);
    }

    #[tokio::test]
    async fn next_link_page_only_drops_the_query_and_following_it_applies_none() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(150, 0);
        let base = format!("{}/api/patients", server.url());
        let url = format!("{base}?page_size=5&id=gt:140");
        let body = fetch_json(&url).await;
        let next = format!("{base}?page=2&page_size=5&id=gt:140");
        assert_eq!(body["links"]["next"], next.as_str(), "off by default");

        put_faults(&server, json!({"next_link": "page_only"})).await;
        let body = fetch_json(&url).await;
        assert_eq!(ids(&body), (141..=145).collect::<Vec<_>>());
        assert_eq!(body["total_entries"], 10);
        assert_eq!(
            body["links"],
            json!({"self": format!("{base}?page=1"), "next": format!("{base}?page=2")})
        );
        // The link carries neither the filter nor the page size, and the server honours that.
        let followed = fetch_json(&format!("{base}?page=2")).await;
        assert_eq!(ids(&followed), (101..=150).collect::<Vec<_>>());
        assert_eq!(followed["total_entries"], 150);
        assert_eq!(
            followed["links"],
            json!({"self": format!("{base}?page=2"), "previous": format!("{base}?page=1")})
        );
    }

    /// The attributes a live patient carries, sorted.
    const LIVE_KEYS: &[&str] = &[
        "address_num",
        "address_str",
        "created_at",
        "dob",
        "email",
        "first_name",
        "id",
        "last_apt",
        "last_name",
        "medical_insurance",
        "next_apt",
        "patient_number",
        "phone",
        "sex",
        "total_balance",
        "updated_at",
    ];

    #[tokio::test]
    async fn the_live_variant_has_other_names_naive_local_times_and_page_only_links() {
        let (sim, server) = start(unlimited()).await;
        sim.set_live(true);
        sim.seed(150, 4);
        let base = format!("{}/api/patients", server.url());
        for patient in sim.patients() {
            let keys: Vec<&str> = patient
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, LIVE_KEYS, "{patient}");
            let updated = patient["updated_at"].as_str().expect("naive text");
            NaiveDateTime::parse_from_str(updated, "%Y-%m-%d %H:%M:%S").expect(updated);
        }
        // The same patient as the documented variant generates, its times in London time.
        let documented = generate_patient(7, 4);
        let live = sim.patient(7).expect("seeded");
        assert_eq!(live["email"], documented["email"]);
        assert_eq!(live["phone"], documented["mobile"]);
        assert_eq!(live["dob"], documented["date_of_birth"]);
        assert_eq!(
            sim.parse_time(live["updated_at"].as_str().expect("text")),
            parse_instant(documented["updated"].as_str().expect("text"))
        );

        // `links` carry the page alone: the filter and the page size are dropped.
        let body = fetch_json(&format!("{base}?page_size=20&id=gt:10")).await;
        assert_eq!(body["total_entries"], 140);
        assert_eq!(body["links"]["next"], format!("{base}?page=2"));
        // Filters name the live attributes and take naive local times; the documented
        // names are unknown attributes, so silently ignored.
        let pivot = sim.patient(50).expect("seeded")["updated_at"]
            .as_str()
            .expect("text")
            .to_owned();
        let expected: Vec<i64> = sim
            .patients()
            .iter()
            .filter(|p| p["updated_at"].as_str().expect("text") >= pivot.as_str())
            .map(|p| p["id"].as_i64().expect("id"))
            .collect();
        let at = format!("gte:{pivot}");
        assert_eq!(ids_for(&server, &[("updated_at", &at)]).await, expected);
        assert_eq!(
            ids_for(&server, &[("updated", &at), ("page_size", "100")])
                .await
                .len(),
            100
        );
        assert_eq!(ids_for(&server, &[("mobile", "null")]).await.len(), 100);
        // An RFC 3339 filter value is converted to the clinic's wall clock (BST in July).
        sim.put_patient(json!({"id": 500, "updated_at": "2025-07-01 12:00:00"}));
        assert_eq!(
            ids_for(
                &server,
                &[("updated_at", "gte:2025-07-01T11:00:00Z"), ("id", "gt:400")]
            )
            .await,
            vec![500]
        );
        assert!(
            ids_for(
                &server,
                &[("updated_at", "gt:2025-07-01T11:00:00Z"), ("id", "gt:400")]
            )
            .await
            .is_empty()
        );

        // Switching back serves the documented names again for what is seeded next.
        let switched = reqwest::Client::new()
            .put(format!("{}/_sim/variant", server.url()))
            .json(&json!({"live": false}))
            .send()
            .await
            .expect("send");
        assert_eq!(switched.status(), 204);
        sim.seed(3, 4);
        assert_eq!(sim.patient(1), Some(generate_patient(1, 4)));
    }

    #[tokio::test]
    async fn naive_local_times_compare_on_the_wall_clock_when_the_clocks_go_back() {
        let (sim, server) = start(unlimited()).await;
        sim.set_live(true);
        // 01:40 BST, then 01:10 GMT half an hour later: the second is earlier on the wall.
        sim.put_patient(json!({"id": 1, "updated_at": "2025-10-26 01:40:00"}));
        sim.put_patient(json!({"id": 2, "updated_at": "2025-10-26 01:10:00"}));
        let query = [("updated_at", "gte:2025-10-26 01:30:00")];
        assert_eq!(ids_for(&server, &query).await, vec![1]);
        // A naive time in the hour the clocks go back is its first occurrence.
        assert_eq!(
            sim.parse_time("2025-10-26 01:10:00")
                .map(|t| t.to_rfc3339()),
            Some("2025-10-26T00:10:00+00:00".to_owned())
        );
        // One in the hour they skip counts from an hour later.
        assert_eq!(
            sim.parse_time("2025-03-30 01:30:00")
                .map(|t| t.to_rfc3339()),
            Some("2025-03-30T01:30:00+00:00".to_owned())
        );
    }

    #[tokio::test]
    async fn the_server_clock_offset_moves_stamps_and_the_date_header() {
        let (sim, server) = start(unlimited()).await;
        sim.set_live(true);
        sim.seed(2, 1);
        for offset in [-600, 600] {
            sim.set_clock_offset(offset);
            let before = Utc::now() + TimeDelta::seconds(offset - 2);
            assert!(sim.update_patient(1, json!({"first_name": "Moved"})));
            let after = Utc::now() + TimeDelta::seconds(offset + 2);
            let text = sim.patient(1).expect("kept")["updated_at"]
                .as_str()
                .expect("naive")
                .to_owned();
            let stamp = sim.parse_time(&text).expect("parses");
            assert!(before <= stamp && stamp <= after, "{offset}: {text}");
            assert!(!text.contains('T') && !text.contains('+'), "{text}");

            let response = fetch(&format!("{}/api/patients", server.url())).await;
            let date = response.headers()[header::DATE].to_str().expect("ASCII");
            let date = DateTime::parse_from_rfc2822(date).expect("an HTTP date");
            assert!(before <= date && date <= after, "{offset}: {date}");
        }
        // A documented patient keeps its documented stamp, on the server's clock too.
        sim.set_live(false);
        sim.put_patient(patient_with(
            3,
            json!({"updated": "2025-01-01T00:00:00+00:00"}),
        ));
        assert!(sim.update_patient(3, json!({"first_name": "Moved"})));
        let stamp = updated(&sim, 3);
        assert!(stamp > Utc::now() + TimeDelta::seconds(590), "{stamp}");
    }

    #[tokio::test]
    async fn every_request_records_its_user_agent() {
        let (sim, server) = start(unlimited()).await;
        reqwest::Client::new()
            .get(format!("{}/api/patients", server.url()))
            .header("x-practicehub-key", KEY)
            .header("x-app-details", APP)
            .header(header::USER_AGENT, APP)
            .send()
            .await
            .expect("send");
        let requests = sim.requests();
        assert_eq!(requests[0].user_agent.as_deref(), Some(APP));
    }

    #[tokio::test]
    async fn inject_and_inject_raw_land_in_the_first_pages_data() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(3, 0);
        let base = format!("{}/api/patients", server.url());
        let first = format!("{base}?page_size=2");
        let body = fetch_json(&first).await;
        assert_eq!(ids(&body), vec![1, 2], "off by default");

        let injected = json!([null, 42, "a string", {"id": "x"}]);
        put_faults(&server, json!({"inject": injected})).await;
        let body = fetch_json(&first).await;
        let real = |id| sim.patient(id).expect("seeded");
        let mut expected = vec![real(1), real(2)];
        expected.extend(injected.as_array().expect("array").iter().cloned());
        assert_eq!(body["data"], Value::Array(expected));
        assert_eq!(body["total_entries"], 3);

        let surrogate = r#"{"id": 999001, "first_name": "\ud800"}"#;
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let faults = json!({"inject": [null], "inject_raw": [surrogate, deep]});
        put_faults(&server, faults).await;
        let (content_type, bytes) = fetch_bytes(&first).await;
        assert_eq!(content_type, "application/json");
        let patient = |id| serde_json::to_string(&real(id)).expect("JSON");
        let links = json!({"self": format!("{base}?page=1&page_size=2"),
                           "next": format!("{base}?page=2&page_size=2")});
        let expected = format!(
            r#"{{"data":[{},{},null,{surrogate},{deep}],"links":{links},"total_entries":3}}"#,
            patient(1),
            patient(2),
        );
        assert_eq!(String::from_utf8(bytes).expect("UTF-8"), expected);

        let later = fetch_json(&format!("{base}?page=2&page_size=2")).await;
        assert_eq!(later["data"], json!([real(3)]), "the first page only");
        assert_eq!(sim.patients().len(), 3, "injected values are not stored");
    }

    #[tokio::test]
    async fn deep_nesting_gives_every_patient_a_200_deep_custom_history() {
        let (sim, server) = start(unlimited()).await;
        sim.seed(3, 0);
        let url = format!("{}/api/patients", server.url());
        let body = fetch_json(&url).await;
        assert!(
            body["data"][0].get("custom_history").is_none(),
            "off by default"
        );

        put_faults(&server, json!({"deep_nesting": true})).await;
        let (_, bytes) = fetch_bytes(&url).await;
        assert!(
            serde_json::from_slice::<Value>(&bytes).is_err(),
            "over serde_json's limit"
        );
        let text = String::from_utf8(bytes).expect("UTF-8");
        let nested = format!(
            r#""custom_history":{}1{}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(text.matches(&nested).count(), 3);
        assert!(
            !text.contains(&format!("{}1", "[".repeat(201))),
            "exactly 200 deep"
        );
        let flattened: Value =
            serde_json::from_str(&text.replace(&nested, r#""custom_history":0"#)).expect("JSON");
        for (patient, id) in flattened["data"].as_array().expect("data").iter().zip(1..) {
            let mut expected = sim.patient(id).expect("seeded");
            assert!(expected.get("custom_history").is_none(), "not stored");
            expected["custom_history"] = json!(0);
            assert_eq!(*patient, expected);
        }
    }
}
