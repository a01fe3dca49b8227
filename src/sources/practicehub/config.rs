//! PracticeHub's settings: its defaults for the common keys, the mandatory `app_details`, the
//! clinic's `timezone` (what naive times are local to), the `[sources.fields]` overrides
//! (re-pointing a billing-safe field at another attribute, never at one whose name says PHI),
//! and the normalization of the two documented base-URL forms.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono_tz::Tz;
use reqwest::Url;
use serde::Deserialize;

use crate::config::{ConfigError, Keys, SourceDefaults, SourceKind, SourceOptions, parse_options};

/// The `practicehub` kind.
pub struct PracticeHubKind;

/// A PracticeHub source's own settings.
#[derive(Debug, Clone)]
pub struct PracticeHubOptions {
    /// The mandatory `x-app-details` header, `<appname>=<contact email>`; also the
    /// `User-Agent`, as PracticeHub's guide asks.
    pub app_details: String,
    /// The clinic's IANA time zone: what a naive `YYYY-MM-DD HH:MM:SS` from PracticeHub is
    /// local to. Default `Europe/London`.
    pub timezone: Tz,
    /// Source field name overrides, e.g. `phone = "home_phone"` (validated).
    pub fields: BTreeMap<String, String>,
}

/// The clinic time zone when none is configured: PracticeHub's clinics are mostly in the UK.
pub const DEFAULT_TIMEZONE: Tz = chrono_tz::Europe::London;

impl SourceOptions for PracticeHubOptions {
    fn to_toml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut out = format!(
            "app_details = {}\ntimezone = {}\n",
            q(&self.app_details),
            q(self.timezone.name())
        );
        if !self.fields.is_empty() {
            out.push_str("[sources.fields]\n");
            for (field, attribute) in &self.fields {
                out.push_str(&format!("{field} = {}\n", q(attribute)));
            }
        }
        out
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    app_details: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

impl SourceKind for PracticeHubKind {
    fn name(&self) -> &'static str {
        "practicehub"
    }

    fn defaults(&self) -> SourceDefaults {
        // PracticeHub documents no limit; integrations see 429s when they burst and none with
        // ~350 ms between pages, so the default is strictly sequential at 3 a second.
        // The cursor filter is a server's promise the daemon cannot check for what it does not
        // return, so a full listing with change detection runs every night (03:30 UTC) as well.
        SourceDefaults::new(
            "0 */5 * * * *",
            (3, 1),
            "GB",
            "https://{account}.neptune.practicehub.io/api",
        )
        .with_full_scan_schedule("0 30 3 * * *")
    }

    fn normalize_base_url(&self, url: Url) -> Url {
        normalize_url(url)
    }

    fn options(&self, at: &str, keys: Keys) -> Result<Arc<dyn SourceOptions>, ConfigError> {
        let raw: RawOptions = parse_options(at, self.name(), keys)?;
        let app_details = match raw.app_details {
            None => {
                return Err(ConfigError::new(
                    format!("{at}.app_details"),
                    "missing: PracticeHub requires the x-app-details header, \
                     e.g. app_details = \"revkeen-sync=ops@clinic.example\"",
                ));
            }
            Some(details) if !valid_app_details(&details) => {
                return Err(ConfigError::new(
                    format!("{at}.app_details"),
                    format!(
                        "{details:?} is not of the form <appname>=<contact email>, e.g. \"revkeen-sync=ops@clinic.example\""
                    ),
                ));
            }
            Some(details) => details,
        };
        let timezone = match raw.timezone {
            None => DEFAULT_TIMEZONE,
            Some(name) => name.trim().parse::<Tz>().map_err(|_| {
                ConfigError::new(
                    format!("{at}.timezone"),
                    format!(
                        "{name:?} is not an IANA time zone name: use the clinic's, e.g. \
                         \"Europe/London\", \"Europe/Dublin\" or \"Europe/Berlin\" (naive \
                         times from PracticeHub are read as local to it)"
                    ),
                )
            })?,
        };
        validate_field_overrides(&raw.fields)
            .map_err(|problem| ConfigError::new(format!("{at}.fields"), problem))?;
        Ok(Arc::new(PracticeHubOptions {
            app_details,
            timezone,
            fields: raw.fields,
        }))
    }
}

fn valid_app_details(details: &str) -> bool {
    details
        .split_once('=')
        .is_some_and(|(app, contact)| !app.trim().is_empty() && contact.contains('@'))
}

