//! The errors of chorus's logic that a caller branches on. The server maps each
//! variant to a gRPC status in exactly one place (`chorus-server/src/status.rs`);
//! the `Display` text is etcd's message where etcd has one, because clients match
//! on those strings.

/// An error from validating or executing a KV request. Each one leaves the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key is too large ({size_bytes} bytes, at most {max_bytes})")]
    KeyTooLarge { size_bytes: u64, max_bytes: u64 },
    #[error("etcdserver: value is too large ({size_bytes} bytes, at most {max_bytes})")]
    ValueTooLarge { size_bytes: u64, max_bytes: u64 },
    #[error("etcdserver: request is too large")]
    RequestTooLarge { size_bytes: u64, max_bytes: u64 },
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps { ops_count: u64, max_count: u64 },
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: range_end must be empty, \"\\0\", or greater than key")]
    InvalidRangeEnd,
    #[error("etcdserver: {0}")]
    InvalidArgument(String),
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision { current_revision: i64 },
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge { ttl_s: i64, max_s: i64 },
    /// chorus's own limit (etcd has none): see `limits::LEASES_MAX`.
    #[error("etcdserver: too many leases (at most {max_count})")]
    TooManyLeases { max_count: u64 },
    /// chorus's own limit (etcd has none): see `limits::LEASE_KEYS_MAX`.
    #[error("etcdserver: too many keys attached to lease {lease_id} (at most {max_count})")]
    TooManyLeaseKeys { lease_id: i64, max_count: u64 },
    /// A fenced write whose token no longer names the lock's holder (the lock was
    /// released, its lease expired, or a newer holder took it). chorus's own.
    #[error("chorus: fence token {token} for lock {lock:?} is stale: {}", describe_holder(*current))]
    FenceStale { lock: String, token: i64, current: Option<i64> },
    /// The NOSPACE alarm is raised: writes that could grow the database are
    /// refused until an operator frees space and disarms it (etcd's message).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The CORRUPT alarm is raised: a member's key space differs from the
    /// leader's at the same revision. Writes are refused until an operator has
    /// repaired the member and disarmed the alarm, so that the divergence does not
    /// grow (etcd's message); reads still work.
    #[error("etcdserver: corrupt cluster")]
    CorruptCluster,
    /// Persisted state that cannot be decoded: a corrupt data directory, never a
    /// client's mistake.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

fn describe_holder(current: Option<i64>) -> String {
    match current {
        Some(token) => format!("the lock's current token is {token}"),
        None => "the lock has no holder".to_string(),
    }
}
