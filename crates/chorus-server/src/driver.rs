//! The node driver: one OS thread that owns the [`Node`] and its [`DiskStorage`],
//! and performs the effects the node returns, in the order written in
//! `chorus_core::node` (begin, send-early, persist, finish, send-late, reply).
//!
//! Everything reaches the driver through one bounded channel of [`Input`]s: ticks,
//! peer messages, client proposals, and word that linearizable reads wait (they
//! wait in a [`ReadGate`] and run on the request's thread). The driver takes the
//! first input that arrives, then every input already waiting (up to
//! [`INPUT_BATCH_MAX`]), and only then runs cycles. So all the proposals that
//! arrived while the previous fsync was running share the next one: group commit
//! without a timer.
//!
//! It is a thread rather than a tokio task because a cycle blocks on fsync.

use chorus_core::limits::INPUT_BATCH_MAX;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use chorus_core::limits::WATCH_SYNC_EVENTS_MAX;
use chorus_core::node::{LeaseCallError, Node, NodeStatus, OpResponse, Reply, SharedMvcc};
use chorus_core::watch::{SinkError, WatchHub, WatchSink};
use chorus_proto::chorus::v1::{command::Op, MemberAttributes};
use chorus_proto::etcdserverpb::{
    LeaseKeepAliveResponse, LeaseLeasesResponse, LeaseStatus, LeaseTimeToLiveResponse, RangeRequest,
    RangeResponse, ResponseHeader, WatchCreateRequest, WatchResponse,
};
use chorus_storage::DiskStorage;
use raft::prelude::{ConfState, Message, MessageType};
use tokio::sync::{mpsc, oneshot};

use crate::read_gate::ReadGate;
use crate::status::RequestError;
use crate::transport::PeerHandle;

/// A linearizable read batch that has had no answer for this many ticks asks again
/// (its first read-index request may have been lost with a leader).
const READ_RETRY_TICKS: u64 = 3;
/// How long a keep-alive waits for its renewal record to apply before it is
/// answered "not the leader" (and retried by the caller).
const RENEWAL_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often, in ticks, a member compares its database's size with its quota.
const QUOTA_CHECK_TICKS: u64 = 10;
/// How often, in ticks, a member re-publishes its attributes until they are applied.
const PUBLISH_RETRY_TICKS: u64 = 10;

pub type ProposeReply = oneshot::Sender<Result<OpResponse, RequestError>>;

/// Work for the driver.
pub enum Input {
    Tick,
    Peer(Vec<Message>),
    Propose {
        op: Op,
        deadline: Instant,
        reply: ProposeReply,
    },
    /// Linearizable reads wait in the [`ReadGate`] for a read index.
    ReadsWaiting,
    Status {
        reply: oneshot::Sender<DriverStatus>,
    },
    /// A watch stream opened; its responses go to `sink`.
    WatchOpen {
        stream: u64,
        sink: ChannelSink,
    },
    WatchCreate {
        stream: u64,
        request: WatchCreateRequest,
    },
    WatchCancel {
        stream: u64,
        watch_id: i64,
    },
    WatchProgress {
        stream: u64,
    },
    WatchClose {
        stream: u64,
    },
    /// Leader-only lease calls; `Err(NotLeader)` means forward them to the leader.
    LeaseKeepAlive {
        id: i64,
        reply: oneshot::Sender<Result<LeaseKeepAliveResponse, LeaseCallError>>,
    },
    LeaseTimeToLive {
        id: i64,
        keys: bool,
        reply: oneshot::Sender<Result<LeaseTimeToLiveResponse, LeaseCallError>>,
    },
    LeaseLeases {
        reply: oneshot::Sender<LeaseLeasesResponse>,
    },
    /// A snapshot built from storage on the builder thread.
    SnapshotBuilt {
        data: Vec<u8>,
        index: u64,
        term: u64,
        conf_state: ConfState,
    },
    /// A membership change (the Cluster service): answered with
    /// [`OpResponse::ConfChange`] once applied here.
    ConfChange {
        change: raft::prelude::ConfChangeV2,
        member: MemberAttributes,
        deadline: Instant,
        reply: ProposeReply,
    },
    /// Hand leadership to `to` (this member must lead).
    TransferLeader {
        to: u64,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// A peer refused this member's messages: it was removed from the cluster.
    RemovedFromCluster,
    /// The transport could not deliver a snapshot to member `to`.
    SnapshotFailed {
        to: u64,
    },
    /// The transport delivered a snapshot to member `to` (its receiver took it).
    SnapshotDelivered {
        to: u64,
    },
    /// Defragment this member's database (Maintenance.Defragment); answered when
    /// the compacted copy has replaced it.
    Defragment {
        reply: DefragReply,
    },
    /// Commit the database writes still waiting, then answer the status (before
    /// the database is read for a backup or a hash; see
    /// `DiskStorage::persist_deferring`).
    FlushStorage {
        reply: oneshot::Sender<DriverStatus>,
    },
    /// The defragmentation thread finished its copy.
    DefragCopied(Result<chorus_storage::DefragCopied, chorus_storage::StorageError>),
}

pub type DefragReply = oneshot::Sender<Result<chorus_storage::DefragReport, String>>;

/// Watch stream ids, unique in the member (one hub serves every listener, the
/// gateway and the server's own internal watches).
static NEXT_WATCH_STREAM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh watch stream id.
pub fn next_watch_stream() -> u64 {
    NEXT_WATCH_STREAM.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A watch stream's bounded response channel, as the watch hub's sink.
pub struct ChannelSink(pub mpsc::Sender<Result<WatchResponse, tonic::Status>>);

impl WatchSink for ChannelSink {
    fn try_send(&self, response: WatchResponse) -> Result<(), SinkError> {
        match self.0.try_send(Ok(response)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SinkError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SinkError::Closed),
        }
    }
}

/// What the status and member-list calls need to know.
#[derive(Debug, Clone)]
pub struct DriverStatus {
    pub node: NodeStatus,
    pub revision: i64,
    pub db_size_bytes: u64,
    /// The bytes of the records the database holds (etcd's `dbSizeInUse`).
    pub db_size_in_use_bytes: u64,
    pub conf_state: ConfState,
    pub members: BTreeMap<u64, MemberAttributes>,
    pub watchers_count: u64,
    /// On the leader: the voters that answered recently; None elsewhere.
    pub active_voters: Option<std::collections::BTreeSet<u64>>,
    /// On the leader: learners within reach of its log.
    pub learners_caught_up: Vec<u64>,
    /// On the leader: the voter whose log matches most of its own.
    pub most_caught_up_voter: Option<u64>,
    /// Alarms raised and not disarmed.
    pub alarms: Vec<chorus_proto::etcdserverpb::AlarmMember>,
}

/// What a request thread needs to answer a read by itself, without a round trip
/// through the driver thread: the applied key space, the current term, and the
/// gate where linearizable reads wait for their read index.
#[derive(Clone)]
pub struct ReadView {
    mvcc: SharedMvcc,
    term: Arc<AtomicU64>,
    ids: HeaderIds,
    gate: Arc<ReadGate>,
}

impl ReadView {
    /// A range over what this member has applied so far.
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, RequestError> {
        let mvcc = self.mvcc.read().unwrap_or_else(PoisonError::into_inner);
        let mut response = mvcc.range(request)?;
        response.header = Some(ResponseHeader {
            cluster_id: self.ids.cluster_id,
            member_id: self.ids.member_id,
            revision: mvcc.revision(),
            raft_term: self.term.load(Ordering::Relaxed),
        });
        Ok(response)
    }
}

/// Fixed facts the driver stamps into every response header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderIds {
    pub cluster_id: u64,
    pub member_id: u64,
}

