//! RevKeen's own hosted sync, the other writer. RevKeen runs built-in integrations for Wodify
//! and PracticeHub itself; a merchant who has one active for a provider and runs this daemon
//! for the same provider gets two writers upserting the same `(source, externalId)` customers
//! with different field sets. At start (daemon and `--once`) and in `check-config --connect`
//! the daemon reads `GET /integrations/{provider}` once per configured kind and, when that sync
//! is active, says so plainly: a warning in the log, in `status` (recorded in the state file)
//! and in the check's output. A read RevKeen refuses (403: a key without `integrations:read`)
//! or does not know (404: none configured, an older API) is noted at debug level and changes
//! nothing. The daemon never writes `sync-state`, that sync's own cursor store.

use crate::config::{Config, SourceConfig};
use crate::revkeen::{HostedSync, RevKeenClient};
use crate::store::{Store, StoreError};

/// What one provider's read found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    /// The provider (`wodify`, `practicehub`): the source kind.
    pub provider: String,
    /// The warning when RevKeen's own sync is active; `None` when it is off.
    pub warning: Option<String>,
}

/// Reads RevKeen's own sync for each kind among `sources`, in the order they first appear.
/// A provider RevKeen did not answer for (403, 404, an error) yields no finding.
pub(crate) async fn check(client: &RevKeenClient, sources: &[SourceConfig]) -> Vec<Finding> {
    let mut providers: Vec<&str> = Vec::new();
    for source in sources {
        if !providers.contains(&source.kind) {
            providers.push(source.kind);
        }
    }
    let mut findings = Vec::new();
    for provider in providers {
        match client.hosted_sync(provider).await {
            HostedSync::Active {
                status,
                last_sync_at,
            } => findings.push(Finding {
                provider: provider.to_string(),
                warning: Some(warning(
                    provider,
                    sources,
                    status.as_deref(),
                    last_sync_at.as_deref(),
                )),
            }),
            HostedSync::Off => findings.push(Finding {
                provider: provider.to_string(),
                warning: None,
            }),
            HostedSync::Unknown(detail) => tracing::debug!(
                provider,
                %detail,
                "Could not read RevKeen's built-in {provider} sync (GET /integrations/{provider}); \
                 this changes nothing."
            ),
        }
    }
    findings
}

/// The warning for an active hosted sync: what it means and the two ways out.
fn warning(
    provider: &str,
    sources: &[SourceConfig],
    status: Option<&str>,
    last_sync_at: Option<&str>,
) -> String {
    let names: Vec<String> = sources
        .iter()
        .filter(|s| s.kind == provider)
        .map(|s| format!("{:?}", s.name))
        .collect();
    let mut seen = Vec::new();
    if let Some(status) = status {
        seen.push(format!("status {status}"));
    }
    if let Some(at) = last_sync_at {
        seen.push(format!("last sync {at}"));
    }
    let seen = if seen.is_empty() {
        String::new()
    } else {
        format!(" ({})", seen.join(", "))
    };
    format!(
        "RevKeen's built-in {provider} sync is active{seen}: it and sync-daemon (source {}) both \
         write this merchant's {provider} customers, with different fields. Turn one of the two \
         off: disable the {provider} integration's sync in RevKeen, or remove the source from \
         this config.",
        names.join(", ")
    )
}

/// The check at start: each active hosted sync is logged as a warning and recorded for
/// `status`; one found off clears an earlier record. Never fails the start: a RevKeen that
/// cannot be asked is a debug line.
pub(crate) async fn check_and_record(
    config: &Config,
    sources: &[SourceConfig],
    store: &Store,
) -> Result<Vec<Finding>, StoreError> {
    let client = match RevKeenClient::new(&config.revkeen) {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "No client to read RevKeen's built-in syncs.");
            return Ok(Vec::new());
        }
    };
    let findings = check(&client, sources).await;
    for finding in &findings {
        if let Some(warning) = &finding.warning {
            tracing::warn!(provider = %finding.provider, "{warning}");
        }
        let (provider, warning) = (finding.provider.clone(), finding.warning.clone());
        store
            .call(move |s| s.record_hosted_sync(&provider, warning.as_deref()))
            .await?;
    }
    Ok(findings)
}
