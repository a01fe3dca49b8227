//! Where each source's listing stands: the adapter's cursor (opaque JSON to the store) and how
//! many complete passes over the listing it has made. A cursor is only ever written in the
//! transaction that commits the page it moves past (invariant 1, see
//! [`Store::commit_page`](super::Store::commit_page)).

use rusqlite::{Connection, OptionalExtension, params};

use super::Cached;
use super::{Store, StoreError};

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
