//! Queues over the replicated KV: request builders and response interpreters,
//! with no IO, run by the server (`chorus-server/src/api/queue.rs`) and by the
//! simulator alike. The key layout is in [`crate::coord`].
//!
//! - **Enqueue** puts `m/<id>` if absent (the id is chosen by the caller, at
//!   random). The message's place is its create revision: FIFO per queue.
//! - **Dequeue** ([`Dequeue`], a small state machine) reads the claims, then the
//!   oldest `claims + 1` messages (keys only), and claims the first unclaimed one
//!   with a txn that compares the message's version (so two consumers cannot both
//!   claim it, and the delivery count is exact) and the claim's absence, puts the
//!   claim under the consumer's lease, bumps the message's version
//!   (`ignore_value`) and reads the payload back. The claim token is the claim
//!   key's create revision: a later claim of the same message has a larger one.
//!   A message already delivered `max_deliveries` times is moved instead to
//!   `<queue>.dead-letter` (same id, same payload), an ordinary queue.
//! - **Ack** deletes message and claim, **Nack** the claim only, both if the
//!   claim's create revision still equals the token; otherwise the failure branch
//!   reads the current state, which the error names.
//! - When a consumer's lease ends, its claim key is deleted with it and the
//!   message is unclaimed again: at-least-once delivery.

use chorus_proto::chorus::v1::QueueMessage;
use chorus_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use chorus_proto::etcdserverpb::{
    response_op, PutRequest, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use chorus_proto::mvccpb::KeyValue;

use crate::coord::{
    compare_create, compare_version, delete_op, get_op, prefix_end, put_op, validate_name, CoordError,
    RESERVED_PREFIX,
};
use crate::limits::{
    COORD_NAME_BYTES_MAX, QUEUE_LENGTH_MAX, QUEUE_MAX_DELIVERIES_DEFAULT, QUEUE_MAX_DELIVERIES_MAX,
    QUEUE_PAYLOAD_BYTES_MAX,
};

/// Appended to a queue's name to name its dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead-letter";

/// The dead-letter queue of `queue`.
pub fn dead_letter_name(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_SUFFIX}")
}

/// Checks a queue name. A dead-letter queue's name may be longer than the limit
/// by its suffixes, so that every queue's dead letters can be read.
pub fn validate_queue(queue: &str) -> Result<(), CoordError> {
    let mut base = queue;
    while base.len() > COORD_NAME_BYTES_MAX {
        match base.strip_suffix(DEAD_LETTER_SUFFIX) {
            Some(stripped) if !stripped.is_empty() => base = stripped,
            _ => break,
        }
    }
    // The suffix has no '/' or NUL, so checking the base checks the whole name.
    validate_name("queue", base)
}

fn queue_prefix(queue: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"queue/");
    key.extend_from_slice(queue.as_bytes());
    key.push(b'/');
    key
}

fn messages_prefix(queue: &str) -> Vec<u8> {
    let mut key = queue_prefix(queue);
    key.extend_from_slice(b"m/");
    key
}

fn claims_prefix(queue: &str) -> Vec<u8> {
    let mut key = queue_prefix(queue);
    key.extend_from_slice(b"c/");
    key
}

/// The key of message `id` of `queue`.
pub fn message_key(queue: &str, id: u64) -> Vec<u8> {
    let mut key = messages_prefix(queue);
    key.extend_from_slice(format!("{id:016x}").as_bytes());
    key
}

/// The key of the claim on message `id` of `queue`.
pub fn claim_key(queue: &str, id: u64) -> Vec<u8> {
    let mut key = claims_prefix(queue);
    key.extend_from_slice(format!("{id:016x}").as_bytes());
    key
}

/// The range `[start, end)` of every key of `queue` (messages and claims): what a
/// blocked Dequeue watches.
pub fn watch_range(queue: &str) -> (Vec<u8>, Vec<u8>) {
    let prefix = queue_prefix(queue);
    let end = prefix_end(&prefix);
    (prefix, end)
}

