//! Barriers over the replicated KV: request builders and response interpreters
//! with no IO, run by the server (`chorus-server/src/api/barrier.rs`) and by the
//! simulator alike. The key layout is in [`crate::coord`].
//!
//! - **Enter** ([`Enter`]) puts the participant key `p/<lease>` under the
//!   participant's lease, then reads the barrier. Once `count` participants are
//!   present, one of them trips it with a txn that compares every counted
//!   participant key's create revision (so all `count` were present at the trip
//!   revision, none died in between) and the trip record's absence, and puts the
//!   trip record (no lease: it outlives the participants, so late departures do
//!   not untrip it). Everyone who sees the trip record passes.
//! - A participant whose lease ends before the trip is deleted with it and no
//!   longer counts. One that gives up at its deadline withdraws its key in a txn
//!   that requires the barrier untripped (if it tripped meanwhile, Enter succeeds).
//! - **Leave** ([`Leave`]) deletes the participant key and waits until no
//!   participant is left; then the trip record is deleted (compared by its mod
//!   revision), so the name can be used for a new round.

use chorus_proto::etcdserverpb::{
    response_op, PutRequest, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use chorus_proto::mvccpb::KeyValue;

use crate::coord::{
    compare_create, compare_mod, delete_op, get_op, prefix_end, put_op, validate_name, CoordError,
    RESERVED_PREFIX,
};
use crate::limits::BARRIER_PARTICIPANTS_MAX;

fn barrier_prefix(name: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"barrier/");
    key.extend_from_slice(name.as_bytes());
    key.push(b'/');
    key
}

/// The key of the participant holding `lease`.
pub fn participant_key(name: &str, lease: i64) -> Vec<u8> {
    let mut key = barrier_prefix(name);
    key.extend_from_slice(format!("p/{lease:016x}").as_bytes());
    key
}

/// The durable trip record.
pub fn trip_key(name: &str) -> Vec<u8> {
    let mut key = barrier_prefix(name);
    key.extend_from_slice(b"tripped");
    key
}

/// Every key of the barrier: what a blocked Enter or Leave watches and reads.
pub fn watch_range(name: &str) -> (Vec<u8>, Vec<u8>) {
    let prefix = barrier_prefix(name);
    let end = prefix_end(&prefix);
    (prefix, end)
}

/// Reads the whole barrier (participants and trip record).
pub fn state_request(name: &str) -> RangeRequest {
    let (key, range_end) = watch_range(name);
    RangeRequest { key, range_end, ..Default::default() }
}

/// A barrier as read.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub revision: i64,
    /// The trip record, if the barrier has tripped.
    pub trip: Option<KeyValue>,
    /// Participant keys, oldest first.
    pub participants: Vec<KeyValue>,
}

pub fn interpret_state(name: &str, response: &RangeResponse) -> State {
    let trip_key = trip_key(name);
    let mut state = State {
        revision: response.header.as_ref().map_or(0, |h| h.revision),
        trip: None,
        participants: Vec::new(),
    };
    let participant_prefix = participant_key(name, 0);
    let participant_prefix = &participant_prefix[..participant_prefix.len() - 16];
    for kv in &response.kvs {
        if kv.key == trip_key {
            state.trip = Some(kv.clone());
        } else if kv.key.starts_with(participant_prefix) {
            state.participants.push(kv.clone());
        }
    }
    state.participants.sort_by_key(|kv| kv.create_revision);
    state
}

/// How a tripped barrier was passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tripped {
    /// The revision the trip record was written at.
    pub revision: i64,
    /// The participants the trip counted.
    pub participants: u32,
}

fn tripped(trip: &KeyValue) -> Tripped {
    let participants = std::str::from_utf8(&trip.value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    Tripped { revision: trip.create_revision, participants }
}

/// What a barrier call's driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run this linearizable read; pass the response to `on_range`.
    Read(RangeRequest),
    /// Propose this txn; pass the response to `on_txn`.
    Write(TxnRequest),
    /// Wait for a change of [`watch_range`] after `revision` (or the deadline:
    /// then call `give_up`), then call `start_over`.
    Wait { revision: i64 },
    /// Enter is done: the barrier tripped.
    Passed(Tripped),
    /// Leave is done: every participant has left.
    Left { revision: i64 },
    /// The participant's lease ended (its key is gone) before the barrier tripped.
    Lost(String),
    /// The deadline passed without the barrier tripping (or emptying); an
    /// entering participant has been withdrawn.
    TimedOut(String),
}

fn range_first(response: &TxnResponse, index: usize) -> Option<&KeyValue> {
    match response.responses.get(index).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(range)) => range.kvs.first(),
        _ => None,
    }
}

