//! The transactional outbox: jobs waiting for a final answer from RevKeen, and the batches they
//! are recorded in. This is where a page becomes outbox rows ([`Store::commit_page`]), where
//! the worker claims its next unit ([`Store::claim`]) and where RevKeen's answers are recorded
//! ([`Store::finish`]).
//!
//! Invariants held here (ARCHITECTURE.md numbers them):
//! 1. A page's jobs and the cursor that moves past the page commit in one transaction.
//! 2. A job leaves `outbox` only in [`Store::finish`], on a final answer; in-flight marks are
//!    cleared when the state is opened, so whatever was in flight at a crash is sent again.
//! 3. A job's body and idempotency key are written once, when the job is created or coalesced,
//!    and sent as stored; a batch is recorded (members, key, its body's SHA-256) before it is
//!    sent. Its body is not stored twice: a re-send builds it again from the members' stored
//!    bodies and sends it only if it hashes as recorded (else the members go as singles).
//! 4. A lane (source, external id) has at most one job in flight: only the lowest outbox id of
//!    a lane may be claimed, and a newer version replaces a waiting one instead of queueing
//!    behind it.

use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

use super::Cached;
use super::customers::{self, Decision};
use super::failures::{self, DeadLetter};
use super::history::{self, DeliveryCounts, PageOutcome};
use super::{Store, StoreError, cursors, now_ms};
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

/// What a member adds to a batch body besides its body and id (`{"external_id":"…",` …).
const BATCH_ITEM_OVERHEAD: usize = 24;

// A job's body is in `bodies` (schema 11): a rowid lookup per row.
const JOB_COLUMNS: &str = "o.id, o.source, o.external_id, o.revkeen_source, \
     (SELECT b.body FROM bodies b WHERE b.id = o.body_id), o.body_hash, o.idempotency_key, \
     o.attempts";

/// Removes a job that is not delivered (dropped, dead-lettered, superseded) with its body,
/// which only the job pointed at.
fn delete_job(tx: &rusqlite::Transaction<'_>, outbox_id: i64) -> rusqlite::Result<()> {
    tx.exec_cached(
        "DELETE FROM bodies WHERE id = (SELECT body_id FROM outbox WHERE id = ?1)",
        [outbox_id],
    )?;
    tx.exec_cached("DELETE FROM outbox WHERE id = ?1", [outbox_id])
        .map(drop)
}

