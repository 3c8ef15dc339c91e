//! The lock workload and its checker: the lost-update test, as Jepsen ran it
//! against etcd's locks, with fenced writes.
//!
//! Lock clients loop: grant a lease (the minimum TTL, never kept alive, so a
//! long critical section outlives it), enter the lock (`chorus_core::lock`), wait
//! until no earlier contender is left, read the counter, pause (sometimes longer
//! than the TTL, as a process paused by the OS or a GC would), write the counter
//! plus one fenced with their token, and leave. Every request goes through the log.
//!
//! Checked:
//! - **no lost update**: in the converged history of the counter, every write is
//!   the value before it plus one, and every acknowledged increment is there;
//! - **tokens**: no two clients ever held the same token, and an acquisition
//!   asked for after another was answered has a greater token (real-time order:
//!   answers of one order may arrive out of order, from members that apply later);
//! - **fences**: accepted fenced writes come in non-decreasing token order (no
//!   write accepted from a superseded token).
//!
//! With [`crate::Bug::UnfencedLock`] the clients write without a fence, and the
//! lost-update check must catch the stale writes of paused holders.

use chorus_core::lock;
use chorus_core::mvcc::{ChangeKind, MvccStore};
use chorus_core::node::OpResponse;
use chorus_core::KvError;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::{fenced_write, Fence, FencedWrite};
use chorus_proto::etcdserverpb::{
    request_op, response_op, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub const LOCK_NAME: &[u8] = b"key/lockw";
pub const COUNTER_KEY: &[u8] = b"key/lockw-counter";
/// Lease TTL of every acquisition (the minimum; never renewed).
pub const LOCK_TTL_S: i64 = 5;

/// The answer to one of a lock client's proposals.
#[derive(Debug, Clone)]
pub enum LockResult {
    Applied(Result<OpResponse, KvError>),
    /// Definitely not applied (no leader, node down).
    Failed,
    /// May or may not have been applied (leader changed, timed out).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Grant,
    Enter,
    Wait,
    ReadCounter,
    /// Read the counter; writes it plus one after the pause.
    Write(i64),
    Release,
}

#[derive(Debug)]
pub struct LockClient {
    pub index: usize,
    pub step: Step,
    pub lease: i64,
    pub token: i64,
    pub request_in_flight: Option<u64>,
    pub stopped: bool,
    pub fenced: bool,
    /// When the request in flight was sent.
    pub sent_us: u64,
    /// (token, request sent, answer received) of every acquisition this client
    /// believed it made.
    pub acquisitions: Vec<(i64, u64, u64)>,
    /// (token, mod revision, value) of every acknowledged increment.
    pub acked: Vec<(i64, i64, i64)>,
    pub stale_rejections: u64,
    next_lease: i64,
}

impl LockClient {
    pub fn new(index: usize, fenced: bool, lease_base: i64) -> LockClient {
        LockClient {
            index,
            step: Step::Grant,
            lease: 0,
            token: 0,
            request_in_flight: None,
            stopped: false,
            fenced,
            sent_us: 0,
            acquisitions: Vec::new(),
            acked: Vec::new(),
            stale_rejections: 0,
            next_lease: lease_base,
        }
    }

    /// The proposal for the current step.
    pub fn op(&mut self) -> Op {
        match self.step {
            Step::Grant => {
                self.next_lease += 1;
                self.lease = self.next_lease;
                Op::LeaseGrant(LeaseGrantRequest { ttl: LOCK_TTL_S, id: self.lease })
            }
            Step::Enter => Op::Txn(lock::enter_txn(LOCK_NAME, self.lease, Vec::new())),
            Step::Wait => Op::Txn(reads(vec![
                lock::predecessor_request(LOCK_NAME, self.token),
                RangeRequest { key: lock::contender_key(LOCK_NAME, self.lease), ..Default::default() },
            ])),
            Step::ReadCounter => {
                Op::Txn(reads(vec![RangeRequest { key: COUNTER_KEY.to_vec(), ..Default::default() }]))
            }
            Step::Write(value) => {
                let put = PutRequest {
                    key: COUNTER_KEY.to_vec(),
                    value: (value + 1).to_string().into_bytes(),
                    ..Default::default()
                };
                if self.fenced {
                    Op::Fenced(FencedWrite {
                        fence: Some(Fence { lock: LOCK_NAME.to_vec(), token: self.token }),
                        write: Some(fenced_write::Write::Put(put)),
                    })
                } else {
                    Op::Put(put)
                }
            }
            Step::Release => Op::Txn(lock::leave_txn(lock::contender_key(LOCK_NAME, self.lease), self.token)),
        }
    }

    /// Takes an answer; returns the pause before the next step, in microseconds,
    /// given `long_pause_us` to use if this is the critical section's pause.
    pub fn answer(&mut self, result: LockResult, now_us: u64, pause_us: u64) -> u64 {
        let response = match result {
            LockResult::Applied(Ok(response)) => response,
            LockResult::Applied(Err(KvError::FenceStale { .. })) => {
                self.stale_rejections += 1;
                self.step = Step::Release;
                return 1_000;
            }
            LockResult::Applied(Err(_)) | LockResult::Failed => {
                // Nothing happened (e.g. the lease expired under an Enter): go on
                // from a fresh lease unless the step is a plain retry.
                if matches!(self.step, Step::Enter) {
                    self.step = Step::Grant;
                }
                return 100_000;
            }
            LockResult::Unknown => {
                // Start over: whatever happened, a fresh lease and key are safe.
                self.step = if self.token > 0 { Step::Release } else { Step::Grant };
                return 100_000;
            }
        };
        match (self.step, response) {
            (Step::Grant, _) => self.step = Step::Enter,
            (Step::Enter, OpResponse::Txn(txn)) => match lock::read_entered(&txn) {
                Some(entered) => {
                    self.token = entered.own.create_revision;
                    if entered.holds() {
                        self.acquired(now_us);
                    } else {
                        self.step = Step::Wait;
                    }
                }
                None => self.step = Step::Grant,
            },
            (Step::Wait, OpResponse::Txn(txn)) => {
                let ranges = range_kvs(&txn);
                let own_alive =
                    ranges.get(1).is_some_and(|kvs| kvs.iter().any(|kv| kv.create_revision == self.token));
                if !own_alive {
                    self.token = 0;
                    self.step = Step::Grant;
                } else if ranges.first().is_some_and(|kvs| kvs.is_empty()) {
                    self.acquired(now_us);
                } else {
                    return 200_000;
                }
            }
            (Step::ReadCounter, OpResponse::Txn(txn)) => {
                let value = range_kvs(&txn)
                    .first()
                    .and_then(|kvs| kvs.first())
                    .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
                    .unwrap_or(0);
                self.step = Step::Write(value);
                return pause_us;
            }
            (Step::Write(value), OpResponse::Put(put)) => {
                let revision = put.header.map_or(0, |h| h.revision);
                self.acked.push((self.token, revision, value + 1));
                self.step = Step::Release;
            }
            (Step::Release, _) => {
                self.token = 0;
                self.step = Step::Grant;
                return 50_000;
            }
            (step, response) => {
                panic!("lock client {}: unexpected answer {response:?} at {step:?}", self.index)
            }
        }
        1_000
    }

    fn acquired(&mut self, now_us: u64) {
        self.acquisitions.push((self.token, self.sent_us, now_us));
        self.step = Step::ReadCounter;
    }
}

fn reads(ranges: Vec<RangeRequest>) -> TxnRequest {
    let success = ranges
        .into_iter()
        .map(|r| RequestOp { request: Some(request_op::Request::RequestRange(r)) })
        .collect();
    TxnRequest { compare: Vec::new(), success, failure: Vec::new() }
}

fn range_kvs(txn: &chorus_proto::etcdserverpb::TxnResponse) -> Vec<Vec<chorus_proto::mvccpb::KeyValue>> {
    txn.responses
        .iter()
        .filter_map(|op| match &op.response {
            Some(response_op::Response::ResponseRange(range)) => Some(range.kvs.clone()),
            _ => None,
        })
        .collect()
}

/// Checks the converged store against what the lock clients did.
pub fn check(clients: &[LockClient], store: &MvccStore) -> Vec<String> {
    let mut violations = Vec::new();
    let (events, _) = store.events(COUNTER_KEY, &[], 1, usize::MAX).expect("the simulator never compacts");
    let mut previous = 0i64;
    let mut history = std::collections::BTreeMap::new();
    for event in events.iter().filter(|e| e.kind == ChangeKind::Put) {
        let value: i64 = std::str::from_utf8(&event.kv.value).ok().and_then(|v| v.parse().ok()).unwrap_or(-1);
        if value != previous + 1 {
            violations.push(format!(
                "lost update: the counter went from {previous} to {value} at revision {}",
                event.kv.mod_revision
            ));
        }
        history.insert(event.kv.mod_revision, value);
        previous = value;
    }
    let mut fenced_writes = Vec::new();
    let mut tokens = std::collections::BTreeMap::new();
    let mut acquisitions = Vec::new();
    for client in clients {
        for &(token, revision, value) in &client.acked {
            if history.get(&revision) != Some(&value) {
                violations.push(format!(
                    "acknowledged increment to {value} at revision {revision} is not in the counter's history"
                ));
            }
            if client.fenced {
                fenced_writes.push((revision, token));
            }
        }
        for &(token, sent, answered) in &client.acquisitions {
            if let Some(other) = tokens.insert(token, client.index) {
                if other != client.index {
                    violations
                        .push(format!("token {token} was held by clients {other} and {}", client.index));
                }
            }
            acquisitions.push((token, sent, answered));
        }
    }
    for &(token, sent, answered) in &acquisitions {
        // An earlier acquisition, answered before this one was asked for, with a
        // token at least as great.
        if let Some(&(before, _, before_at)) =
            acquisitions.iter().filter(|a| a.2 < sent && a.0 >= token).min_by_key(|a| a.2)
        {
            violations.push(format!(
                "token {token} acquired by a request sent at {sent} us (answered at {answered} us), \
                 after token {before} was acquired at {before_at} us"
            ));
        }
    }
    fenced_writes.sort();
    for pair in fenced_writes.windows(2) {
        if pair[1].1 < pair[0].1 {
            violations.push(format!(
                "fenced write with token {} accepted at revision {} after token {} wrote at revision {}",
                pair[1].1, pair[1].0, pair[0].1, pair[0].0
            ));
        }
    }
    violations
}
