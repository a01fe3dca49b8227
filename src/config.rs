//! Settings: the TOML file, environment overrides, defaults, secrets and validation.
//!
//! The file is read with the `config` crate; every key can be overridden by an environment
//! variable `SYNC_DAEMON__SECTION__KEY` (double underscore between levels, a number selects an
//! element of `[[sources]]`, e.g. `SYNC_DAEMON__SOURCES__0__API_KEY`). The `config` crate turns an
//! indexed environment key into a map that replaces the whole array, so overrides are applied
//! as path overrides (`sources[0].api_key`) instead of through its `Environment` source.
//!
//! A `[[sources]]` entry is the common keys below ([`SourceConfig`]) plus the keys of its kind,
//! which the kind's adapter parses and validates itself ([`SourceKind::options`]): this file
//! names no source kind. The loader is handed the kinds it may build (`sources::KINDS`).
//!
//! Everything is checked once, at start: a bad value is a [`ConfigError`] naming the key and the
//! value, which `main` turns into exit code 78 (`EX_CONFIG`) so systemd does not restart-loop on
//! it. Secrets are read here and wrapped in [`Secret`] (`secret.rs`), whose `Debug` never shows
//! them.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::Url;
use serde::Deserialize;

use crate::secret::{Secret, SecretCell};

/// The source kinds a config may name (`sources::KINDS`).
pub type Kinds<'a> = &'a [&'static dyn SourceKind];

/// `"a" or "b"`, for messages.
fn kind_names(kinds: Kinds) -> String {
    let names: Vec<String> = kinds.iter().map(|k| format!("{:?}", k.name())).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "(none)".to_string(),
    }
}

/// Where the config file is looked for when neither `--config` nor `SYNC_DAEMON_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sync-daemon/config.toml";
/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "SYNC_DAEMON__";

