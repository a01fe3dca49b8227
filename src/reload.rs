//! Re-reading the keys without a restart. `SIGHUP` (`systemctl reload sync-daemon`) loads the
//! config again — the file, its key files, `$CREDENTIALS_DIRECTORY`, the `SYNC_DAEMON__…`
//! overrides — and puts every API key and push secret it reads in place of the one in use
//! (`SecretCell`): each client sends the new value from its next request on. Only keys are
//! re-read; any other change waits for a restart, and the log line says so. A config that no
//! longer loads changes nothing and is logged as an error.
//!
//! While RevKeen or a source refuses its key, the daemon also re-reads by itself every
//! [`RECHECK`] (a Kubernetes Secret mounted as a file is updated in place, with no signal), and
//! a changed key is tried at once: a source polls now (the poll is its authenticated probe); a
//! halted RevKeen worker starts again, and its first step is one authenticated read that clears
//! the halt or halts again without a send. Every re-read is recorded for `status`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::secret::{Secret, SecretCell};
use crate::store::{Store, StoreError};

/// How often the keys are re-read while an API refuses one (and never otherwise).
pub const RECHECK: Duration = Duration::from_secs(10);

/// Loads the config again, as at start (the same path and environment).
pub type Loader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What made the daemon re-read its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// `SIGHUP`: every key is re-read and reported, changed or not.
    Signal,
    /// The periodic look while an API refuses its key: only a changed key is reported.
    Recheck,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Recheck => "key file changed",
        }
    }
}

/// Which keys a re-read changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changed {
    /// RevKeen's API key.
    pub revkeen: bool,
    /// Sources whose API key changed.
    pub sources: Vec<String>,
}

/// The keys in use, and how to read them again.
pub(crate) struct Rereader {
    /// The daemon's config: its cells are the ones every client reads.
    current: Config,
    load: Loader,
    store: Store,
}

impl Rereader {
    pub(crate) fn new(current: Config, load: Loader, store: Store) -> Self {
        Rereader {
            current,
            load,
            store,
        }
    }

    /// Reads the config again and puts its keys in place; says which changed. A config that
    /// does not load is logged and changes nothing.
    pub(crate) async fn reread(&self, trigger: Trigger) -> Result<Changed, StoreError> {
        let load = self.load.clone();
        let fresh = match tokio::task::spawn_blocking(move || load()).await {
            Ok(Ok(fresh)) => fresh,
            Ok(Err(error)) => {
                if trigger == Trigger::Signal {
                    tracing::error!(
                        "SIGHUP: the config does not load ({error}); the keys in use stay. Fix it and send SIGHUP again."
                    );
                }
                return Ok(Changed::default());
            }
            Err(join) => {
                tracing::error!("SIGHUP: reading the config failed: {join}.");
                return Ok(Changed::default());
            }
        };
        let mut changed = Changed::default();
        let mut read: Vec<(String, bool)> = Vec::new();
        let mut put = |name: String, cell: &SecretCell, value: Secret| {
            let differs = cell.replace(value);
            read.push((name, differs));
            differs
        };
        changed.revkeen = put(
            "revkeen.api_key".to_string(),
            &self.current.revkeen.api_key,
            fresh.revkeen.api_key.current(),
        );
        let mut restart_needed = Vec::new();
        for source in &self.current.sources {
            let Some(new) = fresh.sources.iter().find(|s| s.name == source.name) else {
                restart_needed.push(format!("source {:?} was removed", source.name));
                continue;
            };
            if put(
                format!("sources.{}.api_key", source.name),
                &source.api_key,
                new.api_key.current(),
            ) {
                changed.sources.push(source.name.clone());
            }
            match (&source.push_secret, &new.push_secret) {
                (Some(cell), Some(value)) => {
                    put(
                        format!("sources.{}.push_secret", source.name),
                        cell,
                        value.current(),
                    );
                }
                (None, None) => {}
                _ => restart_needed.push(format!("the push feed of {:?}", source.name)),
            }
        }
        for source in &fresh.sources {
            if !self.current.sources.iter().any(|s| s.name == source.name) {
                restart_needed.push(format!("new source {:?}", source.name));
            }
        }
        let reported: Vec<(String, bool)> = read
            .into_iter()
            .filter(|(_, differs)| trigger == Trigger::Signal || *differs)
            .collect();
        if reported.is_empty() {
            return Ok(changed);
        }
        let summary = reported
            .iter()
            .map(|(name, differs)| {
                format!("{name} {}", if *differs { "changed" } else { "unchanged" })
            })
            .collect::<Vec<_>>()
            .join(", ");
        match trigger {
            Trigger::Signal => tracing::info!(
                "SIGHUP: re-read the keys: {summary}. Other settings apply at the next restart."
            ),
            Trigger::Recheck => {
                tracing::info!(
                    "A key changed while its API refused the old one: {summary}; trying it now."
                )
            }
        }
        if !restart_needed.is_empty() {
            tracing::warn!(
                "SIGHUP re-reads keys only; restart sync-daemon to apply: {}.",
                restart_needed.join(", ")
            );
        }
        if trigger == Trigger::Signal {
            for warning in &fresh.warnings {
                tracing::warn!("{warning}");
            }
        }
        let name = trigger.name();
        self.store
            .call(move |s| {
                for (key, differs) in &reported {
                    s.record_key_reread(key, name, *differs)?;
                }
                Ok(())
            })
            .await?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn config_with_key(dir: &std::path::Path, revkeen_key: &str, wodify_key: &str) -> Config {
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            format!(
                "[revkeen]\napi_key='{revkeen_key}'\n[[sources]]\nname='gym'\nkind='wodify'\n\
                 base_url='https://api.wodify.com/v1'\napi_key='{wodify_key}'\n\
                 push_secret='push-secret-1'\n\
                 [daemon]\nstate_path='{}'\n",
                dir.join("state.db").display()
            ),
        )
        .expect("config");
        Config::load(Some(&path), &crate::sources::config_kinds()).expect("valid config")
    }