/// `https://{account}.practicehub.io[/…]` → `https://{account}.neptune.practicehub.io/api/`;
/// anything else (the neptune form, a simulator on loopback) is kept.
fn normalize_url(url: Url) -> Url {
    let Some(host) = url.host_str() else {
        return url;
    };
    let Some(account) = host.strip_suffix(".practicehub.io") else {
        return url;
    };
    if account.contains('.') {
        return url;
    }
    let normalized = format!("https://{account}.neptune.practicehub.io/api/");
    Url::parse(&normalized).unwrap_or(url)
}

/// The logical fields a patient may contribute, and the PracticeHub attribute each is read
/// from by default. This table is the whole of what the daemon reads from a patient.
pub const FIELDS: &[(&str, &str)] = &[
    ("id", "id"),
    ("email", "email"),
    ("first_name", "first_name"),
    ("last_name", "last_name"),
    ("phone", "mobile"),
    ("phone_fallback", "home_phone"),
    ("patient_number", "patient_number"),
    ("updated", "updated"),
    ("deleted", "deleted"),
    ("active", "active"),
];

/// The fields whose attribute is named otherwise on live keys (the doc's "Newer evidence"):
/// `(field, documented name, live name)`. With no `[sources.fields]` entry for it, a field is
/// read from either, and the rows of a listing's first page decide which the daemon filters by
/// and prefers. `created` is only told apart (the daemon reads no creation time).
pub const NAMINGS: &[(&str, &str, &str)] = &[
    ("phone", "mobile", "phone"),
    ("updated", "updated", "updated_at"),
    ("created", "created", "created_at"),
];

/// What an override may point each field at: the attribute's name must contain one of these.
/// An allowlist, so no configuration can re-point a field at a note, a date of birth, an
/// address part or any other attribute that is not plainly the billing-safe field it feeds.
const OVERRIDABLE: &[(&str, &[&str])] = &[
    ("id", &["id"]),
    ("email", &["email", "mail"]),
    ("first_name", &["first", "given", "fore"]),
    ("last_name", &["last", "sur", "family"]),
    ("phone", &["phone", "mobile", "tel", "cell"]),
    ("phone_fallback", &["phone", "mobile", "tel", "cell"]),
    ("patient_number", &["number", "ref", "code", "id"]),
    ("updated", &["updated", "modified", "changed"]),
    ("deleted", &["deleted", "archived", "removed"]),
    ("active", &["active", "enabled", "status"]),
];

/// Fragments that disqualify an attribute even when its name also matches [`OVERRIDABLE`]
/// (`emergency_contact_phone`, `gp_mobile`, `next_of_kin_email`).
const PHI_NAMES: &[&str] = &[
    "note",
    "comment",
    "remark",
    "desc",
    "birth",
    "born",
    "dob",
    "addr",
    "street",
    "post",
    "zip",
    "city",
    "town",
    "county",
    "medic",
    "clinic",
    "diagnos",
    "condition",
    "treat",
    "allerg",
    "gender",
    "sex",
    "nhs",
    "insur",
    "referr",
    "history",
    "symptom",
    "custom",
    "kin",
    "emergency",
    "gp_",
    "doctor",
    "occupation",
];

/// Checks `[sources.fields]` overrides: known logical fields only, each re-pointed only at an
/// attribute plainly named for it, never at one whose name says clinical or personal data.
pub fn validate_field_overrides(overrides: &BTreeMap<String, String>) -> Result<(), String> {
    for (field, attribute) in overrides {
        let Some((_, allowed)) = OVERRIDABLE.iter().find(|(name, _)| name == field) else {
            let known: Vec<&str> = FIELDS.iter().map(|(name, _)| *name).collect();
            return Err(format!(
                "{field:?} is not a field sync-daemon reads from a patient; known fields: {}",
                known.join(", ")
            ));
        };
        let lower = attribute.to_ascii_lowercase();
        if attribute.trim().is_empty() {
            return Err(format!(
                "{field} = \"\": give the PracticeHub attribute name"
            ));
        }
        if let Some(fragment) = PHI_NAMES.iter().find(|f| lower.contains(*f)) {
            return Err(format!(
                "{field} = {attribute:?} points at an attribute that looks like clinical or personal data ({fragment:?}); patient sync sends billing-safe fields only"
            ));
        }
        if !allowed.iter().any(|fragment| lower.contains(fragment)) {
            return Err(format!(
                "{field} = {attribute:?}: {field} can only be read from an attribute whose name contains one of {}; patient sync sends billing-safe fields only",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}
