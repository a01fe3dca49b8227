//! One row per customer ever seen: its version counter, the newest body decided on, the last
//! body RevKeen accepted, the pass that last wrote it and, once a full scan no longer lists
//! it, the pass that found it gone.
//!
//! **An unchanged record costs no write.** A pass does not stamp the rows it lists: the ids it
//! lists are kept in memory ([`SeenIds`], 8 bytes an id) and compared with the table once, when
//! a full scan completes ([`Store::record_vanished`]). Only what changes is written: a new
//! record, a changed body, a new rejection, a record that vanished or came back.
//!
//! **Nothing unchanged is sent (invariant 5).** [`decide`] is the one place that judges a
//! polled body against what the state file knows ([`Lane`]): the real run ([`enqueue`]
//! in the outbox) and `--dry-run` ([`Store::preview`]) both ask it, so they cannot disagree.
//! `latest_hash` is the newest body decided on (queued, in flight, synced or dead-lettered), so
//! an unchanged record costs one lookup and no write to RevKeen. `version` grows with every
//! job created for the customer and is part of the job's idempotency key.
//!
//! [`enqueue`]: super::outbox

use rusqlite::{Connection, OptionalExtension, params};

use super::Cached;
use super::outbox::Job;
use super::{Store, StoreError, cursors};

/// What the state file knows about one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lane {
    /// Jobs created for the customer so far.
    pub version: i64,
    /// The newest body decided on; `None` after a rejection.
    pub latest_hash: Option<String>,
    /// The last body RevKeen accepted.
    pub synced_hash: Option<String>,
    /// Read only by [`Store::lane`] (the change-detection path never loads the body).
    pub synced_body: Option<Vec<u8>>,
    /// The lane's newest outbox row, if one is waiting or in flight.
    pub queued: Option<Queued>,
    /// The record has an open rejection.
    pub rejected: bool,
    /// A full scan no longer listed the record.
    pub vanished: bool,
}

/// The newest outbox row of a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    /// Recorded in a batch (it will be sent as recorded).
    pub batch_id: Option<i64>,
    pub inflight: bool,
}

impl Queued {
    /// Waiting and never claimed: a newer version may replace it (coalescing).
    pub fn replaceable(&self) -> bool {
        self.batch_id.is_none() && !self.inflight
    }
}

/// What change detection makes of a polled body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The body is the newest one decided on: nothing to do.
    Unchanged,
    /// An update-only body (a deleted record) for a customer RevKeen never had: sending it
    /// would create the customer.
    Skip,
    /// Send it. `create`: RevKeen has never accepted a body for this customer.
    Send { create: bool },
}

/// Judges a polled body (its hash) against what the state file knows about the customer.
/// `--resync` sends everything again, except what is already on its way.
pub fn decide(lane: &Lane, hash: &str, update_only: bool, resync: bool) -> Decision {
    let unchanged = lane.latest_hash.as_deref() == Some(hash);
    if unchanged && (!resync || lane.queued.is_some()) {
        return Decision::Unchanged;
    }
    if update_only && lane.synced_hash.is_none() && lane.queued.is_none() {
        return Decision::Skip;
    }
    Decision::Send {
        create: lane.synced_hash.is_none(),
    }
}

/// What `--dry-run` learns about one record: the decision and, for an update, the body RevKeen
/// holds now (to name the fields that change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub decision: Decision,
    pub synced_body: Option<Vec<u8>>,
    /// RevKeen's id for the customer, when a single upsert's answer named it.
    pub revkeen_id: Option<String>,
}

impl Store {
    /// What the state file knows about a customer; `None` for one never seen.
    pub fn lane(&self, source: &str, external_id: &str) -> Result<Option<Lane>, StoreError> {
        read(&self.conn(), source, external_id, true)
            .map(|(known, lane)| known.then_some(lane))
            .map_err(|e| self.err(e))
    }

    /// What a run would do with this body, decided exactly as the outbox's `enqueue`
    /// decides it, without writing anything (`--dry-run`).
    pub fn preview(
        &self,
        source: &str,
        external_id: &str,
        body_hash: &str,
        update_only: bool,
        resync: bool,
    ) -> Result<Preview, StoreError> {
        let conn = self.conn();
        let (known, lane) = read(&conn, source, external_id, true).map_err(|e| self.err(e))?;
        let revkeen_id = if known {
            conn.prepare_cached(
                "SELECT revkeen_id FROM customers WHERE source = ?1 AND external_id = ?2",
            )
            .and_then(|mut stmt| stmt.query_row(params![source, external_id], |row| row.get(0)))
            .map_err(|e| self.err(e))?
        } else {
            None
        };
        Ok(Preview {
            decision: decide(&lane, body_hash, update_only, resync),
            synced_body: lane.synced_body,
            revkeen_id,
        })
    }

