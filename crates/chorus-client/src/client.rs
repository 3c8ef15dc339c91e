//! The client: one gRPC channel per endpoint, a "current" endpoint that requests go to, and the
//! retry loop that moves to the next endpoint when the current one fails.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient, request_op,
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, MemberListRequest,
    MemberListResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, StatusRequest, StatusResponse,
    TxnRequest, TxnResponse,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::endpoint::{parse_endpoint, parse_endpoints, EndpointAddress};
use crate::error::{is_endpoint_failure, is_local_timeout, is_never_sent};
use crate::ClientError;

/// The largest response this client accepts. tonic's default (4 MiB) is too small for a range
/// over a large key space (etcd's own client allows 2 GiB); a bound still keeps a misbehaving
/// server from making us allocate without limit.
const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// HTTP/2 keep-alive pings detect a dead connection (a crashed or partitioned node) before a
/// request has to time out on it. etcd refuses pings more often than every 5 s by default, so
/// stay well above that.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Backoff before retry number n is n times this step, capped at the maximum: short, because
/// the retry usually goes to a different endpoint, but enough to avoid a tight loop when every
/// endpoint is briefly down (for example during a leader election).
const RETRY_BACKOFF_STEP: Duration = Duration::from_millis(50);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Timeouts and the retry budget of a [`Client`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long to wait for a TCP connection (and, at connect time, the HTTP/2 handshake) to an
    /// endpoint before treating it as down.
    pub dial_timeout: Duration,
    /// The deadline of one call, all retries included. Also sent to the server as the gRPC
    /// timeout, so the server stops working on a request nobody waits for any more.
    pub request_timeout: Duration,
    /// How many times a failed call may be sent again (so at most `retries_max + 1` attempts).
    pub retries_max: u32,
}

impl Default for ClientOptions {
    /// etcdctl's defaults: 2 s to dial, 5 s per command, and enough retries to try each of
    /// three endpoints once more after the first.
    fn default() -> Self {
        ClientOptions {
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retries_max: 3,
        }
    }
}

/// Whether a request may be sent again after a failure that leaves its fate unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryPolicy {
    /// Reads change nothing: retry on any `Unavailable` or transport failure.
    Read,
    /// Writes may have been applied even when the answer was lost: retry only when the request
    /// provably never left this process.
    Write,
}

/// A client for a chorus (or etcd) cluster. Cheap to clone: clones share the channels and the
/// choice of current endpoint.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) endpoints: Vec<EndpointChannel>,
    /// Index into `endpoints` of the endpoint requests go to first; moved forward when that
    /// endpoint fails.
    pub(crate) current_index: AtomicUsize,
    options: ClientOptions,
}

#[derive(Debug)]
pub(crate) struct EndpointChannel {
    pub(crate) address: EndpointAddress,
    pub(crate) channel: Channel,
}

impl Client {
    /// Creates a client for these endpoints (`host:port` or `http://host:port`).
    ///
    /// Every endpoint gets a lazily connected channel, so a node that is down now is used once
    /// it comes back. To start on a healthy endpoint rather than on whichever is listed first,
    /// every endpoint is dialed and asked for its status at once, and the first to answer
    /// within `dial_timeout` becomes current. If none answers, the client is still returned
    /// (after `dial_timeout` at most): requests will fail with a clear error, and succeed once
    /// an endpoint comes up.
    pub async fn connect(endpoints: &[String], options: ClientOptions) -> Result<Client, ClientError> {
        let addresses = parse_endpoints(endpoints)?;
        let configs: Vec<Endpoint> =
            addresses.iter().map(|address| endpoint_config(&address.uri, &options)).collect();
        let mut channels: Vec<Channel> = configs.iter().map(Endpoint::connect_lazy).collect();
        let current_index = match dial_first_healthy(&configs, options.dial_timeout).await {
            Some((index, channel)) => {
                channels[index] = channel;
                index
            }
            None => {
                tracing::debug!("no endpoint answered within the dial timeout");
                0
            }
        };
        let endpoints = addresses
            .into_iter()
            .zip(channels)
            .map(|(address, channel)| EndpointChannel { address, channel })
            .collect();
        Ok(Client {
            shared: Arc::new(Shared { endpoints, current_index: AtomicUsize::new(current_index), options }),
        })
    }

