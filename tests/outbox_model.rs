//! Model-based test of the SQLite outbox (ARCHITECTURE.md, "Invariants" 2–6).
//!
//! The template is vector's disk-buffer model test: proptest generates a random sequence of
//! operations, the sequence is replayed against the real [`Store`] in a temporary directory and
//! against a small in-memory model, and after every operation the two are compared. Shrinking
//! works on the plain [`Op`] enum, so a failure ends as a short readable sequence.
//!
//! The world is one source (`gym`, RevKeen source `wodify`), six customers `c0`..`c5`, and four
//! possible bodies per customer. The operations are what the poll loop and the worker do:
//! - `Poll`: [`Store::commit_page`] of a page of bodies (or rejections), moving the cursor.
//! - `Claim`: [`Store::claim`] at a far-future `now`, so backoff never hides work; the claimed
//!   unit is kept "in flight" like the worker's handle.
//! - `Ack`, `DeadLetter`, `Retry`, `Release`, `SplitBatch` on the k-th in-flight unit:
//!   [`Store::finish`] (all delivered, or some members dead-lettered), [`Store::retry_later`],
//!   [`Store::release`], [`Store::split_batch`].
//! - `ResetAttempts` ([`Store::reset_attempts`], a new `--once` run), `Replay` (`replay --all`).
//! - `Crash`: every in-flight handle is lost and the state file is reopened with [`Store::open`].
//!
//! The model keeps, per customer: the latest body decided on, the last body RevKeen accepted
//! (synced), the jobs of its lane in order (queued, in flight, or in a recorded batch, with the
//! key first seen for each), and its failure row; plus the recorded batches (members, body,
//! key). Properties, in ARCHITECTURE.md's terms:
//! 1. Invariant 4, one customer one lane: no two in-flight units hold the same customer; a claim
//!    only returns lane heads that are not already in flight; a batch holds each customer once,
//!    sorted by external id, and its recorded body is [`keys::batch_body`] of its members and
//!    its key [`keys::batch_key`] of theirs. Claims also take the most overdue work first and
//!    fill batches as far as the batch size allows.
//! 2. Invariant 5, nothing unchanged is sent: a polled body equal to the latest decided body
//!    (queued, in flight, synced or dead-lettered) enqueues nothing, and any other body does
//!    (`PageOutcome` is compared exactly).
//! 3. Invariant 2, ack after a final answer only: `outstanding` always equals the model's job
//!    count, so a job leaves only through `finish`; after `Crash` everything that was in flight
//!    is claimable again, and a recorded batch is re-claimed with the same members, body and key
//!    (invariant 3, "re-sent exactly as recorded"). `next_due` agrees with the model.
//! 4. Invariant 3, replays are harmless: over the whole history one idempotency key is never
//!    sent with two bodies, a job keeps its key across attempts and crashes, and a new version of
//!    a customer (coalesced, re-polled, replayed) never reuses an older version's key.
//! 5. Eventual delivery: at the end everything is claimed and acknowledged, and each customer's
//!    synced body is the last body polled for it, unless that version was dead-lettered.
//! 6. Invariant 6, nothing dropped silently: `failures` holds exactly the rows the model
//!    expects (kind, attempts, one per customer); a customer whose latest body is neither
//!    synced nor queued always has a failure row explaining why; and a customer last polled as
//!    a rejection is shown as rejected (its current problem).
//!
//! The state file is also checked through `lane`, `cursor` (invariant 1: the cursor moves with
//! its page) and, after crashes and at the end, through a read-only connection as `status` and
//! `failures` see it. Not modelled: `update_only` and ignored records, `--resync`, several
//! sources, and `finish` with members left without a result (the worker never does that).
//!
//! The model found two ways a failure could vanish (invariant 6); their minimal sequences are
//! kept below as regression tests. `PROPTEST_CASES` sets the number of cases (64 by default).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sync_daemon::customer::{Rejection, body_hash};
use sync_daemon::keys;
use sync_daemon::store::{
    ClaimFilter, CursorSave, DeadLetter, DeliveryCounts, FailureKind, Finished, Job, PageItem,
    PageItemOutcome, PageOutcome, Store, Unit,
};

const SOURCE: &str = "gym";
const REVKEEN_SOURCE: &str = "wodify";
const CUSTOMERS: usize = 6;
const BODIES: u8 = 4;
/// `retry_later` times are this plus a few seconds: all in the past of [`FAR_FUTURE`], but
/// different enough to order the queue.
const RETRY_BASE: i64 = 1_700_000_000_000;
/// The `now` of every claim: every retry is due.
const FAR_FUTURE: i64 = i64::MAX / 2;

/// What a polled record normalizes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// One of the customer's [`BODIES`] possible bodies.
    Body(u8),
    /// No valid email: recorded as rejected, never sent.
    Reject,
}

