//! The phi accrual failure detector (Hayashibara et al., 2004), as Akka and
//! Cassandra use it.
//!
//! Instead of a yes/no timeout it gives a suspicion level `phi` that grows with the
//! time since the last heartbeat, relative to the distribution of the inter-arrival
//! times seen so far: `phi = -log10(P(a heartbeat comes later than now))`. phi 1
//! means a 10% chance that a healthy peer's heartbeat is still on its way, phi 8 a
//! chance of one in 10^8. The distribution is taken as normal with the window's mean
//! plus an acceptable pause, and a standard deviation of at least a floor (so that
//! perfectly regular heartbeats do not make the slightest delay look fatal). The
//! normal tail is computed with Akka's logistic approximation
//! (`1 / (1 + e^(-y (1.5976 + 0.070566 y^2)))`, error below 0.0002), which stays
//! finite far into the tail.
//!
//! Times are milliseconds of a monotonic clock, passed in: no clock is read here.

use std::collections::VecDeque;

/// Parameters of one detector.
#[derive(Debug, Clone, PartialEq)]
pub struct PhiConfig {
    /// Inter-arrival times remembered.
    pub window_samples: u32,
    /// Floor of the standard deviation, in ms.
    pub min_std_deviation_ms: f64,
    /// Added to the mean inter-arrival time: a pause this long costs nothing.
    pub acceptable_pause_ms: f64,
    /// The expected inter-arrival time before any has been measured (the heartbeat
    /// interval); seeds the window so that a peer never heard from is suspected too.
    pub first_estimate_ms: f64,
}

/// One peer's detector.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    config: PhiConfig,
    intervals_ms: VecDeque<f64>,
    sum_ms: f64,
    sum_squares: f64,
    last_arrival_ms: u64,
}

impl PhiDetector {
    /// A detector that counts time from `now_ms` as if a heartbeat had just arrived.
    pub fn new(config: PhiConfig, now_ms: u64) -> PhiDetector {
        let mut detector = PhiDetector {
            intervals_ms: VecDeque::new(),
            sum_ms: 0.0,
            sum_squares: 0.0,
            last_arrival_ms: now_ms,
            config,
        };
        // As Akka: two samples around the first estimate give a mean of the
        // estimate and a deviation of a quarter of it.
        let estimate = detector.config.first_estimate_ms;
        detector.record(estimate - estimate / 4.0);
        detector.record(estimate + estimate / 4.0);
        detector
    }

    /// A heartbeat arrived at `now_ms`. An interval long enough to have made phi
    /// reach `suspect_phi` is not recorded: an outage is not what a healthy peer's
    /// heartbeats look like, and learning it would make the detector lenient.
    pub fn heartbeat(&mut self, now_ms: u64, suspect_phi: f64) {
        let interval_ms = now_ms.saturating_sub(self.last_arrival_ms) as f64;
        if self.phi(now_ms) < suspect_phi {
            self.record(interval_ms);
        }
        self.last_arrival_ms = now_ms.max(self.last_arrival_ms);
    }

    fn record(&mut self, interval_ms: f64) {
        if self.intervals_ms.len() >= self.config.window_samples.max(1) as usize {
            if let Some(old) = self.intervals_ms.pop_front() {
                self.sum_ms -= old;
                self.sum_squares -= old * old;
            }
        }
        self.intervals_ms.push_back(interval_ms);
        self.sum_ms += interval_ms;
        self.sum_squares += interval_ms * interval_ms;
    }

    pub fn last_arrival_ms(&self) -> u64 {
        self.last_arrival_ms
    }

    /// Mean inter-arrival time of the window, in ms.
    pub fn mean_ms(&self) -> f64 {
        self.sum_ms / self.intervals_ms.len().max(1) as f64
    }

    /// Standard deviation used: the window's, or the floor if larger.
    pub fn std_deviation_ms(&self) -> f64 {
        let n = self.intervals_ms.len().max(1) as f64;
        let mean = self.sum_ms / n;
        let variance = (self.sum_squares / n - mean * mean).max(0.0);
        variance.sqrt().max(self.config.min_std_deviation_ms)
    }

    /// The suspicion level at `now_ms`.
    pub fn phi(&self, now_ms: u64) -> f64 {
        let elapsed_ms = now_ms.saturating_sub(self.last_arrival_ms) as f64;
        phi_of(elapsed_ms, self.mean_ms() + self.config.acceptable_pause_ms, self.std_deviation_ms())
    }
}

/// `-log10(P(X > elapsed))` for `X ~ Normal(mean, std)`, with Akka's approximation.
pub fn phi_of(elapsed_ms: f64, mean_ms: f64, std_deviation_ms: f64) -> f64 {
    let y = (elapsed_ms - mean_ms) / std_deviation_ms;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    // P(later) = e / (1 + e) past the mean; computed as 1 - 1/(1+e) before it. For
    // very large y, e underflows to 0: phi is then capped rather than infinite.
    let p_later = if elapsed_ms > mean_ms { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
    (-p_later.max(f64::MIN_POSITIVE).log10()).max(0.0)
}