/// Deletes a batch and puts its remaining members back in the queue as singles.
fn dissolve_batch(tx: &rusqlite::Transaction<'_>, batch_id: i64) -> rusqlite::Result<()> {
    tx.exec_cached(
        "UPDATE outbox SET batch_id = NULL, inflight = 0, single_only = 1 WHERE batch_id = ?1",
        [batch_id],
    )?;
    tx.exec_cached("DELETE FROM batches WHERE id = ?1", [batch_id])?;
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
/// `?, ?, ?` for an IN list of `n` values (never empty: an empty filter matches nothing).
pub(super) fn placeholders(n: usize) -> String {
    if n == 0 {
        return "NULL".to_string();
    }
    vec!["?"; n].join(", ")
}

/// What a page commit does with the source's cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorSave<'a> {
    /// Leaves it where it is.
    Keep,
    /// Moves it past the page.
    Always(&'a str),
    /// Moves it past the page only when the page writes anything else (or completes the
    /// pass): an unchanged page then costs no write. The poll loop saves a cursor it held back
    /// with a later page, at least every few pages and when the poll stops, so a crash only
    /// re-reads a few unchanged pages (`sources/poll.rs`, `CURSOR_SAVE_EVERY`).
    WithChanges(&'a str),
}

// Queries that pick due work filter on `+o.source`: the unary plus keeps SQLite from using the
// lane index for the source filter, which made it read and sort every queued row of the source
// on every claim (O(backlog)); on `outbox_due` it walks due rows in order and stops at LIMIT.

/// The condition that a row is the head of its lane (the only one that may be sent).
const LANE_HEAD: &str = "NOT EXISTS (SELECT 1 FROM outbox p \
     WHERE p.source = o.source AND p.external_id = o.external_id AND p.id < o.id)";

impl Store {
    /// Commits one page: enqueues what changed, records rejections and moves the cursor, all
    /// in one transaction (invariant 1). `cursor` says what happens to the source's cursor;
    /// `pass_complete` counts a finished pass over the whole listing. A page that changes
    /// nothing under [`CursorSave::WithChanges`] commits nothing at all
    /// ([`PageOutcome::cursor_saved`] says which).
    pub fn commit_page(
        &self,
        source: &str,
        revkeen_source: &str,
        items: &[PageItem],
        cursor: CursorSave<'_>,
        pass_complete: bool,
        resync: bool,
    ) -> Result<PageOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        let passes = cursors::passes_of(&tx, source).map_err(|e| self.err(e))?;
        let before = tx.total_changes();
        let mut outcome = apply_items(&tx, source, revkeen_source, items, resync, passes + 1, now)
            .map_err(|e| self.err(e))?;
        let save = match cursor {
            CursorSave::Keep => None,
            CursorSave::Always(cursor) => Some(cursor),
            CursorSave::WithChanges(cursor) => {
                (pass_complete || tx.total_changes() != before).then_some(cursor)
            }
        };
        if let Some(cursor) = save {
            cursors::set(&tx, source, cursor, passes + i64::from(pass_complete), now)
                .map_err(|e| self.err(e))?;
            outcome.cursor_saved = true;
        }
        self.commit(tx)?;
        Ok(outcome)
    }

    /// Clears in-flight marks: at open (or when the worker starts over after a state file
    /// failure) nothing can be in flight, so whatever was is re-sent.
    pub(crate) fn reset_inflight(&self) -> Result<(), StoreError> {
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
        self.commit(tx)?;
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
        conn.row_cached(&sql, params_from_iter(sources), |row| row.get(0))
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
        let all_delivered = unit.jobs().iter().all(|job| {
            matches!(
                result_of(job),
                Some(Finished::Delivered | Finished::Applied { .. })
            )
        });
        match unit {
            // The common case, a whole batch accepted: four statements instead of four per
            // member. The members' bodies become their customers' synced bodies, so deleting
            // the outbox rows leaves them.
            Unit::Batch(batch) if all_delivered => {
                customers::mark_batch_synced(&tx, batch.id, now)
                    .and_then(|()| failures::clear_batch_dead_letters(&tx, batch.id))
                    .map_err(|e| self.err(e))?;
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
                        Finished::Delivered | Finished::Applied { .. } => {
                            let revkeen_id = match result {
                                Finished::Applied { revkeen_id } => Some(revkeen_id.as_str()),
                                _ => None,
                            };
                            customers::mark_synced(&tx, job, revkeen_id, now)
                                .and_then(|()| {
                                    failures::clear_dead_letter(&tx, &job.source, &job.external_id)
                                })
                                .and_then(|()| {
                                    tx.exec_cached("DELETE FROM outbox WHERE id = ?1", [job.id])
                                        .map(drop)
                                })
                        }
                        // The failure keeps its own copy of the body (for `replay`).
                        Finished::DeadLetter(dead) => {
                            failures::dead_letter(&tx, job, unit.attempts() + 1, dead, now)
                                .and_then(|()| delete_job(&tx, job.id))
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
                }
            }
        }
        if let Some(job) = unit.jobs().first() {
            history::add_delivery(&tx, &job.source, counts, now).map_err(|e| self.err(e))?;
        }
        if let Unit::Batch(batch) = unit {
            // Members without a result (none today) go back to the queue as singles.
            dissolve_batch(&tx, batch.id).map_err(|e| self.err(e))?;
        }
        self.commit(tx)
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
        let error = crate::secret::redact(error);
        match unit {
            Unit::Single(job) => conn.exec_cached(
                "UPDATE outbox SET attempts = attempts + ?2, next_attempt_at = ?3, last_error = ?4,
                        inflight = 0 WHERE id = ?1",
                params![job.id, add, at, error],
            ),
            Unit::Batch(batch) => conn.exec_cached(
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
                conn.exec_cached("UPDATE outbox SET inflight = 0 WHERE id = ?1", [job.id])
            }
            Unit::Batch(batch) => {
                conn.exec_cached("UPDATE batches SET inflight = 0 WHERE id = ?1", [batch.id])
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
        self.commit(tx)
    }

    /// Resets the attempt count of every queued job and batch among `sources`: a new `--once`
    /// run gets a full retry budget for work an earlier run left because an API was down.
    pub fn reset_attempts(&self, sources: &[String]) -> Result<(), StoreError> {
        let conn = self.conn();
        let list = placeholders(sources.len());
        conn.exec_cached(
            &format!(
                "UPDATE outbox SET attempts = 0, next_attempt_at = 0 WHERE source IN ({list})"
            ),
            params_from_iter(sources),
        )
        .map_err(|e| self.err(e))?;
        conn.exec_cached(
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
    Delivered,
    /// RevKeen accepted it and named the customer (a single upsert's `data.id`).
    Applied { revkeen_id: String },
    /// RevKeen's final refusal.
    DeadLetter(DeadLetter),
    /// Refused inside a batch, whose answer carries only a free-text error: send it again on
    /// its own to get RevKeen's code, message and field errors.
    RetrySingle,
}

/// Applies a page's items: each record is enqueued, rejected or skipped. `pass` is the listing
/// pass the page belongs to.
pub(super) fn apply_items(
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
        let id = item.external_id.as_str();
        match &item.outcome {
            PageItemOutcome::Customer { body, update_only } => {
                let new = NewBody {
                    body,
                    hash: body_hash(body),
                    update_only: *update_only,
                };
                match enqueue(tx, source, revkeen_source, id, &new, resync, pass, now)? {
                    Decision::Unchanged => outcome.unchanged += 1,
                    Decision::Skip => outcome.skipped += 1,
                    Decision::Send { .. } => outcome.enqueued += 1,
                }
            }
            PageItemOutcome::Rejected(rejection) => {
                reject(tx, source, id, rejection, pass, now)?;
                outcome.rejected += 1;
            }
            PageItemOutcome::Ignored => {
                // Nothing to send and nothing to fix (a deleted record): an earlier rejection
                // of it is moot.
                failures::clear_rejection(tx, source, id)?;
                customers::touch(tx, source, id, pass)?;
                outcome.skipped += 1;
            }
        }
    }
    Ok(outcome)
}

/// A polled body and what is derived from it once.
struct NewBody<'a> {
    body: &'a [u8],
    hash: String,
    update_only: bool,
}

/// Change detection and the outbox write for one polled body.
#[allow(clippy::too_many_arguments)]
fn enqueue(
    tx: &Transaction<'_>,
    source: &str,
    revkeen_source: &str,
    external_id: &str,
    new: &NewBody<'_>,
    resync: bool,
    pass: i64,
    now: i64,
) -> rusqlite::Result<Decision> {
    let (known, lane) = customers::read(tx, source, external_id, false)?;
    if lane.rejected {
        // Normalizing successfully means the earlier rejection of this record is resolved.
        failures::clear_rejection(tx, source, external_id)?;
    }
    let decision = customers::decide(&lane, &new.hash, new.update_only, resync);
    if !matches!(decision, Decision::Send { .. }) {
        if !known || lane.vanished {
            customers::touch(tx, source, external_id, pass)?;
        }
        return Ok(decision);
    }
    let job = JobRow {
        source,
        external_id,
        revkeen_source,
        body: new.body,
        hash: &new.hash,
        update_only: new.update_only,
    };
    match lane.queued {
        // Coalesce: the waiting version was never claimed, so the newer one replaces it. Its
        // key changes with its body, so RevKeen never sees one key with two bodies.
        Some(queued) if queued.replaceable() => {
            replace_job(tx, queued.id, &job, &lane, pass)?;
        }
        _ => insert_job(tx, &job, &lane, Some(pass), now)?,
    }
    Ok(decision)
}

/// A job as it is written to the outbox.
struct JobRow<'a> {
    source: &'a str,
    external_id: &'a str,
    revkeen_source: &'a str,
    body: &'a [u8],
    hash: &'a str,
    update_only: bool,
}

impl JobRow<'_> {
    /// The key of the customer's next version (invariant 3), in this state file.
    fn key(&self, tx: &Transaction<'_>, lane: &customers::Lane) -> rusqlite::Result<(i64, String)> {
        let version = lane.version + 1;
        let key = keys::idempotency_key(
            self.revkeen_source,
            self.external_id,
            lane.synced_hash.as_deref(),
            self.hash,
            version,
            &super::state_id(tx)?,
        );
        Ok((version, key))
    }
}

/// The one way a new version of a customer enters the outbox (a poll, a push, `replay`): a new
/// version number, its key, the job row, and the customer's latest hash, together.
fn insert_job(
    tx: &Transaction<'_>,
    job: &JobRow<'_>,
    lane: &customers::Lane,
    pass: Option<i64>,
    now: i64,
) -> rusqlite::Result<()> {
    let (version, key) = job.key(tx, lane)?;
    tx.exec_cached("INSERT INTO bodies (body) VALUES (?1)", [job.body])?;
    let body_id = tx.last_insert_rowid();
    // `body` is the pre-schema-11 column, kept empty.
    tx.prepare_cached(
        "INSERT INTO outbox (source, external_id, revkeen_source, body, body_id, body_hash,
                             idempotency_key, enqueued_at, update_only)
         VALUES (?1, ?2, ?3, x'', ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        job.source,
        job.external_id,
        job.revkeen_source,
        body_id,
        job.hash,
        key,
        now,
        job.update_only
    ])?;
    customers::record_version(tx, job.source, job.external_id, version, job.hash, pass)
}