/// One step of the poll loop or the worker. Unit indexes are taken modulo the number of
/// in-flight units; with none in flight the step does nothing.
#[derive(Debug, Clone)]
enum Op {
    Poll {
        items: Vec<(usize, Item)>,
        pass_complete: bool,
    },
    Claim {
        batch_size: usize,
    },
    Ack(usize),
    /// Members whose bit is set in `mask` are dead-lettered, the others delivered (a batch
    /// answer with `failed[]` items); a mask selecting no member dead-letters them all.
    DeadLetter {
        unit: usize,
        mask: u8,
    },
    /// `retry_later` at `RETRY_BASE + delay` seconds; `counted` is false for a 429.
    Retry {
        unit: usize,
        delay: u8,
        counted: bool,
    },
    Release(usize),
    /// Only acts on a batch (the worker splits batches RevKeen refused as a whole).
    SplitBatch(usize),
    ResetAttempts,
    Crash,
    Replay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Queued,
    InFlight,
    /// Member of the recorded batch with this id (in flight or not: see [`ModelBatch`]).
    InBatch(i64),
}

#[derive(Debug, Clone)]
struct ModelJob {
    /// The model's identity of this version of the customer; a coalesced job is a new version.
    serial: u64,
    body: u8,
    state: JobState,
    single_only: bool,
    /// `next_attempt_at`.
    due: i64,
    attempts: u32,
    /// Learned at the first claim, then fixed for the life of the version.
    key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelFailure {
    Rejected,
    Dead { body: u8, attempts: u32 },
}

#[derive(Debug, Default)]
struct Lane {
    /// The store has a `customers` row (any poll touches one).
    seen: bool,
    latest: Option<u8>,
    synced: Option<u8>,
    /// The lane's outbox rows, head first.
    jobs: VecDeque<ModelJob>,
    failure: Option<ModelFailure>,
    last_poll: Option<Item>,
}

#[derive(Debug)]
struct ModelBatch {
    members: Vec<usize>,
    body: Vec<u8>,
    key: String,
    due: i64,
    attempts: u32,
    in_flight: bool,
}

fn external_id(customer: usize) -> String {
    format!("c{customer}")
}

fn body(customer: usize, version: u8) -> Vec<u8> {
    format!(r#"{{"email":"c{customer}.v{version}@gym.example","name":"Customer {customer} v{version}"}}"#)
        .into_bytes()
}

fn lane_of(job: &Job) -> Result<usize, TestCaseError> {
    job.external_id
        .strip_prefix('c')
        .and_then(|n| n.parse().ok())
        .filter(|&n| n < CUSTOMERS)
        .ok_or_else(|| TestCaseError::fail(format!("unknown external id {:?}", job.external_id)))
}

trait OrFail<T> {
    fn or_fail(self) -> Result<T, TestCaseError>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self) -> Result<T, TestCaseError> {
        self.map_err(|e| TestCaseError::fail(format!("store error: {e}")))
    }
}

fn sources() -> Vec<String> {
    vec![SOURCE.to_string()]
}

/// The real store next to the model of what it should hold.
struct Harness {
    path: PathBuf,
    store: Option<Store>,
    /// The worker's handles: lost at a crash.
    inflight: Vec<Unit>,
    lanes: Vec<Lane>,
    batches: BTreeMap<i64, ModelBatch>,
    next_serial: u64,
    cursor: Option<(String, i64)>,
    polls: u64,
    /// Every (key, body) RevKeen was sent, over the whole history.
    sent: HashMap<String, Vec<u8>>,
    /// The version each job key belongs to.
    key_owner: HashMap<String, (usize, u64)>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Result<Harness, TestCaseError> {
        let dir = tempfile::tempdir().or_fail()?;
        let path = dir.path().join("state.db");
        let store = Store::open(&path).or_fail()?;
        Ok(Harness {
            path,
            store: Some(store),
            inflight: Vec::new(),
            lanes: (0..CUSTOMERS).map(|_| Lane::default()).collect(),
            batches: BTreeMap::new(),
            next_serial: 0,
            cursor: None,
            polls: 0,
            sent: HashMap::new(),
            key_owner: HashMap::new(),
            _dir: dir,
        })
    }

    fn store(&self) -> &Store {
        self.store
            .as_ref()
            .expect("the store is open between operations")
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    fn pick(&self, index: usize) -> Option<usize> {
        (!self.inflight.is_empty()).then(|| index % self.inflight.len())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Poll {
                items,
                pass_complete,
            } => self.poll(items, *pass_complete),
            Op::Claim { batch_size } => self.claim(*batch_size),
            Op::Ack(unit) => self.finish(*unit, None),
            Op::DeadLetter { unit, mask } => self.finish(*unit, Some(*mask)),
            Op::Retry {
                unit,
                delay,
                counted,
            } => self.retry(*unit, *delay, *counted),
            Op::Release(unit) => self.release(*unit),
            Op::SplitBatch(unit) => self.split(*unit),
            Op::ResetAttempts => self.reset_attempts(),
            Op::Crash => self.crash(),
            Op::Replay => self.replay(),
        }
    }

