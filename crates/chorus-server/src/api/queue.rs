//! chorus's `Queue` service (`chorus.v1`, proto/chorus/v1/coord.proto): the logic
//! is chorus-core's [`chorus_core::queue`]; this runs its reads and txns through
//! the node and waits on the queue's keys between attempts.

use chorus_core::coord::CoordError;
use chorus_core::limits::Limits;
use chorus_core::queue::{self, Action, Dequeue};
use chorus_proto::chorus::v1::queue_server::Queue;
use chorus_proto::chorus::v1::{
    DequeueRequest, DequeueResponse, EnqueueRequest, EnqueueResponse, LenRequest, LenResponse, PeekRequest,
    PeekResponse, QueueMessage, SettleRequest, SettleResponse,
};
use tonic::{Request, Response, Status};

use crate::api::coord::{deadline_after, txn, wait_for_change};
use crate::driver::NodeHandle;
use crate::status::coord_status;

/// Ids tried before an enqueue gives up (a collision of random 64-bit ids is
/// already unlikely once).
const ENQUEUE_ID_ATTEMPTS: usize = 3;
/// Attempts of a peek whose message was taken between its reads.
const PEEK_ATTEMPTS: usize = 3;

pub struct QueueService {
    node: NodeHandle,
    limits: Limits,
}

impl QueueService {
    pub fn new(node: NodeHandle, limits: Limits) -> QueueService {
        QueueService { node, limits }
    }

    async fn settle(&self, request: SettleRequest, ack: bool) -> Result<SettleResponse, Status> {
        queue::validate_settle(&request.queue, request.claim_token).map_err(coord_status)?;
        let txn_request = queue::settle_txn(&request.queue, request.id, request.claim_token, ack);
        let response = txn(&self.node, &self.limits, txn_request).await?;
        let revision = queue::interpret_settle(&request.queue, request.id, request.claim_token, &response)
            .map_err(coord_status)?;
        Ok(SettleResponse { revision })
    }
}

#[tonic::async_trait]
impl Queue for QueueService {
    async fn enqueue(&self, request: Request<EnqueueRequest>) -> Result<Response<EnqueueResponse>, Status> {
        let request = request.into_inner();
        queue::validate_enqueue(&request.queue, &request.payload).map_err(coord_status)?;
        let length = self.node.read(queue::length_request(&request.queue)).await?;
        queue::check_length(&request.queue, &length).map_err(coord_status)?;
        for _ in 0..ENQUEUE_ID_ATTEMPTS {
            let id = rand::random::<u64>();
            let txn_request = queue::enqueue_txn(&request.queue, id, request.payload.clone());
            let response = txn(&self.node, &self.limits, txn_request).await?;
            if let Some(revision) = queue::interpret_enqueue(&response) {
                return Ok(Response::new(EnqueueResponse { id, revision }));
            }
        }
        Err(Status::internal("could not choose an unused message id"))
    }

    async fn dequeue(&self, request: Request<DequeueRequest>) -> Result<Response<DequeueResponse>, Status> {
        let request = request.into_inner();
        chorus_core::coord::validate_timeout_ms(request.timeout_ms).map_err(coord_status)?;
        let mut dequeue =
            Dequeue::new(&request.queue, request.lease, request.max_deliveries).map_err(coord_status)?;
        let deadline = deadline_after(request.timeout_ms);
        let mut action = dequeue.start();
        loop {
            action = match action {
                Action::Read(range) => dequeue.on_range(self.node.read(range).await?),
                Action::Write(txn_request) => {
                    dequeue.on_txn(txn(&self.node, &self.limits, txn_request).await?)
                }
                Action::Wait { revision } => {
                    if std::time::Instant::now() >= deadline {
                        return Err(coord_status(CoordError::DeadlineExceeded(format!(
                            "no message in queue {:?} within {} ms",
                            request.queue, request.timeout_ms
                        ))));
                    }
                    wait_for_change(&self.node, queue::watch_range(dequeue.queue()), revision, deadline)
                        .await?;
                    dequeue.start()
                }
                Action::Claimed(message) => {
                    return Ok(Response::new(DequeueResponse {
                        revision: message.claim_token,
                        message: Some(message),
                        dead_lettered: dequeue.dead_lettered,
                    }))
                }
            }
        }
    }

    async fn ack(&self, request: Request<SettleRequest>) -> Result<Response<SettleResponse>, Status> {
        Ok(Response::new(self.settle(request.into_inner(), true).await?))
    }

    async fn nack(&self, request: Request<SettleRequest>) -> Result<Response<SettleResponse>, Status> {
        Ok(Response::new(self.settle(request.into_inner(), false).await?))
    }

    async fn len(&self, request: Request<LenRequest>) -> Result<Response<LenResponse>, Status> {
        let request = request.into_inner();
        queue::validate_queue(&request.queue).map_err(coord_status)?;
        let claims = self.node.read(queue::claims_request(&request.queue)).await?;
        let length = self.node.read(queue::length_request(&request.queue)).await?;
        Ok(Response::new(LenResponse {
            count: length.count as u64,
            claimed: claims.count as u64,
            revision: length.header.map_or(0, |h| h.revision),
        }))
    }

    async fn peek(&self, request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        let request = request.into_inner();
        queue::validate_queue(&request.queue).map_err(coord_status)?;
        let mut revision = 0;
        for _ in 0..PEEK_ATTEMPTS {
            let claims = self.node.read(queue::claims_request(&request.queue)).await?;
            let candidates =
                self.node.read(queue::candidates_request(&request.queue, claims.kvs.len())).await?;
            revision = candidates.header.as_ref().map_or(0, |h| h.revision);
            let Some(candidate) = queue::next_unclaimed(&candidates, &claims) else {
                return Ok(Response::new(PeekResponse { message: None, revision }));
            };
            let read = self.node.read(queue::message_request(&request.queue, candidate.id)).await?;
            if let Some(kv) = read.kvs.into_iter().next() {
                let message = QueueMessage {
                    id: candidate.id,
                    payload: kv.value,
                    deliveries: (kv.version - 1).max(0) as u32,
                    claim_token: 0,
                    create_revision: kv.create_revision,
                };
                let revision = read.header.map_or(revision, |h| h.revision);
                return Ok(Response::new(PeekResponse { message: Some(message), revision }));
            }
        }
        Ok(Response::new(PeekResponse { message: None, revision }))
    }
}
