//! Source adapters, the one interface they implement, and the registry of kinds.
//!
//! An adapter knows only its API: how to fetch the page after a cursor ([`Source::fetch`]),
//! one record by id ([`Source::fetch_one`]), and how to map one record to what the outbox takes
//! ([`Source::map`]). It also owns its settings ([`Kind`] extends the config's
//! [`SourceKind`]: its defaults, its own keys and their validation). The shared loop in
//! [`poll`] owns everything else — rate limiting, retries with backoff, change detection, the
//! page transaction, metrics — as vector's `http_client` source does.
//!
//! **Adding a source** is one folder here (its adapter, settings and mapping) and one entry in
//! [`KINDS`]; nothing else names a kind.

pub mod budget;
mod poll;
pub mod practicehub;
mod raw;
pub mod wodify;

pub use poll::{FetchContext, PollContext, PollError, fetch_one, poll, record_key_outcome, scan};

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{SourceConfig, SourceKind};
use crate::http::Probe;
use crate::store::PageItem;

/// Every kind of source the daemon can read: the one list that names them.
pub static KINDS: &[&dyn Kind] = &[&wodify::KIND, &practicehub::KIND];

/// [`KINDS`] as the config loader takes them.
pub fn config_kinds() -> Vec<&'static dyn SourceKind> {
    KINDS
        .iter()
        .map(|kind| *kind as &'static dyn SourceKind)
        .collect()
}

/// The kind a configured source names.
pub fn kind_of(source: &SourceConfig) -> Result<&'static dyn Kind, BuildError> {
    KINDS
        .iter()
        .copied()
        .find(|kind| kind.name() == source.kind)
        .ok_or_else(|| BuildError::UnknownKind(source.kind.to_string()))
}

/// Builds the adapter a configured source asks for.
pub fn build(source: &SourceConfig) -> Result<Arc<dyn Source>, BuildError> {
    kind_of(source)?.build(source)
}

/// A kind of source: its configuration (the supertrait) and how to build its adapter.
pub trait Kind: SourceKind {
    /// The adapter for one configured source of this kind.
    fn build(&self, source: &SourceConfig) -> Result<Arc<dyn Source>, BuildError>;

    /// Whether a complete listing lists every record (a full scan), so that a record missing
    /// from one has vanished from the source. The default: an incremental listing.
    fn full_scan(&self) -> bool {
        false
    }

    /// A saved cursor in words ("Wodify scan at client id 10500"), for `status`.
    fn describe_cursor(&self, cursor: &str, passes: i64) -> String;
}

/// Builds an adapter from a source's config and its kind's own settings (`O`), which the
/// config parsed for this kind.
fn build_with<O: crate::config::SourceOptions, S: Source>(
    source: &SourceConfig,
    new: impl FnOnce(&SourceConfig, &O) -> Result<S, reqwest::Error>,
) -> Result<Arc<dyn Source>, BuildError> {
    let options = source
        .options::<O>()
        .ok_or_else(|| BuildError::Options(source.name.clone()))?;
    Ok(Arc::new(new(source, options)?))
}

/// Why an adapter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("source kind {0:?} is not one this build knows")]
    UnknownKind(String),
    #[error("the settings of source {0:?} are not its kind's (a bug)")]
    Options(String),
}

/// A boxed future, for the object-safe [`Source`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One record as its adapter fetched it: opaque to the poll loop, which only hands it back to
/// the same adapter's [`Source::map`] (on a blocking thread, while the next page is fetched).
pub struct Record(Box<dyn Any + Send>);

impl Record {
    /// Wraps an adapter's own record type.
    pub fn new<T: Any + Send>(record: T) -> Record {
        Record(Box::new(record))
    }

    /// The adapter's record, if it is of type `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

/// One fetched page.
pub struct Page {
    pub records: Vec<Record>,
    /// Each record's external id as the adapter read it (`None`: it has none it can use), in
    /// the order of `records`: what the poll loop checks progress with and names a record by
    /// when its mapping fails.
    pub ids: Vec<Option<String>>,
    /// The cursor after this page (the start of a new pass when `pass_complete`).
    pub next: String,
    /// This page ended the listing.
    pub pass_complete: bool,
}

/// A record mapped for the outbox, with any fields that had to be left out.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub item: PageItem,
    /// Short names of fields dropped from the customer (`phone_unparseable`, …).
    pub warnings: Vec<&'static str>,
}