    fn poll(&mut self, items: &[(usize, Item)], pass_complete: bool) -> Result<(), TestCaseError> {
        let page: Vec<PageItem> = items
            .iter()
            .map(|&(customer, item)| PageItem {
                external_id: external_id(customer),
                outcome: match item {
                    Item::Body(version) => PageItemOutcome::Customer {
                        body: body(customer, version),
                        update_only: false,
                    },
                    Item::Reject => PageItemOutcome::Rejected(Rejection {
                        code: "no_email",
                        reason: "the record has no email".to_string(),
                        hint: "add an email at the source".to_string(),
                    }),
                },
            })
            .collect();
        self.polls += 1;
        let cursor = format!("page-{}", self.polls);
        let got = self
            .store()
            .commit_page(
                SOURCE,
                REVKEEN_SOURCE,
                &page,
                CursorSave::Always(&cursor),
                pass_complete,
                false,
            )
            .or_fail()?;

        // The model always saves its cursor with the page.
        let mut want = PageOutcome {
            cursor_saved: true,
            ..PageOutcome::default()
        };
        for &(customer, item) in items {
            let serial = self.serial();
            let lane = &mut self.lanes[customer];
            lane.seen = true;
            lane.last_poll = Some(item);
            let Item::Body(version) = item else {
                // The rejection is the customer's latest state: a version still waiting in the
                // queue is dropped, and whatever the record becomes next is queued again.
                want.rejected += 1;
                lane.failure = Some(ModelFailure::Rejected);
                lane.latest = None;
                if lane
                    .jobs
                    .back()
                    .is_some_and(|job| job.state == JobState::Queued)
                {
                    lane.jobs.pop_back();
                }
                continue;
            };
            // A record that normalizes again resolves its rejection.
            if lane.failure == Some(ModelFailure::Rejected) {
                lane.failure = None;
            }
            if lane.latest == Some(version) {
                want.unchanged += 1;
                continue;
            }
            want.enqueued += 1;
            lane.latest = Some(version);
            let fresh = ModelJob {
                serial,
                body: version,
                state: JobState::Queued,
                single_only: false,
                due: 0,
                attempts: 0,
                key: None,
            };
            match lane.jobs.back_mut() {
                // Coalescing: a queued version is replaced, a sent one is queued behind.
                Some(last) if last.state == JobState::Queued => *last = fresh,
                _ => lane.jobs.push_back(fresh),
            }
        }
        prop_assert_eq!(
            got,
            want,
            "invariant 5: a body equal to the latest decided one must enqueue nothing, any other must enqueue"
        );
        let passes = self.cursor.as_ref().map_or(0, |(_, passes)| *passes);
        self.cursor = Some((cursor, passes + i64::from(pass_complete)));
        Ok(())
    }

    /// Customers whose lane head could be claimed now.
    fn claimable_heads(&self) -> Vec<usize> {
        (0..CUSTOMERS)
            .filter(|&c| {
                self.lanes[c]
                    .jobs
                    .front()
                    .is_some_and(|head| head.state == JobState::Queued)
            })
            .collect()
    }

    fn head(&self, customer: usize) -> &ModelJob {
        self.lanes[customer]
            .jobs
            .front()
            .expect("checked to be a lane head")
    }

    fn model_next_due(&self) -> Option<i64> {
        let heads = self.claimable_heads().into_iter().map(|c| self.head(c).due);
        let batches = self
            .batches
            .values()
            .filter(|b| !b.in_flight)
            .map(|b| b.due);
        heads.chain(batches).min()
    }

    /// Checks a claimed job against its lane head and learns or checks its key.
    fn check_member(
        &mut self,
        customer: usize,
        job: &Job,
        state: JobState,
    ) -> Result<(), TestCaseError> {
        let Some(head) = self.lanes[customer].jobs.front() else {
            return Err(TestCaseError::fail(format!(
                "claimed {} but the model has no job for it: {job:?}",
                job.external_id
            )));
        };
        prop_assert_eq!(
            head.state,
            state,
            "invariant 4: {} claimed while its lane head is not claimable this way",
            &job.external_id
        );
        prop_assert!(
            job.body == body(customer, head.body),
            "{} claimed with body {:?}, the model's lane head has v{}",
            job.external_id,
            String::from_utf8_lossy(&job.body),
            head.body
        );
        prop_assert_eq!(&job.body_hash, &body_hash(&job.body));
        prop_assert_eq!(job.source.as_str(), SOURCE);
        prop_assert_eq!(job.revkeen_source.as_str(), REVKEEN_SOURCE);
        let serial = head.serial;
        match &head.key {
            Some(key) => prop_assert_eq!(
                key,
                &job.idempotency_key,
                "invariant 3: a job of {} changed its key between attempts",
                &job.external_id
            ),
            None => {
                if let Some(&(owner_customer, owner_serial)) =
                    self.key_owner.get(&job.idempotency_key)
                {
                    prop_assert!(
                        (owner_customer, owner_serial) == (customer, serial),
                        "invariant 3: a new version of {} reuses key {} of an older version (of c{})",
                        job.external_id,
                        job.idempotency_key,
                        owner_customer
                    );
                }
                self.key_owner
                    .insert(job.idempotency_key.clone(), (customer, serial));
                if let Some(head) = self.lanes[customer].jobs.front_mut() {
                    head.key = Some(job.idempotency_key.clone());
                }
            }
        }
        Ok(())
    }

