//! A Wodify client as listed, and its mapping to a RevKeen customer.

use serde::Deserialize;
use serde_json::Value;

use crate::customer::{self, Customer, EmailProblem, Phone, Rejection};

/// A client as listed. Every field is optional and leniently typed: a value of an unexpected
/// type is dropped rather than failing the page.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Client {
    #[serde(default, deserialize_with = "lenient::id")]
    pub id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub first_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub last_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub phone_number: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub client_status: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub location: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub street_address_1: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub street_address_2: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub city: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub state: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub zipcode: Option<String>,
    #[serde(default, deserialize_with = "lenient::text")]
    pub country: Option<String>,
    #[serde(default, deserialize_with = "lenient::tags")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub updated: Option<Updated>,
}

/// `updated: {updated_by_id, updated_by, updated_on_datetime}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Updated {
    #[serde(default, deserialize_with = "lenient::text")]
    pub updated_on_datetime: Option<String>,
}

/// Maps a Wodify client to a customer, or says why it cannot be one.
pub fn map_client(
    client: &Client,
    default_country: &str,
) -> Result<(Customer, Vec<&'static str>), Rejection> {
    if client.id.is_none() {
        return Err(Rejection::new(
            "no_id",
            "Wodify returned a client without an id",
            "report this to Wodify support: every client should have an id",
        ));
    }
    let email = customer::normalize_email(client.email.as_deref()).map_err(|problem| {
        let (reason, fix) = match problem {
            EmailProblem::Missing => ("no email in Wodify", "add an email"),
            EmailProblem::Invalid => (
                "the email in Wodify is not a valid address",
                "correct the email",
            ),
        };
        Rejection::new(
            problem.code(),
            reason,
            format!("{fix} in the client's Wodify profile; it syncs on the next poll"),
        )
    })?;
    let mut warnings = Vec::new();
    let phone = match customer::normalize_phone(client.phone_number.as_deref(), default_country) {
        Phone::E164(number) => Some(number),
        Phone::Absent => None,
        Phone::Invalid => {
            warnings.push("phone_unparseable");
            None
        }
    };
    let country = customer::normalize_country(client.country.as_deref());
    if country.is_none() && customer::text(client.country.as_deref()).is_some() {
        warnings.push("country_unrecognised");
    }
    let mut metadata = std::collections::BTreeMap::new();
    if let Some(status) = customer::bounded(client.client_status.as_deref(), &mut warnings) {
        metadata.insert("source_status".to_string(), Value::String(status));
    }
    if let Some(location) = customer::bounded(client.location.as_deref(), &mut warnings) {
        metadata.insert("location".to_string(), Value::String(location));
    }
    let tags = customer::bounded_tags(&client.tags, &mut warnings);
    if !tags.is_empty() {
        metadata.insert(
            "tags".to_string(),
            Value::Array(tags.into_iter().map(Value::String).collect()),
        );
    }
    let mut field = |raw: &Option<String>| customer::bounded(raw.as_deref(), &mut warnings);
    let address_line1 = field(&client.street_address_1);
    let address_line2 = field(&client.street_address_2);
    let city = field(&client.city);
    let state = field(&client.state);
    let postal_code = field(&client.zipcode);
    let name = customer::bounded_name(
        client.first_name.as_deref(),
        client.last_name.as_deref(),
        &mut warnings,
    );
    let customer = Customer {
        email,
        name,
        phone,
        address_line1,
        address_line2,
        city,
        state,
        postal_code,
        country,
        metadata,
        external_updated_at: customer::normalize_timestamp(
            client
                .updated
                .as_ref()
                .and_then(|u| u.updated_on_datetime.as_deref()),
        ),
    };
    Ok((customer, warnings))
}

/// Deserializers that take what a field usually is and let anything else through as absent.
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    }

    /// The sources' one id rule ([`crate::sources::positive_id`]); anything else is no id.
    pub(crate) fn id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let value = Value::deserialize(d)?;
        Ok(crate::sources::positive_id(&value).and_then(|id| id.parse().ok()))
    }

    pub(crate) fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Value {
        serde_json::json!({"id": 12345, "first_name": "John", "last_name": "Doe",
            "email": " John.Doe@Example.com ", "phone_number": "555-867-5309",
            "client_status_id": 10, "client_status": "Active", "location_id": 20,
            "location": "Main Street Gym", "date_of_birth": "1900-01-01",
            "timezone": "America/Chicago", "is_email_subscribed": true, "is_sms_subscribed": false,
            "tags": ["vip"], "member_since": "2022-01-16",
            "street_address_1": "1 Main St", "zipcode": 60601, "country": "United States",
            "created_on": {"created_by_id": 80, "created_by": "Admin", "created_on_datetime": "2022-01-15T08:30:00"},
            "updated": {"updated_by_id": 81, "updated_by": "Staff", "updated_on_datetime": "2024-03-10T14:45:00Z"}})
    }

    #[test]
    fn documented_example_maps_to_only_accepted_fields() {
        let client: Client = serde_json::from_value(example()).expect("parses");
        let (customer, warnings) = map_client(&client, "US").expect("maps");
        let body: Value = serde_json::from_slice(&customer.to_body()).expect("json");
        // 555-867-5309 is a fictional number libphonenumber rightly refuses.
        assert_eq!(warnings, vec!["phone_unparseable"]);
        assert_eq!(
            body,
            serde_json::json!({
                "email": "john.doe@example.com",
                "name": "John Doe",
                "address_line1": "1 Main St",
                "postal_code": "60601",
                "country": "US",
                "metadata": {"location": "Main Street Gym", "source_status": "Active", "tags": ["vip"]},
                "external_updated_at": "2024-03-10T14:45:00Z"
            })
        );
    }

    #[test]
    fn a_client_without_email_is_rejected_with_a_hint() {
        let mut value = example();
        value["email"] = Value::String(String::new());
        let client: Client = serde_json::from_value(value).expect("parses");
        let rejection = map_client(&client, "US").expect_err("rejected");
        assert_eq!(rejection.code, "no_email");
        assert!(rejection.hint.contains("Wodify profile"));
    }
}
