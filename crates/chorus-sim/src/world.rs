//! The simulated world: nodes running the production `chorus-core` node and
//! `chorus-storage` (redb on a simulated disk), a seeded network, clocks, faults
//! and clients, all driven by one event queue on simulated time.
//!
//! Each node is driven the way `chorus-server`'s driver drives it: inputs (ticks,
//! messages, requests), then cycles in the documented order (begin, send-early,
//! persist, finish, send-late, reply). The simulator keeps its own small request
//! bookkeeping (proposal and read maps), mirroring the server driver's rules:
//! a proposal refused for want of a leader fails definitely; proposals in flight
//! when the leader changes have unknown outcomes; unanswered read-index requests
//! are asked again every few ticks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use chorus_core::limits::WATCH_SYNC_EVENTS_MAX;
use chorus_core::node::{Node, NodeConfig, OpResponse, Reply};
use chorus_core::watch::WatchHub;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader,
    TxnRequest,
};
use chorus_storage::sim_disk::SimDisk;
use chorus_storage::{DiskStorage, Identity};
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Message};
use raft::StateRole;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::linearizability::{KvOp, KvOutcome, Operation};
use crate::coord_workload::{CoordClient, CoordResult, Want};
use crate::lease_workload::{LeaseClient, Phase, KEYS_PER_LEASE, LEASE_TTL_S};
use crate::lock_workload::{LockClient, LockResult};
use crate::options::{Bug, SimOptions};
use crate::watch_workload::{SimSink, WatchClient};

const CLUSTER_ID: u64 = 0xc1u64;
const ELECTION_TICKS: usize = 10;
/// A snapshot lost in the network is sent again after this many ticks.
const SNAPSHOT_RETRY_TICKS: u64 = 20;
/// Read-index requests unanswered for this many ticks are asked again.
const READ_RETRY_TICKS: u64 = 3;
/// The most events one run may process: a bound against a livelock in the world.
const EVENTS_MAX: u64 = 20_000_000;
/// Attempts of the final reader per key before it declares no progress.
const FINAL_READ_ATTEMPTS_MAX: u32 = 40;
const TRACE_LINES_MAX: usize = 40;
/// The id given to a history entry whose op definitely had no effect (or a read
/// that never answered); such entries are left out of the history checked.
const FORGOTTEN: u64 = u64::MAX;

/// What a client asks a node to do.
#[derive(Debug, Clone)]
enum ClientOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Get { key: Vec<u8>, serializable: bool },
    Delete { key: Vec<u8> },
    Cas { key: Vec<u8>, expected: Option<Vec<u8>>, new: Vec<u8> },
}

/// A node's answer to a client.
#[derive(Debug, Clone)]
enum Answer {
    Done(KvOutcome),
    /// Definitely not applied (no leader, node down, rejected).
    Failed,
    /// May or may not have been applied (leader changed).
    Unknown,
}

#[derive(Debug)]
enum Event {
    Tick(usize),
    Deliver {
        to: usize,
        message: Message,
    },
    Request {
        node: usize,
        client: usize,
        op_id: u64,
        op: ClientOp,
    },
    Answer {
        client: usize,
        op_id: u64,
        answer: Answer,
    },
    ClientNext(usize),
    ClientTimeout {
        client: usize,
        op_id: u64,
    },
    Fault,
    HealCut(Vec<(usize, usize)>),
    Restart(usize),
    /// The next step of the membership workload.
    Membership,
    /// The operator raises or disarms the NOSPACE alarm.
    Alarm {
        raise: bool,
    },
    Resume(usize),
    /// The node has taken the inputs of one pass and proposes the renewals among
    /// them in one record, as the server's driver does after each pass.
    ProposeRenewals(usize),
    /// The transport tells node `from` that its snapshot for member `to` was lost.
    SnapshotFailed {
        from: usize,
        to: u64,
    },
    /// The transport tells node `from` that member `to` took its snapshot.
    SnapshotDelivered {
        from: usize,
        to: u64,
    },
    EndFaultPhase,
    StopClients,
    FinalRead {
        attempt: u32,
        key_index: usize,
    },
    WatchDrain(usize),
    LeaseStep(usize),
    /// Two seconds before the end: what every member must have applied by the end.
    ConvergenceMark,
    LeaseAnswer {
        client: usize,
        request: u64,
        sent_us: u64,
        result: LeaseResult,
    },
    LeaseTimeout {
        client: usize,
        request: u64,
    },
    LockStep(usize),
    LockAnswer {
        client: usize,
        request: u64,
        result: LockResult,
    },
    CoordStep(usize),
    CoordAnswer {
        client: usize,
        request: u64,
        result: CoordResult,
    },
}

/// A lease client's proposal: (client, request id, and for a keep-alive's renewal
/// record the TTL to answer and when the keep-alive was sent).
type LeaseProposal = (usize, u64, Option<(i64, u64)>);

/// A lease client's answer: the TTL of a keep-alive (0: gone), or Done for other calls.
#[derive(Debug, Clone, Copy)]
enum LeaseResult {
    Ttl(i64),
    Done,
    NotFound,
    Failed,
}

struct Scheduled {
    at_us: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.seq).cmp(&(other.at_us, other.seq))
    }
}

struct Running {
    node: Node,
    storage: DiskStorage,
    /// Proposal seq to (client, op id).
    proposals: BTreeMap<u64, (usize, u64)>,
    /// Read ctx to (client, op id, key, tick asked).
    reads: BTreeMap<u64, (usize, u64, Vec<u8>, u64)>,
    next_seq: u64,
    next_ctx: u64,
    leader_seen: (u64, u64),
    ticks: u64,
    applied_seen: u64,
    /// Highest revision served by a serializable read in this boot.
    serializable_revision_max: i64,
    /// Lease client proposals: seq to (lease client, request id), several for one
    /// record of renewals. For a keep-alive: the TTL to answer and when it was sent.
    lease_proposals: BTreeMap<u64, Vec<LeaseProposal>>,
    /// Keep-alives renewed (or found gone) on this leader since its last record of
    /// renewals, with their lease ids.
    renewals_unproposed: Vec<(LeaseProposal, i64)>,
    /// Queue and barrier client proposals: seq to (coordination client, request id).
    coord_proposals: BTreeMap<u64, (usize, u64)>,
    /// Lock client proposals: seq to (lock client, request id).
    lock_proposals: BTreeMap<u64, (usize, u64)>,
    /// This boot's watch hub; its streams die with the process.
    watches: WatchHub<SimSink>,
    boot: u64,
}

struct SimNode {
    id: u64,
    /// In the configuration (or joining it): runs, crashes and restarts. A spare
    /// waiting to join, or a removed node, does not.
    in_cluster: bool,
    /// Started with the initial configuration (a joiner starts with none).
    founder: bool,
    disk: SimDisk,
    running: Option<Running>,
    paused: bool,
    queued: Vec<Event>,
    tick_us: u64,
}

struct Client {
    in_flight: Option<u64>,
    ops_count: u64,
    stopped: bool,
}

/// The result of one run.
pub struct RunReport {
    pub history: Vec<Operation>,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub trace_hash: u64,
    pub events_count: u64,
    pub leader_changes: u64,
    pub crashes: u64,
    /// Snapshots installed by members that needed compacted entries.
    pub snapshots_installed: u64,
}

pub struct World {
    options: SimOptions,
    rng: ChaCha8Rng,
    now_us: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_event_seq: u64,
    nodes: Vec<SimNode>,
    cut: BTreeSet<(usize, usize)>,
    clients: Vec<Client>,
    keys: Vec<Vec<u8>>,
    history: Vec<Operation>,
    /// Op id to its index in `history`.
    history_index: BTreeMap<u64, usize>,
    next_op_id: u64,
    faults_on: bool,
    violations: Vec<String>,
    trace: VecDeque<String>,
    trace_hash: u64,
    leaders_by_term: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, (u64, u32)>,
    events_count: u64,
    leader_changes: u64,
    /// When the newest leader took office (the lease checker's bound runs from it).
    last_leader_start_us: u64,
    crashes: u64,
    snapshots_installed: u64,
    watch_clients: Vec<WatchClient>,
    next_stream: u64,
    lease_clients: Vec<LeaseClient>,
    next_lease_request: u64,
    /// Queue and barrier clients, with the request each has in flight.
    coord_clients: Vec<(CoordClient, Option<u64>)>,
    lock_clients: Vec<LockClient>,
    next_lock_request: u64,
    /// The lock workload's own random stream, so that it does not shift the others'.
    lock_rng: ChaCha8Rng,
    /// The highest applied index two seconds before the end (see `check_convergence`).
    convergence_mark: u64,
    /// Membership changes: their own random stream, the next fresh node id, the
    /// node being removed, and how many changes were seen applied.
    membership_rng: ChaCha8Rng,
    next_node_id: u64,
    removing: Option<usize>,
    pub(crate) membership_changes_applied: u64,
}