    /// After complete pass number `pass`, a full scan that listed the ids in `seen`: marks the
    /// records that vanished (known, not listed, and not written by this pass, as a push can
    /// write a record the scan had already passed), drops their moot rejections, and returns
    /// the newly vanished ids and how many records have vanished in all. A record that came
    /// back was unmarked when it was listed. Reads every row of the source once; writes only
    /// the newly vanished ones.
    pub fn record_vanished(
        &self,
        source: &str,
        pass: i64,
        seen: &mut SeenIds,
    ) -> Result<(Vec<String>, u64), StoreError> {
        seen.finish();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let gone = mark_vanished(&tx, source, pass, seen).map_err(|e| self.err(e))?;
        let total = vanished_count(&tx, source).map_err(|e| self.err(e))?;
        self.commit(tx)?;
        Ok((gone, total))
    }

    /// Known records of a full-scan source that a complete full scan no longer lists.
    pub fn vanished_total(&self, source: &str) -> Result<u64, StoreError> {
        vanished_count(&self.conn(), source).map_err(|e| self.err(e))
    }

    /// Records of a source seen by a complete pass (the size of the next full scan), if one
    /// has completed.
    pub fn known_records(&self, source: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn();
        if cursors::passes_of(&conn, source).map_err(|e| self.err(e))? == 0 {
            return Ok(None);
        }
        conn.row_cached(
            "SELECT COUNT(*) FROM customers WHERE source = ?1",
            [source],
            |row| row.get(0),
        )
        .map(Some)
        .map_err(|e| self.err(e))
    }
}

fn vanished_count(conn: &Connection, source: &str) -> rusqlite::Result<u64> {
    conn.row_cached(
        "SELECT COUNT(*) FROM customers WHERE source = ?1 AND vanished_pass IS NOT NULL",
        [source],
        |row| row.get(0),
    )
}

/// [`Store::record_vanished`]'s writes: the newly vanished rows, sorted by id.
fn mark_vanished(
    conn: &Connection,
    source: &str,
    pass: i64,
    seen: &SeenIds,
) -> rusqlite::Result<Vec<String>> {
    let mut gone: Vec<(i64, String)> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, external_id FROM customers
              WHERE source = ?1 AND vanished_pass IS NULL AND seen_pass < ?2",
        )?;
        let mut rows = stmt.query(params![source, pass])?;
        while let Some(row) = rows.next()? {
            let id: String = row.get(1)?;
            if !seen.contains(&id) {
                gone.push((row.get(0)?, id));
            }
        }
    }
    let mut mark =
        conn.prepare_cached("UPDATE customers SET vanished_pass = ?2 WHERE rowid = ?1")?;
    for (rowid, _) in &gone {
        mark.execute(params![rowid, pass])?;
    }
    // A record deleted at the source has nothing left to fix; dead letters stay (their body
    // can still be replayed).
    conn.prepare_cached(
        "DELETE FROM failures WHERE source = ?1 AND kind = 'rejected' AND external_id IN
           (SELECT external_id FROM customers WHERE source = ?1 AND vanished_pass IS NOT NULL)",
    )?
    .execute([source])?;
    let mut ids: Vec<String> = gone.into_iter().map(|(_, id)| id).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// The ids one pass of a listing saw, as 64-bit hashes: 8 bytes an id, so
/// a million-record scan holds 8 MiB while it runs, instead of a write per record. Two ids
/// hashing alike (odds about 3 in 10^8 for a million ids) would hide one vanished record, never
/// lose or send anything.
#[derive(Debug, Default)]
pub struct SeenIds {
    hashes: Vec<u64>,
}

impl SeenIds {
    /// Room for `n` ids (the size of the last complete scan).
    pub fn with_capacity(n: usize) -> SeenIds {
        SeenIds {
            hashes: Vec::with_capacity(n),
        }
    }

    pub fn insert(&mut self, external_id: &str) {
        self.hashes.push(hash_id(external_id));
    }