struct PendingProposal {
    deadline: Instant,
    reply: ProposeReply,
}

type KeepAliveReply = oneshot::Sender<Result<LeaseKeepAliveResponse, LeaseCallError>>;

/// The keep-alives renewed on this leader in one pass over the inputs, replicated
/// together in one renewal record and answered once it applies.
struct PendingRenewals {
    deadline: Instant,
    waiting: Vec<(KeepAliveReply, LeaseKeepAliveResponse)>,
}

/// A proposal raft refused because no leader was known; retried every tick.
struct ParkedProposal {
    seq: u64,
    op: Op,
    deadline: Instant,
    reply: ProposeReply,
}

/// One read-index request: when its index is applied here, the reads with
/// tickets up to `covers` may go on.
struct ReadBatch {
    covers: u64,
    asked_at_tick: u64,
}

pub struct Driver {
    node: Node,
    storage: DiskStorage,
    inputs: mpsc::Receiver<Input>,
    peers: HashMap<u64, PeerHandle>,
    ids: HeaderIds,
    own_attributes: MemberAttributes,
    next_seq: u64,
    proposals: HashMap<u64, PendingProposal>,
    renewals: HashMap<u64, PendingRenewals>,
    /// Keep-alives renewed in this pass over the inputs, proposed after it.
    renewals_unproposed: Vec<(KeepAliveReply, LeaseKeepAliveResponse)>,
    parked: VecDeque<ParkedProposal>,
    /// Where linearizable reads wait; `tickets_asked` is the last ticket a
    /// read-index request covers.
    read_gate: Arc<ReadGate>,
    tickets_asked: u64,
    read_batches: BTreeMap<u64, ReadBatch>,
    next_read_ctx: u64,
    ticks: u64,
    publish_seq: Option<u64>,
    publish_asked_at_tick: u64,
    /// (leader, term) when proposals were last checked against leader changes.
    leader_seen: (u64, u64),
    watches: WatchHub<ChannelSink>,
    /// Ticks between progress notifications to idle watchers that asked for them.
    watch_progress_ticks: u64,
    /// Where the durable writes' durations go (`with_metrics`).
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// The driver's own input, for the snapshot builder thread to answer on.
    snapshot_answers: Option<mpsc::WeakSender<Input>>,
    snapshot_building: bool,
    /// The client's membership change in flight, if any.
    conf_change_seq: Option<u64>,
    /// Starts a sender to a member added to the configuration (its id and
    /// `host:port`); None in tests with a fixed membership.
    peer_starter: Option<PeerStarter>,
    /// The leader promotes learners that caught up.
    auto_promote_learners: bool,
    /// Shared with the peer service, which refuses their messages.
    removed_members: crate::transport::RemovedMembers,
    /// `--quota-backend-bytes`: past it, this member raises the NOSPACE alarm.
    quota_bytes: u64,
    /// Callers waiting for the defragmentation under way (when not empty).
    defrag_waiting: Vec<DefragReply>,
    defrag_started: Option<Instant>,
    /// The term as of the last input handled, for [`ReadView`]s.
    term_shared: Arc<AtomicU64>,
    /// How long to poll for more inputs after a pass that did work (`with_busy_poll`).
    busy_poll: Duration,
    /// Whether the inputs of this pass held work beyond ticks and heartbeats.
    pass_worked: bool,
}

/// A removed member stops, as etcd's does: it can no longer take part. It stops
/// a moment later, so that the answer to a removal it proposed itself (or a
/// client's request it just answered) still reaches the client.
fn stop_removed() {
    static STOPPING: std::sync::Once = std::sync::Once::new();
    STOPPING.call_once(|| {
        tracing::error!("this member has been permanently removed from the cluster; stopping");
        eprintln!("chorus: the member has been permanently removed from the cluster");
        let _ = std::thread::Builder::new().name("chorus-removed".into()).spawn(|| {
            std::thread::sleep(REMOVED_EXIT_DELAY);
            std::process::exit(0);
        });
    });
}

