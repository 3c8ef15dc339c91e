//! The failure detector and clock monitor under simulated faults: every node runs
//! the production `chorus_core::health::HealthMonitor`, driven exactly as the
//! server's health task drives it (a tick every 10 ms, pings and pongs, indirect
//! probes through helpers that ping the target themselves), over a seeded network
//! (per-message delay and loss, per-direction link cuts), with crashes and
//! per-node clocks (monotonic drift, wall-clock offset).
//!
//! This world is separate from [`crate::world`]: the health layer sits beside Raft
//! (its own messages, no storage), so its faults can be scripted precisely (cut
//! exactly one link, skew exactly one clock) and checked against what every node
//! reports. Everything derives from the seed; the same seed gives the same trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use chorus_core::health::{answer_ping, Diagnosis, HealthConfig, HealthEffect, HealthMonitor, Ping, Pong};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How often each node ticks its monitor, as the server does.
const TICK_US: u64 = 10_000;
/// A helper's tries at pinging a probe's target, and the time between them.
const PROBE_PING_TRIES: u64 = 3;
const PROBE_PING_RETRY_US: u64 = 200_000;
/// Base wall clock of the simulation (some day in 2026), in ms.
const WALL_EPOCH_MS: i64 = 1_790_000_000_000;

#[derive(Debug, Clone)]
enum Event {
    Tick(usize),
    Ping { to: usize, from: usize, ping: Ping, probe_for: Option<(usize, u64)> },
    Pong { to: usize, from: usize, pong: Pong, probe_for: Option<(usize, u64)> },
    ProbeRequest { to: usize, from: usize, target: usize, round: u64 },
    ProbeAnswer { to: usize, from: usize, target: usize, round: u64 },
}

impl Event {
    fn node(&self) -> usize {
        match self {
            Event::Tick(to)
            | Event::Ping { to, .. }
            | Event::Pong { to, .. }
            | Event::ProbeRequest { to, .. }
            | Event::ProbeAnswer { to, .. } => *to,
        }
    }
}

struct Node {
    monitor: HealthMonitor,
    alive: bool,
    /// Incremented on each restart: events for an older incarnation are dropped.
    incarnation: u64,
    /// Monotonic clock rate error, in parts per million.
    drift_ppm: i64,
    /// Monotonic time at the node's (re)start, in sim µs, so its clock starts at 0.
    boot_us: u64,
    wall_offset_ms: i64,
}

/// One diagnosis change seen by one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub at_us: u64,
    pub node: usize,
    pub peer: usize,
    pub from: Diagnosis,
    pub to: Diagnosis,
}

pub struct HealthWorld {
    nodes: Vec<Node>,
    config: HealthConfig,
    rng: ChaCha8Rng,
    now_us: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: BTreeMap<u64, (u64, Event)>,
    next_event: u64,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(usize, usize)>,
    loss_per_million: u32,
    delay_us_max: u64,
    pub transitions: Vec<Transition>,
    /// (node, peer) pairs whose clock alarm is raised.
    pub alarms: BTreeSet<(usize, usize)>,
    trace_hash: u64,
}

