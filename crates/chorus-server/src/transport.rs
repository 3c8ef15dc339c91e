//! The peer transport: raft messages between members.
//!
//! Each member listens on its peer port for two kinds of connection, told apart by
//! their first bytes. A raft link (format in [`peer_wire`]) is a plain TCP
//! connection per ordered pair of members that carries raft messages as
//! length-prefixed frames: the driver writes a cycle's frames for a peer into its
//! link itself ([`PeerHandle`]), the peer's sender task writes only what the socket
//! could not take at once, and the receiving task hands every whole frame of one
//! read to the driver at once. A member has one link to each other member: a newer
//! link from the same member ends the older one. Everything else is gRPC (`chorus.v1.Peer` and
//! the failure detector's service): snapshots, cluster info, hashes for the
//! corruption check and forwarded lease calls. Raft messages once went over gRPC
//! too; HTTP/2's framing, flow control and extra task hop cost CPU and a thread
//! wake-up on every message (docs/DECISIONS.md §19).
//!
//! Messages are dropped, never queued without bound, when a peer is slow or gone:
//! raft retransmits whatever matters.
//!
//! A raft snapshot message (the whole state, for a member that needs entries the
//! leader has compacted away) does not travel on the link: it is streamed on its own
//! `InstallSnapshot` call in pieces of [`SNAPSHOT_CHUNK_BYTES`], the last carrying
//! the SHA-256 of the whole. The receiver hands it to raft only once it is whole
//! and its hash matches; a broken stream is reported to the leader's driver, and
//! raft sends the snapshot again from the start. Heartbeats and appends keep
//! flowing on the link meanwhile.

use chorus_core::limits::{PEER_FRAME_BYTES_MAX, PEER_LINK_BUFFER_KEPT_BYTES, PEER_PENDING_BYTES_MAX};
use chorus_core::limits::{SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chorus_proto::chorus::v1::peer_client::PeerClient;
use chorus_proto::chorus::v1::peer_server::{Peer, PeerServer};
use chorus_proto::chorus::v1::{ClusterInfoRequest, ClusterInfoResponse, RaftAck, SnapshotChunk};
use chorus_proto::etcdserverpb::{
    HashKvRequest, HashKvResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use futures::StreamExt;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Input, NodeHandle};
use crate::peer_wire::{self, Answer, Hello, HELLO_BYTES, MAGIC};

const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(50);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);
/// How long a TCP connect to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the hello and its answer may take, and how long a new connection on
/// the peer port may take to show what it is. Generous: a loaded machine (or a
/// debug build under tests) can take a while to schedule either end.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Members removed from the configuration while this member ran: their messages
/// are refused, which is how a removed member learns it is out.
pub type RemovedMembers = std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<u64>>>;

/// The status a removed member's messages get.
const REMOVED_MESSAGE: &str = "chorus: the member has been permanently removed from the cluster";

/// Serves the peer calls that are not raft messages: snapshots, cluster info,
/// hashes and forwarded lease calls.
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
            .max_decoding_message_size(PEER_FRAME_BYTES_MAX)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
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
            if self.removed.read().expect("removed members").contains(&from) {
                return Err(Status::failed_precondition(REMOVED_MESSAGE));
            }
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
        // What this member applied so far is hashed (database writes may wait).
        self.node.status_with_storage_flushed().await?;
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

/// The driver's end of one peer's link.
///
/// The driver writes a cycle's frames for the peer straight into the link's socket
/// (a non-blocking write, from the driver's thread) when nothing waits to be
/// written before them: no thread is woken to send a message. What the socket
/// cannot take at once waits in `pending` for the peer's sender task, and while it
/// waits, later frames queue behind it, so bytes never interleave. The task also
/// opens and reopens the link, writes keep-alives, reads a refusal and streams
/// snapshots over gRPC. Dropping the handle stops the task (once it has finished
/// opening a link, if it is doing that).
pub struct PeerHandle {
    outbox: Arc<Outbox>,
    /// Where the driver encodes a cycle's frames, outside the outbox's lock.
    scratch: Vec<u8>,
}