impl World {
    pub fn new(options: SimOptions) -> World {
        let (options_seed, options_nodes_count) = (options.seed, options.nodes_count);
        let lock_rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x10c4_10c4);
        let rng = ChaCha8Rng::seed_from_u64(options.seed);
        let nodes = (0..options.nodes_count)
            .map(|i| {
                let drift = options.tick_drift_ppt[i];
                let disk = SimDisk::new();
                disk.set_sync_is_noop(options.bug == Some(Bug::AckBeforeFsync));
                SimNode {
                    id: i as u64 + 1,
                    in_cluster: true,
                    founder: true,
                    disk,
                    running: None,
                    paused: false,
                    queued: Vec::new(),
                    tick_us: (options.tick_us as i64 * (1000 + drift) / 1000) as u64,
                }
            })
            .collect::<Vec<SimNode>>();
        let mut nodes = nodes;
        if options.membership_changes {
            nodes.push(SimNode {
                id: options.nodes_count as u64 + 1,
                in_cluster: false,
                founder: false,
                disk: SimDisk::new(),
                running: None,
                paused: false,
                queued: Vec::new(),
                tick_us: options.tick_us,
            });
        }
        let keys = (0..options.keys_count).map(|k| format!("key{k}").into_bytes()).collect();
        let clients = (0..options.clients_count)
            .map(|_| Client { in_flight: None, ops_count: 0, stopped: false })
            .collect();
        World {
            options,
            rng,
            now_us: 0,
            queue: BinaryHeap::new(),
            next_event_seq: 0,
            nodes,
            cut: BTreeSet::new(),
            clients,
            keys,
            history: Vec::new(),
            history_index: BTreeMap::new(),
            next_op_id: 1,
            faults_on: true,
            violations: Vec::new(),
            trace: VecDeque::new(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            leaders_by_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            snapshots_installed: 0,
            events_count: 0,
            leader_changes: 0,
            last_leader_start_us: 0,
            crashes: 0,
            watch_clients: Vec::new(),
            next_stream: 1,
            lease_clients: Vec::new(),
            next_lease_request: 1,
            coord_clients: Vec::new(),
            lock_clients: Vec::new(),
            next_lock_request: 1,
            lock_rng,
            membership_rng: ChaCha8Rng::seed_from_u64(options_seed ^ 0x3e3b_e125),
            next_node_id: options_nodes_count as u64 + 2,
            removing: None,
            membership_changes_applied: 0,
            convergence_mark: 0,
        }
    }

