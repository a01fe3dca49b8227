//! Everything in the state file besides the outbox itself: synced hashes, failures, replay,
//! auth halts, runs and polls.

use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

use super::outbox::Job;
use super::{Store, StoreError, now_ms};
use crate::customer::body_hash;
use crate::keys;

/// How RevKeen took a body it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    Created,
    Updated,
    /// RevKeen holds newer data (`stale_update` / batch `skipped`): success.
    Stale,
    /// Accepted in a batch, which reports created/updated only as totals.
    InBatch,
}

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

/// Totals of RevKeen's answers, per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryCounts {
    pub created: u64,
    pub updated: u64,
    pub stale: u64,
    pub dead_lettered: u64,
}

impl DeliveryCounts {
    /// Adds another set of counts.
    pub fn add(&mut self, other: DeliveryCounts) {
        self.created += other.created;
        self.updated += other.updated;
        self.stale += other.stale;
        self.dead_lettered += other.dead_lettered;
    }

    /// Customers RevKeen wrote (created or updated).
    pub fn writes(&self) -> u64 {
        self.created + self.updated
    }
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

/// What `replay` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Dead letters put back in the outbox.
    pub replayed: u64,
    /// Dead letters dropped because a newer version of the customer is already queued.
    pub superseded: u64,
    /// Requested ids that have no failure.
    pub not_found: Vec<String>,
    /// Requested ids that were rejected before sending (fix them at the source instead).
    pub rejected: Vec<String>,
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
    pub fn add_page(&mut self, fetched: usize, page: &super::PageOutcome) {
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

/// What the state file knows about one customer (for `--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneState {
    pub latest_hash: Option<String>,
    pub synced_hash: Option<String>,
    pub synced_body: Option<Vec<u8>>,
}

pub(super) fn mark_synced(
    tx: &Transaction<'_>,
    job: &Job,
    _delivered: Delivered,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE customers SET synced_hash = ?3, synced_body = ?4, synced_at = ?5
          WHERE source = ?1 AND external_id = ?2",
    )?
    .execute(params![
        job.source,
        job.external_id,
        job.body_hash,
        job.body,
        now
    ])?;
    tx.prepare_cached(
        "DELETE FROM failures WHERE source = ?1 AND external_id = ?2 AND kind = 'dead_letter'",
    )?
    .execute(params![job.source, job.external_id])?;
    Ok(())
}

/// Keeps a refused job as the customer's dead letter, unless the customer's record has since
/// been rejected: that rejection is its current problem, and the refused body is out of date.
/// [`mark_synced`] for every member of a batch at once.
pub(super) fn mark_batch_synced(
    tx: &Transaction<'_>,
    batch_id: i64,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE customers SET synced_hash = o.body_hash, synced_body = o.body, synced_at = ?2
           FROM outbox o
          WHERE o.batch_id = ?1
            AND customers.source = o.source AND customers.external_id = o.external_id",
    )?
    .execute(params![batch_id, now])?;
    // Dead letters are rare: look for one before paying for the join.
    let any_dead: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM failures WHERE kind = 'dead_letter')")?
        .query_row([], |row| row.get(0))?;
    if any_dead {
        tx.prepare_cached(
            "DELETE FROM failures WHERE kind = 'dead_letter' AND (source, external_id) IN
               (SELECT source, external_id FROM outbox WHERE batch_id = ?1)",
        )?
        .execute([batch_id])?;
    }
    Ok(())
}

pub(super) fn dead_letter(
    tx: &Transaction<'_>,
    job: &Job,
    attempts: u32,
    dead: &DeadLetter,
    now: i64,
) -> rusqlite::Result<()> {
    let fields = dead.field_errors.as_ref().map(|v| v.to_string());
    tx.execute(
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
        params![
            job.source,
            job.external_id,
            dead.code,
            dead.reason,
            dead.hint,
            dead.http_status,
            fields,
            job.revkeen_source,
            job.body,
            job.body_hash,
            attempts,
            now
        ],
    )?;
    Ok(())
}

