//! The normalized customer every source maps into, and its canonical body.
//!
//! A [`Customer`] holds exactly the fields RevKeen's upsert accepts (an unknown field is a 400
//! there), so a body built from it cannot be refused for its shape. Its serialization is
//! canonical: fields in declaration order, absent ones omitted, metadata keys sorted. The same
//! record therefore always produces the same bytes and the same hash, which is what change
//! detection and idempotency keys rest on (invariants 3 and 5 in ARCHITECTURE.md).
//!
//! The field helpers here (email, phone, country, timestamps) are shared by every adapter.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// A customer as RevKeen's `PUT /customers/external/{source}/{id}` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Customer {
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_line1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_line2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    /// ISO 3166-1 alpha-2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// RFC 3339 UTC; drives RevKeen's stale protection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_updated_at: Option<String>,
}

impl Customer {
    /// The canonical body bytes.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and JSON values always serializes")
    }
}

/// Hex SHA-256 of a body: the identity of a version of a customer.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Why a record cannot become a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Short machine-friendly reason, e.g. `no_email`.
    pub code: &'static str,
    /// What is wrong, for `failures`.
    pub reason: String,
    /// What to do about it, for `failures`.
    pub hint: String,
}

/// Why a record's email cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailProblem {
    #[error("no email")]
    Missing,
    #[error("invalid email")]
    Invalid,
}

impl EmailProblem {
    /// The rejection code `failures` shows.
    pub fn code(self) -> &'static str {
        match self {
            EmailProblem::Missing => "no_email",
            EmailProblem::Invalid => "invalid_email",
        }
    }
}

impl Rejection {
    /// A rejection with its code, what is wrong, and what to do about it.
    pub fn new(code: &'static str, reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
            hint: hint.into(),
        }
    }
}

/// Trims and lower-cases an email; `Err` says why it is not one.
pub fn normalize_email(raw: Option<&str>) -> Result<String, EmailProblem> {
    let email = raw.map(str::trim).unwrap_or_default().to_ascii_lowercase();
    if email.is_empty() {
        return Err(EmailProblem::Missing);
    }
    if email.chars().count() > MAX_EMAIL_CHARS {
        return Err(EmailProblem::Invalid);
    }
    let valid = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
    }) && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(EmailProblem::Invalid)
    }
}

/// The outcome of normalizing a phone number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phone {
    /// No number given.
    Absent,
    /// Parsed and valid: E.164.
    E164(String),
    /// Something was given that is not a valid number for the default country.
    Invalid,
}

/// Parses a free-text phone number with the source's default country into E.164.
///
/// phonenumber compiles its patterns into a shared LRU of 100 regexes; parsing and validating
/// numbers of a few countries cycles through more than that, so every call recompiled some.
/// A larger cache, set once, keeps them all (about 30 % less time per number).
pub fn normalize_phone(raw: Option<&str>, default_country: &str) -> Phone {
    static CACHE: std::sync::Once = std::sync::Once::new();
    CACHE.call_once(|| {
        if let Ok(mut cache) = phonenumber::metadata::DATABASE.cache().lock() {
            cache.set_capacity(4096);
        }
    });
    let text = raw.map(str::trim).unwrap_or_default();
    if text.is_empty() {
        return Phone::Absent;
    }
    let country = default_country.parse::<phonenumber::country::Id>().ok();
    match phonenumber::parse(country, text) {
        Ok(number) if valid_at_home(&number, default_country) || phonenumber::is_valid(&number) => {
            Phone::E164(number.format().mode(phonenumber::Mode::E164).to_string())
        }
        _ => Phone::Invalid,
    }
}

/// Drops the phone patterns compiled so far (about 6 MiB after a poll of UK numbers); the next
/// number compiles what it needs again. The daemon calls this between polls, when it mostly
/// sleeps.
pub fn release_phone_patterns() {
    if let Ok(mut cache) = phonenumber::metadata::DATABASE.cache().lock() {
        cache.clear();
    }
    if let Ok(mut home) = HOME_PATTERNS.lock() {
        home.clear();
    }
}

/// A fast validity check for the common case, a fixed-line or mobile number of the default
/// country: `phonenumber::is_valid` first searches every region sharing the country code (25
/// for +1), pattern by pattern, which was most of the cost of normalizing a client. Numbers
/// this does not accept go through the full check, so the result is the same.
fn valid_at_home(number: &phonenumber::PhoneNumber, default_country: &str) -> bool {
    let Some(home) = home_patterns(default_country) else {
        return false;
    };
    if number.country().code() != home.country_code {
        return false;
    }
    let national = number.national().to_string();
    home.general.is_match(&national) && home.kinds.iter().any(|kind| kind.is_match(&national))
}

