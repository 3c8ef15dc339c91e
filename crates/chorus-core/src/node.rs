//! The consensus node: raft-rs's `RawNode`, the replicated state machine, and the
//! bookkeeping around them (proposals waiting for their entry, reads waiting for
//! their read index), all without IO.
//!
//! # Driving a node
//!
//! The driver (in `chorus-server`, or the simulator) owns one [`Node`] and calls,
//! from one thread:
//!
//! - [`Node::tick`] every heartbeat interval of its monotonic clock;
//! - [`Node::step`] for every raft message received from a peer;
//! - [`Node::propose`] and [`Node::read_index`] for client requests;
//!
//! and then, while [`Node::has_work`] is true, performs one **cycle** in exactly this
//! order (raft-rs's Ready protocol; each step is named so a test can crash there):
//!
//! 1. `begin`: [`Node::begin_cycle`] takes raft-rs's `Ready`, applies the committed
//!    entries it holds to the in-memory state machine, and returns a [`Cycle`].
//! 2. `send-early`: send [`Cycle::messages`] (a leader replicates before it persists;
//!    raft thesis 10.2.1). [`Cycle::replies`] and [`Cycle::reads_ready`] may be
//!    answered now too, unless [`Cycle::snapshot_installed`]: they come from
//!    committed entries, which raft-rs hands over only once they are durable here.
//! 3. `persist`: write [`Cycle::persist`] in ONE storage transaction: new log entries,
//!    hard state, conf state, the state machine's writes and the applied index
//!    together, so replaying the log after a crash is idempotent. fsync it when
//!    [`PersistBatch::must_sync`] is set.
//! 4. `finish`: call [`Node::finish_cycle`], which advances raft-rs and applies the
//!    entries that became committed by this persist.
//! 5. `send-late`: send [`Finished::messages`] (votes and append acknowledgements may
//!    only leave after the persist).
//! 6. `reply`: answer clients from [`Finished::replies`] and its ready reads (and
//!    from the cycle's, if not answered in step 2).
//!
//! Writes applied in step 4 are carried into the next cycle's persist batch (the
//! entries are already durable in the log on a majority, so nothing is lost if the
//! node crashes first: they are applied again on restart).
//!
//! # Determinism
//!
//! raft-rs randomizes election timeouts with an unseeded thread RNG whenever it
//! resets (on every change of role, term or leader). After every call that can reset
//! it, before the next tick can act on the drawn value, we overwrite it with a draw
//! from a ChaCha RNG seeded by the driver, so the node's behaviour depends only on
//! its inputs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chorus_proto::chorus::v1::{
    command::Op, fenced_write, Command, FencedWrite, MemberAttributes, StateImage,
};
use chorus_proto::etcdserverpb::alarm_request::AlarmAction;
use chorus_proto::etcdserverpb::{AlarmMember, AlarmResponse, AlarmType};
use chorus_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeResponse, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutResponse, TxnResponse,
};
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{GetEntriesContext, RaftState, RawNode, StateRole};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::KvError;
use crate::lease::{LeaseStore, LeaseWrites};
use crate::lease_clock::LeaseClock;
use crate::limits::{
    LEASE_CHECKPOINTS_PER_PROPOSAL_MAX, LEASE_CHECKPOINT_INTERVAL_MS, LEASE_REVOKES_PER_TICK_MAX,
    LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN, LOG_HELD_FOR_FOLLOWERS_FACTOR,
};
use crate::mvcc::{MvccStore, WriteSet};

/// How a node is set up. Every field is an input; nothing is read from the environment.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's raft id (its etcd member id); never zero.
    pub id: u64,
    /// The voters of a newly created cluster. Ignored when the storage already holds a
    /// conf state.
    pub initial_voters: Vec<u64>,
    /// Ticks without a leader's heartbeat before a follower campaigns (the minimum;
    /// each timeout adds seeded jitter of up to the same amount again).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Seeds the election-timeout jitter.
    pub seed: u64,
    /// Distinguishes this boot from earlier ones, so an entry proposed before a crash
    /// and applied after the restart is never taken for a new proposal's answer.
    pub boot_id: u64,
    /// The length of a tick on the driver's monotonic clock, for lease timers.
    pub tick_ms: u64,
    /// The log is compacted once it holds more than this many applied entries
    /// (etcd's `--snapshot-count`).
    pub log_entries_max: u64,
    /// The log is compacted also once its entries' payloads pass this many bytes
    /// (`--snapshot-bytes`), keeping at most half as many bytes of applied entries.
    pub log_bytes_max: u64,
    /// Applied entries kept behind a compaction, so that a member only slightly
    /// behind catches up from the log rather than from a snapshot.
    pub log_catchup_entries: u64,
    /// A leader keeps the entries its live followers still need, up to 4 x
    /// `log_entries_max` or this many entries, whichever is more
    /// ([`crate::limits::LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN`]; the simulator varies it).
    pub log_held_entries_min: u64,
    /// A snapshot sent to a member that has not caught up after this many ticks is
    /// counted as failed, and sent again.
    pub snapshot_retry_ticks: u64,
    /// The node builds the snapshots raft asks for itself, from its in-memory state,
    /// during a cycle (the simulator). Otherwise the driver sees
    /// [`Node::take_snapshot_request`], builds one from storage on another thread,
    /// and hands it over with [`Node::offer_snapshot`], so the member does not
    /// stall while a large state is copied.
    pub inline_snapshots: bool,
}

impl NodeConfig {
    /// A configuration with chorus's defaults for everything but the identity.
    pub fn with_defaults(id: u64, initial_voters: Vec<u64>, tick_ms: u64) -> NodeConfig {
        NodeConfig {
            id,
            initial_voters,
            election_ticks: 10,
            heartbeat_ticks: 1,
            seed: id,
            boot_id: 1,
            tick_ms,
            log_entries_max: crate::limits::LOG_ENTRIES_MAX_DEFAULT,
            log_bytes_max: crate::limits::LOG_BYTES_MAX_DEFAULT,
            log_catchup_entries: crate::limits::LOG_CATCHUP_ENTRIES_DEFAULT,
            log_held_entries_min: LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN,
            snapshot_retry_ticks: crate::limits::SNAPSHOT_RETRY_MS / tick_ms.max(1),
            inline_snapshots: true,
        }
    }
}

/// The key space of a node, readable from other threads.
pub type SharedMvcc = Arc<RwLock<MvccStore>>;

/// The node's write guard on its key space (a field borrow, so that the caller can
/// hold the node's other fields at the same time).
fn write_mvcc(mvcc: &SharedMvcc) -> RwLockWriteGuard<'_, MvccStore> {
    mvcc.write().unwrap_or_else(PoisonError::into_inner)
}

/// What storage hands back at start-up: everything the node persisted.
#[derive(Debug, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Log entries in index order, starting right after `log_snapshot`'s index.
    pub entries: Vec<Entry>,
    /// (index, term) of the last entry compacted away, (0, 0) when none was.
    pub log_snapshot: (u64, u64),
    pub applied_index: u64,
    pub mvcc: MvccStore,
    pub members: BTreeMap<u64, MemberAttributes>,
    /// The proposals applied, by proposing member (see [`PersistBatch::proposals_applied`]).
    pub applied_proposals: BTreeMap<u64, BTreeSet<u64>>,
    pub leases: LeaseStore,
    /// Alarms raised and not disarmed.
    pub alarms: Vec<AlarmMember>,
}

/// The first sequence number of a node's own proposals; the driver's stay below.
const INTERNAL_SEQ_FIRST: u64 = 1 << 39;

/// Why a lease call only the leader can answer was not answered here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseCallError {
    #[error("not the leader")]
    NotLeader,
}

/// A proposal could not be handed to raft.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (an election is under way, or this node is cut off).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// raft-rs refused it for another reason (for example a leader transfer).
    #[error("etcdserver: proposal dropped: {0}")]
    Dropped(String),
    /// This member was removed from the cluster.
    #[error("etcdserver: the member has been permanently removed from the cluster")]
    Removed,
}

