//! The one place where errors become gRPC statuses. Every match is exhaustive, so a
//! new error variant cannot reach a client unmapped. Messages are etcd's where etcd
//! has one, because etcd's client libraries turn them back into typed errors.

use chorus_core::node::ProposeError;
use chorus_core::KvError;
use tonic::{Code, Status};

/// Why a request could not be served, beyond bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The leader changed while the request was in flight: it may or may not have
    /// been applied (as etcd answers). Clients retry.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: server stopped")]
    Stopped,
    /// A membership request that cannot be carried out now (another change is
    /// under way, or it would leave too few voters): etcd's message.
    #[error("{0}")]
    Refused(String),
}

impl From<ProposeError> for RequestError {
    fn from(error: ProposeError) -> RequestError {
        match error {
            ProposeError::NoLeader => RequestError::NoLeader,
            ProposeError::Dropped(_) => RequestError::NoLeader,
            ProposeError::Removed => RequestError::NoLeader,
        }
    }
}

pub fn kv_code(error: &KvError) -> Code {
    match error {
        KvError::EmptyKey
        | KvError::KeyTooLarge { .. }
        | KvError::ValueTooLarge { .. }
        | KvError::RequestTooLarge { .. }
        | KvError::TooManyOps { .. }
        | KvError::DuplicateKey
        | KvError::InvalidRangeEnd
        | KvError::InvalidArgument(_) => Code::InvalidArgument,
        KvError::Compacted { .. } | KvError::FutureRevision { .. } => Code::OutOfRange,
        KvError::LeaseNotFound => Code::NotFound,
        // etcd's codes: ErrGRPCLeaseExist and ErrGRPCLeaseTTLTooLarge.
        KvError::LeaseExists => Code::FailedPrecondition,
        KvError::LeaseTtlTooLarge { .. } => Code::OutOfRange,
        KvError::TooManyLeases { .. } | KvError::TooManyLeaseKeys { .. } => Code::ResourceExhausted,
        KvError::FenceStale { .. } => Code::FailedPrecondition,
        KvError::NoSpace => Code::ResourceExhausted,
        KvError::CorruptCluster => Code::DataLoss,
        KvError::Corrupt(_) => Code::DataLoss,
    }
}

impl From<RequestError> for Status {
    fn from(error: RequestError) -> Status {
        let code = match &error {
            RequestError::Kv(kv) => kv_code(kv),
            RequestError::NoLeader
            | RequestError::Timeout
            | RequestError::LeaderChanged
            | RequestError::Stopped => Code::Unavailable,
            RequestError::Refused(_) => Code::FailedPrecondition,
        };
        Status::new(code, error.to_string())
    }
}

/// The status for a request that failed validation.
pub fn invalid(error: KvError) -> Status {
    RequestError::Kv(error).into()
}

/// The status for a failed queue or barrier call (`chorus.v1.Queue`, `Barrier`).
pub fn coord_status(error: chorus_core::coord::CoordError) -> Status {
    use chorus_core::coord::CoordError;
    let code = match &error {
        CoordError::InvalidArgument(_) => Code::InvalidArgument,
        CoordError::ResourceExhausted(_) => Code::ResourceExhausted,
        CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
        CoordError::DeadlineExceeded(_) => Code::DeadlineExceeded,
    };
    Status::new(code, error.to_string())
}
