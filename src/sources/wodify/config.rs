//! Wodify's settings: its defaults for the common keys (the documented 5 requests a second,
//! burst 20; a monthly request budget of 250,000) and its one key of its own, `scan`.

use std::sync::Arc;

use serde::Deserialize;

use crate::config::{ConfigError, Keys, SourceDefaults, SourceKind, SourceOptions, parse_options};

/// The `wodify` kind.
pub struct WodifyKind;

/// How a scan moves through the client list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// `GET /clients/search?q=id|gt|N&sort=id`: robust against inserts during a scan.
    Keyset,
    /// `GET /clients?page=N&sort=id`: the fallback if search is unavailable to a key.
    Pages,
}

/// A Wodify source's own settings.
#[derive(Debug, Clone)]
pub struct WodifyOptions {
    /// `scan = "keyset"` (default) or `"pages"`.
    pub scan: Scan,
}

impl SourceOptions for WodifyOptions {
    fn to_toml(&self) -> String {
        let scan = match self.scan {
            Scan::Keyset => "keyset",
            Scan::Pages => "pages",
        };
        format!("scan = \"{scan}\"\n")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    scan: Option<String>,
}

impl SourceKind for WodifyKind {
    fn name(&self) -> &'static str {
        "wodify"
    }

    fn defaults(&self) -> SourceDefaults {
        // Wodify's documented limit: 5 requests a second, burst 20. Its 500,000 requests a
        // month are per API key, shared with Wodify Workflows and the gym's other integrations:
        // the daemon takes half by default.
        SourceDefaults::new("0 */15 * * * *", (5, 20), "US", "https://api.wodify.com/v1")
            .with_monthly_request_budget(250_000)
    }

    fn options(&self, at: &str, keys: Keys) -> Result<Arc<dyn SourceOptions>, ConfigError> {
        let raw: RawOptions = parse_options(at, self.name(), keys)?;
        let scan = match raw.scan.as_deref() {
            None | Some("keyset") => Scan::Keyset,
            Some("pages") => Scan::Pages,
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{at}.scan"),
                    format!("{other:?} is not a scan mode: use \"keyset\" or \"pages\""),
                ));
            }
        };
        Ok(Arc::new(WodifyOptions { scan }))
    }
}
