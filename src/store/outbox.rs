//! The transactional outbox: committing a polled page, claiming work for the worker, and
//! recording RevKeen's answers.

use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

use super::records::{DeadLetter, Delivered, DeliveryCounts};
use super::{Store, StoreError, now_ms};
use crate::customer::{Rejection, body_hash};
use crate::keys;

/// One record of a polled page, already normalized.
#[derive(Debug, Clone)]
pub struct PageItem {
    pub external_id: String,
    pub outcome: PageItemOutcome,
}

/// What normalization made of a record.
#[derive(Debug, Clone)]
pub enum PageItemOutcome {
    /// A body to send. `update_only` bodies (a deleted patient) are sent only to a customer
    /// RevKeen already has.
    Customer { body: Vec<u8>, update_only: bool },
    /// The record cannot become a customer.
    Rejected(Rejection),
    /// Nothing to do (a deleted record without an email): counted as skipped.
    Ignored,
}

/// What a committed page changed.
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
}

/// Which work the worker may claim.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    /// Source names whose jobs may be claimed.
    pub sources: Vec<String>,
    /// Most customers per batch; 1 sends singles only.
    pub batch_size: usize,
    /// Sources whose jobs queued before `held_since` wait: left by an earlier process, they
    /// are held until this process's first poll of the source has seen the records again (a
    /// patient deleted meanwhile must not be created by its old queued create).
    pub held: Vec<String>,
    /// Unix ms; see `held`.
    pub held_since: i64,
}

impl ClaimFilter {
    /// The SQL condition (on alias `o`) that keeps held jobs out, and its parameters.
    fn release_condition(&self) -> (String, Vec<rusqlite::types::Value>) {
        if self.held.is_empty() {
            return ("1".to_string(), Vec::new());
        }
        let condition = format!(
            "(o.enqueued_at >= ? OR +o.source NOT IN ({}))",
            placeholders(self.held.len())
        );
        let params = std::iter::once(rusqlite::types::Value::from(self.held_since))
            .chain(
                self.held
                    .iter()
                    .map(|s| rusqlite::types::Value::from(s.clone())),
            )
            .collect();
        (condition, params)
    }
}

/// One customer's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub source: String,
    pub external_id: String,
    pub revkeen_source: String,
    pub body: Vec<u8>,
    pub body_hash: String,
    pub idempotency_key: String,
    pub attempts: u32,
}

/// A recorded batch and its members, sent as recorded until it gets a final answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: i64,
    pub revkeen_source: String,
    pub body: Vec<u8>,
    pub idempotency_key: String,
    pub attempts: u32,
    pub members: Vec<Job>,
}

/// A unit of sending: one request to RevKeen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    Single(Job),
    Batch(Batch),
}

impl Unit {
    /// Attempts already made for this unit.
    pub fn attempts(&self) -> u32 {
        match self {
            Unit::Single(job) => job.attempts,
            Unit::Batch(batch) => batch.attempts,
        }
    }

    /// The jobs this unit carries.
    pub fn jobs(&self) -> &[Job] {
        match self {
            Unit::Single(job) => std::slice::from_ref(job),
            Unit::Batch(batch) => &batch.members,
        }
    }
}

const JOB_COLUMNS: &str = "o.id, o.source, o.external_id, o.revkeen_source, o.body, o.body_hash, o.idempotency_key, o.attempts";

/// Deletes a batch and puts its remaining members back in the queue as singles.
fn dissolve_batch(tx: &rusqlite::Transaction<'_>, batch_id: i64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE outbox SET batch_id = NULL, inflight = 0, single_only = 1 WHERE batch_id = ?1",
        [batch_id],
    )?;
    tx.execute("DELETE FROM batches WHERE id = ?1", [batch_id])?;
    Ok(())
}

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: row.get(0)?,
        source: row.get(1)?,
        external_id: row.get(2)?,
        revkeen_source: row.get(3)?,
        body: row.get(4)?,
        body_hash: row.get(5)?,
        idempotency_key: row.get(6)?,
        attempts: row.get(7)?,
    })
}

/// `?, ?, ?` for an IN list of `n` values (never empty: an empty filter matches nothing).
fn placeholders(n: usize) -> String {
    if n == 0 {
        return "NULL".to_string();
    }
    vec!["?"; n].join(", ")
}

