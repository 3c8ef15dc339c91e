//! The leader's lease timers. Not replicated: only the leader decides that a lease
//! has expired, on its own monotonic clock (raft ticks), and carries the decision
//! out by proposing a revoke through the log.
//!
//! - A lease expires no sooner than its TTL after the last keep-alive this leader
//!   received: ticks come from a monotonic clock and arrive late, never early, so
//!   counting ticks can only lengthen a lease. Wall-clock time is never read.
//! - A new leader does not restart TTLs from full, nor expire leases early: it
//!   starts each lease at its last checkpointed remaining TTL (replicated through
//!   the log every [`crate::limits::LEASE_CHECKPOINT_INTERVAL_MS`]) plus one
//!   election timeout of grace, during which clients find the new leader.
//! - Expiry is rate-limited: at most a bounded number of revokes per tick, so a
//!   mass expiry cannot stall writes.

use std::collections::BTreeMap;

/// One member's view of lease deadlines, valid while it leads.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    tick_ms: u64,
    grace_ticks: u64,
    now_tick: u64,
    leading: bool,
    /// Lease id to the tick at which it expires.
    deadlines: BTreeMap<i64, u64>,
    /// Leases whose revoke was proposed, to the tick it was: asked again only if
    /// the revoke has not been applied after `grace_ticks`.
    revoking: BTreeMap<i64, u64>,
    last_checkpoint_tick: u64,
}

impl LeaseClock {
    /// `tick_ms`: the length of a tick; `grace_ticks`: the election timeout.
    pub fn new(tick_ms: u64, grace_ticks: u64) -> LeaseClock {
        assert!(tick_ms > 0, "a tick has a length");
        LeaseClock {
            tick_ms,
            grace_ticks,
            now_tick: 0,
            leading: false,
            deadlines: BTreeMap::new(),
            revoking: BTreeMap::new(),
            last_checkpoint_tick: 0,
        }
    }

    pub fn tick(&mut self) {
        self.now_tick += 1;
    }

    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// Starts the timers when this member becomes leader: each lease at its
    /// remaining TTL (the last checkpoint, or the granted TTL) plus the grace.
    pub fn become_leader(&mut self, leases: impl IntoIterator<Item = (i64, i64)>) {
        self.leading = true;
        self.revoking.clear();
        self.last_checkpoint_tick = self.now_tick;
        self.deadlines = leases
            .into_iter()
            .map(|(id, remaining_s)| (id, self.now_tick + self.ticks(remaining_s) + self.grace_ticks))
            .collect();
    }

    /// Forgets every timer when this member stops leading.
    pub fn step_down(&mut self) {
        self.leading = false;
        self.deadlines.clear();
        self.revoking.clear();
    }

    /// A lease was granted (applied): its timer starts now.
    pub fn granted(&mut self, id: i64, ttl_s: i64) {
        if self.leading {
            self.deadlines.insert(id, self.now_tick + self.ticks(ttl_s));
        }
    }

    /// A lease was revoked (applied).
    pub fn removed(&mut self, id: i64) {
        self.deadlines.remove(&id);
        self.revoking.remove(&id);
    }

    /// A keep-alive: the lease lives `ttl_s` from now. False if this member does not
    /// lead or does not know the lease (the caller answers accordingly).
    pub fn renew(&mut self, id: i64, ttl_s: i64) -> bool {
        if !self.leading || self.revoking.contains_key(&id) {
            return false;
        }
        let deadline = self.now_tick + self.ticks(ttl_s);
        match self.deadlines.get_mut(&id) {
            Some(slot) => {
                *slot = deadline;
                true
            }
            None => false,
        }
    }

    /// Seconds left before the lease expires, rounded up; None when not leading or
    /// unknown.
    pub fn remaining_s(&self, id: i64) -> Option<i64> {
        if !self.leading {
            return None;
        }
        let deadline = *self.deadlines.get(&id)?;
        let left_ms = deadline.saturating_sub(self.now_tick) * self.tick_ms;
        Some(left_ms.div_ceil(1000) as i64)
    }

