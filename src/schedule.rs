//! Cron schedules (with seconds), parsed exactly as tokio-cron-scheduler parses them so that a
//! schedule accepted by `check-config` is one the scheduler will run.

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// Parses `sec min hour day month weekday`; the error says what is wrong.
pub(crate) fn parse(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .map_err(|e| e.to_string())
}

/// The first time the schedule fires strictly after `after`.
pub(crate) fn next_after(schedule: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    parse(schedule)
        .ok()?
        .find_next_occurrence(&after, false)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_field_is_required() {
        assert!(parse("0 */15 * * * *").is_ok());
        assert!(parse("*/15 * * * *").is_err());
        assert!(parse("0 61 * * * *").is_err());
    }

    #[test]
    fn next_after_finds_the_next_quarter_hour() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T10:07:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let next = next_after("0 */15 * * * *", at).expect("fires");
        assert_eq!(next.to_rfc3339(), "2026-01-01T10:15:00+00:00");
    }
}