/// How long a removed member goes on answering (with errors) before it exits.
const REMOVED_EXIT_DELAY: Duration = Duration::from_millis(1000);

/// Starts a peer sender task for (member id, `host:port`) and returns its handle.
pub type PeerStarter = Box<dyn Fn(u64, String) -> PeerHandle + Send>;

impl Driver {
    pub fn new(
        node: Node,
        storage: DiskStorage,
        inputs: mpsc::Receiver<Input>,
        peers: HashMap<u64, PeerHandle>,
        ids: HeaderIds,
        own_attributes: MemberAttributes,
        watch_progress_ticks: u64,
    ) -> Driver {
        Driver {
            node,
            storage,
            inputs,
            peers,
            ids,
            own_attributes,
            next_seq: 1,
            proposals: HashMap::new(),
            renewals: HashMap::new(),
            renewals_unproposed: Vec::new(),
            parked: VecDeque::new(),
            read_gate: Arc::new(ReadGate::default()),
            tickets_asked: 0,
            read_batches: BTreeMap::new(),
            next_read_ctx: 1,
            ticks: 0,
            publish_seq: None,
            publish_asked_at_tick: 0,
            leader_seen: (raft::INVALID_ID, 0),
            watches: WatchHub::default(),
            watch_progress_ticks,
            metrics: None,
            snapshot_answers: None,
            snapshot_building: false,
            conf_change_seq: None,
            peer_starter: None,
            auto_promote_learners: false,
            removed_members: Default::default(),
            quota_bytes: u64::MAX,
            defrag_waiting: Vec::new(),
            defrag_started: None,
            term_shared: Arc::new(AtomicU64::new(0)),
            busy_poll: Duration::ZERO,
            pass_worked: false,
        }
    }

    /// A view for request threads to serve reads from.
    pub fn read_view(&self) -> ReadView {
        self.publish_status();
        ReadView {
            mvcc: self.node.shared_mvcc(),
            term: self.term_shared.clone(),
            ids: self.ids,
            gate: self.read_gate.clone(),
        }
    }

    /// The term and leader that request threads read without asking the driver.
    fn publish_status(&self) {
        let status = self.node.status();
        self.term_shared.store(status.term, Ordering::Relaxed);
        self.read_gate.set_leader(status.leader_id);
    }

    /// Follows membership changes: starts a sender to every member added (once its
    /// peer URLs are known) and stops the sender of every member removed; and, if
    /// `auto_promote_learners`, promotes learners that caught up, on the leader.
    pub fn with_membership(
        mut self,
        peer_starter: PeerStarter,
        auto_promote_learners: bool,
        removed_members: crate::transport::RemovedMembers,
    ) -> Driver {
        self.peer_starter = Some(peer_starter);
        self.auto_promote_learners = auto_promote_learners;
        self.removed_members = removed_members;
        self
    }

    /// Raises the NOSPACE alarm once the database passes `quota_bytes`.
    pub fn with_quota(mut self, quota_bytes: u64) -> Driver {
        self.quota_bytes = quota_bytes;
        self
    }

    /// Proposes this member's NOSPACE alarm when its database is past the quota
    /// (checked every `QUOTA_CHECK_TICKS`; the alarm is replicated, as etcd's).
    fn check_quota(&mut self) {
        if !self.ticks.is_multiple_of(QUOTA_CHECK_TICKS) || self.storage.size_bytes() <= self.quota_bytes {
            return;
        }
        use chorus_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
        let own = self.ids.member_id;
        let nospace = AlarmType::Nospace as i32;
        if self.node.alarms().iter().any(|a| a.member_id == own && a.alarm == nospace) {
            return;
        }
        tracing::warn!(
            size_bytes = self.storage.size_bytes(),
            quota_bytes = self.quota_bytes,
            "the database is past --quota-backend-bytes: raising the NOSPACE alarm"
        );
        let request = AlarmRequest { action: AlarmAction::Activate as i32, member_id: own, alarm: nospace };
        let seq = self.take_seq();
        let _ = self.node.propose(seq, Op::Alarm(request));
    }

    /// Starts and stops peer senders to match the configuration.
    fn follow_membership(&mut self) {
        if self.node.is_removed() {
            stop_removed();
        }
        let Some(starter) = &self.peer_starter else { return };
        let conf = self.node.conf_state();
        if conf.voters.is_empty() && conf.learners.is_empty() {
            return; // a joining member before its first snapshot: keep the links it started with
        }
        // Remember who left, so their messages are refused and they learn it.
        for id in self.peers.keys().filter(|id| !conf.voters.contains(id) && !conf.learners.contains(id)) {
            if !conf.voters_outgoing.contains(id) {
                self.removed_members.write().expect("removed members").insert(*id);
            }
        }
        let own = self.ids.member_id;
        let wanted: std::collections::BTreeSet<u64> = conf
            .voters
            .iter()
            .chain(&conf.learners)
            .chain(&conf.voters_outgoing)
            .copied()
            .filter(|id| *id != own)
            .collect();
        self.peers.retain(|id, _| wanted.contains(id));
        for id in wanted {
            if self.peers.contains_key(&id) {
                continue;
            }
            let url = self.node.members().get(&id).and_then(|m| m.peer_urls.first().cloned());
            let Some(addr) = url.and_then(|url| crate::config::url_to_addr(&url).ok()) else { continue };
            tracing::info!(member = %format!("{id:016x}"), %addr, "starting the peer link to a new member");
            self.peers.insert(id, starter(id, addr));
        }
    }