/// The result of applying one command, for the client that proposed it.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    /// The alarms after an alarm request.
    Alarm(AlarmResponse),
    /// A membership change applied: the configuration after it.
    ConfChange(ConfState),
    /// Checkpoints and member attributes: internal, nobody waits for them.
    Internal,
}

/// A proposal of this node that has been applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The sequence number given to [`Node::propose`].
    pub seq: u64,
    pub result: Result<OpResponse, KvError>,
    /// The raft index of the entry (for tests and tracing).
    pub index: u64,
}

/// What one cycle must write, in one transaction.
#[derive(Debug, Default, Clone)]
pub struct PersistBatch {
    /// Entries to append; an entry replaces any stored entry at the same or a later
    /// index (a new leader may overwrite an uncommitted suffix).
    pub entries: Vec<Entry>,
    /// The hard state to store (always the current one; it is small).
    pub hard_state: HardState,
    /// Set when the conf state changed.
    pub conf_state: Option<ConfState>,
    /// The state machine's changes since the last persist.
    pub writes: WriteSet,
    /// Members whose published attributes changed since the last persist.
    pub members: Vec<MemberAttributes>,
    /// Members removed from the table since the last persist.
    pub members_removed: Vec<u64>,
    /// (proposer, proposal tag) of every command applied since the last persist,
    /// and those forgotten to bound the memory: the state machine applies a
    /// proposal once even if the log holds it twice, across restarts too.
    pub proposals_applied: Vec<(u64, u64)>,
    pub proposals_forgotten: Vec<(u64, u64)>,
    /// Lease records changed since the last persist.
    pub leases: LeaseWrites,
    /// The whole alarm list, when it changed since the last persist.
    pub alarms: Option<Vec<AlarmMember>>,
    /// The index of the last entry whose effects are in `writes` (or earlier).
    pub applied_index: u64,
    /// That entry's term (storage keeps it with the state, for snapshots built
    /// from storage alone).
    pub applied_term: u64,
    /// The batch must be on disk (fsync) before the cycle finishes: it holds log
    /// entries or a changed vote or term.
    pub must_sync: bool,
    /// A snapshot installed in this cycle: storage replaces the whole state with
    /// it (every table, and the log) BEFORE applying the rest of the batch.
    pub install: Option<Box<StateImage>>,
    /// (index, term): log entries up to this index are compacted away.
    pub log_compacted_to: Option<(u64, u64)>,
}

/// The first half of a cycle: see the module documentation for what to do with it.
#[derive(Debug, Default)]
pub struct Cycle {
    pub messages: Vec<Message>,
    pub persist: PersistBatch,
    pub replies: Vec<Reply>,
    /// Read contexts whose read index this node has now applied.
    pub reads_ready: Vec<u64>,
    /// The state was replaced by a snapshot from the leader: watchers must catch
    /// up from the store's history rather than from this cycle's changes.
    pub snapshot_installed: bool,
}

/// The second half of a cycle.
#[derive(Debug, Default)]
pub struct Finished {
    pub messages: Vec<Message>,
    pub replies: Vec<Reply>,
    pub reads_ready: Vec<u64>,
}

/// The node's view of consensus, for status calls and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: StateRole,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
}

/// raft-rs's view of the log: the uncompacted log in memory, mirrored from storage.
///
/// Keeping it in memory keeps raft-rs's reads free of IO; compaction keeps it
/// bounded (see [`NodeConfig::log_entries_max`]).
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index of the first entry in `entries`.
    first_index: u64,
    /// The term of the entry at `first_index - 1`, the last one compacted away
    /// (0 when nothing was).
    snapshot_term: u64,
    entries: VecDeque<Entry>,
    /// The payload bytes (data and context) of `entries`.
    bytes: u64,
    /// The latest snapshot built for a member that needs compacted entries.
    prepared: Option<Snapshot>,
    /// raft-rs asked for a snapshot that is not prepared yet.
    snapshot_wanted: std::cell::Cell<bool>,
}

impl LogStore {
    fn new(
        hard_state: HardState,
        conf_state: ConfState,
        entries: Vec<Entry>,
        (snapshot_index, snapshot_term): (u64, u64),
    ) -> LogStore {
        let first_index = snapshot_index + 1;
        for (offset, entry) in entries.iter().enumerate() {
            assert_eq!(entry.index, first_index + offset as u64, "log has a gap");
        }
        let bytes = entries.iter().map(entry_bytes).sum();
        LogStore {
            hard_state,
            conf_state,
            first_index,
            snapshot_term,
            entries: entries.into(),
            bytes,
            prepared: None,
            snapshot_wanted: std::cell::Cell::new(false),
        }
    }

    /// Drops the entries up to `index` (which must be held); returns its term.
    fn compact(&mut self, index: u64) -> u64 {
        assert!(index >= self.first_index && index <= self.last_index_value(), "compact outside the log");
        let drop_count = (index + 1 - self.first_index) as usize;
        let term = self.entries[drop_count - 1].term;
        let dropped: u64 = self.entries.drain(..drop_count).map(|e| entry_bytes(&e)).sum();
        self.bytes -= dropped;
        self.first_index = index + 1;
        self.snapshot_term = term;
        term
    }

    /// Replaces the log by an installed snapshot's position.
    fn apply_snapshot(&mut self, index: u64, term: u64, conf_state: ConfState) {
        self.entries.clear();
        self.bytes = 0;
        self.first_index = index + 1;
        self.snapshot_term = term;
        self.conf_state = conf_state;
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.prepared = None;
    }

    fn last_index_value(&self) -> u64 {
        self.first_index + self.entries.len() as u64 - 1
    }

    /// Appends entries, first dropping any stored entry at or after the first new index.
    fn append(&mut self, new_entries: &[Entry]) {
        let Some(first_new) = new_entries.first() else { return };
        assert!(first_new.index >= self.first_index, "append below the first index");
        assert!(first_new.index <= self.last_index_value() + 1, "append leaves a gap");
        let keep = (first_new.index - self.first_index) as usize;
        let dropped: u64 = self.entries.drain(keep..).map(|e| entry_bytes(&e)).sum();
        self.bytes = self.bytes - dropped + new_entries.iter().map(entry_bytes).sum::<u64>();
        self.entries.extend(new_entries.iter().cloned());
    }

