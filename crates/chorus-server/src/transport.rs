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
//!
//! A raft snapshot message (the whole state, for a member that needs entries the
//! leader has compacted away) does not travel in a batch: it is streamed on its own
//! `InstallSnapshot` call in pieces of [`SNAPSHOT_CHUNK_BYTES`], the last carrying
//! the SHA-256 of the whole. The receiver hands it to raft only once it is whole
//! and its hash matches; a broken stream is reported to the leader's driver, and
//! raft sends the snapshot again from the start. Heartbeats and appends keep
//! flowing on the batch stream meanwhile.

use chorus_core::limits::PEER_BATCH_BYTES_MAX;
use chorus_core::limits::PEER_BATCH_MESSAGES_MAX;
use chorus_core::limits::{SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};
use sha2::{Digest, Sha256};
use std::time::Duration;

use chorus_proto::chorus::v1::peer_client::PeerClient;
use chorus_proto::chorus::v1::peer_server::{Peer, PeerServer};
use chorus_proto::chorus::v1::{ClusterInfoRequest, ClusterInfoResponse, RaftAck, RaftBatch, SnapshotChunk};
use chorus_proto::etcdserverpb::{
    HashKvRequest, HashKvResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use futures::StreamExt;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Input, NodeHandle};

const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(50);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// Members removed from the configuration while this member ran: their messages
/// are refused, which is how a removed member learns it is out.
pub type RemovedMembers = std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<u64>>>;

/// The status a removed member's messages get.
const REMOVED_MESSAGE: &str = "chorus: the member has been permanently removed from the cluster";

/// Receives batches from peers and hands their messages to the driver.
pub struct PeerService {
    cluster_id: u64,
    member_id: u64,
    removed: RemovedMembers,
    inputs: mpsc::Sender<Input>,
    node: NodeHandle,
    /// Becomes true when the member stops: open streams end then, so a graceful
    /// shutdown does not wait for peers to hang up.
    stop: watch::Receiver<bool>,
    /// Hashes the key space for the leader's corruption check.
    reader: chorus_storage::ImageReader,
}