    /// On the leader: proposes the promotion of one learner that caught up.
    fn promote_caught_up_learner(&mut self) {
        if !self.auto_promote_learners || self.node.conf_change_pending() {
            return;
        }
        if self.conf_change_seq.is_some_and(|seq| self.proposals.contains_key(&seq)) {
            return;
        }
        let Some(learner) =
            self.node.learners_caught_up(chorus_core::limits::LEARNER_PROMOTE_LAG_ENTRIES).first().copied()
        else {
            return;
        };
        let mut single = raft::prelude::ConfChangeSingle::default();
        single.set_change_type(raft::prelude::ConfChangeType::AddNode);
        single.node_id = learner;
        let mut change = raft::prelude::ConfChangeV2::default();
        change.set_changes(vec![single].into());
        let member = MemberAttributes { member_id: learner, ..Default::default() };
        let seq = self.take_seq();
        if self.node.propose_conf_change(seq, change, member).is_ok() {
            tracing::info!(member = %format!("{learner:016x}"), "promoting a learner that caught up");
        }
    }

    /// Builds the snapshots raft asks for on a thread of their own, from storage,
    /// answering on `inputs` (the node must not build them inline).
    pub fn with_snapshot_builder(mut self, inputs: mpsc::WeakSender<Input>) -> Driver {
        self.snapshot_answers = Some(inputs);
        self
    }

    /// Starts building a snapshot if raft asked for one and none is being built.
    fn build_snapshot_if_asked(&mut self) {
        if !self.node.take_snapshot_request() || self.snapshot_building {
            return;
        }
        let Some(answers) = self.snapshot_answers.clone() else { return };
        let reader = self.storage.image_reader();
        self.snapshot_building = true;
        let spawned = std::thread::Builder::new().name("chorus-snapshot".into()).spawn(move || {
            let started = Instant::now();
            let built = reader.read().and_then(|image| {
                let conf_state = protobuf::Message::parse_from_bytes(&image.conf_state).map_err(|e| {
                    chorus_storage::StorageError::Io { path: "conf_state".into(), detail: format!("{e}") }
                })?;
                let (index, term) = (image.applied_index, image.applied_term);
                Ok((prost::Message::encode_to_vec(&image), index, term, conf_state))
            });
            let input = match built {
                Ok((data, index, term, conf_state)) => {
                    tracing::info!(
                        index,
                        bytes = data.len(),
                        build_ms = started.elapsed().as_millis() as u64,
                        "built a snapshot"
                    );
                    Input::SnapshotBuilt { data, index, term, conf_state }
                }
                Err(error) => {
                    tracing::error!(%error, "could not build a snapshot; raft will ask again");
                    Input::SnapshotBuilt {
                        data: Vec::new(),
                        index: 0,
                        term: 0,
                        conf_state: ConfState::default(),
                    }
                }
            };
            if let Some(answers) = answers.upgrade() {
                let _ = answers.blocking_send(input);
            }
        });
        if spawned.is_err() {
            self.snapshot_building = false;
        }
    }

    /// Starts a defragmentation, or joins the one under way: the copy is written
    /// on a thread of its own while this member goes on serving; only the final
    /// swap (writing the batches persisted meanwhile into the copy, a rename)
    /// holds up the driver.
    fn start_defrag(&mut self, reply: DefragReply) {
        self.defrag_waiting.push(reply);
        if self.storage.defrag_running() {
            return;
        }
        let Some(answers) = self.snapshot_answers.clone() else {
            self.answer_defrag(Err("this member cannot defragment (no background worker)".into()));
            return;
        };
        let copy = match self.storage.defrag_begin() {
            Ok(copy) => copy,
            Err(error) => return self.answer_defrag(Err(error.to_string())),
        };
        tracing::info!(size_bytes = self.storage.size_bytes(), "defragmenting: copying the database");
        self.defrag_started = Some(Instant::now());
        let spawned = std::thread::Builder::new().name("chorus-defrag".into()).spawn(move || {
            let copied = copy.run();
            if let Some(answers) = answers.upgrade() {
                let _ = answers.blocking_send(Input::DefragCopied(copied));
            }
        });
        if let Err(error) = spawned {
            let failed =
                Err(chorus_storage::StorageError::Io { path: "defrag".into(), detail: error.to_string() });
            self.finish_defrag(failed);
        }
    }

    fn finish_defrag(&mut self, copied: Result<chorus_storage::DefragCopied, chorus_storage::StorageError>) {
        let swap_started = Instant::now();
        let result = self.storage.defrag_finish(copied);
        let swap_ms = swap_started.elapsed().as_millis() as u64;
        let total_ms = self.defrag_started.take().map_or(0, |t| t.elapsed().as_millis() as u64);
        match &result {
            Ok(report) => tracing::info!(
                size_before = report.size_before,
                size_after = report.size_after,
                batches_replayed = report.batches_replayed,
                batches_replayed_at_swap = report.batches_replayed_at_swap,
                swap_ms,
                total_ms,
                "defragmented the database"
            ),
            Err(error) => tracing::error!(%error, "defragmentation failed; the database is unchanged"),
        }
        self.answer_defrag(result.map_err(|e| e.to_string()));
    }

    fn answer_defrag(&mut self, result: Result<chorus_storage::DefragReport, String>) {
        for reply in self.defrag_waiting.drain(..) {
            let _ = reply.send(result.clone());
        }
    }