    /// Ids inserted (counting repeats until the pass completes).
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    fn finish(&mut self) {
        self.hashes.sort_unstable();
        self.hashes.dedup();
    }

    /// The set as stored in `pass_ids`: sorted little-endian hashes.
    pub(super) fn sorted_bytes(&mut self) -> Vec<u8> {
        self.finish();
        self.hashes.iter().flat_map(|h| h.to_le_bytes()).collect()
    }

    /// The set from [`SeenIds::sorted_bytes`]; `None` for bytes that are not one.
    pub(super) fn from_bytes(bytes: &[u8]) -> Option<SeenIds> {
        if !bytes.len().is_multiple_of(8) {
            return None;
        }
        let hashes = bytes
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or_default()))
            .collect();
        Some(SeenIds { hashes })
    }

    /// Only after [`SeenIds::finish`].
    fn contains(&self, external_id: &str) -> bool {
        self.hashes.binary_search(&hash_id(external_id)).is_ok()
    }
}

fn hash_id(external_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // `new()` has fixed keys: the set lives in one process, so the hash only has to agree
    // with itself.
    let mut hasher = std::hash::DefaultHasher::new();
    external_id.hash(&mut hasher);
    hasher.finish()
}

/// Everything change detection needs in one lookup: the customer, its newest outbox row, and
/// whether it has an open rejection. The flag says whether a customers row exists.
pub(super) fn read(
    conn: &Connection,
    source: &str,
    external_id: &str,
    with_body: bool,
) -> rusqlite::Result<(bool, Lane)> {
    let body = if with_body {
        // One synced before schema 11 is still in its row.
        "COALESCE((SELECT b.body FROM bodies b WHERE b.id = c.synced_body_id), c.synced_body)"
    } else {
        "NULL"
    };
    conn.prepare_cached(&format!(
        "SELECT c.source IS NOT NULL, COALESCE(c.version, 0), c.latest_hash, c.synced_hash,
                o.id, o.batch_id, o.inflight,
                EXISTS (SELECT 1 FROM failures f WHERE f.source = ?1
                          AND f.external_id = ?2 AND f.kind = 'rejected'),
                {body}, c.vanished_pass IS NOT NULL
           FROM (SELECT 1)
           LEFT JOIN customers c ON c.source = ?1 AND c.external_id = ?2
           LEFT JOIN outbox o ON o.id =
                (SELECT MAX(id) FROM outbox WHERE source = ?1 AND external_id = ?2)"
    ))?
    .query_row(params![source, external_id], |row| {
        let queued = match row.get::<_, Option<i64>>(4)? {
            Some(id) => Some(Queued {
                id,
                batch_id: row.get(5)?,
                inflight: row.get(6)?,
            }),
            None => None,
        };
        Ok((
            row.get(0)?,
            Lane {
                version: row.get(1)?,
                latest_hash: row.get(2)?,
                synced_hash: row.get(3)?,
                synced_body: row.get(8)?,
                queued,
                rejected: row.get(7)?,
                vanished: row.get::<_, Option<bool>>(9)?.unwrap_or(false),
            },
        ))
    })
}

/// Records that pass `pass` listed a customer it did not change: a new one gets its row, one a
/// full scan had missed is back. A known, listed customer is not written (the statement
/// changes nothing), which is what keeps an unchanged rescan's writes off the disk.
pub(super) fn touch(
    conn: &Connection,
    source: &str,
    external_id: &str,
    pass: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass,
             vanished_pass = NULL
          WHERE customers.vanished_pass IS NOT NULL",
    )?
    .execute(params![source, external_id, pass])
    .map(drop)
}

/// Records a new version of the customer: the job just created carries `version` and `hash`.
/// `pass` is the listing pass that saw it (`None`: not seen by a poll, e.g. `replay`, which
/// leaves a vanished record vanished).
pub(super) fn record_version(
    conn: &Connection,
    source: &str,
    external_id: &str,
    version: i64,
    hash: &str,
    pass: Option<i64>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO customers (source, external_id, version, latest_hash, seen_pass)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (source, external_id) DO UPDATE SET version = excluded.version,
             latest_hash = excluded.latest_hash,
             seen_pass = COALESCE(excluded.seen_pass, customers.seen_pass),
             vanished_pass = CASE WHEN excluded.seen_pass IS NULL
                                  THEN customers.vanished_pass END",
    )?
    .execute(params![source, external_id, version, hash, pass])
    .map(drop)
}

