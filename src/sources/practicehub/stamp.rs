//! PracticeHub's times as the server writes them, and the cursor mark in the server's terms.
//!
//! A patient's `updated` is RFC 3339 in the documented shape and a naive
//! `YYYY-MM-DD HH:MM:SS` on live keys: the clinic's wall clock in its `timezone`. A [`Stamp`]
//! keeps which of the two it was, so the mark derived from it is sent back in the same form
//! and compared the way the server compares: a naive mark against the rows' wall-clock
//! times, a zoned one against instants. Converting a naive time to an instant (for
//! `external_updated_at`) reads a time in the hour the clocks go back as its first
//! occurrence and one in the hour they skip as an hour later.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDateTime, SecondsFormat, TimeDelta, Utc};
use chrono::{TimeZone, Timelike};
use chrono_tz::Tz;

/// A time as PracticeHub wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stamp {
    /// RFC 3339, with its offset.
    Zoned(DateTime<FixedOffset>),
    /// No zone: the clinic's wall clock.
    Naive(NaiveDateTime),
}

/// The naive forms accepted: a space (live keys) or a `T` between date and time, with an
/// optional fraction.
const NAIVE_FORMATS: &[&str] = &["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// How a naive stamp is written back (the live integrations' filter form).
const NAIVE_OUT: &str = "%Y-%m-%d %H:%M:%S";

impl Stamp {
    /// Reads a time in either form; `None` for anything else (a bare date included: it names
    /// no time of day), and for years outside 1‥9999, which RFC 3339 cannot write.
    pub(super) fn parse(text: &str) -> Option<Stamp> {
        let text = text.trim();
        let stamp = match DateTime::parse_from_rfc3339(text) {
            Ok(zoned) => Stamp::Zoned(zoned),
            Err(_) => NAIVE_FORMATS
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
                .map(Stamp::Naive)?,
        };
        let year = match stamp {
            Stamp::Zoned(zoned) => zoned.with_timezone(&Utc).year(),
            Stamp::Naive(naive) => naive.year(),
        };
        (1..=9999).contains(&year).then_some(stamp)
    }

    /// The instant, a naive time read in `zone`.
    pub(super) fn instant(&self, zone: Tz) -> DateTime<Utc> {
        match self {
            Stamp::Zoned(zoned) => zoned.with_timezone(&Utc),
            Stamp::Naive(naive) => local_instant(*naive, zone),
        }
    }

    /// The clinic's wall-clock time of it.
    fn wall(&self, zone: Tz) -> NaiveDateTime {
        match self {
            Stamp::Zoned(zoned) => zoned.with_timezone(&zone).naive_local(),
            Stamp::Naive(naive) => *naive,
        }
    }

    /// The same kind of stamp (naive, or zoned at the same offset) for `instant`.
    fn like(&self, instant: DateTime<Utc>, zone: Tz) -> Stamp {
        match self {
            Stamp::Zoned(zoned) => Stamp::Zoned(instant.with_timezone(zoned.offset())),
            Stamp::Naive(_) => Stamp::Naive(instant.with_timezone(&zone).naive_local()),
        }
    }

    /// Whether `self` sorts before `other` the way the server compares a filter on it:
    /// on the wall clock when `other` (the mark) is naive, as instants when it is zoned.
    pub(super) fn before(&self, other: &Stamp, zone: Tz) -> bool {
        match other {
            Stamp::Naive(mark) => self.wall(zone) < *mark,
            Stamp::Zoned(mark) => self.instant(zone) < mark.with_timezone(&Utc),
        }
    }

    /// Whether `self` is later than `other`, compared in `self`'s form.
    pub(super) fn after(&self, other: &Stamp, zone: Tz) -> bool {
        other.before(self, zone)
    }

    /// The mark a listing whose newest row is `self` leaves for the next: `self` at most
    /// `server_now` (a row stamped in the future must not push the mark past changes still to
    /// come), cut to whole seconds (the precision it is sent at), minus `overlap`.
    pub(super) fn mark(
        &self,
        server_now: Option<DateTime<Utc>>,
        overlap: TimeDelta,
        zone: Tz,
    ) -> Stamp {
        let bounded = match server_now {
            Some(now) if self.instant(zone) > now => self.like(now, zone),
            _ => *self,
        };
        match bounded {
            Stamp::Zoned(zoned) => Stamp::Zoned(whole_seconds(zoned) - overlap),
            Stamp::Naive(naive) => Stamp::Naive(whole_seconds(naive) - overlap),
        }
    }

    /// The text sent in a filter and kept in the cursor: whole seconds, in the stamp's own
    /// form (naive `YYYY-MM-DD HH:MM:SS`, or RFC 3339 with its offset, `+00:00` for UTC as
    /// PracticeHub writes it).
    pub(super) fn render(&self) -> String {
        match self {
            Stamp::Zoned(zoned) => {
                whole_seconds(*zoned).to_rfc3339_opts(SecondsFormat::Secs, false)
            }
            Stamp::Naive(naive) => whole_seconds(*naive).format(NAIVE_OUT).to_string(),
        }
    }

    /// For people (`status`): a zoned time in UTC (`…Z`, like every other time `status`
    /// shows), a naive one as written.
    pub(super) fn display(&self) -> String {
        match self {
            Stamp::Zoned(zoned) => {
                whole_seconds(zoned.with_timezone(&Utc)).to_rfc3339_opts(SecondsFormat::Secs, true)
            }
            Stamp::Naive(_) => self.render(),
        }
    }

    /// Whether this is a naive (wall-clock) time.
    pub(super) fn is_naive(&self) -> bool {
        matches!(self, Stamp::Naive(_))
    }
}

/// A naive wall-clock time in `zone` as an instant: the first occurrence of a time the
/// clocks go back over, and for one they skip, the instant an hour later on the wall.
fn local_instant(naive: NaiveDateTime, zone: Tz) -> DateTime<Utc> {
    zone.from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            zone.from_local_datetime(&(naive + TimeDelta::hours(1)))
                .earliest()
        })
        .map_or_else(|| naive.and_utc(), |local| local.with_timezone(&Utc))
}

