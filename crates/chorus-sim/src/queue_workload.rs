//! The queue workload and its checker.
//!
//! Producers enqueue messages with unique ids; consumers grant a lease (the
//! minimum TTL, never kept alive, so leases run out and claims come back), dequeue
//! with chorus-core's [`Dequeue`], and then ack at once, ack late (often after
//! their lease ended: the ack must be refused), nack, or walk away.
//!
//! Checked against the converged store:
//! - **none lost**: every enqueue acknowledged to its producer is still in the
//!   queue or its dead-letter queue, or an ack of it was accepted (or has an
//!   unknown outcome);
//! - **no stale ack**: an accepted ack deleted the very claim whose token it
//!   carried (the claim key created at the token revision was still there);
//! - **dead letters**: no delivery beyond `max_deliveries`, and every dead letter
//!   was delivered `max_deliveries` times first.

use std::collections::{BTreeMap, BTreeSet};

use chorus_core::mvcc::{ChangeKind, MvccStore};
use chorus_core::node::OpResponse;
use chorus_core::queue::{self, Action, Dequeue};
use chorus_core::KvError;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::QueueMessage;
use chorus_proto::etcdserverpb::LeaseGrantRequest;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::coord_workload::{read_result, read_txn, CoordResult, Want};

/// The queue every producer and consumer uses.
pub const QUEUE: &str = "work";
/// Deliveries before a message is dead-lettered (small, so it happens).
pub const MAX_DELIVERIES: u32 = 3;
/// The consumers' lease TTL: the minimum, and never kept alive.
const LEASE_TTL_S: i64 = 5;
/// A consumer stops using a lease this long after it was granted.
const LEASE_USE_US: u64 = 3_500_000;
/// How long a consumer sleeps when the queue is empty.
const EMPTY_SLEEP_US: u64 = 200_000;

/// One producer.
#[derive(Debug)]
pub struct Producer {
    index: u64,
    sent: u64,
    total: u64,
    ready_at_us: u64,
    in_flight: Option<u64>,
    /// Enqueues acknowledged as committed.
    pub acknowledged: Vec<u64>,
}

impl Producer {
    pub fn new(index: u64, total: u64, start_us: u64) -> Producer {
        Producer { index, sent: 0, total, ready_at_us: start_us, in_flight: None, acknowledged: Vec::new() }
    }

    pub fn next(&mut self, now_us: u64, _rng: &mut ChaCha8Rng) -> Want {
        if self.sent >= self.total {
            return Want::Done;
        }
        if now_us < self.ready_at_us {
            return Want::Sleep(self.ready_at_us - now_us);
        }
        let id = ((self.index + 1) << 32) | self.sent;
        self.in_flight = Some(id);
        Want::Propose(Op::Txn(queue::enqueue_txn(QUEUE, id, id.to_be_bytes().to_vec())))
    }

    pub fn answer(&mut self, result: CoordResult, now_us: u64, rng: &mut ChaCha8Rng) {
        let Some(id) = self.in_flight.take() else { return };
        if let CoordResult::Done(OpResponse::Txn(response)) = result {
            if queue::interpret_enqueue(&response).is_some() {
                self.acknowledged.push(id);
            }
        }
        // Failed: not enqueued; Unknown: maybe (not promised, so not checked).
        self.sent += 1;
        self.ready_at_us = now_us + rng.random_range(10_000..300_000);
    }
}

/// What a consumer does with a claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ack,
    Nack,
}

#[derive(Debug)]
enum State {
    NeedLease,
    Granting(i64),
    Dequeuing { dequeue: Dequeue, pending: Action, reading: bool },
    Holding { message: QueueMessage, fate: Fate, until_us: u64 },
    Settling { message: QueueMessage, fate: Fate },
}

/// An ack or nack the cluster accepted.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub id: u64,
    pub token: i64,
    pub revision: i64,
    pub ack: bool,
}

/// One consumer.
#[derive(Debug)]
pub struct Consumer {
    state: State,
    lease: i64,
    lease_granted_us: u64,
    /// With the deliberate bug on: acks do not compare the claim token.
    ack_without_token: bool,
    pub deliveries: Vec<QueueMessage>,
    pub settled: Vec<Settled>,
    /// Acks whose outcome is unknown (the message may be gone).
    pub maybe_acked: BTreeSet<u64>,
    pub stale_refused: u64,
    pub problems: Vec<String>,
}

impl Consumer {
    pub fn new(ack_without_token: bool) -> Consumer {
        Consumer {
            state: State::NeedLease,
            lease: 0,
            lease_granted_us: 0,
            ack_without_token,
            deliveries: Vec::new(),
            settled: Vec::new(),
            maybe_acked: BTreeSet::new(),
            stale_refused: 0,
            problems: Vec::new(),
        }
    }

