#!/usr/bin/env python3
"""A model of what a first sync writes to the state file's write-ahead log, per transaction.

It applies the real schema (the migrations' SQL, read from src/store/migrations.rs) to a
fresh SQLite file and replays a first sync's three hot transactions with the statements the
daemon uses for them (src/store/outbox.rs, src/store/customers.rs), with 4 batches of 100 in
flight as the worker keeps them. Then it counts each transaction's WAL frames (one frame per
page it dirtied) from the log's size, checkpointing before each one:
- the page commit: each record's body, job and customer row, and the cursor;
- the claim that records a batch;
- the acknowledgement that retires it.

It is a model. Bodies are synthetic, 400 bytes each, and rejections, failures and the poll's
own records are left out. What it is for is comparing layouts before building one: it put the
layout of migration V11 at -29 % of frames, and the daemon measured -20 % of its pwrite calls
(benches/results/bodies-2026-12-04.txt).

    python3 benches/wal-model.py                        # the schema as it is
    python3 benches/wal-model.py --pages-per-commit 2   # two listing pages in one transaction
    python3 benches/wal-model.py --blob-hashes          # SHA-256 as 32-byte blobs, not hex

Prints frames per 100 records for each transaction kind and the final file size.
Python 3 standard library only.
"""
import argparse
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--pages-per-commit", type=int, default=1)
    ap.add_argument("--blob-hashes", action="store_true")
    args = ap.parse_args()
    migrations = open(os.path.join(ROOT, "src/store/migrations.rs")).read()
    schema = re.findall(r'const V\d+: &str = r#"(.*?)"#;', migrations, re.S)
    path = os.path.join(tempfile.mkdtemp(), "state.db")
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0",
                   "foreign_keys=ON", f"page_size={PAGE}"):
        db.execute(f"PRAGMA {pragma}")
    for sql in schema:
        db.executescript(sql)
    frames = {"page": 0, "claim": 0, "finish": 0}

    def wal_frames():
        size = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
        return max(0, size - 32) // (PAGE + 24)

    def transaction(kind, work):
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = wal_frames()
        db.execute("BEGIN")
        result = work()
        db.execute("COMMIT")
        frames[kind] += wal_frames() - before
        return result

    def body(i):
        fields = {"email": f"client{i}@example.com", "first_name": f"Firstname{i}",
                  "last_name": "Lastname", "phone": "+1555%07d" % i,
                  "address": {"line1": f"{i} Some Street", "city": "Springfield",
                              "postal_code": "12345", "country": "US"},
                  "metadata": {"wodify_client_id": str(i), "membership": "Unlimited Monthly"}}
        text = json.dumps(fields).encode()
        return text + b" " * max(0, 400 - len(text))

    def digest(data):
        h = hashlib.sha256(data)
        return h.digest() if args.blob_hashes else h.hexdigest()

    per_commit = 100 * args.pages_per_commit

    def page(start):
        def work():
            for i in range(start, start + per_commit):
                ext, data = str(i), body(i)
                h = digest(data)
                db.execute("SELECT version, latest_hash FROM customers "
                           "WHERE source = 'gym' AND external_id = ?", (ext,)).fetchall()
                key = str(uuid.uuid5(uuid.NAMESPACE_URL, ext + str(h)))
                db.execute("INSERT INTO bodies (body) VALUES (?)", (data,))
                body_id = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                db.execute("INSERT INTO outbox (source, external_id, revkeen_source, body, body_id,"
                           " body_hash, idempotency_key, enqueued_at)"
                           " VALUES ('gym', ?, 'wodify', x'', ?, ?, ?, 1)", (ext, body_id, h, key))
                db.execute("INSERT INTO customers (source, external_id, version, latest_hash, seen_pass)"
                           " VALUES ('gym', ?, 1, ?, 1) ON CONFLICT DO UPDATE SET version = 1,"
                           " latest_hash = excluded.latest_hash", (ext, h))
            db.execute("INSERT INTO cursors VALUES ('gym', ?, 0, 1)"
                       " ON CONFLICT DO UPDATE SET cursor = excluded.cursor", (str(start),))
        transaction("page", work)

    def claim():
        def work():
            ids = [r[0] for r in db.execute(
                "SELECT id FROM outbox WHERE batch_id IS NULL AND inflight = 0"
                " ORDER BY next_attempt_at, id LIMIT 100")]
            if not ids:
                return None
            db.execute("INSERT INTO batches (revkeen_source, body, body_sha256, idempotency_key,"
                       " created_at, inflight) VALUES ('wodify', x'', 'h', 'k', 1, 1)")
            batch = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            db.execute("UPDATE outbox SET batch_id = ? WHERE id IN (SELECT value FROM json_each(?))",
                       (batch, json.dumps(ids)))
            return batch
        return transaction("claim", work)

    def finish(batch):
        def work():
            db.execute("DELETE FROM bodies WHERE id IN (SELECT c.synced_body_id FROM outbox o"
                       " JOIN customers c ON c.source = o.source AND c.external_id = o.external_id"
                       " WHERE o.batch_id = ? AND c.synced_body_id IS NOT NULL)", (batch,))
            db.execute("UPDATE customers SET synced_hash = o.body_hash, synced_body_id = o.body_id,"
                       " synced_body = NULL, synced_at = 2 FROM outbox o WHERE o.batch_id = ?"
                       " AND customers.source = o.source AND customers.external_id = o.external_id",
                       (batch,))
            db.execute("SELECT EXISTS (SELECT 1 FROM failures WHERE kind = 'dead_letter')").fetchall()
            db.execute("DELETE FROM outbox WHERE batch_id = ?", (batch,))
            db.execute("INSERT INTO delivery (source, created) VALUES ('gym', 100)"
                       " ON CONFLICT DO UPDATE SET created = created + 100")
            db.execute("DELETE FROM batches WHERE id = ?", (batch,))
        transaction("finish", work)

    in_flight = []
    for n in range(args.records // per_commit):
        page(n * per_commit)
        for _ in range(args.pages_per_commit):
            batch = claim()
            if batch is not None:
                in_flight.append(batch)
            if len(in_flight) > 4:
                finish(in_flight.pop(0))
    while True:
        batch = claim()
        if batch is None:
            break
        in_flight.append(batch)
        if len(in_flight) > 4:
            finish(in_flight.pop(0))
    for batch in in_flight:
        finish(batch)
    hundreds = args.records / 100
    per = {k: round(v / hundreds, 1) for k, v in frames.items()}
    print(f"WAL frames per 100 records: page commit {per['page']}, claim {per['claim']},"
          f" acknowledgement {per['finish']}, total {round(sum(per.values()), 1)};"
          f" state file {os.path.getsize(path) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
