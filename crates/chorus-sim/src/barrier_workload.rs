//! The barrier workload and its checker.
//!
//! Participants meet at a sequence of barriers (`round0`, `round1`, ...), each
//! needing all but one of them. Each round a participant grants a fresh lease
//! (the minimum TTL, never kept alive) and enters with chorus-core's [`Enter`];
//! some "die" right after entering (they stop; their lease runs out and their key
//! goes with it), the others wait, polling, until the barrier trips or their
//! deadline passes.
//!
//! Checked against the converged store: **nobody passes early**: at the revision
//! a participant's barrier tripped, at least `count` participant keys existed;
//! and every participant of a round saw the same trip.

use std::collections::BTreeMap;

use chorus_core::barrier::{self, Action, Enter};
use chorus_core::mvcc::{ChangeKind, MvccStore};
use chorus_core::node::OpResponse;
use chorus_core::KvError;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::LeaseGrantRequest;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::coord_workload::{read_result, read_txn, CoordResult, Want};

/// Rounds per run, and how far apart they start.
pub const ROUNDS: u32 = 3;
const ROUND_US: u64 = 8_000_000;
const LEASE_TTL_S: i64 = 5;
/// How long a participant waits at a barrier.
const WAIT_US: u64 = 4_000_000;
const POLL_US: u64 = 200_000;

pub fn barrier_name(round: u32) -> String {
    format!("round{round}")
}

#[derive(Debug)]
enum State {
    Idle,
    Granting(i64),
    Entering { enter: Enter, pending: Action, reading: bool, deadline_us: u64, gave_up: bool },
    Dead,
}

/// A pass through a barrier.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    pub round: u32,
    pub trip_revision: i64,
    pub at_us: u64,
}

/// One participant.
#[derive(Debug)]
pub struct Participant {
    round: u32,
    count: u32,
    start_offset_us: u64,
    state: State,
    in_flight: bool,
    pub passes: Vec<Pass>,
    pub timeouts: u32,
    pub problems: Vec<String>,
}

impl Participant {
    pub fn new(count: u32, start_offset_us: u64) -> Participant {
        Participant {
            round: 0,
            count,
            start_offset_us,
            state: State::Idle,
            in_flight: false,
            passes: Vec::new(),
            timeouts: 0,
            problems: Vec::new(),
        }
    }

    fn round_start_us(&self) -> u64 {
        1_000_000 + self.round as u64 * ROUND_US + self.start_offset_us
    }

    fn finish_round(&mut self) {
        self.round += 1;
        self.state = State::Idle;
    }

    pub fn next(&mut self, now_us: u64, rng: &mut ChaCha8Rng) -> Want {
        if self.in_flight {
            return Want::Sleep(POLL_US);
        }
        if self.round >= ROUNDS {
            return Want::Done;
        }
        match &mut self.state {
            State::Idle | State::Dead => {
                if matches!(self.state, State::Dead) {
                    if now_us < self.round_start_us() + ROUND_US {
                        return Want::Sleep(self.round_start_us() + ROUND_US - now_us);
                    }
                    self.finish_round();
                    return Want::Sleep(1);
                }
                let start = self.round_start_us();
                if now_us < start {
                    return Want::Sleep(start - now_us);
                }
                let id = rng.random_range(1..i64::MAX);
                self.state = State::Granting(id);
                self.in_flight = true;
                Want::Propose(Op::LeaseGrant(LeaseGrantRequest { ttl: LEASE_TTL_S, id }))
            }
            State::Granting(_) => Want::Sleep(POLL_US),
            State::Entering { enter, pending, reading, deadline_us, gave_up } => match pending.clone() {
                Action::Read(range) => {
                    *reading = true;
                    self.in_flight = true;
                    Want::Propose(read_txn(range))
                }
                Action::Write(txn) => {
                    *reading = false;
                    self.in_flight = true;
                    Want::Propose(Op::Txn(txn))
                }
                Action::Wait { .. } => {
                    if now_us >= *deadline_us && !*gave_up {
                        *gave_up = true;
                        *pending = enter.give_up();
                        return Want::Sleep(1);
                    }
                    *pending = enter.start_over();
                    Want::Sleep(POLL_US)
                }
                _ => unreachable!("handled when answered"),
            },
        }
    }

