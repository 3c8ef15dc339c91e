//! etcd's `Lease` service. Grants and revokes go through the log. Keep-alives and
//! time-to-live questions need the leader's timers (only the leader decides
//! expiry): a member that does not lead forwards them to the leader over the peer
//! port (`chorus.v1.Peer`), as etcd forwards them.

use chorus_core::limits::KEEP_ALIVE_RESPONSES_MAX;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use chorus_core::node::{LeaseCallError, OpResponse};
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::peer_client::PeerClient;
use chorus_proto::etcdserverpb::lease_server::Lease;
use chorus_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Input, NodeHandle};
use crate::status::RequestError;

/// Pause between attempts while no leader answers.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// How long a forwarded lease call may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

pub struct LeaseService {
    node: NodeHandle,
    /// A lazily connected channel to every member's peer port, for forwarding to
    /// the leader (reused: a keep-alive must not cost a new connection).
    peers: BTreeMap<u64, Channel>,
}

impl LeaseService {
    /// Must be called inside the tokio runtime (channels connect lazily on it).
    pub fn new(node: NodeHandle, peer_addrs: &BTreeMap<u64, String>) -> LeaseService {
        let peers = peer_addrs
            .iter()
            .filter_map(|(id, addr)| {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
                let endpoint = endpoint.connect_timeout(FORWARD_TIMEOUT).tcp_nodelay(true);
                Some((*id, endpoint.connect_lazy()))
            })
            .collect();
        LeaseService { node, peers }
    }
}

/// Answers leader-only lease calls here, or through the leader.
#[derive(Clone)]
struct LeaderCalls {
    node: NodeHandle,
    peers: BTreeMap<u64, Channel>,
}

impl LeaderCalls {
    /// Retries while there is no leader (an election is under way), within the
    /// request timeout, as etcd waits for a leader rather than fail a keep-alive.
    async fn keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        self.with_retries(|| async move {
            // Known not to lead: straight to the leader, without asking the driver
            // (a leader that moved on answers "not the leader", and the call is retried).
            if let Some(channel) = self.other_leader() {
                let mut peer = PeerClient::new(channel.clone());
                let call = peer.lease_keep_alive(LeaseKeepAliveRequest { id });
                return Ok(timed(call).await?.into_inner());
            }
            match self.node.lease_call(|reply| Input::LeaseKeepAlive { id, reply }).await? {
                Ok(response) => Ok(response),
                Err(LeaseCallError::NotLeader) => {
                    let mut peer = self.leader_client().await?;
                    let call = peer.lease_keep_alive(LeaseKeepAliveRequest { id });
                    Ok(timed(call).await?.into_inner())
                }
            }
        })
        .await
    }

    async fn time_to_live(&self, request: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Status> {
        self.with_retries(|| async move {
            let (id, keys) = (request.id, request.keys);
            match self.node.lease_call(|reply| Input::LeaseTimeToLive { id, keys, reply }).await? {
                Ok(response) => Ok(response),
                Err(LeaseCallError::NotLeader) => {
                    let mut peer = self.leader_client().await?;
                    Ok(timed(peer.lease_time_to_live(request)).await?.into_inner())
                }
            }
        })
        .await
    }

    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.node.request_timeout();
        loop {
            match call().await {
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                other => return other,
            }
        }
    }

    /// The channel to the leader, when this member knows another member leads.
    fn other_leader(&self) -> Option<&Channel> {
        let leader = self.node.leader_hint();
        if leader == self.node.member_id() {
            return None;
        }
        self.peers.get(&leader)
    }

    async fn leader_client(&self) -> Result<PeerClient<Channel>, Status> {
        if let Some(channel) = self.other_leader() {
            return Ok(PeerClient::new(channel.clone()));
        }
        let leader = self.node.status().await?.node.leader_id;
        if leader == self.node.member_id() {
            // Leading, but not yet able to answer lease calls (its lease clock starts
            // with the first entry of its term): retried.
            return Err(RequestError::NoLeader.into());
        }
        match self.peers.get(&leader) {
            Some(channel) => Ok(PeerClient::new(channel.clone())),
            None => Err(RequestError::NoLeader.into()),
        }
    }
}

async fn timed<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(RequestError::Timeout.into()),
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut request = request.into_inner();
        if request.id < 0 {
            return Err(Status::invalid_argument("etcdserver: lease ID must be positive"));
        }
        if request.id == 0 {
            // Chosen here, by the proposer, so that every member applies the same id.
            request.id = (rand::random::<u64>() >> 1).max(1) as i64;
        }
        match self.node.propose(Op::LeaseGrant(request)).await? {
            OpResponse::LeaseGrant(response) => Ok(Response::new(response)),
            _ => Err(Status::internal("unexpected response to a lease grant")),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        match self.node.propose(Op::LeaseRevoke(request.into_inner())).await? {
            OpResponse::LeaseRevoke(response) => Ok(Response::new(response)),
            _ => Err(Status::internal("unexpected response to a lease revoke")),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let calls = LeaderCalls { node: self.node.clone(), peers: self.peers.clone() };
        let mut requests = request.into_inner();
        let (responses, receiver) = mpsc::channel(KEEP_ALIVE_RESPONSES_MAX);
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let answer = calls.keep_alive(request.id).await;
                let failed = answer.is_err();
                if responses.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let calls = LeaderCalls { node: self.node.clone(), peers: self.peers.clone() };
        Ok(Response::new(calls.time_to_live(request.into_inner()).await?))
    }

    async fn lease_leases(
        &self,
        _: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.node.lease_leases().await?))
    }
}
