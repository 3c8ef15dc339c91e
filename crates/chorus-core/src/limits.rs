//! Every size and count limit of chorus, declared in one place (STYLE.md, habit 5).
//!
//! A limit exists so that one client cannot make a node allocate, replicate or fsync
//! without bound: everything a request carries is copied into the raft log of every
//! member, kept in memory by the MVCC store and written to disk. The defaults are
//! etcd's, so that a request etcd accepts is accepted here too.
//!
//! To add a limit: add a `pub const ..._DEFAULT` with its unit last, a field with the
//! same name (without `_DEFAULT`) and a doc comment saying what it protects, and
//! set the field in [`Limits::default`].

/// Default of [`Limits::request_bytes_max`]: etcd's `--max-request-bytes` (1.5 MiB).
pub const REQUEST_BYTES_MAX_DEFAULT: u64 = 1_572_864;

/// Most `--max-request-bytes` accepted (32 MiB): an accepted request becomes one log
/// entry, which must reach the other members in one raft frame (at most
/// [`PEER_FRAME_BYTES_MAX`], 64 MiB, with room for the entry's wrapping). A larger
/// limit would let a member accept a write that no follower can ever receive, and
/// replication would stop there for good.
pub const REQUEST_BYTES_MAX_MAX: u64 = 32 * 1024 * 1024;

/// Above this `--max-request-bytes` (10 MiB, etcd's recommended most), `chorus serve`
/// warns at start-up: writing and syncing an entry of tens of MiB on every member can
/// outlast the election timeout on a loaded machine and cost a leader change.
pub const REQUEST_BYTES_RECOMMENDED_MAX: u64 = 10 * 1024 * 1024;

/// Default of [`Limits::key_bytes_max`] (64 KiB).
pub const KEY_BYTES_MAX_DEFAULT: u64 = 65_536;

/// Default of [`Limits::value_bytes_max`]: as large as a whole request may be.
pub const VALUE_BYTES_MAX_DEFAULT: u64 = REQUEST_BYTES_MAX_DEFAULT;

/// Default of [`Limits::txn_ops_max`]: etcd's `--max-txn-ops`.
pub const TXN_OPS_MAX_DEFAULT: u64 = 128;

/// The limits a node enforces. Every member of a cluster should use the same values:
/// they are checked before a request is proposed, so a member with smaller limits
/// still applies what a member with larger ones accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// The largest encoded client request. Every accepted request becomes a raft
    /// log entry that is sent to every member and fsynced by a majority before it is
    /// answered, so one huge request stalls every other write behind it.
    pub request_bytes_max: u64,
    /// The longest key (and range end). Keys are held in memory by the MVCC index
    /// for as long as any revision of them exists, and compared on every range.
    pub key_bytes_max: u64,
    /// The longest value. Every revision of a value stays in memory and on disk
    /// until it is compacted away.
    pub value_bytes_max: u64,
    /// The most compares, or operations in one branch, of a txn. A txn is applied
    /// as one step on every member, so its size bounds how long apply can stall.
    pub txn_ops_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes_max: REQUEST_BYTES_MAX_DEFAULT,
            key_bytes_max: KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
            txn_ops_max: TXN_OPS_MAX_DEFAULT,
        }
    }
}

/// Most threads `chorus serve --threads` may ask for to serve client and peer
/// connections.
pub const SERVE_THREADS_MAX: u32 = 1_024;

/// How long the consensus thread goes on polling its inputs after a pass that did work
/// before it sleeps (`chorus serve --busy-poll`, in microseconds). Under load the next
/// message (the next append, the next proposal) usually arrives within a millisecond:
/// taking it without a sleep and a wake-up saves the wake-up's latency on both sides,
/// and the sender's wake call. It polls with `sched_yield` between tries, and an idle
/// member (ticks and heartbeats only) never polls. Off by default: a polling thread
/// keeps its core looking busy, so the scheduler queues other threads' wake-ups behind
/// busy cores instead of on it, which tripled watch p99 with three members on two cores
/// (DECISIONS §20). For members with cores to spare.
pub const BUSY_POLL_US_DEFAULT: u64 = 0;

/// Most `--busy-poll` microseconds accepted.
pub const BUSY_POLL_US_MAX: u64 = 100_000;

/// How many applied proposals the state machine remembers per proposing member, to
/// apply each proposal exactly once even if the log holds it twice (a duplicated
/// forwarded proposal). A duplicate arriving after this many newer proposals from
/// the same member would be applied again; no transport delays a message that long.
pub const APPLIED_PROPOSALS_REMEMBERED_PER_MEMBER: usize = 65_536;

