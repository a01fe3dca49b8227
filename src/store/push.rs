//! Push-feed events (ids only): committed before the daemon answers 202, and consumed in the
//! transaction that enqueues what the source returned for them, so a crash after the 202 loses
//! nothing.

use rusqlite::params;

use super::Cached;
use super::outbox::{self, PageItem};
use super::{PageOutcome, Store, StoreError, cursors, now_ms};

/// What [`Store::record_push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRecorded {
    /// Committed; `added` ids were not pending before.
    Accepted { added: usize },
    /// Refused, nothing written: `pending` events of the source already wait.
    Full { pending: u64 },
}

fn pending_count(conn: &rusqlite::Connection, source: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COUNT(*) FROM push_events WHERE source = ?1")?
        .query_row([source], |row| row.get(0))
}

impl Store {
    /// Records push events (ids only) for later fetching. An id already pending is not
    /// duplicated, but its event is marked newer, so a fetch already under way for it does not
    /// consume it. Nothing is recorded when the source would then have more than `cap` events
    /// pending: the answer is [`PushRecorded::Full`] with the count already waiting.
    pub fn record_push(
        &self,
        source: &str,
        external_ids: &[String],
        cap: usize,
    ) -> Result<PushRecorded, StoreError> {
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
        let pending = pending_count(&tx, source).map_err(|e| self.err(e))?;
        if pending > cap as u64 {
            // Dropping the transaction rolls it back: the file is as it was.
            return Ok(PushRecorded::Full {
                pending: pending - added as u64,
            });
        }
        self.commit(tx)?;
        Ok(PushRecorded::Accepted { added })
    }

    /// Push events waiting to be fetched, per source.
    pub fn push_pending(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT source, COUNT(*) FROM push_events GROUP BY source")
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))
    }

    /// The oldest pending push events of a source: `(event id, external id, seq)`.
    pub fn pending_push(
        &self,
        source: &str,
        limit: usize,
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        let conn = self.conn();
        // The limit is in the SQL: a bound `LIMIT ?` is re-prepared each time it is bound.
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT id, external_id, seq FROM push_events WHERE source = ?1
                  ORDER BY received_at, id LIMIT {limit}"
            ))
            .map_err(|e| self.err(e))?;
        stmt.query_map(params![source], |row| {
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
        let passes = cursors::passes_of(&tx, source).map_err(|e| self.err(e))?;
        let outcome =
            outbox::apply_items(&tx, source, revkeen_source, items, false, passes + 1, now)
                .map_err(|e| self.err(e))?;
        for (id, seq) in events {
            tx.exec_cached(
                "DELETE FROM push_events WHERE id = ?1 AND seq = ?2",
                params![id, seq],
            )
            .map_err(|e| self.err(e))?;
        }
        self.commit(tx)?;
        Ok(outcome)
    }
}
