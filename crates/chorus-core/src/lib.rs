//! chorus-core: all of chorus's logic, with no IO. No tokio, no sockets, no files,
//! no clock reads, no unseeded randomness: everything is driven by method calls
//! that take inputs (a tick, a message, a request, "this was persisted") and return
//! the effects for a driver to perform. That is what lets the simulator run the
//! production code.
//!
//! - [`limits`]: every size and count limit, in one place.
//! - [`validate`]: checks a request against the limits before it is proposed.
//! - [`mvcc`]: the MVCC key space (etcd semantics), the deterministic state machine.
//! - [`lock`]: locks, elections and fencing tokens on the key space.
//! - [`watch`]: the watch hub: watchers fed from applied changes, caught up from history.
//! - [`node`]: the consensus node around raft-rs, the state machine, and proposal
//!   and read tracking.

pub mod barrier;
pub mod coord;
pub mod error;
pub mod health;
pub mod lease;
pub mod lease_clock;
pub mod limits;
pub mod lock;
pub mod mvcc;
pub mod node;
pub mod queue;
pub mod snapshot;
pub mod validate;
pub mod watch;

pub use error::KvError;