struct Outbox {
    state: std::sync::Mutex<OutboxState>,
    /// Wakes the sender task: bytes are pending, a snapshot waits, or the handle
    /// was dropped.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct OutboxState {
    /// The open link, once the peer accepted it.
    link: Option<Arc<TcpStream>>,
    /// Whole frames the sender task writes before anyone writes more.
    pending: Vec<u8>,
    /// The sender task is writing bytes it took from `pending`.
    writing: bool,
    /// Snapshot messages for the task to stream over gRPC.
    snapshots: Vec<Message>,
    closed: bool,
}

impl PeerHandle {
    /// Starts the sender task for `link` on `runtime`. A snapshot that cannot be
    /// delivered, and the peer's word that this member was removed, are reported
    /// to `driver`.
    pub fn start(
        link: PeerLink,
        driver: mpsc::WeakSender<Input>,
        runtime: &tokio::runtime::Handle,
    ) -> PeerHandle {
        let outbox = Arc::new(Outbox { state: Default::default(), wake: tokio::sync::Notify::new() });
        runtime.spawn(run_peer_sender(link, outbox.clone(), driver));
        PeerHandle { outbox, scratch: Vec::new() }
    }

    /// Hands the peer `messages`, in order. Never blocks. Without an open link, or
    /// with more than [`PEER_PENDING_BYTES_MAX`] already waiting for a slow peer
    /// (beyond what the sender task is writing), the messages are dropped: raft
    /// sends again whatever matters.
    pub fn send(&mut self, messages: Vec<Message>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut snapshots = Vec::new();
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                snapshots.push(message);
            } else {
                peer_wire::push_frame(&mut scratch, &message);
            }
        }
        let mut guard = self.outbox.state.lock().expect("peer outbox");
        let state = &mut *guard;
        let mut wake = !snapshots.is_empty();
        state.snapshots.append(&mut snapshots);
        if let (Some(link), false) = (&state.link, scratch.is_empty()) {
            if !state.writing && state.pending.is_empty() {
                match link.try_write(&scratch) {
                    Ok(written) if written == scratch.len() => {}
                    // The rest of a frame must follow whatever the cap says.
                    Ok(written) => {
                        state.pending.extend_from_slice(&scratch[written..]);
                        wake = true;
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        state.pending.extend_from_slice(&scratch);
                        wake = true;
                    }
                    // The link is broken: the task finds out on its own.
                    Err(_) => {}
                }
            } else if state.pending.len() + scratch.len() <= PEER_PENDING_BYTES_MAX {
                state.pending.extend_from_slice(&scratch);
                wake = true;
            }
        }
        drop(guard);
        if scratch.capacity() <= PEER_LINK_BUFFER_KEPT_BYTES {
            self.scratch = scratch;
        }
        if wake {
            self.outbox.wake.notify_one();
        }
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.outbox.state.lock().expect("peer outbox").closed = true;
        self.outbox.wake.notify_one();
    }
}

/// Opens the link to the peer and keeps it open, reconnecting with backoff when it
/// breaks, until the handle is dropped or the peer says this member was removed.
async fn run_peer_sender(link: PeerLink, outbox: Arc<Outbox>, driver: mpsc::WeakSender<Input>) {
    let mut delay = RECONNECT_DELAY_MIN;
    let snapshots = match snapshot_client(&link) {
        Ok(client) => SnapshotSender { link: link.clone(), client, driver, in_flight: Default::default() },
        Err(error) => {
            tracing::error!(peer = %link.addr, %error, "peer address is not usable; no link to this member");
            return;
        }
    };
    loop {
        let end = match open_link(&link).await {
            Ok(stream) => {
                let opened = tokio::time::Instant::now();
                let end = serve_link(Arc::new(stream), &outbox, &snapshots).await;
                // A link refused as soon as it opens must not be reopened at once, forever.
                if opened.elapsed() >= RECONNECT_DELAY_MAX {
                    delay = RECONNECT_DELAY_MIN;
                }
                end
            }
            Err(end) => end,
        };
        match end {
            LinkEnd::Closed => return,
            LinkEnd::Broken => {}
            LinkEnd::Removed => {
                if let Some(driver) = snapshots.driver.upgrade() {
                    let _ = driver.send(Input::RemovedFromCluster).await;
                }
                return;
            }
        }
        // While disconnected, snapshots cannot be sent either: raft retries them.
        let waiting = {
            let mut state = outbox.state.lock().expect("peer outbox");
            if state.closed {
                return;
            }
            std::mem::take(&mut state.snapshots)
        };
        for _ in waiting {
            snapshots.failed().await;
        }
        // Sleep out the delay; a wake (a snapshot, a drop) ends it only for a drop.
        let retry_at = tokio::time::Instant::now() + delay;
        while tokio::time::Instant::now() < retry_at {
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => {}
                _ = outbox.wake.notified() => {
                    if outbox.state.lock().expect("peer outbox").closed {
                        return;
                    }
                }
            }
        }
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

/// The gRPC client that carries snapshots to the peer. It connects when the first
/// snapshot is sent.
fn snapshot_client(
    link: &PeerLink,
) -> Result<PeerClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", link.addr))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3));
    Ok(PeerClient::new(endpoint.connect_lazy()))
}

