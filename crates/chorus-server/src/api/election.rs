//! etcd's `Election` service (`v3electionpb`), on the same contender keys as the
//! Lock service: the leader is the contender created first, and its key's create
//! revision (`LeaderKey.rev`) is a fencing token like a lock's. Proclaim is a
//! fenced write, so only the current leader can change the election's value.

use std::pin::Pin;

use chorus_core::limits::{Limits, WATCH_STREAM_RESPONSES_MAX};
use chorus_core::lock;
use chorus_core::validate;
use chorus_core::KvError;
use chorus_proto::chorus::v1::{Fence, FencedWrite};
use chorus_proto::etcdserverpb::watch_create_request::FilterType;
use chorus_proto::etcdserverpb::{PutRequest, WatchCreateRequest};
use chorus_proto::mvccpb::event::EventType;
use chorus_proto::v3electionpb::election_server::Election;
use chorus_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::key_watch::{KeyWatch, WatchEnd};
use crate::api::lock::{acquire, check_contender, read, run_txn};
use crate::driver::NodeHandle;
use crate::status::{invalid, RequestError};
use chorus_core::node::OpResponse;
use chorus_proto::chorus::v1::command::Op;

pub struct ElectionService {
    node: NodeHandle,
    limits: Limits,
}

impl ElectionService {
    pub fn new(node: NodeHandle, limits: Limits) -> ElectionService {
        ElectionService { node, limits }
    }
}

/// etcd's messages, which its clients match on.
const NO_LEADER: &str = "election: no leader";
const NOT_LEADER: &str = "election: not leader";
const MISSING_LEADER: &str = "\"leader\" field must be provided";

fn leader_key(leader: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    leader.ok_or_else(|| Status::invalid_argument(MISSING_LEADER))
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let CampaignRequest { name, lease, value } = request.into_inner();
        check_contender(&name, lease, &self.limits)?;
        let probe = PutRequest {
            key: lock::contender_key(&name, lease),
            value: value.clone(),
            lease,
            ..Default::default()
        };
        validate::validate_put(&probe, &self.limits).map_err(invalid)?;
        let (key, rev, header) = acquire(&self.node, &name, lease, value).await?;
        Ok(Response::new(CampaignResponse { header, leader: Some(LeaderKey { name, key, rev, lease }) }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let ProclaimRequest { leader, value } = request.into_inner();
        let leader = leader_key(leader)?;
        let put = PutRequest { key: leader.key.clone(), value, lease: leader.lease, ..Default::default() };
        let fenced = FencedWrite {
            fence: Some(Fence { lock: leader.name.clone(), token: leader.rev }),
            write: Some(chorus_proto::chorus::v1::fenced_write::Write::Put(put)),
        };
        validate::validate_fenced(&fenced, &self.limits).map_err(invalid)?;
        match self.node.propose(Op::Fenced(fenced)).await {
            Ok(OpResponse::Put(response)) => Ok(Response::new(ProclaimResponse { header: response.header })),
            Ok(_) => Err(Status::internal("applied proclaim returned an unexpected response")),
            Err(RequestError::Kv(KvError::FenceStale { .. })) => Err(Status::failed_precondition(NOT_LEADER)),
            Err(other) => Err(other.into()),
        }
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let LeaderRequest { name } = request.into_inner();
        check_name(&name, &self.limits)?;
        let found = read(&self.node, lock::holder_request(&name)).await?;
        match found.kvs.into_iter().next() {
            Some(kv) => Ok(Response::new(LeaderResponse { header: found.header, kv: Some(kv) })),
            None => Err(Status::not_found(NO_LEADER)),
        }
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, request: Request<LeaderRequest>) -> Result<Response<ObserveStream>, Status> {
        let LeaderRequest { name } = request.into_inner();
        check_name(&name, &self.limits)?;
        let (sender, receiver) = mpsc::channel(WATCH_STREAM_RESPONSES_MAX);
        let node = self.node.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = observe(&node, &name, &sender) => result,
                () = sender.closed() => Ok(()),
            };
            if let Err(status) = result {
                let _ = sender.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let ResignRequest { leader } = request.into_inner();
        let leader = leader_key(leader)?;
        check_name(&leader.key, &self.limits)?;
        let response = run_txn(&self.node, lock::leave_txn(leader.key, leader.rev)).await?;
        Ok(Response::new(ResignResponse { header: response.header }))
    }
}

fn check_name(name: &[u8], limits: &Limits) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("etcdserver: name is not provided"));
    }
    let probe = PutRequest { key: name.to_vec(), ..Default::default() };
    validate::validate_put(&probe, limits).map_err(invalid)
}

/// Sends the election's leader, then every change of its value, then the next
/// leader, until the client goes away.
async fn observe(
    node: &NodeHandle,
    name: &[u8],
    sender: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let prefix = lock::prefix(name);
    loop {
        let found = read(node, lock::holder_request(name)).await?;
        let from = found.header.as_ref().map_or(0, |h| h.revision) + 1;
        let Some(leader) = found.kvs.into_iter().next() else {
            // Nobody leads: wait for a contender to appear.
            let request = WatchCreateRequest {
                range_end: chorus_core::mvcc::prefix_range_end(&prefix),
                key: prefix.clone(),
                start_revision: from,
                filters: vec![FilterType::Nodelete as i32],
                ..Default::default()
            };
            let mut watch = KeyWatch::open(node, request).await?;
            match watch.next_events().await {
                Ok(_) | Err(WatchEnd::Compacted) => continue,
                Err(WatchEnd::Failed(status)) => return Err(status),
            }
        };
        let leader_revision = leader.create_revision;
        let request =
            WatchCreateRequest { key: leader.key.clone(), start_revision: from, ..Default::default() };
        let mut watch = KeyWatch::open(node, request).await?;
        if sender.send(Ok(LeaderResponse { header: found.header, kv: Some(leader) })).await.is_err() {
            return Ok(());
        }
        'leader: loop {
            let (header, events) = match watch.next_events().await {
                Ok(batch) => batch,
                Err(WatchEnd::Compacted) => break 'leader,
                Err(WatchEnd::Failed(status)) => return Err(status),
            };
            for event in events {
                let Some(kv) = event.kv else { continue };
                if event.r#type == EventType::Delete as i32 || kv.create_revision != leader_revision {
                    break 'leader;
                }
                let response = LeaderResponse { header, kv: Some(kv) };
                if sender.send(Ok(response)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