/// A configuration problem: which key, and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {problem}")]
pub struct ConfigError {
    /// The key in TOML path form, e.g. `sources[1].schedule`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// `--source NAME` names no configured source: a usage error (exit 2) wherever it is given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no source named {name:?} in the config; configured sources: {}", known.join(", "))]
pub struct UnknownSource {
    pub name: String,
    pub known: Vec<String>,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub revkeen: RevKeenConfig,
    pub sources: Vec<SourceConfig>,
    /// What is valid but unsafe (a key file others can read): said at start and by
    /// `check-config`.
    pub warnings: Vec<String>,
}

/// `[daemon]`: the process itself.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// SQLite state file. Default `$STATE_DIRECTORY/state.db`, else `./state.db`.
    pub state_path: PathBuf,
    /// Address of the health, metrics and push-feed HTTP server. Default `127.0.0.1:9440`.
    pub listen: SocketAddr,
    /// `text` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `sync_daemon=trace`); `RUST_LOG` wins when set.
    pub log_level: String,
    /// Seconds a shutdown waits for in-flight requests. Default 10.
    pub drain_timeout_secs: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[revkeen]`: the destination API.
#[derive(Debug, Clone)]
pub struct RevKeenConfig {
    pub base_url: Url,
    /// Replaced in place when `SIGHUP` re-reads the key files (every clone shares it).
    pub api_key: SecretCell,
    /// Client-side limit, requests per minute. Default 1000 (production); staging allows 100.
    pub requests_per_minute: u32,
    /// Requests allowed at once before the per-minute rate applies. Default 2000.
    pub burst: u32,
    /// Customers per batch upsert; 1 sends single upserts only. Default 100, max 100.
    pub batch_size: usize,
    /// Requests in flight at once. Default 4.
    pub concurrency: usize,
    /// Per-request timeout in seconds. Default 30.
    pub timeout_secs: u64,
    /// Attempts before a customer is dead-lettered as "retries exhausted". Default 25.
    pub max_attempts: u32,
    /// `RevKeen-Version` header pinning the API version. Default `2026-05-01`.
    pub api_version: String,
    /// The longest a 429's `Retry-After` may pause sending, in seconds. Default 900.
    pub max_retry_after_secs: u64,
}

/// What a kind of source contributes to the configuration: its name, its defaults for the
/// common keys, and its own keys. Implemented by each adapter (`sources::wodify::KIND`, …).
pub trait SourceKind: Send + Sync {
    /// The `kind = "…"` value; also RevKeen's default `{source}` path segment.
    fn name(&self) -> &'static str;

    /// Defaults of the common keys for this kind.
    fn defaults(&self) -> SourceDefaults;

    /// The base URL in the form the adapter uses (a kind may accept several documented forms).
    fn normalize_base_url(&self, url: Url) -> Url {
        url
    }

    /// Parses and validates the kind's own keys. `keys` holds every key of the entry that is
    /// not a common one; `at` names the entry for messages (`sources[1]`).
    fn options(&self, at: &str, keys: Keys) -> Result<Arc<dyn SourceOptions>, ConfigError>;
}

/// The keys of a `[[sources]]` entry that belong to its kind, as the `config` crate read them
/// (environment overrides included).
pub type Keys = config::Map<String, config::Value>;

/// A kind's defaults for the common keys.
#[derive(Debug, Clone, Copy)]
pub struct SourceDefaults {
    /// Cron with seconds.
    pub schedule: &'static str,
    pub requests_per_second: u32,
    pub burst: u32,
    /// ISO 3166-1 alpha-2.
    pub default_country: &'static str,
    /// Shown when `base_url` is missing.
    pub base_url_example: &'static str,
    /// Cron with seconds for the listings of every record; `None`: none (a kind whose every
    /// listing is one, or that has no incremental listing).
    pub full_scan_schedule: Option<&'static str>,
    /// Requests a calendar month (UTC) when `monthly_request_budget` is not set; `None`:
    /// unlimited.
    pub monthly_request_budget: Option<u64>,
}

impl SourceDefaults {
    /// `schedule`, `requests_per_second` with `burst`, `default_country`, and the example
    /// base URL a missing `base_url` is told to look like.
    pub const fn new(
        schedule: &'static str,
        (requests_per_second, burst): (u32, u32),
        default_country: &'static str,
        base_url_example: &'static str,
    ) -> SourceDefaults {
        SourceDefaults {
            schedule,
            requests_per_second,
            burst,
            default_country,
            base_url_example,
            full_scan_schedule: None,
            monthly_request_budget: None,
        }
    }

    /// These defaults with a default `full_scan_schedule`.
    pub const fn with_full_scan_schedule(self, schedule: &'static str) -> SourceDefaults {
        SourceDefaults {
            full_scan_schedule: Some(schedule),
            ..self
        }
    }

    /// These defaults with a monthly request budget.
    pub const fn with_monthly_request_budget(self, requests: u64) -> SourceDefaults {
        SourceDefaults {
            monthly_request_budget: Some(requests),
            ..self
        }
    }
}

/// A kind's own settings, parsed and validated. The adapter reads them back with
/// [`SourceConfig::options`].
pub trait SourceOptions: std::any::Any + fmt::Debug + Send + Sync {
    /// The settings as TOML lines (defaults filled in), for `check-config`. Plain keys first;
    /// a sub-table (`[sources.fields]`) last.
    fn to_toml(&self) -> String;
}

/// Parses a kind's keys into its raw settings type (`#[serde(deny_unknown_fields)]`), with
/// errors that name the key (`sources[1].scan`) and, for an unknown key, what the kind takes.
pub fn parse_options<T: serde::de::DeserializeOwned>(
    at: &str,
    kind: &str,
    keys: Keys,
) -> Result<T, ConfigError> {
    config::Value::new(None, config::ValueKind::Table(keys))
        .try_deserialize()
        .map_err(|e| {
            let text = tidy_config_error(&e);
            let problem = match text.strip_prefix("unknown field ") {
                Some(rest) => format!(
                    "unknown key {rest} for a {kind} source; common keys: {}",
                    COMMON_KEYS.join(", ")
                ),
                None => text,
            };
            ConfigError::new(at, problem)
        })
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Unique name: used in the state file, metrics, logs and `--source`.
    pub name: String,
    /// The kind's name, as in `kind = "…"`.
    pub kind: &'static str,
    /// RevKeen's `{source}` path segment. Default: the kind.
    pub revkeen_source: String,
    pub base_url: Url,
    /// Replaced in place when `SIGHUP` re-reads the key files (every clone shares it).
    pub api_key: SecretCell,
    /// Cron schedule with seconds (`sec min hour day month weekday`).
    pub schedule: String,
    /// When a poll lists every record rather than what changed (cron with seconds; the
    /// kind's default; `"off"` in the file: never). A safety net under incremental cursors.
    pub full_scan_schedule: Option<String>,
    /// Client-side limit on requests to this source.
    pub requests_per_second: u32,
    pub burst: u32,
    /// ISO 3166-1 alpha-2 country for phone numbers written without a country code.
    pub default_country: String,
    /// Per-request timeout in seconds. Default 30.
    pub timeout_secs: u64,
    /// Fetch attempts per page (5xx, timeouts, 429s) before a poll gives up; it resumes at
    /// that page next time. Default 8 (about a minute of backoff).
    pub max_attempts: u32,
    /// The longest a 429's `Retry-After` may pause requests to this source, in seconds.
    /// Default 900.
    pub max_retry_after_secs: u64,
    /// Enables `POST /v1/changes/{name}` for this source when set.
    pub push_secret: Option<SecretCell>,
    /// Requests the daemon may send this source in a calendar month (UTC), every request
    /// counted; `None` is unlimited (`monthly_request_budget = 0`). Default: the kind's
    /// (Wodify 250,000, half its documented quota; PracticeHub unlimited).
    pub monthly_request_budget: Option<u64>,
    /// The kind's own settings.
    pub options: Arc<dyn SourceOptions>,
}

impl SourceConfig {
    /// The kind's own settings, as the kind's type (`None` for another kind's).
    pub fn options<T: SourceOptions>(&self) -> Option<&T> {
        let options: &dyn std::any::Any = self.options.as_ref();
        options.downcast_ref()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shapes, as written in the file. Every field optional so that defaults and validation
// happen in one place with messages that name the key.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    revkeen: RawRevKeen,
    #[serde(default)]
    sources: Vec<Keys>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_path: Option<PathBuf>,
    listen: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    drain_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevKeen {
    base_url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    requests_per_minute: Option<u32>,
    burst: Option<u32>,
    batch_size: Option<usize>,
    concurrency: Option<usize>,
    timeout_secs: Option<u64>,
    max_attempts: Option<u32>,
    api_version: Option<String>,
    max_retry_after_secs: Option<u64>,
}

/// The keys every `[[sources]]` entry may have, whatever its kind (the fields of [`RawSource`]).
const COMMON_KEYS: &[&str] = &[
    "name",
    "kind",
    "revkeen_source",
    "base_url",
    "api_key",
    "api_key_file",
    "schedule",
    "full_scan_schedule",
    "requests_per_second",
    "burst",
    "default_country",
    "timeout_secs",
    "max_attempts",
    "max_retry_after_secs",
    "monthly_request_budget",
    "push_secret",
    "push_secret_file",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Option<String>,
    kind: Option<String>,
    revkeen_source: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    schedule: Option<String>,
    full_scan_schedule: Option<String>,
    requests_per_second: Option<u32>,
    burst: Option<u32>,
    default_country: Option<String>,
    timeout_secs: Option<u64>,
    max_attempts: Option<u32>,
    max_retry_after_secs: Option<u64>,
    monthly_request_budget: Option<u64>,
    push_secret: Option<String>,
    push_secret_file: Option<PathBuf>,
}

/// What the process environment contributes: overrides, and the paths secrets may come from.
/// Kept apart from `std::env` so tests can load configs without touching the real environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `(NAME, value)` pairs; only `SYNC_DAEMON__…` names are used as overrides.
    pub vars: Vec<(String, String)>,
}

impl Environment {
    /// The real process environment.
    pub fn from_process() -> Self {
        Environment {
            vars: std::env::vars().collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn overrides(&self) -> impl Iterator<Item = (String, &str, &str)> {
        self.vars.iter().filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            Some((override_path(rest), name.as_str(), value.as_str()))
        })
    }
}

/// `SOURCES__0__API_KEY` → `sources[0].api_key`.
fn override_path(rest: &str) -> String {
    let mut path = String::new();
    for segment in rest.split("__") {
        let segment = segment.to_ascii_lowercase();
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push('[');
            path.push_str(&segment);
            path.push(']');
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
}

/// Which config file to read: `--config`, else `SYNC_DAEMON_CONFIG`, else the default path.
/// The flag says whether the file must exist (an explicit path must; the default may be absent
/// when the environment carries the whole config, as in a container).
pub fn config_path(cli: Option<&Path>, env: &Environment) -> (PathBuf, bool) {
    if let Some(path) = cli {
        return (path.to_path_buf(), true);
    }
    if let Some(path) = env.get("SYNC_DAEMON_CONFIG") {
        return (PathBuf::from(path), true);
    }
    (PathBuf::from(DEFAULT_CONFIG_PATH), false)
}

impl Config {
    /// Reads and validates the configuration from the process environment; `kinds` are the
    /// source kinds it may name.
    pub fn load(cli_path: Option<&Path>, kinds: Kinds) -> Result<Config, ConfigError> {
        Config::load_with(cli_path, &Environment::from_process(), kinds)
    }

    /// Reads and validates the configuration with an explicit environment.
    pub fn load_with(
        cli_path: Option<&Path>,
        env: &Environment,
        kinds: Kinds,
    ) -> Result<Config, ConfigError> {
        let (path, required) = config_path(cli_path, env);
        let mut builder = config::Config::builder();
        let has_overrides = env.overrides().next().is_some();
        if path.exists() {
            builder = builder.add_source(
                config::File::from(path.clone())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        } else if required || !has_overrides {
            return Err(ConfigError::new(
                "config file",
                format!(
                    "{} does not exist: pass --config PATH, set SYNC_DAEMON_CONFIG, or configure \
                     everything through SYNC_DAEMON__… environment variables",
                    path.display()
                ),
            ));
        }
        for (key, name, value) in env.overrides() {
            builder = builder.set_override(key.as_str(), value).map_err(|e| {
                ConfigError::new(key.clone(), format!("bad override from {name}: {e}"))
            })?;
        }
        let raw: RawConfig = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                let problem = tidy_config_error(&e);
                // A bad value that came from the environment is named by its variable: the
                // file is not where to look.
                match env
                    .overrides()
                    .find(|(key, _, _)| problem.contains(&format!("`{key}`")))
                {
                    Some((_, name, _)) => ConfigError::new(
                        name,
                        format!("{problem} (from the environment, overriding the file)"),
                    ),
                    None => ConfigError::new(path.display().to_string(), problem),
                }
            })?;
        Config::from_raw(raw, env, kinds)
    }

    /// Parses a TOML string (used by tests and `demo`), then applies defaults and validation.
    pub fn from_toml(toml: &str, env: &Environment, kinds: Kinds) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::new("config", tidy_config_error(&e)))?;
        Config::from_raw(raw, env, kinds)
    }