    /// Records what RevKeen is sent, checking that no key ever comes with two bodies.
    fn send(&mut self, key: &str, sent: &[u8]) -> Result<(), TestCaseError> {
        if let Some(before) = self.sent.get(key) {
            prop_assert!(
                before.as_slice() == sent,
                "invariant 3: key {} sent with two bodies:\n  {}\n  {}",
                key,
                String::from_utf8_lossy(before),
                String::from_utf8_lossy(sent)
            );
        } else {
            self.sent.insert(key.to_string(), sent.to_vec());
        }
        Ok(())
    }

    fn claim(&mut self, batch_size: usize) -> Result<(), TestCaseError> {
        let filter = ClaimFilter {
            sources: sources(),
            batch_size,
            ..ClaimFilter::default()
        };
        let got = self.store().claim(&filter, FAR_FUTURE).or_fail()?;
        let recorded = self
            .batches
            .iter()
            .filter(|(_, b)| !b.in_flight)
            .min_by_key(|(id, b)| (b.due, **id))
            .map(|(id, _)| *id);
        let heads = self.claimable_heads();
        let Some(unit) = got else {
            prop_assert!(
                recorded.is_none() && heads.is_empty(),
                "claim returned nothing but the model has work: recorded batch {:?}, claimable customers {:?}",
                recorded,
                heads
            );
            return Ok(());
        };
        let members: Vec<usize> = unit.jobs().iter().map(lane_of).collect::<Result<_, _>>()?;
        prop_assert!(
            members.windows(2).all(|w| w[0] < w[1]),
            "invariant 4: a batch must hold distinct customers sorted by external id, got {:?}",
            members
        );

        if let Some(id) = recorded {
            let Unit::Batch(batch) = &unit else {
                return Err(TestCaseError::fail(format!(
                    "invariant 3: recorded batch {id} must be re-sent before new work, got {unit:?}"
                )));
            };
            let model = &self.batches[&id];
            prop_assert_eq!(batch.id, id, "recorded batches go oldest due first");
            prop_assert_eq!(
                &members,
                &model.members,
                "invariant 3: a recorded batch changed members"
            );
            prop_assert!(
                batch.body == model.body,
                "invariant 3: recorded batch {} re-sent with another body",
                id
            );
            prop_assert_eq!(
                &batch.idempotency_key,
                &model.key,
                "invariant 3: recorded batch re-sent with another key"
            );
            prop_assert_eq!(batch.attempts, model.attempts);
            for (job, &customer) in batch.members.iter().zip(&members) {
                self.check_member(customer, job, JobState::InBatch(id))?;
            }
            if let Some(model) = self.batches.get_mut(&id) {
                model.in_flight = true;
            }
        } else {
            for (job, &customer) in unit.jobs().iter().zip(&members) {
                self.check_member(customer, job, JobState::Queued)?;
                prop_assert_eq!(job.attempts, self.head(customer).attempts);
            }
            let due = |c: &usize| self.head(*c).due;
            prop_assert_eq!(
                members.iter().map(due).min(),
                heads.iter().map(due).min(),
                "claim must start with the most overdue lane head"
            );
            let batchable: Vec<usize> = heads
                .iter()
                .copied()
                .filter(|&c| !self.head(c).single_only)
                .collect();
            match &unit {
                Unit::Single(job) => {
                    let customer = members[0];
                    if !self.head(customer).single_only && batch_size > 1 {
                        prop_assert!(
                            batchable.len() == 1,
                            "{} claimed alone while {:?} could have joined its batch",
                            job.external_id,
                            batchable
                        );
                    }
                    prop_assert_eq!(job.attempts, unit.attempts());
                    if let Some(head) = self.lanes[customer].jobs.front_mut() {
                        head.state = JobState::InFlight;
                    }
                }
                Unit::Batch(batch) => {
                    prop_assert!(batch_size > 1, "a batch claimed with batch_size 1");
                    prop_assert!(
                        members.iter().all(|&c| !self.head(c).single_only),
                        "a single-only job (split from a refused batch) was batched again"
                    );
                    prop_assert_eq!(
                        members.len(),
                        batch_size.min(batchable.len()),
                        "a batch takes as many lane heads as the batch size allows"
                    );
                    for &m in &members {
                        for &u in batchable.iter().filter(|u| !members.contains(u)) {
                            prop_assert!(
                                due(&m) <= due(&u),
                                "c{} joined the batch before the more overdue c{}",
                                m,
                                u
                            );
                        }
                    }
                    let want_body = keys::batch_body(
                        REVKEEN_SOURCE,
                        batch
                            .members
                            .iter()
                            .map(|m| (m.external_id.as_str(), m.body.as_slice())),
                    );
                    prop_assert!(
                        batch.body == want_body,
                        "invariant 4: the recorded batch body is not batch_body of its members"
                    );
                    let want_key =
                        keys::batch_key(batch.members.iter().map(|m| m.idempotency_key.as_str()));
                    prop_assert_eq!(
                        &batch.idempotency_key,
                        &want_key,
                        "invariant 3: a batch key is the key of its members' keys in order"
                    );
                    prop_assert_eq!(batch.attempts, 0);
                    prop_assert!(
                        !self.batches.contains_key(&batch.id),
                        "batch id {} reused",
                        batch.id
                    );
                    for &customer in &members {
                        if let Some(head) = self.lanes[customer].jobs.front_mut() {
                            head.state = JobState::InBatch(batch.id);
                        }
                    }
                    self.batches.insert(
                        batch.id,
                        ModelBatch {
                            members: members.clone(),
                            body: batch.body.clone(),
                            key: batch.idempotency_key.clone(),
                            due: 0,
                            attempts: 0,
                            in_flight: true,
                        },
                    );
                }
            }
        }
        match &unit {
            Unit::Single(job) => self.send(&job.idempotency_key, &job.body)?,
            Unit::Batch(batch) => self.send(&batch.idempotency_key, &batch.body)?,
        }
        self.inflight.push(unit);
        Ok(())
    }

