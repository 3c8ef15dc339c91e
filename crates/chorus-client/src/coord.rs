//! Coordination on top of the KV API: leases kept alive by a session, locks and
//! elections (etcd's Lock and Election services), fenced writes, and
//! [`FenceGuard`] for resources outside chorus.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::chorus::v1::fenced_kv_client::FencedKvClient;
use chorus_proto::chorus::v1::{Fence, FencedDeleteRangeRequest, FencedPutRequest, FencedTxnRequest};
use chorus_proto::etcdserverpb::lease_client::LeaseClient;
use chorus_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, PutResponse, TxnRequest, TxnResponse,
};
use chorus_proto::v3electionpb::election_client::ElectionClient;
use chorus_proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use chorus_proto::v3lockpb::lock_client::LockClient;
use chorus_proto::v3lockpb::{LockRequest, UnlockRequest};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::Status;

use crate::client::{classify, Client, RetryPolicy};
use crate::error::{is_endpoint_failure, ClientError};

/// A lock held: its key and fencing token (the key's create revision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockGuard {
    pub name: Vec<u8>,
    pub key: Vec<u8>,
    pub token: i64,
}

impl LockGuard {
    /// The fence that makes a write apply only while this lock is held.
    pub fn fence(&self) -> Fence {
        Fence { lock: self.name.clone(), token: self.token }
    }
}

impl Client {
    /// Grants a lease of `ttl_s` seconds; returns its id.
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<i64, ClientError> {
        let request = LeaseGrantRequest { ttl: ttl_s, id: 0 };
        let response = self
            .call(RetryPolicy::Write, request, |channel, request| async move {
                LeaseClient::new(channel).lease_grant(request).await
            })
            .await?;
        Ok(response.id)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), ClientError> {
        self.call(RetryPolicy::Read, LeaseRevokeRequest { id }, |channel, request| async move {
            LeaseClient::new(channel).lease_revoke(request).await
        })
        .await
        .map(|_| ())
    }

