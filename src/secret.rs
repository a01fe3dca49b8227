//! Secrets, and keeping them out of every output. A [`Secret`] (an API key, a push secret)
//! never shows in `Debug` or `Display`; every one read is also registered so that [`redact`]
//! can scrub it from text an upstream sent back (an error body that echoes the key it was
//! sent) before that text is logged, stored or printed. A leaf: it uses no other module, so the
//! lowest plumbing (`http`, the store) can redact without knowing the config.

use std::fmt;
use std::sync::Arc;

/// A secret value (API key, push secret). Its `Debug` and `Display` are redacted so that no log
/// line or error can carry it; [`Secret::expose`] is the one way to read it. Every secret is
/// also registered for [`redact`], which scrubs it from text an upstream sent back.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// Every secret this process has read, for [`redact`].
static SECRETS: std::sync::RwLock<Vec<Arc<str>>> = std::sync::RwLock::new(Vec::new());

/// Secrets shorter than this are not searched for in text: a value that short is no key, and
/// scrubbing it would mangle ordinary words.
const REDACTED_FROM: usize = 6;

/// `text` with every configured secret replaced by `[redacted]`: for anything an upstream
/// said (an error body may echo the key it was sent) before it is logged, stored or printed.
pub fn redact(text: &str) -> String {
    let secrets = SECRETS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = text.to_string();
    for secret in secrets.iter() {
        if out.contains(secret.as_ref()) {
            out = out.replace(secret.as_ref(), "[redacted]");
        }
    }
    out
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        let value: Arc<str> = value.into();
        if value.chars().count() >= REDACTED_FROM {
            let mut secrets = SECRETS
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !secrets.contains(&value) {
                secrets.push(value.clone());
            }
        }
        Secret(value)
    }

    /// The secret itself, for the one header or signature that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A secret that can be replaced while the process runs: `SIGHUP` (or a key file that changed
/// while its API refused the old key) re-reads the key files, and every clone — the config's,
/// each client's — sees the new value at its next request. Redacted like [`Secret`].
#[derive(Clone)]
pub struct SecretCell(Arc<std::sync::RwLock<Secret>>);

impl SecretCell {
    pub fn new(secret: Secret) -> Self {
        SecretCell(Arc::new(std::sync::RwLock::new(secret)))
    }

    /// The value now.
    pub fn current(&self) -> Secret {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `secret` in place of the value; says whether it differs from the one it replaced.
    pub fn replace(&self, secret: Secret) -> bool {
        let mut value = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *value != secret;
        *value = secret;
        changed
    }
}

impl fmt::Debug for SecretCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