    /// The sources selected by `--source` (all when the list is empty).
    pub fn selected_sources(&self, names: &[String]) -> Result<Vec<SourceConfig>, UnknownSource> {
        for name in names {
            if !self.sources.iter().any(|s| &s.name == name) {
                return Err(UnknownSource {
                    name: name.clone(),
                    known: self.sources.iter().map(|s| s.name.clone()).collect(),
                });
            }
        }
        Ok(self
            .sources
            .iter()
            .filter(|s| names.is_empty() || names.contains(&s.name))
            .cloned()
            .collect())
    }

    /// The effective configuration as TOML, every default filled in and secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let d = &self.daemon;
        let r = &self.revkeen;
        let mut out = format!(
            "[daemon]\nstate_path = {}\nlisten = {}\nlog_format = {}\nlog_level = {}\ndrain_timeout_secs = {}\n\n\
             [revkeen]\nbase_url = {}\napi_key = \"[redacted]\"\nrequests_per_minute = {}\nburst = {}\n\
             batch_size = {}\nconcurrency = {}\ntimeout_secs = {}\nmax_attempts = {}\napi_version = {}\n\
             max_retry_after_secs = {}\n",
            q(&d.state_path.display().to_string()),
            q(&d.listen.to_string()),
            q(match d.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }),
            q(&d.log_level),
            d.drain_timeout_secs,
            q(r.base_url.as_str()),
            r.requests_per_minute,
            r.burst,
            r.batch_size,
            r.concurrency,
            r.timeout_secs,
            r.max_attempts,
            q(&r.api_version),
            r.max_retry_after_secs,
        );
        for source in &self.sources {
            out.push_str(&format!(
                "\n[[sources]]\nname = {}\nkind = {}\nrevkeen_source = {}\nbase_url = {}\napi_key = \"[redacted]\"\n\
                 schedule = {}\nrequests_per_second = {}\nburst = {}\ndefault_country = {}\ntimeout_secs = {}\n\
                 max_attempts = {}\nmax_retry_after_secs = {}\nmonthly_request_budget = {}\n",
                q(&source.name),
                q(source.kind),
                q(&source.revkeen_source),
                q(source.base_url.as_str()),
                q(&source.schedule),
                source.requests_per_second,
                source.burst,
                q(&source.default_country),
                source.timeout_secs,
                source.max_attempts,
                source.max_retry_after_secs,
                source.monthly_request_budget.unwrap_or(0),
            ));
            out.push_str(&format!(
                "full_scan_schedule = {}\n",
                q(source
                    .full_scan_schedule
                    .as_deref()
                    .unwrap_or(FULL_SCAN_OFF))
            ));
            if source.push_secret.is_some() {
                out.push_str("push_secret = \"[redacted]\"\n");
            }
            out.push_str(&source.options.to_toml());
        }
        out
    }

    fn from_raw(raw: RawConfig, env: &Environment, kinds: Kinds) -> Result<Config, ConfigError> {
        // Only what this config reads counts (an earlier load that failed left its own).
        EXPOSED_KEY_FILES.with(|found| found.borrow_mut().clear());
        let credentials = env.get("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let daemon = daemon_config(raw.daemon, env)?;
        let revkeen = revkeen_config(raw.revkeen, credentials.as_deref())?;
        if raw.sources.is_empty() {
            return Err(ConfigError::new(
                "sources",
                format!(
                    "no [[sources]] configured: add at least one (kind = {})",
                    kind_names(kinds)
                ),
            ));
        }
        let mut sources = Vec::with_capacity(raw.sources.len());
        let mut names = HashSet::new();
        let mut revkeen_sources = HashSet::new();
        for (index, raw) in raw.sources.into_iter().enumerate() {
            let source = source_config(index, raw, credentials.as_deref(), kinds)?;
            if !names.insert(source.name.clone()) {
                return Err(ConfigError::new(
                    format!("sources[{index}].name"),
                    format!(
                        "{:?} is used by another source: names must be unique",
                        source.name
                    ),
                ));
            }
            if !revkeen_sources.insert(source.revkeen_source.clone()) {
                return Err(ConfigError::new(
                    format!("sources[{index}].revkeen_source"),
                    format!(
                        "{:?} is already written by another source: two sources sharing RevKeen's \
                         {{source}} would overwrite each other's customers; set a distinct \
                         revkeen_source",
                        source.revkeen_source
                    ),
                ));
            }
            sources.push(source);
        }
        Ok(Config {
            daemon,
            revkeen,
            sources,
            warnings: EXPOSED_KEY_FILES.with(|found| std::mem::take(&mut *found.borrow_mut())),
        })
    }
}

