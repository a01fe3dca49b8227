//! What happened, for `status` and the run summary: runs, polls and their counts, RevKeen's
//! answers per source (running totals, updated in the transaction that acknowledges them), and
//! auth halts (an API that refused our key; sending stops until an authenticated answer clears
//! it). Nothing here decides what is sent.

use rusqlite::{Connection, OptionalExtension, params};

use super::Cached;
use super::{Store, StoreError, now_ms};
use crate::secret::redact;

/// Polls kept per source, and runs kept, in the history (`status` shows the newest; the page
/// cap of a listing reads the recent ones). At a poll every 2 s that is the last 33 minutes; at
/// the default 15 minutes, ten days.
pub const HISTORY_KEPT: i64 = 1000;

/// What a committed page changed, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageOutcome {
    /// New jobs, or queued jobs replaced by a newer version.
    pub enqueued: u64,
    /// Records whose body equals what is synced or already queued.
    pub unchanged: u64,
    /// Records that could not be normalized.
    pub rejected: u64,
    /// Update-only records for customers RevKeen never had (a deleted patient).
    pub skipped: u64,
    /// The commit moved the source's cursor (see [`CursorSave`](super::CursorSave)).
    pub cursor_saved: bool,
}

/// Totals of RevKeen's answers, per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryCounts {
    pub created: u64,
    pub updated: u64,
    pub stale: u64,
    pub dead_lettered: u64,
}

impl DeliveryCounts {
    /// Customers RevKeen wrote (created or updated).
    pub fn writes(&self) -> u64 {
        self.created + self.updated
    }
}

/// An API that refused the configured key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Halt {
    /// `revkeen` or a source name.
    pub target: String,
    pub code: String,
    pub message: String,
    pub since: i64,
}

/// The last re-read of one key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyReread {
    /// `revkeen.api_key`, `sources.<name>.api_key` or `sources.<name>.push_secret`.
    pub key: String,
    pub at: i64,
    /// `SIGHUP`, or `key file changed` (noticed while its API refused the old key).
    pub trigger: String,
    /// Whether the value read differs from the one in use before.
    pub changed: bool,
}

/// Counts kept for one poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PollStats {
    pub pages: u64,
    pub fetched: u64,
    pub enqueued: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// Records with nothing to send (a deleted patient RevKeen never had).
    pub skipped: u64,
    /// Fields left out of a customer (an unparseable phone, an unknown country).
    pub warnings: u64,
    /// Records the previous complete scan listed and this one did not (deleted at the source;
    /// RevKeen keeps them).
    pub vanished: u64,
}

impl PollStats {
    /// Adds a committed page.
    pub fn add_page(&mut self, fetched: usize, page: &PageOutcome) {
        self.pages += 1;
        self.fetched += fetched as u64;
        self.enqueued += page.enqueued;
        self.unchanged += page.unchanged;
        self.skipped += page.skipped;
        self.rejected += page.rejected;
    }
}

/// A poll as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PollRecord {
    pub source: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    pub stats: PollStats,
}

pub(super) fn add_delivery(
    conn: &Connection,
    source: &str,
    counts: DeliveryCounts,
    now: i64,
) -> rusqlite::Result<()> {
    let success = counts.created + counts.updated + counts.stale > 0;
    conn.prepare_cached(
        "INSERT INTO delivery (source, created, updated, stale, dead_lettered, last_success)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (source) DO UPDATE SET created = created + excluded.created,
             updated = updated + excluded.updated, stale = stale + excluded.stale,
             dead_lettered = dead_lettered + excluded.dead_lettered,
             last_success = COALESCE(excluded.last_success, last_success)",
    )?
    .execute(params![
        source,
        counts.created,
        counts.updated,
        counts.stale,
        counts.dead_lettered,
        success.then_some(now)
    ])
    .map(drop)
}

/// A host paused for a long `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pause {
    /// `revkeen` or a source name.
    pub target: String,
    /// Unix ms.
    pub until: i64,
    pub reason: String,
}