impl PeerService {
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        inputs: mpsc::Sender<Input>,
        node: NodeHandle,
        stop: watch::Receiver<bool>,
        removed: RemovedMembers,
        reader: chorus_storage::ImageReader,
    ) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { cluster_id, member_id, removed, inputs, node, stop, reader })
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
            if self.removed.read().expect("removed members").contains(&batch.from_id) {
                return Err(Status::failed_precondition(REMOVED_MESSAGE));
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

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        let mut bytes: Vec<u8> = Vec::new();
        let mut expected: Option<(u64, u64)> = None;
        loop {
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                _ = stop.wait_for(|stopped| *stopped) => return Err(Status::unavailable("member is stopping")),
            };
            let Some(chunk) = chunk else {
                return Err(Status::aborted("snapshot stream ended before the snapshot was whole"));
            };
            let chunk = chunk?;
            if chunk.cluster_id != self.cluster_id || chunk.to_id != self.member_id {
                return Err(Status::failed_precondition(format!(
                    "snapshot is for member {:016x} of cluster {:016x}; this is {:016x} of {:016x}",
                    chunk.to_id, chunk.cluster_id, self.member_id, self.cluster_id
                )));
            }
            let (from, total) = *expected.get_or_insert((chunk.from_id, chunk.total_bytes));
            if chunk.from_id != from || chunk.total_bytes != total {
                return Err(Status::invalid_argument("snapshot chunks disagree on sender or size"));
            }
            if total > SNAPSHOT_BYTES_MAX {
                return Err(Status::resource_exhausted(format!(
                    "snapshot of {total} bytes is larger than the {SNAPSHOT_BYTES_MAX} bytes a member accepts"
                )));
            }
            if bytes.is_empty() {
                bytes.reserve_exact(total as usize);
            }
            if bytes.len() as u64 + chunk.data.len() as u64 > total {
                return Err(Status::invalid_argument("snapshot chunks exceed the announced size"));
            }
            bytes.extend_from_slice(&chunk.data);
            if (bytes.len() as u64) < total {
                continue;
            }
            // Hashing and parsing a large snapshot takes a while: not on a runtime thread.
            let expected_hash = chunk.sha256;
            let message = tokio::task::spawn_blocking(move || {
                if Sha256::digest(&bytes).as_slice() != expected_hash.as_slice() {
                    return Err(Status::data_loss("snapshot's SHA-256 does not match: discarded"));
                }
                Message::parse_from_bytes(&bytes)
                    .map_err(|e| Status::invalid_argument(format!("undecodable snapshot message: {e}")))
            })
            .await
            .map_err(|e| Status::internal(format!("snapshot check failed: {e}")))??;
            if message.get_msg_type() != MessageType::MsgSnapshot || message.from != from {
                return Err(Status::invalid_argument("not a snapshot message from the sender"));
            }
            tracing::info!(
                from = %format!("{from:016x}"),
                index = message.get_snapshot().get_metadata().index,
                bytes = total,
                "received a snapshot"
            );
            if self.inputs.send(Input::Peer(vec![message])).await.is_err() {
                return Err(Status::unavailable("member is stopping"));
            }
            return Ok(Response::new(RaftAck {}));
        }
    }

    async fn cluster_info(
        &self,
        _: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfoResponse>, Status> {
        let status = self.node.status().await?;
        Ok(Response::new(ClusterInfoResponse {
            cluster_id: self.cluster_id,
            voters: status.conf_state.voters.clone(),
            learners: status.conf_state.learners.clone(),
        }))
    }

    /// This member's HashKV at a revision, for the leader's corruption check.
    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let revision = request.into_inner().revision;
        let reader = self.reader.clone();
        let hashed = tokio::task::spawn_blocking(move || reader.hash_kv(revision))
            .await
            .map_err(|e| Status::internal(format!("hashing failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::from(crate::status::RequestError::Kv(e)))?;
        Ok(Response::new(HashKvResponse {
            header: None,
            hash: hashed.hash,
            compact_revision: hashed.compact_revision,
            hash_revision: hashed.hash_revision,
        }))
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
/// stream breaks. Ends when the queue's sender is dropped. A snapshot that cannot
/// be delivered is reported to `driver`.
pub async fn run_peer_sender(
    link: PeerLink,
    mut queue: mpsc::Receiver<Message>,
    driver: mpsc::WeakSender<Input>,
) {
    let mut delay = RECONNECT_DELAY_MIN;
    let snapshots = SnapshotSender { link: link.clone(), driver, in_flight: Default::default() };
    loop {
        match connect(&link).await {
            Ok(client) => {
                delay = RECONNECT_DELAY_MIN;
                match stream_batches(&link, client, &mut queue, &snapshots).await {
                    StreamEnd::QueueClosed => return,
                    StreamEnd::Broken => {}
                    StreamEnd::Removed => {
                        if let Some(driver) = snapshots.driver.upgrade() {
                            let _ = driver.send(Input::RemovedFromCluster).await;
                        }
                        return;
                    }
                }
            }
            Err(error) => tracing::debug!(peer = %link.addr, %error, "peer connect failed"),
        }
        // While disconnected, drop what is queued: it is stale by the time we return.
        while let Ok(message) = queue.try_recv() {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                snapshots.failed().await;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
    }
}

/// Asks the member at `addr` (its peer port) which cluster it belongs to.
pub async fn ask_cluster_info(addr: &str) -> Result<ClusterInfoResponse, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(1000))
        .timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let answer = PeerClient::new(channel)
        .cluster_info(ClusterInfoRequest {})
        .await
        .map_err(|e| e.message().to_string())?;
    Ok(answer.into_inner())
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

/// Why a batch stream ended.
enum StreamEnd {
    QueueClosed,
    Broken,
    /// The peer refused this member's messages: it was removed from the cluster.
    Removed,
}

/// Streams batches until the stream breaks or the queue closes.
async fn stream_batches(
    link: &PeerLink,
    client: PeerClient<tonic::transport::Channel>,
    queue: &mut mpsc::Receiver<Message>,
    snapshots: &SnapshotSender,
) -> StreamEnd {
    let ended =
        |result: Result<Result<tonic::Response<RaftAck>, Status>, tokio::task::JoinError>| match result {
            Ok(Err(status)) if status.message() == REMOVED_MESSAGE => StreamEnd::Removed,
            _ => StreamEnd::Broken,
        };
    let (batches, stream) = mpsc::channel::<RaftBatch>(16);
    let mut batch_client = client.clone();
    let mut call = tokio::spawn(async move { batch_client.send(ReceiverStream::new(stream)).await });
    loop {
        let first = tokio::select! {
            message = queue.recv() => match message {
                Some(message) => message,
                None => { call.abort(); return StreamEnd::QueueClosed; }
            },
            result = &mut call => return ended(result),
        };
        let mut batch = RaftBatch {
            cluster_id: link.cluster_id,
            from_id: link.from_id,
            to_id: link.to_id,
            messages: vec![],
        };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                snapshots.start(client.clone(), message).await;
            } else {
                batch.messages.push(message.write_to_bytes().expect("encode raft message"));
            }
            if batch.messages.len() < PEER_BATCH_MESSAGES_MAX {
                next = queue.try_recv().ok();
            }
        }
        if batch.messages.is_empty() {
            continue;
        }
        if batches.send(batch).await.is_err() {
            return ended(call.await);
        }
    }
}

/// Streams snapshot messages to one peer, one at a time.
struct SnapshotSender {
    link: PeerLink,
    /// Weak, so that the sender does not keep the driver alive at shutdown.
    driver: mpsc::WeakSender<Input>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SnapshotSender {
    /// Starts streaming `message` on its own call, unless one is already under way
    /// (then this one is reported failed: raft sends a fresh one later).
    async fn start(&self, mut client: PeerClient<tonic::transport::Channel>, message: Message) {
        use std::sync::atomic::Ordering;
        if self.in_flight.swap(true, Ordering::AcqRel) {
            self.failed().await;
            return;
        }
        let (link, driver, in_flight) = (self.link.clone(), self.driver.clone(), self.in_flight.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let index = message.get_snapshot().get_metadata().index;
            // Encoding and hashing a large snapshot takes a while: not on a runtime thread.
            let encoded = tokio::task::spawn_blocking(move || {
                let bytes = message.write_to_bytes().expect("encode snapshot message");
                let sha256 = Sha256::digest(&bytes).to_vec();
                (bytes, sha256)
            })
            .await;
            let Ok((bytes, sha256)) = encoded else {
                in_flight.store(false, Ordering::Release);
                return;
            };
            let total = bytes.len();
            let result = client.install_snapshot(snapshot_chunks(&link, bytes, sha256)).await;
            in_flight.store(false, Ordering::Release);
            match result {
                Ok(_) => {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(
                        to = %format!("{:016x}", link.to_id),
                        index,
                        bytes = total,
                        mb_per_s = format!("{:.1}", total as f64 / 1e6 / seconds.max(1e-9)),
                        "sent a snapshot"
                    );
                }
                Err(status) => {
                    tracing::warn!(to = %format!("{:016x}", link.to_id), index, %status, "snapshot not delivered");
                    if let Some(driver) = driver.upgrade() {
                        let _ = driver.send(Input::SnapshotFailed { to: link.to_id }).await;
                    }
                }
            }
        });
    }

    async fn failed(&self) {
        if let Some(driver) = self.driver.upgrade() {
            let _ = driver.send(Input::SnapshotFailed { to: self.link.to_id }).await;
        }
    }
}

/// The pieces of an encoded snapshot message, the last one with the SHA-256.
fn snapshot_chunks(
    link: &PeerLink,
    bytes: Vec<u8>,
    sha256: Vec<u8>,
) -> impl futures::Stream<Item = SnapshotChunk> + Send + 'static {
    let total_bytes = bytes.len() as u64;
    let (cluster_id, from_id, to_id) = (link.cluster_id, link.from_id, link.to_id);
    let pieces = bytes.len().div_ceil(SNAPSHOT_CHUNK_BYTES).max(1);
    futures::stream::iter((0..pieces).map(move |piece| {
        let start = piece * SNAPSHOT_CHUNK_BYTES;
        let end = (start + SNAPSHOT_CHUNK_BYTES).min(bytes.len());
        let last = piece + 1 == pieces;
        SnapshotChunk {
            cluster_id,
            from_id,
            to_id,
            total_bytes,
            data: bytes[start..end].to_vec(),
            sha256: if last { sha256.clone() } else { Vec::new() },
        }
    }))
}
