//! Failure diagnosis and clock monitoring for one member: is each peer healthy,
//! slow, suspected, cut off from us only (link failure), or down?
//!
//! [`HealthMonitor`] is pure logic driven by the caller with explicit times
//! (monotonic ms for everything that decides, wall ms only to estimate clock
//! offsets): the server's health task and the simulator run the same code.
//!
//! How it decides, per peer:
//! - every `heartbeat_interval_ms` it asks for a [`Ping`] to be sent to each peer;
//!   the peer answers with a [`Pong`] echoing the ping's send times and adding its
//!   own wall clock. A pong is a heartbeat for the peer's [phi](phi) detector, a
//!   round-trip sample and a [clock](clock) sample.
//! - **healthy**: phi below `phi_slow_threshold` and round trips as usual.
//! - **slow**: phi in `[phi_slow_threshold, phi_threshold)` (its answers are later
//!   than a healthy peer's would be with probability 10^-phi_slow_threshold), or the
//!   median of its last 5 round trips is at least 4 times the median of its window
//!   and 20 ms above it (see `limits::HEALTH_SLOW_RTT_*`).
//! - **suspected**: phi reached `phi_threshold`; an indirect probe (as SWIM) is
//!   under way: every other peer that we still reach is asked to ping it.
//! - **link-failure**: a helper reached it: the fault is between it and us.
//! - **node-down**: no helper reached it within `probe_timeout_ms` (or there was no
//!   helper to ask: then it is down, or we are the one isolated). While phi stays
//!   above the threshold, a new probe round starts every `probe_timeout_ms`, so a
//!   link failure that becomes a crash (or the reverse) is noticed; a link failure
//!   becomes node-down only after 2 rounds in a row reach nobody
//!   (`limits::HEALTH_PROBE_ROUNDS_TO_OVERTURN`), so one lost probe does not flap it.
//! - as soon as a pong brings phi back under the threshold, the probe is dropped and
//!   the peer is healthy (or slow) again.
//!
//! A clock alarm is raised for a peer when `|offset| - bound > max_clock_skew_ms`
//! and cleared when that is no longer so. chorus never uses wall time for
//! correctness; the alarm is for operators.

pub mod clock;
pub mod phi;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::limits::{
    HEALTH_CLOCK_WINDOW_SAMPLES, HEALTH_HEARTBEAT_INTERVAL_MS_DEFAULT, HEALTH_HEARTBEAT_INTERVAL_MS_MAX,
    HEALTH_MAX_CLOCK_SKEW_MS_DEFAULT, HEALTH_PHI_ACCEPTABLE_PAUSE_MS_DEFAULT,
    HEALTH_PHI_MIN_STD_DEVIATION_MS_DEFAULT, HEALTH_PHI_SLOW_THRESHOLD_DEFAULT, HEALTH_PHI_THRESHOLD_DEFAULT,
    HEALTH_PHI_THRESHOLD_MAX, HEALTH_PHI_WINDOW_SAMPLES_DEFAULT, HEALTH_PHI_WINDOW_SAMPLES_MAX,
    HEALTH_PROBE_ROUNDS_TO_OVERTURN, HEALTH_PROBE_TIMEOUT_MS_DEFAULT, HEALTH_PROBE_TIMEOUT_MS_MAX,
    HEALTH_RTT_RECENT_SAMPLES, HEALTH_RTT_WINDOW_SAMPLES, HEALTH_SLOW_RTT_FACTOR, HEALTH_SLOW_RTT_MARGIN_MS,
    HEALTH_SLOW_RTT_SAMPLES_MIN,
};
use clock::{ClockEstimator, ClockOffset};
use phi::{PhiConfig, PhiDetector};

