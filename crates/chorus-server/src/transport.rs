//! The peer transport: raft messages between members over gRPC.
//!
//! Each member runs a `chorus.v1.Peer` server on its peer port, and for every other
//! member a sender task that keeps one client stream open and writes batches of
//! messages into it. raft-rs messages travel as opaque bytes inside our own
//! `RaftBatch` (raft-rs encodes them with rust-protobuf 2, whose parser has a
//! published advisory for untrusted input: we parse only batches that carry our
//! cluster id, from members of our own cluster, and bound their size first).
//!
//! Messages are dropped, never queued without bound, when a peer is slow or gone:
//! raft retransmits whatever matters.

use chorus_core::limits::PEER_BATCH_BYTES_MAX;
use chorus_core::limits::PEER_BATCH_MESSAGES_MAX;
use std::time::Duration;

use chorus_proto::chorus::v1::peer_client::PeerClient;
use chorus_proto::chorus::v1::peer_server::{Peer, PeerServer};
use chorus_proto::chorus::v1::{RaftAck, RaftBatch};
use chorus_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use futures::StreamExt;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Input, NodeHandle};

const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(50);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// Receives batches from peers and hands their messages to the driver.
pub struct PeerService {
    cluster_id: u64,
    member_id: u64,
    inputs: mpsc::Sender<Input>,
    node: NodeHandle,
    /// Becomes true when the member stops: open streams end then, so a graceful
    /// shutdown does not wait for peers to hang up.
    stop: watch::Receiver<bool>,
}

impl PeerService {
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        inputs: mpsc::Sender<Input>,
        node: NodeHandle,
        stop: watch::Receiver<bool>,
    ) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { cluster_id, member_id, inputs, node, stop })
            .max_decoding_message_size(PEER_BATCH_BYTES_MAX)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn send(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        loop {
            let batch = tokio::select! {
                batch = stream.next() => batch,
                _ = stop.wait_for(|stopped| *stopped) => return Err(Status::unavailable("member is stopping")),
            };
            let Some(batch) = batch else { break };
            let batch = batch?;
            if batch.cluster_id != self.cluster_id {
                return Err(Status::failed_precondition(format!(
                    "peer belongs to cluster {:016x}, this member to {:016x}",
                    batch.cluster_id, self.cluster_id
                )));
            }
            if batch.to_id != self.member_id {
                return Err(Status::failed_precondition(format!(
                    "batch is for member {:016x}, this is {:016x}",
                    batch.to_id, self.member_id
                )));
            }
            let mut messages = Vec::with_capacity(batch.messages.len());
            for bytes in &batch.messages {
                match Message::parse_from_bytes(bytes) {
                    Ok(message) if message.from == batch.from_id => messages.push(message),
                    Ok(_) => return Err(Status::invalid_argument("message sender does not match batch")),
                    Err(e) => return Err(Status::invalid_argument(format!("undecodable raft message: {e}"))),
                }
            }
            if self.inputs.send(Input::Peer(messages)).await.is_err() {
                return Err(Status::unavailable("member is stopping"));
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    /// A keep-alive forwarded by a member that does not lead. Answered only if this
    /// member leads (never forwarded twice).
    async fn lease_keep_alive(
        &self,
        request: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let id = request.into_inner().id;
        match self.node.lease_call(|reply| Input::LeaseKeepAlive { id, reply }).await? {
            Ok(response) => Ok(Response::new(response)),
            Err(_) => Err(Status::unavailable("etcdserver: not the leader")),
        }
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let LeaseTimeToLiveRequest { id, keys } = request.into_inner();
        match self.node.lease_call(|reply| Input::LeaseTimeToLive { id, keys, reply }).await? {
            Ok(response) => Ok(Response::new(response)),
            Err(_) => Err(Status::unavailable("etcdserver: not the leader")),
        }
    }
}

/// Identifies one direction of one peer link.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub cluster_id: u64,
    pub from_id: u64,
    pub to_id: u64,
    /// The peer's address, `host:port`.
    pub addr: String,
}

/// Sends everything from `queue` to the peer, reconnecting with backoff when the
/// stream breaks. Ends when the queue's sender is dropped.
pub async fn run_peer_sender(link: PeerLink, mut queue: mpsc::Receiver<Message>) {
    let mut delay = RECONNECT_DELAY_MIN;
    loop {
        match connect(&link).await {
            Ok(client) => {
                delay = RECONNECT_DELAY_MIN;
                if !stream_batches(&link, client, &mut queue).await {
                    return;
                }
            }
            Err(error) => tracing::debug!(peer = %link.addr, %error, "peer connect failed"),
        }
        // While disconnected, drop what is queued: it is stale by the time we return.
        while queue.try_recv().is_ok() {}
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
    }
}

async fn connect(link: &PeerLink) -> Result<PeerClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", link.addr))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await?;
    Ok(PeerClient::new(channel).max_encoding_message_size(PEER_BATCH_BYTES_MAX))
}

/// Streams batches until the stream breaks (returns true) or the queue closes
/// (returns false).
async fn stream_batches(
    link: &PeerLink,
    mut client: PeerClient<tonic::transport::Channel>,
    queue: &mut mpsc::Receiver<Message>,
) -> bool {
    let (batches, stream) = mpsc::channel::<RaftBatch>(16);
    let mut call = tokio::spawn(async move { client.send(ReceiverStream::new(stream)).await });
    loop {
        let first = tokio::select! {
            message = queue.recv() => match message {
                Some(message) => message,
                None => { call.abort(); return false; }
            },
            _ = &mut call => return true,
        };
        let mut batch = RaftBatch {
            cluster_id: link.cluster_id,
            from_id: link.from_id,
            to_id: link.to_id,
            messages: vec![first.write_to_bytes().expect("encode raft message")],
        };
        while batch.messages.len() < PEER_BATCH_MESSAGES_MAX {
            match queue.try_recv() {
                Ok(message) => batch.messages.push(message.write_to_bytes().expect("encode raft message")),
                Err(_) => break,
            }
        }
        if batches.send(batch).await.is_err() {
            return true;
        }
    }
}