    pub fn answer(&mut self, result: CoordResult, now_us: u64, rng: &mut ChaCha8Rng) {
        self.in_flight = false;
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle | State::Dead => {}
            State::Granting(id) => {
                if let CoordResult::Done(_) = result {
                    let mut enter =
                        Enter::new(&barrier_name(self.round), self.count, id).expect("valid barrier enter");
                    let pending = enter.start();
                    let deadline_us = now_us + WAIT_US;
                    self.state =
                        State::Entering { enter, pending, reading: false, deadline_us, gave_up: false };
                }
            }
            State::Entering { mut enter, reading, deadline_us, gave_up, .. } => {
                let entering_first = !reading && !gave_up && matches!(result, CoordResult::Done(_));
                let pending = match result {
                    CoordResult::Done(OpResponse::Txn(response)) if reading => match read_result(response) {
                        Some(range) => enter.on_range(range),
                        None => enter.start_over(),
                    },
                    CoordResult::Done(OpResponse::Txn(response)) => enter.on_txn(response),
                    CoordResult::Rejected(KvError::LeaseNotFound) => {
                        self.finish_round();
                        return;
                    }
                    // The NOSPACE alarm is raised: try again (nothing was written).
                    CoordResult::Rejected(KvError::NoSpace) if gave_up => enter.give_up(),
                    CoordResult::Rejected(KvError::NoSpace) => enter.start_over(),
                    CoordResult::Rejected(error) => {
                        self.problems.push(format!("a barrier step was refused: {error}"));
                        self.finish_round();
                        return;
                    }
                    _ if gave_up => enter.give_up(),
                    _ => enter.start_over(),
                };
                match pending {
                    Action::Passed(tripped) => {
                        self.passes.push(Pass {
                            round: self.round,
                            trip_revision: tripped.revision,
                            at_us: now_us,
                        });
                        self.finish_round();
                    }
                    Action::TimedOut(_) | Action::Lost(_) => {
                        self.timeouts += 1;
                        self.finish_round();
                    }
                    // One in six participants dies right after entering.
                    _ if entering_first && rng.random_ratio(1, 6) => self.state = State::Dead,
                    pending => {
                        self.state = State::Entering { enter, pending, reading: false, deadline_us, gave_up }
                    }
                }
            }
        }
    }
}

/// Checks the passes against the converged store's history of the barriers' keys.
pub fn check(participants: &[&Participant], store: &MvccStore) -> Vec<String> {
    let mut violations = Vec::new();
    let mut trips: BTreeMap<u32, i64> = BTreeMap::new();
    for participant in participants {
        violations.extend(participant.problems.iter().map(|p| format!("barrier participant: {p}")));
        for pass in &participant.passes {
            if let Some(seen) = trips.insert(pass.round, pass.trip_revision) {
                if seen != pass.trip_revision {
                    violations.push(format!(
                        "barrier {}: participants saw two trips (revisions {seen} and {})",
                        barrier_name(pass.round),
                        pass.trip_revision
                    ));
                }
            }
        }
    }
    let count = participants.first().map_or(0, |p| p.count) as usize;
    for (round, trip_revision) in trips {
        let (start, end) = barrier::watch_range(&barrier_name(round));
        let (events, _) = store.events(&start, &end, 1, usize::MAX).expect("the simulator never compacts");
        let trip_key = barrier::trip_key(&barrier_name(round));
        let mut alive = std::collections::BTreeSet::new();
        for event in events.iter().filter(|e| e.kv.mod_revision <= trip_revision && e.kv.key != trip_key) {
            match event.kind {
                ChangeKind::Put => alive.insert(event.kv.key.clone()),
                ChangeKind::Delete => alive.remove(&event.kv.key),
            };
        }
        if alive.len() < count {
            violations.push(format!(
                "barrier {}: tripped at revision {trip_revision} with only {} of {count} participants present",
                barrier_name(round),
                alive.len()
            ));
        }
    }
    violations
}