fn id_of(key: &[u8]) -> Option<u64> {
    let hex = key.rsplit(|b| *b == b'/').next()?;
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Checks an enqueue before anything is read or proposed.
pub fn validate_enqueue(queue: &str, payload: &[u8]) -> Result<(), CoordError> {
    validate_queue(queue)?;
    if payload.len() > QUEUE_PAYLOAD_BYTES_MAX {
        return Err(CoordError::InvalidArgument(format!(
            "queue payload is too large ({} bytes, at most {QUEUE_PAYLOAD_BYTES_MAX})",
            payload.len()
        )));
    }
    Ok(())
}

/// Counts the messages of `queue` (claimed ones included).
pub fn length_request(queue: &str) -> RangeRequest {
    let prefix = messages_prefix(queue);
    RangeRequest { range_end: prefix_end(&prefix), key: prefix, count_only: true, ..Default::default() }
}

/// Refuses an enqueue into a full queue ([`QUEUE_LENGTH_MAX`]).
pub fn check_length(queue: &str, length: &RangeResponse) -> Result<(), CoordError> {
    if length.count as u64 >= QUEUE_LENGTH_MAX {
        return Err(CoordError::ResourceExhausted(format!(
            "queue {queue:?} is full ({} messages, at most {QUEUE_LENGTH_MAX})",
            length.count
        )));
    }
    Ok(())
}

/// Puts message `id` if no message has that id.
pub fn enqueue_txn(queue: &str, id: u64, payload: Vec<u8>) -> TxnRequest {
    let key = message_key(queue, id);
    TxnRequest {
        compare: vec![compare_create(key.clone(), 0)],
        success: vec![put_op(PutRequest { key, value: payload, ..Default::default() })],
        failure: vec![],
    }
}

/// The revision the message was committed at, or `None` if its id was taken
/// (choose another and try again).
pub fn interpret_enqueue(response: &TxnResponse) -> Option<i64> {
    response.succeeded.then(|| response.header.as_ref().map_or(0, |h| h.revision))
}

/// The claims of `queue`, keys only.
pub fn claims_request(queue: &str) -> RangeRequest {
    let prefix = claims_prefix(queue);
    RangeRequest { range_end: prefix_end(&prefix), key: prefix, keys_only: true, ..Default::default() }
}

/// The oldest `claimed + 1` messages of `queue`, keys only: at least one of them
/// is unclaimed if any message is.
pub fn candidates_request(queue: &str, claimed: usize) -> RangeRequest {
    let prefix = messages_prefix(queue);
    RangeRequest {
        range_end: prefix_end(&prefix),
        key: prefix,
        keys_only: true,
        sort_order: SortOrder::Ascend as i32,
        sort_target: SortTarget::Create as i32,
        limit: claimed as i64 + 1,
        ..Default::default()
    }
}

/// A message that looked unclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    /// The message key's version: deliveries so far plus one.
    pub version: i64,
    pub create_revision: i64,
}

impl Candidate {
    pub fn deliveries(&self) -> u32 {
        (self.version - 1).max(0) as u32
    }
}

/// The oldest message in `candidates` without a claim in `claims`.
pub fn next_unclaimed(candidates: &RangeResponse, claims: &RangeResponse) -> Option<Candidate> {
    let claimed: std::collections::BTreeSet<u64> =
        claims.kvs.iter().filter_map(|kv| id_of(&kv.key)).collect();
    candidates.kvs.iter().find_map(|kv| {
        let id = id_of(&kv.key)?;
        (!claimed.contains(&id)).then_some(Candidate {
            id,
            version: kv.version,
            create_revision: kv.create_revision,
        })
    })
}

/// Claims `candidate` under `lease` if nobody delivered or claimed it since it was read.
pub fn claim_txn(queue: &str, candidate: &Candidate, lease: i64) -> TxnRequest {
    let message = message_key(queue, candidate.id);
    let claim = claim_key(queue, candidate.id);
    TxnRequest {
        compare: vec![compare_version(message.clone(), candidate.version), compare_create(claim.clone(), 0)],
        success: vec![
            put_op(PutRequest { key: claim, lease, ..Default::default() }),
            put_op(PutRequest { key: message.clone(), ignore_value: true, ..Default::default() }),
            get_op(message),
        ],
        failure: vec![],
    }
}

/// What a claim txn did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    Claimed(QueueMessage),
    /// Someone else delivered or claimed it first: look again.
    Lost,
}

fn range_kvs(response: &TxnResponse, index: usize) -> &[KeyValue] {
    match response.responses.get(index).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(range)) => &range.kvs,
        _ => &[],
    }
}

pub fn interpret_claim(candidate: &Candidate, response: &TxnResponse) -> Claim {
    if !response.succeeded {
        return Claim::Lost;
    }
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    match range_kvs(response, 2).first() {
        Some(kv) => Claim::Claimed(QueueMessage {
            id: candidate.id,
            payload: kv.value.clone(),
            deliveries: (kv.version - 1).max(0) as u32,
            claim_token: revision,
            create_revision: kv.create_revision,
        }),
        None => Claim::Lost,
    }
}