fn validate_lease(lease: i64) -> Result<(), CoordError> {
    if lease <= 0 {
        return Err(CoordError::InvalidArgument(
            "a barrier participant needs its session lease (one participant per lease)".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EnterStep {
    Entering,
    Reading,
    Tripping,
    Withdrawing,
}

/// One Enter call.
#[derive(Debug, Clone)]
pub struct Enter {
    name: String,
    count: u32,
    lease: i64,
    step: EnterStep,
}

impl Enter {
    pub fn new(name: &str, count: u32, lease: i64) -> Result<Enter, CoordError> {
        validate_name("barrier", name)?;
        validate_lease(lease)?;
        if count == 0 || count > BARRIER_PARTICIPANTS_MAX {
            return Err(CoordError::InvalidArgument(format!(
                "barrier count must be between 1 and {BARRIER_PARTICIPANTS_MAX} (got {count})"
            )));
        }
        Ok(Enter { name: name.to_string(), count, lease, step: EnterStep::Entering })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enters: puts the participant key under the lease and reads the trip record.
    pub fn start(&mut self) -> Action {
        self.step = EnterStep::Entering;
        let key = participant_key(&self.name, self.lease);
        Action::Write(TxnRequest {
            compare: vec![],
            success: vec![
                put_op(PutRequest {
                    key,
                    value: self.count.to_string().into_bytes(),
                    lease: self.lease,
                    ..Default::default()
                }),
                get_op(trip_key(&self.name)),
            ],
            failure: vec![],
        })
    }

    /// After a wait: reads the barrier again.
    pub fn start_over(&mut self) -> Action {
        self.step = EnterStep::Reading;
        Action::Read(state_request(&self.name))
    }

    /// At the deadline: withdraws the participant unless the barrier has tripped.
    pub fn give_up(&mut self) -> Action {
        self.step = EnterStep::Withdrawing;
        let trip = trip_key(&self.name);
        Action::Write(TxnRequest {
            compare: vec![compare_create(trip.clone(), 0)],
            success: vec![delete_op(participant_key(&self.name, self.lease))],
            failure: vec![get_op(trip)],
        })
    }

    pub fn on_range(&mut self, response: RangeResponse) -> Action {
        let state = interpret_state(&self.name, &response);
        if let Some(trip) = &state.trip {
            return Action::Passed(tripped(trip));
        }
        let own = participant_key(&self.name, self.lease);
        if !state.participants.iter().any(|kv| kv.key == own) {
            return Action::Lost(format!(
                "barrier {:?}: this participant's lease {:x} ended before the barrier tripped, so it left \
                 the barrier",
                self.name, self.lease
            ));
        }
        if state.participants.len() < self.count as usize {
            return Action::Wait { revision: state.revision };
        }
        let counted = &state.participants[..self.count as usize];
        let trip = trip_key(&self.name);
        let mut compare = vec![compare_create(trip.clone(), 0)];
        compare.extend(counted.iter().map(|kv| compare_create(kv.key.clone(), kv.create_revision)));
        self.step = EnterStep::Tripping;
        Action::Write(TxnRequest {
            compare,
            success: vec![put_op(PutRequest {
                key: trip,
                value: self.count.to_string().into_bytes(),
                ..Default::default()
            })],
            failure: vec![],
        })
    }

    pub fn on_txn(&mut self, response: TxnResponse) -> Action {
        match self.step {
            EnterStep::Entering => match range_first(&response, 1) {
                Some(trip) => Action::Passed(tripped(trip)),
                None => self.start_over(),
            },
            EnterStep::Tripping if response.succeeded => Action::Passed(Tripped {
                revision: response.header.as_ref().map_or(0, |h| h.revision),
                participants: self.count,
            }),
            EnterStep::Withdrawing => match range_first(&response, 0) {
                Some(trip) if !response.succeeded => Action::Passed(tripped(trip)),
                _ => Action::TimedOut(format!(
                    "barrier {:?} did not trip in time (fewer than {} participants entered); this \
                     participant was withdrawn",
                    self.name, self.count
                )),
            },
            EnterStep::Tripping | EnterStep::Reading => self.start_over(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaveStep {
    Leaving,
    Reading,
    Resetting,
}

/// One Leave call.
#[derive(Debug, Clone)]
pub struct Leave {
    name: String,
    lease: i64,
    step: LeaveStep,
}

impl Leave {
    pub fn new(name: &str, lease: i64) -> Result<Leave, CoordError> {
        validate_name("barrier", name)?;
        validate_lease(lease)?;
        Ok(Leave { name: name.to_string(), lease, step: LeaveStep::Leaving })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Leaves: deletes the participant key.
    pub fn start(&mut self) -> Action {
        self.step = LeaveStep::Leaving;
        Action::Write(TxnRequest {
            compare: vec![],
            success: vec![delete_op(participant_key(&self.name, self.lease))],
            failure: vec![],
        })
    }

    pub fn start_over(&mut self) -> Action {
        self.step = LeaveStep::Reading;
        Action::Read(state_request(&self.name))
    }

    pub fn give_up(&mut self) -> Action {
        Action::TimedOut(format!("participants of barrier {:?} did not all leave in time", self.name))
    }

    pub fn on_range(&mut self, response: RangeResponse) -> Action {
        let state = interpret_state(&self.name, &response);
        if !state.participants.is_empty() {
            return Action::Wait { revision: state.revision };
        }
        match state.trip {
            Some(trip) => {
                self.step = LeaveStep::Resetting;
                let key = trip_key(&self.name);
                Action::Write(TxnRequest {
                    compare: vec![compare_mod(key.clone(), trip.mod_revision)],
                    success: vec![delete_op(key)],
                    failure: vec![],
                })
            }
            None => Action::Left { revision: state.revision },
        }
    }

    pub fn on_txn(&mut self, response: TxnResponse) -> Action {
        match self.step {
            LeaveStep::Resetting => {
                Action::Left { revision: response.header.as_ref().map_or(0, |h| h.revision) }
            }
            LeaveStep::Leaving | LeaveStep::Reading => self.start_over(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::etcdserverpb::{ResponseHeader, ResponseOp};

    fn state(kvs: Vec<KeyValue>, revision: i64) -> RangeResponse {
        RangeResponse {
            header: Some(ResponseHeader { revision, ..Default::default() }),
            kvs,
            ..Default::default()
        }
    }

    fn participant(lease: i64, create_revision: i64) -> KeyValue {
        KeyValue {
            key: participant_key("b", lease),
            create_revision,
            mod_revision: create_revision,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(Enter::new("", 2, 1).is_err());
        assert!(Enter::new("b", 0, 1).is_err());
        assert!(Enter::new("b", BARRIER_PARTICIPANTS_MAX + 1, 1).is_err());
        assert!(Enter::new("b", 2, 0).is_err());
        assert!(Leave::new("b/c", 1).is_err());
        assert!(Enter::new("b", BARRIER_PARTICIPANTS_MAX, 1).is_ok());
    }

    #[test]
    fn trips_only_with_count_participants() {
        let mut enter = Enter::new("b", 2, 7).unwrap();
        assert!(matches!(enter.start(), Action::Write(_)));
        let entered =
            TxnResponse { succeeded: true, responses: vec![ResponseOp::default()], ..Default::default() };
        assert_eq!(enter.on_txn(entered), Action::Read(state_request("b")));
        assert_eq!(enter.on_range(state(vec![participant(7, 3)], 3)), Action::Wait { revision: 3 });
        enter.start_over();
        let Action::Write(trip) = enter.on_range(state(vec![participant(9, 4), participant(7, 3)], 4)) else {
            panic!("expected the trip txn")
        };
        // The trip record's absence and both participants' create revisions.
        assert_eq!(trip.compare.len(), 3);
        let done = TxnResponse {
            succeeded: true,
            header: Some(ResponseHeader { revision: 5, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(enter.on_txn(done), Action::Passed(Tripped { revision: 5, participants: 2 }));
    }

    #[test]
    fn a_trip_record_lets_everyone_pass_and_leave_resets_it() {
        let mut enter = Enter::new("b", 3, 7).unwrap();
        enter.start_over();
        let trip = KeyValue {
            key: trip_key("b"),
            value: b"3".to_vec(),
            create_revision: 9,
            mod_revision: 9,
            ..Default::default()
        };
        assert_eq!(
            enter.on_range(state(vec![trip.clone()], 12)),
            Action::Passed(Tripped { revision: 9, participants: 3 })
        );
        let mut leave = Leave::new("b", 7).unwrap();
        leave.start();
        assert_eq!(leave.on_txn(TxnResponse::default()), Action::Read(state_request("b")));
        assert_eq!(
            leave.on_range(state(vec![participant(8, 4), trip.clone()], 13)),
            Action::Wait { revision: 13 }
        );
        leave.start_over();
        assert!(matches!(leave.on_range(state(vec![trip], 14)), Action::Write(_)));
        assert!(matches!(leave.on_txn(TxnResponse::default()), Action::Left { .. }));
    }

    #[test]
    fn a_participant_whose_key_is_gone_has_lost() {
        let mut enter = Enter::new("b", 2, 7).unwrap();
        enter.start_over();
        assert!(matches!(enter.on_range(state(vec![participant(9, 4)], 5)), Action::Lost(_)));
    }

    #[test]
    fn giving_up_withdraws_unless_tripped() {
        let mut enter = Enter::new("b", 3, 7).unwrap();
        let Action::Write(withdraw) = enter.give_up() else { panic!() };
        assert_eq!(withdraw.compare.len(), 1);
        assert!(matches!(
            enter.on_txn(TxnResponse { succeeded: true, ..Default::default() }),
            Action::TimedOut(_)
        ));
        enter.give_up();
        let trip =
            KeyValue { key: trip_key("b"), value: b"3".to_vec(), create_revision: 9, ..Default::default() };
        let failed = TxnResponse {
            succeeded: false,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseRange(state(vec![trip], 10))),
            }],
            ..Default::default()
        };
        assert_eq!(enter.on_txn(failed), Action::Passed(Tripped { revision: 9, participants: 3 }));
    }
}
