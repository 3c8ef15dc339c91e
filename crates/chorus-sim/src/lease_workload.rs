//! The lease workload and its checker.
//!
//! Lease clients grant a lease with the minimum TTL, attach two keys to it, then
//! keep it alive through random members (a member that does not lead forwards the
//! keep-alive to the leader it knows) for a while; then each either revokes it or
//! simply stops, and the lease must expire by itself.
//!
//! Checked:
//! - **never early**: while a client's keep-alives are acknowledged, the lease is
//!   not gone less than its TTL after the last acknowledged keep-alive was sent
//!   (allowing for the leader's tick drift, and for tick bursts on seeds that have
//!   them: both make a leader's monotonic clock run fast against true time);
//! - **keys go in one revision**: a revoked or expired lease's keys are deleted in
//!   one revision of the converged history;
//! - **eventually**: a lease nobody keeps alive is gone by the end of the run.

use std::collections::BTreeMap;

use chorus_core::mvcc::{ChangeKind, MvccStore};

/// The TTL every simulated lease asks for (the minimum, so expiry is exercised).
pub const LEASE_TTL_S: i64 = 5;
/// Keys attached to each lease.
pub const KEYS_PER_LEASE: usize = 2;

/// Where a lease client is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Grant,
    Attach(usize),
    KeepAlive,
    /// Stopped keeping alive at this time; the lease must expire by itself.
    Abandoned,
    Revoke,
    Done,
}

/// One lease client.
#[derive(Debug)]
pub struct LeaseClient {
    pub id: i64,
    pub phase: Phase,
    /// Keep-alives left before the client abandons or revokes the lease.
    pub keep_alives_left: u32,
    pub revoke_at_end: bool,
    /// The send time of the last keep-alive answered with a positive TTL.
    pub last_renewal_sent_us: Option<u64>,
    /// When the lease was first seen gone (a keep-alive answered TTL 0).
    pub seen_gone_us: Option<u64>,
    pub request_in_flight: Option<u64>,
    pub problems: Vec<String>,
    /// When the client stopped keeping the lease alive.
    pub abandoned_at_us: Option<u64>,
}

impl LeaseClient {
    pub fn new(id: i64, keep_alives: u32, revoke_at_end: bool) -> LeaseClient {
        LeaseClient {
            id,
            phase: Phase::Grant,
            keep_alives_left: keep_alives,
            revoke_at_end,
            last_renewal_sent_us: None,
            seen_gone_us: None,
            request_in_flight: None,
            problems: Vec::new(),
            abandoned_at_us: None,
        }
    }

    pub fn key(&self, index: usize) -> Vec<u8> {
        format!("key/lease/{:x}/{index}", self.id).into_bytes()
    }

    /// A keep-alive sent at `sent_us` was answered at `now_us` with `ttl_s`.
    /// `slack_us` is how much sooner than its TTL a lease may vanish in true time.
    pub fn keep_alive_answered(&mut self, sent_us: u64, now_us: u64, ttl_s: i64, slack_us: u64) {
        if ttl_s > 0 {
            self.last_renewal_sent_us = Some(sent_us);
            return;
        }
        if self.seen_gone_us.is_none() {
            self.seen_gone_us = Some(now_us);
        }
        if let Some(renewed) = self.last_renewal_sent_us {
            let ttl_us = LEASE_TTL_S as u64 * 1_000_000;
            let lived_us = now_us.saturating_sub(renewed);
            if lived_us + slack_us < ttl_us {
                self.problems.push(format!(
                    "lease {:x} gone {} ms after a keep-alive sent at {} us was acknowledged (TTL {} s)",
                    self.id,
                    lived_us / 1000,
                    renewed,
                    LEASE_TTL_S
                ));
            }
        }
    }
}

/// How long after it was abandoned a lease must be gone: its TTL, a leader change's
/// checkpoint staleness (1 s) and grace (up to 2 s), drift and margin.
const EXPIRY_BOUND_US: u64 = (LEASE_TTL_S as u64 + 6) * 1_000_000;

/// Checks the end state (at `end_us`) against what the clients did. Each new leader
/// may restart a lease's timer at up to its TTL plus grace (etcd's promote does the
/// same), so an abandoned lease's bound runs from the later of its abandonment and
/// the newest leader's start (`last_leader_start_us`), not from the abandonment
/// alone: seed 3002054 had two leader changes after one, the second 8 s later.
pub fn check(
    clients: &[LeaseClient],
    store: &MvccStore,
    leases_left: &[i64],
    last_leader_start_us: u64,
    end_us: u64,
) -> Vec<String> {
    let mut violations: Vec<String> = Vec::new();
    for client in clients {
        violations.extend(client.problems.iter().map(|p| format!("lease client: {p}")));
        let attached =
            matches!(client.phase, Phase::KeepAlive | Phase::Abandoned | Phase::Revoke | Phase::Done);
        let abandoned_long_ago =
            client.abandoned_at_us.is_some_and(|at| at.max(last_leader_start_us) + EXPIRY_BOUND_US <= end_us);
        if abandoned_long_ago && leases_left.contains(&client.id) {
            violations.push(format!("lease {:x} was abandoned but never expired", client.id));
        }
        if attached && !leases_left.contains(&client.id) {
            violations.extend(check_one_revision(client, store));
        }
    }
    violations
}

/// All keys of a gone lease were deleted at one revision.
fn check_one_revision(client: &LeaseClient, store: &MvccStore) -> Vec<String> {
    let (events, _) =
        store.events(b"key/lease/", b"key/lease0", 1, usize::MAX).expect("the simulator never compacts");
    let mut revisions: BTreeMap<i64, usize> = BTreeMap::new();
    for event in events {
        let by_this_lease = event.prev_kv.as_ref().is_some_and(|p| p.lease == client.id);
        if event.kind == ChangeKind::Delete && by_this_lease {
            *revisions.entry(event.kv.mod_revision).or_default() += 1;
        }
    }
    if revisions.len() > 1 {
        vec![format!("lease {:x}: its keys were deleted at several revisions {revisions:?}", client.id)]
    } else {
        Vec::new()
    }
}