/// Why a link ended, or could not be opened.
#[derive(Debug)]
enum LinkEnd {
    /// The driver dropped the handle.
    Closed,
    Broken,
    /// The peer refused this member's messages: it was removed from the cluster.
    Removed,
}

/// Connects to the peer and says hello; returns the stream once the peer accepts.
async fn open_link(link: &PeerLink) -> Result<TcpStream, LinkEnd> {
    let opened = tokio::time::timeout(CONNECT_TIMEOUT + HELLO_TIMEOUT, async {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&link.addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        configure_link_socket(&stream)?;
        let hello = Hello { cluster_id: link.cluster_id, from_id: link.from_id, to_id: link.to_id };
        stream.write_all(&hello.encode()).await?;
        let answer = read_answer(&mut stream).await?;
        Ok::<_, std::io::Error>((stream, answer))
    })
    .await;
    let (stream, answer) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(error)) => {
            tracing::debug!(peer = %link.addr, %error, "peer link failed to open");
            return Err(LinkEnd::Broken);
        }
        Err(_) => {
            tracing::debug!(peer = %link.addr, "peer link not accepted in time");
            return Err(LinkEnd::Broken);
        }
    };
    match answer.code {
        Answer::ACCEPTED => Ok(stream),
        Answer::REMOVED => Err(LinkEnd::Removed),
        _ => {
            tracing::warn!(peer = %link.addr, reason = %answer.reason, "peer refused the link");
            Err(LinkEnd::Broken)
        }
    }
}

/// Nagle off (a raft message waits for nothing), and a bound on how long written
/// bytes may go unacknowledged before the connection counts as broken.
fn configure_link_socket(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    socket2::SockRef::from(stream).set_tcp_user_timeout(Some(peer_wire::IDLE_TIMEOUT))
}

async fn read_answer<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Answer> {
    let mut head = [0u8; Answer::HEAD_BYTES];
    reader.read_exact(&mut head).await?;
    let mut reason = vec![0u8; Answer::reason_len(&head)];
    reader.read_exact(&mut reason).await?;
    Ok(Answer { code: head[0], reason: String::from_utf8_lossy(&reason).into_owned() })
}