/// Watchers on one watch stream (etcd has no limit; one is needed so a client
/// cannot grow a member's memory without bound).
pub const WATCHERS_PER_STREAM_MAX: usize = 10_000;
/// Control responses (created, cancelled, progress) waiting for a slow stream
/// before the stream is dropped.
pub const WATCH_OUTBOX_RESPONSES_MAX: usize = 1_024;
/// Responses buffered per watch stream between the member and the network.
pub const WATCH_STREAM_RESPONSES_MAX: usize = 256;
/// Events one catching-up watcher gets per sync round (a round runs every tick and
/// whenever a watcher is created).
pub const WATCH_SYNC_EVENTS_MAX: usize = 1_000;
/// A watch response larger than this is split into fragments for watchers that
/// asked for fragments (etcd's default request limit plus room for framing).
pub const WATCH_RESPONSE_BYTES_MAX: usize = 1_572_864;

/// The shortest lease TTL: a grant asking for less (zero and negative TTLs too)
/// gets this, as etcd raises TTLs to its `minLeaseTTL` (3 heartbeats plus an
/// election timeout, rounded up to a second). It must be at least the longest
/// election timeout (the configured one plus its jitter: 2 s with the default
/// 1 s) plus a margin, so that a leader change, during which nobody can receive a
/// keep-alive, cannot by itself expire a healthy lease.
pub const LEASE_TTL_MIN_S: i64 = 5;
/// The longest lease TTL: etcd's `MaxLeaseTTL` (about 285 years). A grant asking
/// for more is refused.
pub const LEASE_TTL_MAX_S: i64 = 9_000_000_000;
/// Leases that may exist at once (etcd has no limit). Every member holds each
/// lease in memory and the leader runs a timer for each.
pub const LEASES_MAX: usize = 100_000;
/// Keys attached to one lease (etcd has no limit). A revoke deletes all of them in
/// one apply step and one revision, which every member applies and every watcher
/// receives at once, so this bounds how long one revoke can stall apply.
pub const LEASE_KEYS_MAX: usize = 100_000;

/// How often the leader checkpoints every lease's remaining TTL through the log, so
/// that a new leader neither resets it to full nor expires it early. A new leader
/// starts each lease at its last checkpoint plus an election timeout of grace, so
/// after a leader change a lease can outlive its TTL by about this interval plus
/// the election (never expire sooner). etcd checkpoints every 5 minutes.
pub const LEASE_CHECKPOINT_INTERVAL_MS: u64 = 1_000;
/// Leases in one checkpoint proposal (a round checkpoints at most this many).
pub const LEASE_CHECKPOINTS_PER_PROPOSAL_MAX: usize = 10_000;
/// Expired leases the leader proposes to revoke per tick, so that a mass expiry
/// cannot stall writes.
pub const LEASE_REVOKES_PER_TICK_MAX: usize = 100;

/// The most inputs handled before a cycle runs (bounds the work between fsyncs).
pub const INPUT_BATCH_MAX: usize = 4096;
/// Inputs (requests, peer batches, ticks) queued for the driver before senders wait.
pub const DRIVER_QUEUE_INPUTS_MAX: usize = 8192;
/// Extra room above the request limit for gRPC framing and the other fields.
pub const GRPC_MESSAGE_OVERHEAD_BYTES: u64 = 64 * 1024;
/// Bytes of raft frames waiting for a slow peer before new ones are dropped.
pub const PEER_PENDING_BYTES_MAX: usize = 32 * 1024 * 1024;
/// The largest raft frame (one message) a member accepts from a peer, in bytes.
pub const PEER_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The most a link's receiver reserves ahead for the rest of a frame; beyond it
/// the buffer grows as bytes arrive (a length alone costs no memory).
pub const PEER_FRAME_RESERVE_BYTES_MAX: usize = 1024 * 1024;
/// A link's read or write buffer grown past this (by a burst of large appends) is
/// let go once empty.
pub const PEER_LINK_BUFFER_KEPT_BYTES: usize = 4 * 1024 * 1024;
/// gRPC connections the peer port's acceptor hands on before it waits for tonic.
pub const PEER_PORT_GRPC_BACKLOG: usize = 64;
/// Lease keep-alive responses buffered per stream between a member and its client.
pub const KEEP_ALIVE_RESPONSES_MAX: usize = 64;
/// The HTTP/JSON gateway accepts a body this many times the gRPC message limit
/// (`request_bytes_max + GRPC_MESSAGE_OVERHEAD_BYTES`): base64 makes bytes 4/3 as
/// long and JSON adds field names and quoting. The decoded messages are then held
/// to the gRPC message limit itself, so JSON cannot get more through than gRPC.
pub const GATEWAY_BODY_EXPANSION: u64 = 2;
/// JSON request messages one gateway call may carry (a body of concatenated
/// `/v3/watch` or `/v3/lease/keepalive` requests).
pub const GATEWAY_STREAM_REQUESTS_MAX: usize = 1024;