/// A `config` crate error made safe and readable: the TOML parser quotes the offending line,
/// which may hold an API key (`api_key = "rk_live_…` with a missing quote), so quoted source
/// lines are dropped and only the position and the problem are kept; and paths rendered as
/// `sources[1]requests_per_second` get their missing dot.
fn tidy_config_error(error: &config::ConfigError) -> String {
    let text = error.to_string();
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            let gutter = trimmed.trim_start_matches(|c: char| c.is_ascii_digit());
            !gutter.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    kept.join(": ").replace("]", "].").replace("].`", "]`")
}

fn daemon_config(raw: RawDaemon, env: &Environment) -> Result<DaemonConfig, ConfigError> {
    let state_path = raw.state_path.unwrap_or_else(|| {
        env.get("STATE_DIRECTORY")
            // systemd may pass several directories separated by ':'; ours is the first.
            .and_then(|dirs| dirs.split(':').next())
            .map(|dir| Path::new(dir).join("state.db"))
            .unwrap_or_else(|| PathBuf::from("state.db"))
    });
    let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:9440".to_string());
    let listen = listen_text.parse().map_err(|_| {
        ConfigError::new(
            "daemon.listen",
            format!("{listen_text:?} is not an address with a port, e.g. \"127.0.0.1:9440\""),
        )
    })?;
    let log_format = match raw.log_format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::new(
                "daemon.log_format",
                format!("{other:?} is not a log format: use \"text\" or \"json\""),
            ));
        }
    };
    let log_level = raw.log_level.unwrap_or_else(|| "info".to_string());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(ConfigError::new(
            "daemon.log_level",
            format!("{log_level:?} is not a log filter: use error, warn, info, debug or trace"),
        ));
    }
    Ok(DaemonConfig {
        state_path,
        listen,
        log_format,
        log_level,
        drain_timeout_secs: raw.drain_timeout_secs.unwrap_or(10),
    })
}

fn revkeen_config(
    raw: RawRevKeen,
    credentials: Option<&Path>,
) -> Result<RevKeenConfig, ConfigError> {
    let base_url = base_url(
        "revkeen.base_url",
        raw.base_url
            .as_deref()
            .or(Some("https://api.revkeen.com/v2")),
    )?;
    let api_key = secret(
        "revkeen",
        raw.api_key,
        raw.api_key_file,
        credentials,
        &["revkeen_api_key"],
    )?;
    let batch_size = raw.batch_size.unwrap_or(100);
    if !(1..=100).contains(&batch_size) {
        return Err(ConfigError::new(
            "revkeen.batch_size",
            format!(
                "{batch_size} is out of range: RevKeen takes 1 to 100 customers per batch (1 = single upserts)"
            ),
        ));
    }
    let requests_per_minute =
        positive("revkeen.requests_per_minute", raw.requests_per_minute, 1000)?;
    let burst = positive("revkeen.burst", raw.burst, 2000)?;
    let concurrency =
        positive("revkeen.concurrency", raw.concurrency.map(|c| c as u32), 4)? as usize;
    let max_attempts = positive("revkeen.max_attempts", raw.max_attempts, 25)?;
    let timeout_secs = u64::from(positive(
        "revkeen.timeout_secs",
        raw.timeout_secs.map(|t| t.min(u64::from(u32::MAX)) as u32),
        30,
    )?);
    Ok(RevKeenConfig {
        base_url,
        api_key: SecretCell::new(api_key),
        requests_per_minute,
        burst,
        batch_size,
        concurrency,
        timeout_secs,
        max_attempts,
        api_version: raw.api_version.unwrap_or_else(|| "2026-05-01".to_string()),
        max_retry_after_secs: max_wait("revkeen.max_retry_after_secs", raw.max_retry_after_secs)?,
    })
}