// Queries that pick due work filter on `+o.source`: the unary plus keeps SQLite from using the
// lane index for the source filter, which made it read and sort every queued row of the source
// on every claim (O(backlog)); on `outbox_due` it walks due rows in order and stops at LIMIT.

/// The condition that a row is the head of its lane (the only one that may be sent).
const LANE_HEAD: &str = "NOT EXISTS (SELECT 1 FROM outbox p \
     WHERE p.source = o.source AND p.external_id = o.external_id AND p.id < o.id)";

impl Store {
    /// The saved cursor of a source and its number of complete passes.
    pub fn cursor(&self, source: &str) -> Result<Option<(String, i64)>, StoreError> {
        self.conn()
            .query_row(
                "SELECT cursor, passes FROM cursors WHERE source = ?1",
                [source],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Commits one page: enqueues what changed, records rejections and moves the cursor, all
    /// in one transaction (invariant 1). `cursor` `None` leaves the cursor alone (push events);
    /// `pass_complete` counts a finished pass over the whole listing.
    pub fn commit_page(
        &self,
        source: &str,
        revkeen_source: &str,
        items: &[PageItem],
        cursor: Option<&str>,
        pass_complete: bool,
        resync: bool,
    ) -> Result<PageOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let passes = passes_of(&tx, source).map_err(|e| self.err(e))?;
        let outcome = apply_items(&tx, source, revkeen_source, items, resync, passes + 1, now)
            .map_err(|e| self.err(e))?;
        if let Some(cursor) = cursor {
            tx.execute(
                "INSERT INTO cursors (source, cursor, passes, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor,
                     passes = excluded.passes, updated_at = excluded.updated_at",
                params![source, cursor, passes + i64::from(pass_complete), now],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }

    /// Records push events (ids only) for later fetching. An id already pending is not
    /// duplicated, but its event is marked newer, so a fetch already under way for it does not
    /// consume it. Returns how many ids were new.
    pub fn record_push(&self, source: &str, external_ids: &[String]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let mut added = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO push_events (source, external_id, received_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (source, external_id) DO UPDATE SET seq = seq + 1,
                         received_at = excluded.received_at
                     RETURNING seq = 0",
                )
                .map_err(|e| self.err(e))?;
            for id in external_ids {
                let new: bool = insert
                    .query_row(params![source, id, now], |row| row.get(0))
                    .map_err(|e| self.err(e))?;
                added += usize::from(new);
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    /// The oldest pending push events of a source: `(event id, external id, seq)`.
    pub fn pending_push(
        &self,
        source: &str,
        limit: usize,
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, external_id, seq FROM push_events WHERE source = ?1
                  ORDER BY received_at, id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(params![source, limit as i64], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Enqueues what the source returned for push events and consumes the events, in one
    /// transaction: a crash leaves either both or neither. An event pushed again since it was
    /// read (its `seq` moved on) stays, so the newer change is fetched too.
    pub fn commit_push(
        &self,
        source: &str,
        revkeen_source: &str,
        items: &[PageItem],
        events: &[(i64, i64)],
    ) -> Result<PageOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let passes = passes_of(&tx, source).map_err(|e| self.err(e))?;
        let outcome = apply_items(&tx, source, revkeen_source, items, false, passes + 1, now)
            .map_err(|e| self.err(e))?;
        for (id, seq) in events {
            tx.execute(
                "DELETE FROM push_events WHERE id = ?1 AND seq = ?2",
                params![id, seq],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }

    /// Clears in-flight marks: at open nothing can be in flight, so whatever was is re-sent.
    pub(super) fn reset_inflight(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute_batch(
            "UPDATE outbox SET inflight = 0 WHERE inflight <> 0;
             UPDATE batches SET inflight = 0 WHERE inflight <> 0;",
        )
        .map_err(|e| self.err(e))
    }

    /// Claims the next unit of work that is due at `now`: a recorded batch first (it must be
    /// re-sent as recorded), else the oldest lane heads, grouped into a batch when allowed.
    pub fn claim(&self, filter: &ClaimFilter, now: i64) -> Result<Option<Unit>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let unit = claim_in(&tx, filter, now).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(unit)
    }

    /// When the next claimable work is due: `Some(t <= now)` means now, `None` means there is
    /// nothing to claim (everything is in flight or the outbox is empty).
    pub fn next_due(&self, filter: &ClaimFilter) -> Result<Option<i64>, StoreError> {
        let conn = self.conn();
        let n = filter.sources.len();
        let (released, held_params) = filter.release_condition();
        let sql = format!(
            // ORDER BY … LIMIT 1 walks the outbox_due index and stops at the first lane head;
            // MIN() with these conditions would scan the whole backlog.
            "SELECT MIN(t) FROM (
                 SELECT * FROM (SELECT o.next_attempt_at AS t FROM outbox o
                  WHERE o.batch_id IS NULL AND o.inflight = 0 AND +o.source IN ({list}) AND {LANE_HEAD}
                    AND {released}
                  ORDER BY o.next_attempt_at, o.id LIMIT 1)
                 UNION ALL
                 SELECT MIN(b.next_attempt_at) FROM batches b
                  WHERE b.inflight = 0 AND EXISTS (SELECT 1 FROM outbox m
                        WHERE m.batch_id = b.id AND m.source IN ({list})))",
            list = placeholders(n)
        );
        let args: Vec<rusqlite::types::Value> = filter
            .sources
            .iter()
            .map(|s| rusqlite::types::Value::from(s.clone()))
            .chain(held_params)
            .chain(
                filter
                    .sources
                    .iter()
                    .map(|s| rusqlite::types::Value::from(s.clone())),
            )
            .collect();
        conn.prepare_cached(&sql)
            .and_then(|mut stmt| stmt.query_row(params_from_iter(args), |row| row.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Jobs still waiting for a final answer among `sources`.
    pub fn outstanding(&self, sources: &[String]) -> Result<u64, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT COUNT(*) FROM outbox WHERE source IN ({})",
            placeholders(sources.len())
        );
        conn.query_row(&sql, params_from_iter(sources), |row| row.get(0))
            .map_err(|e| self.err(e))
    }

    /// Records final answers for a unit's jobs and removes them from the outbox (invariant 2).
    /// `counts` adds to the source's delivery totals in the same transaction.
    pub fn finish(
        &self,
        unit: &Unit,
        results: &[(i64, Finished)],
        counts: DeliveryCounts,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let result_of = |job: &Job| results.iter().find(|(id, _)| *id == job.id).map(|(_, r)| r);
        let all_delivered = unit
            .jobs()
            .iter()
            .all(|job| matches!(result_of(job), Some(Finished::Delivered(_))));
        match unit {
            // The common case, a whole batch accepted: three statements instead of three per
            // member.
            Unit::Batch(batch) if all_delivered => {
                super::records::mark_batch_synced(&tx, batch.id, now).map_err(|e| self.err(e))?;
                tx.prepare_cached("DELETE FROM outbox WHERE batch_id = ?1")
                    .and_then(|mut stmt| stmt.execute([batch.id]))
                    .map_err(|e| self.err(e))?;
            }
            _ => {
                for job in unit.jobs() {
                    let Some(result) = result_of(job) else {
                        continue;
                    };
                    match result {
                        Finished::Delivered(delivered) => {
                            super::records::mark_synced(&tx, job, *delivered, now)
                        }
                        Finished::DeadLetter(dead) => {
                            super::records::dead_letter(&tx, job, unit.attempts() + 1, dead, now)
                        }
                        Finished::RetrySingle => {
                            // Stays queued (the batch row goes below).
                            tx.prepare_cached(
                                "UPDATE outbox SET batch_id = NULL, inflight = 0, single_only = 1
                                  WHERE id = ?1",
                            )
                            .and_then(|mut stmt| stmt.execute([job.id]))
                            .map_err(|e| self.err(e))?;
                            continue;
                        }
                    }
                    .map_err(|e| self.err(e))?;
                    tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")
                        .and_then(|mut stmt| stmt.execute([job.id]))
                        .map_err(|e| self.err(e))?;
                }
            }
        }
        if let Some(job) = unit.jobs().first() {
            super::records::add_delivery(&tx, &job.source, counts, now).map_err(|e| self.err(e))?;
        }
        if let Unit::Batch(batch) = unit {
            // Members without a result (none today) go back to the queue as singles.
            dissolve_batch(&tx, batch.id).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Schedules another attempt of a unit at `at` (unix ms). `count` is false for retries that
    /// say nothing about the record (a 429, an idempotency key still in progress).
    pub fn retry_later(
        &self,
        unit: &Unit,
        at: i64,
        error: &str,
        count: bool,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let add = i64::from(count);
        match unit {
            Unit::Single(job) => conn.execute(
                "UPDATE outbox SET attempts = attempts + ?2, next_attempt_at = ?3, last_error = ?4,
                        inflight = 0 WHERE id = ?1",
                params![job.id, add, at, error],
            ),
            Unit::Batch(batch) => conn.execute(
                "UPDATE batches SET attempts = attempts + ?2, next_attempt_at = ?3, last_error = ?4,
                        inflight = 0 WHERE id = ?1",
                params![batch.id, add, at, error],
            ),
        }
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// Puts a unit back untouched (auth halt, shutdown): no attempt is counted.
    pub fn release(&self, unit: &Unit) -> Result<(), StoreError> {
        let conn = self.conn();
        match unit {
            Unit::Single(job) => {
                conn.execute("UPDATE outbox SET inflight = 0 WHERE id = ?1", [job.id])
            }
            Unit::Batch(batch) => {
                conn.execute("UPDATE batches SET inflight = 0 WHERE id = ?1", [batch.id])
            }
        }
        .map(drop)
        .map_err(|e| self.err(e))
    }

    /// Dissolves a batch RevKeen refused as a whole: its members go back as singles, so one bad
    /// record cannot hold back the others.
    pub fn split_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        dissolve_batch(&tx, batch.id).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Resets the attempt count of every queued job and batch among `sources`: a new `--once`
    /// run gets a full retry budget for work an earlier run left because an API was down.
    pub fn reset_attempts(&self, sources: &[String]) -> Result<(), StoreError> {
        let conn = self.conn();
        let list = placeholders(sources.len());
        conn.execute(
            &format!(
                "UPDATE outbox SET attempts = 0, next_attempt_at = 0 WHERE source IN ({list})"
            ),
            params_from_iter(sources),
        )
        .map_err(|e| self.err(e))?;
        conn.execute(
            &format!(
                "UPDATE batches SET attempts = 0, next_attempt_at = 0 WHERE id IN
                   (SELECT batch_id FROM outbox WHERE batch_id IS NOT NULL AND source IN ({list}))"
            ),
            params_from_iter(sources),
        )
        .map(drop)
        .map_err(|e| self.err(e))
    }
}

/// What to record for one job of an answered unit.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// RevKeen accepted it.
    Delivered(Delivered),
    /// RevKeen's final refusal.
    DeadLetter(DeadLetter),
    /// Refused inside a batch, whose answer carries only a free-text error: send it again on
    /// its own to get RevKeen's code, message and field errors.
    RetrySingle,
}

/// A source's number of complete passes (0 before the first).
pub(super) fn passes_of(conn: &rusqlite::Connection, source: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT passes FROM cursors WHERE source = ?1",
        [source],
        |row| row.get(0),
    )
    .optional()
    .map(|passes| passes.unwrap_or(0))
}

fn apply_items(
    tx: &Transaction<'_>,
    source: &str,
    revkeen_source: &str,
    items: &[PageItem],
    resync: bool,
    pass: i64,
    now: i64,
) -> rusqlite::Result<PageOutcome> {
    let mut outcome = PageOutcome::default();
    for item in items {
        let result = match &item.outcome {
            PageItemOutcome::Customer { body, update_only } => enqueue(
                tx,
                source,
                revkeen_source,
                &item.external_id,
                body,
                *update_only,
                resync,
                pass,
                now,
            )?,
            PageItemOutcome::Rejected(rejection) => {
                record_rejection(tx, source, &item.external_id, rejection, pass, now)?;
                Enqueued::Rejected
            }
            PageItemOutcome::Ignored => {
                // Nothing to send and nothing to fix (a deleted record): an earlier rejection
                // of it is moot.
                tx.prepare_cached(
                    "DELETE FROM failures WHERE source = ?1 AND external_id = ?2
                        AND kind = 'rejected'",
                )?
                .execute(params![source, &item.external_id])?;
                touch(tx, source, &item.external_id, pass)?;
                Enqueued::Skipped
            }
        };
        match result {
            Enqueued::New => outcome.enqueued += 1,
            Enqueued::Unchanged => outcome.unchanged += 1,
            Enqueued::Rejected => outcome.rejected += 1,
            Enqueued::Skipped => outcome.skipped += 1,
        }
    }
    Ok(outcome)
}

enum Enqueued {
    New,
    Unchanged,
    Rejected,
    Skipped,
}

#[allow(clippy::too_many_arguments)]
fn enqueue(
    tx: &Transaction<'_>,
    source: &str,
    revkeen_source: &str,
    external_id: &str,
    body: &[u8],
    update_only: bool,
    resync: bool,
    pass: i64,
    now: i64,
) -> rusqlite::Result<Enqueued> {
    let hash = body_hash(body);
    // Everything the decision needs in one lookup: the customer, its newest outbox row, and
    // whether an earlier rejection is now resolved.
    let (known, version, latest_hash, synced_hash, queued, rejected) = tx
        .prepare_cached(
            "SELECT c.source IS NOT NULL, COALESCE(c.version, 0), c.latest_hash, c.synced_hash,
                    o.id, o.batch_id, o.inflight,
                    EXISTS (SELECT 1 FROM failures f WHERE f.source = ?1
                              AND f.external_id = ?2 AND f.kind = 'rejected')
               FROM (SELECT 1)
               LEFT JOIN customers c ON c.source = ?1 AND c.external_id = ?2
               LEFT JOIN outbox o ON o.id =
                    (SELECT MAX(id) FROM outbox WHERE source = ?1 AND external_id = ?2)",
        )?
        .query_row(params![source, external_id], |row| {
            let queued = match row.get::<_, Option<i64>>(4)? {
                Some(id) => Some((id, row.get::<_, Option<i64>>(5)?, row.get::<_, bool>(6)?)),
                None => None,
            };
            Ok((
                row.get::<_, bool>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, Option<String>>(3)?,
                queued,
                row.get::<_, bool>(7)?,
            ))
        })?;
    if rejected {
        // Normalizing successfully means the earlier rejection of this record is resolved.
        tx.prepare_cached(
            "DELETE FROM failures WHERE source = ?1 AND external_id = ?2 AND kind = 'rejected'",
        )?
        .execute(params![source, external_id])?;
    }
    let touch = |tx: &Transaction<'_>| -> rusqlite::Result<()> {
        if known {
            tx.prepare_cached(
                "UPDATE customers SET seen_pass = ?3 WHERE source = ?1 AND external_id = ?2",
            )?
            .execute(params![source, external_id, pass])
            .map(drop)
        } else {
            touch(tx, source, external_id, pass)
        }
    };
    let unchanged = latest_hash.as_deref() == Some(hash.as_str());
    // `--resync` sends everything again, except what is already on its way.
    if unchanged && (!resync || queued.is_some()) {
        touch(tx)?;
        return Ok(Enqueued::Unchanged);
    }
    if update_only && synced_hash.is_none() && queued.is_none() {
        // RevKeen never had this customer: a deleted record must not create one.
        touch(tx)?;
        return Ok(Enqueued::Skipped);
    }
    let version = version + 1;
    let key = keys::idempotency_key(
        revkeen_source,
        external_id,
        synced_hash.as_deref(),
        &hash,
        version,
    );
    match queued {
        Some((id, None, false)) => {
            // Coalesce: the queued version was never acknowledged, so the newer one replaces
            // it. Its key changes with its body, so RevKeen never sees one key with two bodies.
            tx.prepare_cached(
                "UPDATE outbox SET body = ?2, body_hash = ?3, idempotency_key = ?4, attempts = 0,
                        next_attempt_at = 0, last_error = NULL, single_only = 0, update_only = ?5
                  WHERE id = ?1",
            )?
            .execute(params![id, body, hash, key, update_only])?;
        }
        _ => {
            tx.prepare_cached(
                "INSERT INTO outbox (source, external_id, revkeen_source, body, body_hash,
                                     idempotency_key, enqueued_at, update_only)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                source,
                external_id,
                revkeen_source,
                body,
                hash,
                key,
                now,
                update_only
            ])?;
        }
    }
    if known {
        tx.prepare_cached(
            "UPDATE customers SET version = ?3, latest_hash = ?4, seen_pass = ?5
              WHERE source = ?1 AND external_id = ?2",
        )?
        .execute(params![source, external_id, version, hash, pass])?;
    } else {
        tx.prepare_cached(
            "INSERT INTO customers (source, external_id, version, latest_hash, seen_pass)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![source, external_id, version, hash, pass])?;
    }
    Ok(Enqueued::New)
}

fn touch(tx: &Transaction<'_>, source: &str, external_id: &str, pass: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass",
    )?
    .execute(params![source, external_id, pass])
    .map(drop)
}

/// Records that a record cannot become a customer. The rejection is now the customer's latest
/// state: a version still waiting in the queue no longer matches the source and is dropped (one
/// already sent or in a recorded batch finishes as it is), and the latest hash is cleared so
/// that whatever the record becomes next is queued again, even a body sent before.
fn record_rejection(
    tx: &Transaction<'_>,
    source: &str,
    external_id: &str,
    rejection: &Rejection,
    pass: i64,
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass,
             latest_hash = NULL",
    )?
    .execute(params![source, external_id, pass])?;
    // Only the last row of a lane can be waiting in the queue (a newer version replaces a
    // waiting one instead of queueing behind it).
    tx.prepare_cached(
        "DELETE FROM outbox
          WHERE id = (SELECT MAX(id) FROM outbox WHERE source = ?1 AND external_id = ?2)
            AND batch_id IS NULL AND inflight = 0",
    )?
    .execute(params![source, external_id])?;
    tx.prepare_cached(
        "INSERT INTO failures (source, external_id, kind, code, reason, hint, first_seen, last_seen)
         VALUES (?1, ?2, 'rejected', ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (source, external_id) DO UPDATE SET kind = 'rejected', code = excluded.code,
             reason = excluded.reason, hint = excluded.hint, http_status = NULL,
             field_errors = NULL, body = NULL, body_hash = NULL, attempts = 0,
             first_seen = CASE WHEN failures.kind = 'rejected' THEN failures.first_seen
                               ELSE excluded.first_seen END,
             last_seen = excluded.last_seen",
    )?
    .execute(params![source, external_id, rejection.code, rejection.reason, rejection.hint, now])
    .map(drop)
}

fn claim_in(
    tx: &Transaction<'_>,
    filter: &ClaimFilter,
    now: i64,
) -> rusqlite::Result<Option<Unit>> {
    let list = placeholders(filter.sources.len());
    // 1. A recorded batch that is due: re-sent exactly as recorded (invariant 3).
    let batch: Option<(i64, String, Vec<u8>, String, u32)> = tx
        .prepare_cached(&format!(
                "SELECT b.id, b.revkeen_source, b.body, b.idempotency_key, b.attempts FROM batches b
                  WHERE b.inflight = 0 AND b.next_attempt_at <= ?
                    AND EXISTS (SELECT 1 FROM outbox m WHERE m.batch_id = b.id AND m.source IN ({list}))
                  ORDER BY b.next_attempt_at, b.id LIMIT 1"
        ))?
        .query_row(
            params_from_iter(
                std::iter::once(rusqlite::types::Value::from(now)).chain(
                    filter
                        .sources
                        .iter()
                        .map(|s| rusqlite::types::Value::from(s.clone())),
                ),
            ),
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            },
        )
        .optional()?;
    if let Some((id, revkeen_source, body, idempotency_key, attempts)) = batch {
        tx.execute("UPDATE batches SET inflight = 1 WHERE id = ?1", [id])?;
        let members = batch_members(tx, id)?;
        return Ok(Some(Unit::Batch(Batch {
            id,
            revkeen_source,
            body,
            idempotency_key,
            attempts,
            members,
        })));
    }

    // 2. The oldest due lane head.
    let (released, held_params) = filter.release_condition();
    let head_sql = format!(
        "SELECT {JOB_COLUMNS}, o.single_only, o.update_only FROM outbox o
          WHERE o.batch_id IS NULL AND o.inflight = 0 AND o.next_attempt_at <= ?
            AND +o.source IN ({list}) AND {LANE_HEAD} AND {released}
          ORDER BY o.next_attempt_at, o.id LIMIT 1"
    );
    let due_args = || {
        std::iter::once(rusqlite::types::Value::from(now))
            .chain(
                filter
                    .sources
                    .iter()
                    .map(|s| rusqlite::types::Value::from(s.clone())),
            )
            .chain(held_params.iter().cloned())
    };
    let (head, single_only) = loop {
        let head = tx
            .prepare_cached(&head_sql)?
            .query_row(params_from_iter(due_args()), |row| {
                Ok((
                    job_from_row(row)?,
                    row.get::<_, bool>(8)?,
                    row.get::<_, bool>(9)?,
                ))
            })
            .optional()?;
        let Some((head, single_only, update_only)) = head else {
            return Ok(None);
        };
        if update_only && !has_synced(tx, &head)? {
            // A deleted record whose create never reached RevKeen: sending it now would
            // create the customer, so the job is dropped instead.
            tx.execute("DELETE FROM outbox WHERE id = ?1", [head.id])?;
            continue;
        }
        break (head, single_only || update_only);
    };
    if single_only || filter.batch_size <= 1 {
        tx.execute("UPDATE outbox SET inflight = 1 WHERE id = ?1", [head.id])?;
        return Ok(Some(Unit::Single(head)));
    }

    // 3. Fill a batch with more due lane heads for the same RevKeen source.
    let fill_sql = format!(
        "SELECT {JOB_COLUMNS} FROM outbox o
          WHERE o.batch_id IS NULL AND o.inflight = 0 AND o.next_attempt_at <= ?
            AND +o.source IN ({list}) AND {LANE_HEAD} AND {released}
            AND o.revkeen_source = ? AND o.single_only = 0 AND o.update_only = 0 AND o.id <> ?
          ORDER BY o.next_attempt_at, o.id LIMIT ?"
    );
    let mut args: Vec<rusqlite::types::Value> = due_args().collect();
    args.push(head.revkeen_source.clone().into());
    args.push(head.id.into());
    args.push(i64::try_from(filter.batch_size - 1).unwrap_or(99).into());
    let mut stmt = tx.prepare_cached(&fill_sql)?;
    let mut members: Vec<Job> = std::iter::once(Ok(head))
        .chain(stmt.query_map(params_from_iter(args), job_from_row)?)
        .collect::<rusqlite::Result<_>>()?;
    drop(stmt);
    if members.len() == 1 {
        let job = members.remove(0);
        tx.execute("UPDATE outbox SET inflight = 1 WHERE id = ?1", [job.id])?;
        return Ok(Some(Unit::Single(job)));
    }
    members.sort_by(|a, b| a.external_id.cmp(&b.external_id));
    let body = keys::batch_body(
        &members[0].revkeen_source,
        members
            .iter()
            .map(|m| (m.external_id.as_str(), m.body.as_slice())),
    );
    let key = keys::batch_key(members.iter().map(|m| m.idempotency_key.as_str()));
    tx.execute(
        "INSERT INTO batches (revkeen_source, body, idempotency_key, created_at, inflight)
         VALUES (?1, ?2, ?3, ?4, 1)",
        params![members[0].revkeen_source, body, key, now],
    )?;
    let batch_id = tx.last_insert_rowid();
    let ids = serde_json::to_string(&members.iter().map(|m| m.id).collect::<Vec<i64>>())
        .expect("a list of integers serializes");
    tx.prepare_cached(
        "UPDATE outbox SET batch_id = ?1 WHERE id IN (SELECT value FROM json_each(?2))",
    )?
    .execute(params![batch_id, ids])?;
    Ok(Some(Unit::Batch(Batch {
        id: batch_id,
        revkeen_source: members[0].revkeen_source.clone(),
        body,
        idempotency_key: key,
        attempts: 0,
        members,
    })))
}

fn has_synced(tx: &Transaction<'_>, job: &Job) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT synced_hash IS NOT NULL FROM customers WHERE source = ?1 AND external_id = ?2",
        params![job.source, job.external_id],
        |row| row.get(0),
    )
    .optional()
    .map(|synced| synced.unwrap_or(false))
}

fn batch_members(tx: &Transaction<'_>, batch_id: i64) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM outbox o WHERE o.batch_id = ?1 ORDER BY o.external_id"
    ))?;
    stmt.query_map([batch_id], job_from_row)?.collect()
}