/// A rejection is the customer's latest state: its latest hash is cleared, so that whatever
/// the record becomes next is queued again, even a body sent before. A record rejected again,
/// as it was, is not written.
pub(super) fn reject(
    conn: &Connection,
    source: &str,
    external_id: &str,
    pass: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass,
             latest_hash = NULL, vanished_pass = NULL
          WHERE customers.latest_hash IS NOT NULL OR customers.vanished_pass IS NOT NULL",
    )?
    .execute(params![source, external_id, pass])
    .map(drop)
}

/// RevKeen accepted `job`'s body: it is the customer's synced body now, the job's body row
/// becomes the customer's and the one synced before is freed (or cleared from the row, where
/// schema 10 kept it). `revkeen_id` is RevKeen's id for
/// the customer when the answer named one; an answer without one keeps the id known before.
/// The job's outbox row is the caller's to delete.
pub(super) fn mark_synced(
    conn: &Connection,
    job: &Job,
    revkeen_id: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM bodies WHERE id =
             (SELECT synced_body_id FROM customers WHERE source = ?1 AND external_id = ?2)",
    )?
    .execute(params![job.source, job.external_id])?;
    conn.prepare_cached(
        "UPDATE customers SET synced_hash = ?3, synced_at = ?4, synced_body = NULL,
                synced_body_id = (SELECT body_id FROM outbox WHERE id = ?5),
                revkeen_id = COALESCE(?6, revkeen_id)
          WHERE source = ?1 AND external_id = ?2",
    )?
    .execute(params![
        job.source,
        job.external_id,
        job.body_hash,
        now,
        job.id,
        revkeen_id
    ])
    .map(drop)
}

/// [`mark_synced`] for every member of a recorded batch at once.
pub(super) fn mark_batch_synced(
    conn: &Connection,
    batch_id: i64,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM bodies WHERE id IN
             (SELECT c.synced_body_id FROM outbox o
                JOIN customers c ON c.source = o.source AND c.external_id = o.external_id
               WHERE o.batch_id = ?1 AND c.synced_body_id IS NOT NULL)",
    )?
    .execute([batch_id])?;
    conn.prepare_cached(
        "UPDATE customers SET synced_hash = o.body_hash, synced_body_id = o.body_id,
                synced_body = NULL, synced_at = ?2
           FROM outbox o
          WHERE o.batch_id = ?1
            AND customers.source = o.source AND customers.external_id = o.external_id",
    )?
    .execute(params![batch_id, now])
    .map(drop)
}

/// Whether RevKeen ever accepted a body for the customer.
pub(super) fn has_synced(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT synced_hash IS NOT NULL FROM customers WHERE source = ?1 AND external_id = ?2",
    )?
    .query_row(params![source, external_id], |row| row.get(0))
    .optional()
    .map(|synced| synced.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(latest: Option<&str>, synced: Option<&str>, queued: bool) -> Lane {
        Lane {
            latest_hash: latest.map(String::from),
            synced_hash: synced.map(String::from),
            queued: queued.then_some(Queued {
                id: 1,
                batch_id: None,
                inflight: false,
            }),
            ..Lane::default()
        }
    }

    #[test]
    fn decisions_follow_the_change_detection_rules() {
        use Decision::*;
        // A new customer is created; the same body again is unchanged.
        assert_eq!(
            decide(&Lane::default(), "a", false, false),
            Send { create: true }
        );
        assert_eq!(
            decide(&lane(Some("a"), Some("a"), false), "a", false, false),
            Unchanged
        );
        // A changed body of a synced customer is an update.
        assert_eq!(
            decide(&lane(Some("a"), Some("a"), false), "b", false, false),
            Send { create: false }
        );
        // --resync sends an unchanged body again, unless it is already on its way.
        assert_eq!(
            decide(&lane(Some("a"), Some("a"), false), "a", false, true),
            Send { create: false }
        );
        assert_eq!(
            decide(&lane(Some("a"), None, true), "a", false, true),
            Unchanged
        );
        // A deleted record RevKeen never had is skipped; one it has is updated; one whose
        // create is still queued replaces the queued create.
        assert_eq!(decide(&Lane::default(), "d", true, false), Skip);
        assert_eq!(
            decide(&lane(Some("a"), Some("a"), false), "d", true, false),
            Send { create: false }
        );
        assert_eq!(
            decide(&lane(Some("a"), None, true), "d", true, false),
            Send { create: true }
        );
    }
}