    /// A put that applies only while `fence` names the lock's holder.
    pub async fn put_fenced(&self, request: PutRequest, fence: Fence) -> Result<PutResponse, ClientError> {
        let request = FencedPutRequest { fence: Some(fence), request: Some(request) };
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            FencedKvClient::new(channel).put(request).await
        })
        .await
    }

    /// A delete that applies only while `fence` names the lock's holder.
    pub async fn delete_fenced(
        &self,
        request: DeleteRangeRequest,
        fence: Fence,
    ) -> Result<DeleteRangeResponse, ClientError> {
        let request = FencedDeleteRangeRequest { fence: Some(fence), request: Some(request) };
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            FencedKvClient::new(channel).delete_range(request).await
        })
        .await
    }

    /// A txn that applies only while `fence` names the lock's holder.
    pub async fn txn_fenced(&self, request: TxnRequest, fence: Fence) -> Result<TxnResponse, ClientError> {
        let request = FencedTxnRequest { fence: Some(fence), request: Some(request) };
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            FencedKvClient::new(channel).txn(request).await
        })
        .await
    }

    /// Acquires lock `name` under `lease`, waiting as long as it takes (or until
    /// `timeout`). Safe to retry: the same lease always contends with the same key.
    pub async fn lock(
        &self,
        name: &[u8],
        lease: i64,
        timeout: Option<Duration>,
    ) -> Result<LockGuard, ClientError> {
        let request = LockRequest { name: name.to_vec(), lease };
        let response = self
            .call_waiting(request, timeout, |channel, request| async move {
                LockClient::new(channel).lock(request).await
            })
            .await?;
        // The token is the key's create revision: read it back.
        let key = response.key;
        let found = self.get(key.clone()).await?;
        let token = found.kvs.first().map(|kv| kv.create_revision).ok_or_else(|| ClientError::Server {
            endpoint: String::new(),
            status: Status::failed_precondition("lock key vanished right after the lock was granted"),
        })?;
        Ok(LockGuard { name: name.to_vec(), key, token })
    }

    /// Releases a lock by deleting its key.
    pub async fn unlock(&self, key: &[u8]) -> Result<(), ClientError> {
        self.call(RetryPolicy::Read, UnlockRequest { key: key.to_vec() }, |channel, request| async move {
            LockClient::new(channel).unlock(request).await
        })
        .await
        .map(|_| ())
    }

    /// Campaigns in election `name` under `lease`, waiting until elected (or `timeout`).
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
        timeout: Option<Duration>,
    ) -> Result<LeaderKey, ClientError> {
        let request = CampaignRequest { name: name.to_vec(), lease, value: value.to_vec() };
        let response = self
            .call_waiting(request, timeout, |channel, request| async move {
                ElectionClient::new(channel).campaign(request).await
            })
            .await?;
        response.leader.ok_or_else(|| ClientError::Server {
            endpoint: String::new(),
            status: Status::internal("campaign answered without a leader key"),
        })
    }

    /// Gives up leadership (or a pending campaign).
    pub async fn resign(&self, leader: LeaderKey) -> Result<(), ClientError> {
        let request = ResignRequest { leader: Some(leader) };
        self.call(RetryPolicy::Read, request, |channel, request| async move {
            ElectionClient::new(channel).resign(request).await
        })
        .await
        .map(|_| ())
    }

    /// Sets the election's value, only while `leader` still leads.
    pub async fn proclaim(&self, leader: LeaderKey, value: &[u8]) -> Result<(), ClientError> {
        let request = ProclaimRequest { leader: Some(leader), value: value.to_vec() };
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            ElectionClient::new(channel).proclaim(request).await
        })
        .await
        .map(|_| ())
    }

    /// The election's current leader.
    pub async fn leader(&self, name: &[u8]) -> Result<LeaderResponse, ClientError> {
        let request = LeaderRequest { name: name.to_vec() };
        self.call(RetryPolicy::Read, request, |channel, request| async move {
            ElectionClient::new(channel).leader(request).await
        })
        .await
    }

    /// Streams the election's leader and every change of it, from the current endpoint.
    pub async fn observe(&self, name: &[u8]) -> Result<tonic::Streaming<LeaderResponse>, ClientError> {
        let index = self.shared.current_index.load(Ordering::Relaxed);
        let endpoint = &self.shared.endpoints[index];
        let request = LeaderRequest { name: name.to_vec() };
        match ElectionClient::new(endpoint.channel.clone()).observe(request).await {
            Ok(stream) => Ok(stream.into_inner()),
            Err(status) => {
                if is_endpoint_failure(&status) {
                    self.move_past(index);
                }
                Err(classify(&endpoint.address.name, status))
            }
        }
    }

    /// A call that may block for long (lock, campaign): no request timeout, only
    /// the caller's; on an endpoint failure it moves to the next endpoint and asks
    /// again, which is safe because the same lease contends with the same key.
    async fn call_waiting<M, R, F, Fut>(
        &self,
        message: M,
        timeout: Option<Duration>,
        rpc: F,
    ) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let work = async {
            let mut failures = 0u32;
            loop {
                let index = self.shared.current_index.load(Ordering::Relaxed);
                let endpoint = &self.shared.endpoints[index];
                let mut request = tonic::Request::new(message.clone());
                if let Some(timeout) = timeout {
                    request.set_timeout(timeout);
                }
                match rpc(endpoint.channel.clone(), request).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if is_endpoint_failure(&status) && failures < WAITING_FAILURES_MAX => {
                        failures += 1;
                        self.move_past(index);
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(10)))).await;
                    }
                    Err(status) => return Err(classify(&endpoint.address.name, status)),
                }
            }
        };
        match timeout {
            Some(timeout) => tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })
            }),
            None => work.await,
        }
    }
}

/// Endpoint failures a waiting call rides out before it gives up.
const WAITING_FAILURES_MAX: u32 = 50;

/// A lease kept alive in the background until the session is closed or lost.
pub struct Session {
    client: Client,
    lease: i64,
    lost: watch::Receiver<bool>,
    stop: Option<mpsc::Sender<()>>,
}

impl Session {
    /// Grants a lease of `ttl_s` seconds and keeps it alive, renewing every third of
    /// its TTL. If no renewal succeeds for a whole TTL, or the server says the lease
    /// is gone, the session is lost: [`Session::lost`] turns true.
    pub async fn new(client: &Client, ttl_s: i64) -> Result<Session, ClientError> {
        let lease = client.lease_grant(ttl_s).await?;
        let (lost_tx, lost) = watch::channel(false);
        let (stop_tx, stop_rx) = mpsc::channel(1);
        tokio::spawn(keep_alive(client.clone(), lease, ttl_s, lost_tx, stop_rx));
        Ok(Session { client: client.clone(), lease, lost, stop: Some(stop_tx) })
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Becomes true once the lease is lost (and stays so).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing and revokes the lease (deleting its keys).
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.stop.take();
        self.client.lease_revoke(self.lease).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.take();
    }
}