    /// The message of an ack sent and not answered yet.
    pub fn ack_in_flight(&self) -> Option<u64> {
        match &self.state {
            State::Settling { message, fate: Fate::Ack } => Some(message.id),
            _ => None,
        }
    }

    fn start_dequeue(&mut self, now_us: u64) {
        if now_us >= self.lease_granted_us + LEASE_USE_US {
            self.state = State::NeedLease;
            return;
        }
        let mut dequeue = Dequeue::new(QUEUE, self.lease, MAX_DELIVERIES).expect("valid dequeue");
        let pending = dequeue.start();
        self.state = State::Dequeuing { dequeue, pending, reading: false };
    }

    pub fn next(&mut self, now_us: u64, rng: &mut ChaCha8Rng) -> Want {
        match &mut self.state {
            State::NeedLease => {
                let id = rng.random_range(1..i64::MAX);
                self.state = State::Granting(id);
                Want::Propose(Op::LeaseGrant(LeaseGrantRequest { ttl: LEASE_TTL_S, id }))
            }
            State::Granting(_) => Want::Sleep(100_000),
            State::Dequeuing { dequeue, pending, reading } => match pending.clone() {
                Action::Read(range) => {
                    *reading = true;
                    Want::Propose(read_txn(range))
                }
                Action::Write(txn) => {
                    *reading = false;
                    Want::Propose(Op::Txn(txn))
                }
                Action::Wait { .. } => {
                    *pending = dequeue.start();
                    if now_us >= self.lease_granted_us + LEASE_USE_US {
                        self.state = State::NeedLease;
                    }
                    Want::Sleep(EMPTY_SLEEP_US)
                }
                Action::Claimed(_) => unreachable!("handled when answered"),
            },
            State::Holding { message, fate, until_us } => {
                if now_us < *until_us {
                    return Want::Sleep(*until_us - now_us);
                }
                let (message, fate) = (message.clone(), *fate);
                let mut txn = queue::settle_txn(QUEUE, message.id, message.claim_token, fate == Fate::Ack);
                if self.ack_without_token {
                    // The deliberate bug: the claim token is not checked.
                    txn.compare.clear();
                }
                self.state = State::Settling { message, fate };
                Want::Propose(Op::Txn(txn))
            }
            State::Settling { .. } => Want::Sleep(100_000),
        }
    }

    pub fn answer(&mut self, result: CoordResult, now_us: u64, rng: &mut ChaCha8Rng) {
        match std::mem::replace(&mut self.state, State::NeedLease) {
            State::NeedLease | State::Holding { .. } => {}
            State::Granting(id) => {
                if let CoordResult::Done(_) = result {
                    self.lease = id;
                    self.lease_granted_us = now_us;
                    self.start_dequeue(now_us);
                }
            }
            State::Dequeuing { mut dequeue, reading, .. } => {
                let pending = match result {
                    CoordResult::Done(OpResponse::Txn(response)) if reading => match read_result(response) {
                        Some(range) => dequeue.on_range(range),
                        None => dequeue.start(),
                    },
                    CoordResult::Done(OpResponse::Txn(response)) => dequeue.on_txn(response),
                    // The lease ran out: grant another.
                    CoordResult::Rejected(KvError::LeaseNotFound) => return,
                    // The NOSPACE alarm is raised: try again (nothing was written).
                    CoordResult::Rejected(KvError::NoSpace) => dequeue.start(),
                    CoordResult::Rejected(error) => {
                        self.problems.push(format!("a dequeue step was refused: {error}"));
                        return;
                    }
                    _ => dequeue.start(),
                };
                if let Action::Claimed(message) = pending {
                    if message.deliveries > MAX_DELIVERIES {
                        self.problems.push(format!(
                            "message {:x} delivered {} times (at most {MAX_DELIVERIES})",
                            message.id, message.deliveries
                        ));
                    }
                    self.deliveries.push(message.clone());
                    let roll = rng.random_range(0..100);
                    let (fate, delay) = match roll {
                        0..60 => (Fate::Ack, rng.random_range(0..500_000)),
                        // Late: usually after the lease ended, so the ack must be refused.
                        60..75 => (Fate::Ack, rng.random_range(3_000_000..8_000_000)),
                        75..90 => (Fate::Nack, rng.random_range(0..500_000)),
                        // Walk away: the claim returns when the lease ends.
                        _ => {
                            self.state = State::NeedLease;
                            return;
                        }
                    };
                    self.state = State::Holding { message, fate, until_us: now_us + delay };
                } else {
                    self.state = State::Dequeuing { dequeue, pending, reading: false };
                }
            }
            State::Settling { message, fate } => {
                match result {
                    CoordResult::Done(OpResponse::Txn(response)) => {
                        match queue::interpret_settle(QUEUE, message.id, message.claim_token, &response) {
                            Ok(revision) => self.settled.push(Settled {
                                id: message.id,
                                token: message.claim_token,
                                revision,
                                ack: fate == Fate::Ack,
                            }),
                            Err(_) => self.stale_refused += 1,
                        }
                    }
                    CoordResult::Unknown if fate == Fate::Ack => {
                        self.maybe_acked.insert(message.id);
                    }
                    _ => {}
                }
                self.start_dequeue(now_us);
            }
        }
    }
}