/// The default countries' patterns, compiled once per country (`None`: not a country
/// libphonenumber knows, or a pattern that does not compile).
static HOME_PATTERNS: std::sync::Mutex<BTreeMap<String, Option<std::sync::Arc<HomePatterns>>>> =
    std::sync::Mutex::new(BTreeMap::new());

fn home_patterns(country: &str) -> Option<std::sync::Arc<HomePatterns>> {
    let mut home = HOME_PATTERNS.lock().ok()?;
    if let Some(patterns) = home.get(country) {
        return patterns.clone();
    }
    let patterns = HomePatterns::compile(country).map(std::sync::Arc::new);
    home.insert(country.to_string(), patterns.clone());
    patterns
}

/// A country's general, fixed-line and mobile number patterns as regexes of our own.
/// phonenumber's descriptors look each pattern up in a shared cache keyed by its source text
/// (up to 2 KB for +1), hashing that text on every match, which cost more than the match.
struct HomePatterns {
    country_code: u16,
    general: NumberPattern,
    kinds: Vec<NumberPattern>,
}

impl HomePatterns {
    fn compile(country: &str) -> Option<HomePatterns> {
        let meta = phonenumber::metadata::DATABASE.by_id(country)?;
        let descriptors = meta.descriptors();
        let kinds = [descriptors.fixed_line(), descriptors.mobile()]
            .into_iter()
            .flatten()
            .map(NumberPattern::compile)
            .collect::<Option<Vec<_>>>()?;
        Some(HomePatterns {
            country_code: meta.country_code(),
            general: NumberPattern::compile(descriptors.general())?,
            kinds,
        })
    }
}

/// One descriptor's test, as `phonenumber::metadata::Descriptor::is_match` does it: a possible
/// length, and a pattern match that starts at the first digit.
struct NumberPattern {
    regex: regex::Regex,
    lengths: Vec<u16>,
}

impl NumberPattern {
    fn compile(descriptor: &phonenumber::metadata::Descriptor) -> Option<NumberPattern> {
        let source = descriptor.national_number().as_str();
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})"))
            .ignore_whitespace(true)
            .build()
            .ok()?;
        Some(NumberPattern {
            regex,
            lengths: descriptor.possible_length().to_vec(),
        })
    }

    fn is_match(&self, national: &str) -> bool {
        let length = u16::try_from(national.len()).unwrap_or(u16::MAX);
        (self.lengths.is_empty() || self.lengths.contains(&length)) && self.regex.is_match(national)
    }
}

/// An ISO 3166-1 alpha-2 code for a country written as a code or a name ("USA", "United
/// States", "ca"); `None` when it is not recognisable.
pub fn normalize_country(raw: Option<&str>) -> Option<String> {
    let text = raw.map(str::trim).unwrap_or_default();
    if text.is_empty() {
        return None;
    }
    // celes keys are lower-case names without spaces or punctuation; numeric codes are not
    // something a person types into an address form.
    let key: String = text
        .chars()
        .filter(|c| c.is_alphabetic())
        .flat_map(char::to_lowercase)
        .collect();
    if key.is_empty() {
        return None;
    }
    // "UK" is the common name, not the ISO code (GB).
    if key == "uk" {
        return Some("GB".to_string());
    }
    key.parse::<celes::Country>()
        .ok()
        .map(|country| country.alpha2.to_string())
}