pub(super) fn add_delivery(
    tx: &Transaction<'_>,
    source: &str,
    counts: DeliveryCounts,
    now: i64,
) -> rusqlite::Result<()> {
    let success = counts.created + counts.updated + counts.stale > 0;
    tx.execute(
        "INSERT INTO delivery (source, created, updated, stale, dead_lettered, last_success)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (source) DO UPDATE SET created = created + excluded.created,
             updated = updated + excluded.updated, stale = stale + excluded.stale,
             dead_lettered = dead_lettered + excluded.dead_lettered,
             last_success = COALESCE(excluded.last_success, last_success)",
        params![
            source,
            counts.created,
            counts.updated,
            counts.stale,
            counts.dead_lettered,
            success.then_some(now)
        ],
    )
    .map(drop)
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
    })
}

impl Store {
    /// Every failure, optionally of some sources only, oldest first.
    pub fn failures(&self, sources: Option<&[String]>) -> Result<Vec<Failure>, StoreError> {
        let conn = self.conn();
        let columns = "source, external_id, kind, code, reason, hint, http_status, field_errors, \
                       attempts, first_seen, last_seen";
        let (sql, args): (String, Vec<String>) = match sources {
            None => (
                format!("SELECT {columns} FROM failures ORDER BY first_seen, source, external_id"),
                vec![],
            ),
            Some(list) => (
                format!(
                    "SELECT {columns} FROM failures WHERE source IN ({})
                      ORDER BY first_seen, source, external_id",
                    vec!["?"; list.len().max(1)].join(", ")
                ),
                if list.is_empty() {
                    vec![String::new()]
                } else {
                    list.to_vec()
                },
            ),
        };
        let mut stmt = conn.prepare(&sql).map_err(|e| self.err(e))?;
        stmt.query_map(params_from_iter(args), failure_from_row)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// Counts of failures among `sources`: (rejected, dead letters).
    pub fn failure_counts(&self, sources: &[String]) -> Result<(u64, u64), StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT COALESCE(SUM(kind = 'rejected'), 0), COALESCE(SUM(kind = 'dead_letter'), 0)
               FROM failures WHERE source IN ({})",
            vec!["?"; sources.len().max(1)].join(", ")
        );
        let args: Vec<&str> = if sources.is_empty() {
            vec![""]
        } else {
            sources.iter().map(String::as_str).collect()
        };
        conn.query_row(&sql, params_from_iter(args), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(|e| self.err(e))
    }