    /// Records the duration of every durable (fsynced) write in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Driver {
        self.metrics = Some(metrics);
        self
    }

    /// After a pass over the inputs that did work, polls for the next input this
    /// long before sleeping (see `chorus_core::limits::BUSY_POLL_US_DEFAULT`).
    pub fn with_busy_poll(mut self, busy_poll: Duration) -> Driver {
        self.busy_poll = busy_poll;
        self
    }

    /// Runs until every sender of the input channel is gone.
    pub fn run(mut self) {
        while let Some(first) = self.next_input() {
            self.pass_worked = false;
            self.handle(first);
            for _ in 1..INPUT_BATCH_MAX {
                match self.inputs.try_recv() {
                    Ok(input) => self.handle(input),
                    Err(_) => break,
                }
            }
            self.ask_read_index();
            self.propose_renewals();
            while self.node.has_work() {
                self.cycle();
            }
            self.build_snapshot_if_asked();
            self.follow_membership();
            self.publish_status();
        }
        // Not needed for safety (the log has everything), but a restart replays nothing.
        if let Err(error) = self.storage.checkpoint() {
            tracing::warn!(%error, "could not checkpoint the database at stop");
        }
        tracing::info!("node driver stopped");
    }

    /// The next input: polled for `busy_poll` after a pass that did work, so that
    /// a message arriving soon is taken without a sleep and a wake-up; waited for
    /// otherwise. Polling yields the CPU between tries.
    fn next_input(&mut self) -> Option<Input> {
        if self.pass_worked {
            let started = Instant::now();
            let until = started + self.busy_poll;
            let polled = loop {
                match self.inputs.try_recv() {
                    Ok(input) => break Some(input),
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                if Instant::now() >= until {
                    break None;
                }
                std::thread::yield_now();
            };
            if let Some(metrics) = &self.metrics {
                let ended =
                    if polled.is_some() { &metrics.busy_polls_input } else { &metrics.busy_polls_timeout };
                ended.inc();
                metrics.busy_poll_seconds.inc_by(started.elapsed().as_secs_f64());
            }
            if polled.is_some() {
                return polled;
            }
        }
        self.inputs.blocking_recv()
    }

    fn handle(&mut self, input: Input) {
        // Replication and client requests; not ticks, heartbeats or the periodic
        // status and metrics questions of an idle member. Only looked at when
        // polling is on (it is off by default).
        if !self.busy_poll.is_zero() && !self.pass_worked {
            self.pass_worked = match &input {
                Input::Peer(messages) => messages.iter().any(|m| {
                    !matches!(m.get_msg_type(), MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse)
                }),
                Input::Propose { .. } | Input::LeaseKeepAlive { .. } => true,
                _ => false,
            };
        }
        match input {
            Input::Tick => {
                self.on_tick();
                self.fail_proposals_on_leader_change();
            }
            Input::Peer(messages) => {
                for message in messages {
                    self.node.step(message);
                }
                self.fail_proposals_on_leader_change();
            }
            Input::Propose { op, deadline, reply } => {
                let seq = self.take_seq();
                self.propose(seq, op, deadline, reply);
            }
            // Looked at after the inputs are taken (`ask_read_index`).
            Input::ReadsWaiting => {}
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::WatchOpen { stream, sink } => self.watches.open_stream(stream, sink),
            Input::WatchCreate { stream, request } => {
                let header = self.header();
                self.watches.create(stream, &request, header);
                self.watches.sync(&self.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
            }
            Input::WatchCancel { stream, watch_id } => {
                let header = self.header();
                self.watches.cancel(stream, watch_id, header);
            }
            Input::WatchProgress { stream } => {
                let header = self.header();
                self.watches.progress(stream, header);
            }
            Input::WatchClose { stream } => self.watches.close_stream(stream),
            Input::LeaseKeepAlive { id, reply } => self.keep_alive(id, reply),
            Input::SnapshotFailed { to } => self.node.report_snapshot(to, false),
            Input::SnapshotDelivered { to } => self.node.report_snapshot(to, true),
            Input::Defragment { reply } => self.start_defrag(reply),
            Input::FlushStorage { reply } => {
                self.flush_storage();
                let _ = reply.send(self.status());
            }
            Input::DefragCopied(copied) => self.finish_defrag(copied),
            Input::RemovedFromCluster => stop_removed(),
            Input::ConfChange { change, member, deadline, reply } => {
                if self.node.conf_change_pending()
                    || self.conf_change_seq.is_some_and(|seq| self.proposals.contains_key(&seq))
                {
                    let refused =
                        "etcdserver: a membership change is already in progress; retry when it is applied";
                    let _ = reply.send(Err(RequestError::Refused(refused.into())));
                    return;
                }
                let seq = self.take_seq();
                match self.node.propose_conf_change(seq, change, member) {
                    Ok(()) => {
                        self.conf_change_seq = Some(seq);
                        self.proposals.insert(seq, PendingProposal { deadline, reply });
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Input::TransferLeader { to, reply } => {
                let status = self.node.status();
                let result = if status.role != raft::StateRole::Leader {
                    Err(RequestError::Refused("etcdserver: not leader".into()))
                } else if !self.node.conf_state().voters.contains(&to) {
                    Err(RequestError::Refused(format!("etcdserver: {to:x} is not a voting member")))
                } else {
                    self.node.transfer_leader(to);
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Input::SnapshotBuilt { data, index, term, conf_state } => {
                self.snapshot_building = false;
                if !data.is_empty() {
                    self.node.offer_snapshot(data, index, term, conf_state);
                }
            }
            Input::LeaseTimeToLive { id, keys, reply } => {
                let header = Some(self.header());
                let result = self.node.lease_time_to_live(id).map(|(ttl, granted_ttl, lease_keys)| {
                    LeaseTimeToLiveResponse {
                        header,
                        id,
                        ttl,
                        granted_ttl,
                        keys: if keys { lease_keys } else { Vec::new() },
                    }
                });
                let _ = reply.send(result);
            }
            Input::LeaseLeases { reply } => {
                let leases = self.node.lease_ids().into_iter().map(|id| LeaseStatus { id }).collect();
                let _ = reply.send(LeaseLeasesResponse { header: Some(self.header()), leases });
            }
        }
    }

    /// Renews on this leader and replicates the renewal before answering (see
    /// `Node::lease_keep_alive`); a lease that is gone is answered TTL 0 at once.
    fn keep_alive(&mut self, id: i64, reply: KeepAliveReply) {
        let ttl = match self.node.lease_keep_alive(id) {
            Ok(ttl) => ttl,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let response = LeaseKeepAliveResponse { header: Some(self.header()), id, ttl };
        self.renewals_unproposed.push((reply, response));
    }

    /// Replicates the renewals of this pass over the inputs in one record. A
    /// renewal is answered once the record applies; a lease "gone" (TTL 0) too,
    /// since an entry of this leader's term that applies proves it still led (see
    /// `Node::leadership_barrier`). A leader change within the pass has already
    /// failed them (`fail_proposals_on_leader_change`).
    fn propose_renewals(&mut self) {
        if self.renewals_unproposed.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.renewals_unproposed);
        let renewed: Vec<(i64, i64)> =
            waiting.iter().filter(|(_, r)| r.ttl > 0).map(|(_, r)| (r.id, r.ttl)).collect();
        let seq = self.take_seq();
        match self.node.propose(seq, Node::renewal_record(&renewed)) {
            Ok(()) => {
                let deadline = Instant::now() + RENEWAL_ANSWER_TIMEOUT;
                self.renewals.insert(seq, PendingRenewals { deadline, waiting });
            }
            Err(_) => {
                for (reply, _) in waiting {
                    let _ = reply.send(Err(LeaseCallError::NotLeader));
                }
            }
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn propose(&mut self, seq: u64, op: Op, deadline: Instant, reply: ProposeReply) {
        match self.node.propose(seq, op.clone()) {
            Ok(()) => {
                self.proposals.insert(seq, PendingProposal { deadline, reply });
            }
            Err(_) => self.parked.push_back(ParkedProposal { seq, op, deadline, reply }),
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        // Database writes wait at most a tick (see `DiskStorage::persist_deferring`).
        self.flush_storage();
        self.node.tick();
        self.promote_caught_up_learner();
        self.check_quota();
        let now = Instant::now();
        self.expire(now);
        // Retry proposals that found no leader, now that one may be known.
        for _ in 0..self.parked.len() {
            let Some(parked) = self.parked.pop_front() else { break };
            if self.node.status().leader_id == raft::INVALID_ID {
                self.parked.push_back(parked);
                break;
            }
            self.propose(parked.seq, parked.op, parked.deadline, parked.reply);
        }
        self.retry_read_index();
        self.publish_attributes();
        let header = self.header();
        self.watches.sync(&self.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
        self.watches.tick(header, self.watch_progress_ticks);
    }

    /// When the leader changes, a proposal forwarded to the old leader may be lost
    /// with it; rather than let the client wait for its deadline, answer every
    /// proposal in flight "leader changed" (its outcome is unknown), as etcd does,
    /// so clients retry against the new leader at once.
    fn fail_proposals_on_leader_change(&mut self) {
        let status = self.node.status();
        let seen = (status.leader_id, status.term);
        if seen == self.leader_seen {
            return;
        }
        let had_leader = self.leader_seen.0 != raft::INVALID_ID;
        self.leader_seen = seen;
        if !had_leader {
            return;
        }
        for (_, pending) in self.proposals.drain() {
            let _ = pending.reply.send(Err(RequestError::LeaderChanged));
        }
        // Unreplicated renewals are not acknowledged: the client retries elsewhere.
        let unanswered = self.renewals.drain().flat_map(|(_, pending)| pending.waiting);
        for (reply, _) in unanswered.chain(self.renewals_unproposed.drain(..)) {
            let _ = reply.send(Err(LeaseCallError::NotLeader));
        }
    }

    /// Answers every request whose deadline has passed with `Unavailable`.
    fn expire(&mut self, now: Instant) {
        let no_leader = self.node.status().leader_id == raft::INVALID_ID;
        let error = if no_leader { RequestError::NoLeader } else { RequestError::Timeout };
        self.proposals.retain(|_, pending| {
            if pending.deadline > now {
                return true;
            }
            let reply = std::mem::replace(&mut pending.reply, oneshot::channel().0);
            let _ = reply.send(Err(error.clone()));
            false
        });
        let expired: Vec<u64> =
            self.renewals.iter().filter(|(_, r)| r.deadline <= now).map(|(seq, _)| *seq).collect();
        for seq in expired {
            for (reply, _) in self.renewals.remove(&seq).map(|p| p.waiting).unwrap_or_default() {
                let _ = reply.send(Err(LeaseCallError::NotLeader));
            }
        }
        while self.parked.front().is_some_and(|p| p.deadline <= now) {
            let parked = self.parked.pop_front().expect("front exists");
            let _ = parked.reply.send(Err(RequestError::NoLeader));
        }
    }

    /// Until this member's client URLs are in the replicated member table, proposes
    /// them (once per [`PUBLISH_RETRY_TICKS`]).
    fn publish_attributes(&mut self) {
        let id = self.ids.member_id;
        let own = &self.own_attributes;
        let published = self.node.members().get(&id);
        if published.is_some_and(|m| m.name == own.name && m.client_urls == own.client_urls) {
            self.publish_seq = None;
            return;
        }
        if self.publish_seq.is_some() && self.ticks - self.publish_asked_at_tick < PUBLISH_RETRY_TICKS {
            return;
        }
        let seq = self.take_seq();
        let op = Op::PublishMember(self.own_attributes.clone());
        if self.node.propose(seq, op).is_ok() {
            self.publish_seq = Some(seq);
            self.publish_asked_at_tick = self.ticks;
        }
    }

    /// One read-index request for all linearizable reads that arrived since the last.
    fn ask_read_index(&mut self) {
        let taken = self.read_gate.tickets_taken();
        if taken <= self.tickets_asked {
            return;
        }
        self.tickets_asked = taken;
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.read_batches.insert(ctx, ReadBatch { covers: taken, asked_at_tick: self.ticks });
        self.node.read_index(ctx);
    }

    /// A read-index request with no answer for [`READ_RETRY_TICKS`] may have been
    /// lost with a leader: the newest is asked again, and covers the older ones,
    /// which are dropped. When every read has given up, so does the driver.
    fn retry_read_index(&mut self) {
        if self.read_batches.is_empty() {
            return;
        }
        if !self.read_gate.any_waiting() {
            self.read_batches.clear();
            return;
        }
        let ticks = self.ticks;
        let newest = *self.read_batches.keys().next_back().expect("not empty");
        self.read_batches
            .retain(|&ctx, batch| ctx == newest || ticks - batch.asked_at_tick < READ_RETRY_TICKS);
        let batch = self.read_batches.get_mut(&newest).expect("kept");
        if ticks - batch.asked_at_tick >= READ_RETRY_TICKS {
            batch.asked_at_tick = ticks;
            self.node.read_index(newest);
        }
    }

    /// One cycle, in the order documented in `chorus_core::node`.
    fn cycle(&mut self) {
        // 1. begin
        let mut cycle = self.node.begin_cycle();
        // 2. send-early
        self.send(std::mem::take(&mut cycle.messages));
        // The entries applied in `begin` were committed: durable in the log of a
        // majority, this member's included (raft-rs hands over only entries
        // persisted here). Their answers, reads and watch events need not wait for
        // this cycle's write, which holds their effects only for a faster restart.
        if !cycle.snapshot_installed {
            if !cycle.persist.writes.changes.is_empty() {
                let header = self.header();
                self.watches.notify(&cycle.persist.writes.changes, header);
            }
            self.answer(std::mem::take(&mut cycle.replies));
            self.serve_reads(std::mem::take(&mut cycle.reads_ready));
        }
        // 3. persist
        let persist_started = Instant::now();
        let must_sync = cycle.persist.must_sync;
        let persisted = self.storage.persist_deferring(std::mem::take(&mut cycle.persist));
        if let (Some(metrics), true) = (&self.metrics, must_sync) {
            metrics.disk_fsync_duration.observe(persist_started.elapsed().as_secs_f64());
        }
        if let Err(error) = persisted {
            storage_failed(error);
        }
        // A snapshot replaced the state: watchers catch up once it is written.
        if cycle.snapshot_installed {
            let header = self.header();
            self.watches.resync_all();
            self.watches.sync(&self.node.mvcc(), header, WATCH_SYNC_EVENTS_MAX);
        }
        // 4. finish
        let finished = self.node.finish_cycle();
        // 5. send-late
        self.send(finished.messages);
        // 6. reply
        if cycle.snapshot_installed {
            self.answer(cycle.replies);
            self.serve_reads(cycle.reads_ready);
        }
        self.answer(finished.replies);
        self.serve_reads(finished.reads_ready);
    }

    /// Commits the database writes still waiting.
    fn flush_storage(&mut self) {
        if let Err(error) = self.storage.flush() {
            storage_failed(error);
        }
    }

    /// Hands each peer its messages of the cycle at once (one write to its link).
    /// A slow or gone peer's messages are dropped: raft retransmits, so that
    /// costs time, never safety.
    fn send(&mut self, messages: Vec<Message>) {
        let mut by_peer: Vec<(u64, Vec<Message>)> = Vec::new();
        for message in messages {
            match by_peer.iter_mut().find(|(to, _)| *to == message.to) {
                Some((_, theirs)) => theirs.push(message),
                None => by_peer.push((message.to, vec![message])),
            }
        }
        for (to, theirs) in by_peer {
            if let Some(peer) = self.peers.get_mut(&to) {
                peer.send(theirs);
            }
        }
    }

    fn answer(&mut self, replies: Vec<Reply>) {
        for reply in replies {
            if Some(reply.seq) == self.publish_seq {
                self.publish_seq = None;
                continue;
            }
            if let Some(renewals) = self.renewals.remove(&reply.seq) {
                for (reply, response) in renewals.waiting {
                    let _ = reply.send(Ok(response));
                }
                continue;
            }
            let Some(pending) = self.proposals.remove(&reply.seq) else { continue };
            let result = reply.result.map(|r| self.stamp(r)).map_err(RequestError::Kv);
            let _ = pending.reply.send(result);
        }
    }

    /// Releases the reads whose read index this member has now applied; a batch
    /// asked earlier than a released one is covered by it.
    fn serve_reads(&mut self, contexts: Vec<u64>) {
        let mut through = 0;
        for ctx in contexts {
            if let Some(batch) = self.read_batches.remove(&ctx) {
                through = through.max(batch.covers);
            }
        }
        if through > 0 {
            self.read_batches.retain(|_, batch| batch.covers > through);
            self.read_gate.release(through);
        }
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.ids.cluster_id,
            member_id: self.ids.member_id,
            revision: self.node.mvcc().revision(),
            raft_term: self.node.status().term,
        }
    }

    /// Fills the ids and term into a response's header, keeping its revision.
    fn stamp(&self, mut response: OpResponse) -> OpResponse {
        let mut header = self.header();
        let slot = match &mut response {
            OpResponse::Put(r) => &mut r.header,
            OpResponse::DeleteRange(r) => &mut r.header,
            OpResponse::Txn(r) => &mut r.header,
            OpResponse::Compaction(r) => &mut r.header,
            OpResponse::LeaseGrant(r) => &mut r.header,
            OpResponse::LeaseRevoke(r) => &mut r.header,
            OpResponse::Alarm(r) => &mut r.header,
            OpResponse::ConfChange(_) | OpResponse::Internal => return response,
        };
        if let Some(revision) = slot.as_ref().map(|h| h.revision) {
            header.revision = revision;
        }
        *slot = Some(header);
        response
    }

    fn status(&self) -> DriverStatus {
        DriverStatus {
            node: self.node.status(),
            revision: self.node.mvcc().revision(),
            db_size_bytes: self.storage.size_bytes(),
            db_size_in_use_bytes: self.storage.size_in_use_bytes(),
            conf_state: self.node.conf_state(),
            watchers_count: self.watches.watchers_count() as u64,
            members: self.node.members().clone(),
            active_voters: self.node.active_voters(),
            learners_caught_up: self
                .node
                .learners_caught_up(chorus_core::limits::LEARNER_PROMOTE_LAG_ENTRIES),
            most_caught_up_voter: self.node.most_caught_up_voter(),
            alarms: self.node.alarms(),
        }
    }
}

/// How API handlers talk to the driver.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: mpsc::Sender<Input>,
    request_timeout: Duration,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    read_view: ReadView,
}

impl NodeHandle {
    /// Reads are served from `read_view` on the calling thread: a serializable
    /// read costs no hand-off between threads, a linearizable one waits in the
    /// view's gate for a read index.
    pub fn new(inputs: mpsc::Sender<Input>, request_timeout: Duration, read_view: ReadView) -> NodeHandle {
        NodeHandle { inputs, request_timeout, metrics: None, read_view }
    }

    /// Counts proposals committed and failed in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> NodeHandle {
        self.metrics = Some(metrics);
        self
    }

    /// The leader as of the driver's last batch of inputs (0: none known).
    pub fn leader_hint(&self) -> u64 {
        self.read_view.gate.leader()
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.read_view.ids.member_id
    }

    /// How long a request may wait for the cluster.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Proposes a write and waits for it to be applied here, at most the request timeout.
    pub async fn propose(&self, op: Op) -> Result<OpResponse, RequestError> {
        let deadline = Instant::now() + self.request_timeout;
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Propose { op, deadline, reply }, deadline).await?;
        let result = Self::await_answer(answer, deadline).await;
        if let Some(metrics) = &self.metrics {
            match &result {
                Ok(_) => metrics.proposals_committed.inc(),
                Err(_) => metrics.proposals_failed.inc(),
            };
        }
        result
    }

    /// Serves a range read (linearizable unless the request is serializable).
    pub async fn read(&self, request: RangeRequest) -> Result<RangeResponse, RequestError> {
        if !request.serializable {
            let deadline = Instant::now() + self.request_timeout;
            self.read_view.gate.wait(&self.inputs, deadline).await?;
        }
        self.read_view.range(&request)
    }

    /// A leader-only lease call: `Ok(Err(NotLeader))` when this member does not lead.
    pub async fn lease_call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LeaseCallError>>) -> Input,
    ) -> Result<Result<T, LeaseCallError>, RequestError> {
        self.ask(make).await
    }

    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, RequestError> {
        self.ask(|reply| Input::LeaseLeases { reply }).await
    }

    /// Hands a watch-stream input to the driver (waits while its queue is full).
    pub async fn watch_input(&self, input: Input) -> Result<(), RequestError> {
        self.inputs.send(input).await.map_err(|_| RequestError::Stopped)
    }

    /// Hands a watch-stream input to the driver without waiting: gives the input
    /// back if the queue is full (or the driver stopped).
    pub fn try_watch_input(&self, input: Input) -> Result<(), Box<Input>> {
        self.inputs.try_send(input).map_err(|error| match error {
            mpsc::error::TrySendError::Full(input) | mpsc::error::TrySendError::Closed(input) => {
                Box::new(input)
            }
        })
    }

    /// Proposes a membership change and waits for it to be applied here.
    pub async fn conf_change(
        &self,
        change: raft::prelude::ConfChangeV2,
        member: MemberAttributes,
    ) -> Result<OpResponse, RequestError> {
        let deadline = Instant::now() + self.request_timeout;
        let (reply, answer) = oneshot::channel();
        self.submit(Input::ConfChange { change, member, deadline, reply }, deadline).await?;
        Self::await_answer(answer, deadline).await
    }

    /// Asks this member, which must lead, to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), RequestError> {
        self.ask(|reply| Input::TransferLeader { to, reply }).await?
    }

    pub async fn status(&self) -> Result<DriverStatus, RequestError> {
        self.ask(|reply| Input::Status { reply }).await
    }

    /// Defragments this member's database; waits as long as that takes (a
    /// caller gives up by dropping the call).
    pub async fn defragment(&self) -> Result<Result<chorus_storage::DefragReport, String>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Input::Defragment { reply }, Instant::now() + self.request_timeout).await?;
        answer.await.map_err(|_| RequestError::Stopped)
    }

    /// The status, asked after this member's database writes still waiting are
    /// committed: everything applied before the call is in the database's next read.
    pub async fn status_with_storage_flushed(&self) -> Result<DriverStatus, RequestError> {
        self.ask(|reply| Input::FlushStorage { reply }).await
    }

    /// Sends the input `make` builds around a reply channel and waits for the
    /// answer, both within the request timeout.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> Result<T, RequestError> {
        let deadline = Instant::now() + self.request_timeout;
        let (reply, answer) = oneshot::channel();
        self.submit(make(reply), deadline).await?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(RequestError::Stopped),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    async fn submit(&self, input: Input, deadline: Instant) -> Result<(), RequestError> {
        // Most of the time the queue has room: no timer for that.
        let input = match self.inputs.try_send(input) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(RequestError::Stopped),
            Err(mpsc::error::TrySendError::Full(input)) => input,
        };
        match tokio::time::timeout_at(deadline.into(), self.inputs.send(input)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RequestError::Stopped),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    async fn await_answer<T>(
        answer: oneshot::Receiver<Result<T, RequestError>>,
        deadline: Instant,
    ) -> Result<T, RequestError> {
        // The driver answers every request by its deadline; the margin only covers
        // a driver that has stopped mid-request.
        let margin = Duration::from_millis(500);
        match tokio::time::timeout_at((deadline + margin).into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Stopped),
            Err(_) => Err(RequestError::Timeout),
        }
    }
}

/// The node cannot go on without its disk: continuing could acknowledge writes
/// that are not durable. Stops the whole process.
fn storage_failed(error: chorus_storage::StorageError) -> ! {
    tracing::error!(%error, "storage write failed; stopping");
    eprintln!("chorus: fatal: {error}");
    std::process::exit(70);
}
