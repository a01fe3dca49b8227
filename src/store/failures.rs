//! Records that could not be sent, one row per customer: its current problem.
//!
//! **Nothing is dropped silently (invariant 6).** A record rejected before sending (no valid
//! email) or dead-lettered after RevKeen's final refusal or exhausted retries lives here with
//! its reason until the record changes or is replayed. A rejection is the customer's current
//! problem: it is never overwritten by the dead letter of an older version. A dead letter keeps
//! its body so that `replay` can send it again.

use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::Cached;
use super::outbox::{Job, placeholders};
use super::{Store, StoreError};
use crate::customer::Rejection;
use crate::secret::redact;

/// A final refusal, as kept for `failures` and `replay`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// RevKeen's `error.code`, or ours (`retries_exhausted`, `idempotency_conflict`).
    pub code: String,
    /// RevKeen's message or our explanation.
    pub reason: String,
    pub http_status: Option<u16>,
    /// RevKeen's `details.fields`.
    pub field_errors: Option<serde_json::Value>,
    pub hint: Option<String>,
}

/// Whether a failure happened before sending or at RevKeen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Could not be normalized (no valid email): never sent.
    Rejected,
    /// Refused by RevKeen or out of retries: kept with its body for `replay`.
    DeadLetter,
}

/// A record that could not be sent.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Failure {
    pub source: String,
    pub external_id: String,
    pub kind: FailureKind,
    pub code: String,
    pub reason: String,
    pub hint: Option<String>,
    pub http_status: Option<u16>,
    pub field_errors: Option<serde_json::Value>,
    pub attempts: u32,
    /// Unix ms.
    pub first_seen: i64,
    pub last_seen: i64,
    /// RevKeen's id for the customer, when an earlier single upsert of it was answered with
    /// one (a customer that was synced before this failure).
    pub revkeen_id: Option<String>,
}

impl Store {
    /// Every failure, optionally of some sources only, oldest first.
    pub fn failures(&self, sources: Option<&[String]>) -> Result<Vec<Failure>, StoreError> {
        let conn = self.conn();
        let columns = "f.source, f.external_id, f.kind, f.code, f.reason, f.hint, f.http_status, \
                       f.field_errors, f.attempts, f.first_seen, f.last_seen, c.revkeen_id";
        let from = "failures f LEFT JOIN customers c \
                    ON c.source = f.source AND c.external_id = f.external_id";
        let (sql, args): (String, Vec<String>) = match sources {
            None => (
                format!(
                    "SELECT {columns} FROM {from} ORDER BY f.first_seen, f.source, f.external_id"
                ),
                vec![],
            ),
            Some(list) => (
                format!(
                    "SELECT {columns} FROM {from} WHERE f.source IN ({})
                      ORDER BY f.first_seen, f.source, f.external_id",
                    placeholders(list.len())
                ),
                list.to_vec(),
            ),
        };
        let mut stmt = conn.prepare(&sql).map_err(|e| self.err(e))?;
        stmt.query_map(params_from_iter(args), failure_from_row)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// Counts of failures among `sources`: (rejected, dead letters).
    pub fn failure_counts(&self, sources: &[String]) -> Result<(u64, u64), StoreError> {
        let sql = format!(
            "SELECT COALESCE(SUM(kind = 'rejected'), 0), COALESCE(SUM(kind = 'dead_letter'), 0)
               FROM failures WHERE source IN ({})",
            placeholders(sources.len())
        );
        self.conn()
            .row_cached(&sql, params_from_iter(sources), |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(|e| self.err(e))
    }
}

fn failure_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Failure> {
    let kind: String = row.get(2)?;
    let fields: Option<String> = row.get(7)?;
    Ok(Failure {
        source: row.get(0)?,
        external_id: row.get(1)?,
        kind: if kind == "rejected" {
            FailureKind::Rejected
        } else {
            FailureKind::DeadLetter
        },
        code: row.get(3)?,
        reason: row.get(4)?,
        hint: row.get(5)?,
        http_status: row.get(6)?,
        field_errors: fields.and_then(|f| serde_json::from_str(&f).ok()),
        attempts: row.get(8)?,
        first_seen: row.get(9)?,
        last_seen: row.get(10)?,
        revkeen_id: row.get(11)?,
    })
}

/// How stale a rejection's `last_seen` may get while every poll finds the record rejected the
/// same way: refreshing it on every poll would rewrite every rejected row on every rescan.
pub const LAST_SEEN_REFRESH_MS: i64 = 24 * 3600 * 1000;

/// Records why a record cannot become a customer (its current problem). The same rejection
/// again is not written, except to move `last_seen` once [`LAST_SEEN_REFRESH_MS`] old.
pub(super) fn record_rejection(
    conn: &Connection,
    source: &str,
    external_id: &str,
    rejection: &Rejection,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO failures (source, external_id, kind, code, reason, hint, first_seen, last_seen)
         VALUES (?1, ?2, 'rejected', ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (source, external_id) DO UPDATE SET kind = 'rejected', code = excluded.code,
             reason = excluded.reason, hint = excluded.hint, http_status = NULL,
             field_errors = NULL, body = NULL, body_hash = NULL, attempts = 0,
             first_seen = CASE WHEN failures.kind = 'rejected' THEN failures.first_seen
                               ELSE excluded.first_seen END,
             last_seen = excluded.last_seen
          WHERE failures.kind <> 'rejected' OR failures.code <> excluded.code
             OR failures.reason <> excluded.reason OR failures.hint IS NOT excluded.hint
             OR failures.last_seen <= excluded.last_seen - ?7",
    )?
    .execute(params![
        source,
        external_id,
        rejection.code,
        rejection.reason,
        rejection.hint,
        now,
        LAST_SEEN_REFRESH_MS
    ])
    .map(drop)
}

/// The record normalized again (or is gone at the source): its rejection is resolved.
pub(super) fn clear_rejection(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM failures WHERE source = ?1 AND external_id = ?2 AND kind = 'rejected'",
    )?
    .execute(params![source, external_id])
    .map(drop)
}

/// Keeps a refused job as the customer's dead letter, unless the customer's record has since
/// been rejected: that rejection is its current problem, and the refused body is out of date.
pub(super) fn dead_letter(
    conn: &Connection,
    job: &Job,
    attempts: u32,
    dead: &DeadLetter,
    now: i64,
) -> rusqlite::Result<()> {
    // What RevKeen said is stored scrubbed of secrets (an error may echo the key it was sent).
    let fields = dead.field_errors.as_ref().map(|v| redact(&v.to_string()));
    conn.prepare_cached(
        "INSERT INTO failures (source, external_id, kind, code, reason, hint, http_status,
                               field_errors, revkeen_source, body, body_hash, attempts,
                               first_seen, last_seen)
         VALUES (?1, ?2, 'dead_letter', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)
         ON CONFLICT (source, external_id) DO UPDATE SET kind = 'dead_letter',
             code = excluded.code, reason = excluded.reason, hint = excluded.hint,
             http_status = excluded.http_status, field_errors = excluded.field_errors,
             revkeen_source = excluded.revkeen_source, body = excluded.body,
             body_hash = excluded.body_hash, attempts = excluded.attempts,
             first_seen = CASE WHEN failures.kind = 'dead_letter' THEN failures.first_seen
                               ELSE excluded.first_seen END,
             last_seen = excluded.last_seen
           WHERE failures.kind <> 'rejected'",
    )?
    .execute(params![
        job.source,
        job.external_id,
        redact(&dead.code),
        redact(&dead.reason),
        dead.hint,
        dead.http_status,
        fields,
        job.revkeen_source,
        job.body,
        job.body_hash,
        attempts,
        now
    ])
    .map(drop)
}