/// The sender task's part of an open link: writes what the driver could not,
/// keep-alives in silences, and snapshots; watches for a refusal. Returns when the
/// link breaks, the peer refuses this member, or the handle is dropped.
async fn serve_link(link: Arc<TcpStream>, outbox: &Outbox, snapshots: &SnapshotSender) -> LinkEnd {
    {
        let mut state = outbox.state.lock().expect("peer outbox");
        state.pending.clear();
        state.writing = false;
        state.link = Some(link.clone());
    }
    let reader = link.clone();
    // The receiver speaks again only to refuse this member, then closes.
    let refusal = async move { read_answer(&mut SharedRead(&reader)).await };
    tokio::pin!(refusal);
    let end = 'link: loop {
        let keep_alive = tokio::select! {
            _ = outbox.wake.notified() => false,
            _ = tokio::time::sleep(peer_wire::KEEP_ALIVE_INTERVAL) => true,
            answer = &mut refusal => break match answer {
                Ok(Answer { code: Answer::REMOVED, .. }) => LinkEnd::Removed,
                Ok(answer) => {
                    tracing::warn!(peer = %snapshots.link.addr, reason = %answer.reason, "peer closed the link");
                    LinkEnd::Broken
                }
                Err(_) => LinkEnd::Broken,
            },
        };
        let mut first = true;
        loop {
            let (bytes, waiting) = {
                let mut state = outbox.state.lock().expect("peer outbox");
                if state.closed {
                    break 'link LinkEnd::Closed;
                }
                if keep_alive && first && state.pending.is_empty() && !state.writing {
                    peer_wire::push_keep_alive(&mut state.pending);
                }
                first = false;
                state.writing = !state.pending.is_empty();
                (std::mem::take(&mut state.pending), std::mem::take(&mut state.snapshots))
            };
            if !bytes.is_empty() {
                let write = write_all_shared(&link, &bytes);
                tokio::pin!(write);
                // A slow peer's write can take long: a dropped handle must not wait for it.
                let written = loop {
                    tokio::select! {
                        written = &mut write => break written,
                        _ = outbox.wake.notified() => {
                            if outbox.state.lock().expect("peer outbox").closed {
                                break 'link LinkEnd::Closed;
                            }
                        }
                    }
                };
                if written.is_err() {
                    break 'link LinkEnd::Broken;
                }
            }
            for message in waiting {
                snapshots.start(message).await;
            }
            if bytes.is_empty() {
                break;
            }
        }
    };
    let mut state = outbox.state.lock().expect("peer outbox");
    state.link = None;
    state.pending = Vec::new();
    state.writing = false;
    end
}

/// Writes all of `bytes` to a socket the driver may also write to (never at the
/// same time: the outbox's `writing` flag keeps them apart).
async fn write_all_shared(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads from a socket shared with writers.
struct SharedRead<'a>(&'a TcpStream);

impl AsyncRead for SharedRead<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return std::task::Poll::Ready(Err(error)),
            }
        }
    }
}

/// Receives raft links on the peer port and hands their messages to the driver.
pub struct LinkReceiver {
    cluster_id: u64,
    member_id: u64,
    removed: RemovedMembers,
    inputs: mpsc::Sender<Input>,
    stop: watch::Receiver<bool>,
    /// The newest link from each member with a live link (its number): a member
    /// has one link to this one, and a newer link ends the one before.
    newest: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    /// Numbers links, never twice (a forgotten member's next link must not share
    /// a number with an older one still open).
    next_number: std::sync::atomic::AtomicU64,
}