    /// The lowest index such that the entries after it, through `applied`, hold at
    /// most `budget` payload bytes (`applied` itself when even that one is larger).
    fn index_keeping_bytes(&self, applied: u64, budget: u64) -> u64 {
        let mut kept = 0u64;
        let mut index = applied;
        while index >= self.first_index {
            let entry = &self.entries[(index - self.first_index) as usize];
            kept += entry_bytes(entry);
            if kept > budget {
                return index;
            }
            index -= 1;
        }
        index
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        assert!(high <= self.last_index_value() + 1, "entries past the last index");
        let max_bytes = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size_bytes = 0u64;
        for index in low..high {
            let entry = &self.entries[(index - self.first_index) as usize];
            size_bytes += u64::from(entry.compute_size());
            if !out.is_empty() && size_bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.first_index - 1 {
            return Ok(self.snapshot_term);
        }
        if index < self.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        match self.entries.get((index - self.first_index) as usize) {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(raft::StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_value())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Building an image needs the state machine, which this store does not
        // hold: say "not yet" (raft-rs asks again on the follower's next answer)
        // and let the node build one after this step.
        match &self.prepared {
            Some(snapshot)
                if snapshot.get_metadata().index >= request_index
                    && snapshot.get_metadata().index + 1 >= self.first_index =>
            {
                Ok(snapshot.clone())
            }
            _ => {
                self.snapshot_wanted.set(true);
                Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}

/// One member: raft-rs plus the replicated state machine.
pub struct Node {
    raw: RawNode<LogStore>,
    /// Shared with the server's request threads, which serve serializable reads from
    /// it directly (see [`Node::shared_mvcc`]); only this node writes it.
    mvcc: SharedMvcc,
    members: BTreeMap<u64, MemberAttributes>,
    applied_proposals: BTreeMap<u64, BTreeSet<u64>>,
    leases: LeaseStore,
    lease_clock: LeaseClock,
    /// Sequence numbers of the node's own proposals (lease revokes and checkpoints).
    next_internal_seq: u64,
    applied_index: u64,
    election_ticks: usize,
    rng: ChaCha8Rng,
    /// (role, term, leader) when the election timeout was last set.
    timeout_epoch: (StateRole, u64, u64),
    boot_id: u64,
    /// Reads waiting until the applied index reaches their read index.
    reads_waiting: Vec<(u64, u64)>,
    /// The state machine's changes not yet handed to storage.
    pending_writes: WriteSet,
    pending_members: Vec<MemberAttributes>,
    pending_members_removed: Vec<u64>,
    /// (member, alarm type) of every alarm raised and not disarmed.
    alarms: BTreeSet<(u64, i32)>,
    pending_alarms: bool,
    pending_proposals_applied: Vec<(u64, u64)>,
    pending_proposals_forgotten: Vec<(u64, u64)>,
    pending_leases: LeaseWrites,
    pending_conf_state: Option<ConfState>,
    /// Log compaction not yet handed to storage: (index, term).
    pending_log_compaction: Option<(u64, u64)>,
    /// The log must be compacted up to this applied index at the next persist (a
    /// member joined: it must be caught up by a snapshot, never from index 1,
    /// where the log does not hold the initial configuration).
    compact_through: Option<u64>,
    log_entries_max: u64,
    log_bytes_max: u64,
    log_catchup_entries: u64,
    log_held_entries_min: u64,
    snapshot_retry_ticks: u64,
    inline_snapshots: bool,
    tick_ms: u64,
    /// Ticks since start; times snapshots in flight.
    ticks: u64,
    /// Members sent a snapshot, and the tick it was sent.
    snapshots_in_flight: BTreeMap<u64, u64>,
    /// The tick at which raft asked for a snapshot that is built outside the node,
    /// until raft sends one: the log is not compacted meanwhile (within the hold's
    /// bounds), or the snapshot would be too old to use by the time it is built.
    snapshot_asked_at: Option<u64>,
    /// Followers sent a snapshot and not yet answered from past it: the snapshot's
    /// index and the tick it was sent at.
    snapshot_holds: BTreeMap<u64, (u64, u64)>,
    /// The tick the prepared snapshot was built.
    prepared_at_tick: u64,
    /// This member applied its own removal from the configuration: it no longer
    /// takes part in consensus (raft-rs must not be stepped any more: a removed
    /// leader would panic looking for its own progress).
    removed: bool,
    /// A leader that applied its own removal goes on leading raft-rs (refusing
    /// every request) only until it has handed leadership over to a remaining
    /// voter: gone silent at once, it would leave the others without the commit
    /// of its removal, in the old configuration with one voter fewer to elect a
    /// successor (a 4-voter cluster would need all 3 remaining votes).
    leaving: bool,
    /// The Ready between `begin_cycle` and `finish_cycle`.
    in_cycle: Option<raft::Ready>,
}

impl Node {
    /// Builds a node from its configuration and what storage recovered.
    pub fn new(
        config: &NodeConfig,
        recovered: Recovered,
        logger: &slog::Logger,
    ) -> Result<Node, raft::Error> {
        let mut conf_state = recovered.conf_state;
        // A new cluster's configuration is bootstrapped, not logged: store it with
        // the first persist, so storage alone always knows the configuration (the
        // snapshots built from storage carry it).
        let mut bootstrapped_conf_state = None;
        if conf_state.voters.is_empty() && conf_state.learners.is_empty() && !config.initial_voters.is_empty()
        {
            conf_state.voters = config.initial_voters.clone();
            bootstrapped_conf_state = Some(conf_state.clone());
        }
        let mut hard_state = recovered.hard_state;
        // The applied index is persisted with the data it produced, but the commit
        // index in the hard state may have been written in an earlier transaction.
        // Everything applied was committed, so the commit index is at least that.
        hard_state.commit = hard_state.commit.max(recovered.applied_index);
        let store = LogStore::new(hard_state, conf_state, recovered.entries, recovered.log_snapshot);
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: recovered.applied_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            // Proposals stepped in one pass of the driver each make raft-rs send
            // every follower an append; with this, an append to a follower not yet
            // taken from raft-rs takes the new entries too, so a batch of proposals
            // travels as one message per follower and is acknowledged by one.
            batch_append: true,
            check_quorum: true,
            pre_vote: true,
            // raft-rs draws from [min, max) with an unseeded RNG on every reset; we
            // overwrite each draw before it is used (see `reseed_election_timeout`).
            min_election_tick: config.election_ticks,
            max_election_tick: 2 * config.election_ticks,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        let raw = RawNode::new(&raft_config, store, logger)?;
        let mut node = Node {
            raw,
            mvcc: Arc::new(RwLock::new(recovered.mvcc)),
            members: recovered.members,
            applied_proposals: recovered.applied_proposals,
            leases: recovered.leases,
            lease_clock: LeaseClock::new(config.tick_ms, config.election_ticks as u64),
            next_internal_seq: INTERNAL_SEQ_FIRST,
            applied_index: recovered.applied_index,
            election_ticks: config.election_ticks,
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ config.id.rotate_left(17)),
            timeout_epoch: (StateRole::Follower, u64::MAX, 0),
            boot_id: config.boot_id,
            reads_waiting: Vec::new(),
            pending_writes: WriteSet::default(),
            pending_members: Vec::new(),
            pending_members_removed: Vec::new(),
            alarms: recovered.alarms.iter().map(|a| (a.member_id, a.alarm)).collect(),
            pending_alarms: false,
            pending_proposals_applied: Vec::new(),
            pending_proposals_forgotten: Vec::new(),
            pending_leases: LeaseWrites::default(),
            pending_conf_state: bootstrapped_conf_state,
            pending_log_compaction: None,
            compact_through: None,
            log_entries_max: config.log_entries_max.max(1),
            log_bytes_max: config.log_bytes_max.max(1),
            log_catchup_entries: config.log_catchup_entries,
            log_held_entries_min: config.log_held_entries_min,
            snapshot_retry_ticks: config.snapshot_retry_ticks.max(1),
            inline_snapshots: config.inline_snapshots,
            tick_ms: config.tick_ms,
            ticks: 0,
            snapshots_in_flight: BTreeMap::new(),
            snapshot_asked_at: None,
            snapshot_holds: BTreeMap::new(),
            prepared_at_tick: 0,
            removed: false,
            leaving: false,
            in_cycle: None,
        };
        // A member that stored a configuration without itself was removed; a joiner
        // (no configuration yet) is not.
        let conf = conf_members(&node.raw.store().conf_state);
        node.removed = !conf.is_empty() && !conf.contains(&config.id);
        node.reseed_election_timeout();
        Ok(node)
    }

    /// Advances raft's logical clock by one tick.
    pub fn tick(&mut self) {
        assert!(self.in_cycle.is_none(), "tick during a cycle");
        if self.leaving {
            self.raw.tick();
            self.hand_over();
            return;
        }
        if self.removed {
            return;
        }
        self.raw.tick();
        self.lease_clock.tick();
        self.ticks += 1;
        self.reseed_election_timeout();
        self.propose_lease_work();
        self.retry_snapshots();
    }

    /// A snapshot whose member has not caught up in time is counted as failed, so
    /// raft-rs sends another (raft-rs itself would wait for it forever). A member
    /// that caught up is forgotten. The prepared snapshot is dropped once nobody
    /// needs it, to give back its memory.
    fn retry_snapshots(&mut self) {
        let now = self.ticks;
        let retry_ticks = self.snapshot_retry_ticks;
        let mut failed = Vec::new();
        self.snapshots_in_flight.retain(|&to, &mut sent| {
            let sending =
                self.raw.raft.prs().get(to).is_some_and(|p| p.state == raft::ProgressState::Snapshot);
            if sending && now - sent >= retry_ticks {
                failed.push(to);
            }
            sending && now - sent < retry_ticks
        });
        for to in failed {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
        }
        let idle = self.snapshots_in_flight.is_empty() && now - self.prepared_at_tick >= retry_ticks;
        if idle && self.raw.store().prepared.is_some() {
            self.raw.mut_store().prepared = None;
        }
    }

    /// The transport's word on a snapshot it carried: on failure raft-rs sends
    /// another without waiting for [`NodeConfig::snapshot_retry_ticks`]. Once
    /// delivered, raft-rs stops waiting for the member's answer to the snapshot and
    /// probes it at the member's next heartbeat answer: an answer lost on the way
    /// (sent before the member's link to this leader was open) would otherwise hold
    /// the member in snapshot state, sent nothing, until the retry.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        assert!(self.in_cycle.is_none(), "report_snapshot during a cycle");
        if delivered {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        } else {
            self.snapshots_in_flight.remove(&to);
            self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
        }
    }

    /// The leader's lease duties on each tick: revoke expired leases (rate-limited)
    /// and checkpoint remaining TTLs through the log now and then.
    fn propose_lease_work(&mut self) {
        for id in self.lease_clock.take_expired(LEASE_REVOKES_PER_TICK_MAX) {
            self.propose_internal(Op::LeaseRevoke(LeaseRevokeRequest { id }));
        }
        let due = self
            .lease_clock
            .take_checkpoint(LEASE_CHECKPOINT_INTERVAL_MS, LEASE_CHECKPOINTS_PER_PROPOSAL_MAX);
        let checkpoints: Vec<LeaseCheckpoint> = due
            .into_iter()
            .filter(|(id, remaining_s)| self.leases.get(*id).is_some_and(|l| *remaining_s < l.granted_ttl_s))
            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
            .collect();
        if !checkpoints.is_empty() {
            self.propose_internal(Op::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }));
        }
    }

    /// Proposes a command of the node's own; nobody waits for its answer.
    fn propose_internal(&mut self, op: Op) {
        let seq = self.next_internal_seq;
        self.next_internal_seq += 1;
        let _ = self.propose(seq, op);
    }

    /// A keep-alive. On the leader: restarts the lease's timer and returns its
    /// granted TTL (0 when the lease does not exist or has expired, as etcd
    /// answers). Elsewhere: `Err(NotLeader)`, and the caller forwards it.
    ///
    /// A renewal lives only in this leader's memory until it is replicated, and a
    /// later leader that does not know of it could expire the lease sooner than
    /// the client was promised. So the caller must not acknowledge a positive TTL
    /// until [`Node::renewal_record`] for it has been proposed and applied.
    pub fn lease_keep_alive(&mut self, id: i64) -> Result<i64, LeaseCallError> {
        if self.removed || !self.lease_clock.is_leading() || self.raw.raft.state != StateRole::Leader {
            return Err(LeaseCallError::NotLeader);
        }
        let Some(lease) = self.leases.get(id) else { return Ok(0) };
        let ttl_s = lease.granted_ttl_s;
        if !self.lease_clock.renew(id, ttl_s) {
            return Ok(0); // expired: its revoke is under way
        }
        Ok(ttl_s)
    }

    /// A command that changes nothing, for a keep-alive this leader answers "gone"
    /// (TTL 0): the answer waits until the barrier applies. A leader that was paused
    /// or cut off may not know it was deposed, and its lease clock may have jumped
    /// ahead on resuming (missed ticks arrive at once) or its state may lack a lease
    /// a later leader granted: answering from them at once would tell a client that
    /// its live lease is gone. An entry of this leader's term that applies proves it
    /// still led after deciding; on a deposed leader the barrier never commits and
    /// the keep-alive fails like any write, so the client asks the real leader.
    pub fn leadership_barrier() -> Op {
        Op::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints: Vec::new() })
    }

    /// The command that replicates renewals, (lease, TTL) each: a checkpoint of
    /// the full TTL. Every member that applies it (and so any later leader) counts
    /// each lease as having at least its TTL left from then on. With none, it is a
    /// [`Node::leadership_barrier`].
    pub fn renewal_record(renewed: &[(i64, i64)]) -> Op {
        let checkpoints = renewed.iter().map(|&(id, ttl_s)| LeaseCheckpoint { id, remaining_ttl: ttl_s });
        Op::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints: checkpoints.collect() })
    }

    /// (remaining TTL, granted TTL, keys) of a lease, answered by the leader;
    /// remaining -1 and granted 0 for a lease that does not exist (etcd's answer).
    pub fn lease_time_to_live(&self, id: i64) -> Result<(i64, i64, Vec<Vec<u8>>), LeaseCallError> {
        if self.removed || !self.lease_clock.is_leading() || self.raw.raft.state != StateRole::Leader {
            return Err(LeaseCallError::NotLeader);
        }
        let Some(lease) = self.leases.get(id) else { return Ok((-1, 0, Vec::new())) };
        // The leader's deadline carries a tick of rounding and, after a leader change,
        // the grace; neither is the client's business: never report more than granted.
        let remaining =
            self.lease_clock.remaining_s(id).unwrap_or(lease.granted_ttl_s).min(lease.granted_ttl_s);
        Ok((remaining, lease.granted_ttl_s, lease.keys.iter().cloned().collect()))
    }

    /// Every lease id, from this member's applied state.
    pub fn lease_ids(&self) -> Vec<i64> {
        self.leases.ids().collect()
    }

    /// Hands a message from a peer to raft. Messages from members no longer in the
    /// configuration are ignored (raft-rs reports them as `StepPeerNotFound`).
    pub fn step(&mut self, message: Message) {
        assert!(self.in_cycle.is_none(), "step during a cycle");
        if self.removed && !self.leaving {
            return;
        }
        // Every error here is a message raft-rs chose to drop (from a removed peer,
        // a local message, a stale term): raft tolerates lost messages.
        let _ = self.raw.step(message);
        self.reseed_election_timeout();
    }

    /// Proposes a command. `seq` must be unique among this boot's proposals; the
    /// answer comes back as a [`Reply`] with the same `seq` once the entry is applied
    /// here (which may never happen if the entry is lost in a leader change: the
    /// driver times such proposals out).
    pub fn propose(&mut self, seq: u64, op: Op) -> Result<(), ProposeError> {
        assert!(self.in_cycle.is_none(), "propose during a cycle");
        if self.removed {
            return Err(ProposeError::Removed);
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        let command =
            Command { proposer_id: self.raw.raft.id, proposal_seq: self.proposal_tag(seq), op: Some(op) };
        let result = self.raw.propose(Vec::new(), command.encode_to_vec());
        self.reseed_election_timeout();
        match result {
            Ok(()) => Ok(()),
            Err(raft::Error::ProposalDropped) => Err(ProposeError::NoLeader),
            Err(other) => Err(ProposeError::Dropped(other.to_string())),
        }
    }

    /// Proposes a configuration change (the simulator's membership changes; the
    /// server's go through the Cluster service). Nobody is answered: the caller
    /// watches [`Node::conf_state`]. raft-rs turns a change proposed while
    /// another is pending into an empty entry.
    pub fn propose_conf_change_unanswered(&mut self, change: ConfChangeV2) -> Result<(), ProposeError> {
        assert!(self.in_cycle.is_none(), "propose during a cycle");
        if self.removed {
            return Err(ProposeError::Removed);
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        let result = self.raw.propose_conf_change(Vec::new(), change);
        self.reseed_election_timeout();
        result.map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// Asks for a read index for the context `ctx`; once this node has applied up to
    /// it, `ctx` is listed in `reads_ready` and reads of it may be served locally.
    /// If no leader answers, nothing comes back: the driver asks again or times out.
    pub fn read_index(&mut self, ctx: u64) {
        assert!(self.in_cycle.is_none(), "read_index during a cycle");
        if self.removed {
            return;
        }
        // The leader keeps one pending request per context and ignores a second
        // with the same bytes (raft-rs's `ReadOnly::add_request`): every member
        // counts its contexts from 1, so the bytes carry this member's id and boot
        // as well, which also keeps an answer from before a restart from
        // releasing a read of this one.
        let mut bytes = Vec::with_capacity(24);
        bytes.extend_from_slice(&ctx.to_be_bytes());
        bytes.extend_from_slice(&self.raw.raft.id.to_be_bytes());
        bytes.extend_from_slice(&self.boot_id.to_be_bytes());
        self.raw.read_index(bytes);
        self.reseed_election_timeout();
    }

    /// Whether a cycle has anything to do.
    pub fn has_work(&self) -> bool {
        ((!self.removed || self.leaving) && self.raw.has_ready())
            || (self.inline_snapshots && self.raw.store().snapshot_wanted.get())
            || self.compact_through.is_some()
            || !self.pending_writes.is_empty()
            || !self.pending_members.is_empty()
            || !self.pending_members_removed.is_empty()
            || self.pending_alarms
            || !self.pending_leases.is_empty()
            || self.pending_conf_state.is_some()
    }

    /// Step 1 of a cycle: see the module documentation.
    pub fn begin_cycle(&mut self) -> Cycle {
        assert!(self.in_cycle.is_none(), "cycle already begun");
        let mut cycle = Cycle::default();
        if self.inline_snapshots && self.raw.store().snapshot_wanted.replace(false) {
            self.prepare_snapshot();
        }
        if (self.removed && !self.leaving) || !self.raw.has_ready() {
            cycle.persist = self.take_persist_batch(Vec::new(), false);
            return cycle;
        }
        let mut ready = self.raw.ready();
        let install = if ready.snapshot().is_empty() {
            None
        } else {
            cycle.snapshot_installed = true;
            Some(Box::new(self.install_snapshot(ready.snapshot())))
        };
        cycle.messages = ready.take_messages();
        self.note_snapshots_sent(&cycle.messages);
        let committed = ready.take_committed_entries();
        cycle.replies = self.apply_entries(committed);
        if let Some(hard_state) = ready.hs() {
            self.raw.mut_store().hard_state = hard_state.clone();
        }
        let entries = ready.take_entries();
        self.raw.mut_store().append(&entries);
        for read_state in ready.take_read_states() {
            if let Some(ctx) = self.own_read_ctx(&read_state.request_ctx) {
                self.reads_waiting.push((ctx, read_state.index));
            }
        }
        cycle.reads_ready = self.take_reads_ready();
        let must_sync = ready.must_sync() || !entries.is_empty() || install.is_some();
        cycle.persist = self.take_persist_batch(entries, must_sync);
        cycle.persist.install = install;
        self.in_cycle = Some(ready);
        cycle
    }

    /// Remembers the snapshots the leader is sending, to retry them in time.
    fn note_snapshots_sent(&mut self, messages: &[Message]) {
        for message in messages {
            if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshots_in_flight.insert(message.to, self.ticks);
                let index = message.get_snapshot().get_metadata().index;
                self.snapshot_holds.insert(message.to, (index, self.ticks));
                self.snapshot_asked_at = None;
            }
        }
    }

    /// The image of the applied state, as raft's snapshot of the applied index.
    fn prepare_snapshot(&mut self) {
        let index = self.applied_index;
        let term = raft::Storage::term(self.raw.store(), index).expect("the applied entry's term is known");
        let conf_state = self.conf_state();
        let data = self.image().encode_to_vec();
        self.offer_snapshot(data, index, term, conf_state);
    }

    /// Whether raft asked for a snapshot it does not have (and forgets the ask):
    /// the driver then builds one and offers it (see [`NodeConfig::inline_snapshots`]).
    pub fn take_snapshot_request(&mut self) -> bool {
        let wanted = self.raw.store().snapshot_wanted.replace(false);
        if wanted {
            self.snapshot_asked_at.get_or_insert(self.ticks);
        }
        wanted
    }

    /// A snapshot built outside the node: the encoded image of the state at
    /// `index` (in term `term`, with configuration `conf_state`). Kept for raft to
    /// send; raft asks again if it is already too old.
    pub fn offer_snapshot(&mut self, data: Vec<u8>, index: u64, term: u64, conf_state: ConfState) {
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(conf_state);
        self.raw.mut_store().prepared = Some(snapshot);
        self.prepared_at_tick = self.ticks;
    }

    /// The image of the applied state (see [`crate::snapshot`]).
    pub fn image(&self) -> StateImage {
        let index = self.applied_index;
        let term = raft::Storage::term(self.raw.store(), index).unwrap_or(0);
        crate::snapshot::build(crate::snapshot::ImageSource {
            applied_index: index,
            applied_term: term,
            conf_state: &self.conf_state(),
            mvcc: &self.mvcc(),
            leases: &self.leases,
            members: &self.members,
            applied_proposals: &self.applied_proposals,
            alarms: &self.alarms(),
        })
    }

    /// Replaces the whole state by a snapshot from the leader. Everything not yet
    /// persisted is from before the snapshot's index, and is dropped: storage
    /// replaces every table with the image in this cycle's transaction.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> StateImage {
        let metadata = snapshot.get_metadata();
        let image = StateImage::decode(snapshot.get_data())
            .unwrap_or_else(|e| panic!("snapshot at index {} does not decode: {e}", metadata.index));
        let state = crate::snapshot::restore(&image)
            .unwrap_or_else(|e| panic!("snapshot at index {} is unusable: {e}", metadata.index));
        assert_eq!(state.applied_index, metadata.index, "snapshot image and metadata disagree");
        *self.mvcc_mut() = state.mvcc;
        self.leases = state.leases;
        self.members = state.members;
        self.applied_proposals = state.applied_proposals;
        self.alarms = state.alarms.iter().map(|a| (a.member_id, a.alarm)).collect();
        self.pending_alarms = false;
        self.lease_clock = LeaseClock::new(self.tick_ms, self.election_ticks as u64);
        self.applied_index = metadata.index;
        self.pending_writes = WriteSet::default();
        self.pending_members.clear();
        self.pending_members_removed.clear();
        self.pending_proposals_applied.clear();
        self.pending_proposals_forgotten.clear();
        self.pending_leases = LeaseWrites::default();
        self.pending_conf_state = None;
        self.pending_log_compaction = None;
        self.compact_through = None;
        let conf_state = metadata.get_conf_state().clone();
        self.raw.mut_store().apply_snapshot(metadata.index, metadata.term, conf_state);
        image
    }

    /// Step 4 of a cycle: the batch of [`Node::begin_cycle`] is persisted.
    pub fn finish_cycle(&mut self) -> Finished {
        let mut finished = Finished::default();
        let Some(mut ready) = self.in_cycle.take() else {
            return finished;
        };
        finished.messages = ready.take_persisted_messages();
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().hard_state.commit = commit;
        }
        finished.messages.extend(light.take_messages());
        finished.replies = self.apply_entries(light.take_committed_entries());
        self.raw.advance_apply();
        finished.reads_ready = self.take_reads_ready();
        self.reseed_election_timeout();
        self.hand_over();
        finished
    }

    /// A leader that applied its own removal: transfers leadership to the remaining
    /// voter whose log matches most (again if a transfer timed out), and stops
    /// taking part once it no longer leads (after the cycle that answered the
    /// message that ended its term, such as its successor's vote request).
    fn hand_over(&mut self) {
        if !self.leaving {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            self.leaving = false;
            return;
        }
        if self.raw.raft.lead_transferee.is_some() {
            return;
        }
        let voters = self.raw.store().conf_state.voters.clone();
        let prs = self.raw.raft.prs();
        let to = voters
            .into_iter()
            .max_by_key(|id| prs.get(*id).map_or((false, 0), |p| (p.recent_active, p.matched)));
        if let Some(to) = to {
            self.raw.transfer_leader(to);
        }
    }

    /// The replicated key space, as applied on this node. The guard holds off this
    /// node's writes: drop it before calling the node again.
    pub fn mvcc(&self) -> RwLockReadGuard<'_, MvccStore> {
        self.mvcc.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key space for readers on other threads: any prefix of the applied log
    /// they see is one this node applied, which is what a serializable read may
    /// return. Only this node writes it, one applied command at a time.
    pub fn shared_mvcc(&self) -> SharedMvcc {
        self.mvcc.clone()
    }

    fn mvcc_mut(&self) -> RwLockWriteGuard<'_, MvccStore> {
        write_mvcc(&self.mvcc)
    }

    /// Members that have published their attributes, by id.
    pub fn members(&self) -> &BTreeMap<u64, MemberAttributes> {
        &self.members
    }

    /// The current voters and learners.
    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            id: self.raw.raft.id,
            role: self.raw.raft.state,
            term: self.raw.raft.term,
            leader_id: self.raw.raft.leader_id,
            commit_index: self.raw.raft.raft_log.committed,
            applied_index: self.applied_index,
            last_index: self.raw.raft.raft_log.last_index(),
        }
    }

    /// The term and data of the log entry at `index`, if this node holds it. The
    /// simulator uses it to check that committed entries never change.
    pub fn log_entry(&self, index: u64) -> Option<(u64, &[u8])> {
        let store = self.raw.store();
        let offset = index.checked_sub(store.first_index)?;
        store.entries.get(offset as usize).map(|e| (e.term, e.data.as_ref()))
    }

    /// Proposes a membership change for a client: `member` (its id and peer URLs)
    /// rides in the entry's context, so every member records the peer URLs of a
    /// member added, and the proposer is answered with [`OpResponse::ConfChange`]
    /// once it applies the entry. The caller must check
    /// [`Node::conf_change_pending`] first: raft-rs silently turns a second
    /// pending change into an empty entry, which would never be answered.
    pub fn propose_conf_change(
        &mut self,
        seq: u64,
        change: ConfChangeV2,
        member: MemberAttributes,
    ) -> Result<(), ProposeError> {
        assert!(self.in_cycle.is_none(), "propose during a cycle");
        if self.removed {
            return Err(ProposeError::Removed);
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        let context = Command {
            proposer_id: self.raw.raft.id,
            proposal_seq: self.proposal_tag(seq),
            op: Some(Op::PublishMember(member)),
        };
        // In the change itself (raft-rs's own context argument goes to the entry,
        // where apply does not look).
        let mut change = change;
        change.context = context.encode_to_vec().into();
        let result = self.raw.propose_conf_change(Vec::new(), change);
        self.reseed_election_timeout();
        result.map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// On the leader: whether a membership change is proposed and not applied yet.
    pub fn conf_change_pending(&self) -> bool {
        self.raw.raft.state == StateRole::Leader && self.raw.raft.has_pending_conf()
    }

    /// On the leader: the learners whose log is within `lag_max` entries of its
    /// own and that answered recently (ready to be promoted).
    pub fn learners_caught_up(&self, lag_max: u64) -> Vec<u64> {
        if self.raw.raft.state != StateRole::Leader || self.removed {
            return Vec::new();
        }
        let last = self.raw.raft.raft_log.last_index();
        let learners = self.conf_state().learners;
        self.raw
            .raft
            .prs()
            .iter()
            // raft-rs marks a new member recently active before it has ever
            // answered, with nothing matched: only a learner that has answered (its
            // progress is replicating, something is matched) counts as caught up,
            // or one added but never started would be promoted in a young cluster.
            .filter(|(id, p)| {
                learners.contains(id)
                    && p.recent_active
                    && p.state == raft::ProgressState::Replicate
                    && p.matched > 0
                    && p.matched + lag_max >= last
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// On the leader: the voters that answered recently (itself included), or
    /// None elsewhere.
    pub fn active_voters(&self) -> Option<BTreeSet<u64>> {
        if self.raw.raft.state != StateRole::Leader {
            return None;
        }
        let voters = self.conf_state().voters;
        let own = self.raw.raft.id;
        let prs = self.raw.raft.prs();
        Some(
            voters
                .into_iter()
                .filter(|id| *id == own || prs.get(*id).is_some_and(|p| p.recent_active))
                .collect(),
        )
    }

    /// On the leader: the voter (not itself) whose log matches most of its own.
    pub fn most_caught_up_voter(&self) -> Option<u64> {
        if self.raw.raft.state != StateRole::Leader {
            return None;
        }
        let own = self.raw.raft.id;
        let voters = self.conf_state().voters;
        let prs = self.raw.raft.prs();
        voters.into_iter().filter(|id| *id != own).max_by_key(|id| prs.get(*id).map_or(0, |p| p.matched))
    }

    /// Records the peer URLs a membership change carries (all members alike) and
    /// answers its proposer.
    fn apply_member_change(&mut self, change: &ConfChangeV2, index: u64) -> Option<Reply> {
        if change.context.is_empty() {
            return None;
        }
        let command = Command::decode(&change.context[..])
            .unwrap_or_else(|e| panic!("corrupt conf change context at index {index}: {e}"));
        let Some(Op::PublishMember(member)) = command.op else { return None };
        for single in change.get_changes() {
            match single.get_change_type() {
                raft::prelude::ConfChangeType::RemoveNode
                    if self.members.remove(&single.node_id).is_some() =>
                {
                    self.pending_members_removed.push(single.node_id);
                }
                raft::prelude::ConfChangeType::RemoveNode => {}
                _ if single.node_id == member.member_id && !member.peer_urls.is_empty() => {
                    let entry = self.members.entry(member.member_id).or_insert_with(|| MemberAttributes {
                        member_id: member.member_id,
                        ..Default::default()
                    });
                    entry.peer_urls = member.peer_urls.clone();
                    self.pending_members.push(entry.clone());
                }
                _ => {}
            }
        }
        let ours = command.proposer_id == self.raw.raft.id && command.proposal_seq >> 40 == self.boot_id;
        ours.then(|| Reply {
            seq: command.proposal_seq & ((1 << 40) - 1),
            result: Ok(OpResponse::ConfChange(self.conf_state())),
            index,
        })
    }

    /// The alarms raised and not disarmed, as etcd lists them.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.alarms.iter().map(|&(member_id, alarm)| AlarmMember { member_id, alarm }).collect()
    }

    /// Whether this member applied its own removal from the configuration.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        assert!(self.in_cycle.is_none(), "transfer during a cycle");
        if self.removed {
            return;
        }
        self.raw.transfer_leader(to);
        self.reseed_election_timeout();
    }

    /// Starts an election now (tests and leader transfer).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
        self.reseed_election_timeout();
    }

    fn proposal_tag(&self, seq: u64) -> u64 {
        assert!(seq < 1 << 40, "proposal sequence exhausted");
        (self.boot_id << 40) | seq
    }

    /// Compacts the log when it holds too many applied entries, or up to a
    /// conf change that added a member.
    fn maybe_compact(&mut self) {
        let first = self.raw.store().first_index;
        let applied = self.applied_index;
        let mut to = None;
        let held = (applied + 1).saturating_sub(first);
        let bytes = self.raw.store().bytes;
        if held > self.log_entries_max || bytes > self.log_bytes_max {
            let mut by_count = applied.saturating_sub(self.log_catchup_entries);
            if bytes > self.log_bytes_max {
                // Large entries: keep at most half the byte budget of applied ones.
                by_count =
                    by_count.max(self.raw.store().index_keeping_bytes(applied, self.log_bytes_max / 2));
            }
            // A leader keeps what its live followers still need (one being sent a
            // snapshot needs what follows the snapshot), or a member slower to
            // install a snapshot than the log moves would never catch up; up to a
            // bound, so a stuck follower cannot pin the log in memory.
            let leading = self.raw.raft.state == StateRole::Leader;
            let held_max = LOG_HELD_FOR_FOLLOWERS_FACTOR
                .saturating_mul(self.log_entries_max)
                .max(self.log_held_entries_min);
            let within =
                held <= held_max && bytes <= LOG_HELD_FOR_FOLLOWERS_FACTOR.saturating_mul(self.log_bytes_max);
            if leading && within {
                let own = self.raw.raft.id;
                let prs = self.raw.raft.prs();
                let (ticks, retry_ticks) = (self.ticks, self.snapshot_retry_ticks);
                // A follower sent a snapshot needs what follows it until it has
                // installed it and answered (raft-rs stops tracking the snapshot once
                // the transport delivered it, seconds before the install is done).
                self.snapshot_holds.retain(|to, (index, sent)| {
                    prs.get(*to).is_some_and(|p| p.matched < *index) && ticks - *sent < retry_ticks
                });
                let needed = prs
                    .iter()
                    .filter(|(id, _)| **id != own)
                    .filter_map(|(_, p)| {
                        if p.state == raft::ProgressState::Snapshot {
                            Some(p.pending_snapshot)
                        } else if p.recent_active {
                            Some(p.matched)
                        } else {
                            None
                        }
                    })
                    .chain(self.snapshot_holds.values().map(|(index, _)| *index))
                    .min();
                if let Some(needed) = needed {
                    by_count = by_count.min(needed);
                }
                // A snapshot being built is of the applied state when its build
                // began, at or after the log's first index today.
                let building = self.snapshot_asked_at.is_some_and(|at| ticks - at < retry_ticks);
                if building {
                    by_count = by_count.min(first.saturating_sub(1));
                }
            } else if !leading {
                self.snapshot_holds.clear();
            }
            to = Some(by_count);
        }
        // Not held back for anyone: the newcomer must get a snapshot.
        if let Some(through) = self.compact_through.take() {
            to = to.max(Some(through.min(applied)));
        }
        let Some(to) = to else { return };
        if to < first {
            return;
        }
        let term = self.raw.mut_store().compact(to);
        self.pending_log_compaction = Some((to, term));
    }

    fn take_persist_batch(&mut self, entries: Vec<Entry>, must_sync: bool) -> PersistBatch {
        self.maybe_compact();
        PersistBatch {
            entries,
            hard_state: self.raw.store().hard_state.clone(),
            conf_state: self.pending_conf_state.take(),
            writes: std::mem::take(&mut self.pending_writes),
            members: std::mem::take(&mut self.pending_members),
            members_removed: std::mem::take(&mut self.pending_members_removed),
            alarms: std::mem::take(&mut self.pending_alarms).then(|| self.alarms()),
            proposals_applied: std::mem::take(&mut self.pending_proposals_applied),
            proposals_forgotten: std::mem::take(&mut self.pending_proposals_forgotten),
            leases: std::mem::take(&mut self.pending_leases),
            applied_index: self.applied_index,
            applied_term: self.raw.raft.raft_log.term(self.applied_index).unwrap_or(0),
            must_sync,
            install: None,
            log_compacted_to: self.pending_log_compaction.take(),
        }
    }

    /// The context of a read index this boot of this member asked for.
    fn own_read_ctx(&self, bytes: &[u8]) -> Option<u64> {
        let word = |i: usize| Some(u64::from_be_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?));
        let mine = bytes.len() == 24 && word(1)? == self.raw.raft.id && word(2)? == self.boot_id;
        mine.then(|| word(0)).flatten()
    }

    fn take_reads_ready(&mut self) -> Vec<u64> {
        let applied = self.applied_index;
        let mut ready = Vec::new();
        self.reads_waiting.retain(|&(ctx, index)| {
            if index <= applied {
                ready.push(ctx);
                false
            } else {
                true
            }
        });
        ready
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Vec<Reply> {
        let mut replies = Vec::new();
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            assert_eq!(entry.index, self.applied_index + 1, "applied entries out of order");
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if let Some(reply) = self.apply_normal(&entry) {
                        replies.push(reply);
                    }
                }
                EntryType::EntryConfChange => {
                    let mut change = ConfChange::default();
                    change.merge_from_bytes(&entry.data).expect("corrupt conf change entry");
                    self.apply_conf_change(&change, entry.index);
                }
                EntryType::EntryConfChangeV2 => {
                    let mut change = ConfChangeV2::default();
                    change.merge_from_bytes(&entry.data).expect("corrupt conf change entry");
                    self.apply_conf_change(&change, entry.index);
                    if let Some(reply) = self.apply_member_change(&change, entry.index) {
                        replies.push(reply);
                    }
                }
            }
            self.applied_index = entry.index;
        }
        replies
    }

    fn apply_conf_change(&mut self, change: &impl raft_proto::ConfChangeI, index: u64) {
        if self.removed {
            return; // a leaving leader applies what follows its removal, but is no member
        }
        let before = conf_members(&self.conf_state());
        let own = self.raw.raft.id;
        let removes_self =
            change.as_v2().changes.iter().any(|c| {
                c.node_id == own && c.get_change_type() == raft::prelude::ConfChangeType::RemoveNode
            });
        if removes_self && before.contains(&own) {
            // This member leaves. raft-rs is not told (a leader that applied its own
            // removal panics on its next step, looking for its own progress): the
            // node stops taking part, and stores the configuration without itself,
            // so it knows it was removed after a restart too.
            let mut conf_state = self.conf_state();
            for ids in [&mut conf_state.voters, &mut conf_state.learners, &mut conf_state.voters_outgoing] {
                ids.retain(|id| *id != own);
            }
            self.removed = true;
            self.leaving = self.raw.raft.state == StateRole::Leader;
            self.raw.mut_store().conf_state = conf_state.clone();
            self.pending_conf_state = Some(conf_state);
            return;
        }
        // A change raft-rs refuses (for example one that leaves no voter) is a
        // committed no-op on every member alike, so skipping it stays deterministic.
        if let Ok(conf_state) = self.raw.apply_conf_change(change) {
            // A member new to the configuration starts with an empty log, and the
            // log does not hold the initial configuration (it is bootstrapped, not
            // logged): every member compacts through this entry, so the newcomer
            // can only be caught up by a snapshot, which carries the configuration.
            if conf_members(&conf_state).difference(&before).next().is_some() {
                self.compact_through = Some(index);
            }
            self.raw.mut_store().conf_state = conf_state.clone();
            self.pending_conf_state = Some(conf_state);
        }
    }

    fn apply_normal(&mut self, entry: &Entry) -> Option<Reply> {
        if entry.data.is_empty() {
            return None; // a new leader's empty entry
        }
        let command = Command::decode(&entry.data[..])
            .unwrap_or_else(|e| panic!("corrupt command at index {}: {e}", entry.index));
        if !self.remember_proposal(command.proposer_id, command.proposal_seq) {
            return None; // the same proposal twice in the log: applied the first time
        }
        let result = match command.op {
            Some(op) => self.apply_op(op),
            None => panic!("command without an operation at index {}", entry.index),
        };
        let ours = command.proposer_id == self.raw.raft.id && command.proposal_seq >> 40 == self.boot_id;
        ours.then_some(Reply { seq: command.proposal_seq & ((1 << 40) - 1), result, index: entry.index })
    }

    /// Records that a proposal is applied; false if it already was.
    fn remember_proposal(&mut self, proposer: u64, tag: u64) -> bool {
        let window = self.applied_proposals.entry(proposer).or_default();
        if !window.insert(tag) {
            return false;
        }
        self.pending_proposals_applied.push((proposer, tag));
        if window.len() > crate::limits::APPLIED_PROPOSALS_REMEMBERED_PER_MEMBER {
            let oldest = window.pop_first().expect("window is not empty");
            self.pending_proposals_forgotten.push((proposer, oldest));
        }
        true
    }

    fn apply_op(&mut self, op: Op) -> Result<OpResponse, KvError> {
        // Checked here, at apply, so every member refuses alike.
        if self.alarms.iter().any(|(_, alarm)| *alarm == AlarmType::Nospace as i32) && grows_database(&op) {
            return Err(KvError::NoSpace);
        }
        if self.alarms.iter().any(|(_, alarm)| *alarm == AlarmType::Corrupt as i32) && changes_key_space(&op)
        {
            return Err(KvError::CorruptCluster);
        }
        let writes = &mut self.pending_writes;
        let changes_before = writes.changes.len();
        let result = match op {
            Op::Put(request) => self
                .leases
                .check_put(&request)
                .and_then(|()| write_mvcc(&self.mvcc).put(&request, writes))
                .map(OpResponse::Put),
            Op::DeleteRange(request) => {
                write_mvcc(&self.mvcc).delete_range(&request, writes).map(OpResponse::DeleteRange)
            }
            Op::Txn(request) => self
                .leases
                .check_txn(&request)
                .and_then(|()| write_mvcc(&self.mvcc).txn(&request, writes))
                .map(OpResponse::Txn),
            Op::Fenced(request) => return self.apply_fenced(request),
            other => return self.apply_other(other),
        };
        self.leases.observe(&self.pending_writes.changes[changes_before..]);
        result
    }

    /// A key-space write guarded by a fence: checked against the lock's holder
    /// at this point of the log, then applied as the unfenced write would be.
    fn apply_fenced(&mut self, request: FencedWrite) -> Result<OpResponse, KvError> {
        let fence = request.fence.unwrap_or_default();
        crate::lock::check_fence(&self.mvcc(), &fence)?;
        let op = match request.write {
            Some(fenced_write::Write::Put(put)) => Op::Put(put),
            Some(fenced_write::Write::DeleteRange(delete)) => Op::DeleteRange(delete),
            Some(fenced_write::Write::Txn(txn)) => Op::Txn(txn),
            None => return Err(KvError::InvalidArgument("fenced write has no operation".into())),
        };
        self.apply_op(op)
    }

    /// Commands other than key-space writes.
    fn apply_other(&mut self, op: Op) -> Result<OpResponse, KvError> {
        let writes = &mut self.pending_writes;
        match op {
            Op::Put(_) | Op::DeleteRange(_) | Op::Txn(_) | Op::Fenced(_) => {
                unreachable!("applied by apply_op")
            }
            Op::Compaction(request) => {
                write_mvcc(&self.mvcc).compact(&request, writes).map(OpResponse::Compaction)
            }
            Op::LeaseGrant(request) => {
                let response = self.leases.grant(&request, &mut self.pending_leases)?;
                self.lease_clock.granted(response.id, response.ttl);
                Ok(OpResponse::LeaseGrant(response))
            }
            Op::LeaseRevoke(request) => {
                let response = self.leases.revoke(
                    &request,
                    &mut write_mvcc(&self.mvcc),
                    writes,
                    &mut self.pending_leases,
                )?;
                self.lease_clock.removed(request.id);
                Ok(OpResponse::LeaseRevoke(response))
            }
            Op::LeaseCheckpoint(request) => {
                self.leases.checkpoint(&request, &mut self.pending_leases)?;
                Ok(OpResponse::Internal)
            }
            Op::PublishMember(mut attributes) => {
                // A member publishes its name and client URLs; the peer URLs a
                // conf change recorded stay unless it names its own.
                if attributes.peer_urls.is_empty() {
                    let known = self.members.get(&attributes.member_id);
                    attributes.peer_urls = known.map(|m| m.peer_urls.clone()).unwrap_or_default();
                }
                self.members.insert(attributes.member_id, attributes.clone());
                self.pending_members.push(attributes);
                Ok(OpResponse::Internal)
            }
            Op::Alarm(request) => {
                let key = (request.member_id, request.alarm);
                match AlarmAction::try_from(request.action) {
                    Ok(AlarmAction::Activate) if request.alarm != AlarmType::None as i32 => {
                        self.pending_alarms |= self.alarms.insert(key);
                    }
                    Ok(AlarmAction::Deactivate) => {
                        self.pending_alarms |= self.alarms.remove(&key);
                    }
                    Ok(AlarmAction::Get) | Ok(AlarmAction::Activate) => {}
                    Err(_) => return Err(KvError::InvalidArgument("unknown alarm action".into())),
                }
                Ok(OpResponse::Alarm(AlarmResponse { header: None, alarms: self.alarms() }))
            }
            Op::UpdatePeerUrls(update) => {
                let conf = conf_members(&self.conf_state());
                if !conf.contains(&update.member_id) {
                    return Err(KvError::InvalidArgument("member not found".into()));
                }
                let member = self.members.entry(update.member_id).or_insert_with(|| MemberAttributes {
                    member_id: update.member_id,
                    ..Default::default()
                });
                member.peer_urls = update.peer_urls;
                self.pending_members.push(member.clone());
                Ok(OpResponse::Internal)
            }
        }
    }

    /// Sets a fresh, seeded election timeout whenever raft-rs has reset its own
    /// (which it does on every change of role, term or leader).
    fn reseed_election_timeout(&mut self) {
        let raft = &self.raw.raft;
        let epoch = (raft.state, raft.term, raft.leader_id);
        if epoch == self.timeout_epoch {
            return;
        }
        self.timeout_epoch = epoch;
        let leading = raft.state == StateRole::Leader;
        if leading && !self.lease_clock.is_leading() {
            let leases: Vec<(i64, i64)> =
                self.leases.iter().map(|l| (l.id, l.remaining_ttl_s.unwrap_or(l.granted_ttl_s))).collect();
            self.lease_clock.become_leader(leases);
        } else if !leading && self.lease_clock.is_leading() {
            self.lease_clock.step_down();
        }
        let jitter = self.rng.random_range(0..self.election_ticks);
        self.raw.raft.set_randomized_election_timeout(self.election_ticks + jitter);
    }
}

