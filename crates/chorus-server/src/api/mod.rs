//! The client-facing gRPC services. Each handler validates its request against the
//! limits (`chorus_core::validate`) before anything is proposed, then hands it to
//! the driver through a [`NodeHandle`](crate::driver::NodeHandle).

pub mod auth;
pub mod barrier;
pub mod cluster;
mod coord;
pub mod election;
pub mod key_watch;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod queue;
pub mod watch;

/// Answer for an rpc that chorus does not serve yet (listed in the README).
pub(crate) fn not_yet(rpc: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{rpc} is not implemented in chorus yet (see the README's feature table)"
    ))
}