impl LinkReceiver {
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        removed: RemovedMembers,
        inputs: mpsc::Sender<Input>,
        stop: watch::Receiver<bool>,
    ) -> LinkReceiver {
        LinkReceiver {
            cluster_id,
            member_id,
            removed,
            inputs,
            stop,
            newest: Default::default(),
            next_number: Default::default(),
        }
    }

    /// Numbers a new link from `from`, ending any older one.
    fn register(&self, from: u64) -> u64 {
        let number = self.next_number.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.newest.lock().expect("newest links").insert(from, number);
        number
    }

    fn is_newest(&self, from: u64, number: u64) -> bool {
        self.newest.lock().expect("newest links").get(&from) == Some(&number)
    }

    /// Forgets a link that ended, unless a newer one replaced it: the map holds
    /// only members with a live link.
    fn forget(&self, from: u64, number: u64) {
        let mut newest = self.newest.lock().expect("newest links");
        if newest.get(&from) == Some(&number) {
            newest.remove(&from);
        }
    }

    /// Accepts connections on a peer port until the member stops: raft links are
    /// served here, everything else (snapshots, cluster info, health, forwarded
    /// lease calls) goes to `grpc`.
    pub async fn accept(self: Arc<Self>, listener: TcpListener, grpc: mpsc::Sender<TcpStream>) {
        let mut stop = self.stop.clone();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, most likely: do not spin.
                    tracing::warn!(%error, "peer port accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (receiver, grpc) = (self.clone(), grpc.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HELLO_TIMEOUT, starts_with_magic(&stream)).await {
                    Ok(Ok(true)) => receiver.serve(stream).await,
                    Ok(Ok(false)) => {
                        let _ = grpc.send(stream).await;
                    }
                    Ok(Err(_)) | Err(_) => {}
                }
            });
        }
    }

    /// Reads one link's hello, then its frames, until it ends.
    async fn serve(&self, mut stream: TcpStream) {
        let mut hello = [0u8; HELLO_BYTES];
        if !matches!(tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello)).await, Ok(Ok(_))) {
            return;
        }
        let hello = Hello::decode(&hello).expect("peeked the magic");
        let refusal = if hello.cluster_id != self.cluster_id {
            Some(Answer::refused(format!(
                "peer belongs to cluster {:016x}, this member to {:016x}",
                hello.cluster_id, self.cluster_id
            )))
        } else if hello.to_id != self.member_id {
            Some(Answer::refused(format!(
                "link is for member {:016x}, this is {:016x}",
                hello.to_id, self.member_id
            )))
        } else if self.is_removed(hello.from_id) {
            Some(Answer::removed(REMOVED_MESSAGE))
        } else {
            None
        };
        if let Some(answer) = refusal {
            let _ = stream.write_all(&answer.encode()).await;
            return;
        }
        if configure_link_socket(&stream).is_err()
            || stream.write_all(&Answer::accepted().encode()).await.is_err()
        {
            return;
        }
        let number = self.register(hello.from_id);
        self.read_frames(&mut stream, hello.from_id, number).await;
        self.forget(hello.from_id, number);
    }

    /// Reads an accepted link's frames and hands their messages to the driver,
    /// until the link ends, breaks, falls silent or is replaced by a newer one.
    async fn read_frames(&self, stream: &mut TcpStream, from: u64, number: u64) {
        let mut stop = self.stop.clone();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            let read = tokio::select! {
                read = tokio::time::timeout(peer_wire::IDLE_TIMEOUT, stream.read_buf(&mut buf)) => read,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => return,
                Ok(Err(error)) => {
                    tracing::debug!(from = %format!("{:016x}", from), %error, "peer link broke");
                    return;
                }
                Err(_) => {
                    tracing::debug!(from = %format!("{:016x}", from), "peer link silent: closed");
                    return;
                }
            }
            let mut messages = Vec::new();
            if let Err(error) = peer_wire::take_frames(&mut buf, from, &mut messages) {
                tracing::warn!(from = %format!("{:016x}", from), %error, "closing a peer link");
                let _ = stream.write_all(&Answer::refused(error.to_string()).encode()).await;
                return;
            }
            if !self.is_newest(from, number) {
                tracing::debug!(from = %format!("{:016x}", from), "a newer link replaced this one");
                return;
            }
            if buf.is_empty() && buf.capacity() > PEER_LINK_BUFFER_KEPT_BYTES {
                buf = BytesMut::with_capacity(64 * 1024);
            }
            if self.is_removed(from) {
                let _ = stream.write_all(&Answer::removed(REMOVED_MESSAGE).encode()).await;
                return;
            }
            if !messages.is_empty() && self.inputs.send(Input::Peer(messages)).await.is_err() {
                return;
            }
        }
    }

    fn is_removed(&self, member: u64) -> bool {
        self.removed.read().expect("removed members").contains(&member)
    }
}