#[cfg(test)]
/// What a row of a fuzzed listing may become, read by the adapter's `map`: a customer sent
/// under the row's own id with a sendable (`testing::assert_sendable`) body, a rejection that says why,
/// or nothing.
pub(crate) fn assert_mapped(
    id: Option<String>,
    mapped: Mapped,
) -> Result<(), proptest::test_runner::TestCaseError> {
    match mapped.item.outcome {
        crate::store::PageItemOutcome::Customer { body, .. } => {
            proptest::prop_assert_eq!(Some(mapped.item.external_id), id);
            crate::testing::assert_sendable(&body)
        }
        crate::store::PageItemOutcome::Rejected(rejection) => {
            proptest::prop_assert!(!rejection.reason.is_empty());
            Ok(())
        }
        crate::store::PageItemOutcome::Ignored => Ok(()),
    }
}

/// A source API, as the poll loop sees it. Object-safe: the daemon holds `Arc<dyn Source>`.
pub trait Source: Send + Sync + 'static {
    /// The cursor at the start of a fresh listing.
    fn start_cursor(&self) -> String;

    /// Fetches the page after `cursor`. One request; the loop does limiting and retries.
    fn fetch<'a>(&'a self, cursor: &'a str) -> BoxFuture<'a, Result<Page, SourceError>>;

    /// Fetches one record by external id (a push event); `None` when the source has no such
    /// record. One request; the caller does limiting and retries.
    fn fetch_one<'a>(
        &'a self,
        external_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Record>, SourceError>>;

    /// The external id `text` names under this source's id rule, in canonical form, or
    /// `None` when it cannot name a record (push events are checked before they are accepted,
    /// by the rule polls use).
    fn external_id(&self, text: &str) -> Option<String>;

    /// Maps one record this adapter fetched to what the outbox takes.
    fn map(&self, record: &Record) -> Mapped;

    /// One authenticated read, for `check-config --connect`.
    fn probe(&self) -> BoxFuture<'_, Probe>;

    /// Whether a saved cursor stands in the middle of a listing (a poll stopped there), so the
    /// next poll resumes rather than starts. The default: any cursor but the start.
    fn mid_listing(&self, cursor: &str) -> bool {
        cursor != self.start_cursor()
    }

    /// [`Source::probe`] and what the adapter learned from the answer, in words, for
    /// `check-config --connect` (PracticeHub: the attribute names and time form it met).
    fn probe_details(&self) -> BoxFuture<'_, (Probe, Vec<String>)> {
        Box::pin(async move { (self.probe().await, Vec::new()) })
    }

    /// The cursor from which the next listing reads every record (`--resync`), given the
    /// saved `cursor`, keeping whatever else the adapter remembers. The default keeps
    /// `cursor`: a source whose every listing is a full scan needs nothing more.
    fn full_listing(&self, cursor: &str) -> String {
        cursor.to_string()
    }

    /// For an adapter whose listings are incremental: whether the listing that completed
    /// with `cursor` read every record (records known and not listed by it have vanished). The
    /// default: `false` (a kind whose every listing is a full scan says so by
    /// `Kind::full_scan`).
    fn completed_full_scan(&self, cursor: &str) -> bool {
        let _ = cursor;
        false
    }

    /// For a poll that resumed at `resumed_at`: whether reaching `cursor` on the next pass
    /// covers what the crashed poll had read before it. The default (`true`) ends a resumed
    /// poll at the end of its listing.
    fn covers(&self, resumed_at: &str, cursor: &str) -> bool {
        let _ = (resumed_at, cursor);
        true
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// 401/403: the key is refused. Polling this source stops.
    #[error("API key refused: {0}")]
    AuthRefused(String),
    /// 429, with the wait the API asked for.
    #[error("rate limited")]
    RateLimited(Option<Duration>),
    /// The month's requests are spent: the source's own quota (Wodify's 429 `Limit Exceeded`)
    /// or the daemon's `monthly_request_budget` for it. Not retried: nothing succeeds before
    /// the month turns.
    #[error("{0}")]
    QuotaSpent(String),
    /// 5xx, a timeout, a connection error, an error envelope carrying one: retried.
    #[error("{0}")]
    Transient(String),
    /// A request the API will never accept as sent (a wrong base URL, a bad query).
    #[error("{0}")]
    Permanent(String),
    /// 404 for a single record.
    #[error("not found")]
    NotFound,
    /// The configured address does not lead to the API: a redirect (never followed, the key
    /// would go with it) or an untrusted TLS certificate. Not retried.
    #[error("{0}")]
    Misdirected(String),
    /// The listing does not advance (the same page again, a cycle of links, no end): the
    /// poll stops. Not retried.
    #[error("{0}")]
    Pagination(String),
}