fn source_config(
    index: usize,
    mut keys: Keys,
    credentials: Option<&Path>,
    kinds: Kinds,
) -> Result<SourceConfig, ConfigError> {
    let at = format!("sources[{index}]");
    let key = |field: &str| format!("{at}.{field}");
    // The common keys are this file's; everything else belongs to the kind.
    let common: Keys = COMMON_KEYS
        .iter()
        .filter_map(|k| keys.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let raw: RawSource = config::Value::new(None, config::ValueKind::Table(common))
        .try_deserialize()
        .map_err(|e| ConfigError::new(&at, tidy_config_error(&e)))?;
    let name = source_name(&key("name"), raw.name)?;
    let kind = source_kind(&key("kind"), raw.kind, kinds)?;
    let defaults = kind.defaults();
    let Some(base_url_text) = raw.base_url.as_deref() else {
        return Err(ConfigError::new(
            key("base_url"),
            format!(
                "missing: set the {} API address, e.g. \"{}\"",
                kind.name(),
                defaults.base_url_example
            ),
        ));
    };
    let base_url = kind.normalize_base_url(base_url(&key("base_url"), Some(base_url_text))?);
    let api_key = secret(
        &at,
        raw.api_key,
        raw.api_key_file,
        credentials,
        &[
            &format!("{name}_api_key"),
            &format!("{}_api_key", kind.name()),
        ],
    )?;
    let schedule = raw
        .schedule
        .unwrap_or_else(|| defaults.schedule.to_string());
    cron(&key("schedule"), &schedule)?;
    let full_scan_schedule = match raw.full_scan_schedule {
        None => defaults.full_scan_schedule.map(str::to_string),
        Some(off) if off.trim() == FULL_SCAN_OFF => None,
        Some(schedule) => {
            cron(&key("full_scan_schedule"), &schedule).map_err(|error| {
                ConfigError::new(
                    &error.key,
                    format!("{}, or \"{FULL_SCAN_OFF}\" for none", error.problem),
                )
            })?;
            Some(schedule)
        }
    };
    let requests_per_second = positive(
        &key("requests_per_second"),
        raw.requests_per_second,
        defaults.requests_per_second,
    )?;
    let burst = positive(&key("burst"), raw.burst, defaults.burst)?;
    let default_country = country(
        &key("default_country"),
        raw.default_country
            .unwrap_or_else(|| defaults.default_country.to_string()),
    )?;
    let push_secret = match (raw.push_secret, raw.push_secret_file) {
        (None, None) => None,
        (inline, file) => Some(SecretCell::new(secret(
            &format!("{at}.push"),
            inline,
            file,
            None,
            &[],
        )?)),
    };
    let options = kind.options(&at, keys)?;
    Ok(SourceConfig {
        revkeen_source: raw
            .revkeen_source
            .unwrap_or_else(|| kind.name().to_string()),
        name,
        kind: kind.name(),
        base_url,
        api_key: SecretCell::new(api_key),
        schedule,
        full_scan_schedule,
        requests_per_second,
        burst,
        default_country,
        timeout_secs: raw.timeout_secs.unwrap_or(30).max(1),
        max_attempts: positive(&key("max_attempts"), raw.max_attempts, 8)?,
        max_retry_after_secs: max_wait(&key("max_retry_after_secs"), raw.max_retry_after_secs)?,
        // 0 switches a kind's default budget off.
        monthly_request_budget: match raw.monthly_request_budget {
            Some(0) => None,
            Some(requests) => Some(requests),
            None => defaults.monthly_request_budget,
        },
        push_secret,
        options,
    })
}

/// A source's name: 1-64 letters, digits, '-' or '_' (it appears in URLs and metrics).
fn source_name(key: &str, name: Option<String>) -> Result<String, ConfigError> {
    let name =
        name.ok_or_else(|| ConfigError::new(key, "missing: every source needs a unique name"))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::new(
            key,
            format!(
                "{name:?} is not a valid name: use 1-64 letters, digits, '-' or '_' (it appears in URLs and metrics)"
            ),
        ));
    }
    Ok(name)
}

/// The kind a source names, among those this build knows.
fn source_kind(
    key: &str,
    kind: Option<String>,
    kinds: Kinds,
) -> Result<&'static dyn SourceKind, ConfigError> {
    let kind =
        kind.ok_or_else(|| ConfigError::new(key, format!("missing: use {}", kind_names(kinds))))?;
    kinds
        .iter()
        .copied()
        .find(|k| k.name() == kind)
        .ok_or_else(|| {
            ConfigError::new(
                key,
                format!("unknown source kind {kind:?}: use {}", kind_names(kinds)),
            )
        })
}

/// The `full_scan_schedule` that turns full scans off.
pub const FULL_SCAN_OFF: &str = "off";

