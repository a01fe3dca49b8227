//! One row per customer ever seen: its version counter, the newest body decided on, the last
//! body RevKeen accepted, and the last complete pass that listed it.
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

    /// After complete pass number `pass`, a full scan: the ids seen by passes `since` (the
    /// previous full scan) up to this one and not by this one (newly vanished), and how many
    /// known records this pass did not see (all vanished, cumulative).
    pub fn vanished(
        &self,
        source: &str,
        pass: i64,
        since: i64,
    ) -> Result<(Vec<String>, u64), StoreError> {
        let conn = self.conn();
        let new: Vec<String> = conn
            .prepare_cached(
                "SELECT external_id FROM customers
                  WHERE source = ?1 AND seen_pass >= ?2 AND seen_pass < ?3
                  ORDER BY external_id",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![source, since, pass], |row| row.get(0))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        let total = vanished_count(&conn, source, pass).map_err(|e| self.err(e))?;
        Ok((new, total))
    }

    /// Known records of a full-scan source that its last complete pass did not list.
    pub fn vanished_total(&self, source: &str) -> Result<u64, StoreError> {
        let conn = self.conn();
        let passes = cursors::passes_of(&conn, source).map_err(|e| self.err(e))?;
        if passes == 0 {
            return Ok(0);
        }
        vanished_count(&conn, source, passes).map_err(|e| self.err(e))
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

fn vanished_count(conn: &Connection, source: &str, pass: i64) -> rusqlite::Result<u64> {
    conn.row_cached(
        "SELECT COUNT(*) FROM customers WHERE source = ?1 AND seen_pass < ?2",
        params![source, pass],
        |row| row.get(0),
    )
}

/// Everything change detection needs in one lookup: the customer, its newest outbox row, and
/// whether it has an open rejection. The flag says whether a customers row exists.
pub(super) fn read(
    conn: &Connection,
    source: &str,
    external_id: &str,
    with_body: bool,
) -> rusqlite::Result<(bool, Lane)> {
    let body = if with_body { "c.synced_body" } else { "NULL" };
    conn.prepare_cached(&format!(
        "SELECT c.source IS NOT NULL, COALESCE(c.version, 0), c.latest_hash, c.synced_hash,
                o.id, o.batch_id, o.inflight,
                EXISTS (SELECT 1 FROM failures f WHERE f.source = ?1
                          AND f.external_id = ?2 AND f.kind = 'rejected'),
                {body}
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
            },
        ))
    })
}

/// Records that a pass saw the customer (creating its row if it is new).
pub(super) fn touch(
    conn: &Connection,
    source: &str,
    external_id: &str,
    known: bool,
    pass: i64,
) -> rusqlite::Result<()> {
    let sql = if known {
        "UPDATE customers SET seen_pass = ?3 WHERE source = ?1 AND external_id = ?2"
    } else {
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass"
    };
    conn.prepare_cached(sql)?
        .execute(params![source, external_id, pass])
        .map(drop)
}

/// Records a new version of the customer: the job just created carries `version` and `hash`.
/// `pass` is the listing pass that saw it (`None`: not seen by a poll, e.g. `replay`).
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
             seen_pass = COALESCE(excluded.seen_pass, customers.seen_pass)",
    )?
    .execute(params![source, external_id, version, hash, pass])
    .map(drop)
}

/// A rejection is the customer's latest state: its latest hash is cleared, so that whatever
/// the record becomes next is queued again, even a body sent before.
pub(super) fn reject(
    conn: &Connection,
    source: &str,
    external_id: &str,
    pass: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO customers (source, external_id, seen_pass) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, external_id) DO UPDATE SET seen_pass = excluded.seen_pass,
             latest_hash = NULL",
    )?
    .execute(params![source, external_id, pass])
    .map(drop)
}

/// RevKeen accepted `job`'s body: it is the customer's synced body now. `revkeen_id` is
/// RevKeen's id for the customer when the answer named one; an answer without one keeps the
/// id known before.
pub(super) fn mark_synced(
    conn: &Connection,
    job: &Job,
    revkeen_id: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE customers SET synced_hash = ?3, synced_body = ?4, synced_at = ?5,
                revkeen_id = COALESCE(?6, revkeen_id)
          WHERE source = ?1 AND external_id = ?2",
    )?
    .execute(params![
        job.source,
        job.external_id,
        job.body_hash,
        job.body,
        now,
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
        "UPDATE customers SET synced_hash = o.body_hash, synced_body = o.body, synced_at = ?2
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