/// Reads message `id` (its payload, before dead-lettering or for a peek).
pub fn message_request(queue: &str, id: u64) -> RangeRequest {
    RangeRequest { key: message_key(queue, id), ..Default::default() }
}

/// Moves `candidate` (read back in `message`) to the dead-letter queue, if it is
/// still unclaimed and undelivered since; `None` if it is gone already.
pub fn dead_letter_txn(queue: &str, candidate: &Candidate, message: &RangeResponse) -> Option<TxnRequest> {
    let kv = message.kvs.first()?;
    if kv.version != candidate.version {
        return None;
    }
    let key = message_key(queue, candidate.id);
    let dead = message_key(&dead_letter_name(queue), candidate.id);
    Some(TxnRequest {
        compare: vec![
            compare_version(key.clone(), candidate.version),
            compare_create(claim_key(queue, candidate.id), 0),
            compare_create(dead.clone(), 0),
        ],
        success: vec![
            delete_op(key),
            put_op(PutRequest { key: dead, value: kv.value.clone(), ..Default::default() }),
        ],
        failure: vec![],
    })
}

/// Acks (deletes message and claim) or nacks (deletes the claim) message `id` if
/// `claim_token` is its current claim; the failure branch reads what is there.
pub fn settle_txn(queue: &str, id: u64, claim_token: i64, ack: bool) -> TxnRequest {
    let message = message_key(queue, id);
    let claim = claim_key(queue, id);
    let mut success = vec![delete_op(claim.clone())];
    if ack {
        success.push(delete_op(message.clone()));
    }
    TxnRequest {
        compare: vec![compare_create(claim.clone(), claim_token)],
        success,
        failure: vec![get_op(claim), get_op(message)],
    }
}

/// Checks a settle request's fields.
pub fn validate_settle(queue: &str, claim_token: i64) -> Result<(), CoordError> {
    validate_queue(queue)?;
    if claim_token <= 0 {
        return Err(CoordError::InvalidArgument(format!(
            "claim token must be positive (got {claim_token}); it comes from Dequeue"
        )));
    }
    Ok(())
}

/// The revision of a settle, or why the token was stale, naming the current state.
pub fn interpret_settle(
    queue: &str,
    id: u64,
    claim_token: i64,
    response: &TxnResponse,
) -> Result<i64, CoordError> {
    if response.succeeded {
        return Ok(response.header.as_ref().map_or(0, |h| h.revision));
    }
    let claim = range_kvs(response, 0).first();
    let message = range_kvs(response, 1).first();
    let state = match (message, claim) {
        (None, _) => format!(
            "message {id} is no longer in queue {queue:?} (acknowledged, dead-lettered, or never enqueued)"
        ),
        (Some(_), Some(claim)) => {
            format!("message {id} is now claimed with token {}", claim.create_revision)
        }
        (Some(m), None) => format!(
            "message {id} is not claimed (its claim was released or its lease expired; it is back in \
             the queue after {} deliveries)",
            (m.version - 1).max(0)
        ),
    };
    Err(CoordError::FailedPrecondition(format!("claim token {claim_token} is stale: {state}")))
}

/// Checks `max_deliveries` (0: the default) and returns the one to use.
pub fn max_deliveries(requested: u32) -> Result<u32, CoordError> {
    match requested {
        0 => Ok(QUEUE_MAX_DELIVERIES_DEFAULT),
        n if n <= QUEUE_MAX_DELIVERIES_MAX => Ok(n),
        n => Err(CoordError::InvalidArgument(format!(
            "max_deliveries is too large ({n}, at most {QUEUE_MAX_DELIVERIES_MAX})"
        ))),
    }
}

/// What a Dequeue's driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run this linearizable read and pass its response to [`Dequeue::on_range`].
    Read(RangeRequest),
    /// Propose this txn and pass its response to [`Dequeue::on_txn`].
    Write(TxnRequest),
    /// Nothing to claim as of `revision`: wait for a change of the queue's keys
    /// ([`watch_range`]) after it (or the deadline), then call [`Dequeue::start`].
    Wait { revision: i64 },
    /// Done: this message is claimed.
    Claimed(QueueMessage),
}

#[derive(Debug, Clone)]
enum Step {
    Claims,
    Candidates(RangeResponse),
    Claiming(Candidate),
    ReadingMessage(Candidate),
    DeadLettering,
}

/// One Dequeue call: a state machine a driver feeds with read and txn responses.
#[derive(Debug, Clone)]
pub struct Dequeue {
    queue: String,
    lease: i64,
    max_deliveries: u32,
    step: Step,
    /// Messages moved to the dead-letter queue by this call.
    pub dead_lettered: u32,
}

