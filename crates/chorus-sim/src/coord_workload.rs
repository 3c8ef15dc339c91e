//! What the queue and barrier workloads share: how their clients talk to the
//! world. A coordination client runs chorus-core's pure queue and barrier logic
//! (`chorus_core::queue`, `chorus_core::barrier`), the same the server runs; the
//! world proposes what it asks for through a random member and answers with the
//! applied response, a definite failure, or an unknown outcome.
//!
//! Reads are proposed as read-only txns (a `success` branch with one range): as
//! linearizable as the server's read-index reads, with less world bookkeeping.

use chorus_core::node::OpResponse;
use chorus_core::KvError;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::{
    request_op, response_op, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use rand_chacha::ChaCha8Rng;

use crate::barrier_workload::Participant;
use crate::queue_workload::{Consumer, Producer};

/// How a coordination client's request ended.
#[derive(Debug, Clone)]
pub enum CoordResult {
    Done(OpResponse),
    /// Applied and refused (e.g. the lease is gone): nothing changed.
    Rejected(KvError),
    /// Definitely not applied (no leader, member down).
    Failed,
    /// May or may not have been applied.
    Unknown,
}

/// What a client wants next.
#[derive(Debug, Clone)]
pub enum Want {
    Propose(Op),
    Sleep(u64),
    Done,
}

/// A range as a read-only txn.
pub fn read_txn(request: RangeRequest) -> Op {
    Op::Txn(TxnRequest {
        compare: vec![],
        success: vec![RequestOp { request: Some(request_op::Request::RequestRange(request)) }],
        failure: vec![],
    })
}

/// The range a [`read_txn`] returned.
pub fn read_result(response: TxnResponse) -> Option<RangeResponse> {
    let mut range = match response.responses.into_iter().next()?.response? {
        response_op::Response::ResponseRange(range) => range,
        _ => return None,
    };
    range.header = response.header;
    Some(range)
}

/// One coordination client.
#[derive(Debug)]
pub enum CoordClient {
    Producer(Producer),
    Consumer(Consumer),
    Participant(Participant),
}

impl CoordClient {
    pub fn next(&mut self, now_us: u64, rng: &mut ChaCha8Rng) -> Want {
        match self {
            CoordClient::Producer(p) => p.next(now_us, rng),
            CoordClient::Consumer(c) => c.next(now_us, rng),
            CoordClient::Participant(p) => p.next(now_us, rng),
        }
    }

    pub fn answer(&mut self, result: CoordResult, now_us: u64, rng: &mut ChaCha8Rng) {
        match self {
            CoordClient::Producer(p) => p.answer(result, now_us, rng),
            CoordClient::Consumer(c) => c.answer(result, now_us, rng),
            CoordClient::Participant(p) => p.answer(result, now_us, rng),
        }
    }
}

/// The coordination clients of a run: producers and consumers of one queue, and
/// the participants of the barrier rounds.
pub fn clients(options: &crate::options::SimOptions, rng: &mut ChaCha8Rng) -> Vec<CoordClient> {
    use rand::Rng;
    let ack_without_token = options.bug == Some(crate::options::Bug::QueueAckWithoutToken);
    let mut clients = Vec::new();
    let producers = 1 + options.seed % 2;
    for p in 0..producers {
        let start_us = rng.random_range(0..2_000_000);
        clients.push(CoordClient::Producer(Producer::new(p, 40, start_us)));
    }
    for _ in 0..2 + options.seed % 2 {
        clients.push(CoordClient::Consumer(Consumer::new(ack_without_token)));
    }
    let participants = 3 + (options.seed % 2) as u32;
    for _ in 0..participants {
        let offset_us = rng.random_range(0..1_500_000);
        clients.push(CoordClient::Participant(Participant::new(participants - 1, offset_us)));
    }
    clients
}

/// Runs the queue and barrier checkers.
pub fn check(clients: &[&CoordClient], store: &chorus_core::mvcc::MvccStore) -> Vec<String> {
    let producers: Vec<&Producer> = clients
        .iter()
        .filter_map(|c| if let CoordClient::Producer(p) = c { Some(p) } else { None })
        .collect();
    let consumers: Vec<&Consumer> = clients
        .iter()
        .filter_map(|c| if let CoordClient::Consumer(c) = c { Some(c) } else { None })
        .collect();
    let participants: Vec<&Participant> = clients
        .iter()
        .filter_map(|c| if let CoordClient::Participant(p) = c { Some(p) } else { None })
        .collect();
    let mut violations = crate::queue_workload::check(&producers, &consumers, store);
    violations.extend(crate::barrier_workload::check(&participants, store));
    violations
}

/// Counts for a run's summary: (acknowledged enqueues, deliveries, accepted settles,
/// refused stale settles, barrier passes, barrier timeouts).
pub fn counts(clients: &[&CoordClient]) -> [u64; 6] {
    let mut counts = [0u64; 6];
    for client in clients {
        match client {
            CoordClient::Producer(p) => counts[0] += p.acknowledged.len() as u64,
            CoordClient::Consumer(c) => {
                counts[1] += c.deliveries.len() as u64;
                counts[2] += c.settled.len() as u64;
                counts[3] += c.stale_refused;
            }
            CoordClient::Participant(p) => {
                counts[4] += p.passes.len() as u64;
                counts[5] += p.timeouts as u64;
            }
        }
    }
    counts
}