    /// Leases past their deadline whose revoke should be proposed now, at most
    /// `max`; each is then not offered again for a grace period.
    pub fn take_expired(&mut self, max: usize) -> Vec<i64> {
        if !self.leading {
            return Vec::new();
        }
        let now = self.now_tick;
        let grace = self.grace_ticks;
        self.revoking.retain(|_, asked| now - *asked < grace);
        let expired: Vec<i64> = self
            .deadlines
            .iter()
            .filter(|(id, deadline)| **deadline <= now && !self.revoking.contains_key(id))
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        for id in &expired {
            self.revoking.insert(*id, now);
        }
        expired
    }

    /// Every `interval_ms`, the remaining TTL of every lease (at most `max`), to be
    /// checkpointed through the log.
    pub fn take_checkpoint(&mut self, interval_ms: u64, max: usize) -> Vec<(i64, i64)> {
        if !self.leading || (self.now_tick - self.last_checkpoint_tick) * self.tick_ms < interval_ms {
            return Vec::new();
        }
        self.last_checkpoint_tick = self.now_tick;
        self.deadlines.keys().take(max).filter_map(|id| Some((*id, self.remaining_s(*id)?))).collect()
    }

    /// Whole ticks that surely span `seconds`: rounded up, plus one, because the
    /// current tick has partly passed already (a renewal just before the next tick
    /// must still get its whole TTL).
    fn ticks(&self, seconds: i64) -> u64 {
        (seconds.max(0) as u64 * 1000).div_ceil(self.tick_ms) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_no_sooner_than_its_ttl_after_the_last_renewal() {
        let mut clock = LeaseClock::new(100, 10);
        clock.become_leader([]);
        clock.granted(1, 2); // 20 ticks, plus the partly passed one
        for _ in 0..15 {
            clock.tick();
        }
        assert!(clock.renew(1, 2));
        for _ in 0..20 {
            clock.tick();
            assert!(clock.take_expired(10).is_empty(), "not before the TTL");
        }
        clock.tick();
        assert_eq!(clock.take_expired(10), vec![1]);
        assert!(clock.take_expired(10).is_empty(), "not proposed twice within the grace");
    }

    #[test]
    fn a_new_leader_starts_from_the_checkpoint_plus_grace() {
        let mut clock = LeaseClock::new(100, 10);
        clock.become_leader([(7, 3)]); // 30 ticks + 1 + 10 grace
        assert_eq!(clock.remaining_s(7), Some(5));
        for _ in 0..40 {
            clock.tick();
        }
        assert!(clock.take_expired(10).is_empty());
        clock.tick();
        assert_eq!(clock.take_expired(10), vec![7]);
    }

    #[test]
    fn followers_decide_nothing() {
        let mut clock = LeaseClock::new(100, 10);
        clock.granted(1, 1);
        for _ in 0..100 {
            clock.tick();
        }
        assert!(clock.take_expired(10).is_empty());
        assert!(!clock.renew(1, 1));
        assert_eq!(clock.remaining_s(1), None);
    }

    #[test]
    fn expiry_is_rate_limited() {
        let mut clock = LeaseClock::new(100, 10);
        clock.become_leader((0..50).map(|id| (id, 0)));
        for _ in 0..11 {
            clock.tick();
        }
        assert_eq!(clock.take_expired(20).len(), 20);
        assert_eq!(clock.take_expired(20).len(), 20);
        assert_eq!(clock.take_expired(20).len(), 10);
    }

    #[test]
    fn checkpoints_come_at_the_interval() {
        let mut clock = LeaseClock::new(100, 10);
        clock.become_leader([(1, 60)]);
        for _ in 0..49 {
            clock.tick();
            assert!(clock.take_checkpoint(5000, 100).is_empty());
        }
        clock.tick();
        assert_eq!(
            clock.take_checkpoint(5000, 100),
            vec![(1, 57)],
            "60 s + 1 tick + 1 s grace - 5 s, rounded up"
        );
    }
}