/// `time` without its fraction of a second.
fn whole_seconds<T: Timelike>(time: T) -> T {
    time.with_nanosecond(0)
        .expect("zero nanoseconds are valid for any time")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONDON: Tz = chrono_tz::Europe::London;

    fn stamp(text: &str) -> Stamp {
        Stamp::parse(text).unwrap_or_else(|| panic!("{text} parses"))
    }

    #[test]
    fn both_forms_parse_and_render_back_in_their_own_form() {
        assert_eq!(stamp("2025-07-01 12:00:00").render(), "2025-07-01 12:00:00");
        assert_eq!(
            stamp("2025-07-01T12:00:00.75").render(),
            "2025-07-01 12:00:00"
        );
        assert_eq!(
            stamp("2025-07-01T12:00:00.5Z").render(),
            "2025-07-01T12:00:00+00:00"
        );
        assert_eq!(
            stamp("2025-07-01T12:00:00+02:00").render(),
            "2025-07-01T12:00:00+02:00"
        );
        for junk in [
            "",
            "yesterday",
            "2025-07-01",
            "+10000-01-01T00:00:00Z",
            "0000-01-01 00:00:00",
        ] {
            assert_eq!(Stamp::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn naive_times_are_the_clinics_wall_clock() {
        // BST in summer, GMT in winter.
        assert_eq!(
            stamp("2025-07-01 12:00:00").instant(LONDON).to_rfc3339(),
            "2025-07-01T11:00:00+00:00"
        );
        assert_eq!(
            stamp("2025-12-01 12:00:00").instant(LONDON).to_rfc3339(),
            "2025-12-01T12:00:00+00:00"
        );
        // The hour the clocks go back: its first occurrence; the hour they skip: an hour on.
        assert_eq!(
            stamp("2025-10-26 01:30:00").instant(LONDON).to_rfc3339(),
            "2025-10-26T00:30:00+00:00"
        );
        assert_eq!(
            stamp("2025-03-30 01:30:00").instant(LONDON).to_rfc3339(),
            "2025-03-30T01:30:00+00:00"
        );
        let berlin: Tz = "Europe/Berlin".parse().expect("zone");
        assert_eq!(
            stamp("2025-07-01 12:00:00").instant(berlin).to_rfc3339(),
            "2025-07-01T10:00:00+00:00"
        );
    }

    #[test]
    fn comparisons_follow_the_marks_form_at_the_precision_sent() {
        let mark = stamp("2025-10-26 01:30:00");
        // A fraction within the mark's second is not before it.
        assert!(!stamp("2025-10-26T01:30:00.400+01:00").before(&mark, LONDON));
        assert!(stamp("2025-10-26 01:29:59").before(&mark, LONDON));
        // On the wall clock, 01:10 GMT (after the clocks went back) is before 01:30 BST.
        assert!(stamp("2025-10-26T01:10:00+00:00").before(&mark, LONDON));
        let zoned = stamp("2025-10-26T00:30:00Z");
        assert!(!stamp("2025-10-26T01:10:00+00:00").before(&zoned, LONDON));
        assert!(stamp("2025-10-26 02:00:00").after(&mark, LONDON));
        assert!(!mark.after(&mark, LONDON));
    }

    #[test]
    fn a_mark_is_the_newest_time_in_whole_seconds_minus_the_overlap_never_past_the_server_clock() {
        let overlap = TimeDelta::minutes(70);
        let newest = stamp("2025-10-26 01:59:59.900");
        let mark = newest.mark(None, overlap, LONDON);
        assert_eq!(mark.render(), "2025-10-26 00:49:59");
        // The first change after the clocks go back, at 01:00 on the wall, is not before it.
        assert!(!stamp("2025-10-26 01:00:00").before(&mark, LONDON));
        // A row stamped in the future is bounded by the server's own clock (its Date).
        let now = stamp("2025-06-01T10:00:00Z").instant(LONDON);
        assert_eq!(
            stamp("2099-01-01 00:00:00")
                .mark(Some(now), overlap, LONDON)
                .render(),
            "2025-06-01 09:50:00"
        );
        assert_eq!(
            stamp("2025-06-01T09:00:00+00:00")
                .mark(Some(now), overlap, LONDON)
                .render(),
            "2025-06-01T07:50:00+00:00"
        );
    }
}
