//! Test doubles the unit tests share (compiled for tests only): a scripted upstream, and the
//! proptest strategies that feed the adapters' page parsers arbitrary, hostile listings.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Map, Value};
use tokio::time::Instant;

/// A scripted upstream: each call takes `latency`, is logged with when it came, and gets the
/// next answer of the script; the last answer repeats for ever.
pub(crate) struct Script<T> {
    answers: Mutex<VecDeque<T>>,
    latency: Duration,
    arrivals: Mutex<Vec<Duration>>,
    started: Instant,
}

impl<T: Clone> Script<T> {
    pub(crate) fn new(answers: Vec<T>, latency: Duration) -> Script<T> {
        Script {
            answers: Mutex::new(answers.into()),
            latency,
            arrivals: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Logs a call, waits out the latency and answers (`None`: an empty script).
    pub(crate) async fn next(&self) -> Option<T> {
        self.arrivals
            .lock()
            .expect("lock")
            .push(self.started.elapsed());
        let answer = {
            let mut answers = self.answers.lock().expect("lock");
            if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().cloned()
            }
        };
        tokio::time::sleep(self.latency).await;
        answer
    }

    /// When each call came, from the script's creation.
    pub(crate) fn arrivals(&self) -> Vec<Duration> {
        self.arrivals.lock().expect("lock").clone()
    }
}

/// Text an upstream might put in a field: anything Unicode, digits too long for an `i64`,
/// emails, times with and without offsets, phones, control characters (C0, DEL, C1) among
/// letters, and runs far over every field limit.
pub(crate) fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,24}",
        "[0-9]{1,25}",
        "-?[0-9]{1,4}(\\.[0-9])?",
        " ?[a-zA-Z.+]{1,8}@[a-z]{1,8}\\.[a-z]{2,3} ?",
        "[0-9]{4}-[01][0-9]-[0-3][0-9]([T ][0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:?[0-9]{2})?)?",
        "\\+?[0-9 ()-]{0,24}",
        "[a-z]{0,6}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]{1,3}[a-z]{0,6}",
        (0usize..1200, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

/// Any JSON value, up to four levels deep; object keys are drawn from `keys` (the fields an
/// adapter reads) as often as not, so the values land where the parser looks.
pub(crate) fn json_value(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-3i64..20_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        odd_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((json_key(keys), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
    .boxed()
}

fn json_key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(keys).prop_map(str::to_owned),
        "[a-z_]{1,10}",
    ]
}

/// A listed record: mostly an object with some of `keys` holding arbitrary values (the shape a
/// record has, with anything in it), half of them starting from a usable `id` and `email` so
/// that the rest of the record is read too; sometimes any value at all (a number, a list).
pub(crate) fn json_record(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let fields = prop::collection::vec(
        (prop::sample::select(keys), json_value(keys)),
        0..keys.len(),
    );
    let usable = (
        1i64..1_000_000,
        "[a-z]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}",
        any::<bool>(),
    );
    prop_oneof![
        4 => (fields, usable).prop_map(|(pairs, (id, email, start_usable))| {
            let mut record = Map::new();
            if start_usable {
                record.insert("id".into(), id.into());
                record.insert("email".into(), email.into());
            }
            for (key, value) in pairs {
                record.insert(key.to_owned(), value);
            }
            Value::Object(record)
        }),
        1 => json_value(keys),
    ]
    .boxed()
}

/// The body of a listing page: `page` builds the envelope around the records; then, one time
/// in three, one byte is overwritten (a byte that is not UTF-8, a broken quote) or the body is
/// cut short. Returns the body and whether it is still the envelope as built.
pub(crate) fn listing_body(
    records: BoxedStrategy<Value>,
    page: fn(Vec<Value>, Value) -> Value,
    keys: &'static [&'static str],
) -> impl Strategy<Value = (Vec<u8>, Option<usize>)> {
    (
        prop::collection::vec(records, 0..8),
        json_value(keys),
        prop_oneof![
            4 => Just(None),
            1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(Some),
            1 => any::<prop::sample::Index>().prop_map(|cut| Some((cut, 0))),
        ],
    )
        .prop_map(move |(records, extra, damage)| {
            let count = records.len();
            let mut body = serde_json::to_vec(&page(records, extra)).expect("JSON");
            match damage {
                None => (body, Some(count)),
                Some((at, 0)) => {
                    body.truncate(at.index(body.len().max(1)));
                    (body, None)
                }
                Some((at, byte)) => {
                    let at = at.index(body.len().max(1));
                    if let Some(slot) = body.get_mut(at) {
                        *slot = byte;
                    }
                    (body, None)
                }
            }
        })
}

/// What every customer body must be, whatever the upstream sent: a JSON object whose strings
/// carry no control character and are at most `MAX_TEXT_CHARS` long (arrays of tags included).
pub(crate) fn assert_sendable(body: &[u8]) -> Result<(), TestCaseError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| TestCaseError::fail(format!("the body is not JSON: {e}")))?;
    prop_assert!(value.is_object(), "the body is not an object: {value}");
    let mut strings = Vec::new();
    collect_strings(&value, &mut strings);
    for text in strings {
        prop_assert!(
            text.chars().count() <= crate::customer::MAX_TEXT_CHARS,
            "{} characters sent",
            text.chars().count()
        );
        prop_assert!(
            !text.chars().any(char::is_control),
            "a control character in {text:?}"
        );
    }
    Ok(())
}

fn collect_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(text) => out.push(text),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}