/// The failure detector's and clock monitor's parameters (`chorus serve` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub heartbeat_interval_ms: u64,
    pub phi_threshold: f64,
    pub phi_slow_threshold: f64,
    pub phi_window_samples: u32,
    pub phi_min_std_deviation_ms: u64,
    pub phi_acceptable_pause_ms: u64,
    pub probe_timeout_ms: u64,
    pub max_clock_skew_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_interval_ms: HEALTH_HEARTBEAT_INTERVAL_MS_DEFAULT,
            phi_threshold: HEALTH_PHI_THRESHOLD_DEFAULT,
            phi_slow_threshold: HEALTH_PHI_SLOW_THRESHOLD_DEFAULT,
            phi_window_samples: HEALTH_PHI_WINDOW_SAMPLES_DEFAULT,
            phi_min_std_deviation_ms: HEALTH_PHI_MIN_STD_DEVIATION_MS_DEFAULT,
            phi_acceptable_pause_ms: HEALTH_PHI_ACCEPTABLE_PAUSE_MS_DEFAULT,
            probe_timeout_ms: HEALTH_PROBE_TIMEOUT_MS_DEFAULT,
            max_clock_skew_ms: HEALTH_MAX_CLOCK_SKEW_MS_DEFAULT,
        }
    }
}

impl HealthConfig {
    /// Checks every parameter; the message names the flag and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms > HEALTH_HEARTBEAT_INTERVAL_MS_MAX {
            return Err(format!(
                "--health-heartbeat-interval must be between 1 and {HEALTH_HEARTBEAT_INTERVAL_MS_MAX} ms, not {}",
                self.heartbeat_interval_ms
            ));
        }
        if !(self.phi_threshold.is_finite()
            && self.phi_threshold > 0.0
            && self.phi_threshold <= HEALTH_PHI_THRESHOLD_MAX)
        {
            return Err(format!(
                "--phi-threshold must be above 0 and at most {HEALTH_PHI_THRESHOLD_MAX}, not {}",
                self.phi_threshold
            ));
        }
        if !(self.phi_slow_threshold.is_finite()
            && self.phi_slow_threshold > 0.0
            && self.phi_slow_threshold < self.phi_threshold)
        {
            return Err(format!(
                "--phi-slow-threshold must be above 0 and below --phi-threshold ({}), not {}",
                self.phi_threshold, self.phi_slow_threshold
            ));
        }
        if self.phi_window_samples < 2 || self.phi_window_samples > HEALTH_PHI_WINDOW_SAMPLES_MAX {
            return Err(format!(
                "--phi-window must be between 2 and {HEALTH_PHI_WINDOW_SAMPLES_MAX} samples, not {}",
                self.phi_window_samples
            ));
        }
        if self.phi_min_std_deviation_ms == 0 {
            return Err("--phi-min-std-deviation must be at least 1 ms".into());
        }
        if self.phi_acceptable_pause_ms > HEALTH_PROBE_TIMEOUT_MS_MAX {
            return Err(format!(
                "--phi-acceptable-pause must be at most {HEALTH_PROBE_TIMEOUT_MS_MAX} ms, not {}",
                self.phi_acceptable_pause_ms
            ));
        }
        if self.probe_timeout_ms < self.heartbeat_interval_ms
            || self.probe_timeout_ms > HEALTH_PROBE_TIMEOUT_MS_MAX
        {
            return Err(format!(
                "--probe-timeout must be between --health-heartbeat-interval ({} ms) and {HEALTH_PROBE_TIMEOUT_MS_MAX} ms, not {}",
                self.heartbeat_interval_ms, self.probe_timeout_ms
            ));
        }
        if self.max_clock_skew_ms == 0 {
            return Err("--max-clock-skew must be at least 1 ms".into());
        }
        Ok(())
    }

    fn phi_config(&self) -> PhiConfig {
        PhiConfig {
            window_samples: self.phi_window_samples,
            min_std_deviation_ms: self.phi_min_std_deviation_ms as f64,
            acceptable_pause_ms: self.phi_acceptable_pause_ms as f64,
            first_estimate_ms: self.heartbeat_interval_ms as f64,
        }
    }
}

/// What this member thinks of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Diagnosis {
    Healthy,
    Slow,
    Suspected,
    LinkFailure,
    NodeDown,
}

