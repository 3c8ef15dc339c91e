//! etcd's `KV` service.

use chorus_core::limits::Limits;
use chorus_core::node::OpResponse;
use chorus_core::validate;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::kv_server::Kv;
use chorus_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
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
        let request = request.into_inner();
        validate::validate_put(&request, &self.limits).map_err(invalid)?;
        match self.write(Op::Put(request)).await? {
            OpResponse::Put(response) => Ok(Response::new(response)),
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        validate::validate_delete_range(&request, &self.limits).map_err(invalid)?;
        match self.write(Op::DeleteRange(request)).await? {
            OpResponse::DeleteRange(response) => Ok(Response::new(response)),
            _ => Err(unexpected("delete range")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let request = request.into_inner();
        validate::validate_txn(&request, &self.limits).map_err(invalid)?;
        match self.write(Op::Txn(request)).await? {
            OpResponse::Txn(response) => Ok(Response::new(response)),
            _ => Err(unexpected("txn")),
        }
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