/// Checks the consumers' and producers' records against the converged store.
pub fn check(producers: &[&Producer], consumers: &[&Consumer], store: &MvccStore) -> Vec<String> {
    let mut violations = Vec::new();
    for consumer in consumers {
        violations.extend(consumer.problems.iter().map(|p| format!("queue consumer: {p}")));
    }
    let (start, end) = (b"\x00chorus/queue/".to_vec(), b"\x00chorus/queue0".to_vec());
    let (events, _) = store.events(&start, &end, 1, usize::MAX).expect("the simulator never compacts");
    // Claim keys: (key, create revision) -> the revision it was deleted at.
    let mut claim_deleted: BTreeMap<(Vec<u8>, i64), i64> = BTreeMap::new();
    let mut claim_created: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    // Message keys of the queue: the highest version each reached.
    let mut message_version: BTreeMap<u64, i64> = BTreeMap::new();
    let dead_prefix = queue::message_key(&queue::dead_letter_name(QUEUE), 0);
    let dead_prefix = &dead_prefix[..dead_prefix.len() - 16];
    let mut dead_ids = BTreeSet::new();
    for event in &events {
        let key = &event.kv.key;
        let id = std::str::from_utf8(&key[key.len().saturating_sub(16)..])
            .ok()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        let Some(id) = id else { continue };
        if *key == queue::claim_key(QUEUE, id) {
            match event.kind {
                ChangeKind::Put => {
                    claim_created.insert(key.clone(), event.kv.create_revision);
                }
                ChangeKind::Delete => {
                    if let Some(created) = claim_created.remove(key) {
                        claim_deleted.insert((key.clone(), created), event.kv.mod_revision);
                    }
                }
            }
        } else if *key == queue::message_key(QUEUE, id) && event.kind == ChangeKind::Put {
            let version = message_version.entry(id).or_default();
            *version = (*version).max(event.kv.version);
        } else if key.starts_with(dead_prefix) && event.kind == ChangeKind::Put {
            dead_ids.insert(id);
        }
    }
    // No stale ack: the claim created at the token revision was deleted by the ack itself.
    let mut acked = BTreeSet::new();
    for consumer in consumers {
        for settled in &consumer.settled {
            if settled.ack {
                acked.insert(settled.id);
            }
            let claim = (queue::claim_key(QUEUE, settled.id), settled.token);
            let deleted_at = claim_deleted.get(&claim).copied();
            if deleted_at != Some(settled.revision) {
                violations.push(format!(
                    "queue: {} of message {:x} with claim token {} was accepted at revision {}, but that \
                     claim {}",
                    if settled.ack { "ack" } else { "nack" },
                    settled.id,
                    settled.token,
                    settled.revision,
                    match deleted_at {
                        Some(at) => format!("had already ended at revision {at}"),
                        None => "was never released".to_string(),
                    }
                ));
            }
        }
    }
    // Dead letters were delivered MAX_DELIVERIES times first.
    for id in &dead_ids {
        let version = message_version.get(id).copied().unwrap_or(0);
        if version < MAX_DELIVERIES as i64 + 1 {
            violations.push(format!(
                "queue: message {id:x} was dead-lettered after {} deliveries (max {MAX_DELIVERIES})",
                version - 1
            ));
        }
    }
    // None lost.
    let present = |queue_name: &str, id: u64| {
        let key = queue::message_key(queue_name, id);
        store
            .range(&chorus_proto::etcdserverpb::RangeRequest { key, ..Default::default() })
            .is_ok_and(|r| r.count > 0)
    };
    // Acks with an unknown outcome, and acks still unanswered when the run ended.
    let maybe_acked: BTreeSet<u64> =
        consumers.iter().flat_map(|c| c.maybe_acked.iter().copied().chain(c.ack_in_flight())).collect();
    for producer in producers {
        for id in &producer.acknowledged {
            let accounted = acked.contains(id)
                || maybe_acked.contains(id)
                || present(QUEUE, *id)
                || present(&queue::dead_letter_name(QUEUE), *id);
            if !accounted {
                violations.push(format!("queue: acknowledged enqueue of message {id:x} was lost"));
            }
        }
    }
    violations
}
