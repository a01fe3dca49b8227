//! The schema, as versioned migrations embedded in the binary. Never edit a released migration:
//! append a new one. `rusqlite_migration` tracks the version in SQLite's `user_version`.

use rusqlite_migration::{M, Migrations};

const V1: &str = r#"
-- Where each source's listing stands (adapter-specific JSON) and how many complete passes it
-- has made. Written in the same transaction as the jobs of the page that moved it.
CREATE TABLE cursors (
    source      TEXT PRIMARY KEY,
    cursor      TEXT NOT NULL,
    passes      INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);

-- One row per customer ever seen. `version` grows with every job created for the customer and
-- is part of the job's idempotency key, so no two versions ever share a key. `latest_hash` is
-- the newest body decided on (queued, in flight, synced or dead-lettered): a polled record
-- hashing the same is unchanged. `synced_*` is the last body RevKeen accepted. A rowid table,
-- not WITHOUT ROWID: rows carry a body, and large rows in a clustered key cost more per write.
CREATE TABLE customers (
    source       TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    version      INTEGER NOT NULL DEFAULT 0,
    latest_hash  TEXT,
    synced_hash  TEXT,
    synced_body  BLOB,
    synced_at    INTEGER,
    seen_pass    INTEGER,
    PRIMARY KEY (source, external_id)
);

-- Jobs waiting for a final answer from RevKeen. Within a lane (source, external_id) the
-- lowest id goes first and is the only one that may be in flight; a later row exists only
-- while the head is in flight or in a recorded batch.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY,
    source           TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    revkeen_source   TEXT NOT NULL,
    body             BLOB NOT NULL,
    body_hash        TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    enqueued_at      INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    single_only      INTEGER NOT NULL DEFAULT 0,
    update_only      INTEGER NOT NULL DEFAULT 0,
    batch_id         INTEGER REFERENCES batches(id),
    inflight         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_lane ON outbox (source, external_id, id);
CREATE INDEX outbox_batch ON outbox (batch_id) WHERE batch_id IS NOT NULL;

-- A batch is recorded (members, body, key) before it is sent and re-sent exactly as recorded
-- until it gets a final answer.
CREATE TABLE batches (
    id               INTEGER PRIMARY KEY,
    revkeen_source   TEXT NOT NULL,
    body             BLOB NOT NULL,
    idempotency_key  TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    inflight         INTEGER NOT NULL DEFAULT 0
);

-- Records that could not be sent: rejected before sending (no email) or dead-lettered after
-- RevKeen's final refusal or exhausted retries. One row per customer: its current problem.
CREATE TABLE failures (
    source           TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('rejected', 'dead_letter')),
    code             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    hint             TEXT,
    http_status      INTEGER,
    field_errors     TEXT,
    revkeen_source   TEXT,
    body             BLOB,
    body_hash        TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_seen       INTEGER NOT NULL,
    last_seen        INTEGER NOT NULL,
    PRIMARY KEY (source, external_id)
) WITHOUT ROWID;

-- One row per process run (`--once`, daemon).
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    mode         TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    outcome      TEXT
);