/// Coalescing: a newer version takes the place of a waiting, never-claimed job.
fn replace_job(
    tx: &Transaction<'_>,
    outbox_id: i64,
    job: &JobRow<'_>,
    lane: &customers::Lane,
    pass: i64,
) -> rusqlite::Result<()> {
    let (version, key) = job.key(tx, lane)?;
    // The waiting job's body row is its own (never sent, so no customer's): rewritten in place.
    tx.exec_cached(
        "UPDATE bodies SET body = ?2 WHERE id = (SELECT body_id FROM outbox WHERE id = ?1)",
        params![outbox_id, job.body],
    )?;
    tx.prepare_cached(
        "UPDATE outbox SET body_hash = ?2, idempotency_key = ?3, attempts = 0,
                next_attempt_at = 0, last_error = NULL, single_only = 0, update_only = ?4
          WHERE id = ?1",
    )?
    .execute(params![outbox_id, job.hash, key, job.update_only])?;
    customers::record_version(
        tx,
        job.source,
        job.external_id,
        version,
        job.hash,
        Some(pass),
    )
}

/// Records that a record cannot become a customer. The rejection is now the customer's latest
/// state: a version still waiting in the queue no longer matches the source and is dropped (one
/// already sent or in a recorded batch finishes as it is), and the latest hash is cleared.
fn reject(
    tx: &Transaction<'_>,
    source: &str,
    external_id: &str,
    rejection: &Rejection,
    pass: i64,
    now: i64,
) -> rusqlite::Result<()> {
    customers::reject(tx, source, external_id, pass)?;
    // Only the last row of a lane can be waiting in the queue (a newer version replaces a
    // waiting one instead of queueing behind it).
    let waiting: Option<i64> = tx
        .prepare_cached(
            "SELECT id FROM outbox
              WHERE id = (SELECT MAX(id) FROM outbox WHERE source = ?1 AND external_id = ?2)
                AND batch_id IS NULL AND inflight = 0",
        )?
        .query_row(params![source, external_id], |row| row.get(0))
        .optional()?;
    if let Some(id) = waiting {
        delete_job(tx, id)?;
    }
    failures::record_rejection(tx, source, external_id, rejection, now)
}