    /// The endpoints as they were given (trimmed), in order.
    pub fn endpoints(&self) -> Vec<String> {
        let endpoints = &self.shared.endpoints;
        endpoints.iter().map(|e| e.address.name.clone()).collect()
    }

    /// The options this client was created with.
    pub fn options(&self) -> &ClientOptions {
        &self.shared.options
    }

    /// Sets `key` to `value`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<PutResponse, ClientError> {
        let request = PutRequest { key: key.into(), value: value.into(), ..PutRequest::default() };
        self.put_with(request).await
    }

    /// Sends a full `PutRequest` (for a lease, `prev_kv`, `ignore_value` ...).
    pub async fn put_with(&self, request: PutRequest) -> Result<PutResponse, ClientError> {
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            kv_client(channel).put(request).await
        })
        .await
    }

    /// Reads one key (linearizable). The response has no kv when the key does not exist.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<RangeResponse, ClientError> {
        let request = RangeRequest { key: key.into(), ..RangeRequest::default() };
        self.range(request).await
    }

    /// Reads a range of keys; see [`crate::prefix_range_end`] for prefix reads.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, ClientError> {
        self.call(RetryPolicy::Read, request, |channel, request| async move {
            kv_client(channel).range(request).await
        })
        .await
    }

    /// Deletes a key or a range of keys.
    pub async fn delete(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse, ClientError> {
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            kv_client(channel).delete_range(request).await
        })
        .await
    }

    /// Runs a transaction. One that only reads is retried like a read; one that writes, like
    /// a write.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, ClientError> {
        let policy = if is_read_only_txn(&request) { RetryPolicy::Read } else { RetryPolicy::Write };
        self.call(policy, request, |channel, request| async move { kv_client(channel).txn(request).await })
            .await
    }

    /// Compacts the key-value history up to `revision`. With `physical`, the call returns only
    /// once the compaction has been applied to the backend.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<CompactionResponse, ClientError> {
        let request = CompactionRequest { revision, physical };
        self.call(RetryPolicy::Write, request, |channel, request| async move {
            kv_client(channel).compact(request).await
        })
        .await
    }

    /// Asks one specific endpoint for its status. There is no failover here, since the
    /// caller asked about that endpoint: one attempt, bounded by the request timeout. The
    /// endpoint need not be one the client was created with.
    pub async fn status(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let (name, channel) = self.channel_for(endpoint)?;
        let deadline = Instant::now() + self.shared.options.request_timeout;
        let outcome = self
            .attempt(channel, deadline, &StatusRequest {}, &|channel, request| async move {
                MaintenanceClient::new(channel).status(request).await
            })
            .await?;
        outcome.map_err(|status| classify(&name, status))
    }

    /// Lists the cluster's members. Served from the answering node's own view (not
    /// linearizable, as etcdctl's default), which is enough to find endpoints.
    pub async fn member_list(&self) -> Result<MemberListResponse, ClientError> {
        let request = MemberListRequest { linearizable: false };
        self.call(RetryPolicy::Read, request, |channel, request| async move {
            ClusterClient::new(channel).member_list(request).await
        })
        .await
    }

    /// Sends `message` through `rpc` to the current endpoint, moving to the next endpoint and
    /// retrying as `policy` allows, until an answer, a final error or the deadline.
    pub(crate) async fn call<M, R, F, Fut>(
        &self,
        policy: RetryPolicy,
        message: M,
        rpc: F,
    ) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let options = &self.shared.options;
        let deadline = Instant::now() + options.request_timeout;
        let mut retries: u32 = 0;
        loop {
            let index = self.shared.current_index.load(Ordering::Relaxed);
            let endpoint = &self.shared.endpoints[index];
            let channel = endpoint.channel.clone();
            let status = match self.attempt(channel, deadline, &message, &rpc).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(status)) => status,
                Err(timeout) => {
                    // An endpoint that let a request time out is likely paused or cut off:
                    // send the next call elsewhere.
                    self.move_past(index);
                    return Err(timeout);
                }
            };
            let endpoint_failed = is_endpoint_failure(&status);
            if endpoint_failed {
                self.move_past(index);
            }
            let retryable = match policy {
                RetryPolicy::Read => endpoint_failed,
                RetryPolicy::Write => is_never_sent(&status),
            };
            let name = &endpoint.address.name;
            if !retryable || retries >= options.retries_max {
                return Err(classify(name, status));
            }
            retries += 1;
            tracing::debug!(
                endpoint = %name,
                error = %status,
                retries,
                "retrying on the next endpoint"
            );
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                // The last failure says more than "timed out" would.
                return Err(classify(name, status));
            }
            tokio::time::sleep(retry_backoff(retries).min(remaining)).await;
        }
    }

    /// One attempt on one channel. The outer error is final (the deadline passed); the inner
    /// one is the gRPC failure, for the caller to classify.
    async fn attempt<M, R, F, Fut>(
        &self,
        channel: Channel,
        deadline: Instant,
        message: &M,
        rpc: &F,
    ) -> Result<Result<R, Status>, ClientError>
    where
        M: Clone,
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(self.timeout_error());
        }
        let mut request = tonic::Request::new(message.clone());
        request.set_timeout(remaining);
        match tokio::time::timeout(remaining, rpc(channel, request)).await {
            Ok(Ok(response)) => Ok(Ok(response.into_inner())),
            Ok(Err(status)) if is_local_timeout(&status) => Err(self.timeout_error()),
            Ok(Err(status)) => Ok(Err(status)),
            Err(_elapsed) => Err(self.timeout_error()),
        }
    }

    /// Makes the endpoint after `failed_index` current, unless another call already moved on
    /// (so that concurrent failures of one endpoint skip it once, not once per call).
    pub(crate) fn move_past(&self, failed_index: usize) {
        let next_index = (failed_index + 1) % self.shared.endpoints.len();
        let _ = self.shared.current_index.compare_exchange(
            failed_index,
            next_index,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The channel for `endpoint`: the client's own when it is one of its endpoints (matched as
    /// written or by address), otherwise a new lazily connected one.
    fn channel_for(&self, endpoint: &str) -> Result<(String, Channel), ClientError> {
        let address = parse_endpoint(endpoint)?;
        let known = self
            .shared
            .endpoints
            .iter()
            .find(|known| known.address.name == address.name || known.address.uri == address.uri);
        let channel = match known {
            Some(known) => known.channel.clone(),
            None => endpoint_config(&address.uri, &self.shared.options).connect_lazy(),
        };
        Ok((address.name, channel))
    }

    fn timeout_error(&self) -> ClientError {
        let timeout = self.shared.options.request_timeout;
        ClientError::Timeout { timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) }
    }
}

