//! Where each source's listing stands: the adapter's cursor (opaque JSON to the store) and how
//! many complete passes over the listing it has made. A cursor is only ever written in the
//! transaction that commits the page it moves past (invariant 1, see
//! [`Store::commit_page`](super::Store::commit_page)), or, for pages that changed nothing, when
//! the poll stops ([`Store::stop_listing`]), with the ids an unfinished pass had listed.

use rusqlite::{Connection, OptionalExtension, params};

use super::Cached;
use super::customers::SeenIds;
use super::{Store, StoreError, now_ms};

impl Store {
    /// The saved cursor of a source and its number of complete passes.
    pub fn cursor(&self, source: &str) -> Result<Option<(String, i64)>, StoreError> {
        self.conn()
            .row_cached(
                "SELECT cursor, passes FROM cursors WHERE source = ?1",
                [source],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// A poll stops mid-pass: saves `cursor` (the end of committed pages that changed nothing,
    /// held back) and the ids the unfinished pass has listed, for the next poll to carry on
    /// with ([`Store::resume_pass`]). Either may be absent.
    pub fn stop_listing(
        &self,
        source: &str,
        cursor: Option<&str>,
        seen: Option<&mut SeenIds>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let passes = passes_of(&tx, source).map_err(|e| self.err(e))?;
        if let Some(cursor) = cursor {
            set(&tx, source, cursor, passes, now_ms()).map_err(|e| self.err(e))?;
        }
        let saved: Option<String> = tx
            .row_cached(
                "SELECT cursor FROM cursors WHERE source = ?1",
                [source],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let (Some(seen), Some(saved)) = (seen, saved) {
            tx.exec_cached(
                "INSERT INTO pass_ids (source, pass, cursor, ids) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source) DO UPDATE SET pass = excluded.pass,
                     cursor = excluded.cursor, ids = excluded.ids",
                params![source, passes + 1, saved, seen.sorted_bytes()],
            )
            .map_err(|e| self.err(e))?;
        }
        self.commit(tx)
    }

    /// At the start of a poll from the saved `cursor`: the ids that the pass in progress had
    /// listed when the previous poll stopped, if they continue from exactly there. Whatever
    /// was saved is removed.
    pub fn resume_pass(&self, source: &str, cursor: &str) -> Result<Option<SeenIds>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let saved: Option<(i64, String, Vec<u8>)> = tx
            .row_cached(
                "SELECT pass, cursor, ids FROM pass_ids WHERE source = ?1",
                [source],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((pass, at, ids)) = saved else {
            return Ok(None);
        };
        let passes = passes_of(&tx, source).map_err(|e| self.err(e))?;
        tx.exec_cached("DELETE FROM pass_ids WHERE source = ?1", [source])
            .map_err(|e| self.err(e))?;
        self.commit(tx)?;
        Ok((pass == passes + 1 && at == cursor)
            .then(|| SeenIds::from_bytes(&ids))
            .flatten())
    }
}

/// A source's number of complete passes (0 before the first).
pub(super) fn passes_of(conn: &Connection, source: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT passes FROM cursors WHERE source = ?1")?
        .query_row([source], |row| row.get(0))
        .optional()
        .map(|passes| passes.unwrap_or(0))
}

/// Moves a source's cursor and sets its count of complete passes.
pub(super) fn set(
    conn: &Connection,
    source: &str,
    cursor: &str,
    passes: i64,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO cursors (source, cursor, passes, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor,
             passes = excluded.passes, updated_at = excluded.updated_at",
    )?
    .execute(params![source, cursor, passes, now])
    .map(drop)
}