impl Diagnosis {
    /// The name used by the API, the CLI, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Diagnosis::Healthy => "healthy",
            Diagnosis::Slow => "slow",
            Diagnosis::Suspected => "suspected",
            Diagnosis::LinkFailure => "link-failure",
            Diagnosis::NodeDown => "node-down",
        }
    }

    /// Whether heartbeats get through (healthy or slow).
    pub fn is_reachable(self) -> bool {
        matches!(self, Diagnosis::Healthy | Diagnosis::Slow)
    }
}

/// A heartbeat to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub seq: u64,
    /// The sender's monotonic clock at sending, in ms.
    pub sent_mono_ms: u64,
    /// The sender's wall clock at sending, in ms since the Unix epoch.
    pub sent_wall_ms: i64,
}

/// A peer's answer to a [`Ping`], echoing its times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub seq: u64,
    pub sent_mono_ms: u64,
    pub sent_wall_ms: i64,
    /// The answering peer's wall clock when it answered.
    pub reply_wall_ms: i64,
}

/// The answer to `ping`, given the answering member's wall clock.
pub fn answer_ping(ping: &Ping, now_wall_ms: i64) -> Pong {
    Pong {
        seq: ping.seq,
        sent_mono_ms: ping.sent_mono_ms,
        sent_wall_ms: ping.sent_wall_ms,
        reply_wall_ms: now_wall_ms,
    }
}

/// What the caller must do, or report.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthEffect {
    SendPing {
        to: u64,
        ping: Ping,
    },
    /// Ask `helper` to ping `target` and tell us, as [`HealthMonitor::on_probe_result`]
    /// with the same `round`, whether it got an answer.
    AskProbe {
        helper: u64,
        target: u64,
        round: u64,
    },
    DiagnosisChanged {
        peer: u64,
        from: Diagnosis,
        to: Diagnosis,
        phi: f64,
    },
    ClockAlarm {
        peer: u64,
        offset: ClockOffset,
        raised: bool,
    },
}

/// One peer as seen from this member, for the API, CLI and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReport {
    pub peer: u64,
    pub diagnosis: Diagnosis,
    pub phi: f64,
    pub rtt_ms_p50: Option<f64>,
    pub rtt_ms_p99: Option<f64>,
    pub clock: Option<ClockOffset>,
    pub clock_alarm: bool,
    /// ms since the last pong (or since the monitor started).
    pub last_heard_ms_ago: u64,
}

#[derive(Debug, Clone)]
struct ProbeRound {
    round: u64,
    started_ms: u64,
    /// Helpers that have not answered yet.
    pending: BTreeSet<u64>,
    reached_by: Option<u64>,
    concluded: bool,
}

#[derive(Debug, Clone)]
struct PeerState {
    detector: PhiDetector,
    rtts_ms: VecDeque<f64>,
    clock: ClockEstimator,
    clock_alarm: bool,
    diagnosis: Diagnosis,
    probe: Option<ProbeRound>,
    /// Probe rounds in a row that reached nobody.
    rounds_unreached: u32,
}

/// The health of every peer, as seen from one member.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    self_id: u64,
    config: HealthConfig,
    peers: BTreeMap<u64, PeerState>,
    next_ping_ms: u64,
    next_seq: u64,
    next_round: u64,
}