-- One row per poll of a source, with what it found.
CREATE TABLE polls (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER REFERENCES runs(id),
    source       TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    outcome      TEXT,
    error        TEXT,
    pages        INTEGER NOT NULL DEFAULT 0,
    fetched      INTEGER NOT NULL DEFAULT 0,
    enqueued     INTEGER NOT NULL DEFAULT 0,
    unchanged    INTEGER NOT NULL DEFAULT 0,
    rejected     INTEGER NOT NULL DEFAULT 0,
    skipped      INTEGER NOT NULL DEFAULT 0,
    warnings     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX polls_source ON polls (source, id);

-- Running totals of RevKeen's answers per source.
CREATE TABLE delivery (
    source         TEXT PRIMARY KEY,
    created        INTEGER NOT NULL DEFAULT 0,
    updated        INTEGER NOT NULL DEFAULT 0,
    stale          INTEGER NOT NULL DEFAULT 0,
    dead_lettered  INTEGER NOT NULL DEFAULT 0,
    last_success   INTEGER
);

-- An API that refused our key. Sending stops until a later run gets an authenticated answer.
CREATE TABLE halts (
    target   TEXT PRIMARY KEY,
    code     TEXT NOT NULL,
    message  TEXT NOT NULL,
    since    INTEGER NOT NULL
);
"#;

const V2: &str = r#"
-- Push-feed events (ids only), committed before the daemon answers 202 and consumed in the
-- transaction that enqueues what the source returned for them.
CREATE TABLE push_events (
    id           INTEGER PRIMARY KEY,
    source       TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    UNIQUE (source, external_id)
);
"#;

const V3: &str = r#"
-- Records a complete full scan no longer listed (Wodify clients deleted at the source).
ALTER TABLE polls ADD COLUMN vanished INTEGER NOT NULL DEFAULT 0;
-- Claiming walks due jobs in order and stops at the first lane head: without this index
-- every claim would scan the whole backlog.
CREATE INDEX outbox_due ON outbox (next_attempt_at, id);
"#;

const V4: &str = r#"
-- Bumped when a push arrives for an id whose event is still pending: the processor consumes an
-- event only if no newer push came in while it was fetching the record.
ALTER TABLE push_events ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
"#;

const V5: &str = r#"
-- A host the daemon pauses for a long `Retry-After` (capped by max_retry_after_secs): until when
-- and why, for `status` ("paused until …").
CREATE TABLE pauses (
    target  TEXT PRIMARY KEY,
    until   INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    since   INTEGER NOT NULL
);
"#;

const V6: &str = r#"
-- The state file's identity: a random UUID (v4) made when the file is created, or first
-- migrated to this schema, and joined into every idempotency key. A file moved aside and
-- started anew (the cure for a damaged one) derives keys RevKeen has never seen, so none of
-- its writes can be answered with a replay from before the reset.
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('state_id', lower(
    hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2)
    || '-' || substr('89ab', 1 + abs(random() % 4), 1) || substr(hex(randomblob(2)), 2)
    || '-' || hex(randomblob(6))));
"#;

const V7: &str = r#"
-- The last re-read of each key (SIGHUP, or a changed key file noticed while its API refused the
-- old key): when, why, and whether the value changed, for `status`.
CREATE TABLE key_rereads (
    key      TEXT PRIMARY KEY,
    at       INTEGER NOT NULL,
    trigger  TEXT NOT NULL,
    changed  INTEGER NOT NULL
);
"#;