/// Whether a command can grow the database (refused while NOSPACE is raised, as
/// etcd refuses puts, txns with puts and lease grants).
fn grows_database(op: &Op) -> bool {
    fn txn_puts(txn: &chorus_proto::etcdserverpb::TxnRequest) -> bool {
        use chorus_proto::etcdserverpb::request_op::Request;
        txn.success.iter().chain(&txn.failure).any(|op| match &op.request {
            Some(Request::RequestPut(_)) => true,
            Some(Request::RequestTxn(inner)) => txn_puts(inner),
            _ => false,
        })
    }
    match op {
        Op::Put(_) | Op::LeaseGrant(_) => true,
        Op::Txn(txn) => txn_puts(txn),
        Op::Fenced(fenced) => match &fenced.write {
            Some(fenced_write::Write::Put(_)) => true,
            Some(fenced_write::Write::Txn(txn)) => txn_puts(txn),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `op` changes the key space or grants a lease: what the CORRUPT alarm
/// refuses.
fn changes_key_space(op: &Op) -> bool {
    matches!(
        op,
        Op::Put(_) | Op::DeleteRange(_) | Op::Txn(_) | Op::Fenced(_) | Op::Compaction(_) | Op::LeaseGrant(_)
    )
}

/// The bytes an entry holds in memory beyond its fixed fields.
fn entry_bytes(entry: &Entry) -> u64 {
    (entry.data.len() + entry.context.len()) as u64
}

/// Every member a configuration names: voters (incoming and outgoing) and learners.
fn conf_members(conf_state: &ConfState) -> BTreeSet<u64> {
    let ids = conf_state.voters.iter().chain(&conf_state.voters_outgoing);
    ids.chain(&conf_state.learners).chain(&conf_state.learners_next).copied().collect()
}

#[cfg(test)]
mod tests;
