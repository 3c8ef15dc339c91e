//! Clock offset estimation from heartbeat round trips (Cristian's method).
//!
//! A ping carries the sender's wall clock at sending; the peer answers with its own
//! wall clock. The answer was read somewhere inside the round trip, so the peer's
//! offset is `peer_wall - (sent_wall + rtt / 2)` with an error of at most `rtt / 2` (plus 1 ms: clocks are read in whole ms)
//! (round trip measured on the sender's monotonic clock). Of the last few samples,
//! the one with the shortest round trip has the tightest bound and is the one used,
//! as NTP's clock filter does.

use std::collections::VecDeque;

/// The resolution of the clock readings (whole milliseconds).
const CLOCK_RESOLUTION_MS: f64 = 1.0;

/// One sample, or the current estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockOffset {
    /// The peer's wall clock minus ours, in ms.
    pub offset_ms: f64,
    /// The true offset is within `offset_ms ± bound_ms`.
    pub bound_ms: f64,
}

impl ClockOffset {
    /// The smallest skew consistent with the estimate: `|offset| - bound`, at least 0.
    pub fn skew_at_least_ms(&self) -> f64 {
        (self.offset_ms.abs() - self.bound_ms).max(0.0)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClockEstimator {
    samples: VecDeque<ClockOffset>,
    samples_max: usize,
}

impl ClockEstimator {
    pub fn new(samples_max: usize) -> ClockEstimator {
        ClockEstimator { samples: VecDeque::new(), samples_max: samples_max.max(1) }
    }

    /// Records one round trip: we sent at `sent_wall_ms` (our wall clock), the peer
    /// answered with `peer_wall_ms`, and the whole trip took `rtt_ms` (monotonic).
    pub fn sample(&mut self, sent_wall_ms: i64, peer_wall_ms: i64, rtt_ms: f64) {
        let half = rtt_ms.max(0.0) / 2.0;
        let offset_ms = peer_wall_ms as f64 - (sent_wall_ms as f64 + half);
        if self.samples.len() >= self.samples_max {
            self.samples.pop_front();
        }
        // Both clocks are read in whole ms: the bound is widened by that resolution.
        let bound_ms = half + CLOCK_RESOLUTION_MS;
        self.samples.push_back(ClockOffset { offset_ms, bound_ms });
    }

    /// The sample with the tightest bound among the recent ones.
    pub fn estimate(&self) -> Option<ClockOffset> {
        self.samples.iter().copied().min_by(|a, b| a.bound_ms.total_cmp(&b.bound_ms))
    }
}