/// The longest queue or barrier name. Names become part of every key the queue or
/// barrier writes (under `\x00chorus/`), so they count against the key limit.
pub const COORD_NAME_BYTES_MAX: usize = 200;
/// The largest queue message payload (1 MiB): below the request limit, so a
/// message plus its key always fits one request, and a dead-lettered message can
/// be moved in one txn.
pub const QUEUE_PAYLOAD_BYTES_MAX: usize = 1_048_576;
/// Messages one queue may hold (claimed ones included). Every dequeue ranges over
/// the queue's keys (sorted by create revision), so this bounds its cost. Checked
/// before the enqueue is proposed: concurrent enqueues may pass it by at most
/// their number.
pub const QUEUE_LENGTH_MAX: u64 = 10_000;
/// Deliveries of one message before it is moved to the dead-letter queue, when
/// neither the request says otherwise.
pub const QUEUE_MAX_DELIVERIES_DEFAULT: u32 = 5;
/// The most deliveries a request may allow before dead-lettering.
pub const QUEUE_MAX_DELIVERIES_MAX: u32 = 1_000;
/// The longest a Dequeue, barrier Enter or Leave may wait (1 hour).
pub const COORD_WAIT_MS_MAX: i64 = 3_600_000;
/// Participants of one barrier. The trip is one txn comparing every counted
/// participant's key, so this must stay below [`TXN_OPS_MAX_DEFAULT`].
pub const BARRIER_PARTICIPANTS_MAX: u32 = 100;
/// A blocked Dequeue, Enter or Leave looks again at least this often even without a
/// watch event (a safety net: the watch is what wakes it normally).
pub const COORD_RECHECK_MS: u64 = 1_000;

// Failure detection and clock monitoring (chorus-core `health`). Defaults of the
// `chorus serve` flags of the same names; see `health::HealthConfig`.

/// Default time between two health heartbeats to each peer (`--health-heartbeat-interval`).
pub const HEALTH_HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 100;
/// Default phi above which a peer is suspected (`--phi-threshold`), as Cassandra and Akka.
pub const HEALTH_PHI_THRESHOLD_DEFAULT: f64 = 8.0;
/// Default phi from which a peer that is not suspected is called slow (`--phi-slow-threshold`).
pub const HEALTH_PHI_SLOW_THRESHOLD_DEFAULT: f64 = 3.0;
/// Default number of inter-arrival times the detector remembers per peer (`--phi-window`).
pub const HEALTH_PHI_WINDOW_SAMPLES_DEFAULT: u32 = 100;
/// Default floor of the standard deviation of inter-arrival times (`--phi-min-std-deviation`).
pub const HEALTH_PHI_MIN_STD_DEVIATION_MS_DEFAULT: u64 = 100;
/// Default pause tolerated on top of the mean inter-arrival time (`--phi-acceptable-pause`).
pub const HEALTH_PHI_ACCEPTABLE_PAUSE_MS_DEFAULT: u64 = 500;
/// Default time an indirect probe waits for its helpers (`--probe-timeout`).
pub const HEALTH_PROBE_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// Default wall-clock offset (beyond its error bound) that raises an alarm (`--max-clock-skew`).
pub const HEALTH_MAX_CLOCK_SKEW_MS_DEFAULT: u64 = 500;
/// Round-trip times remembered per peer for the p50/p99 and the slow check.
pub const HEALTH_RTT_WINDOW_SAMPLES: usize = 100;
/// Clock samples remembered per peer; the one with the shortest round trip is used.
pub const HEALTH_CLOCK_WINDOW_SAMPLES: usize = 8;
/// Bounds the health flags are validated against.
pub const HEALTH_HEARTBEAT_INTERVAL_MS_MAX: u64 = 10_000;
pub const HEALTH_PHI_WINDOW_SAMPLES_MAX: u32 = 10_000;
pub const HEALTH_PHI_THRESHOLD_MAX: f64 = 100.0;
pub const HEALTH_PROBE_TIMEOUT_MS_MAX: u64 = 60_000;
/// A peer is slow when the median of its last [`HEALTH_RTT_RECENT_SAMPLES`] round trips
/// is this many times the median of its window...
pub const HEALTH_SLOW_RTT_FACTOR: f64 = 4.0;
/// ... and at least this many ms above it (so that 0.1 ms becoming 0.5 ms is not "slow").
pub const HEALTH_SLOW_RTT_MARGIN_MS: f64 = 20.0;
/// Probe rounds in a row that must reach nobody before a link failure is called node-down.
pub const HEALTH_PROBE_ROUNDS_TO_OVERTURN: u32 = 2;
/// Round trips that make up "recent" for the slow check.
pub const HEALTH_RTT_RECENT_SAMPLES: usize = 5;
/// Round trips needed in the window before a peer can be called slow by its round trips.
pub const HEALTH_SLOW_RTT_SAMPLES_MIN: usize = 20;

