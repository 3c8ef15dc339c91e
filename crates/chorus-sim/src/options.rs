//! Everything a simulated run does is derived from one `u64` seed. Faults are
//! mixed differently per seed (swarm testing: each seed turns some fault kinds off
//! entirely, so rare interleavings of the others get explored too).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deliberate bug, switched on to prove the checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Linearizable reads served from local state without ReadIndex.
    StaleReads,
    /// fsync does nothing, so acknowledged writes can be lost in a crash.
    AckBeforeFsync,
    /// Lease keep-alives are acknowledged without renewing the lease.
    LeaseAckWithoutRenew,
    /// Lock clients write without a fence, as with etcd's locks.
    UnfencedLock,
    /// Queue acks delete the message without checking the claim token.
    QueueAckWithoutToken,
    /// Snapshots lose the newest key-space record on their way to a member (a
    /// snapshot builder that misses the last write).
    SnapshotDropsRecord,
}

impl std::str::FromStr for Bug {
    type Err = String;
    fn from_str(text: &str) -> Result<Bug, String> {
        match text {
            "stale-reads" => Ok(Bug::StaleReads),
            "ack-before-fsync" => Ok(Bug::AckBeforeFsync),
            "lease-ack-without-renew" => Ok(Bug::LeaseAckWithoutRenew),
            "unfenced-lock" => Ok(Bug::UnfencedLock),
            "queue-ack-without-token" => Ok(Bug::QueueAckWithoutToken),
            "snapshot-drops-record" => Ok(Bug::SnapshotDropsRecord),
            other => Err(format!(
                "unknown bug {other:?}; known: stale-reads, ack-before-fsync, lease-ack-without-renew, \
                 unfenced-lock, queue-ack-without-token, snapshot-drops-record"
            )),
        }
    }
}

/// Every option of one run. Printed first, so a run can be understood from its log.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub seed: u64,
    pub bug: Option<Bug>,
    pub nodes_count: usize,
    pub clients_count: usize,
    pub keys_count: usize,
    /// Simulated time with faults and load, then a quiet, healed phase.
    pub fault_phase_us: u64,
    pub quiet_phase_us: u64,
    /// Raft's tick, per node: base interval and each node's drift in parts per thousand.
    pub tick_us: u64,
    pub tick_drift_ppt: Vec<i64>,
    /// Network: one-way delay range, loss and duplication probabilities.
    pub delay_min_us: u64,
    pub delay_max_us: u64,
    pub drop_ppm: u32,
    pub duplicate_ppm: u32,
    /// fsync latency range (a slow disk when large).
    pub fsync_min_us: u64,
    pub fsync_max_us: u64,
    /// Mean time between faults, and which kinds are on for this seed.
    pub fault_interval_us: u64,
    pub partitions: bool,
    pub one_way_partitions: bool,
    pub crashes: bool,
    pub crash_all: bool,
    pub pauses: bool,
    pub tick_bursts: bool,
    /// A client op without an answer after this long has an unknown outcome.
    pub client_timeout_us: u64,
    /// Mean think time between a client's ops.
    pub client_think_us: u64,
    /// Share of gets that are serializable, in percent.
    pub serializable_get_percent: u32,
    /// Log compaction: applied entries held before compacting, and entries kept
    /// behind. Small, so that members behind are caught up by snapshots often.
    pub log_entries_max: u64,
    /// Compaction by bytes too; derived from the seed without drawing from the
    /// option generator, so every other choice of a seed stays as it was.
    pub log_bytes_max: u64,
    pub log_catchup_entries: u64,
    /// The leader's hold for live followers: at least this many entries (production
    /// holds 100,000; half the seeds hold only 4 x `log_entries_max`, so that live
    /// followers behind are caught up by snapshots too).
    pub log_held_entries_min: u64,
    /// Membership changes during the fault phase: a spare node joins as a learner,
    /// is promoted, and then a voter (perhaps the leader) is removed and becomes
    /// the next spare, with a new id and an empty disk.
    pub membership_changes: bool,
    /// An operator raises and disarms the NOSPACE alarm now and then: while it is
    /// raised, every member must refuse puts, txns with puts and lease grants alike.
    pub nospace_alarms: bool,
    /// Storage: a durable database commit every this many commits, and log
    /// segments of this many bytes (small, so checkpoints, segment rolls and
    /// deletions happen many times in a run and crashes land among them).
    pub checkpoint_commits: u32,
    pub wal_segment_bytes: u64,
    /// At most this many cycles' database writes wait to be committed together
    /// (0: none waits; chorus serve uses `DEFERRED_CYCLES_MAX`).
    pub deferred_cycles_max: usize,
}