/// A source timestamp as RFC 3339 UTC. Naive times are UTC; `1900-01-01…` is the sources'
/// null sentinel; unparseable text is treated as absent rather than sent.
pub fn normalize_timestamp(raw: Option<&str>) -> Option<String> {
    let text = raw.map(str::trim).unwrap_or_default();
    if text.is_empty() || text.starts_with("1900-01-01") {
        return None;
    }
    let parsed = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
                .map(|naive| naive.and_utc())
        })
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|date| date.and_hms_opt(0, 0, 0))
                .map(|naive| naive.and_utc())
        })?;
    // RFC 3339 has four-digit years; chrono would write year 10000 as `+10000-…`, which
    // RevKeen refuses (400). Such a time is as unusable as an unparseable one.
    if !(1..=9999).contains(&chrono::Datelike::year(&parsed)) {
        return None;
    }
    Some(parsed.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Trimmed text, or `None` when empty.
pub fn text(raw: Option<&str>) -> Option<String> {
    let cleaned: String = raw?.chars().filter(|c| !is_control(*c)).collect();
    let trimmed = cleaned.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// C0 controls, DEL and C1 controls: never sent (they reach a terminal or a CRM unchanged).
fn is_control(c: char) -> bool {
    c.is_control()
}

/// The longest text sent in a field (a name, an address line, a metadata value), in
/// characters. RevKeen documents no limit; 255 is the usual column size, so a longer value is
/// cut there, at a character boundary, and counted as a `text_truncated` warning: the customer
/// still syncs, with what fits.
pub const MAX_TEXT_CHARS: usize = 255;
/// The most tags a customer carries, and the longest tag; the rest are left out
/// (`tags_truncated`).
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_CHARS: usize = 64;
/// The longest email there is (RFC 5321: 254 characters); a longer one is invalid.
pub const MAX_EMAIL_CHARS: usize = 254;

/// [`text`] cut to [`MAX_TEXT_CHARS`], with a warning when it was longer.
pub fn bounded(raw: Option<&str>, warnings: &mut Vec<&'static str>) -> Option<String> {
    let text = text(raw)?;
    Some(cut(text, MAX_TEXT_CHARS, "text_truncated", warnings))
}

fn cut(
    text: String,
    max: usize,
    warning: &'static str,
    warnings: &mut Vec<&'static str>,
) -> String {
    match text.char_indices().nth(max) {
        None => text,
        Some((at, _)) => {
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
            text[..at].trim_end().to_string()
        }
    }
}

/// Tags as sent: each [`text`], at most [`MAX_TAG_CHARS`], at most [`MAX_TAGS`] of them.
pub fn bounded_tags(tags: &[String], warnings: &mut Vec<&'static str>) -> Vec<String> {
    let cleaned: Vec<String> = tags.iter().filter_map(|t| text(Some(t))).collect();
    let kept = cleaned.len().min(MAX_TAGS);
    let mut too_long = false;
    let out: Vec<String> = cleaned
        .into_iter()
        .take(kept)
        .map(|tag| match tag.char_indices().nth(MAX_TAG_CHARS) {
            None => tag,
            Some((at, _)) => {
                too_long = true;
                tag[..at].to_string()
            }
        })
        .collect();
    if (too_long || kept < tags.iter().filter(|t| text(Some(t)).is_some()).count())
        && !warnings.contains(&"tags_truncated")
    {
        warnings.push("tags_truncated");
    }
    out
}

/// "First Last" from optional parts; `None` when both are empty.
pub fn full_name(first: Option<&str>, last: Option<&str>) -> Option<String> {
    let parts: Vec<String> = [first, last].into_iter().filter_map(text).collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// [`full_name`] cut to [`MAX_TEXT_CHARS`], with a warning when it was longer.
pub fn bounded_name(
    first: Option<&str>,
    last: Option<&str>,
    warnings: &mut Vec<&'static str>,
) -> Option<String> {
    full_name(first, last).map(|name| cut(name, MAX_TEXT_CHARS, "text_truncated", warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_canonical_and_omits_absent_fields() {
        let mut customer = Customer {
            email: "a@example.com".into(),
            name: Some("Ann Lee".into()),
            ..Customer::default()
        };
        customer
            .metadata
            .insert("z".into(), serde_json::json!("last"));
        customer
            .metadata
            .insert("a".into(), serde_json::json!("first"));
        let body = String::from_utf8(customer.to_body()).expect("utf-8");
        assert_eq!(
            body,
            r#"{"email":"a@example.com","name":"Ann Lee","metadata":{"a":"first","z":"last"}}"#
        );
        assert_eq!(body_hash(body.as_bytes()), body_hash(&customer.to_body()));
    }

    #[test]
    fn emails_are_trimmed_lowercased_and_checked() {
        assert_eq!(
            normalize_email(Some("  John.Doe@Example.COM ")),
            Ok("john.doe@example.com".into())
        );
        assert_eq!(normalize_email(Some("")), Err(EmailProblem::Missing));
        assert_eq!(normalize_email(None), Err(EmailProblem::Missing));
        for bad in [
            "john at example",
            "a@b",
            "@example.com",
            "a@@example.com",
            "a b@example.com",
        ] {
            assert_eq!(
                normalize_email(Some(bad)),
                Err(EmailProblem::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn phones_become_e164_with_the_default_country() {
        assert_eq!(
            normalize_phone(Some("(312) 444-1234"), "US"),
            Phone::E164("+13124441234".into())
        );
        assert_eq!(
            normalize_phone(Some("+44 7911 123456"), "US"),
            Phone::E164("+447911123456".into())
        );
        assert_eq!(
            normalize_phone(Some("07911 123456"), "GB"),
            Phone::E164("+447911123456".into())
        );
        assert_eq!(
            normalize_phone(Some("ask front desk"), "US"),
            Phone::Invalid
        );
        assert_eq!(normalize_phone(Some("  "), "US"), Phone::Absent);
    }

    #[test]
    fn phones_parse_the_same_after_the_patterns_are_released() {
        let numbers = [
            ("(312) 444-1234", "US"),
            ("07911 123456", "GB"),
            ("555-867-5309", "US"),
        ];
        let before: Vec<Phone> = numbers
            .iter()
            .map(|(n, c)| normalize_phone(Some(n), c))
            .collect();
        release_phone_patterns();
        let after: Vec<Phone> = numbers
            .iter()
            .map(|(n, c)| normalize_phone(Some(n), c))
            .collect();
        assert_eq!(before, after);
        assert_eq!(after[2], Phone::Invalid);
    }

    #[test]
    fn the_home_country_shortcut_accepts_only_what_the_full_check_accepts() {
        let wodify = (10_001..=12_000).map(|id| {
            let client = sync_daemon_sim::wodify::generate_client(id, 11);
            (client["phone_number"].as_str().map(String::from), "US")
        });
        let practicehub = (1..=2_000).flat_map(|id| {
            let patient = sync_daemon_sim::practicehub::generate_patient(id, 11);
            ["mobile", "home_phone"].map(|f| (patient[f].as_str().map(String::from), "GB"))
        });
        let mut shortcut = 0;
        for (text, country) in wodify.chain(practicehub) {
            let Some(text) = text else { continue };
            let Ok(number) = phonenumber::parse(country.parse().ok(), text.trim()) else {
                continue;
            };
            if valid_at_home(&number, country) {
                shortcut += 1;
                assert!(phonenumber::is_valid(&number), "{text} ({country})");
            }
        }
        assert!(
            shortcut > 3_000,
            "the shortcut took only {shortcut} numbers"
        );
    }

    #[test]
    fn countries_become_alpha2() {
        for (raw, code) in [
            ("US", "US"),
            ("usa", "US"),
            ("United States", "US"),
            ("Canada", "CA"),
            ("UK", "GB"),
            ("United Kingdom", "GB"),
        ] {
            assert_eq!(normalize_country(Some(raw)).as_deref(), Some(code), "{raw}");
        }
        assert_eq!(normalize_country(Some("")), None);
        assert_eq!(normalize_country(Some("Atlantis")), None);
    }

    #[test]
    fn timestamps_are_utc_and_the_sentinel_is_none() {
        assert_eq!(
            normalize_timestamp(Some("2024-03-10T14:45:00")).as_deref(),
            Some("2024-03-10T14:45:00Z")
        );
        assert_eq!(
            normalize_timestamp(Some("2024-03-10T14:45:00Z")).as_deref(),
            Some("2024-03-10T14:45:00Z")
        );
        assert_eq!(
            normalize_timestamp(Some("2024-03-10T15:45:00+01:00")).as_deref(),
            Some("2024-03-10T14:45:00Z")
        );
        assert_eq!(normalize_timestamp(Some("1900-01-01T00:00:00")), None);
        assert_eq!(normalize_timestamp(Some("1900-01-01")), None);
        assert_eq!(normalize_timestamp(Some("yesterday")), None);
        assert_eq!(normalize_timestamp(Some("+10000-01-01T00:00:00Z")), None);
        assert_eq!(
            normalize_timestamp(Some("9999-12-31T23:59:59Z")).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
    }

    #[test]
    fn names_join_present_parts() {
        assert_eq!(
            full_name(Some("John"), Some("Doe")).as_deref(),
            Some("John Doe")
        );
        assert_eq!(full_name(Some(" "), Some("Doe")).as_deref(), Some("Doe"));
        assert_eq!(full_name(None, None), None);
    }
}