impl Store {
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
        let targets = match ids {
            None => failures::dead_letters(&tx, sources).map_err(|e| self.err(e))?,
            Some(ids) => {
                let mut targets = Vec::new();
                for id in ids {
                    let mut found = false;
                    for source in sources {
                        match failures::kind_of(&tx, source, id)
                            .map_err(|e| self.err(e))?
                            .as_deref()
                        {
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
                targets
            }
        };
        for (source, external_id) in targets {
            let replayed = replay_one(&tx, &source, &external_id, now).map_err(|e| self.err(e))?;
            if replayed {
                outcome.replayed += 1;
            } else {
                outcome.superseded += 1;
            }
        }
        self.commit(tx)?;
        Ok(outcome)
    }

    /// Queue depth, oldest pending job and failure counts, per source that has any.
    pub fn queue_summary(&self) -> Result<Vec<QueueSummary>, StoreError> {
        let conn = self.conn();
        let mut summaries: std::collections::BTreeMap<String, QueueSummary> =
            std::collections::BTreeMap::new();
        let queued: Vec<(String, u64, Option<i64>)> = conn
            .prepare_cached("SELECT source, COUNT(*), MIN(enqueued_at) FROM outbox GROUP BY source")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        for (source, depth, oldest) in queued {
            let entry = summaries.entry(source.clone()).or_default();
            entry.source = source;
            entry.depth = depth;
            entry.oldest_enqueued_at = oldest;
        }
        for (source, rejected, dead_letters) in
            failures::counts_by_source(&conn).map_err(|e| self.err(e))?
        {
            let entry = summaries.entry(source.clone()).or_default();
            entry.source = source;
            entry.rejected = rejected;
            entry.dead_letters = dead_letters;
        }
        Ok(summaries.into_values().collect())
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

/// Puts one dead letter back; `false` when a newer version of the customer is already queued
/// (the dead body would only overwrite it, so it is dropped).
fn replay_one(
    tx: &Transaction<'_>,
    source: &str,
    external_id: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    let (body, revkeen_source) = failures::take(tx, source, external_id)?;
    let (_, lane) = customers::read(tx, source, external_id, false)?;
    if lane.queued.is_some() {
        return Ok(false);
    }
    let hash = body_hash(&body);
    let job = JobRow {
        source,
        external_id,
        revkeen_source: &revkeen_source,
        body: &body,
        hash: &hash,
        update_only: false,
    };
    insert_job(tx, &job, &lane, None, now)?;
    Ok(true)
}

/// A recorded batch first (it must be re-sent as recorded), else the oldest due lane head,
/// grouped with more lane heads into a new batch when allowed.
fn claim_in(
    tx: &Transaction<'_>,
    filter: &ClaimFilter,
    now: i64,
) -> rusqlite::Result<Option<Unit>> {
    if let Some(batch) = claim_recorded_batch(tx, filter, now)? {
        return Ok(Some(Unit::Batch(batch)));
    }
    let Some((head, single_only)) = claim_head(tx, filter, now)? else {
        return Ok(None);
    };
    if single_only || filter.batch_size <= 1 {
        tx.exec_cached("UPDATE outbox SET inflight = 1 WHERE id = ?1", [head.id])?;
        return Ok(Some(Unit::Single(head)));
    }
    fill_batch(tx, filter, now, head)
}

/// The values of a due-work query's leading `next_attempt_at <= ?` and source list.
fn due_args(filter: &ClaimFilter, now: i64) -> impl Iterator<Item = rusqlite::types::Value> + '_ {
    std::iter::once(rusqlite::types::Value::from(now)).chain(
        filter
            .sources
            .iter()
            .map(|s| rusqlite::types::Value::from(s.clone())),
    )
}

/// A recorded batch that is due: re-sent exactly as recorded (invariant 3). Its body is built
/// again from its members' stored bodies; one that no longer hashes as recorded (a different
/// sync-daemon version built the first) is dissolved, and its members go as singles, which
/// carry their own keys, instead of sending a different body under the recorded key.
fn claim_recorded_batch(
    tx: &Transaction<'_>,
    filter: &ClaimFilter,
    now: i64,
) -> rusqlite::Result<Option<Batch>> {
    let list = placeholders(filter.sources.len());
    loop {
        let batch: Option<RecordedBatch> = tx
            .prepare_cached(&format!(
                "SELECT b.id, b.revkeen_source, b.body, b.body_sha256, b.idempotency_key, b.attempts
                   FROM batches b
                  WHERE b.inflight = 0 AND b.next_attempt_at <= ?
                    AND EXISTS (SELECT 1 FROM outbox m WHERE m.batch_id = b.id AND m.source IN ({list}))
                  ORDER BY b.next_attempt_at, b.id LIMIT 1"
            ))?
            .query_row(params_from_iter(due_args(filter, now)), |row| {
                Ok(RecordedBatch {
                    id: row.get(0)?,
                    revkeen_source: row.get(1)?,
                    stored_body: row.get(2)?,
                    body_sha256: row.get(3)?,
                    idempotency_key: row.get(4)?,
                    attempts: row.get(5)?,
                })
            })
            .optional()?;
        let Some(recorded) = batch else {
            return Ok(None);
        };
        let members = batch_members(tx, recorded.id)?;
        let body = match recorded.body_sha256 {
            // Recorded before the body hash (schema 9 and earlier): the body itself was kept.
            None => recorded.stored_body,
            Some(recorded_hash) => {
                let body = batch_body_of(&recorded.revkeen_source, &members);
                if body_hash(&body) != recorded_hash {
                    tracing::warn!(
                        batch = recorded.id,
                        customers = members.len(),
                        "A recorded batch's body, built again from its members, differs from the \
                         one sent (another sync-daemon version built it); its customers are sent \
                         one by one instead."
                    );
                    dissolve_batch(tx, recorded.id)?;
                    continue;
                }
                body
            }
        };
        tx.exec_cached(
            "UPDATE batches SET inflight = 1 WHERE id = ?1",
            [recorded.id],
        )?;
        return Ok(Some(Batch {
            id: recorded.id,
            revkeen_source: recorded.revkeen_source,
            body,
            idempotency_key: recorded.idempotency_key,
            attempts: recorded.attempts,
            members,
        }));
    }
}

/// A `batches` row as read back for a re-send.
struct RecordedBatch {
    id: i64,
    revkeen_source: String,
    /// The body itself, kept only by batches recorded before `body_sha256` existed (empty after).
    stored_body: Vec<u8>,
    body_sha256: Option<String>,
    idempotency_key: String,
    attempts: u32,
}

/// A batch's body from its members, in the order they are recorded and re-read (by external
/// id, then outbox id).
fn batch_body_of(revkeen_source: &str, members: &[Job]) -> Vec<u8> {
    keys::batch_body(
        revkeen_source,
        members
            .iter()
            .map(|m| (m.external_id.as_str(), m.body.as_slice())),
    )
}

/// The oldest due lane head (not yet marked in flight) and whether it must go alone.
fn claim_head(
    tx: &Transaction<'_>,
    filter: &ClaimFilter,
    now: i64,
) -> rusqlite::Result<Option<(Job, bool)>> {
    let list = placeholders(filter.sources.len());
    let (released, held_params) = filter.release_condition();
    let head_sql = format!(
        "SELECT {JOB_COLUMNS}, o.single_only, o.update_only FROM outbox o
          WHERE o.batch_id IS NULL AND o.inflight = 0 AND o.next_attempt_at <= ?
            AND +o.source IN ({list}) AND {LANE_HEAD} AND {released}
          ORDER BY o.next_attempt_at, o.id LIMIT 1"
    );
    loop {
        let args = due_args(filter, now).chain(held_params.iter().cloned());
        let head = tx
            .prepare_cached(&head_sql)?
            .query_row(params_from_iter(args), |row| {
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
        if update_only && !customers::has_synced(tx, &head.source, &head.external_id)? {
            // A deleted record whose create never reached RevKeen: sending it now would
            // create the customer, so the job is dropped instead.
            delete_job(tx, head.id)?;
            continue;
        }
        return Ok(Some((head, single_only || update_only)));
    }
}

/// Fills a batch with more due lane heads for the head's RevKeen source and records it.
fn fill_batch(
    tx: &Transaction<'_>,
    filter: &ClaimFilter,
    now: i64,
    head: Job,
) -> rusqlite::Result<Option<Unit>> {
    let list = placeholders(filter.sources.len());
    let (released, held_params) = filter.release_condition();
    // The limit is part of the SQL, not a bound `?`: SQLite re-prepares a statement whose
    // `LIMIT ?` is bound again, on every call. One batch size per run keeps it one statement.
    let fill_sql = format!(
        "SELECT {JOB_COLUMNS} FROM outbox o
          WHERE o.batch_id IS NULL AND o.inflight = 0 AND o.next_attempt_at <= ?
            AND +o.source IN ({list}) AND {LANE_HEAD} AND {released}
            AND o.revkeen_source = ? AND o.single_only = 0 AND o.update_only = 0 AND o.id <> ?
          ORDER BY o.next_attempt_at, o.id LIMIT {limit}",
        limit = i64::try_from(filter.batch_size.saturating_sub(1)).unwrap_or(i64::MAX)
    );
    let mut args: Vec<rusqlite::types::Value> = due_args(filter, now).chain(held_params).collect();
    args.push(head.revkeen_source.clone().into());
    args.push(head.id.into());
    let mut stmt = tx.prepare_cached(&fill_sql)?;
    let mut size = 0usize;
    let mut members: Vec<Job> = Vec::new();
    for job in
        std::iter::once(Ok(head)).chain(stmt.query_map(params_from_iter(args), job_from_row)?)
    {
        let job = job?;
        // The batch stops before its body would pass the cap; the rest waits for the next.
        size += job.body.len() + job.external_id.len() + BATCH_ITEM_OVERHEAD;
        if !members.is_empty() && size > keys::MAX_BATCH_BODY {
            break;
        }
        members.push(job);
    }
    drop(stmt);
    if members.len() == 1 {
        let job = members.remove(0);
        tx.exec_cached("UPDATE outbox SET inflight = 1 WHERE id = ?1", [job.id])?;
        return Ok(Some(Unit::Single(job)));
    }
    members.sort_by(|a, b| a.external_id.cmp(&b.external_id).then(a.id.cmp(&b.id)));
    let body = batch_body_of(&members[0].revkeen_source, &members);
    let key = keys::batch_key(members.iter().map(|m| m.idempotency_key.as_str()));
    // The members' bodies are in their outbox rows already: the batch keeps its body's hash,
    // not a second copy (a tenth of a first sync's state-file writes).
    tx.exec_cached(
        "INSERT INTO batches (revkeen_source, body, body_sha256, idempotency_key, created_at,
                              inflight)
         VALUES (?1, x'', ?2, ?3, ?4, 1)",
        params![members[0].revkeen_source, body_hash(&body), key, now],
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

fn batch_members(tx: &Transaction<'_>, batch_id: i64) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM outbox o WHERE o.batch_id = ?1 ORDER BY o.external_id, o.id"
    ))?;
    stmt.query_map([batch_id], job_from_row)?.collect()
}