impl HealthWorld {
    /// `nodes_count` nodes, started at once, with seeded delays, loss and drift.
    pub fn new(seed: u64, nodes_count: usize, config: HealthConfig) -> HealthWorld {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let delay_us_max = rng.random_range(500..5_000);
        let loss_per_million = rng.random_range(0..20_000); // up to 2% loss
        let nodes = (0..nodes_count)
            .map(|i| Node {
                monitor: HealthMonitor::new(i as u64, 0..nodes_count as u64, config.clone(), 0),
                alive: true,
                incarnation: 0,
                drift_ppm: rng.random_range(-200..=200),
                boot_us: 0,
                wall_offset_ms: rng.random_range(-50..=50),
            })
            .collect();
        let mut world = HealthWorld {
            nodes,
            config,
            rng,
            now_us: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            cut: BTreeSet::new(),
            loss_per_million,
            delay_us_max,
            transitions: Vec::new(),
            alarms: BTreeSet::new(),
            trace_hash: seed,
        };
        for i in 0..nodes_count {
            let phase = world.rng.random_range(0..TICK_US);
            world.schedule(phase, Event::Tick(i));
        }
        world
    }

    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace_hash
    }

    /// Cuts (or heals) the link between `a` and `b`, both directions.
    pub fn set_link(&mut self, a: usize, b: usize, up: bool) {
        for link in [(a, b), (b, a)] {
            if up {
                self.cut.remove(&link);
            } else {
                self.cut.insert(link);
            }
        }
    }

    pub fn crash(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.nodes[i].incarnation += 1;
        self.alarms.retain(|&(node, _)| node != i);
    }

    /// Restarts a crashed node with a fresh monitor (a new process).
    pub fn restart(&mut self, i: usize) {
        let count = self.nodes.len() as u64;
        let node = &mut self.nodes[i];
        node.alive = true;
        node.incarnation += 1;
        node.boot_us = self.now_us;
        node.monitor = HealthMonitor::new(i as u64, 0..count, self.config.clone(), 0);
        self.schedule(TICK_US, Event::Tick(i));
    }

    /// Sets node `i`'s wall clock to read `offset_ms` off the true time.
    pub fn set_wall_offset(&mut self, i: usize, offset_ms: i64) {
        self.nodes[i].wall_offset_ms = offset_ms;
    }

    /// What node `node` thinks of `peer` now.
    pub fn diagnosis(&self, node: usize, peer: usize) -> Diagnosis {
        self.nodes[node].monitor.diagnosis(peer as u64).expect("a peer")
    }

    /// Runs the world for `duration_us` of simulated time.
    pub fn run_for(&mut self, duration_us: u64) {
        let end = self.now_us + duration_us;
        while let Some(Reverse((at, id, _))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now_us = at;
            let (incarnation, event) = self.events.remove(&id).expect("scheduled event");
            let node = event.node();
            if !self.nodes[node].alive || self.nodes[node].incarnation != incarnation {
                continue; // a crashed node does nothing; a restarted one forgets
            }
            self.handle(event);
        }
        self.now_us = end;
    }

    fn schedule(&mut self, delay_us: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        let node = event.node();
        self.queue.push(Reverse((self.now_us + delay_us, id, node)));
        self.events.insert(id, (self.nodes[node].incarnation, event));
    }

    /// Sends a message over the network: dropped if the link is cut or by loss.
    fn send(&mut self, from: usize, to: usize, event: Event) {
        let lost = self.rng.random_range(0..1_000_000) < self.loss_per_million;
        let delay = self.rng.random_range(100..=self.delay_us_max);
        if self.cut.contains(&(from, to)) || lost {
            return;
        }
        self.schedule(delay, event);
    }

    fn mono_ms(&self, i: usize) -> u64 {
        let node = &self.nodes[i];
        let elapsed = (self.now_us - node.boot_us) as i64;
        ((elapsed + elapsed * node.drift_ppm / 1_000_000) / 1000).max(0) as u64
    }

    fn wall_ms(&self, i: usize) -> i64 {
        WALL_EPOCH_MS + (self.now_us / 1000) as i64 + self.nodes[i].wall_offset_ms
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(i) => {
                let (now, wall) = (self.mono_ms(i), self.wall_ms(i));
                let effects = self.nodes[i].monitor.on_tick(now, wall);
                self.perform(i, effects);
                self.schedule(TICK_US, Event::Tick(i));
            }
            Event::Ping { to, from, ping, probe_for } => {
                let pong = answer_ping(&ping, self.wall_ms(to));
                self.send(to, from, Event::Pong { to: from, from: to, pong, probe_for });
            }
            Event::Pong { to, from, pong, probe_for: None } => {
                let now = self.mono_ms(to);
                let effects = self.nodes[to].monitor.on_pong(from as u64, &pong, now);
                self.perform(to, effects);
            }
            Event::Pong { to, from, probe_for: Some((requester, round)), .. } => {
                // `to` helped `requester` and reached `from`: tell the requester.
                self.send(to, requester, Event::ProbeAnswer { to: requester, from: to, target: from, round });
            }
            Event::ProbeRequest { to, from, target, round } => {
                // The server's helper pings over TCP, which retransmits what is lost:
                // modelled as a few tries within the probe's budget.
                let ping = Ping { seq: 0, sent_mono_ms: self.mono_ms(to), sent_wall_ms: self.wall_ms(to) };
                for attempt in 0..PROBE_PING_TRIES {
                    let event = Event::Ping { to: target, from: to, ping, probe_for: Some((from, round)) };
                    let delay =
                        attempt * PROBE_PING_RETRY_US + self.rng.random_range(100..=self.delay_us_max);
                    let lost = self.rng.random_range(0..1_000_000) < self.loss_per_million;
                    if !self.cut.contains(&(to, target)) && !lost {
                        self.schedule(delay, event);
                    }
                }
            }
            Event::ProbeAnswer { to, from, target, round } => {
                let now = self.mono_ms(to);
                let effects =
                    self.nodes[to].monitor.on_probe_result(from as u64, target as u64, round, true, now);
                self.perform(to, effects);
            }
        }
    }

    /// Performs a node's effects as the server's health task does. A helper that
    /// does not reach the target sends nothing back: the requester's probe round
    /// times out, which counts as "not reached" (the server's helper answers
    /// `reached: false` at its own timeout, with the same effect).
    fn perform(&mut self, i: usize, effects: Vec<HealthEffect>) {
        for effect in effects {
            match effect {
                HealthEffect::SendPing { to, ping } => {
                    let to = to as usize;
                    self.send(i, to, Event::Ping { to, from: i, ping, probe_for: None });
                }
                HealthEffect::AskProbe { helper, target, round } => {
                    let (helper, target) = (helper as usize, target as usize);
                    self.send(i, helper, Event::ProbeRequest { to: helper, from: i, target, round });
                }
                HealthEffect::DiagnosisChanged { peer, from, to, .. } => {
                    let peer = peer as usize;
                    self.mix(&[self.now_us, i as u64, peer as u64, to as u64]);
                    self.transitions.push(Transition { at_us: self.now_us, node: i, peer, from, to });
                }
                HealthEffect::ClockAlarm { peer, raised, .. } => {
                    self.mix(&[self.now_us, i as u64, peer, u64::from(raised)]);
                    if raised {
                        self.alarms.insert((i, peer as usize));
                    } else {
                        self.alarms.remove(&(i, peer as usize));
                    }
                }
            }
        }
    }

    fn mix(&mut self, values: &[u64]) {
        for value in values {
            self.trace_hash = (self.trace_hash ^ value).wrapping_mul(0x100_0000_01b3);
        }
    }
}