async fn keep_alive(
    client: Client,
    lease: i64,
    ttl_s: i64,
    lost: watch::Sender<bool>,
    mut stop: mpsc::Receiver<()>,
) {
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let period = ttl / 3;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let index = client.shared.current_index.load(Ordering::Relaxed);
        let channel = client.shared.endpoints[index].channel.clone();
        let (requests, receiver) = mpsc::channel(1);
        let stream = tokio_stream_from(receiver);
        let mut lease_client = LeaseClient::new(channel);
        let opened = tokio::select! {
            opened = lease_client.lease_keep_alive(stream) => opened,
            _ = stop.recv() => return,
        };
        let mut responses = match opened {
            Ok(responses) => responses.into_inner(),
            Err(_) => {
                client.move_past(index);
                if last_renewed.elapsed() >= ttl {
                    let _ = lost.send(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            if requests.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                break;
            }
            let answer = tokio::select! {
                answer = tokio::time::timeout(period.max(Duration::from_millis(500)), responses.next()) => answer,
                _ = stop.recv() => return,
            };
            match answer {
                Ok(Some(Ok(response))) if response.ttl > 0 => last_renewed = tokio::time::Instant::now(),
                Ok(Some(Ok(_))) => {
                    let _ = lost.send(true);
                    return;
                }
                _ => {
                    client.move_past(index);
                    break;
                }
            }
            if last_renewed.elapsed() >= ttl {
                let _ = lost.send(true);
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.recv() => return,
            }
        }
        if last_renewed.elapsed() >= ttl {
            let _ = lost.send(true);
            return;
        }
    }
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<LeaseKeepAliveRequest>,
) -> impl futures::Stream<Item = LeaseKeepAliveRequest> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// For a resource outside chorus (a file server, a database) that lock holders
/// write to: remembers the highest fencing token it has seen and rejects any
/// lower one, so a holder that was paused past its lease cannot overwrite the
/// work of the holder after it. Equal tokens pass (one holder, many writes).
#[derive(Debug, Default)]
pub struct FenceGuard {
    highest: AtomicI64,
}

/// A token lower than one already seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fencing token {token} is stale: token {highest} has already been seen")]
pub struct StaleToken {
    pub token: i64,
    pub highest: i64,
}

impl FenceGuard {
    pub fn new() -> FenceGuard {
        FenceGuard::default()
    }

    /// Admits `token` if no higher token has been seen, and remembers it.
    pub fn admit(&self, token: i64) -> Result<(), StaleToken> {
        let previous = self.highest.fetch_max(token, Ordering::SeqCst);
        if token < previous {
            return Err(StaleToken { token, highest: previous });
        }
        Ok(())
    }

    /// The highest token seen so far (0 if none).
    pub fn highest(&self) -> i64 {
        self.highest.load(Ordering::SeqCst)
    }
}

/// A shared guard, for resource servers that hand it to many tasks.
pub type SharedFenceGuard = Arc<FenceGuard>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_guard_rejects_lower_tokens_only() {
        let guard = FenceGuard::new();
        assert_eq!(guard.admit(5), Ok(()));
        assert_eq!(guard.admit(5), Ok(()));
        assert_eq!(guard.admit(9), Ok(()));
        assert_eq!(guard.admit(7), Err(StaleToken { token: 7, highest: 9 }));
        assert_eq!(guard.highest(), 9);
        assert_eq!(
            guard.admit(7).unwrap_err().to_string(),
            "fencing token 7 is stale: token 9 has already been seen"
        );
    }

    #[test]
    fn fence_guard_is_safe_across_threads() {
        let guard = Arc::new(FenceGuard::new());
        let threads: Vec<_> = (1..=8)
            .map(|t| {
                let guard = guard.clone();
                std::thread::spawn(move || (0..1000).filter(|i| guard.admit(t * 1000 + i).is_ok()).count())
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(admitted >= 1000, "at least one thread's increasing run is admitted whole");
        assert_eq!(guard.highest(), 8999);
    }
}
