//! A patient cut down to the allowlist, and the customer body it becomes.
//!
//! **No PHI leaves a clinic (invariant 7).** [`PatientRecord`] has a field for each allowlisted
//! attribute and nothing else; [`PatientBody`], the body sent to RevKeen, has typed metadata
//! with two fields, so there is no map a clinical field could be added to.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::config::{FIELDS, NAMINGS};
use super::stamp::Stamp;
use crate::customer::{self, Phone, Rejection};

/// How a row is read: the PracticeHub attribute each logical field is read from ([`FIELDS`]
/// with the source's `[sources.fields]` overrides, validated by the config), the other name
/// a field has on live keys ([`NAMINGS`], unless overridden), and the clinic's time zone.
#[derive(Debug, Clone)]
pub(super) struct Attributes {
    names: BTreeMap<&'static str, String>,
    /// Fields whose attribute the config names: read from that one only.
    overridden: BTreeSet<&'static str>,
    /// For a field with two namings: the one not preferred, read when the row lacks the
    /// preferred one.
    alternates: BTreeMap<&'static str, &'static str>,
    zone: Tz,
}

impl Attributes {
    /// The default names with `overrides` applied; naive times read in `zone`.
    pub(super) fn new(overrides: &BTreeMap<String, String>, zone: Tz) -> Attributes {
        let mut names: BTreeMap<&'static str, String> = FIELDS
            .iter()
            .map(|(field, attribute)| (*field, attribute.to_string()))
            .collect();
        let mut overridden = BTreeSet::new();
        for (field, attribute) in overrides {
            if let Some((name, _)) = FIELDS.iter().find(|(name, _)| name == field) {
                names.insert(name, attribute.clone());
                overridden.insert(*name);
            }
        }
        let alternates = NAMINGS
            .iter()
            .filter(|(field, _, _)| !overridden.contains(field))
            .map(|(field, _, live)| (*field, *live))
            .collect();
        Attributes {
            names,
            overridden,
            alternates,
            zone,
        }
    }

    /// These attributes with the naming `chosen` (field → attribute, as a page's rows showed)
    /// preferred for each field the config does not name.
    pub(super) fn preferring(&self, chosen: &BTreeMap<String, String>) -> Attributes {
        let mut attributes = self.clone();
        for (field, documented, live) in NAMINGS {
            if self.overridden.contains(field) || !attributes.names.contains_key(field) {
                continue;
            }
            let (preferred, other) = match chosen.get(*field).map(String::as_str) {
                Some(name) if name == *live => (*live, *documented),
                _ => (*documented, *live),
            };
            attributes.names.insert(field, preferred.to_string());
            attributes.alternates.insert(field, other);
        }
        attributes
    }

    /// The attribute `field` is read (and filtered) by first.
    pub(super) fn get<'a>(&'a self, field: &'a str) -> &'a str {
        self.names.get(field).map(String::as_str).unwrap_or(field)
    }

    /// Whether the config names `field`'s attribute.
    pub(super) fn is_overridden(&self, field: &str) -> bool {
        self.overridden.contains(field)
    }

    /// The clinic's time zone.
    pub(super) fn zone(&self) -> Tz {
        self.zone
    }
}

/// Which naming a row carries for each field with two ([`NAMINGS`]): `(field, attribute)`.
/// Attribute names only, from a fixed list: never a value.
pub(super) type Naming = Vec<(&'static str, &'static str)>;