const V8: &str = r#"
-- RevKeen's customer id from a single upsert's answer (`data.id`), beside the synced hash;
-- batch answers carry none, so it stays NULL for a customer only ever sent in batches.
ALTER TABLE customers ADD COLUMN revkeen_id TEXT;
-- RevKeen's own hosted sync found active for a provider (the other writer), at start or by
-- a run: the warning `status` repeats. Removed when a later read finds it off.
CREATE TABLE hosted_syncs (
    provider    TEXT PRIMARY KEY,
    message     TEXT NOT NULL,
    checked_at  INTEGER NOT NULL
);
-- Every acknowledged batch asks whether any dead letter exists (to skip clearing them when
-- none does): without this index that question scanned every open failure, about 4 % of a
-- gym's clients, on every batch, which made a 1M-client first sync superlinear.
CREATE INDEX failures_kind ON failures (kind, source);
-- Recorded batches are claimed in due order; during a RevKeen outage the backlog turns into
-- recorded batches waiting for their retry, so their claim walks this index, not the table.
CREATE INDEX batches_due ON batches (next_attempt_at, id);
-- Requests sent to each source per calendar month (UTC, 'YYYY-MM'), against its
-- monthly_request_budget. `used` is written ahead of the requests it covers (a reservation, see
-- sources/budget.rs), so a crash can only over-count. `scan_requests` is what the month's last
-- complete poll cost; `quota_spent_at` when the source last said its own quota is spent
-- (Wodify's 429 `Limit Exceeded`); `note` why polls are spaced out or stopped, for `status`.
CREATE TABLE request_budget (
    source          TEXT NOT NULL,
    month           TEXT NOT NULL,
    used            INTEGER NOT NULL DEFAULT 0,
    scan_requests   INTEGER,
    scan_started_at INTEGER,
    quota_spent_at  INTEGER,
    note            TEXT,
    PRIMARY KEY (source, month)
) WITHOUT ROWID;
"#;

const V9: &str = r#"
-- An unchanged rescan writes nothing per record (issue 14): a pass no longer stamps every row
-- it lists. `seen_pass` is now the pass that last wrote the row (a change, a new record, a
-- rejection, a return), and `vanished_pass` the complete full scan that first missed the
-- record (NULL while it is listed). The ids a pass lists are kept in memory and compared with
-- the table when the pass completes (store/customers.rs `Store::record_vanished`).
ALTER TABLE customers ADD COLUMN vanished_pass INTEGER;
-- Under the old rule a record its source's last complete pass did not list had vanished.
UPDATE customers SET vanished_pass = seen_pass
 WHERE seen_pass < (SELECT passes FROM cursors c WHERE c.source = customers.source);
-- `status`, the vanished gauge and clearing moot rejections read only vanished rows.
CREATE INDEX customers_vanished ON customers (source) WHERE vanished_pass IS NOT NULL;
-- The ids a pass in progress had listed when its poll stopped before the pass completed (the
-- wrap-around after a crash, an error, a shutdown), as sorted 8-byte hashes, with the pass and
-- the saved cursor they continue from: the next poll carries on with them, so the pass can
-- still tell what vanished. Written only by a poll that stops mid-pass; read and removed by
-- the next poll.
CREATE TABLE pass_ids (
    source  TEXT PRIMARY KEY,
    pass    INTEGER NOT NULL,
    cursor  TEXT NOT NULL,
    ids     BLOB NOT NULL
);
"#;

const V10: &str = r#"
-- A recorded batch keeps the SHA-256 of its body instead of a second copy of its members'
-- bodies (they are in their outbox rows): a re-send builds the body again and sends it only if
-- it hashes the same. New rows store an empty `body`; rows recorded before this migration keep
-- theirs (and a NULL hash) and are re-sent from it.
ALTER TABLE batches ADD COLUMN body_sha256 TEXT;
"#;

/// The schema version this build writes: the number of migrations.
const V11: &str = r#"
-- Customer bodies, each written once (issue 14): an outbox row and the customer it was
-- accepted for point at the same row instead of each carrying a copy. A first sync used to
-- write every body again twice (the claim rewrote the outbox row to record its batch, and the
-- acknowledgement copied the body into `customers.synced_body`, which grew the row and split
-- its page); now the claim and the acknowledgement rewrite rows of 90–140 bytes. A body row
-- belongs to the one outbox row that points at it until RevKeen accepts it, then to its
-- customer (`synced_body_id`), which frees the one it had before (store/outbox.rs).
CREATE TABLE bodies (
    id    INTEGER PRIMARY KEY,
    body  BLOB NOT NULL
);
ALTER TABLE outbox ADD COLUMN body_id INTEGER;
ALTER TABLE customers ADD COLUMN synced_body_id INTEGER;
-- The queued bodies move (the outbox is short); `outbox.body` stays, empty. A customer's
-- synced body written before stays in `customers.synced_body` until its next sync replaces
-- it: rewriting every customer here would make the upgrade of a large file write it whole.
INSERT INTO bodies (id, body) SELECT id, body FROM outbox;
UPDATE outbox SET body_id = id, body = x'';
"#;

pub(super) const LATEST: usize = 11;

/// All migrations, oldest first.
pub(super) fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V1),
        M::up(V2),
        M::up(V3),
        M::up(V4),
        M::up(V5),
        M::up(V6),
        M::up(V7),
        M::up(V8),
        M::up(V9),
        M::up(V10),
        M::up(V11),
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid_and_latest_is_their_count() {
        super::migrations().validate().expect("migrations apply");
        let mut conn = rusqlite::Connection::open_in_memory().expect("memory");
        super::migrations().to_latest(&mut conn).expect("apply");
        let version: usize = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, super::LATEST);
        let id: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'state_id'", [], |row| {
                row.get(0)
            })
            .expect("a state id");
        let parsed = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4, "{id}");
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
    }

    #[test]
    fn v9_marks_what_the_last_complete_pass_had_not_listed_as_vanished() {
        let mut conn = rusqlite::Connection::open_in_memory().expect("memory");
        super::migrations().to_version(&mut conn, 8).expect("to V8");
        conn.execute_batch(
            "INSERT INTO cursors (source, cursor, passes, updated_at) VALUES ('gym', '{}', 3, 0);
             INSERT INTO customers (source, external_id, seen_pass) VALUES
                 ('gym', 'listed', 3), ('gym', 'gone', 2), ('gym', 'replayed', NULL);",
        )
        .expect("a V8 state");
        super::migrations().to_latest(&mut conn).expect("to latest");
        let marks: Vec<(String, Option<i64>)> = conn
            .prepare("SELECT external_id, vanished_pass FROM customers ORDER BY external_id")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .expect("read");
        assert_eq!(
            marks,
            [
                ("gone".to_string(), Some(2)),
                ("listed".to_string(), None),
                ("replayed".to_string(), None)
            ]
        );
    }
}