impl Dequeue {
    /// Checks the request; `max_deliveries` 0 means the default.
    pub fn new(queue: &str, lease: i64, max_deliveries: u32) -> Result<Dequeue, CoordError> {
        validate_queue(queue)?;
        if lease <= 0 {
            return Err(CoordError::InvalidArgument(
                "dequeue needs the consumer's lease (grant one; the claim is released when it ends)".into(),
            ));
        }
        let max_deliveries = self::max_deliveries(max_deliveries)?;
        Ok(Dequeue { queue: queue.to_string(), lease, max_deliveries, step: Step::Claims, dead_lettered: 0 })
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The first action, and the one after a wait.
    pub fn start(&mut self) -> Action {
        self.step = Step::Claims;
        Action::Read(claims_request(&self.queue))
    }

    pub fn on_range(&mut self, response: RangeResponse) -> Action {
        match std::mem::replace(&mut self.step, Step::Claims) {
            Step::Claims => {
                let request = candidates_request(&self.queue, response.kvs.len());
                self.step = Step::Candidates(response);
                Action::Read(request)
            }
            Step::Candidates(claims) => match next_unclaimed(&response, &claims) {
                None => Action::Wait { revision: response.header.as_ref().map_or(0, |h| h.revision) },
                Some(candidate) if candidate.deliveries() >= self.max_deliveries => {
                    self.step = Step::ReadingMessage(candidate);
                    Action::Read(message_request(&self.queue, candidate.id))
                }
                Some(candidate) => {
                    self.step = Step::Claiming(candidate);
                    Action::Write(claim_txn(&self.queue, &candidate, self.lease))
                }
            },
            Step::ReadingMessage(candidate) => match dead_letter_txn(&self.queue, &candidate, &response) {
                Some(txn) => {
                    self.step = Step::DeadLettering;
                    Action::Write(txn)
                }
                None => self.start(),
            },
            Step::Claiming(_) | Step::DeadLettering => self.start(),
        }
    }

    pub fn on_txn(&mut self, response: TxnResponse) -> Action {
        match std::mem::replace(&mut self.step, Step::Claims) {
            Step::Claiming(candidate) => match interpret_claim(&candidate, &response) {
                Claim::Claimed(message) => Action::Claimed(message),
                Claim::Lost => self.start(),
            },
            Step::DeadLettering => {
                if response.succeeded {
                    self.dead_lettered += 1;
                }
                self.start()
            }
            _ => self.start(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::etcdserverpb::{ResponseHeader, ResponseOp};

    fn kv(key: Vec<u8>, version: i64, create_revision: i64) -> KeyValue {
        KeyValue { key, version, create_revision, mod_revision: create_revision, ..Default::default() }
    }

    fn range(kvs: Vec<KeyValue>, revision: i64) -> RangeResponse {
        RangeResponse {
            header: Some(ResponseHeader { revision, ..Default::default() }),
            count: kvs.len() as i64,
            kvs,
            ..Default::default()
        }
    }

    #[test]
    fn keys_are_reserved_and_disjoint() {
        assert_eq!(message_key("jobs", 1), b"\x00chorus/queue/jobs/m/0000000000000001".to_vec());
        assert_eq!(claim_key("jobs", 255), b"\x00chorus/queue/jobs/c/00000000000000ff".to_vec());
        let (start, end) = watch_range("jobs");
        assert!(message_key("jobs", 7) >= start && message_key("jobs", 7) < end);
        assert!(message_key("jobs2", 7) >= end || message_key("jobs2", 7) < start);
    }

    #[test]
    fn names_and_payloads_are_checked() {
        assert!(validate_enqueue("", b"x").is_err());
        assert!(validate_enqueue("a/b", b"x").is_err());
        let big = vec![0; QUEUE_PAYLOAD_BYTES_MAX + 1];
        assert!(
            matches!(validate_enqueue("q", &big), Err(CoordError::InvalidArgument(m)) if m.contains("too large"))
        );
        assert!(validate_enqueue("q", &big[1..]).is_ok());
        let long = "x".repeat(COORD_NAME_BYTES_MAX);
        assert!(validate_queue(&long).is_ok());
        assert!(validate_queue(&dead_letter_name(&dead_letter_name(&long))).is_ok());
        assert!(validate_queue(&format!("{long}x")).is_err());
        assert!(max_deliveries(0) == Ok(QUEUE_MAX_DELIVERIES_DEFAULT));
        assert!(max_deliveries(QUEUE_MAX_DELIVERIES_MAX + 1).is_err());
        assert!(Dequeue::new("q", 0, 0).is_err());
    }

    #[test]
    fn full_queue_is_refused() {
        let full = RangeResponse { count: QUEUE_LENGTH_MAX as i64, ..Default::default() };
        assert!(matches!(check_length("q", &full), Err(CoordError::ResourceExhausted(_))));
        let room = RangeResponse { count: QUEUE_LENGTH_MAX as i64 - 1, ..Default::default() };
        assert!(check_length("q", &room).is_ok());
    }

    #[test]
    fn oldest_unclaimed_is_picked() {
        let candidates = range(
            vec![kv(message_key("q", 9), 1, 5), kv(message_key("q", 3), 2, 6), kv(message_key("q", 1), 1, 7)],
            10,
        );
        let claims = range(vec![kv(claim_key("q", 9), 1, 8)], 10);
        let picked = next_unclaimed(&candidates, &claims).unwrap();
        assert_eq!(picked, Candidate { id: 3, version: 2, create_revision: 6 });
        assert_eq!(picked.deliveries(), 1);
        assert_eq!(next_unclaimed(&range(vec![], 10), &claims), None);
    }

    #[test]
    fn dequeue_claims_or_dead_letters_or_waits() {
        let mut dequeue = Dequeue::new("q", 42, 2).unwrap();
        assert_eq!(dequeue.start(), Action::Read(claims_request("q")));
        assert_eq!(dequeue.on_range(range(vec![], 10)), Action::Read(candidates_request("q", 0)));
        // Delivered twice already: dead-lettered, not claimed.
        let tired = kv(message_key("q", 4), 3, 5);
        let action = dequeue.on_range(range(vec![tired.clone()], 10));
        assert_eq!(action, Action::Read(message_request("q", 4)));
        let action = dequeue.on_range(range(vec![KeyValue { value: b"p".to_vec(), ..tired }], 10));
        let Action::Write(txn) = action else { panic!("expected a write, got {action:?}") };
        assert_eq!(txn.compare.len(), 3);
        let moved = TxnResponse { succeeded: true, ..Default::default() };
        assert_eq!(dequeue.on_txn(moved), Action::Read(claims_request("q")));
        assert_eq!(dequeue.dead_lettered, 1);
        dequeue.on_range(range(vec![], 11));
        // A fresh message: claimed.
        let action = dequeue.on_range(range(vec![kv(message_key("q", 5), 1, 11)], 11));
        assert!(matches!(action, Action::Write(ref txn) if txn.success.len() == 3));
        let claimed = TxnResponse {
            header: Some(ResponseHeader { revision: 12, ..Default::default() }),
            succeeded: true,
            responses: vec![
                ResponseOp::default(),
                ResponseOp::default(),
                ResponseOp {
                    response: Some(response_op::Response::ResponseRange(range(
                        vec![KeyValue { value: b"hello".to_vec(), ..kv(message_key("q", 5), 2, 11) }],
                        12,
                    ))),
                },
            ],
        };
        let Action::Claimed(message) = dequeue.on_txn(claimed) else { panic!("not claimed") };
        assert_eq!((message.id, message.claim_token, message.deliveries), (5, 12, 1));
        assert_eq!(message.payload, b"hello");
        // Empty queue: wait after the revision read.
        dequeue.start();
        dequeue.on_range(range(vec![], 12));
        assert_eq!(dequeue.on_range(range(vec![], 12)), Action::Wait { revision: 12 });
    }

    #[test]
    fn stale_tokens_name_the_state() {
        let failed = |claim: Option<KeyValue>, message: Option<KeyValue>| TxnResponse {
            succeeded: false,
            responses: [claim, message]
                .into_iter()
                .map(|kv| ResponseOp {
                    response: Some(response_op::Response::ResponseRange(range(kv.into_iter().collect(), 20))),
                })
                .collect(),
            ..Default::default()
        };
        let error =
            interpret_settle("q", 5, 12, &failed(Some(kv(claim_key("q", 5), 1, 15)), Some(kv(vec![], 3, 4))));
        assert!(
            matches!(error, Err(CoordError::FailedPrecondition(ref m)) if m.contains("claimed with token 15"))
        );
        let error = interpret_settle("q", 5, 12, &failed(None, Some(kv(vec![], 3, 4))));
        assert!(matches!(error, Err(CoordError::FailedPrecondition(ref m)) if m.contains("not claimed")));
        let error = interpret_settle("q", 5, 12, &failed(None, None));
        assert!(
            matches!(error, Err(CoordError::FailedPrecondition(ref m)) if m.contains("no longer in queue"))
        );
        assert!(validate_settle("q", 0).is_err());
    }
}
