//! etcd's `Lock` service (`v3lockpb`), served by the server itself on the key
//! space (the layout and steps are in `chorus_core::lock`). The key a lock call
//! returns names the holder; its create revision is the fencing token, which
//! fenced writes name and the state machine checks.
//!
//! A waiter watches only the contender created just before it, so a release wakes
//! one waiter, not all. A lock call abandoned while waiting (the client cancels or
//! its deadline passes) removes its key, as etcd's does.

use chorus_core::lock;
use chorus_core::node::OpResponse;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::watch_create_request::FilterType;
use chorus_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse, WatchCreateRequest,
};
use chorus_proto::v3lockpb::lock_server::Lock;
use chorus_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use crate::api::key_watch::{KeyWatch, WatchEnd};
use crate::driver::NodeHandle;
use crate::status::invalid;
use chorus_core::limits::Limits;
use chorus_core::validate;

pub struct LockService {
    node: NodeHandle,
    limits: Limits,
}

impl LockService {
    pub fn new(node: NodeHandle, limits: Limits) -> LockService {
        LockService { node, limits }
    }
}

/// Runs a txn through the log.
pub(crate) async fn run_txn(node: &NodeHandle, request: TxnRequest) -> Result<TxnResponse, Status> {
    match node.propose(Op::Txn(request)).await? {
        OpResponse::Txn(response) => Ok(response),
        _ => Err(Status::internal("applied txn returned an unexpected response")),
    }
}

/// A linearizable read.
pub(crate) async fn read(node: &NodeHandle, request: RangeRequest) -> Result<RangeResponse, Status> {
    Ok(node.read(request).await?)
}

/// Checks a lock or election name as a key and the contender's lease.
pub(crate) fn check_contender(name: &[u8], lease: i64, limits: &Limits) -> Result<(), Status> {
    let key = lock::contender_key(name, lease);
    let probe = PutRequest { key, lease, ..Default::default() };
    if name.is_empty() {
        return Err(Status::invalid_argument("etcdserver: name is not provided"));
    }
    if lease == 0 {
        return Err(Status::invalid_argument(
            "etcdserver: lease is not provided: locks and elections are held under a lease (grant one first)",
        ));
    }
    validate::validate_put(&probe, limits).map_err(invalid)
}

/// Enters `name` as `lease`'s contender and waits until it is the first, i.e. until
/// every contender created before it is gone. Returns the contender's key, its
/// create revision (the fencing token) and the header of the last read.
///
/// If the wait is abandoned (this future dropped) or fails, the key is removed.
pub(crate) async fn acquire(
    node: &NodeHandle,
    name: &[u8],
    lease: i64,
    value: Vec<u8>,
) -> Result<(Vec<u8>, i64, Option<ResponseHeader>), Status> {
    let response = run_txn(node, lock::enter_txn(name, lease, value.clone())).await?;
    let entered = lock::read_entered(&response)
        .ok_or_else(|| Status::internal("lock entry txn answered in an unexpected shape"))?;
    let key = entered.own.key.clone();
    let token = entered.own.create_revision;
    let mut cleanup = LeaveOnDrop { node: node.clone(), key: Some((key.clone(), token)) };
    let mut header = response.header;
    if !entered.created && entered.own.value != value {
        // Entering again with a new value (an election campaign) updates it.
        let update = TxnRequest {
            compare: vec![lock::created_at(key.clone(), token)],
            success: vec![put_op(key.clone(), value)],
            failure: Vec::new(),
        };
        header = run_txn(node, update).await?.header;
    }
    if !entered.holds() {
        header = wait_for_predecessors(node, name, token).await?;
        // The wait may outlast the contender's lease: make sure the key is still ours.
        let own = read(node, RangeRequest { key: key.clone(), ..Default::default() }).await?;
        if own.kvs.first().map(|kv| kv.create_revision) != Some(token) {
            cleanup.key = None;
            return Err(Status::failed_precondition(format!(
                "etcdserver: session expired: lease {lease:x} ended while waiting for {}",
                String::from_utf8_lossy(name)
            )));
        }
        header = own.header.or(header);
    }
    cleanup.key = None;
    Ok((key, token, header))
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    let put = PutRequest { key, value, ignore_lease: true, ..Default::default() };
    RequestOp { request: Some(request_op::Request::RequestPut(put)) }
}

/// Waits until no contender of `name` created before `own_revision` is left.
async fn wait_for_predecessors(
    node: &NodeHandle,
    name: &[u8],
    own_revision: i64,
) -> Result<Option<ResponseHeader>, Status> {
    loop {
        let found = read(node, lock::predecessor_request(name, own_revision)).await?;
        let Some(predecessor) = found.kvs.first() else {
            return Ok(found.header);
        };
        let from = found.header.as_ref().map_or(0, |h| h.revision) + 1;
        let request = WatchCreateRequest {
            key: predecessor.key.clone(),
            start_revision: from,
            filters: vec![FilterType::Noput as i32],
            ..Default::default()
        };
        let mut watch = KeyWatch::open(node, request).await?;
        match watch.deleted().await {
            Ok(()) | Err(WatchEnd::Compacted) => continue,
            Err(WatchEnd::Failed(status)) => return Err(status),
        }
    }
}

/// Removes a contender's key if the call that made it does not finish.
struct LeaveOnDrop {
    node: NodeHandle,
    key: Option<(Vec<u8>, i64)>,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some((key, revision)) = self.key.take() {
            let node = self.node.clone();
            tokio::spawn(async move {
                if let Err(error) = run_txn(&node, lock::leave_txn(key.clone(), revision)).await {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), %error, "could not remove an abandoned lock waiter's key; its lease will");
                }
            });
        }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let LockRequest { name, lease } = request.into_inner();
        check_contender(&name, lease, &self.limits)?;
        let (key, _token, header) = acquire(&self.node, &name, lease, Vec::new()).await?;
        Ok(Response::new(LockResponse { header, key }))
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let UnlockRequest { key } = request.into_inner();
        let delete = DeleteRangeRequest { key, ..Default::default() };
        validate::validate_delete_range(&delete, &self.limits).map_err(invalid)?;
        match self.node.propose(Op::DeleteRange(delete)).await? {
            OpResponse::DeleteRange(response) => {
                Ok(Response::new(UnlockResponse { header: response.header }))
            }
            _ => Err(Status::internal("applied delete returned an unexpected response")),
        }
    }
}