/// A cron schedule with seconds, as the scheduler will read it.
pub fn cron(key: &str, schedule: &str) -> Result<(), ConfigError> {
    crate::schedule::parse(schedule)
        .map(drop)
        .map_err(|problem| {
            ConfigError::new(
                key,
                format!(
                    "{schedule:?} is not a valid schedule ({problem}): use cron with seconds, \
                 `sec min hour day month weekday`, e.g. \"0 */15 * * * *\""
                ),
            )
        })
}

/// An ISO 3166-1 alpha-2 country code, upper-cased.
fn country(key: &str, code: String) -> Result<String, ConfigError> {
    let code = code.to_ascii_uppercase();
    if code.parse::<phonenumber::country::Id>().is_err() {
        return Err(ConfigError::new(
            key,
            format!("{code:?} is not an ISO 3166-1 alpha-2 country code, e.g. \"US\" or \"GB\""),
        ));
    }
    Ok(code)
}

/// The cap on a `Retry-After` wait: default 900 s (15 minutes), at least 1 s, at most a day.
fn max_wait(key: &str, value: Option<u64>) -> Result<u64, ConfigError> {
    match value.unwrap_or(900) {
        0 => Err(ConfigError::new(
            key,
            "0 is not allowed: use 1 to 86400 seconds",
        )),
        secs @ 1..=86_400 => Ok(secs),
        secs => Err(ConfigError::new(
            key,
            format!("{secs} is more than a day: use 1 to 86400 seconds"),
        )),
    }
}

fn positive(key: &str, value: Option<u32>, default: u32) -> Result<u32, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(
            key,
            "0 is not allowed: use a positive number",
        )),
        Some(v) => Ok(v),
    }
}

/// Parses a base URL: https anywhere, plain http only to loopback (a simulator or a local
/// proxy), because API keys travel in headers.
fn base_url(key: &str, value: Option<&str>) -> Result<Url, ConfigError> {
    let text = value.ok_or_else(|| ConfigError::new(key, "missing"))?;
    let mut url = Url::parse(text).map_err(|e| {
        ConfigError::new(
            key,
            format!("{text:?} is not a URL ({e}), e.g. \"https://api.example.com/v1\""),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(ConfigError::new(
                key,
                format!(
                    "{text:?} uses plain http to a remote host, which would send the API key unencrypted: use https:// (http:// is allowed only to 127.0.0.1, ::1 or localhost)"
                ),
            ));
        }
        other => {
            return Err(ConfigError::new(
                key,
                format!("{text:?} has scheme {other:?}: use https://"),
            ));
        }
    }
    // Joining relative paths onto a base without a trailing slash drops its last segment.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

thread_local! {
    /// Key files found readable by others while the config being built read its secrets.
    static EXPOSED_KEY_FILES: std::cell::RefCell<Vec<String>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes a key file that group or others may read (as ssh does for a private key).
fn check_key_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        let shown = path.display();
        EXPOSED_KEY_FILES.with(|found| {
            found.borrow_mut().push(format!(
                "UNPROTECTED KEY FILE: {shown} is readable by others (mode {mode:04o}): anyone on this host can read the key; run chmod 600 {shown}"
            ))
        });
    }
}

/// The ID of the units' `LoadCredential=` of a whole directory: systemd names each file's
/// credential `<ID>_<file name>` (systemd.exec(5)), so `revkeen_api_key` in
/// `/etc/sync-daemon/credentials` arrives as `sync-daemon_revkeen_api_key`.
const CREDENTIAL_DIRECTORY_ID: &str = "sync-daemon";

/// Reads a secret: `<prefix>.api_key_file`, else `<prefix>.api_key`, else the first of
/// `credential_names` present in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), as
/// itself or as loaded from a directory (`sync-daemon_<name>`).
fn secret(
    prefix: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    credentials: Option<&Path>,
    credential_names: &[&str],
) -> Result<Secret, ConfigError> {
    let (inline_key, file_key) = if prefix.ends_with(".push") {
        let base = prefix.trim_end_matches(".push");
        (
            format!("{base}.push_secret"),
            format!("{base}.push_secret_file"),
        )
    } else {
        (
            format!("{prefix}.api_key"),
            format!("{prefix}.api_key_file"),
        )
    };
    if let Some(path) = file {
        check_key_file(&path);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::new(
                &file_key,
                format!(
                    "cannot read {}: {e}; check the path and that the service user may read it",
                    path.display()
                ),
            )
        })?;
        return non_empty(
            &file_key,
            text.trim(),
            &format!("{} is empty", path.display()),
        );
    }
    if let Some(value) = inline {
        return non_empty(&inline_key, value.trim(), "is empty");
    }
    if let Some(dir) = credentials {
        // `LoadCredential=revkeen_api_key:/path` names the credential itself; the units load
        // the whole directory (`LoadCredential=sync-daemon:/etc/sync-daemon/credentials`),
        // which systemd names `sync-daemon_<file name>`.
        let paths = credential_names.iter().flat_map(|name| {
            [
                dir.join(name),
                dir.join(format!("{CREDENTIAL_DIRECTORY_ID}_{name}")),
            ]
        });
        for path in paths {
            // systemd makes credentials private to the service: no mode to check.
            if let Ok(text) = std::fs::read_to_string(&path) {
                return non_empty(
                    &file_key,
                    text.trim(),
                    &format!("credential {} is empty", path.display()),
                );
            }
        }
    }
    let mut sources = vec![
        format!("{file_key} = \"/path/to/key\""),
        format!("{inline_key} = \"…\""),
    ];
    if let Some(first) = credential_names.first() {
        sources.push(format!("a systemd credential named {first}"));
    }
    Err(ConfigError::new(
        &inline_key,
        format!("missing: set one of {}", sources.join(", ")),
    ))
}

