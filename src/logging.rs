//! The log: where lines go and how they read. Text for people (colour only on a terminal and
//! without `NO_COLOR`), or one flat JSON object per line for shippers (`log_format = "json"`):
//! `timestamp`, `level`, `severity` (GCP's name for it), `message` and `target` at the top, the
//! event's fields beside them, then `service` and `version`. Records bridged from crates that
//! log through `log` keep their own target; their `log.file`/`log.line` (paths into the cargo
//! registry) are dropped.
//!
//! Under journald, journald stamps each line itself, so lines carry no timestamp, and each line
//! starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which
//! journald strips and records as the entry's priority, so `journalctl -p warning` finds the
//! warnings. The daemon is under journald when `$JOURNAL_STREAM` names the device and inode of
//! its own stderr (a variable inherited by a process whose stderr went elsewhere is ignored).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The `service` of every JSON line.
const SERVICE: &str = "sync-daemon";
/// The `version` of every JSON line.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs the process's log: `format`, at `level` unless `RUST_LOG` says otherwise, to stderr
/// (through `writer` when progress bars are drawn there). A second call changes nothing.
pub fn init<W>(format: LogFormat, level: &str, writer: Option<W>)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // The scheduler logs every job it creates at INFO: noise for an operator.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},tokio_cron_scheduler=warn"))
    });
    let writer = match writer {
        Some(writer) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(writer),
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .event_format(Prioritized {
                journal,
                inner: FlatJson,
            })
            .try_init(),
        // journald adds its own timestamps.
        LogFormat::Text if journal => builder
            .with_ansi(false)
            .event_format(Prioritized {
                journal,
                inner: tracing_subscriber::fmt::format().without_time(),
            })
            .try_init(),
        // Colour on a terminal, unless NO_COLOR is set to anything (no-color.org).
        LogFormat::Text => builder
            .with_ansi(
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()),
            )
            .try_init(),
    };
    // Only fails if a subscriber is already set, which is harmless.
    let _ = result;
}

/// Whether stderr is a journald stream: `$JOURNAL_STREAM` is `<device>:<inode>` of the stream
/// systemd connected, and it counts only while it is still our stderr.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = parse_journal_stream(&value.to_string_lossy()) else {
        return false;
    };
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(stderr)
        .metadata()
        .is_ok_and(|meta| meta.dev() == device && meta.ino() == inode)
}

/// `<device>:<inode>` as two numbers.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// The syslog priority journald reads from a line's `<N>` prefix.
fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A line format that, under journald, starts each line with its syslog priority.
struct Prioritized<F> {
    journal: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.journal {
            write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// One flat JSON object per event (the shape in this module's doc).
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let target = fields.log_target.take();
        let level = metadata.level();
        let mut line = String::with_capacity(256);
        line.push('{');
        push_pair(
            &mut line,
            "timestamp",
            &serde_json::Value::from(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        );
        push_pair(&mut line, "level", &serde_json::Value::from(level.as_str()));
        push_pair(
            &mut line,
            "severity",
            &serde_json::Value::from(gcp_severity(level)),
        );
        push_pair(
            &mut line,
            "message",
            &fields.message.take().unwrap_or(serde_json::Value::from("")),
        );
        push_pair(
            &mut line,
            "target",
            &serde_json::Value::from(target.as_deref().unwrap_or(metadata.target())),
        );
        for (name, value) in &fields.others {
            if !RESERVED.contains(&name.as_str()) {
                push_pair(&mut line, name, value);
            }
        }
        push_pair(&mut line, "service", &serde_json::Value::from(SERVICE));
        push_pair(&mut line, "version", &serde_json::Value::from(VERSION));
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// The top-level names a field cannot take (a field of that name is left out).
const RESERVED: [&str; 7] = [
    "timestamp",
    "level",
    "severity",
    "message",
    "target",
    "service",
    "version",
];

/// Appends `"name":value,` (without the comma before the first pair).
fn push_pair(line: &mut String, name: &str, value: &serde_json::Value) {
    if !line.ends_with('{') {
        line.push(',');
    }
    // Serializing a string or a `Value` into a `String` cannot fail.
    let _ = write!(
        line,
        "{}:{}",
        serde_json::Value::from(name),
        serde_json::to_string(value).unwrap_or_default()
    );
}

/// Google Cloud Logging's `severity` for a level.
fn gcp_severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// An event's fields as JSON values, in the order they were recorded.
#[derive(Default)]
struct Fields {
    message: Option<serde_json::Value>,
    /// The target of a record bridged from `log` (the bridge's own target is `log`).
    log_target: Option<String>,
    others: Vec<(String, serde_json::Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        match field.name() {
            "message" => self.message = Some(value),
            "log.target" => self.log_target = value.as_str().map(str::to_string),
            // The bridge's module path, file and line: the file is a path into the cargo
            // registry, of no use to an operator.
            name if name.starts_with("log.") => {}
            name => self.others.push((name.to_string(), value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("buffer").clone()).expect("utf-8")
        }
    }

    /// What `emit` logs through a JSON subscriber (under journald or not).
    fn json_lines(journal: bool, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_writer(move || writer.clone())
            .event_format(Prioritized {
                journal,
                inner: FlatJson,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        buffer.text()
    }

    #[test]
    fn json_lines_are_flat_with_service_and_version() {
        let text = json_lines(false, || {
            tracing::warn!(source = "gym", attempts = 3_u64, "Retrying a page.");
        });
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(value["message"], "Retrying a page.");
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["severity"], "WARNING");
        assert_eq!(value["target"], module_path!());
        assert_eq!(value["source"], "gym");
        assert_eq!(value["attempts"], 3);
        assert_eq!(value["service"], "sync-daemon");
        assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
        assert!(value.get("fields").is_none(), "nothing nests: {text}");
        let stamp = value["timestamp"].as_str().expect("a timestamp");
        assert!(
            chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
            "RFC 3339: {stamp}"
        );
    }

    #[test]
    fn bridged_log_records_keep_their_target_and_lose_registry_paths() {
        // What the `log` bridge records for a dependency's `log::debug!`.
        let text = json_lines(false, || {
            tracing::event!(
                target: "log",
                Level::DEBUG,
                log.target = "reqwest::connect",
                log.module_path = "reqwest::connect",
                log.file = "/root/.cargo/registry/src/index.crates.io-1/reqwest-0.13.5/src/connect.rs",
                log.line = 700_u64,
                "starting new connection"
            );
        });
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(value["target"], "reqwest::connect");
        assert_eq!(value["message"], "starting new connection");
        assert!(!text.contains("log."), "bridge fields left in: {text}");
        assert!(!text.contains(".cargo/registry"), "{text}");
    }

    #[test]
    fn a_field_cannot_take_a_top_level_name() {
        let text = json_lines(false, || {
            tracing::info!(service = "spoofed", level = "none", "Hello.");
        });
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(value["service"], "sync-daemon");
        assert_eq!(value["level"], "INFO");
        assert_eq!(text.matches("\"service\"").count(), 1, "{text}");
    }

    #[test]
    fn under_journald_each_line_starts_with_its_syslog_priority() {
        let text = json_lines(true, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let prefixes: Vec<&str> = text.lines().map(|line| &line[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{text}");
        for line in text.lines() {
            assert!(serde_json::from_str::<serde_json::Value>(&line[3..]).is_ok());
        }
        assert!(!json_lines(false, || tracing::warn!("w")).starts_with('<'));
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123_456)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
    }
}