/// RevKeen accepted the customer: an older dead letter of it is resolved.
pub(super) fn clear_dead_letter(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM failures WHERE source = ?1 AND external_id = ?2 AND kind = 'dead_letter'",
    )?
    .execute(params![source, external_id])
    .map(drop)
}

/// [`clear_dead_letter`] for every member of a recorded batch.
pub(super) fn clear_batch_dead_letters(conn: &Connection, batch_id: i64) -> rusqlite::Result<()> {
    // Dead letters are rare: look for one before paying for the join.
    let any_dead: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM failures WHERE kind = 'dead_letter')")?
        .query_row([], |row| row.get(0))?;
    if any_dead {
        conn.prepare_cached(
            "DELETE FROM failures WHERE kind = 'dead_letter' AND (source, external_id) IN
               (SELECT source, external_id FROM outbox WHERE batch_id = ?1)",
        )?
        .execute([batch_id])?;
    }
    Ok(())
}

/// The kind of a customer's open failure (`rejected`, `dead_letter`), if it has one.
pub(super) fn kind_of(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> rusqlite::Result<Option<String>> {
    conn.row_cached(
        "SELECT kind FROM failures WHERE source = ?1 AND external_id = ?2",
        params![source, external_id],
        |row| row.get(0),
    )
    .optional()
}

/// Every dead letter among `sources`, as `(source, external id)`.
pub(super) fn dead_letters(
    conn: &Connection,
    sources: &[String],
) -> rusqlite::Result<Vec<(String, String)>> {
    let sql = format!(
        "SELECT source, external_id FROM failures
          WHERE kind = 'dead_letter' AND source IN ({})",
        placeholders(sources.len())
    );
    let mut stmt = conn.prepare(&sql)?;
    stmt.query_map(params_from_iter(sources), |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?
    .collect()
}

/// Removes a customer's failure and returns a dead letter's stored body and RevKeen source.
pub(super) fn take(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> rusqlite::Result<(Vec<u8>, String)> {
    let stored = conn.row_cached(
        "SELECT body, revkeen_source FROM failures WHERE source = ?1 AND external_id = ?2",
        params![source, external_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    conn.exec_cached(
        "DELETE FROM failures WHERE source = ?1 AND external_id = ?2",
        params![source, external_id],
    )?;
    Ok(stored)
}

/// Open failures per source: `(source, rejected, dead letters)`.
pub(super) fn counts_by_source(conn: &Connection) -> rusqlite::Result<Vec<(String, u64, u64)>> {
    conn.prepare_cached(
        "SELECT source, COALESCE(SUM(kind = 'rejected'), 0),
                COALESCE(SUM(kind = 'dead_letter'), 0)
           FROM failures GROUP BY source",
    )?
    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
    .collect()
}