    /// Runs the whole scenario and checks the raft invariants and convergence on
    /// the way; the history is checked by the caller.
    pub fn run(mut self) -> RunReport {
        for i in 0..self.nodes.len() {
            if self.nodes[i].in_cluster {
                self.start_node(i);
            }
            let first_tick = self.rng.random_range(0..self.nodes[i].tick_us);
            self.schedule(first_tick, Event::Tick(i));
        }
        let lease_clients_count = 1 + (self.options.seed % 3) as usize;
        for l in 0..lease_clients_count {
            let id = self.rng.random_range(1..i64::MAX);
            let keep_alives = self.rng.random_range(3..40);
            let revoke = self.rng.random_bool(0.3);
            self.lease_clients.push(LeaseClient::new(id, keep_alives, revoke));
            let start = self.rng.random_range(0..5_000_000);
            self.schedule(start, Event::LeaseStep(l));
        }
        self.coord_clients = crate::coord_workload::clients(&self.options, &mut self.rng)
            .into_iter()
            .map(|client| (client, None))
            .collect();
        for c in 0..self.coord_clients.len() {
            self.schedule(1_000 + c as u64, Event::CoordStep(c));
        }
        let fenced = self.options.bug != Some(Bug::UnfencedLock);
        for c in 0..2 + (self.options.seed % 2) as usize {
            self.lock_clients.push(LockClient::new(c, fenced, (c as i64 + 1) << 40));
            let start = self.lock_rng.random_range(0..2_000_000);
            self.schedule(start, Event::LockStep(c));
        }
        let watchers_count = 1 + (self.options.seed % 2) as usize;
        for w in 0..watchers_count {
            self.watch_clients.push(WatchClient::new());
            self.schedule(1_000 + w as u64, Event::WatchDrain(w));
        }
        for c in 0..self.clients.len() {
            let start = self.rng.random_range(0..self.options.client_think_us.max(1));
            self.schedule(start, Event::ClientNext(c));
        }
        self.schedule_fault();
        if self.options.membership_changes {
            let first = self.membership_rng.random_range(1_000_000..4_000_000);
            self.schedule(first, Event::Membership);
        }
        if self.options.nospace_alarms {
            let first = self.membership_rng.random_range(1_000_000..6_000_000);
            self.schedule(first, Event::Alarm { raise: true });
        }
        self.schedule(self.options.fault_phase_us, Event::EndFaultPhase);
        let end_us = self.options.fault_phase_us + self.options.quiet_phase_us;
        self.schedule(end_us - 2_000_000, Event::ConvergenceMark);
        let end_us = self.options.fault_phase_us + self.options.quiet_phase_us;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at_us > end_us || self.events_count >= EVENTS_MAX {
                break;
            }
            self.now_us = next.at_us;
            self.events_count += 1;
            self.handle(next.event);
        }
        self.check_convergence();
        self.check_watchers();
        self.check_leases();
        self.check_coord();
        self.check_locks();
        self.report()
    }

    fn report(self) -> RunReport {
        RunReport {
            // Ops that definitely had no effect were marked forgotten: drop them.
            history: self.history.into_iter().filter(|o| o.id != FORGOTTEN).collect(),
            violations: self.violations,
            trace: self.trace.into_iter().collect(),
            trace_hash: self.trace_hash,
            events_count: self.events_count,
            leader_changes: self.leader_changes,
            crashes: self.crashes,
            snapshots_installed: self.snapshots_installed,
        }
    }

    fn schedule(&mut self, delay_us: u64, event: Event) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.queue.push(Reverse(Scheduled { at_us: self.now_us + delay_us, seq, event }));
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>9.3}s {line}", self.now_us as f64 / 1e6));
    }

    fn mix(&mut self, values: &[u64]) {
        for value in values {
            self.trace_hash ^= *value;
            self.trace_hash = self.trace_hash.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn violation(&mut self, what: String) {
        self.note(format!("VIOLATION: {what}"));
        self.violations.push(what);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(i) => self.on_tick(i),
            Event::Deliver { to, message } => self.on_node_input(to, Event::Deliver { to, message }),
            Event::Request { node, client, op_id, op } => {
                self.on_node_input(node, Event::Request { node, client, op_id, op })
            }
            Event::Answer { client, op_id, answer } => self.on_answer(client, op_id, answer),
            Event::ClientNext(c) => self.client_next(c),
            Event::ClientTimeout { client, op_id } => self.on_client_timeout(client, op_id),
            Event::Fault => self.inject_fault(),
            Event::HealCut(links) => {
                for link in links {
                    self.cut.remove(&link);
                }
                self.note("links healed".into());
            }
            Event::Restart(i) => self.restart_node(i),
            Event::Membership => self.membership_step(),
            Event::Alarm { raise } => self.alarm_step(raise),
            Event::Resume(i) => self.resume_node(i),
            Event::ProposeRenewals(i) => self.on_node_input(i, Event::ProposeRenewals(i)),
            Event::SnapshotFailed { from, to } => {
                self.on_node_input(from, Event::SnapshotFailed { from, to })
            }
            Event::SnapshotDelivered { from, to } => {
                self.on_node_input(from, Event::SnapshotDelivered { from, to })
            }
            Event::EndFaultPhase => self.end_fault_phase(),
            Event::StopClients => {
                for client in &mut self.clients {
                    client.stopped = true;
                }
                let delay = self.options.client_timeout_us + 100_000;
                self.schedule(delay, Event::FinalRead { attempt: 0, key_index: 0 });
            }
            Event::FinalRead { attempt, key_index } => self.final_read(attempt, key_index),
            Event::WatchDrain(w) => self.watch_drain(w),
            Event::LeaseStep(l) => self.lease_step(l),
            Event::ConvergenceMark => {
                let applied = self.nodes.iter().filter_map(|n| n.running.as_ref());
                self.convergence_mark = applied.map(|r| r.node.status().applied_index).max().unwrap_or(0);
            }
            Event::LeaseAnswer { client, request, sent_us, result } => {
                self.lease_answer(client, request, sent_us, result)
            }
            Event::LockStep(c) => self.lock_step(c),
            Event::LockAnswer { client, request, result } => self.lock_answer(client, request, result),
            Event::CoordStep(c) => self.coord_step(c),
            Event::CoordAnswer { client, request, result } => self.coord_answer(client, request, result),
            Event::LeaseTimeout { client, request } => {
                if self.lease_clients[client].request_in_flight == Some(request) {
                    self.lease_clients[client].request_in_flight = None;
                    self.schedule(100_000, Event::LeaseStep(client));
                }
            }
        }
    }

    // ---- nodes -------------------------------------------------------------

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let identity = Identity { cluster_id: CLUSTER_ID, member_id: node.id };
        let label = format!("sim://node{}", node.id);
        let opened =
            DiskStorage::open_with_backend(node.disk.backend(), node.disk.wal_dir(), &label, identity)
                .unwrap_or_else(|e| panic!("node {} cannot reopen its disk: {e}", node.id));
        let mut opened = opened;
        opened.storage.set_tuning(self.options.checkpoint_commits, self.options.wal_segment_bytes);
        opened.storage.set_deferred_max(self.options.deferred_cycles_max);
        let config = NodeConfig {
            id: node.id,
            initial_voters: if node.founder {
                (1..=self.options.nodes_count as u64).collect()
            } else {
                Vec::new()
            },
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: 1,
            seed: self.options.seed ^ opened.boot_count,
            boot_id: opened.boot_count,
            tick_ms: self.options.tick_us / 1000,
            log_entries_max: self.options.log_entries_max,
            log_bytes_max: self.options.log_bytes_max,
            log_catchup_entries: self.options.log_catchup_entries,
            log_held_entries_min: self.options.log_held_entries_min,
            snapshot_retry_ticks: SNAPSHOT_RETRY_TICKS,
            inline_snapshots: true,
        };
        let applied = opened.recovered.applied_index;
        let opened_boot = opened.boot_count;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raft_node = Node::new(&config, opened.recovered, &logger).expect("node starts");
        node.running = Some(Running {
            node: raft_node,
            storage: opened.storage,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_seq: 1,
            next_ctx: 1,
            leader_seen: (0, 0),
            ticks: 0,
            applied_seen: applied,
            serializable_revision_max: 0,
            watches: WatchHub::default(),
            lease_proposals: BTreeMap::new(),
            renewals_unproposed: Vec::new(),
            coord_proposals: BTreeMap::new(),
            lock_proposals: BTreeMap::new(),
            boot: opened_boot,
        });
        self.run_cycles(i);
    }

    fn crash_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.running.is_none() {
            return;
        }
        // The disk forgets unsynced writes first, so nothing the dying process
        // does while it is torn down can reach it.
        node.disk.crash();
        node.running = None;
        node.paused = false;
        node.queued.clear();
        self.crashes += 1;
        let id = self.nodes[i].id;
        self.note(format!("crash node {id}"));
    }

    fn restart_node(&mut self, i: usize) {
        if self.nodes[i].running.is_some() || !self.nodes[i].in_cluster {
            return;
        }
        let id = self.nodes[i].id;
        self.note(format!("restart node {id}"));
        self.start_node(i);
    }

    fn resume_node(&mut self, i: usize) {
        if !self.nodes[i].paused {
            return;
        }
        self.nodes[i].paused = false;
        let id = self.nodes[i].id;
        self.note(format!("resume node {id}"));
        let queued = std::mem::take(&mut self.nodes[i].queued);
        for event in queued {
            self.on_node_input(i, event);
        }
        // The process's timer fires once on resume (missed ticks are not replayed).
        self.on_tick_work(i);
    }

    fn on_tick(&mut self, i: usize) {
        let tick_us = self.nodes[i].tick_us;
        self.schedule(tick_us, Event::Tick(i));
        if self.nodes[i].paused {
            return;
        }
        self.on_tick_work(i);
    }

    fn on_tick_work(&mut self, i: usize) {
        let Some(running) = self.nodes[i].running.as_mut() else {
            return;
        };
        running.node.tick();
        // As the driver does: database writes wait at most a tick.
        running.storage.flush().expect("simulated disk write");
        running.ticks += 1;
        let ticks = running.ticks;
        let stale: Vec<u64> = running
            .reads
            .iter()
            .filter(|(_, r)| ticks - r.3 >= READ_RETRY_TICKS)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            running.node.read_index(ctx);
            if let Some(read) = running.reads.get_mut(&ctx) {
                read.3 = ticks;
            }
        }
        let header = ResponseHeader { revision: running.node.mvcc().revision(), ..Default::default() };
        running.watches.sync(&running.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
        self.mix(&[1, self.now_us, i as u64]);
        self.after_input(i);
    }

    /// Messages and requests for node `i`: dropped if it is down, queued if paused.
    fn on_node_input(&mut self, i: usize, event: Event) {
        // A snapshot's stream ends in the sender's transport learning whether the
        // receiver took it (a paused receiver takes it later).
        if let Event::Deliver { message, .. } = &event {
            if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                if let Some(from) = self.index_of(message.from) {
                    let to = message.to;
                    let report = if self.nodes[i].running.is_some() {
                        Event::SnapshotDelivered { from, to }
                    } else {
                        Event::SnapshotFailed { from, to }
                    };
                    self.schedule(self.options.delay_max_us, report);
                }
            }
        }
        if self.nodes[i].running.is_none() {
            if let Event::Request { client, op_id, .. } = event {
                // Connection refused: definitely not applied.
                self.schedule(200, Event::Answer { client, op_id, answer: Answer::Failed });
            }
            return;
        }
        if self.nodes[i].paused {
            self.nodes[i].queued.push(event);
            return;
        }
        match event {
            Event::Deliver { message, .. } => {
                self.mix(&[
                    2,
                    self.now_us,
                    message.from,
                    message.to,
                    message.msg_type as u64,
                    message.term,
                    message.index,
                ]);
                self.nodes[i].running.as_mut().expect("running").node.step(message);
            }
            Event::Request { client, op_id, op, .. } => self.on_request(i, client, op_id, op),
            Event::SnapshotFailed { to, .. } => {
                self.nodes[i].running.as_mut().expect("running").node.report_snapshot(to, false)
            }
            Event::SnapshotDelivered { to, .. } => {
                self.nodes[i].running.as_mut().expect("running").node.report_snapshot(to, true)
            }
            Event::ProposeRenewals(_) => self.propose_renewals(i),
            _ => unreachable!("not a node input"),
        }
        self.after_input(i);
    }

    fn after_input(&mut self, i: usize) {
        self.fail_proposals_on_leader_change(i);
        self.run_cycles(i);
        self.check_roles(i);
    }

    fn fail_proposals_on_leader_change(&mut self, i: usize) {
        let Some(running) = self.nodes[i].running.as_mut() else {
            return;
        };
        let status = running.node.status();
        let seen = (status.leader_id, status.term);
        if seen == running.leader_seen {
            return;
        }
        let had_leader = running.leader_seen.0 != 0;
        running.leader_seen = seen;
        if !had_leader {
            return;
        }
        let unproposed = std::mem::take(&mut running.renewals_unproposed).into_iter().map(|(p, _)| p);
        let lease_failed: Vec<LeaseProposal> =
            std::mem::take(&mut running.lease_proposals).into_values().flatten().chain(unproposed).collect();
        for (client, request, _) in lease_failed {
            let result = LeaseResult::Failed;
            self.schedule(100, Event::LeaseAnswer { client, request, sent_us: 0, result });
        }
        let running = self.nodes[i].running.as_mut().expect("running");
        let lock_failed: Vec<(usize, u64)> =
            std::mem::take(&mut running.lock_proposals).into_values().collect();
        for (client, request) in lock_failed {
            self.schedule(100, Event::LockAnswer { client, request, result: LockResult::Unknown });
        }
        let running = self.nodes[i].running.as_mut().expect("running");
        let coord_unknown: Vec<(usize, u64)> =
            std::mem::take(&mut running.coord_proposals).into_values().collect();
        for (client, request) in coord_unknown {
            self.schedule(100, Event::CoordAnswer { client, request, result: CoordResult::Unknown });
        }
        let running = self.nodes[i].running.as_mut().expect("running");
        let failed: Vec<(usize, u64)> = std::mem::take(&mut running.proposals).into_values().collect();
        for (client, op_id) in failed {
            self.schedule(100, Event::Answer { client, op_id, answer: Answer::Unknown });
        }
    }

    fn check_roles(&mut self, i: usize) {
        let Some(running) = self.nodes[i].running.as_ref() else {
            return;
        };
        let status = running.node.status();
        if status.role != StateRole::Leader {
            return;
        }
        match self.leaders_by_term.get(&status.term) {
            Some(&leader) if leader != status.id => {
                self.violation(format!(
                    "two leaders in term {}: node {} and node {}",
                    status.term, leader, status.id
                ));
            }
            Some(_) => {}
            None => {
                self.leaders_by_term.insert(status.term, status.id);
                self.leader_changes += 1;
                self.last_leader_start_us = self.now_us;
                self.note(format!("node {} leads term {}", status.id, status.term));
            }
        }
    }

    fn on_request(&mut self, i: usize, client: usize, op_id: u64, op: ClientOp) {
        let stale_reads = self.options.bug == Some(Bug::StaleReads);
        let running = self.nodes[i].running.as_mut().expect("running");
        let proposal = match op {
            ClientOp::Get { key, serializable } => {
                if serializable || stale_reads {
                    let answer = serve_get(running, &key, serializable, &mut self.violations, i);
                    self.schedule(100, Event::Answer { client, op_id, answer });
                } else {
                    let ctx = running.next_ctx;
                    running.next_ctx += 1;
                    running.reads.insert(ctx, (client, op_id, key, running.ticks));
                    running.node.read_index(ctx);
                }
                return;
            }
            ClientOp::Put { key, value } => Op::Put(PutRequest { key, value, ..Default::default() }),
            ClientOp::Delete { key } => Op::DeleteRange(DeleteRangeRequest { key, ..Default::default() }),
            ClientOp::Cas { key, expected, new } => Op::Txn(cas_txn(key, expected, new)),
        };
        let seq = running.next_seq;
        running.next_seq += 1;
        match running.node.propose(seq, proposal) {
            Ok(()) => {
                running.proposals.insert(seq, (client, op_id));
            }
            Err(_) => self.schedule(100, Event::Answer { client, op_id, answer: Answer::Failed }),
        }
    }

    /// Runs cycles on node `i` until it has no work, in the documented order.
    fn run_cycles(&mut self, i: usize) {
        for _ in 0..1000 {
            let Some(running) = self.nodes[i].running.as_mut() else {
                return;
            };
            if !running.node.has_work() {
                return;
            }
            let cycle = running.node.begin_cycle();
            let early = cycle.messages;
            let changes = cycle.persist.writes.changes.clone();
            running.storage.persist_deferring(cycle.persist).expect("simulated disk write");
            let header = ResponseHeader { revision: running.node.mvcc().revision(), ..Default::default() };
            if cycle.snapshot_installed {
                running.watches.resync_all();
                running.watches.sync(&running.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
                self.snapshots_installed += 1;
            } else {
                running.watches.notify(&changes, header);
            }
            let finished = running.node.finish_cycle();
            let fsync_us = self.rng.random_range(self.options.fsync_min_us..=self.options.fsync_max_us);
            self.send_all(i, early, 0);
            self.send_all(i, finished.messages, fsync_us);
            // As the server does: what `begin` applied was committed, and is
            // answered without waiting for this cycle's fsync (unless a snapshot
            // was installed, which is answered once it is written).
            let early_delay_us = if cycle.snapshot_installed { fsync_us } else { 0 };
            self.answer_replies(i, cycle.replies, early_delay_us);
            self.serve_reads(i, cycle.reads_ready, early_delay_us);
            self.answer_replies(i, finished.replies, fsync_us);
            self.serve_reads(i, finished.reads_ready, fsync_us);
            self.check_applied(i);
        }
        panic!("node {} never ran out of work", self.nodes[i].id);
    }

    fn answer_replies(&mut self, i: usize, replies: Vec<Reply>, delay_us: u64) {
        for reply in replies {
            let running = self.nodes[i].running.as_mut().expect("running");
            if let Some((client, request)) = running.lock_proposals.remove(&reply.seq) {
                let result = LockResult::Applied(reply.result);
                self.schedule(delay_us + 100, Event::LockAnswer { client, request, result });
                continue;
            }
            if let Some((client, request)) = running.coord_proposals.remove(&reply.seq) {
                let result = match reply.result {
                    Ok(response) => CoordResult::Done(response),
                    Err(error) => CoordResult::Rejected(error),
                };
                self.schedule(delay_us + 100, Event::CoordAnswer { client, request, result });
                continue;
            }
            if let Some(waiting) = running.lease_proposals.remove(&reply.seq) {
                for (client, request, renewal) in waiting {
                    let result = match (&reply.result, renewal) {
                        (Ok(_), Some((ttl, _))) => LeaseResult::Ttl(ttl),
                        (Ok(_), None) => LeaseResult::Done,
                        (Err(chorus_core::KvError::LeaseNotFound), _) => LeaseResult::NotFound,
                        (Err(chorus_core::KvError::LeaseExists), _) => LeaseResult::Done,
                        (Err(_), _) => LeaseResult::Failed,
                    };
                    let sent_us = renewal.map_or(0, |(_, sent)| sent);
                    self.schedule(delay_us + 100, Event::LeaseAnswer { client, request, sent_us, result });
                }
                continue;
            }
            let Some((client, op_id)) = running.proposals.remove(&reply.seq) else {
                continue;
            };
            let answer = match reply.result {
                Ok(OpResponse::Put(_)) => Answer::Done(KvOutcome::Put),
                Ok(OpResponse::DeleteRange(_)) => Answer::Done(KvOutcome::Delete),
                Ok(OpResponse::Txn(txn)) => Answer::Done(KvOutcome::Cas(txn.succeeded)),
                Ok(other) => panic!("unexpected response {other:?}"),
                Err(_) => Answer::Failed,
            };
            self.schedule(delay_us + 100, Event::Answer { client, op_id, answer });
        }
    }

    fn serve_reads(&mut self, i: usize, contexts: Vec<u64>, delay_us: u64) {
        for ctx in contexts {
            let running = self.nodes[i].running.as_mut().expect("running");
            let Some((client, op_id, key, _)) = running.reads.remove(&ctx) else {
                continue;
            };
            let answer = serve_get(running, &key, false, &mut self.violations, i);
            self.schedule(delay_us + 100, Event::Answer { client, op_id, answer });
        }
    }

    /// Committed entries never change: every node applies the same entry at an index.
    fn check_applied(&mut self, i: usize) {
        let id = self.nodes[i].id;
        let Some(running) = self.nodes[i].running.as_mut() else {
            return;
        };
        let applied = running.node.status().applied_index;
        if applied < running.applied_seen {
            let seen = running.applied_seen;
            self.violation(format!("node {id}: applied index went back from {seen} to {applied}"));
            return;
        }
        let from = running.applied_seen + 1;
        running.applied_seen = applied;
        let mut digests = Vec::new();
        for index in from..=applied {
            if let Some((term, data)) = running.node.log_entry(index) {
                digests.push((index, term, crc32fast::hash(data)));
            }
        }
        for (index, term, crc) in digests {
            match self.committed.get(&index) {
                Some(&(t, c)) if (t, c) != (term, crc) => {
                    self.violation(format!(
                        "node {id} applied a different entry at index {index} (term {term}) than another node (term {t})"
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(index, (term, crc));
                }
            }
        }
    }

    fn send_all(&mut self, from: usize, messages: Vec<Message>, extra_us: u64) {
        for mut message in messages {
            if self.options.bug == Some(Bug::SnapshotDropsRecord)
                && message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot
            {
                drop_newest_record(&mut message);
            }
            let Some(to) = self.index_of(message.to) else { continue };
            // The server's transport learns that a snapshot stream failed and tells
            // raft at once (which sends another); other lost messages go unnoticed.
            if self.cut.contains(&(from, to)) || self.rng.random_range(0..1_000_000) < self.options.drop_ppm {
                if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                    let lost = Event::SnapshotFailed { from, to: message.to };
                    self.schedule(self.options.delay_max_us + extra_us, lost);
                }
                continue;
            }
            let copies = if self.rng.random_range(0..1_000_000) < self.options.duplicate_ppm { 2 } else { 1 };
            for _ in 0..copies {
                let delay = self.rng.random_range(self.options.delay_min_us..=self.options.delay_max_us);
                self.schedule(delay + extra_us, Event::Deliver { to, message: message.clone() });
            }
        }
    }

    // ---- clients -----------------------------------------------------------

    fn client_next(&mut self, c: usize) {
        if self.clients[c].stopped || self.clients[c].in_flight.is_some() {
            return;
        }
        let key = self.keys[self.rng.random_range(0..self.keys.len())].clone();
        let n = self.clients[c].ops_count;
        self.clients[c].ops_count += 1;
        let value = format!("c{c}-{n}").into_bytes();
        let (op, kv_op) = match self.rng.random_range(0..100) {
            0..=34 => (ClientOp::Put { key: key.clone(), value: value.clone() }, KvOp::Put { value }),
            35..=69 => {
                let serializable = self.rng.random_range(0..100) < self.options.serializable_get_percent;
                (ClientOp::Get { key: key.clone(), serializable }, KvOp::Get)
            }
            70..=79 => (ClientOp::Delete { key: key.clone() }, KvOp::Delete),
            _ => {
                let expected = self.latest_value_seen(&key);
                let op = ClientOp::Cas { key: key.clone(), expected: expected.clone(), new: value.clone() };
                (op, KvOp::Cas { expected, new: value })
            }
        };
        let serializable = matches!(op, ClientOp::Get { serializable: true, .. });
        let node = self.rng.random_range(0..self.nodes.len());
        self.issue(c, node, key, op, kv_op, serializable);
    }

    /// A plausible expected value for a CAS: the value of the most recent op on the key.
    fn latest_value_seen(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.history.iter().rev().filter(|o| o.key == key).find_map(|o| match (&o.op, &o.outcome) {
            (KvOp::Put { value }, _) => Some(Some(value.clone())),
            (_, KvOutcome::Get(value)) => Some(value.clone()),
            (KvOp::Delete, _) => Some(None),
            _ => None,
        })?
    }

    fn issue(&mut self, c: usize, node: usize, key: Vec<u8>, op: ClientOp, kv_op: KvOp, serializable: bool) {
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        self.clients[c].in_flight = Some(op_id);
        // Serializable gets are checked by their own rule, not for linearizability.
        if !serializable {
            self.history_index.insert(op_id, self.history.len());
            self.history.push(Operation {
                id: op_id,
                client: c as u64,
                key,
                op: kv_op,
                call_us: self.now_us,
                return_us: None,
                outcome: KvOutcome::Unknown,
            });
        }
        let latency = self.rng.random_range(50..500);
        self.schedule(latency, Event::Request { node, client: c, op_id, op });
        self.schedule(self.options.client_timeout_us, Event::ClientTimeout { client: c, op_id });
    }

    fn on_answer(&mut self, c: usize, op_id: u64, answer: Answer) {
        if self.clients[c].in_flight != Some(op_id) {
            return; // answered after its timeout: the outcome stays unknown
        }
        self.clients[c].in_flight = None;
        if let Some(&index) = self.history_index.get(&op_id) {
            match answer {
                Answer::Done(outcome) => {
                    self.history[index].outcome = outcome;
                    self.history[index].return_us = Some(self.now_us);
                }
                Answer::Failed => self.forget(op_id),
                Answer::Unknown => {
                    if matches!(self.history[index].op, KvOp::Get) {
                        self.forget(op_id);
                    }
                }
            }
        }
        self.mix(&[3, self.now_us, c as u64, op_id]);
        let think = self.rng.random_range(0..=2 * self.options.client_think_us);
        if c < self.clients.len() {
            self.schedule(think, Event::ClientNext(c));
        }
    }

    fn on_client_timeout(&mut self, c: usize, op_id: u64) {
        if self.clients[c].in_flight != Some(op_id) {
            return;
        }
        self.clients[c].in_flight = None;
        if let Some(&index) = self.history_index.get(&op_id) {
            if matches!(self.history[index].op, KvOp::Get) {
                self.forget(op_id);
            }
        }
        self.schedule(0, Event::ClientNext(c));
    }

    /// Removes an op that definitely had no effect (or a read with no answer).
    fn forget(&mut self, op_id: u64) {
        if let Some(index) = self.history_index.remove(&op_id) {
            // Marked rather than removed, so the indices of later ops stay valid.
            self.history[index].id = FORGOTTEN;
        }
    }

    // ---- faults ------------------------------------------------------------

    fn schedule_fault(&mut self) {
        let mean = self.options.fault_interval_us;
        let delay = self.rng.random_range(mean / 2..=mean * 3 / 2);
        self.schedule(delay, Event::Fault);
    }

    fn inject_fault(&mut self) {
        if !self.faults_on {
            return;
        }
        self.schedule_fault();
        let o = &self.options;
        let kinds: Vec<u8> = [
            (o.partitions, 0u8),
            (o.one_way_partitions, 1),
            (o.crashes, 2),
            (o.crash_all, 3),
            (o.pauses, 4),
            (o.tick_bursts, 5),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, kind)| *kind)
        .collect();
        if kinds.is_empty() {
            return;
        }
        let n = self.nodes.len();
        let heal_us = self.rng.random_range(300_000..5_000_000);
        match kinds[self.rng.random_range(0..kinds.len())] {
            0 => {
                // Two non-empty sides: node `a` on one, node `b` on the other.
                let mut side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                let a = self.rng.random_range(0..n);
                let b = (a + self.rng.random_range(1..n)) % n;
                side[a] = true;
                side[b] = false;
                let links: Vec<(usize, usize)> = (0..n)
                    .flat_map(|a| (0..n).map(move |b| (a, b)))
                    .filter(|&(a, b)| a != b && side[a] != side[b])
                    .collect();
                self.cut.extend(links.iter().copied());
                self.note(format!("partition {:?}", side));
                self.schedule(heal_us, Event::HealCut(links));
            }
            1 => {
                let a = self.rng.random_range(0..n);
                let b = (a + self.rng.random_range(1..n)) % n;
                let both = self.rng.random_bool(0.5);
                let mut links = vec![(a, b)];
                if both {
                    links.push((b, a));
                }
                self.cut.extend(links.iter().copied());
                self.note(format!("cut link {}->{}{}", a + 1, b + 1, if both { " both ways" } else { "" }));
                self.schedule(heal_us, Event::HealCut(links));
            }
            2 => {
                let i = self.rng.random_range(0..n);
                self.crash_node(i);
                self.schedule(heal_us, Event::Restart(i));
            }
            3 => {
                for i in 0..n {
                    self.crash_node(i);
                }
                let back_us = self.rng.random_range(100_000..2_000_000);
                for i in 0..n {
                    self.schedule(back_us + i as u64 * 1000, Event::Restart(i));
                }
            }
            4 => {
                let i = self.rng.random_range(0..n);
                if self.nodes[i].running.is_some() && !self.nodes[i].paused {
                    self.nodes[i].paused = true;
                    let pause_us = self.rng.random_range(1_000_000..5_000_000);
                    self.note(format!("pause node {} for {} ms", i + 1, pause_us / 1000));
                    self.schedule(pause_us, Event::Resume(i));
                }
            }
            _ => {
                let i = self.rng.random_range(0..n);
                let burst = self.rng.random_range(3..20);
                self.note(format!("tick burst of {burst} on node {}", i + 1));
                for _ in 0..burst {
                    if !self.nodes[i].paused {
                        self.on_tick_work(i);
                    }
                }
            }
        }
    }

    fn end_fault_phase(&mut self) {
        self.faults_on = false;
        self.cut.clear();
        self.note("faults end; healing everything".into());
        for i in 0..self.nodes.len() {
            self.resume_node(i);
            self.restart_node(i);
        }
        self.schedule(2_000_000, Event::StopClients);
    }

    /// After healing, a reader checks every key with a linearizable get through a
    /// rotating node; its results join the history, so a lost acknowledged write
    /// shows as a linearizability violation. No answer at all is a liveness failure.
    fn final_read(&mut self, attempt: u32, key_index: usize) {
        if key_index >= self.keys.len() {
            return;
        }
        let reader = self.clients.len();
        if self.clients.len() == reader {
            self.clients.push(Client { in_flight: None, ops_count: 0, stopped: true });
        }
        if let Some(op_id) = self.clients[reader].in_flight {
            // The previous attempt's answer decides what comes next.
            let _ = op_id;
            self.schedule(100_000, Event::FinalRead { attempt, key_index });
            return;
        }
        let answered = self.history.iter().any(|o| {
            o.client == reader as u64
                && o.key == self.keys[key_index]
                && o.return_us.is_some()
                && o.id != FORGOTTEN
        });
        if answered {
            self.schedule(0, Event::FinalRead { attempt: 0, key_index: key_index + 1 });
            return;
        }
        if attempt >= FINAL_READ_ATTEMPTS_MAX {
            let key = String::from_utf8_lossy(&self.keys[key_index]).to_string();
            self.violation(format!("no progress after healing: a linearizable get of {key} never succeeded"));
            return;
        }
        let key = self.keys[key_index].clone();
        let node = attempt as usize % self.nodes.len();
        let op = ClientOp::Get { key: key.clone(), serializable: false };
        self.issue(reader, node, key, op, KvOp::Get, false);
        self.schedule(150_000, Event::FinalRead { attempt: attempt + 1, key_index });
    }

    /// A watcher client's turn: (re)open its stream if it has none or its node
    /// restarted, then take a few responses (sometimes none: a slow consumer).
    fn watch_drain(&mut self, w: usize) {
        let stream_alive = match self.watch_clients[w].stream {
            Some((node, boot, _)) => self.nodes[node].running.as_ref().is_some_and(|r| r.boot == boot),
            None => false,
        };
        if !stream_alive {
            self.open_watch(w);
        }
        let take = if self.rng.random_bool(0.2) { 0 } else { self.rng.random_range(1..8) };
        let responses = self.watch_clients[w].sink.drain(take);
        let count = responses.len() as u64;
        if !self.watch_clients[w].receive(responses) {
            self.close_watch(w);
        }
        self.mix(&[4, self.now_us, w as u64, count]);
        let delay = self.rng.random_range(1_000..50_000);
        self.schedule(delay, Event::WatchDrain(w));
    }

    fn open_watch(&mut self, w: usize) {
        self.close_watch(w);
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].running.is_some() && !self.nodes[*i].paused)
            .collect();
        if live.is_empty() {
            return;
        }
        let node = live[self.rng.random_range(0..live.len())];
        let stream = self.next_stream;
        self.next_stream += 1;
        let capacity = self.rng.random_range(1..20);
        let client = &mut self.watch_clients[w];
        if client.stream.is_some() || !client.seen.is_empty() {
            client.resumes += 1;
        }
        client.sink = SimSink::new(capacity);
        let request = client.create_request();
        let running = self.nodes[node].running.as_mut().expect("live node");
        client.stream = Some((node, running.boot, stream));
        running.watches.open_stream(stream, client.sink.clone());
        let header = ResponseHeader { revision: running.node.mvcc().revision(), ..Default::default() };
        running.watches.create(stream, &request, header);
        running.watches.sync(&running.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
    }

    fn close_watch(&mut self, w: usize) {
        if let Some((node, boot, stream)) = self.watch_clients[w].stream.take() {
            if let Some(running) = self.nodes[node].running.as_mut().filter(|r| r.boot == boot) {
                running.watches.close_stream(stream);
            }
            // Responses still buffered belong to the closed stream: a resuming client
            // starts over from its next revision, so they are dropped.
            let _ = self.watch_clients[w].sink.drain(usize::MAX);
        }
    }

    /// Lets every watcher catch up fully, then checks what each received.
    fn check_watchers(&mut self) {
        let Some(store) = self.most_applied().map(|r| r.node.mvcc().clone()) else { return };
        let target = store.revision();
        for w in 0..self.watch_clients.len() {
            for _ in 0..10_000 {
                if self.watch_clients[w].next_revision > target {
                    break;
                }
                let Some((node, boot, _)) = self.watch_clients[w].stream else {
                    self.open_watch(w);
                    continue;
                };
                if let Some(running) = self.nodes[node].running.as_mut().filter(|r| r.boot == boot) {
                    let header =
                        ResponseHeader { revision: running.node.mvcc().revision(), ..Default::default() };
                    running.watches.sync(&running.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
                }
                let responses = self.watch_clients[w].sink.drain(usize::MAX);
                if !self.watch_clients[w].receive(responses) {
                    self.close_watch(w);
                }
            }
        }
        let violations = crate::watch_workload::check(&self.watch_clients, &store);
        for violation in violations {
            self.violation(violation);
        }
    }

    // ---- lease clients ------------------------------------------------------

    fn lease_step(&mut self, l: usize) {
        if self.lease_clients[l].request_in_flight.is_some() {
            return;
        }
        let client = &self.lease_clients[l];
        let (id, phase) = (client.id, client.phase);
        let op = match phase {
            Phase::Grant => {
                Op::LeaseGrant(chorus_proto::etcdserverpb::LeaseGrantRequest { ttl: LEASE_TTL_S, id })
            }
            Phase::Attach(index) => Op::Put(PutRequest {
                key: client.key(index),
                value: b"leased".to_vec(),
                lease: id,
                ..Default::default()
            }),
            Phase::Revoke => Op::LeaseRevoke(chorus_proto::etcdserverpb::LeaseRevokeRequest { id }),
            Phase::KeepAlive => return self.lease_keep_alive(l),
            Phase::Abandoned | Phase::Done => return,
        };
        let request = self.next_lease_request;
        self.next_lease_request += 1;
        self.lease_clients[l].request_in_flight = Some(request);
        self.schedule(self.options.client_timeout_us, Event::LeaseTimeout { client: l, request });
        let node = self.rng.random_range(0..self.nodes.len());
        let paused = self.nodes[node].paused;
        let Some(running) = self.nodes[node].running.as_mut().filter(|_| !paused) else {
            self.schedule(
                200,
                Event::LeaseAnswer { client: l, request, sent_us: 0, result: LeaseResult::Failed },
            );
            return;
        };
        let seq = running.next_seq;
        running.next_seq += 1;
        match running.node.propose(seq, op) {
            Ok(()) => {
                running.lease_proposals.insert(seq, vec![(l, request, None)]);
            }
            Err(_) => {
                let result = LeaseResult::Failed;
                self.schedule(100, Event::LeaseAnswer { client: l, request, sent_us: 0, result });
            }
        }
        self.after_input(node);
    }

    /// A keep-alive through a random member, forwarded to the leader it knows when
    /// it does not lead (if that leader is up and reachable from it).
    fn lease_keep_alive(&mut self, l: usize) {
        let id = self.lease_clients[l].id;
        let request = self.next_lease_request;
        self.next_lease_request += 1;
        self.lease_clients[l].request_in_flight = Some(request);
        self.schedule(self.options.client_timeout_us, Event::LeaseTimeout { client: l, request });
        let sent_us = self.now_us;
        let node = self.rng.random_range(0..self.nodes.len());
        let mut target = node;
        let mut result = LeaseResult::Failed;
        let skip_renewal = self.options.bug == Some(Bug::LeaseAckWithoutRenew);
        for _ in 0..2 {
            let up = self.nodes[target].running.is_some() && !self.nodes[target].paused;
            if !up {
                break;
            }
            let running = self.nodes[target].running.as_mut().expect("up");
            // With the bug on: answer from the leader's state without renewing.
            let answer = if skip_renewal {
                running.node.lease_time_to_live(id).map(|(_, granted, _)| granted)
            } else {
                running.node.lease_keep_alive(id)
            };
            match answer {
                // Acknowledged once the renewal record applies, and answered "gone"
                // once it applies too (it proves leadership as the barrier does).
                // It is proposed after the node's current pass over its inputs,
                // with the other keep-alives of that pass, as the server does.
                Ok(ttl) if !skip_renewal => {
                    if running.renewals_unproposed.is_empty() {
                        let pass_us = self.rng.random_range(0..300);
                        self.schedule(pass_us, Event::ProposeRenewals(target));
                    }
                    let running = self.nodes[target].running.as_mut().expect("up");
                    running.renewals_unproposed.push(((l, request, Some((ttl, sent_us))), id));
                    self.after_input(target);
                    return;
                }
                Ok(ttl) => {
                    result = LeaseResult::Ttl(ttl);
                    self.after_input(target);
                    break;
                }
                Err(_) => {
                    let leader = running.node.status().leader_id;
                    let Some(leader) = self.index_of(leader) else { break };
                    if self.cut.contains(&(target, leader)) {
                        break;
                    }
                    target = leader;
                }
            }
        }
        let delay = self.rng.random_range(200..3_000);
        self.schedule(delay, Event::LeaseAnswer { client: l, request, sent_us, result });
    }

    /// One record for the renewals of a pass (a checkpoint of each renewed lease's
    /// TTL; none for leases found gone, for which it is the leadership barrier),
    /// answered when it applies; all fail if it cannot be proposed.
    fn propose_renewals(&mut self, i: usize) {
        let running = self.nodes[i].running.as_mut().expect("running");
        let waiting = std::mem::take(&mut running.renewals_unproposed);
        if waiting.is_empty() {
            return;
        }
        let renewed: Vec<(i64, i64)> = waiting
            .iter()
            .filter_map(|((_, _, renewal), id)| {
                renewal.filter(|(ttl, _)| *ttl > 0).map(|(ttl, _)| (*id, ttl))
            })
            .collect();
        let seq = running.next_seq;
        running.next_seq += 1;
        let waiting: Vec<LeaseProposal> = waiting.into_iter().map(|(proposal, _)| proposal).collect();
        if running.node.propose(seq, Node::renewal_record(&renewed)).is_ok() {
            running.lease_proposals.insert(seq, waiting);
            return;
        }
        for (client, request, _) in waiting {
            let result = LeaseResult::Failed;
            self.schedule(100, Event::LeaseAnswer { client, request, sent_us: 0, result });
        }
    }

    fn lease_answer(&mut self, l: usize, request: u64, sent_us: u64, result: LeaseResult) {
        if self.lease_clients[l].request_in_flight != Some(request) {
            return;
        }
        self.lease_clients[l].request_in_flight = None;
        let slack_us = self.lease_slack_us();
        let now = self.now_us;
        let client = &mut self.lease_clients[l];
        let mut next_us = 100_000;
        match (client.phase, result) {
            (_, LeaseResult::Failed) => {}
            (Phase::Grant, _) => client.phase = Phase::Attach(0),
            (Phase::Attach(_), LeaseResult::NotFound) => client.phase = Phase::Done,
            (Phase::Attach(index), _) if index + 1 < KEYS_PER_LEASE => {
                client.phase = Phase::Attach(index + 1)
            }
            (Phase::Attach(_), _) => client.phase = Phase::KeepAlive,
            (Phase::KeepAlive, LeaseResult::Ttl(ttl)) => {
                client.keep_alive_answered(sent_us, now, ttl, slack_us);
                if ttl <= 0 {
                    client.phase = Phase::Done;
                } else {
                    client.keep_alives_left = client.keep_alives_left.saturating_sub(1);
                    next_us = 1_000_000;
                    if client.keep_alives_left == 0 {
                        client.phase = if client.revoke_at_end { Phase::Revoke } else { Phase::Abandoned };
                    }
                }
            }
            (Phase::Revoke, _) => client.phase = Phase::Done,
            _ => {}
        }
        let phase = client.phase;
        self.mix(&[5, self.now_us, l as u64, request]);
        if phase == Phase::Abandoned && self.lease_clients[l].abandoned_at_us.is_none() {
            self.lease_clients[l].abandoned_at_us = Some(now);
            let id = self.lease_clients[l].id;
            self.note(format!("lease {id:x} abandoned"));
        }
        self.schedule(next_us, Event::LeaseStep(l));
    }

    /// How much sooner than its TTL (in true time) a lease may vanish: the leader's
    /// tick drift and tick granularity. Seeds with tick bursts (a leader's clock
    /// leaping ahead) make no such promise, so they get no early-expiry check.
    fn lease_slack_us(&self) -> u64 {
        if self.options.tick_bursts {
            return u64::MAX / 2;
        }
        let drift_ppt = self.options.tick_drift_ppt.iter().map(|d| d.unsigned_abs()).max().unwrap_or(0);
        LEASE_TTL_S as u64 * 1_000_000 * drift_ppt / 1000 + 3 * self.options.tick_us
    }

    fn check_leases(&mut self) {
        let Some(running) = self.most_applied() else { return };
        let store = running.node.mvcc().clone();
        let left = running.node.lease_ids();
        for violation in crate::lease_workload::check(
            &self.lease_clients,
            &store,
            &left,
            self.last_leader_start_us,
            self.now_us,
        ) {
            self.violation(violation);
        }
    }

    // ---- lock clients -------------------------------------------------------

    fn lock_step(&mut self, c: usize) {
        let client = &mut self.lock_clients[c];
        if client.request_in_flight.is_some() || client.stopped {
            return;
        }
        if self.now_us >= self.options.fault_phase_us {
            client.stopped = true;
            return;
        }
        let op = client.op();
        let request = self.next_lock_request;
        self.next_lock_request += 1;
        self.lock_clients[c].request_in_flight = Some(request);
        self.lock_clients[c].sent_us = self.now_us;
        let timeout = self.options.client_timeout_us;
        self.schedule(timeout, Event::LockAnswer { client: c, request, result: LockResult::Unknown });
        let node = self.lock_rng.random_range(0..self.nodes.len());
        let paused = self.nodes[node].paused;
        let Some(running) = self.nodes[node].running.as_mut().filter(|_| !paused) else {
            self.schedule(200, Event::LockAnswer { client: c, request, result: LockResult::Failed });
            return;
        };
        let seq = running.next_seq;
        running.next_seq += 1;
        match running.node.propose(seq, op) {
            Ok(()) => {
                running.lock_proposals.insert(seq, (c, request));
            }
            Err(_) => {
                self.schedule(100, Event::LockAnswer { client: c, request, result: LockResult::Failed });
            }
        }
        self.after_input(node);
    }

    fn lock_answer(&mut self, c: usize, request: u64, result: LockResult) {
        if self.lock_clients[c].request_in_flight != Some(request) {
            return;
        }
        self.lock_clients[c].request_in_flight = None;
        // The pause inside the critical section: now and then longer than the TTL.
        let pause_us = if self.lock_rng.random_bool(0.2) {
            self.lock_rng.random_range(6_000_000..8_000_000)
        } else {
            self.lock_rng.random_range(0..100_000)
        };
        let now = self.now_us;
        let delay = self.lock_clients[c].answer(result, now, pause_us);
        self.mix(&[7, now, c as u64, request]);
        self.schedule(delay, Event::LockStep(c));
    }

    fn check_locks(&mut self) {
        let Some(running) = self.most_applied() else { return };
        let store = running.node.mvcc().clone();
        let acquisitions: usize = self.lock_clients.iter().map(|c| c.acquisitions.len()).sum();
        let acked: usize = self.lock_clients.iter().map(|c| c.acked.len()).sum();
        let stale: u64 = self.lock_clients.iter().map(|c| c.stale_rejections).sum();
        self.note(format!(
            "locks: {acquisitions} acquisitions, {acked} acknowledged increments, {stale} stale fenced writes refused"
        ));
        for violation in crate::lock_workload::check(&self.lock_clients, &store) {
            self.violation(violation);
        }
    }

    // ---- queue and barrier clients -----------------------------------------

    fn coord_step(&mut self, c: usize) {
        if self.coord_clients[c].1.is_some() {
            return;
        }
        let now = self.now_us;
        let op = match self.coord_clients[c].0.next(now, &mut self.rng) {
            Want::Done => return,
            Want::Sleep(us) => return self.schedule(us.max(1), Event::CoordStep(c)),
            Want::Propose(op) => op,
        };
        let request = self.next_lease_request;
        self.next_lease_request += 1;
        self.coord_clients[c].1 = Some(request);
        // No answer in time (a crashed member): the outcome is unknown.
        let timeout = Event::CoordAnswer { client: c, request, result: CoordResult::Unknown };
        self.schedule(self.options.client_timeout_us, timeout);
        let node = self.rng.random_range(0..self.nodes.len());
        let paused = self.nodes[node].paused;
        let Some(running) = self.nodes[node].running.as_mut().filter(|_| !paused) else {
            self.schedule(200, Event::CoordAnswer { client: c, request, result: CoordResult::Failed });
            return;
        };
        let seq = running.next_seq;
        running.next_seq += 1;
        match running.node.propose(seq, op) {
            Ok(()) => {
                running.coord_proposals.insert(seq, (c, request));
            }
            Err(_) => {
                self.schedule(100, Event::CoordAnswer { client: c, request, result: CoordResult::Failed })
            }
        }
        self.after_input(node);
    }

    fn coord_answer(&mut self, c: usize, request: u64, result: CoordResult) {
        if self.coord_clients[c].1 != Some(request) {
            return;
        }
        self.coord_clients[c].1 = None;
        self.mix(&[6, self.now_us, c as u64, request]);
        let now = self.now_us;
        self.coord_clients[c].0.answer(result, now, &mut self.rng);
        self.schedule(1_000, Event::CoordStep(c));
    }

    fn check_coord(&mut self) {
        let Some(running) = self.most_applied() else { return };
        let store = running.node.mvcc().clone();
        let clients: Vec<&CoordClient> = self.coord_clients.iter().map(|(client, _)| client).collect();
        let violations = crate::coord_workload::check(&clients, &store);
        let [enqueued, delivered, settled, stale, passes, timeouts] = crate::coord_workload::counts(&clients);
        self.note(format!(
            "coord: {enqueued} enqueues acknowledged, {delivered} deliveries, {settled} acks/nacks accepted, \
             {stale} stale refused, {passes} barrier passes, {timeouts} barrier timeouts"
        ));
        for violation in violations {
            self.violation(violation);
        }
    }

    /// The running member that has applied the most: the checkers judge the
    /// converged history by it. (Members at one index hold one state, which
    /// `check_convergence` checks; one may still trail by the last entries at the
    /// very end, and a watcher on a member ahead of it has seen those entries.)
    /// The index of the node with raft id `id`.
    fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// One step of the membership workload, every few seconds of the fault phase,
    /// through whichever node leads: add the spare as a learner (it starts with an
    /// empty disk and no configuration, and must be caught up by a snapshot),
    /// promote it, then remove a voter (the leader a third of the time), which
    /// then becomes the spare with a fresh id and disk. Each step looks at the
    /// leader's applied configuration first, so a lost proposal is simply made
    /// again.
    fn membership_step(&mut self) {
        // After the fault phase, only a change under way is finished.
        let under_way = self.removing.is_some() || self.nodes.iter().any(|n| n.in_cluster && !n.founder);
        if !self.faults_on && !under_way {
            return;
        }
        let next = self.membership_rng.random_range(1_000_000..4_000_000);
        self.schedule(if self.faults_on { next } else { 300_000 }, Event::Membership);
        // The leader of the highest term (a removed node is inert, and may still
        // believe it leads).
        let leader = (0..self.nodes.len())
            .filter(|&i| {
                !self.nodes[i].paused
                    && self.nodes[i]
                        .running
                        .as_ref()
                        .is_some_and(|r| !r.node.is_removed() && r.node.status().role == StateRole::Leader)
            })
            .max_by_key(|&i| self.nodes[i].running.as_ref().map_or(0, |r| r.node.status().term));
        let Some(leader) = leader else { return };
        let conf = self.nodes[leader].running.as_ref().expect("leader runs").node.conf_state();
        if !conf.voters_outgoing.is_empty() {
            return; // a joint configuration is still being left
        }
        let in_conf = |id: u64| conf.voters.contains(&id) || conf.learners.contains(&id);
        // A node whose removal is applied stops, and becomes the spare.
        if let Some(removed) = self.removing {
            if in_conf(self.nodes[removed].id) {
                return self.propose_change(leader, ConfChangeType::RemoveNode, removed);
            }
            self.removing = None;
            self.membership_changes_applied += 1;
            self.crash_node(removed);
            let old_id = self.nodes[removed].id;
            let node = &mut self.nodes[removed];
            node.in_cluster = false;
            node.founder = false;
            node.disk = SimDisk::new();
            node.disk.set_sync_is_noop(self.options.bug == Some(Bug::AckBeforeFsync));
            node.id = self.next_node_id;
            self.next_node_id += 1;
            self.note(format!(
                "node {old_id} removed; its slot comes back as spare node {}",
                self.nodes[removed].id
            ));
            return;
        }
        let spare = (0..self.nodes.len()).find(|&i| !self.nodes[i].in_cluster);
        if let (Some(spare), true) = (spare, self.faults_on) {
            // Add the spare as a learner, and start it empty.
            self.nodes[spare].in_cluster = true;
            self.note(format!("add node {} as a learner", self.nodes[spare].id));
            self.start_node(spare);
            return self.propose_change(leader, ConfChangeType::AddLearnerNode, spare);
        }
        let joiner = (0..self.nodes.len()).find(|&i| conf.learners.contains(&self.nodes[i].id));
        if let Some(joiner) = joiner {
            self.note(format!("promote node {}", self.nodes[joiner].id));
            return self.propose_change(leader, ConfChangeType::AddNode, joiner);
        }
        let unjoined =
            (0..self.nodes.len()).find(|&i| self.nodes[i].in_cluster && !in_conf(self.nodes[i].id));
        if let Some(unjoined) = unjoined {
            // The learner's addition was lost: propose it again.
            return self.propose_change(leader, ConfChangeType::AddLearnerNode, unjoined);
        }
        if !self.faults_on {
            // Settled: every node that joined is a voter now.
            for node in self.nodes.iter_mut().filter(|n| n.in_cluster) {
                node.founder = true;
            }
            return;
        }
        // Every node is a voter: remove one, the leader a third of the time.
        let victim = if self.membership_rng.random_ratio(1, 3) {
            leader
        } else {
            self.membership_rng.random_range(0..self.nodes.len())
        };
        self.removing = Some(victim);
        if victim == leader && self.membership_rng.random_bool(0.5) {
            // As the server does: hand leadership over first, remove next step.
            let voters: Vec<u64> =
                conf.voters.iter().copied().filter(|id| *id != self.nodes[leader].id).collect();
            let to = voters[self.membership_rng.random_range(0..voters.len())];
            self.note(format!(
                "remove node {}: transfer its leadership to node {to} first",
                self.nodes[victim].id
            ));
            let running = self.nodes[leader].running.as_mut().expect("leader runs");
            running.node.transfer_leader(to);
            return self.after_input(leader);
        }
        self.note(format!("remove node {}", self.nodes[victim].id));
        self.propose_change(leader, ConfChangeType::RemoveNode, victim);
    }

    /// Raises NOSPACE for a random member (or disarms it), through any running
    /// member, for a while; disarmed for good when the faults end, so that the
    /// final reads and writes can succeed. Refused writes are answered as failed
    /// (definitely not applied): a member that applied one anyway shows as a
    /// linearizability or convergence violation.
    fn alarm_step(&mut self, raise: bool) {
        use chorus_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
        let raise = raise && self.faults_on;
        let nodes: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                !self.nodes[i].paused && self.nodes[i].running.as_ref().is_some_and(|r| !r.node.is_removed())
            })
            .collect();
        if !nodes.is_empty() {
            let through = nodes[self.membership_rng.random_range(0..nodes.len())];
            let member_id = self.nodes[nodes[self.membership_rng.random_range(0..nodes.len())]].id;
            let action = if raise { AlarmAction::Activate } else { AlarmAction::Deactivate };
            self.note(format!(
                "alarm: {} NOSPACE of node {member_id} through node {}",
                if raise { "raise" } else { "disarm all" },
                self.nodes[through].id
            ));
            let running = self.nodes[through].running.as_mut().expect("running");
            let alarms = if raise {
                vec![AlarmRequest { action: action as i32, member_id, alarm: AlarmType::Nospace as i32 }]
            } else {
                running
                    .node
                    .alarms()
                    .into_iter()
                    .map(|a| AlarmRequest { action: action as i32, member_id: a.member_id, alarm: a.alarm })
                    .collect()
            };
            for request in alarms {
                let seq = running.next_seq;
                running.next_seq += 1;
                let _ = running.node.propose(seq, chorus_proto::chorus::v1::command::Op::Alarm(request));
            }
            self.after_input(through);
        }
        if self.faults_on {
            let next = self.membership_rng.random_range(500_000..3_000_000);
            self.schedule(next, Event::Alarm { raise: !raise });
        } else if raise
            || self.nodes.iter().any(|n| n.running.as_ref().is_some_and(|r| !r.node.alarms().is_empty()))
        {
            self.schedule(300_000, Event::Alarm { raise: false });
        }
    }

    fn propose_change(&mut self, leader: usize, kind: ConfChangeType, target: usize) {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = self.nodes[target].id;
        let mut change = ConfChangeV2::default();
        change.set_changes(vec![single].into());
        let running = self.nodes[leader].running.as_mut().expect("leader runs");
        let _ = running.node.propose_conf_change_unanswered(change);
        self.after_input(leader);
    }

    fn most_applied(&self) -> Option<&Running> {
        self.nodes.iter().filter_map(|n| n.running.as_ref()).max_by_key(|r| r.node.status().applied_index)
    }

    fn check_convergence(&mut self) {
        let mut states = Vec::new();
        for node in self.nodes.iter().filter(|n| n.in_cluster) {
            match node.running.as_ref() {
                Some(r) => states.push((node.id, r.node.status().applied_index, r.node.mvcc().state_hash())),
                None => {
                    self.violations.push(format!("node {} is not running at the end", node.id));
                    return;
                }
            }
        }
        // Liveness: every member applied at least what the cluster had applied two
        // seconds before the end (the leader keeps proposing lease checkpoints, so
        // members need not be at the same index at the very last instant).
        let mark = self.convergence_mark;
        if states.iter().any(|s| s.1 < mark) {
            self.violation(format!(
                "no convergence after healing: a member is behind index {mark}: (node, applied, state hash) = {states:?}"
            ));
        }
        // Safety: members at the same index hold the same state.
        for a in &states {
            if states.iter().any(|b| b.1 == a.1 && b.2 != a.2) {
                self.violation(format!("members at the same applied index differ: {states:?}"));
                break;
            }
        }
    }
}