impl SimOptions {
    /// Derives every option from the seed.
    pub fn from_seed(seed: u64, bug: Option<Bug>) -> SimOptions {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ee_d0fc_40c5);
        let nodes_count = if rng.random_ratio(1, 4) { 5 } else { 3 };
        let delay_min_us = rng.random_range(100..2_000);
        let slow_disk = rng.random_ratio(1, 4);
        let mut options = SimOptions {
            seed,
            bug,
            nodes_count,
            clients_count: rng.random_range(2..=6),
            keys_count: rng.random_range(1..=4),
            fault_phase_us: 20_000_000,
            quiet_phase_us: 10_000_000,
            tick_us: 100_000,
            tick_drift_ppt: (0..nodes_count).map(|_| rng.random_range(-100..=100)).collect(),
            delay_min_us,
            delay_max_us: delay_min_us + rng.random_range(0..20_000),
            drop_ppm: if rng.random_bool(0.5) { rng.random_range(0..100_000) } else { 0 },
            duplicate_ppm: if rng.random_bool(0.3) { rng.random_range(0..50_000) } else { 0 },
            fsync_min_us: 100,
            fsync_max_us: if slow_disk { rng.random_range(5_000..200_000) } else { 2_000 },
            fault_interval_us: rng.random_range(300_000..3_000_000),
            partitions: rng.random_bool(0.5),
            one_way_partitions: rng.random_bool(0.3),
            crashes: rng.random_bool(0.5),
            crash_all: rng.random_bool(0.2),
            pauses: rng.random_bool(0.4),
            tick_bursts: rng.random_bool(0.3),
            client_timeout_us: 2_000_000,
            client_think_us: rng.random_range(5_000..100_000),
            serializable_get_percent: rng.random_range(0..=30),
            log_entries_max: 0,
            log_bytes_max: u64::MAX,
            log_catchup_entries: 0,
            log_held_entries_min: 0,
            membership_changes: false,
            nospace_alarms: false,
            checkpoint_commits: 1,
            wal_segment_bytes: 1,
            deferred_cycles_max: 0,
        };
        // Drawn from a stream of their own, so that adding them left every other
        // option of a seed as it was (the kept regression seeds replay unchanged).
        let mut log_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10c_c0a7);
        options.log_entries_max = log_rng.random_range(16..=256);
        options.log_catchup_entries = log_rng.random_range(0..=16);
        options.membership_changes = log_rng.random_bool(0.5);
        options.nospace_alarms = log_rng.random_bool(0.3);
        // A third of seeds compact by bytes too, at 2 to 16 KiB of entries (a few
        // dozen of the workloads' commands); from their own stream as well.
        let mut bytes_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb17e5);
        if bytes_rng.random_bool(0.33) {
            options.log_bytes_max = bytes_rng.random_range(2_048..=16_384);
        }
        let mut storage_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4ec_4b01);
        options.checkpoint_commits = storage_rng.random_range(1..=64);
        options.wal_segment_bytes = storage_rng.random_range(1_024..=32_768);
        let mut deferred_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xdef0_44ed);
        if !deferred_rng.random_ratio(1, 4) {
            options.deferred_cycles_max =
                deferred_rng.random_range(1..=chorus_core::limits::DEFERRED_CYCLES_MAX);
        }
        let mut hold_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x401d);
        if hold_rng.random_bool(0.5) {
            options.log_held_entries_min = chorus_core::limits::LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN;
        }
        match bug {
            // Lost fsyncs only show when a majority loses its unsynced state at once.
            Some(Bug::AckBeforeFsync) => {
                options.crash_all = true;
                options.crashes = true;
            }
            // Stale reads show fastest with every get linearizable and lagging followers.
            Some(Bug::StaleReads) => options.serializable_get_percent = 0,
            // Early expiry is only promised against a clock that does not leap.
            Some(Bug::LeaseAckWithoutRenew) => options.tick_bursts = false,
            // Snapshots are needed most when members fall far behind.
            Some(Bug::SnapshotDropsRecord) => options.crashes = true,
            Some(Bug::UnfencedLock) | Some(Bug::QueueAckWithoutToken) | None => {}
        }
        options
    }

    /// The fault kinds on for this run, for the summary line.
    pub fn fault_kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        let flags = [
            (self.drop_ppm > 0, "loss"),
            (self.duplicate_ppm > 0, "duplication"),
            (self.delay_max_us > self.delay_min_us, "reordering"),
            (self.partitions, "partitions"),
            (self.one_way_partitions, "one-way-partitions"),
            (self.crashes, "crashes"),
            (self.crash_all, "crash-all"),
            (self.pauses, "pauses"),
            (self.tick_bursts, "tick-bursts"),
            (self.fsync_max_us > 2_000, "slow-disk"),
            (self.membership_changes, "membership"),
            (self.nospace_alarms, "nospace-alarms"),
        ];
        for (on, name) in flags {
            if on {
                kinds.push(name);
            }
        }
        kinds
    }
}