impl HealthMonitor {
    /// A monitor for `self_id` watching `peers` (ids other than `self_id`), started
    /// at monotonic time `now_ms`.
    pub fn new(
        self_id: u64,
        peers: impl IntoIterator<Item = u64>,
        config: HealthConfig,
        now_ms: u64,
    ) -> Self {
        let peers = peers
            .into_iter()
            .filter(|&peer| peer != self_id)
            .map(|peer| {
                let state = PeerState {
                    detector: PhiDetector::new(config.phi_config(), now_ms),
                    rtts_ms: VecDeque::new(),
                    clock: ClockEstimator::new(HEALTH_CLOCK_WINDOW_SAMPLES),
                    clock_alarm: false,
                    diagnosis: Diagnosis::Healthy,
                    probe: None,
                    rounds_unreached: 0,
                };
                (peer, state)
            })
            .collect();
        HealthMonitor { self_id, config, peers, next_ping_ms: now_ms, next_seq: 1, next_round: 1 }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    pub fn self_id(&self) -> u64 {
        self.self_id
    }

    pub fn peer_ids(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }

    pub fn diagnosis(&self, peer: u64) -> Option<Diagnosis> {
        self.peers.get(&peer).map(|state| state.diagnosis)
    }

    /// Call often (at least every heartbeat interval): sends pings when due (stamped
    /// with both clocks), and re-evaluates every peer.
    pub fn on_tick(&mut self, now_ms: u64, now_wall_ms: i64) -> Vec<HealthEffect> {
        let mut effects = Vec::new();
        if now_ms >= self.next_ping_ms {
            for &to in self.peers.keys() {
                let ping = Ping { seq: self.next_seq, sent_mono_ms: now_ms, sent_wall_ms: now_wall_ms };
                effects.push(HealthEffect::SendPing { to, ping });
            }
            self.next_seq += 1;
            self.next_ping_ms = now_ms + self.config.heartbeat_interval_ms;
        }
        for peer in self.peer_ids() {
            self.evaluate(peer, now_ms, &mut effects);
        }
        effects
    }

    /// A pong from `from` arrived at monotonic time `now_ms`.
    pub fn on_pong(&mut self, from: u64, pong: &Pong, now_ms: u64) -> Vec<HealthEffect> {
        let mut effects = Vec::new();
        let threshold = self.config.phi_threshold;
        let max_skew_ms = self.config.max_clock_skew_ms as f64;
        let Some(state) = self.peers.get_mut(&from) else { return effects };
        if pong.sent_mono_ms > now_ms {
            return effects; // not a pong to any ping of ours
        }
        let rtt_ms = (now_ms - pong.sent_mono_ms) as f64;
        state.detector.heartbeat(now_ms, threshold);
        if state.rtts_ms.len() >= HEALTH_RTT_WINDOW_SAMPLES {
            state.rtts_ms.pop_front();
        }
        state.rtts_ms.push_back(rtt_ms);
        state.clock.sample(pong.sent_wall_ms, pong.reply_wall_ms, rtt_ms);
        if let Some(offset) = state.clock.estimate() {
            let alarm = offset.skew_at_least_ms() > max_skew_ms;
            if alarm != state.clock_alarm {
                state.clock_alarm = alarm;
                effects.push(HealthEffect::ClockAlarm { peer: from, offset, raised: alarm });
            }
        }
        self.evaluate(from, now_ms, &mut effects);
        effects
    }

    /// A helper's answer to an [`HealthEffect::AskProbe`] (`reached` false also when
    /// the helper itself could not be asked).
    pub fn on_probe_result(
        &mut self,
        helper: u64,
        target: u64,
        round: u64,
        reached: bool,
        now_ms: u64,
    ) -> Vec<HealthEffect> {
        let mut effects = Vec::new();
        let Some(state) = self.peers.get_mut(&target) else { return effects };
        let Some(probe) = state.probe.as_mut() else { return effects };
        if probe.round != round || probe.concluded || !probe.pending.remove(&helper) {
            return effects;
        }
        if reached {
            probe.reached_by = Some(helper);
        }
        self.evaluate(target, now_ms, &mut effects);
        effects
    }

    /// Every peer's state at `now_ms`.
    pub fn report(&self, now_ms: u64) -> Vec<PeerReport> {
        self.peers
            .iter()
            .map(|(&peer, state)| {
                let mut sorted: Vec<f64> = state.rtts_ms.iter().copied().collect();
                sorted.sort_by(f64::total_cmp);
                PeerReport {
                    peer,
                    diagnosis: state.diagnosis,
                    phi: state.detector.phi(now_ms),
                    rtt_ms_p50: percentile(&sorted, 0.50),
                    rtt_ms_p99: percentile(&sorted, 0.99),
                    clock: state.clock.estimate(),
                    clock_alarm: state.clock_alarm,
                    last_heard_ms_ago: now_ms.saturating_sub(state.detector.last_arrival_ms()),
                }
            })
            .collect()
    }

    fn evaluate(&mut self, peer: u64, now_ms: u64, effects: &mut Vec<HealthEffect>) {
        let reachable_helpers: BTreeSet<u64> = self
            .peers
            .iter()
            .filter(|(&id, state)| id != peer && state.diagnosis.is_reachable())
            .map(|(&id, _)| id)
            .collect();
        let config = self.config.clone();
        let Some(state) = self.peers.get_mut(&peer) else { return };
        let phi = state.detector.phi(now_ms);
        let next = if phi < config.phi_threshold {
            state.probe = None;
            state.rounds_unreached = 0;
            if phi >= config.phi_slow_threshold || rtt_is_slow(&state.rtts_ms) {
                Diagnosis::Slow
            } else {
                Diagnosis::Healthy
            }
        } else {
            let start_round = match &state.probe {
                None => true,
                Some(probe) => probe.concluded && now_ms >= probe.started_ms + config.probe_timeout_ms,
            };
            if start_round {
                let round = self.next_round;
                self.next_round += 1;
                for &helper in &reachable_helpers {
                    effects.push(HealthEffect::AskProbe { helper, target: peer, round });
                }
                state.probe = Some(ProbeRound {
                    round,
                    started_ms: now_ms,
                    pending: reachable_helpers,
                    reached_by: None,
                    concluded: false,
                });
            }
            let probe = state.probe.as_mut().expect("a probe round exists while suspected");
            if !probe.concluded && now_ms >= probe.started_ms + config.probe_timeout_ms {
                probe.pending.clear(); // helpers that did not answer in time count as "not reached"
            }
            if !probe.concluded && (probe.reached_by.is_some() || probe.pending.is_empty()) {
                probe.concluded = true;
                if probe.reached_by.is_some() {
                    state.rounds_unreached = 0;
                } else {
                    state.rounds_unreached += 1;
                }
            }
            if !probe.concluded {
                match state.diagnosis {
                    // Keep the last conclusion while a new round runs.
                    Diagnosis::LinkFailure | Diagnosis::NodeDown => state.diagnosis,
                    _ => Diagnosis::Suspected,
                }
            } else if probe.reached_by.is_some() {
                Diagnosis::LinkFailure
            } else if state.diagnosis == Diagnosis::LinkFailure
                && state.rounds_unreached < HEALTH_PROBE_ROUNDS_TO_OVERTURN
            {
                // One lost probe does not turn a known link failure into a crash.
                Diagnosis::LinkFailure
            } else {
                Diagnosis::NodeDown
            }
        };
        if next != state.diagnosis {
            effects.push(HealthEffect::DiagnosisChanged { peer, from: state.diagnosis, to: next, phi });
            state.diagnosis = next;
        }
    }
}

/// Whether the recent round trips are well above the usual (see the module doc).
fn rtt_is_slow(rtts_ms: &VecDeque<f64>) -> bool {
    if rtts_ms.len() < HEALTH_SLOW_RTT_SAMPLES_MIN {
        return false;
    }
    let mut all: Vec<f64> = rtts_ms.iter().copied().collect();
    all.sort_by(f64::total_cmp);
    let mut recent: Vec<f64> = rtts_ms.iter().rev().take(HEALTH_RTT_RECENT_SAMPLES).copied().collect();
    recent.sort_by(f64::total_cmp);
    let (Some(usual), Some(now)) = (percentile(&all, 0.5), percentile(&recent, 0.5)) else { return false };
    now >= usual * HEALTH_SLOW_RTT_FACTOR && now >= usual + HEALTH_SLOW_RTT_MARGIN_MS
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