/// The `snapshot-drops-record` bug: the snapshot's newest key-space record is lost.
fn drop_newest_record(message: &mut Message) {
    use prost::Message as _;
    let snapshot = message.mut_snapshot();
    let mut image = chorus_proto::chorus::v1::StateImage::decode(snapshot.get_data()).expect("an image");
    if image.kv.pop().is_some() {
        snapshot.set_data(image.encode_to_vec().into());
    }
}

fn cas_txn(key: Vec<u8>, expected: Option<Vec<u8>>, new: Vec<u8>) -> TxnRequest {
    let compare = match expected {
        Some(value) => Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::Value(value)),
            ..Default::default()
        },
        None => Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        },
    };
    let put = PutRequest { key, value: new, ..Default::default() };
    TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }],
        failure: vec![],
    }
}

/// Serves a get from the node's applied state. Serializable reads are checked here
/// against their own promise: on one node, within one boot, never older than what
/// that node served before.
fn serve_get(
    running: &mut Running,
    key: &[u8],
    serializable: bool,
    violations: &mut Vec<String>,
    i: usize,
) -> Answer {
    let request = RangeRequest { key: key.to_vec(), ..Default::default() };
    let response = match running.node.mvcc().range(&request) {
        Ok(response) => response,
        Err(_) => return Answer::Failed,
    };
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    if serializable {
        if revision < running.serializable_revision_max {
            violations.push(format!(
                "node {}: serializable read at revision {revision} after serving revision {}",
                i + 1,
                running.serializable_revision_max
            ));
        }
        running.serializable_revision_max = revision;
    }
    Answer::Done(KvOutcome::Get(response.kvs.first().map(|kv| kv.value.clone())))
}
