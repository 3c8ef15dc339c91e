//! What the queue and barrier services share: running their txns and reads
//! through the node, and waiting for a change of their keys.
//!
//! A blocked Dequeue, Enter or Leave does not poll: it opens a watch (through the
//! member's own watch hub, as a watch stream of its own) on the queue's or
//! barrier's keys from the revision it last read, and looks again when an event
//! arrives. As a safety net (a watch cancelled by compaction, a dropped stream) it
//! also looks again every `COORD_RECHECK_MS`, which costs two reads per blocked
//! call per second at most.

use std::time::{Duration, Instant};

use chorus_core::limits::{Limits, COORD_RECHECK_MS};
use chorus_core::node::OpResponse;
use chorus_core::validate;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::{TxnRequest, TxnResponse, WatchCreateRequest};
use tonic::Status;

use crate::api::key_watch::KeyWatch;
use crate::driver::NodeHandle;
use crate::status::invalid;

/// Proposes one txn built by chorus-core, checked against the limits like a client's.
pub(crate) async fn txn(
    node: &NodeHandle,
    limits: &Limits,
    request: TxnRequest,
) -> Result<TxnResponse, Status> {
    validate::validate_txn(&request, limits).map_err(invalid)?;
    match node.propose(Op::Txn(request)).await? {
        OpResponse::Txn(response) => Ok(response),
        _ => Err(Status::internal("applied command returned an unexpected response for a txn")),
    }
}

/// The deadline of a call that may wait `timeout_ms`.
pub(crate) fn deadline_after(timeout_ms: i64) -> Instant {
    Instant::now() + Duration::from_millis(timeout_ms.max(0) as u64)
}

/// Returns when a key in `[key, range_end)` changes after `revision`, at the
/// deadline, or after `COORD_RECHECK_MS`, whichever comes first.
pub(crate) async fn wait_for_change(
    node: &NodeHandle,
    (key, range_end): (Vec<u8>, Vec<u8>),
    revision: i64,
    deadline: Instant,
) -> Result<(), Status> {
    let until = deadline.min(Instant::now() + Duration::from_millis(COORD_RECHECK_MS));
    let request = WatchCreateRequest { key, range_end, start_revision: revision + 1, ..Default::default() };
    let mut watch = KeyWatch::open(node, request).await?;
    // Events, a compaction, a failed stream or the recheck timer: look again either way.
    let _ = tokio::time::timeout_at(until.into(), watch.next_events()).await;
    Ok(())
}