    fn loader(dir: &std::path::Path) -> Loader {
        let path = dir.join("config.toml");
        Arc::new(move || Config::load(Some(&path), &crate::sources::config_kinds()))
    }

    #[tokio::test]
    async fn a_reread_puts_changed_keys_in_place_and_records_every_key_on_sighup() {
        let (store, dir) = temp_store();
        let current = config_with_key(dir.path(), "rk-old-key", "wodify-key-1");
        let client_view = current.clone();
        let rereader = Rereader::new(current, loader(dir.path()), store.clone());

        config_with_key(dir.path(), "rk-new-key", "wodify-key-1");
        let changed = rereader.reread(Trigger::Signal).await.expect("reread");
        assert_eq!(
            changed,
            Changed {
                revkeen: true,
                sources: vec![]
            }
        );
        // A clone made before (a client's) sees the new key.
        assert_eq!(client_view.revkeen.api_key.current().expose(), "rk-new-key");
        let rereads = store.call(|s| s.key_rereads()).await.expect("rereads");
        let summary: Vec<(&str, &str, bool)> = rereads
            .iter()
            .map(|r| (r.key.as_str(), r.trigger.as_str(), r.changed))
            .collect();
        assert_eq!(
            summary,
            [
                ("revkeen.api_key", "SIGHUP", true),
                ("sources.gym.api_key", "SIGHUP", false),
                ("sources.gym.push_secret", "SIGHUP", false),
            ]
        );
    }

    #[tokio::test]
    async fn a_recheck_reports_only_what_changed_and_a_broken_config_changes_nothing() {
        let (store, dir) = temp_store();
        let current = config_with_key(dir.path(), "rk-old-key", "wodify-key-1");
        let rereader = Rereader::new(current.clone(), loader(dir.path()), store.clone());

        config_with_key(dir.path(), "rk-old-key", "wodify-key-2");
        let changed = rereader.reread(Trigger::Recheck).await.expect("reread");
        assert_eq!(changed.sources, ["gym"]);
        assert!(!changed.revkeen);
        let rereads = store.call(|s| s.key_rereads()).await.expect("rereads");
        assert_eq!(rereads.len(), 1, "{rereads:?}");
        assert_eq!(rereads[0].key, "sources.gym.api_key");
        assert_eq!(rereads[0].trigger, "key file changed");

        std::fs::write(dir.path().join("config.toml"), "[revkeen\n").expect("broken");
        let changed = rereader.reread(Trigger::Signal).await.expect("reread");
        assert_eq!(changed, Changed::default());
        assert_eq!(
            current.sources[0].api_key.current().expose(),
            "wodify-key-2"
        );
    }
}