/// How every channel is configured: dial timeout, no Nagle delay (requests are small and
/// latency-bound), and keep-alive pings to notice dead connections.
fn endpoint_config(uri: &tonic::transport::Uri, options: &ClientOptions) -> Endpoint {
    Endpoint::from(uri.clone())
        .connect_timeout(options.dial_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
}

/// Dials every endpoint at once and returns the first that answers a Maintenance `Status`
/// request within `dial_timeout`, with its connected channel. A request, not just a TCP
/// connection, because a paused process (SIGSTOP) or a port that accepts but never speaks
/// gRPC still completes the TCP handshake. Any answer counts, even an error status: the
/// endpoint is reachable, and errors are the caller's to see on its own requests.
async fn dial_first_healthy(configs: &[Endpoint], dial_timeout: Duration) -> Option<(usize, Channel)> {
    let dials = configs.iter().enumerate().map(|(index, config)| {
        Box::pin(async move {
            let probe = async {
                let channel = config.connect().await.map_err(|error| error.to_string())?;
                let mut request = tonic::Request::new(StatusRequest {});
                request.set_timeout(dial_timeout);
                match MaintenanceClient::new(channel.clone()).status(request).await {
                    Err(status) if is_endpoint_failure(&status) => Err(status.to_string()),
                    Ok(_) | Err(_) => Ok((index, channel)),
                }
            };
            match tokio::time::timeout(dial_timeout, probe).await {
                Ok(outcome) => outcome,
                Err(_elapsed) => Err("dial timeout".to_string()),
            }
        })
    });
    let (found, _others) = futures::future::select_ok(dials).await.ok()?;
    Some(found)
}

fn kv_client(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

/// A failure that says the endpoint cannot serve is `Unavailable`; anything else is the
/// server's answer.
pub(crate) fn classify(endpoint: &str, status: Status) -> ClientError {
    let endpoint = endpoint.to_string();
    if is_endpoint_failure(&status) {
        ClientError::Unavailable { endpoint, status }
    } else {
        ClientError::Server { endpoint, status }
    }
}

fn retry_backoff(retries: u32) -> Duration {
    RETRY_BACKOFF_STEP.saturating_mul(retries).min(RETRY_BACKOFF_MAX)
}

/// True when no branch of the transaction (nested ones included) writes.
fn is_read_only_txn(request: &TxnRequest) -> bool {
    request.success.iter().chain(&request.failure).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(_)) | None => true,
        Some(request_op::Request::RequestTxn(nested)) => is_read_only_txn(nested),
        Some(request_op::Request::RequestPut(_)) | Some(request_op::Request::RequestDeleteRange(_)) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::etcdserverpb::RequestOp;

    fn op(request: request_op::Request) -> RequestOp {
        RequestOp { request: Some(request) }
    }

    #[test]
    fn txn_that_only_reads_is_read_only() {
        let read = op(request_op::Request::RequestRange(RangeRequest::default()));
        let write = op(request_op::Request::RequestPut(PutRequest::default()));
        let reads = TxnRequest { compare: vec![], success: vec![read.clone()], failure: vec![read.clone()] };
        assert!(is_read_only_txn(&reads));
        assert!(is_read_only_txn(&TxnRequest::default()));
        let nested_write = TxnRequest {
            failure: vec![op(request_op::Request::RequestTxn(TxnRequest {
                success: vec![write.clone()],
                ..TxnRequest::default()
            }))],
            ..reads.clone()
        };
        assert!(!is_read_only_txn(&nested_write));
        let delete = op(request_op::Request::RequestDeleteRange(DeleteRangeRequest::default()));
        assert!(!is_read_only_txn(&TxnRequest { success: vec![read, delete], ..TxnRequest::default() }));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(retry_backoff(1), Duration::from_millis(50));
        assert_eq!(retry_backoff(3), Duration::from_millis(150));
        assert_eq!(retry_backoff(100), RETRY_BACKOFF_MAX);
    }

    #[tokio::test]
    async fn unreachable_endpoints_fail_fast_and_clearly() {
        // Port 1 on loopback refuses connections, so every attempt fails before sending: even
        // a write is retried, and the final error names the endpoint.
        let endpoints = vec!["127.0.0.1:1".to_string(), "http://127.0.0.1:1".to_string()];
        let client = Client::connect(&endpoints, ClientOptions::default()).await.unwrap();
        let started = std::time::Instant::now();
        let error = client.put("k", "v").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(matches!(error, ClientError::Unavailable { .. }), "{error:?}");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(is_never_sent(error.status().unwrap()), "{error:?}");
        let message = error.to_string();
        assert!(message.starts_with("127.0.0.1:1") || message.starts_with("http://127.0.0.1:1"));
        let status_error = client.status("127.0.0.1:1").await.unwrap_err();
        assert!(matches!(status_error, ClientError::Unavailable { .. }));
    }

    #[tokio::test]
    async fn connect_rejects_bad_endpoints() {
        let options = ClientOptions::default();
        let error = Client::connect(&[], options.clone()).await.unwrap_err();
        assert!(matches!(error, ClientError::NoEndpoints));
        let error = Client::connect(&["nohost".to_string()], options).await.unwrap_err();
        assert!(matches!(error, ClientError::InvalidEndpoint { .. }));
    }
}
