#!/usr/bin/env python3
"""The peer in `cargo bench --bench pipeline` (row 7): the script an integrator would write
instead of running sync-daemon. It pages Wodify's clients and PUTs them to RevKeen in batches
of 100 with a minimal field mapping, one request at a time over kept-alive connections, and
keeps nothing: no state file, no change detection, no retries, no dead letters. A rerun sends
everything again.

    WODIFY_URL=http://127.0.0.1:8081 WODIFY_API_KEY=... \
    REVKEEN_URL=http://127.0.0.1:8080 REVKEEN_API_KEY=... python3 benches/peer/peer.py

Needs Python 3 and `requests`. Prints one JSON line with what it did; exits 1 on an HTTP error.
"""

import json
import os
import sys
import time

import requests

PAGE_SIZE = 100
BATCH_SIZE = 100


def customer(client):
    """Wodify client -> RevKeen batch item, or None when it has no usable email."""
    email = (client.get("email") or "").strip().lower()
    local, _, domain = email.partition("@")
    if not local or "@" in domain or "." not in domain:
        return None
    item = {"external_id": str(client["id"]), "email": email}
    name = " ".join(p for p in (client.get("first_name"), client.get("last_name")) if p)
    if name:
        item["name"] = name
    for source, target in (
        ("phone_number", "phone"),
        ("street_address_1", "address_line1"),
        ("street_address_2", "address_line2"),
        ("city", "city"),
        ("state", "state"),
        ("zipcode", "postal_code"),
    ):
        value = client.get(source)
        if isinstance(value, str) and value.strip():
            item[target] = value.strip()
    country = client.get("country")
    if isinstance(country, str) and len(country.strip()) == 2:
        item["country"] = country.strip().upper()
    updated = (client.get("updated") or {}).get("updated_on_datetime")
    if isinstance(updated, str) and not updated.startswith("1900-"):
        item["external_updated_at"] = updated if updated.endswith("Z") else updated + "Z"
    return item


def check(response):
    """Stops on an HTTP error, naming the request and the start of the answer."""
    if not response.ok:
        raise SystemExit(
            f"peer: {response.request.method} {response.url}: {response.status_code} "
            f"{response.text[:300]}"
        )


def main():
    wodify = os.environ["WODIFY_URL"].rstrip("/")
    revkeen = os.environ["REVKEEN_URL"].rstrip("/")
    source = requests.Session()
    source.headers["x-api-key"] = os.environ["WODIFY_API_KEY"]
    target = requests.Session()
    target.headers["x-api-key"] = os.environ["REVKEEN_API_KEY"]

    started = time.monotonic()
    records = skipped = sent = failed = pages = batches = 0
    batch = []

    def flush():
        nonlocal sent, failed, batches, batch
        if not batch:
            return
        response = target.put(
            f"{revkeen}/customers/external/batch",
            json={"source": "wodify", "customers": batch},
            timeout=60,
        )
        check(response)
        failed += len(response.json().get("failed") or [])
        sent += len(batch)
        batches += 1
        batch = []

    page = 1
    while True:
        response = source.get(
            f"{wodify}/clients",
            params={"page": page, "page_size": PAGE_SIZE, "sort": "id"},
            timeout=60,
        )
        check(response)
        body = response.json()
        pages += 1
        for client in body.get("clients") or []:
            records += 1
            item = customer(client)
            if item is None:
                skipped += 1
                continue
            batch.append(item)
            if len(batch) == BATCH_SIZE:
                flush()
        if not (body.get("pagination") or {}).get("has_more"):
            break
        page += 1
    flush()
    print(
        json.dumps(
            {
                "records": records,
                "skipped_no_email": skipped,
                "sent": sent,
                "failed": failed,
                "pages": pages,
                "batches": batches,
                "elapsed_secs": round(time.monotonic() - started, 3),
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except requests.RequestException as error:
        print(f"peer: {error}", file=sys.stderr)
        sys.exit(1)
