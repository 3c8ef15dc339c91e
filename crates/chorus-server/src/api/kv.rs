//! etcd's `KV` service, and chorus's `FencedKv` (the same writes with a fence).
//!
//! A plain KV write may also carry a fence as gRPC metadata,
//! `chorus-fence: <lock>:<token>` (split at the last colon), so that any etcd
//! client library can make fenced writes by adding a header.

use chorus_core::limits::Limits;
use chorus_core::node::OpResponse;
use chorus_core::validate;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::fenced_kv_server::FencedKv;
use chorus_proto::chorus::v1::{
    fenced_write, Fence, FencedDeleteRangeRequest, FencedPutRequest, FencedTxnRequest, FencedWrite,
};
use chorus_proto::etcdserverpb::kv_server::Kv;
use chorus_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::driver::NodeHandle;
use crate::status::invalid;

pub struct KvService {
    node: NodeHandle,
    limits: Limits,
}

impl KvService {
    pub fn new(node: NodeHandle, limits: Limits) -> KvService {
        KvService { node, limits }
    }

    async fn write(&self, op: Op) -> Result<OpResponse, Status> {
        Ok(self.node.propose(op).await?)
    }

    /// Validates and proposes a key-space write, fenced when `fence` is given.
    async fn write_checked(
        &self,
        write: fenced_write::Write,
        fence: Option<Fence>,
    ) -> Result<OpResponse, Status> {
        let op = match fence {
            Some(fence) => {
                let request = FencedWrite { fence: Some(fence), write: Some(write) };
                validate::validate_fenced(&request, &self.limits).map_err(invalid)?;
                Op::Fenced(request)
            }
            None => {
                match &write {
                    fenced_write::Write::Put(put) => validate::validate_put(put, &self.limits),
                    fenced_write::Write::DeleteRange(delete) => {
                        validate::validate_delete_range(delete, &self.limits)
                    }
                    fenced_write::Write::Txn(txn) => validate::validate_txn(txn, &self.limits),
                }
                .map_err(invalid)?;
                match write {
                    fenced_write::Write::Put(put) => Op::Put(put),
                    fenced_write::Write::DeleteRange(delete) => Op::DeleteRange(delete),
                    fenced_write::Write::Txn(txn) => Op::Txn(txn),
                }
            }
        };
        self.write(op).await
    }

    pub async fn put_fenced(&self, request: PutRequest, fence: Option<Fence>) -> Result<PutResponse, Status> {
        match self.write_checked(fenced_write::Write::Put(request), fence).await? {
            OpResponse::Put(response) => Ok(response),
            _ => Err(unexpected("put")),
        }
    }

    pub async fn delete_range_fenced(
        &self,
        request: DeleteRangeRequest,
        fence: Option<Fence>,
    ) -> Result<DeleteRangeResponse, Status> {
        match self.write_checked(fenced_write::Write::DeleteRange(request), fence).await? {
            OpResponse::DeleteRange(response) => Ok(response),
            _ => Err(unexpected("delete range")),
        }
    }

    pub async fn txn_fenced(&self, request: TxnRequest, fence: Option<Fence>) -> Result<TxnResponse, Status> {
        match self.write_checked(fenced_write::Write::Txn(request), fence).await? {
            OpResponse::Txn(response) => Ok(response),
            _ => Err(unexpected("txn")),
        }
    }
}

/// The metadata key that carries a fence on plain etcd KV calls.
pub const FENCE_METADATA_KEY: &str = "chorus-fence";

/// The fence a plain KV call carries as metadata, if any: `<lock>:<token>`.
pub fn fence_from_metadata(metadata: &MetadataMap) -> Result<Option<Fence>, Status> {
    let Some(value) = metadata.get(FENCE_METADATA_KEY) else {
        return Ok(None);
    };
    let malformed = || {
        Status::invalid_argument(format!(
            "etcdserver: {FENCE_METADATA_KEY} metadata must be <lock>:<token> with a positive integer token"
        ))
    };
    let text = value.to_str().map_err(|_| malformed())?;
    let (lock, token) = text.rsplit_once(':').ok_or_else(malformed)?;
    let token = token.trim().parse::<i64>().map_err(|_| malformed())?;
    Ok(Some(Fence { lock: lock.as_bytes().to_vec(), token }))
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("applied command returned an unexpected response for {what}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let request = request.into_inner();
        validate::validate_range(&request, &self.limits).map_err(invalid)?;
        Ok(Response::new(self.node.read(request).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let fence = fence_from_metadata(request.metadata())?;
        Ok(Response::new(self.put_fenced(request.into_inner(), fence).await?))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let fence = fence_from_metadata(request.metadata())?;
        Ok(Response::new(self.delete_range_fenced(request.into_inner(), fence).await?))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let fence = fence_from_metadata(request.metadata())?;
        Ok(Response::new(self.txn_fenced(request.into_inner(), fence).await?))
    }

    type RangeStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RangeStreamResponse, Status>> + Send>>;

    /// etcd 3.7's streamed range. chorus answers with the whole range in one
    /// message, which is valid for the protocol (a stream of one).
    async fn range_stream(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let request = request.into_inner();
        validate::validate_range(&request, &self.limits).map_err(invalid)?;
        let response = self.node.read(request).await?;
        let message = RangeStreamResponse { range_response: Some(response) };
        Ok(Response::new(Box::pin(futures::stream::once(async move { Ok(message) }))))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let request = request.into_inner();
        validate::validate_compaction(&request).map_err(invalid)?;
        match self.write(Op::Compaction(request)).await? {
            OpResponse::Compaction(response) => Ok(Response::new(response)),
            _ => Err(unexpected("compaction")),
        }
    }
}

/// chorus's `FencedKv`: the fence as a field of the request.
pub struct FencedKvService(pub std::sync::Arc<KvService>);

fn required_fence(fence: Option<Fence>) -> Result<Option<Fence>, Status> {
    match fence {
        Some(fence) => Ok(Some(fence)),
        None => Err(Status::invalid_argument("etcdserver: fence is not provided")),
    }
}

fn required<T>(request: Option<T>) -> Result<T, Status> {
    request.ok_or_else(|| Status::invalid_argument("etcdserver: request is not provided"))
}

#[tonic::async_trait]
impl FencedKv for FencedKvService {
    async fn put(&self, request: Request<FencedPutRequest>) -> Result<Response<PutResponse>, Status> {
        let FencedPutRequest { fence, request } = request.into_inner();
        let fence = required_fence(fence)?;
        Ok(Response::new(self.0.put_fenced(required(request)?, fence).await?))
    }

    async fn delete_range(
        &self,
        request: Request<FencedDeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let FencedDeleteRangeRequest { fence, request } = request.into_inner();
        let fence = required_fence(fence)?;
        Ok(Response::new(self.0.delete_range_fenced(required(request)?, fence).await?))
    }

    async fn txn(&self, request: Request<FencedTxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let FencedTxnRequest { fence, request } = request.into_inner();
        let fence = required_fence(fence)?;
        Ok(Response::new(self.0.txn_fenced(required(request)?, fence).await?))
    }
}