/// Cuts a listed patient down to the allowlist; nothing else of the row is kept. Only the
/// allowlisted attributes are parsed at all, so an attribute the daemon never reads (however
/// deep, however odd) cannot spoil the row. `Err` says, without quoting the row, why it is
/// not a patient. Also says which naming the row carries.
pub(super) fn cut_row(
    row: &str,
    attributes: &Attributes,
) -> Result<(PatientRecord, Naming), String> {
    let attributes_raw: HashMap<&str, &RawValue> = serde_json::from_str(row)
        .map_err(|e| format!("is not a JSON object of attributes ({})", raw_problem(&e)))?;
    let naming: Naming = NAMINGS
        .iter()
        .filter_map(|(field, documented, live)| {
            [*documented, *live]
                .into_iter()
                .find(|name| attributes_raw.contains_key(name))
                .map(|name| (*field, name))
        })
        .collect();
    // An allowlisted attribute that is there but cannot be read spoils the row: sending the
    // patient without it would be sending something other than the clinic's record.
    let mut values: HashMap<&str, Value> = HashMap::new();
    for (field, _) in FIELDS {
        let preferred = attributes.get(field);
        let found = attributes_raw.get_key_value(preferred).or_else(|| {
            attributes
                .alternates
                .get(field)
                .and_then(|other| attributes_raw.get_key_value(*other))
        });
        if let Some((name, raw)) = found {
            let parsed = serde_json::from_str(raw.get())
                .map_err(|_| format!("has a `{name}` attribute that cannot be read"))?;
            values.insert(field, parsed);
        }
    }
    let value = |field: &str| values.get(field).cloned();
    let id = value("id");
    if id
        .as_ref()
        .is_some_and(|id| crate::sources::positive_id(id).is_none())
    {
        return Err("has an id that is not a positive integer".to_string());
    }
    let text = |field: &str| value(field).as_ref().and_then(json_text);
    let stamp = text("updated").and_then(|t| Stamp::parse(&t));
    let record = PatientRecord {
        id: id.as_ref().and_then(crate::sources::positive_id),
        email: text("email"),
        first_name: text("first_name"),
        last_name: text("last_name"),
        phone: text("phone"),
        phone_fallback: text("phone_fallback"),
        patient_number: text("patient_number"),
        updated: stamp.map(|s| s.instant(attributes.zone)),
        stamp,
        deleted: value("deleted").is_some_and(|v| truthy(&v)),
        inactive: value("active").is_some_and(|v| !v.is_null() && !truthy(&v)),
    };
    Ok((record, naming))
}

fn raw_problem(error: &serde_json::Error) -> String {
    format!("at column {}", error.column())
}

fn json_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"),
        _ => false,
    }
}

/// A patient cut down to the allowlisted attributes. Nothing else is ever kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatientRecord {
    pub id: Option<String>,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub phone_fallback: Option<String>,
    pub patient_number: Option<String>,
    /// When the patient last changed (a naive time read in the clinic's zone).
    pub updated: Option<DateTime<Utc>>,
    /// The same as PracticeHub wrote it, for the cursor (never sent).
    pub(super) stamp: Option<Stamp>,
    pub deleted: bool,
    pub inactive: bool,
}

/// The customer body a patient becomes: email, name, phone, patient number, lifecycle status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientBody {
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub metadata: PatientMetadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_updated_at: Option<String>,
}

impl PatientBody {
    /// The body bytes sent to RevKeen.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings always serializes")
    }
}

/// The only metadata a patient carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_number: Option<String>,
    /// `active`, `inactive` or `deleted`.
    pub source_status: &'static str,
}

/// Maps an allowlisted patient to its customer body, or says why it cannot be one.
pub fn map_patient(
    record: &PatientRecord,
    default_country: &str,
) -> Result<(PatientBody, Vec<&'static str>), Rejection> {
    if record.id.is_none() {
        return Err(Rejection::new(
            "no_id",
            "PracticeHub returned a patient without an id",
            "check the source's [fields] id mapping",
        ));
    }
    let email = customer::normalize_email(record.email.as_deref()).map_err(|problem| {
        Rejection::new(
            problem.code(),
            format!("{problem} in PracticeHub"),
            "add a valid email to the patient's PracticeHub record; it syncs on the next poll",
        )
    })?;
    let mut warnings = Vec::new();
    let phone = [record.phone.as_deref(), record.phone_fallback.as_deref()]
        .into_iter()
        .flatten()
        .find_map(
            |raw| match customer::normalize_phone(Some(raw), default_country) {
                Phone::E164(number) => Some(number),
                _ => None,
            },
        );
    if phone.is_none() && (record.phone.is_some() || record.phone_fallback.is_some()) {
        warnings.push("phone_unparseable");
    }
    let source_status = if record.deleted {
        "deleted"
    } else if record.inactive {
        "inactive"
    } else {
        "active"
    };
    let name = customer::bounded_name(
        record.first_name.as_deref(),
        record.last_name.as_deref(),
        &mut warnings,
    );
    let patient_number = customer::bounded(record.patient_number.as_deref(), &mut warnings);
    Ok((
        PatientBody {
            email,
            name,
            phone,
            metadata: PatientMetadata {
                patient_number,
                source_status,
            },
            external_updated_at: record
                .updated
                .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        },
        warnings,
    ))
}