/// How long a stopping member waits for client streams (watches, keep-alives) to
/// close before it cuts them: graceful shutdown must not wait on a client forever.
pub const SHUTDOWN_DRAIN_MS: u64 = 2_000;

/// Default of `--snapshot-count`: the log is compacted once it holds more applied
/// entries than this. Every entry stays in memory until compacted; etcd's default
/// is 100,000, ours is smaller to bound that memory.
pub const LOG_ENTRIES_MAX_DEFAULT: u64 = 10_000;
/// Default of `--snapshot-bytes`: the log is compacted also once its entries hold
/// more than this many payload bytes (every entry stays in memory until then;
/// 10,000 entries of 1.5 MiB would be 15 GiB).
pub const LOG_BYTES_MAX_DEFAULT: u64 = 256 * 1024 * 1024;
/// Default of `--snapshot-catchup-entries`: applied entries kept behind a
/// compaction for members that are only slightly behind (etcd's is 5,000).
pub const LOG_CATCHUP_ENTRIES_DEFAULT: u64 = 5_000;
/// The largest `--snapshot-count`, and the most catch-up entries.
pub const LOG_ENTRIES_MAX_MAX: u64 = 10_000_000;
/// A snapshot sent to a member that has not caught up after this long is sent
/// again (the transport reports a broken stream sooner).
pub const SNAPSHOT_RETRY_MS: u64 = 60_000;
/// Bytes per piece of a snapshot in flight between members.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// The largest snapshot a member accepts from a peer (well above the default
/// backend quota of 8 GiB).
pub const SNAPSHOT_BYTES_MAX: u64 = 16 * 1024 * 1024 * 1024;
/// A leader keeps log entries its live followers still need, up to this many
/// times `--snapshot-count` (beyond that it compacts anyway).
pub const LOG_HELD_FOR_FOLLOWERS_FACTOR: u64 = 4;
/// ... but at least this many entries (within the same byte bound): a follower
/// sent a large snapshot installs it for seconds and then catches up from the
/// entries that follow it; if those were compacted meanwhile (4 x a small
/// `--snapshot-count` goes by in a second of writes) it needs another snapshot,
/// and another, for as long as writes go on. 100,000 entries of a few hundred
/// bytes are tens of MB.
pub const LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN: u64 = 100_000;
/// A learner whose log is within this many entries of the leader's is promoted
/// (with `--auto-promote-learners`, the default).
pub const LEARNER_PROMOTE_LAG_ENTRIES: u64 = 100;
/// The most bytes of writes a defragmentation keeps in memory for its copy
/// (batches persisted while it copies); past it, it gives up, the database unchanged.
pub const DEFRAG_RECORDED_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// At most this many cycles' database writes wait in memory to be committed together
/// (`DiskStorage::persist_deferring`; between checkpoints such commits are not durable,
/// so waiting loses nothing a crash would not)...
pub const DEFERRED_CYCLES_MAX: usize = 16;
/// ...holding at most this many bytes of records.
pub const DEFERRED_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// A client connection's HTTP/2 frame or header block larger than this is not
/// inspected for a URL authority (chorus-server's `authority`): it is passed on for
/// the HTTP/2 server to judge, which refuses header lists far smaller.
pub const AUTHORITY_INSPECT_BYTES_MAX: usize = 1024 * 1024;
/// Answers a client connection holds back for one write (chorus-server's
/// `coalesce`) before a write waits for the socket to take some.
pub const CLIENT_WRITE_HELD_BYTES_MAX: usize = 256 * 1024;
/// Default of `--quota-backend-bytes` (8 GiB).
pub const QUOTA_BACKEND_BYTES_DEFAULT: u64 = 8 * 1024 * 1024 * 1024;
/// The largest `--quota-backend-bytes` (100 GiB).
pub const QUOTA_BACKEND_BYTES_MAX: u64 = 100 * 1024 * 1024 * 1024;

/// Default of `--corrupt-check-time`: how often, in milliseconds, the leader
/// compares every member's HashKV with its own (five minutes; etcd's check is
/// off unless asked for).
pub const CORRUPT_CHECK_INTERVAL_MS_DEFAULT: u64 = 300_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_etcds() {
        let limits = Limits::default();
        assert_eq!(limits.request_bytes_max, 1_572_864);
        assert_eq!(limits.key_bytes_max, 65_536);
        assert_eq!(limits.value_bytes_max, 1_572_864);
        assert_eq!(limits.txn_ops_max, 128);
    }
}