    /// `finish` with every member delivered (`mask` `None`) or some dead-lettered.
    fn finish(&mut self, index: usize, mask: Option<u8>) -> Result<(), TestCaseError> {
        let Some(index) = self.pick(index) else {
            return Ok(());
        };
        let unit = self.inflight.remove(index);
        let jobs = unit.jobs();
        let dead: Vec<bool> = match mask {
            None => vec![false; jobs.len()],
            Some(mask) => {
                let bits: Vec<bool> = (0..jobs.len()).map(|i| mask >> (i % 8) & 1 == 1).collect();
                if bits.contains(&true) {
                    bits
                } else {
                    vec![true; jobs.len()]
                }
            }
        };
        let results: Vec<(i64, Finished)> = jobs
            .iter()
            .zip(&dead)
            .map(|(job, &dead)| {
                let result = if dead {
                    Finished::DeadLetter(DeadLetter {
                        code: "validation_error".to_string(),
                        reason: "email is invalid".to_string(),
                        http_status: Some(400),
                        field_errors: None,
                        hint: None,
                    })
                } else {
                    Finished::Delivered
                };
                (job.id, result)
            })
            .collect();
        let dead_lettered = dead.iter().filter(|d| **d).count() as u64;
        let counts = DeliveryCounts {
            updated: jobs.len() as u64 - dead_lettered,
            dead_lettered,
            ..DeliveryCounts::default()
        };
        self.store().finish(&unit, &results, counts).or_fail()?;

        let state = match &unit {
            Unit::Single(_) => JobState::InFlight,
            Unit::Batch(batch) => JobState::InBatch(batch.id),
        };
        for (job, &dead) in jobs.iter().zip(&dead) {
            let customer = lane_of(job)?;
            let lane = &mut self.lanes[customer];
            let head = lane.jobs.pop_front();
            prop_assert!(
                head.as_ref().is_some_and(|h| h.state == state),
                "finished {} but the model's lane head is {:?}",
                job.external_id,
                head
            );
            let version = head.map_or(0, |h| h.body);
            if dead {
                // A rejection recorded since is the customer's current problem; the refused
                // body is out of date.
                if lane.failure != Some(ModelFailure::Rejected) {
                    lane.failure = Some(ModelFailure::Dead {
                        body: version,
                        attempts: unit.attempts() + 1,
                    });
                }
            } else {
                lane.synced = Some(version);
                if matches!(lane.failure, Some(ModelFailure::Dead { .. })) {
                    lane.failure = None;
                }
            }
        }
        if let Unit::Batch(batch) = &unit {
            self.batches.remove(&batch.id);
        }
        Ok(())
    }