/// Whether a new connection opens with the raft link's magic. Waits for as many
/// bytes as it takes to tell (a gRPC client sends its 24-byte preface at once).
async fn starts_with_magic(stream: &TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; MAGIC.len()];
    let mut wait = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 || head[..n] != MAGIC[..n] {
            return Ok(false);
        }
        if n == MAGIC.len() {
            return Ok(true);
        }
        // A prefix of the magic: the rest is on its way (backing off, so that a
        // connection that stalls here costs few wake-ups).
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// Streams snapshot messages to one peer, one at a time.
struct SnapshotSender {
    link: PeerLink,
    client: PeerClient<tonic::transport::Channel>,
    /// Weak, so that the sender does not keep the driver alive at shutdown.
    driver: mpsc::WeakSender<Input>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SnapshotSender {
    /// Starts streaming `message` on its own call, unless one is already under way
    /// (then this one is reported failed: raft sends a fresh one later).
    async fn start(&self, message: Message) {
        use std::sync::atomic::Ordering;
        if self.in_flight.swap(true, Ordering::AcqRel) {
            self.failed().await;
            return;
        }
        let (link, driver, in_flight) = (self.link.clone(), self.driver.clone(), self.in_flight.clone());
        let mut client = self.client.clone();
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
                    if let Some(driver) = driver.upgrade() {
                        let _ = driver.send(Input::SnapshotDelivered { to: link.to_id }).await;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 0xc1;
    const ME: u64 = 1;
    const PEER: u64 = 2;
    /// The hello of a link from PEER to this member, of this cluster.
    const PEER_TO_ME: Hello = Hello { cluster_id: CLUSTER, from_id: PEER, to_id: ME };

    /// A receiving member's peer port on loopback: its driver's inputs, the gRPC
    /// connections it passed on, and the removed set.
    struct Port {
        addr: String,
        inputs: mpsc::Receiver<Input>,
        grpc: mpsc::Receiver<TcpStream>,
        removed: RemovedMembers,
        receiver: Arc<LinkReceiver>,
        _stop: watch::Sender<bool>,
    }

    async fn port() -> Port {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (inputs_tx, inputs) = mpsc::channel(64);
        let (grpc_tx, grpc) = mpsc::channel(4);
        let (stop_tx, stop) = watch::channel(false);
        let removed = RemovedMembers::default();
        let receiver = Arc::new(LinkReceiver::new(CLUSTER, ME, removed.clone(), inputs_tx, stop));
        tokio::spawn(receiver.clone().accept(listener, grpc_tx));
        Port { addr, inputs, grpc, removed, receiver, _stop: stop_tx }
    }

    /// `append(index)` as one frame on the wire.
    fn frame(index: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        peer_wire::push_frame(&mut bytes, &append(index));
        bytes
    }

    fn append(index: u64) -> Message {
        peer_wire::tests::append(PEER, index, &[index as u8; 300])
    }

    /// Starts a sender from PEER in cluster `cluster` to the port; returns its handle
    /// and what it tells its driver.
    fn sender(addr: &str, cluster: u64) -> (PeerHandle, mpsc::Receiver<Input>, mpsc::Sender<Input>) {
        let (driver_tx, driver) = mpsc::channel(16);
        let link = PeerLink { cluster_id: cluster, from_id: PEER, to_id: ME, addr: addr.to_string() };
        let handle = PeerHandle::start(link, driver_tx.downgrade(), &tokio::runtime::Handle::current());
        (handle, driver, driver_tx)
    }

    /// Waits until the sender's link is open (or 10 s).
    async fn wait_open(handle: &PeerHandle) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.outbox.state.lock().unwrap().link.is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn next_input(inputs: &mut mpsc::Receiver<Input>) -> Option<Input> {
        tokio::time::timeout(Duration::from_secs(10), inputs.recv()).await.ok().flatten()
    }

    /// Raw hello on a fresh connection; returns the stream and the answer.
    async fn hello(addr: &str, hello: Hello) -> (TcpStream, Answer) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&hello.encode()).await.unwrap();
        let answer = read_answer(&mut stream).await.unwrap();
        (stream, answer)
    }

    #[tokio::test]
    async fn every_message_queued_arrives_in_order_at_the_driver() {
        let mut port = port().await;
        let (mut handle, _driver, _keep) = sender(&port.addr, CLUSTER);
        wait_open(&handle).await;
        // Batches large enough that some writes cannot finish at once and wait for
        // the sender task, while later batches queue behind them.
        for batch in 0..40 {
            handle.send((batch * 50..batch * 50 + 50).map(append).collect());
            if batch % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut received = Vec::new();
        while received.len() < 2000 {
            match next_input(&mut port.inputs).await {
                Some(Input::Peer(messages)) => received.extend(messages),
                Some(_) => panic!("only peer messages expected"),
                None => panic!("{} of 2000 messages arrived", received.len()),
            }
        }
        assert_eq!(received, (0..2000).map(append).collect::<Vec<_>>());
        assert!(port.grpc.try_recv().is_err(), "the link was taken for gRPC");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_the_socket_cannot_take_at_once_wait_in_order_and_a_stalled_peer_costs_only_drops() {
        // A receiver that takes the hello and then reads nothing until told to.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (mut handle, _driver, _keep) = sender(&addr, CLUSTER);
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; HELLO_BYTES];
        peer.read_exact(&mut hello).await.unwrap();
        peer.write_all(&Answer::accepted().encode()).await.unwrap();
        wait_open(&handle).await;
        // 3 MB a batch: the socket buffers fill, writes wait for the sender task,
        // and once PEER_PENDING_BYTES_MAX waits, whole batches are dropped.
        let big = |index: u64| peer_wire::tests::append(PEER, index, &vec![index as u8; 1 << 20]);
        let batches = (PEER_PENDING_BYTES_MAX >> 20) as u64 + 12;
        for batch in 0..batches {
            let started = std::time::Instant::now();
            handle.send((batch * 3..batch * 3 + 3).map(big).collect());
            assert!(started.elapsed() < Duration::from_secs(1), "send blocked on a stalled peer");
        }
        let pending = handle.outbox.state.lock().unwrap().pending.len();
        assert!(pending > 0 && pending <= PEER_PENDING_BYTES_MAX, "{pending} bytes pending");
        // Now the peer reads: every frame it gets is whole, in order, from an
        // unbroken prefix of the batches.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut byte = [0u8; 1 << 16];
        // Until no message has come for 2 s (keep-alives keep coming).
        let mut last_message = std::time::Instant::now();
        while last_message.elapsed() < Duration::from_secs(2) {
            match tokio::time::timeout(Duration::from_secs(2), peer.read(&mut byte)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&byte[..n]),
                _ => break,
            }
            let before = got.len();
            peer_wire::take_frames(&mut buf, PEER, &mut got).unwrap();
            if got.len() > before {
                last_message = std::time::Instant::now();
            }
        }
        assert!(got.len() >= 3, "only {} messages arrived", got.len());
        assert!(got.len() < (batches * 3) as usize, "nothing was dropped");
        assert_eq!(got, (0..got.len() as u64).map(big).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_link_from_another_cluster_or_for_another_member_is_refused_and_nothing_reaches_the_driver() {
        let mut port = port().await;
        let (_, answer) =
            hello(&port.addr, Hello { cluster_id: CLUSTER + 1, from_id: PEER, to_id: ME }).await;
        assert_eq!(answer.code, Answer::REFUSED);
        assert!(answer.reason.contains("peer belongs to cluster 00000000000000c2"), "{}", answer.reason);
        let (_, answer) =
            hello(&port.addr, Hello { cluster_id: CLUSTER, from_id: PEER, to_id: ME + 7 }).await;
        assert_eq!(answer.code, Answer::REFUSED);
        assert!(answer.reason.contains("link is for member 0000000000000008"), "{}", answer.reason);

        let (mut handle, _driver, _keep) = sender(&port.addr, CLUSTER + 1);
        for index in 0..10 {
            handle.send(vec![append(index)]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(tokio::time::timeout(Duration::from_millis(1500), port.inputs.recv()).await.is_err());
    }

    #[tokio::test]
    async fn a_removed_member_is_told_so_at_hello_and_on_an_open_link() {
        let mut port = port().await;
        let (mut handle, mut driver, _keep) = sender(&port.addr, CLUSTER);
        wait_open(&handle).await;
        handle.send(vec![append(1)]);
        assert!(matches!(next_input(&mut port.inputs).await, Some(Input::Peer(_))));
        // Removed while its link is open: its next frames get the refusal.
        port.removed.write().unwrap().insert(PEER);
        handle.send(vec![append(2)]);
        assert!(matches!(next_input(&mut driver).await, Some(Input::RemovedFromCluster)));
        assert!(tokio::time::timeout(Duration::from_millis(300), port.inputs.recv()).await.is_err());

        let (_, answer) = hello(&port.addr, PEER_TO_ME).await;
        assert_eq!((answer.code, answer.reason.as_str()), (Answer::REMOVED, REMOVED_MESSAGE));
    }

    #[tokio::test]
    async fn a_bad_frame_closes_the_link_with_the_reason_and_reaches_no_driver() {
        let mut port = port().await;
        let (mut stream, answer) = hello(&port.addr, PEER_TO_ME).await;
        assert_eq!(answer.code, Answer::ACCEPTED);
        stream.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await.unwrap();
        assert_eq!(answer.code, Answer::REFUSED);
        assert!(answer.reason.contains("larger than"), "{}", answer.reason);
        assert_eq!(
            stream.read(&mut [0u8; 16]).await.unwrap(),
            0,
            "the link must be closed after the refusal"
        );
        assert!(port.inputs.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_newer_link_from_the_same_member_ends_the_older_one() {
        let mut port = port().await;
        let me = PEER_TO_ME;
        let (mut older, answer) = hello(&port.addr, me).await;
        assert_eq!(answer.code, Answer::ACCEPTED);
        let (mut newer, answer) = hello(&port.addr, me).await;
        assert_eq!(answer.code, Answer::ACCEPTED);
        older.write_all(&frame(1)).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), older.read(&mut [0u8; 16])).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the older link stayed open: {read:?}");
        newer.write_all(&frame(2)).await.unwrap();
        match next_input(&mut port.inputs).await {
            Some(Input::Peer(messages)) => {
                assert_eq!(messages, vec![append(2)], "the older link's frame came through")
            }
            _ => panic!("the newer link's frame did not arrive"),
        }
    }

    #[tokio::test]
    async fn links_that_ended_are_forgotten_and_a_superseded_link_stays_superseded() {
        let mut port = port().await;
        let (addr, receiver) = (port.addr.clone(), port.receiver.clone());
        let me = PEER_TO_ME;
        let (mut older, _) = hello(&addr, me).await;
        let (newer, _) = hello(&addr, me).await;
        drop(newer);
        wait_forgotten(&receiver).await;
        let (mut third, answer) = hello(&addr, me).await;
        assert_eq!(answer.code, Answer::ACCEPTED);
        // The older link's frame goes first: were it not superseded, it would arrive first.
        older.write_all(&frame(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        third.write_all(&frame(3)).await.unwrap();
        match next_input(&mut port.inputs).await {
            Some(Input::Peer(messages)) => {
                assert_eq!(messages, vec![append(3)], "a superseded link's frame came through")
            }
            _ => panic!("the newest link's frame did not arrive"),
        }
        drop((older, third));
        wait_forgotten(&receiver).await;
    }

    /// Waits (at most 5 s) until the receiver remembers no live link.
    async fn wait_forgotten(receiver: &LinkReceiver) {
        let forgotten = async {
            while !receiver.newest.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), forgotten)
            .await
            .expect("an ended link is still remembered");
    }

    #[tokio::test]
    async fn a_silent_link_is_closed_and_a_connection_without_the_magic_goes_to_grpc() {
        let mut port = port().await;
        let (mut stream, answer) = hello(&port.addr, PEER_TO_ME).await;
        assert_eq!(answer.code, Answer::ACCEPTED);
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(peer_wire::IDLE_TIMEOUT * 2, stream.read(&mut [0u8; 16])).await;
        assert!(matches!(read, Ok(Ok(0))), "the silent link was not closed: {read:?}");
        assert!(started.elapsed() >= peer_wire::IDLE_TIMEOUT - Duration::from_millis(100));

        let mut http2 = TcpStream::connect(&port.addr).await.unwrap();
        http2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let passed = tokio::time::timeout(Duration::from_secs(5), port.grpc.recv()).await.unwrap().unwrap();
        let mut preface = [0u8; 24];
        passed.peek(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "the bytes must be left for gRPC");
    }
}
