//! Idempotency keys, batch keys and batch bodies: what makes a replay harmless (invariant 3 in
//! ARCHITECTURE.md). A job's key is derived when the job is created and stored with it; a
//! batch's key and body are derived when the batch is recorded.

use uuid::Uuid;

/// Namespace of every idempotency key this daemon derives (a UUIDv5 of a fixed name, so keys
/// are stable across versions and machines).
pub fn key_namespace() -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        b"https://revkeen.com/sync-daemon/idempotency",
    )
}

/// The idempotency key of one job (invariant 3 in ARCHITECTURE.md): a UUIDv5 of
/// `{revkeen_source}/{external_id}/{hash last synced, or "-"}/{sha256(body)}/{version}/{state id}`.
///
/// The last-synced hash keeps A → B → A from replaying the first A. `version` is the
/// customer's job counter in the state file; it adds what the hash alone cannot: a record that
/// flips A → B → A → B within RevKeen's 24 h window, or is resent by `--resync` or `replay`,
/// still gets a key RevKeen has never seen, so a replayed old answer can never stand in for a
/// new write. The state id is the state file's random identity: a file moved aside and started
/// anew counts versions from 1 again, and without it would derive the very keys of the first
/// sends, which RevKeen would answer with replays.
pub fn idempotency_key(
    revkeen_source: &str,
    external_id: &str,
    synced_hash: Option<&str>,
    body_hash: &str,
    version: i64,
    state_id: &str,
) -> String {
    let name = format!(
        "{revkeen_source}/{external_id}/{}/{body_hash}/{version}/{state_id}",
        synced_hash.unwrap_or("-")
    );
    Uuid::new_v5(&key_namespace(), name.as_bytes()).to_string()
}

/// A batch's key: a UUIDv5 of its members' keys in order.
pub fn batch_key<'a>(member_keys: impl Iterator<Item = &'a str>) -> String {
    let joined: Vec<&str> = member_keys.collect();
    Uuid::new_v5(&key_namespace(), joined.join("\n").as_bytes()).to_string()
}

/// The largest batch body sent: a batch is closed before its body would pass 1 MB (100
/// customers of ordinary size are about 40 KB; the cap only bites on bodies bloated by long
/// fields, which each customer body limits anyway).
pub const MAX_BATCH_BODY: usize = 1_000_000;

/// The batch body `{"source": …, "customers": [{"external_id": …, <body fields>}, …]}` built
/// from members' stored bodies, spliced as bytes so each item carries its body exactly.
pub fn batch_body<'a>(
    revkeen_source: &str,
    members: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"source\":");
    out.extend_from_slice(&json_string(revkeen_source));
    out.extend_from_slice(b",\"customers\":[");
    for (index, (external_id, body)) in members.enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"external_id\":");
        out.extend_from_slice(&json_string(external_id));
        // A stored body is a non-empty JSON object (`email` is required): splice its fields.
        let fields = body.get(1..).unwrap_or_default();
        if fields != b"}" {
            out.push(b',');
        }
        out.extend_from_slice(fields);
    }
    out.extend_from_slice(b"]}");
    out
}

fn json_string(value: &str) -> Vec<u8> {
    serde_json::to_vec(value).expect("a string always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_distinguish_every_input() {
        let a = idempotency_key("wodify", "1", None, "h1", 1, "s");
        assert_eq!(a, idempotency_key("wodify", "1", None, "h1", 1, "s"));
        assert_ne!(a, idempotency_key("wodify", "1", Some("h0"), "h1", 1, "s"));
        assert_ne!(a, idempotency_key("wodify", "1", None, "h1", 2, "s"));
        assert_ne!(a, idempotency_key("wodify", "2", None, "h1", 1, "s"));
        assert_ne!(a, idempotency_key("practicehub", "1", None, "h1", 1, "s"));
        assert_ne!(
            a,
            idempotency_key("wodify", "1", None, "h1", 1, "another file")
        );
        assert!(Uuid::parse_str(&a).is_ok());
        assert_ne!(
            batch_key(["a", "b"].into_iter()),
            batch_key(["b", "a"].into_iter())
        );
    }

    #[test]
    fn batch_body_splices_member_bodies() {
        let body = batch_body(
            "wodify",
            [
                ("1", br#"{"email":"a@x.io"}"#.as_slice()),
                ("2/b", br#"{"email":"b@x.io","name":"B"}"#.as_slice()),
            ]
            .into_iter(),
        );
        let parsed: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(
            parsed,
            serde_json::json!({"source": "wodify", "customers": [
                {"external_id": "1", "email": "a@x.io"},
                {"external_id": "2/b", "email": "b@x.io", "name": "B"}
            ]})
        );
    }
}