    fn retry(&mut self, index: usize, delay: u8, counted: bool) -> Result<(), TestCaseError> {
        let Some(index) = self.pick(index) else {
            return Ok(());
        };
        let unit = self.inflight.remove(index);
        let at = RETRY_BASE + i64::from(delay) * 1000;
        self.store()
            .retry_later(&unit, at, "HTTP 503", counted)
            .or_fail()?;
        match &unit {
            Unit::Single(job) => {
                let customer = lane_of(job)?;
                if let Some(head) = self.lanes[customer].jobs.front_mut() {
                    head.state = JobState::Queued;
                    head.due = at;
                    head.attempts += u32::from(counted);
                }
            }
            Unit::Batch(batch) => {
                if let Some(model) = self.batches.get_mut(&batch.id) {
                    model.in_flight = false;
                    model.due = at;
                    model.attempts += u32::from(counted);
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, index: usize) -> Result<(), TestCaseError> {
        let Some(index) = self.pick(index) else {
            return Ok(());
        };
        let unit = self.inflight.remove(index);
        self.store().release(&unit).or_fail()?;
        match &unit {
            Unit::Single(job) => {
                let customer = lane_of(job)?;
                if let Some(head) = self.lanes[customer].jobs.front_mut() {
                    head.state = JobState::Queued;
                }
            }
            Unit::Batch(batch) => {
                if let Some(model) = self.batches.get_mut(&batch.id) {
                    model.in_flight = false;
                }
            }
        }
        Ok(())
    }

    fn split(&mut self, index: usize) -> Result<(), TestCaseError> {
        let Some(index) = self.pick(index) else {
            return Ok(());
        };
        let Unit::Batch(batch) = &self.inflight[index] else {
            return Ok(());
        };
        let batch = batch.clone();
        self.inflight.remove(index);
        self.store().split_batch(&batch).or_fail()?;
        if let Some(model) = self.batches.remove(&batch.id) {
            for customer in model.members {
                if let Some(head) = self.lanes[customer].jobs.front_mut() {
                    head.state = JobState::Queued;
                    head.single_only = true;
                }
            }
        }
        Ok(())
    }

    fn reset_attempts(&mut self) -> Result<(), TestCaseError> {
        self.store().reset_attempts(&sources()).or_fail()?;
        for job in self.lanes.iter_mut().flat_map(|lane| lane.jobs.iter_mut()) {
            job.attempts = 0;
            job.due = 0;
        }
        for batch in self.batches.values_mut() {
            batch.attempts = 0;
            batch.due = 0;
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<(), TestCaseError> {
        self.inflight.clear();
        self.store = None;
        self.store = Some(Store::open(&self.path).or_fail()?);
        for job in self.lanes.iter_mut().flat_map(|lane| lane.jobs.iter_mut()) {
            if job.state == JobState::InFlight {
                job.state = JobState::Queued;
            }
        }
        for batch in self.batches.values_mut() {
            batch.in_flight = false;
        }
        self.check_read_only()
    }

    fn replay(&mut self) -> Result<(), TestCaseError> {
        let got = self.store().replay(&sources(), None).or_fail()?;
        prop_assert!(got.not_found.is_empty() && got.rejected.is_empty());
        let (mut replayed, mut superseded) = (0, 0);
        for customer in 0..CUSTOMERS {
            let Some(ModelFailure::Dead { body: version, .. }) = self.lanes[customer].failure
            else {
                continue;
            };
            let serial = self.serial();
            let lane = &mut self.lanes[customer];
            lane.failure = None;
            if !lane.jobs.is_empty() {
                superseded += 1;
                continue;
            }
            prop_assert_eq!(
                lane.latest,
                Some(version),
                "replay of c{} would send an older body than the latest decided",
                customer
            );
            replayed += 1;
            lane.jobs.push_back(ModelJob {
                serial,
                body: version,
                state: JobState::Queued,
                single_only: false,
                due: 0,
                attempts: 0,
                key: None,
            });
        }
        prop_assert_eq!(
            (got.replayed, got.superseded),
            (replayed, superseded),
            "replay: (replayed, superseded)"
        );
        Ok(())
    }

    /// Compares everything the store shows with the model, after every operation.
    fn check(&self) -> Result<(), TestCaseError> {
        let store = self.store();
        let jobs: usize = self.lanes.iter().map(|lane| lane.jobs.len()).sum();
        prop_assert_eq!(
            store.outstanding(&sources()).or_fail()?,
            jobs as u64,
            "invariant 2: a job may leave the outbox only through finish"
        );
        let filter = ClaimFilter {
            sources: sources(),
            batch_size: 1,
            ..ClaimFilter::default()
        };
        prop_assert_eq!(
            store.next_due(&filter).or_fail()?,
            self.model_next_due(),
            "next_due"
        );
        let mut busy = HashSet::new();
        for job in self.inflight.iter().flat_map(Unit::jobs) {
            prop_assert!(
                busy.insert(job.external_id.as_str()),
                "invariant 4: {} is in two in-flight units",
                job.external_id
            );
        }
        for (customer, lane) in self.lanes.iter().enumerate() {
            let got = store.lane(SOURCE, &external_id(customer)).or_fail()?;
            let Some(got) = got else {
                prop_assert!(!lane.seen, "c{} has no customers row", customer);
                continue;
            };
            let hash = |version: Option<u8>| version.map(|v| body_hash(&body(customer, v)));
            prop_assert_eq!(
                got.latest_hash,
                hash(lane.latest),
                "c{} latest decided body (model v{:?})",
                customer,
                lane.latest
            );
            prop_assert_eq!(got.synced_hash, hash(lane.synced), "c{} synced", customer);
            prop_assert_eq!(
                got.synced_body,
                lane.synced.map(|v| body(customer, v)),
                "c{} synced body",
                customer
            );
        }
        self.check_failures(store)?;
        self.check_bodies()?;
        prop_assert_eq!(
            store.cursor(SOURCE).or_fail()?,
            self.cursor.clone(),
            "invariant 1"
        );
        for (customer, lane) in self.lanes.iter().enumerate() {
            if lane.last_poll == Some(Item::Reject) {
                prop_assert_eq!(
                    lane.failure,
                    Some(ModelFailure::Rejected),
                    "invariant 6: c{} was last polled as a rejection, failures must say so",
                    customer
                );
            }
            prop_assert!(
                lane.latest.is_none()
                    || lane.synced == lane.latest
                    || !lane.jobs.is_empty()
                    || lane.failure.is_some(),
                "invariant 6: c{} latest body v{:?} is neither synced (v{:?}), queued, nor in failures",
                customer,
                lane.latest,
                lane.synced
            );
        }
        Ok(())
    }

    fn check_failures(&self, store: &Store) -> Result<(), TestCaseError> {
        let mut got = BTreeMap::new();
        for failure in store.failures(None).or_fail()? {
            prop_assert_eq!(failure.source.as_str(), SOURCE);
            prop_assert!(
                got.insert(
                    failure.external_id.clone(),
                    (failure.kind, failure.attempts)
                )
                .is_none(),
                "invariant 6: two failure rows for {}",
                failure.external_id
            );
        }
        let want: BTreeMap<String, (FailureKind, u32)> = self
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(customer, lane)| {
                let row = match lane.failure? {
                    ModelFailure::Rejected => (FailureKind::Rejected, 0),
                    ModelFailure::Dead { attempts, .. } => (FailureKind::DeadLetter, attempts),
                };
                Some((external_id(customer), row))
            })
            .collect();
        prop_assert_eq!(got, want, "invariant 6: failures (kind, attempts)");
        Ok(())
    }

    /// Schema 11 keeps each body once, in `bodies`: every row there belongs to exactly one
    /// queued job or one customer's synced body, and every queued job's body is there. An
    /// orphan is space a long-running daemon would never get back; a shared row would be freed
    /// under its other owner.
    fn check_bodies(&self) -> Result<(), TestCaseError> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .or_fail()?;
        let count = |sql: &str| -> Result<i64, TestCaseError> {
            conn.query_row(sql, [], |row| row.get(0)).or_fail()
        };
        prop_assert_eq!(
            count(
                "SELECT COUNT(*) FROM bodies WHERE id NOT IN
                     (SELECT body_id FROM outbox WHERE body_id IS NOT NULL UNION ALL
                      SELECT synced_body_id FROM customers WHERE synced_body_id IS NOT NULL)"
            )?,
            0,
            "bodies no job or customer points at"
        );
        prop_assert_eq!(
            count(
                "SELECT COUNT(*) FROM outbox o
                  WHERE NOT EXISTS (SELECT 1 FROM bodies b WHERE b.id = o.body_id)"
            )?,
            0,
            "queued jobs without their body"
        );
        prop_assert_eq!(
            count(
                "SELECT (SELECT COUNT(*) FROM outbox) + (SELECT COUNT(synced_body_id) FROM customers)
                      - (SELECT COUNT(DISTINCT id) FROM
                          (SELECT body_id AS id FROM outbox UNION ALL
                           SELECT synced_body_id FROM customers WHERE synced_body_id IS NOT NULL))"
            )?,
            0,
            "a body row with two owners"
        );
        Ok(())
    }

    /// What `status` and `failures` see through their own read-only connection.
    fn check_read_only(&self) -> Result<(), TestCaseError> {
        let reader = Store::open_read_only(&self.path)
            .or_fail()?
            .ok_or_else(|| TestCaseError::fail("the state file vanished"))?;
        self.check_failures(&reader)?;
        prop_assert_eq!(
            reader.outstanding(&sources()).or_fail()?,
            self.store().outstanding(&sources()).or_fail()?
        );
        for customer in 0..CUSTOMERS {
            let id = external_id(customer);
            prop_assert_eq!(
                reader.lane(SOURCE, &id).or_fail()?,
                self.store().lane(SOURCE, &id).or_fail()?
            );
        }
        Ok(())
    }

    /// The worker drains the outbox with every answer a success; then every customer's synced
    /// body is the last body polled for it (property 5).
    fn drain(&mut self) -> Result<(), TestCaseError> {
        while !self.inflight.is_empty() {
            self.finish(0, None)?;
            self.check()?;
        }
        for _ in 0..=4 * CUSTOMERS + 8 {
            self.claim(3)?;
            if self.inflight.is_empty() {
                break;
            }
            self.finish(0, None)?;
            self.check()?;
        }
        prop_assert_eq!(
            self.store().outstanding(&sources()).or_fail()?,
            0,
            "the outbox drains"
        );
        self.check_read_only()?;
        for (customer, lane) in self.lanes.iter().enumerate() {
            let Some(Item::Body(version)) = lane.last_poll else {
                continue;
            };
            if matches!(lane.failure, Some(ModelFailure::Dead { .. })) {
                continue;
            }
            let synced = self
                .store()
                .lane(SOURCE, &external_id(customer))
                .or_fail()?
                .and_then(|lane| lane.synced_body);
            prop_assert!(
                synced.as_deref() == Some(body(customer, version).as_slice()),
                "eventual delivery: c{} was last polled as v{} but RevKeen holds {:?}",
                customer,
                version,
                synced.map(|b| String::from_utf8_lossy(&b).into_owned())
            );
        }
        Ok(())
    }
}

/// Replays `ops` against the store and the model, then drains the outbox.
fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new()?;
    harness.check()?;
    for (step, op) in ops.iter().enumerate() {
        harness
            .apply(op)
            .and_then(|()| harness.check())
            .map_err(|e| TestCaseError::fail(format!("after op #{step} {op:?}: {e}")))?;
    }
    harness
        .drain()
        .map_err(|e| TestCaseError::fail(format!("while draining at the end: {e}")))
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        5 => (0..BODIES).prop_map(Item::Body),
        1 => Just(Item::Reject),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let unit = 0usize..4;
    prop_oneof![
        6 => (proptest::collection::vec((0..CUSTOMERS, item()), 1..=4), any::<bool>())
            .prop_map(|(items, pass_complete)| Op::Poll { items, pass_complete }),
        5 => (1usize..=4).prop_map(|batch_size| Op::Claim { batch_size }),
        3 => unit.clone().prop_map(Op::Ack),
        2 => (unit.clone(), any::<u8>()).prop_map(|(unit, mask)| Op::DeadLetter { unit, mask }),
        2 => (unit.clone(), 0u8..3, any::<bool>())
            .prop_map(|(unit, delay, counted)| Op::Retry { unit, delay, counted }),
        1 => unit.clone().prop_map(Op::Release),
        1 => unit.prop_map(Op::SplitBatch),
        1 => Just(Op::ResetAttempts),
        1 => Just(Op::Crash),
        1 => Just(Op::Replay),
    ]
}

fn config() -> ProptestConfig {
    // `ProptestConfig::default()` reads PROPTEST_CASES; without it, keep `cargo test` quick.
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(64)
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn outbox_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}

fn poll(items: &[(usize, Item)]) -> Op {
    Op::Poll {
        items: items.to_vec(),
        pass_complete: false,
    }
}

/// Found by this model (then a store bug): a dead letter vanished when a rejection of the
/// record was resolved by the very body that had been dead-lettered. A rejection now clears the
/// latest hash, so the body is queued again.
fn dead_letter_vanishes() -> Vec<Op> {
    vec![
        poll(&[(0, Item::Body(0))]),
        Op::Claim { batch_size: 1 },
        // RevKeen refuses v0: failures shows c0 as a dead letter, as it should.
        Op::DeadLetter { unit: 0, mask: 0 },
        // The record loses its email: the rejection replaces the dead-letter row (body and all).
        poll(&[(0, Item::Reject)]),
        // The email comes back, same body as the dead letter: it must be queued again (it was
        // once reported "unchanged" and silently dropped).
        poll(&[(0, Item::Body(0))]),
    ]
}

/// Found by this model (then a store bug): a rejection vanished when a dead letter of an older
/// version overwrote it and a newer version was then delivered. The rejection now drops the
/// waiting version and is never overwritten by an older version's dead letter.
fn rejection_vanishes() -> Vec<Op> {
    vec![
        poll(&[(0, Item::Body(0))]),
        Op::Claim { batch_size: 1 },
        // v1 waits behind the in-flight v0.
        poll(&[(0, Item::Body(1))]),
        // The record loses its email: failures shows c0 as rejected.
        poll(&[(0, Item::Reject)]),
        // RevKeen refuses v0: the rejection, the record's current problem, stays.
        Op::DeadLetter { unit: 0, mask: 0 },
        Op::Claim { batch_size: 1 },
        // v1 was dropped with the rejection: nothing is left to send, and failures still
        // shows the rejection (an incremental source does not list the record again until
        // it changes).
        Op::Ack(0),
    ]
}

#[test]
fn a_dead_letter_survives_a_rejection_and_its_body_is_sent_again() {
    run(&dead_letter_vanishes()).unwrap();
}

#[test]
fn a_rejection_is_not_hidden_by_an_older_versions_dead_letter() {
    run(&rejection_vanishes()).unwrap();
}