fn non_empty(key: &str, value: &str, problem: &str) -> Result<Secret, ConfigError> {
    if value.is_empty() {
        Err(ConfigError::new(key, problem.to_string()))
    } else {
        Ok(Secret::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind with no keys of its own: these tests are about the common keys.
    struct Fake;

    #[derive(Debug)]
    struct FakeOptions;

    impl SourceOptions for FakeOptions {
        fn to_toml(&self) -> String {
            String::new()
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoKeys {}

    impl SourceKind for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn defaults(&self) -> SourceDefaults {
            SourceDefaults::new(
                "0 */15 * * * *",
                (5, 20),
                "US",
                "https://api.fake.example/v1",
            )
        }
        fn options(&self, at: &str, keys: Keys) -> Result<Arc<dyn SourceOptions>, ConfigError> {
            parse_options::<NoKeys>(at, "fake", keys)?;
            Ok(Arc::new(FakeOptions))
        }
    }

    const KINDS: Kinds = &[&Fake];

    const MINIMAL: &str = r#"
[revkeen]
base_url = "http://127.0.0.1:1/v2"
api_key = "rk_sandbox_abc"

[[sources]]
name = "main-gym"
kind = "fake"
base_url = "http://127.0.0.1:2/v1"
api_key = "wodify-secret"
"#;

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn error_for(toml: &str) -> ConfigError {
        Config::from_toml(toml, &Environment::default(), KINDS)
            .expect_err("config should be refused")
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_toml(MINIMAL, &Environment::default(), KINDS).expect("valid");
        assert_eq!(config.revkeen.requests_per_minute, 1000);
        assert_eq!(config.revkeen.burst, 2000);
        assert_eq!(config.revkeen.batch_size, 100);
        assert_eq!(config.revkeen.concurrency, 4);
        assert_eq!(config.revkeen.max_attempts, 25);
        let source = &config.sources[0];
        assert_eq!(source.revkeen_source, "fake");
        assert_eq!(source.schedule, "0 */15 * * * *");
        assert_eq!((source.requests_per_second, source.burst), (5, 20));
        assert_eq!(source.default_country, "US");
        assert_eq!(config.daemon.state_path, PathBuf::from("state.db"));
        assert_eq!(config.daemon.listen.to_string(), "127.0.0.1:9440");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = Config::from_toml(MINIMAL, &Environment::default(), KINDS).expect("valid");
        let redacted = config.to_redacted_toml();
        assert!(!redacted.contains("rk_sandbox_abc") && !redacted.contains("wodify-secret"));
        // The redacted rendering is itself a valid config once keys are supplied again.
        let again = Config::from_toml(
            &redacted.replace("\"[redacted]\"", "\"k\""),
            &Environment::default(),
            KINDS,
        )
        .expect("round trip");
        assert_eq!(again.sources[0].schedule, config.sources[0].schedule);
        let debug = format!("{config:?}");
        assert!(!debug.contains("rk_sandbox_abc"), "{debug}");
        assert!(!debug.contains("wodify-secret"), "{debug}");
        assert!(debug.contains("[redacted]"));
    }

    #[test]
    fn unknown_kind_names_key_and_value() {
        let error = error_for(&MINIMAL.replace("kind = \"fake\"", "kind = \"fak\""));
        assert_eq!(error.key, "sources[0].kind");
        assert!(error.problem.contains("\"fak\""), "{error}");
    }

    #[test]
    fn missing_base_url_is_named() {
        let error = error_for(&MINIMAL.replace("base_url = \"http://127.0.0.1:2/v1\"", ""));
        assert_eq!(error.key, "sources[0].base_url");
    }

    #[test]
    fn invalid_schedule_is_named() {
        let error = error_for(&format!("{MINIMAL}schedule = \"*/5 * * *\"\n"));
        assert_eq!(error.key, "sources[0].schedule");
        assert!(error.problem.contains("\"*/5 * * *\""), "{error}");
    }

    #[test]
    fn duplicate_source_name_is_refused() {
        let second = "\n[[sources]]\nname = \"main-gym\"\nkind = \"fake\"\nrevkeen_source = \"w2\"\nbase_url = \"https://api.fake.example/v1\"\napi_key = \"k\"\n";
        let error = error_for(&format!("{MINIMAL}{second}"));
        assert_eq!(error.key, "sources[1].name");
    }

    #[test]
    fn shared_revkeen_source_is_refused() {
        let second = "\n[[sources]]\nname = \"second-gym\"\nkind = \"fake\"\nbase_url = \"https://api.fake.example/v1\"\napi_key = \"k\"\n";
        let error = error_for(&format!("{MINIMAL}{second}"));
        assert_eq!(error.key, "sources[1].revkeen_source");
    }

    #[test]
    fn plain_http_to_a_remote_host_is_refused() {
        let error =
            error_for(&MINIMAL.replace("http://127.0.0.1:1/v2", "http://api.revkeen.com/v2"));
        assert_eq!(error.key, "revkeen.base_url");
        assert!(
            error.problem.contains("http://api.revkeen.com/v2"),
            "{error}"
        );
        for ok in [
            "http://localhost:8080/v2",
            "http://[::1]:8080/v2",
            "https://api.revkeen.com/v2",
        ] {
            Config::from_toml(
                &MINIMAL.replace("http://127.0.0.1:1/v2", ok),
                &Environment::default(),
                KINDS,
            )
            .expect(ok);
        }
    }

    #[test]
    fn a_syntax_error_never_quotes_the_line_that_holds_a_key() {
        for broken in [
            "[revkeen]\napi_key = \"rk_live_secret\n",
            "[revkeen]\napi_key = \"rk_live_secret\"\napi_key = \"rk_live_secret\"\n",
            "[revkeen]\napi_key = \"rk_live_secret\" trailing\n",
        ] {
            let error = error_for(broken);
            assert!(!error.to_string().contains("rk_live_secret"), "{error}");
            assert!(
                error.to_string().contains("TOML parse error at line"),
                "{error}"
            );
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let error =
            error_for(&MINIMAL.replace("kind = \"fake\"", "kind = \"fake\"\nshedule = \"x\""));
        assert!(error.problem.contains("shedule"), "{error}");
    }

    #[test]
    fn missing_key_lists_the_ways_to_give_one() {
        let error = error_for(&MINIMAL.replace("api_key = \"wodify-secret\"", ""));
        assert_eq!(error.key, "sources[0].api_key");
        assert!(error.problem.contains("api_key_file"), "{error}");
    }

    #[test]
    fn secrets_come_from_files_and_credentials_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("revkeen_api_key"), "rk_from_credential\n").expect("write");
        std::fs::write(dir.path().join("wodify.key"), "  from_file \n").expect("write");
        let toml = MINIMAL.replace("api_key = \"rk_sandbox_abc\"", "").replace(
            "api_key = \"wodify-secret\"",
            &format!(
                "api_key_file = \"{}\"",
                dir.path().join("wodify.key").display()
            ),
        );
        let env = env(&[("CREDENTIALS_DIRECTORY", dir.path().to_str().expect("utf-8"))]);
        let config = Config::from_toml(&toml, &env, KINDS).expect("valid");
        assert_eq!(
            config.revkeen.api_key.current().expose(),
            "rk_from_credential"
        );
        assert_eq!(config.sources[0].api_key.current().expose(), "from_file");
    }

    #[test]
    fn credentials_loaded_from_a_directory_are_found_under_the_units_prefix() {
        // What `LoadCredential=sync-daemon:/etc/sync-daemon/credentials` makes of the files
        // `revkeen_api_key` and `main-gym_api_key` in that directory.
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, key) in [
            ("sync-daemon_revkeen_api_key", "rk_from_directory\n"),
            ("sync-daemon_main-gym_api_key", "gym_from_directory"),
        ] {
            std::fs::write(dir.path().join(name), key).expect("write");
        }
        let toml = MINIMAL
            .replace("api_key = \"rk_sandbox_abc\"", "")
            .replace("api_key = \"wodify-secret\"", "");
        let env = env(&[("CREDENTIALS_DIRECTORY", dir.path().to_str().expect("utf-8"))]);
        let config = Config::from_toml(&toml, &env, KINDS).expect("valid");
        assert_eq!(
            config.revkeen.api_key.current().expose(),
            "rk_from_directory"
        );
        assert_eq!(
            config.sources[0].api_key.current().expose(),
            "gym_from_directory"
        );
    }

    #[test]
    fn environment_overrides_every_level_including_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        let env = env(&[
            ("SYNC_DAEMON__REVKEEN__BATCH_SIZE", "7"),
            ("SYNC_DAEMON__SOURCES__0__DEFAULT_COUNTRY", "ca"),
            ("SYNC_DAEMON__DAEMON__STATE_PATH", "/tmp/x.db"),
        ]);
        let config = Config::load_with(Some(&path), &env, KINDS).expect("valid");
        assert_eq!(config.revkeen.batch_size, 7);
        assert_eq!(config.sources[0].default_country, "CA");
        assert_eq!(config.sources[0].name, "main-gym");
        assert_eq!(config.daemon.state_path, PathBuf::from("/tmp/x.db"));
    }

    #[test]
    fn environment_alone_can_configure_everything() {
        let env = env(&[
            ("SYNC_DAEMON__REVKEEN__BASE_URL", "http://127.0.0.1:1/v2"),
            ("SYNC_DAEMON__REVKEEN__API_KEY", "rk"),
            ("SYNC_DAEMON__SOURCES__0__NAME", "gym"),
            ("SYNC_DAEMON__SOURCES__0__KIND", "fake"),
            ("SYNC_DAEMON__SOURCES__0__BASE_URL", "http://127.0.0.1:2/v1"),
            ("SYNC_DAEMON__SOURCES__0__API_KEY", "w"),
            ("SYNC_DAEMON__SOURCES__1__NAME", "clinic"),
            ("SYNC_DAEMON__SOURCES__1__KIND", "fake"),
            ("SYNC_DAEMON__SOURCES__1__REVKEEN_SOURCE", "fake2"),
            ("SYNC_DAEMON__SOURCES__1__REQUESTS_PER_SECOND", "7"),
            (
                "SYNC_DAEMON__SOURCES__1__BASE_URL",
                "http://127.0.0.1:3/api",
            ),
            ("SYNC_DAEMON__SOURCES__1__API_KEY", "p"),
        ]);
        let missing = Path::new("/nonexistent/sync-daemon.toml");
        // The default path may be absent when the environment carries the config …
        let (path, required) = config_path(None, &env);
        assert!(!required);
        assert_eq!(path, PathBuf::from(DEFAULT_CONFIG_PATH));
        let config = Config::load_with(None, &env, KINDS).expect("valid");
        assert_eq!(config.sources.len(), 2);
        // An override is text; a numeric key still reads it as a number.
        assert_eq!(config.sources[1].requests_per_second, 7);
        // … but an explicit path must exist.
        let error = Config::load_with(Some(missing), &env, KINDS).expect_err("missing file");
        assert!(error.problem.contains("/nonexistent/sync-daemon.toml"));
    }

    #[test]
    fn batch_size_over_100_is_refused() {
        let error = error_for(&MINIMAL.replace(
            "api_key = \"rk_sandbox_abc\"",
            "api_key = \"rk\"\nbatch_size = 101",
        ));
        assert_eq!(error.key, "revkeen.batch_size");
    }
}