impl Store {
    /// Records that requests to `target` wait until `until` (Unix ms), and why.
    pub fn set_pause(&self, target: &str, until: i64, reason: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO pauses (target, until, reason, since) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (target) DO UPDATE SET until = excluded.until,
                     reason = excluded.reason, since = excluded.since",
            )
            .and_then(|mut stmt| stmt.execute(params![target, until, redact(reason), now_ms()]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Pauses that have not ended by `now` (Unix ms).
    pub fn pauses(&self, now: i64) -> Result<Vec<Pause>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT target, until, reason FROM pauses WHERE until > ?1 ORDER BY target",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([now], |row| {
            Ok(Pause {
                target: row.get(0)?,
                until: row.get(1)?,
                reason: row.get(2)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Records that `target` refused our key.
    pub fn set_halt(&self, target: &str, code: &str, message: &str) -> Result<(), StoreError> {
        self.conn()
            .exec_cached(
                "INSERT INTO halts (target, code, message, since) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (target) DO UPDATE SET code = excluded.code,
                     message = excluded.message",
                params![target, redact(code), redact(message), now_ms()],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Clears a halt once `target` answered an authenticated request.
    pub fn clear_halt(&self, target: &str) -> Result<(), StoreError> {
        self.conn()
            .exec_cached("DELETE FROM halts WHERE target = ?1", [target])
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Every unresolved halt.
    pub fn halts(&self) -> Result<Vec<Halt>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT target, code, message, since FROM halts ORDER BY target")
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |row| {
            Ok(Halt {
                target: row.get(0)?,
                code: row.get(1)?,
                message: row.get(2)?,
                since: row.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Records that the key named `key` (`revkeen.api_key`, `sources.gym.push_secret`) was
    /// re-read, on `trigger` (`SIGHUP`, `key file changed`), and whether its value changed.
    pub fn record_key_reread(
        &self,
        key: &str,
        trigger: &str,
        changed: bool,
    ) -> Result<(), StoreError> {
        self.conn()
            .exec_cached(
                "INSERT INTO key_rereads (key, at, trigger, changed) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET at = excluded.at, trigger = excluded.trigger,
                     changed = excluded.changed",
                params![key, now_ms(), trigger, changed],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records (`Some(message)`) or clears (`None`) the finding that RevKeen's own hosted sync
    /// for `provider` is active.
    pub fn record_hosted_sync(
        &self,
        provider: &str,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        match message {
            Some(message) => conn.execute(
                "INSERT INTO hosted_syncs (provider, message, checked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (provider) DO UPDATE SET message = excluded.message,
                     checked_at = excluded.checked_at",
                params![provider, redact(message), now_ms()],
            ),
            None => conn.execute("DELETE FROM hosted_syncs WHERE provider = ?1", [provider]),
        }
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// Every provider whose hosted sync was last found active: `(provider, message, checked
    /// at)`, by provider.
    pub fn hosted_syncs(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT provider, message, checked_at FROM hosted_syncs ORDER BY provider")
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// The last re-read of every key re-read since the state file was made, by key.
    pub fn key_rereads(&self) -> Result<Vec<KeyReread>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT key, at, trigger, changed FROM key_rereads ORDER BY key")
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |row| {
            Ok(KeyReread {
                key: row.get(0)?,
                at: row.get(1)?,
                trigger: row.get(2)?,
                changed: row.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Starts a run record; returns its id.
    pub fn begin_run(&self, mode: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.exec_cached(
            "INSERT INTO runs (mode, started_at) VALUES (?1, ?2)",
            params![mode, now_ms()],
        )
        .map_err(|e| self.err(e))?;
        let run = conn.last_insert_rowid();
        // A bounded history: the newest runs, and any an old poll still names.
        conn.prepare_cached(
            "DELETE FROM runs WHERE id <= ?1 - ?2
               AND id NOT IN (SELECT run_id FROM polls WHERE run_id IS NOT NULL)",
        )
        .and_then(|mut stmt| stmt.execute(params![run, HISTORY_KEPT]))
        .map_err(|e| self.err(e))?;
        Ok(run)
    }

    /// The mode (`daemon`, `once`) of the newest run not yet finished, if any. Only meaningful
    /// while a process holds the writer lock (a crashed run is never finished).
    pub fn open_run_mode(&self) -> Result<Option<String>, StoreError> {
        self.conn()
            .row_cached(
                "SELECT mode FROM runs WHERE finished_at IS NULL ORDER BY id DESC LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Closes a run record.
    pub fn finish_run(&self, run_id: i64, outcome: &str) -> Result<(), StoreError> {
        self.conn()
            .exec_cached(
                "UPDATE runs SET finished_at = ?2, outcome = ?3 WHERE id = ?1",
                params![run_id, now_ms(), outcome],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Starts a poll record; returns its id.
    pub fn begin_poll(&self, run_id: Option<i64>, source: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.exec_cached(
            "INSERT INTO polls (run_id, source, started_at) VALUES (?1, ?2, ?3)",
            params![run_id, source, now_ms()],
        )
        .map_err(|e| self.err(e))?;
        let poll = conn.last_insert_rowid();
        // A bounded history: the newest HISTORY_KEPT polls of the source (an index walk).
        conn.prepare_cached(
            "DELETE FROM polls WHERE source = ?1 AND id <= (
                 SELECT id FROM polls WHERE source = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )
        .and_then(|mut stmt| stmt.execute(params![source, HISTORY_KEPT]))
        .map_err(|e| self.err(e))?;
        Ok(poll)
    }

    /// Updates a poll record; `outcome` `Some` closes it.
    pub fn update_poll(
        &self,
        poll_id: i64,
        stats: &PollStats,
        outcome: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn()
            .exec_cached(
                "UPDATE polls SET pages = ?2, fetched = ?3, enqueued = ?4, unchanged = ?5,
                        rejected = ?6, outcome = ?7, error = ?8,
                        finished_at = CASE WHEN ?7 IS NULL THEN NULL ELSE ?9 END,
                        warnings = ?10, skipped = ?11, vanished = ?12
                  WHERE id = ?1",
                params![
                    poll_id,
                    stats.pages,
                    stats.fetched,
                    stats.enqueued,
                    stats.unchanged,
                    stats.rejected,
                    outcome,
                    error.map(redact),
                    now_ms(),
                    stats.warnings,
                    stats.skipped,
                    stats.vanished
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The most pages any of the source's last ten completed polls read, if one completed.
    pub fn recent_max_pages(&self, source: &str) -> Result<Option<u64>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT MAX(pages) FROM (SELECT pages FROM polls
                  WHERE source = ?1 AND outcome = 'ok' ORDER BY id DESC LIMIT 10)",
            )
            .and_then(|mut stmt| stmt.query_row([source], |row| row.get(0)))
            .map_err(|e| self.err(e))
    }

    /// When each source's last complete poll (outcome `ok`) finished, Unix ms.
    pub fn last_successful_polls(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT source, MAX(finished_at) FROM polls
                  WHERE outcome = 'ok' AND finished_at IS NOT NULL GROUP BY source ORDER BY source",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// The most recent poll of a source.
    pub fn last_poll(&self, source: &str) -> Result<Option<PollRecord>, StoreError> {
        self.conn()
            .row_cached(
                "SELECT source, started_at, finished_at, outcome, error, pages, fetched, enqueued,
                        unchanged, rejected, warnings, skipped, vanished
                   FROM polls WHERE source = ?1 ORDER BY id DESC LIMIT 1",
                [source],
                |row| {
                    Ok(PollRecord {
                        source: row.get(0)?,
                        started_at: row.get(1)?,
                        finished_at: row.get(2)?,
                        outcome: row.get(3)?,
                        error: row.get(4)?,
                        stats: PollStats {
                            pages: row.get(5)?,
                            fetched: row.get(6)?,
                            enqueued: row.get(7)?,
                            unchanged: row.get(8)?,
                            rejected: row.get(9)?,
                            warnings: row.get(10)?,
                            skipped: row.get(11)?,
                            vanished: row.get(12)?,
                        },
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Delivery totals of a source.
    pub fn delivery(&self, source: &str) -> Result<DeliveryCounts, StoreError> {
        self.conn()
            .row_cached(
                "SELECT created, updated, stale, dead_lettered FROM delivery WHERE source = ?1",
                [source],
                |row| {
                    Ok(DeliveryCounts {
                        created: row.get(0)?,
                        updated: row.get(1)?,
                        stale: row.get(2)?,
                        dead_lettered: row.get(3)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    fn count(store: &Store, sql: &str) -> i64 {
        store
            .conn()
            .query_row(sql, [], |row| row.get(0))
            .expect("count")
    }

    #[test]
    fn the_history_keeps_the_newest_polls_per_source_and_runs() {
        let (store, _dir) = temp_store();
        let mut last = 0;
        for _ in 0..(HISTORY_KEPT + 150) {
            let run = store.begin_run("once").expect("run");
            last = store.begin_poll(Some(run), "gym").expect("poll");
        }
        store.begin_poll(None, "clinic").expect("poll");
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM polls WHERE source = 'gym'"),
            HISTORY_KEPT
        );
        assert_eq!(
            count(&store, "SELECT MAX(id) FROM polls WHERE source = 'gym'"),
            last,
            "the newest stay"
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM polls WHERE source = 'clinic'"),
            1
        );
        assert!(count(&store, "SELECT COUNT(*) FROM runs") <= HISTORY_KEPT + 1);
    }
}