impl SourceError {
    /// What `check-config --connect` reports for a probe's answer.
    pub fn probe<T>(answer: Result<T, SourceError>) -> Probe {
        match answer {
            Ok(_) => Probe::Ok,
            Err(SourceError::AuthRefused(e)) => Probe::KeyRefused(e),
            Err(e) => Probe::Unexpected(e.to_string()),
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::RateLimited(_) | SourceError::Transient(_)
        )
    }
}

/// The id rule of both sources: a positive integer up to `i64::MAX`, given as a JSON integer
/// or as a string of decimal digits. Anything else (`10000.0`, `-5`, `0`, `abc`, `1.5`, a
/// number beyond i64) is no id. Polls and push events use the same rule. The canonical form
/// (no leading zeros) is what RevKeen sees.
pub fn positive_id(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Number(n) => n.as_i64().filter(|id| *id > 0).map(|id| id.to_string()),
        serde_json::Value::String(text) => positive_id_text(text),
        _ => None,
    }
}

/// [`positive_id`] of a text (a push event's id, a string id in a record).
pub fn positive_id_text(text: &str) -> Option<String> {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .map(|id| id.to_string())
}

/// A record that cannot be read: rejected on its own, the rest of its page goes on. Named by
/// its id when it has a usable one, else by `digest`, a digest of its text (stable while the
/// record is unchanged, so a poll that meets it again updates the same failure).
fn unreadable(id: Option<String>, digest: &str, problem: String, hint: &str) -> Mapped {
    let external_id = id.unwrap_or_else(|| format!("no-id-{digest}"));
    Mapped {
        item: PageItem {
            external_id,
            outcome: crate::store::PageItemOutcome::Rejected(crate::customer::Rejection::new(
                "unreadable",
                problem,
                hint,
            )),
        },
        warnings: Vec::new(),
    }
}

/// A saved cursor in words, for `status` (`None`: the source was never polled).
pub fn describe_cursor(source: &SourceConfig, cursor: Option<(&str, i64)>) -> String {
    match (kind_of(source), cursor) {
        (_, None) => "not polled yet".to_string(),
        (Ok(kind), Some((cursor, passes))) => kind.describe_cursor(cursor, passes),
        (Err(error), Some(_)) => error.to_string(),
    }
}

/// Who an adapter's requests go to, for messages: the API's name (`Wodify`) and what to check
/// when the address is wrong (`the base_url of source "gym"`).
#[derive(Debug, Clone)]
struct Endpoint {
    target: &'static str,
    api: &'static str,
    key: String,
}

impl Endpoint {
    fn new(target: &'static str, api: &'static str, source: &SourceConfig) -> Endpoint {
        Endpoint {
            target,
            api,
            key: format!("the base_url of source {:?}", source.name),
        }
    }

    /// Sends one GET an adapter built (its URL and auth headers), reads the whole answer and
    /// records the request's duration and status; `read` turns the status, body and
    /// `Retry-After` into a value or an error. A redirect or an untrusted certificate never
    /// reaches `read`.
    async fn get<T>(
        &self,
        request: reqwest::RequestBuilder,
        read: impl FnOnce(reqwest::StatusCode, &[u8], Option<Duration>) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        self.get_reply(request, |reply| {
            read(reply.status, &reply.body, reply.retry_after)
        })
        .await
    }

    /// [`Endpoint::get`] with the whole answer (its `Date` too) handed to `read`.
    async fn get_reply<T>(
        &self,
        request: reqwest::RequestBuilder,
        read: impl FnOnce(&crate::http::Reply) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        match crate::http::send_measured(request, self.target, "read").await {
            Ok(reply) => match reply.redirect(self.api, &self.key) {
                Some(problem) => Err(SourceError::Misdirected(problem)),
                None => read(&reply),
            },
            Err(transport @ crate::http::Transport::Untrusted { .. }) => Err(
                SourceError::Misdirected(transport.describe(self.api, &self.key)),
            ),
            Err(crate::http::Transport::Failed(detail)) => Err(SourceError::Transient(detail)),
        }
    }

    /// One authenticated read for `check-config --connect`; `read` judges the answer.
    async fn probe(
        &self,
        request: reqwest::RequestBuilder,
        read: impl FnOnce(reqwest::StatusCode, &[u8]) -> Result<(), SourceError>,
    ) -> Probe {
        crate::http::probe_request(request, self.api, &self.key, |status, body| {
            SourceError::probe(read(status, body))
        })
        .await
    }
}