    /// Puts dead letters back in the outbox with their stored body and a fresh idempotency key
    /// (RevKeen replays a stored 400 for 24 hours, so the old key would be refused again).
    /// `ids` `None` replays every dead letter of `sources`.
    pub fn replay(
        &self,
        sources: &[String],
        ids: Option<&[String]>,
    ) -> Result<ReplayOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let mut outcome = ReplayOutcome::default();
        let mut targets: Vec<(String, String)> = Vec::new();
        match ids {
            None => {
                let sql = format!(
                    "SELECT source, external_id FROM failures
                      WHERE kind = 'dead_letter' AND source IN ({})",
                    vec!["?"; sources.len().max(1)].join(", ")
                );
                let mut stmt = tx.prepare(&sql).map_err(|e| self.err(e))?;
                targets = stmt
                    .query_map(params_from_iter(sources), |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .and_then(|rows| rows.collect())
                    .map_err(|e| self.err(e))?;
            }
            Some(ids) => {
                for id in ids {
                    let mut found = false;
                    for source in sources {
                        let kind: Option<String> = tx
                            .query_row(
                                "SELECT kind FROM failures WHERE source = ?1 AND external_id = ?2",
                                params![source, id],
                                |row| row.get(0),
                            )
                            .optional()
                            .map_err(|e| self.err(e))?;
                        match kind.as_deref() {
                            Some("dead_letter") => targets.push((source.clone(), id.clone())),
                            Some(_) => outcome.rejected.push(id.clone()),
                            None => continue,
                        }
                        found = true;
                    }
                    if !found {
                        outcome.not_found.push(id.clone());
                    }
                }
            }
        }
        for (source, external_id) in targets {
            let replayed = replay_one(&tx, &source, &external_id, now).map_err(|e| self.err(e))?;
            if replayed {
                outcome.replayed += 1;
            } else {
                outcome.superseded += 1;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }

    /// Records that `target` refused our key.
    pub fn set_halt(&self, target: &str, code: &str, message: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO halts (target, code, message, since) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (target) DO UPDATE SET code = excluded.code,
                     message = excluded.message",
                params![target, code, message, now_ms()],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Clears a halt once `target` answered an authenticated request.
    pub fn clear_halt(&self, target: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM halts WHERE target = ?1", [target])
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Every unresolved halt.
    pub fn halts(&self) -> Result<Vec<Halt>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT target, code, message, since FROM halts ORDER BY target")
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

    /// Starts a run record; returns its id.
    pub fn begin_run(&self, mode: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (mode, started_at) VALUES (?1, ?2)",
            params![mode, now_ms()],
        )
        .map_err(|e| self.err(e))?;
        Ok(conn.last_insert_rowid())
    }

    /// The mode (`daemon`, `once`) of the newest run not yet finished, if any. Only meaningful
    /// while a process holds the writer lock (a crashed run is never finished).
    pub fn open_run_mode(&self) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
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
            .execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3 WHERE id = ?1",
                params![run_id, now_ms(), outcome],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Starts a poll record; returns its id.
    pub fn begin_poll(&self, run_id: Option<i64>, source: &str) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO polls (run_id, source, started_at) VALUES (?1, ?2, ?3)",
            params![run_id, source, now_ms()],
        )
        .map_err(|e| self.err(e))?;
        Ok(conn.last_insert_rowid())
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
            .execute(
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
                    error,
                    now_ms(),
                    stats.warnings,
                    stats.skipped,
                    stats.vanished
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The most recent poll of a source.
    pub fn last_poll(&self, source: &str) -> Result<Option<PollRecord>, StoreError> {
        self.conn()
            .query_row(
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
            .query_row(
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

    /// After complete pass number `pass` of a full-scan source: the ids the previous pass saw
    /// and this one did not (newly vanished), and how many known records no complete pass has
    /// seen since (all vanished, cumulative).
    pub fn vanished(&self, source: &str, pass: i64) -> Result<(Vec<String>, u64), StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT external_id FROM customers
                  WHERE source = ?1 AND seen_pass = ?2 ORDER BY external_id",
            )
            .map_err(|e| self.err(e))?;
        let new: Vec<String> = stmt
            .query_map(params![source, pass - 1], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        let total = self.vanished_count_in(&conn, source, pass)?;
        Ok((new, total))
    }

    /// Drops rejections of records a complete pass no longer listed: a record deleted at the
    /// source has nothing left to fix. (Dead letters stay: their body can still be replayed.)
    pub fn clear_vanished_rejections(&self, source: &str, pass: i64) -> Result<u64, StoreError> {
        self.conn()
            .execute(
                "DELETE FROM failures WHERE source = ?1 AND kind = 'rejected' AND external_id IN
                   (SELECT external_id FROM customers WHERE source = ?1 AND seen_pass < ?2)",
                params![source, pass],
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Known records of a full-scan source that its last complete pass did not list.
    pub fn vanished_total(&self, source: &str) -> Result<u64, StoreError> {
        let conn = self.conn();
        let passes = super::outbox::passes_of(&conn, source).map_err(|e| self.err(e))?;
        if passes == 0 {
            return Ok(0);
        }
        self.vanished_count_in(&conn, source, passes)
    }

    fn vanished_count_in(
        &self,
        conn: &rusqlite::Connection,
        source: &str,
        pass: i64,
    ) -> Result<u64, StoreError> {
        conn.query_row(
            "SELECT COUNT(*) FROM customers WHERE source = ?1 AND seen_pass < ?2",
            params![source, pass],
            |row| row.get(0),
        )
        .map_err(|e| self.err(e))
    }

    /// Records of a source seen by a complete pass (the size of the next full scan), if one
    /// has completed.
    pub fn known_records(&self, source: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn();
        if super::outbox::passes_of(&conn, source).map_err(|e| self.err(e))? == 0 {
            return Ok(None);
        }
        conn.query_row(
            "SELECT COUNT(*) FROM customers WHERE source = ?1",
            [source],
            |row| row.get(0),
        )
        .map(Some)
        .map_err(|e| self.err(e))
    }

    /// What the state file knows about a customer.
    pub fn lane(&self, source: &str, external_id: &str) -> Result<Option<LaneState>, StoreError> {
        self.conn()
            .query_row(
                "SELECT latest_hash, synced_hash, synced_body FROM customers
                  WHERE source = ?1 AND external_id = ?2",
                params![source, external_id],
                |row| {
                    Ok(LaneState {
                        latest_hash: row.get(0)?,
                        synced_hash: row.get(1)?,
                        synced_body: row.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

/// Queue and failure figures of one source, for `/metrics` and `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueSummary {
    pub source: String,
    /// Jobs waiting for a final answer.
    pub depth: u64,
    /// Unix ms of the oldest queued job.
    pub oldest_enqueued_at: Option<i64>,
    pub rejected: u64,
    pub dead_letters: u64,
}

impl Store {
    /// Queue depth, oldest pending job and failure counts, per source that has any.
    pub fn queue_summary(&self) -> Result<Vec<QueueSummary>, StoreError> {
        let conn = self.conn();
        let mut summaries: std::collections::BTreeMap<String, QueueSummary> =
            std::collections::BTreeMap::new();
        let mut stmt = conn
            .prepare_cached("SELECT source, COUNT(*), MIN(enqueued_at) FROM outbox GROUP BY source")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u64>(1)?,
                    row.get::<_, Option<i64>>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        for (source, depth, oldest) in rows {
            let entry = summaries.entry(source.clone()).or_default();
            entry.source = source;
            entry.depth = depth;
            entry.oldest_enqueued_at = oldest;
        }
        let mut stmt = conn
            .prepare_cached(
                "SELECT source, COALESCE(SUM(kind = 'rejected'), 0),
                        COALESCE(SUM(kind = 'dead_letter'), 0)
                   FROM failures GROUP BY source",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u64>(1)?,
                    row.get::<_, u64>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        for (source, rejected, dead_letters) in rows {
            let entry = summaries.entry(source.clone()).or_default();
            entry.source = source;
            entry.rejected = rejected;
            entry.dead_letters = dead_letters;
        }
        Ok(summaries.into_values().collect())
    }
}

fn replay_one(
    tx: &Transaction<'_>,
    source: &str,
    external_id: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    let (body, revkeen_source): (Vec<u8>, String) = tx.query_row(
        "SELECT body, revkeen_source FROM failures WHERE source = ?1 AND external_id = ?2",
        params![source, external_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    tx.execute(
        "DELETE FROM failures WHERE source = ?1 AND external_id = ?2",
        params![source, external_id],
    )?;
    let queued: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE source = ?1 AND external_id = ?2)",
        params![source, external_id],
        |row| row.get(0),
    )?;
    if queued {
        // A newer version is already on its way; the dead body would only overwrite it.
        return Ok(false);
    }
    let (version, synced_hash): (i64, Option<String>) = tx
        .query_row(
            "SELECT version, synced_hash FROM customers WHERE source = ?1 AND external_id = ?2",
            params![source, external_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, None));
    let version = version + 1;
    let hash = body_hash(&body);
    let key = keys::idempotency_key(
        &revkeen_source,
        external_id,
        synced_hash.as_deref(),
        &hash,
        version,
    );
    tx.execute(
        "INSERT INTO outbox (source, external_id, revkeen_source, body, body_hash, idempotency_key,
                             enqueued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![source, external_id, revkeen_source, body, hash, key, now],
    )?;
    tx.execute(
        "INSERT INTO customers (source, external_id, version, latest_hash) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (source, external_id) DO UPDATE SET version = excluded.version,
             latest_hash = excluded.latest_hash",
        params![source, external_id, version, hash],
    )?;
    Ok(true)
}