/// `{base}/{collection}?page=1&page_size=1`: the one authenticated read of
/// `check-config --connect`.
fn probe_url(base: &reqwest::Url, collection: &str) -> reqwest::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push(collection);
    }
    url.query_pairs_mut()
        .append_pair("page", "1")
        .append_pair("page_size", "1");
    url
}

/// The rejection of a record whose type is not its adapter's: a bug, reported like any other
/// record that cannot be sent rather than a panic.
fn foreign_record(external_id: &str) -> Mapped {
    Mapped {
        item: PageItem {
            external_id: external_id.to_string(),
            outcome: crate::store::PageItemOutcome::Rejected(crate::customer::Rejection::new(
                "internal_error",
                "the record reached the wrong adapter (a bug in sync-daemon)",
                "please report this; the record is read again on the next poll",
            )),
        },
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};

    fn load(toml: &str, env: &Environment) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(toml, env, &config_kinds())
    }

    /// `config/example.toml`, whose keys come from systemd credentials.
    fn example() -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["revkeen_api_key", "wodify_api_key", "clinic_api_key"] {
            std::fs::write(dir.path().join(name), "k").expect("write");
        }
        let env = Environment {
            vars: vec![(
                "CREDENTIALS_DIRECTORY".to_string(),
                dir.path().to_str().expect("utf-8").to_string(),
            )],
        };
        load(include_str!("../../config/example.toml"), &env).expect("valid")
    }

    #[test]
    fn the_example_config_is_valid_and_documents_the_defaults() {
        let config = example();
        let minimal = load(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='g'\nkind='wodify'\n\
             base_url='https://api.wodify.com/v1'\napi_key='w'\n",
            &Environment::default(),
        )
        .expect("valid");
        let defaults = &minimal.sources[0];
        assert_eq!(
            config.revkeen.requests_per_minute,
            minimal.revkeen.requests_per_minute
        );
        assert_eq!(config.revkeen.batch_size, minimal.revkeen.batch_size);
        assert_eq!(config.revkeen.max_attempts, minimal.revkeen.max_attempts);
        assert_eq!(config.daemon.listen, minimal.daemon.listen);
        assert_eq!(config.sources[0].schedule, defaults.schedule);
        assert_eq!(config.sources[1].kind, "practicehub");
        // Wodify's documented limits are the defaults.
        assert_eq!(defaults.revkeen_source, "wodify");
        assert_eq!(defaults.schedule, "0 */15 * * * *");
        assert_eq!((defaults.requests_per_second, defaults.burst), (5, 20));
        assert_eq!(defaults.monthly_request_budget, Some(250_000));
        assert_eq!(
            config.sources[0].monthly_request_budget,
            defaults.monthly_request_budget
        );
        assert_eq!(defaults.default_country, "US");
        // The redacted rendering is itself a valid config once keys are supplied again.
        let again = load(
            &config.to_redacted_toml().replace("\"[redacted]\"", "\"k\""),
            &Environment::default(),
        )
        .expect("round trip");
        assert_eq!(again.sources[1].base_url, config.sources[1].base_url);
        assert_eq!(
            again.sources[1].options.to_toml(),
            config.sources[1].options.to_toml()
        );
    }

    #[test]
    fn a_key_of_another_kind_is_refused_naming_it() {
        let error = load(
            "[revkeen]\napi_key='k'\n[[sources]]\nname='g'\nkind='wodify'\n\
             base_url='https://api.wodify.com/v1'\napi_key='w'\napp_details='a=b@c.io'\n",
            &Environment::default(),
        )
        .expect_err("refused");
        assert_eq!(error.key, "sources[0]");
        assert!(error.problem.contains("app_details"), "{error}");
        assert!(error.problem.contains("wodify"), "{error}");
    }

    #[test]
    fn every_configured_kind_builds_and_describes_a_fresh_cursor() {
        let config = example();
        let kinds: Vec<&str> = config.sources.iter().map(|s| s.kind).collect();
        assert_eq!(kinds.len(), KINDS.len(), "the example shows every kind");
        for source in &config.sources {
            let adapter = build(source).expect("builds");
            let start = adapter.start_cursor();
            assert!(!adapter.mid_listing(&start), "{}", source.kind);
            let kind = kind_of(source).expect("known");
            assert!(!kind.describe_cursor(&start, 0).is_empty());
        }
    }
}
