//! chorus-server: the tokio shell around chorus-core.
//!
//! [`serve`] runs one member: it opens the data directory, starts the node driver
//! thread, the ticker, the peer transport and the client gRPC server, and runs
//! until its shutdown future completes. Start-up order matters: everything that
//! can fail (configuration, data directory, binding ports) fails before the member
//! talks to anyone.

pub mod api;
mod authority;
pub mod backup;
mod coalesce;
pub mod config;
pub mod corrupt;
pub mod driver;
pub mod gateway;
pub mod health;
pub mod metrics;
mod peer_wire;
mod raft_log;
mod read_gate;
pub mod status;
pub mod transport;

use chorus_core::limits::{DRIVER_QUEUE_INPUTS_MAX, SHUTDOWN_DRAIN_MS};
use chorus_core::limits::{GRPC_MESSAGE_OVERHEAD_BYTES, PEER_PORT_GRPC_BACKLOG};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_core::node::{Node, NodeConfig};
use chorus_proto::chorus::v1::fenced_kv_server::FencedKvServer;
use chorus_proto::chorus::v1::MemberAttributes;
use chorus_proto::etcdserverpb::cluster_server::ClusterServer;
use chorus_proto::etcdserverpb::kv_server::KvServer;
use chorus_proto::etcdserverpb::lease_server::LeaseServer;
use chorus_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use chorus_proto::etcdserverpb::watch_server::WatchServer;
use chorus_proto::v3electionpb::election_server::ElectionServer;
use chorus_proto::v3lockpb::lock_server::LockServer;
use chorus_storage::{DiskStorage, Identity, StorageError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;

pub use config::{ClusterState, ConfigError, ServerConfig};

use crate::api::barrier::BarrierService;
use crate::api::cluster::{ClusterService, ConfiguredMember};
use crate::api::election::ElectionService;
use crate::api::kv::{FencedKvService, KvService};
use crate::api::lease::LeaseService;
use crate::api::lock::LockService;
use crate::api::maintenance::MaintenanceService;
use crate::api::queue::QueueService;
use crate::api::watch::WatchService;
use crate::driver::{Driver, HeaderIds, Input, NodeHandle};
use crate::transport::{PeerHandle, PeerLink, PeerService};
use chorus_proto::chorus::v1::barrier_server::BarrierServer;
use chorus_proto::chorus::v1::queue_server::QueueServer;

/// Why a member could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("raft could not start: {0}")]
    Raft(String),
    #[error("gRPC server failed: {0}")]
    Grpc(String),
}

/// Runs one member until `shutdown` completes. `on_ready` is called with the bound
/// client addresses once the member is listening.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Vec<SocketAddr>) + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    let recommended = chorus_core::limits::REQUEST_BYTES_RECOMMENDED_MAX;
    if config.limits.request_bytes_max > recommended {
        tracing::warn!(
            max_request_bytes = config.limits.request_bytes_max,
            recommended_max = recommended,
            "--max-request-bytes is above the recommended most: an entry this large, written and synced on every member, can outlast the election timeout and cost a leader change"
        );
    }
    let member_id = config.member_id();
    let joining = config.initial_cluster_state == ClusterState::Existing;
    let cluster_id = if joining { join_cluster_id(&config, member_id).await? } else { config.cluster_id() };
    let ids = HeaderIds { cluster_id, member_id };
    let identity = Identity { cluster_id, member_id };
    let data_dir = config.data_dir.clone();
    let opened = tokio::task::spawn_blocking(move || DiskStorage::open(&data_dir, identity))
        .await
        .expect("storage open task")?;
    tracing::info!(
        member = %format!("{member_id:016x}"),
        cluster = %format!("{cluster_id:016x}"),
        data_dir = %config.data_dir.display(),
        created = opened.created,
        applied_index = opened.recovered.applied_index,
        "opened data directory"
    );

    let client_listeners = bind_all(&config.listen_client_addrs).await?;
    let peer_listeners = bind_all(&config.listen_peer_addrs).await?;
    let client_addrs: Vec<SocketAddr> = client_listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let metrics_listeners = metrics::bind(&config.listen_metrics_addrs)
        .await
        .map_err(|(addr, error)| ServerError::Bind { addr, error })?;

    let member_ids = config.member_ids();
    let node_config = NodeConfig {
        id: member_id,
        // A joining member starts with no configuration: it learns it from the
        // leader's snapshot.
        initial_voters: if joining { Vec::new() } else { member_ids.values().copied().collect() },
        election_ticks: config.election_ticks(),
        heartbeat_ticks: 1,
        seed: member_id ^ opened.boot_count,
        boot_id: opened.boot_count,
        tick_ms: config.heartbeat_interval_ms,
        log_entries_max: config.snapshot_count,
        log_bytes_max: config.snapshot_bytes,
        log_catchup_entries: config.snapshot_catchup_entries,
        log_held_entries_min: chorus_core::limits::LOG_HELD_FOR_FOLLOWERS_ENTRIES_MIN,
        snapshot_retry_ticks: chorus_core::limits::SNAPSHOT_RETRY_MS / config.heartbeat_interval_ms,
        inline_snapshots: false,
    };
    let node = Node::new(&node_config, opened.recovered, &raft_log::logger(&config.name))
        .map_err(|e| ServerError::Raft(e.to_string()))?;

    let (input_tx, input_rx) = mpsc::channel(DRIVER_QUEUE_INPUTS_MAX);
    let (stop_tx, stop_rx) = watch::channel(false);
    let peers = start_peer_senders(&config, &member_ids, cluster_id, member_id, &input_tx);
    let own_attributes = MemberAttributes {
        member_id,
        name: config.name.clone(),
        client_urls: config.advertise_client_urls.clone(),
        // Peer URLs come from --initial-cluster and from membership changes.
        peer_urls: Vec::new(),
    };
    let watch_progress_ticks =
        (config.watch_progress_notify_interval_ms / config.heartbeat_interval_ms).max(1);
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    let image_reader = opened.storage.image_reader();
    let removed_members = transport::RemovedMembers::default();
    let driver =
        Driver::new(node, opened.storage, input_rx, peers, ids, own_attributes, watch_progress_ticks)
            .with_metrics(metrics.clone())
            .with_busy_poll(Duration::from_micros(config.busy_poll_us))
            .with_snapshot_builder(input_tx.downgrade())
            .with_quota(config.quota_backend_bytes)
            .with_membership(
                peer_starter(cluster_id, member_id, input_tx.downgrade()),
                config.auto_promote_learners,
                removed_members.clone(),
            );
    let read_view = driver.read_view();
    let driver_thread = std::thread::Builder::new()
        .name(format!("chorus-driver-{}", config.name))
        .spawn(move || driver.run())
        .expect("spawn driver thread");
    let ticker = tokio::spawn(run_ticker(
        input_tx.clone(),
        Duration::from_millis(config.heartbeat_interval_ms),
        stop_rx.clone(),
    ));

    let handle =
        NodeHandle::new(input_tx.clone(), Duration::from_millis(config.request_timeout_ms), read_view)
            .with_metrics(metrics.clone());
    let peer_addrs: BTreeMap<u64, String> = config
        .initial_cluster
        .iter()
        .map(|(name, urls)| (member_ids[name], config::url_to_addr(&urls[0]).expect("validated URL")))
        .collect();
    let health = start_health(&config, &member_ids, cluster_id, member_id, metrics.clone(), &stop_rx);
    let mut servers = Vec::new();
    let link_receiver = Arc::new(transport::LinkReceiver::new(
        cluster_id,
        member_id,
        removed_members.clone(),
        input_tx.clone(),
        stop_rx.clone(),
    ));
    for listener in peer_listeners {
        let service = PeerService::new(
            cluster_id,
            member_id,
            input_tx.clone(),
            handle.clone(),
            stop_rx.clone(),
            removed_members.clone(),
            image_reader.clone(),
        );
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .add_service(health::PeerHealthService::new_server(health.clone()));
        // The peer port's acceptor keeps raft links and passes gRPC connections on.
        let (grpc_tx, grpc_rx) = mpsc::channel::<tokio::net::TcpStream>(PEER_PORT_GRPC_BACKLOG);
        let grpc_incoming =
            futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(grpc_rx), |stream| {
                Ok::<_, std::io::Error>(stream)
            });
        servers.push(tokio::spawn(
            router.serve_with_incoming_shutdown(grpc_incoming, wait_stop(stop_rx.clone())),
        ));
        let acceptor = link_receiver.clone().accept(listener, grpc_tx);
        servers.push(tokio::spawn(async move {
            acceptor.await;
            Ok(())
        }));
    }
    drop(link_receiver);
    drop(input_tx);
    if config.corrupt_check_interval_ms > 0 {
        tokio::spawn(corrupt::run(
            handle.clone(),
            image_reader.clone(),
            member_id,
            peer_addrs.clone(),
            Duration::from_millis(config.corrupt_check_interval_ms),
            stop_rx.clone(),
        ));
    }
    let configured = configured_members(&config, &member_ids);
    let message_bytes_max = (config.limits.request_bytes_max + GRPC_MESSAGE_OVERHEAD_BYTES) as usize;
    let gateway_limits = gateway::GatewayLimits::new(message_bytes_max);
    // Readiness (a leader is known), for /readyz and /health, kept by start_metrics.
    let (ready_tx, ready_rx) = watch::channel(Err("starting".to_string()));
    for listener in client_listeners {
        // One set of service objects serves both gRPC and the HTTP/JSON gateway.
        let services = gateway::Services {
            kv: Arc::new(KvService::new(handle.clone(), config.limits.clone())),
            watch: Arc::new(WatchService::new(handle.clone())),
            lease: Arc::new(LeaseService::new(handle.clone(), &peer_addrs)),
            cluster: Arc::new(ClusterService::new(
                handle.clone(),
                ids,
                configured.clone(),
                config.initial_cluster_token.clone(),
            )),
            maintenance: Arc::new(MaintenanceService::new(handle.clone(), ids, image_reader.clone())),
            lock: Arc::new(LockService::new(handle.clone(), config.limits.clone())),
            election: Arc::new(ElectionService::new(handle.clone(), config.limits.clone())),
            auth: Arc::new(api::auth::AuthService::new(handle.clone(), ids)),
        };
        let kv = KvServer::from_arc(services.kv.clone()).max_decoding_message_size(message_bytes_max);
        let fenced_kv = FencedKvServer::new(FencedKvService(services.kv.clone()))
            .max_decoding_message_size(message_bytes_max);
        let maintenance = MaintenanceServer::from_arc(services.maintenance.clone());
        let cluster = ClusterServer::from_arc(services.cluster.clone());
        let watch = WatchServer::from_arc(services.watch.clone());
        let lease = LeaseServer::from_arc(services.lease.clone());
        let lock = LockServer::from_arc(services.lock.clone());
        let election = ElectionServer::from_arc(services.election.clone());
        let queue = QueueServer::new(QueueService::new(handle.clone(), config.limits.clone()))
            .max_decoding_message_size(message_bytes_max);
        let barrier = BarrierServer::new(BarrierService::new(handle.clone(), config.limits.clone()));
        let diagnostics = health::DiagnosticsService::new_server(health.clone(), handle.clone());
        let auth = chorus_proto::etcdserverpb::auth_server::AuthServer::from_arc(services.auth.clone());
        let grpc = tonic::service::Routes::new(kv)
            .add_service(diagnostics)
            .add_service(auth)
            .add_service(maintenance)
            .add_service(cluster)
            .add_service(watch)
            .add_service(lease)
            .add_service(fenced_kv)
            .add_service(lock)
            .add_service(election)
            .add_service(queue)
            .add_service(barrier);
        // gRPC and the gateway on one listener: HTTP/2 (gRPC, JSON) and HTTP/1.1 (JSON).
        let routes = grpc
            .into_axum_router()
            .merge(gateway::router(&services, gateway_limits))
            .merge(metrics::router(metrics.clone(), ready_rx.clone()))
            .fallback(gateway::fallback);
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .accept_http1(true)
            .layer(metrics::GrpcMetricsLayer(metrics.clone()))
            .add_routes(routes.into());
        // Through AuthorityFix: etcdctl 3.4 names some requests' target as a URL.
        // Answers finished in one scheduler round leave in one write (coalesce.rs).
        let incoming = futures::StreamExt::map(nodelay_incoming(listener), |accepted| {
            accepted.map(|stream| authority::AuthorityFix::new(coalesce::CoalescedWrites::new(stream)))
        });
        servers.push(tokio::spawn(router.serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()))));
    }
    let metrics_tasks =
        start_metrics(metrics_listeners, metrics, ready_tx, ready_rx, handle.clone(), &config, &stop_rx);
    drop(handle);
    on_ready(client_addrs);

    shutdown.await;
    tracing::info!(member = %config.name, "stopping");
    let _ = stop_tx.send(true);
    let mut failure = None;
    // Graceful shutdown waits for open streams (a watch, a keep-alive) to end, which
    // a client may never do: give them a bound, then cut them.
    let drain_deadline = tokio::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    for mut server in servers {
        match tokio::time::timeout_at(drain_deadline, &mut server).await {
            Ok(Ok(Err(error))) => failure = Some(ServerError::Grpc(error.to_string())),
            Ok(_) => {}
            Err(_) => {
                tracing::info!(member = %config.name, "closing streams still open after {SHUTDOWN_DRAIN_MS} ms");
                server.abort();
            }
        }
    }
    let _ = ticker.await;
    for task in metrics_tasks {
        let _ = task.await;
    }
    // Every sender is gone once the servers and ticker have stopped; the driver
    // finishes its last cycle and returns. A connection cut after the drain bound
    // may still hold a sender until the process exits: then the driver is left to
    // the exit. That is safe: everything acknowledged was fsynced by its cycle, and
    // a redb commit is atomic (the same as a SIGKILL, which the tests exercise).
    let join = tokio::task::spawn_blocking(move || driver_thread.join());
    match tokio::time::timeout(Duration::from_millis(SHUTDOWN_DRAIN_MS), join).await {
        Ok(joined) => joined.expect("join task").expect("driver thread panicked"),
        Err(_) => tracing::info!(member = %config.name, "leaving the driver to the process exit"),
    }
    failure.map_or(Ok(()), Err)
}

/// Accepted connections with Nagle's algorithm off. `Server::tcp_nodelay` does not
/// apply to an incoming stream we hand tonic ourselves; without this, small
/// responses wait ~40 ms for the client's delayed ACK.
fn nodelay_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn bind_all(addrs: &[String]) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let listener =
            TcpListener::bind(addr).await.map_err(|error| ServerError::Bind { addr: addr.clone(), error })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Starts a peer sender for a member added while this one runs.
fn peer_starter(cluster_id: u64, from_id: u64, driver: mpsc::WeakSender<Input>) -> driver::PeerStarter {
    let runtime = tokio::runtime::Handle::current();
    Box::new(move |to_id, addr| {
        let link = PeerLink { cluster_id, from_id, to_id, addr };
        PeerHandle::start(link, driver.clone(), &runtime)
    })
}

/// The id of the cluster a member joins (`--initial-cluster-state existing`):
/// from its data directory after the first start, otherwise from the first member
/// in `--initial-cluster` that answers, which must list this member already (it
/// was added with MemberAdd).
async fn join_cluster_id(config: &ServerConfig, member_id: u64) -> Result<u64, ServerError> {
    let data_dir = config.data_dir.clone();
    let stored = tokio::task::spawn_blocking(move || DiskStorage::stored_identity(&data_dir))
        .await
        .expect("storage read task")?;
    if let Some(identity) = stored {
        return Ok(identity.cluster_id);
    }
    let peers: Vec<String> = config
        .initial_cluster
        .iter()
        .filter(|(name, _)| **name != config.name)
        .map(|(_, urls)| config::url_to_addr(&urls[0]).expect("validated URL"))
        .collect();
    if peers.is_empty() {
        return Err(ConfigError(
            "--initial-cluster-state existing: --initial-cluster names no other member to join through"
                .into(),
        )
        .into());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(JOIN_WAIT_S);
    let mut last_error = String::new();
    while tokio::time::Instant::now() < deadline {
        for addr in &peers {
            match transport::ask_cluster_info(addr).await {
                Ok(info) if info.voters.contains(&member_id) || info.learners.contains(&member_id) => {
                    tracing::info!(cluster = %format!("{:016x}", info.cluster_id), via = %addr, "joining the cluster");
                    return Ok(info.cluster_id);
                }
                Ok(_) => {
                    return Err(ConfigError(format!(
                    "this member ({member_id:016x}, peer URLs {:?}) is not in the cluster's configuration \
                         (asked {addr}): add it first with `etcdctl member add` or `chorus member add`, \
                         with the same peer URLs and --initial-cluster-token",
                    config.initial_advertise_peer_urls
                ))
                    .into())
                }
                Err(error) => last_error = format!("{addr}: {error}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(ConfigError(format!(
        "--initial-cluster-state existing: no member of --initial-cluster answered within {JOIN_WAIT_S} s (last: {last_error})"
    ))
    .into())
}

/// How long a joining member looks for a member of the cluster to answer.
const JOIN_WAIT_S: u64 = 30;

fn start_peer_senders(
    config: &ServerConfig,
    member_ids: &BTreeMap<String, u64>,
    cluster_id: u64,
    member_id: u64,
    driver: &mpsc::Sender<Input>,
) -> HashMap<u64, PeerHandle> {
    let mut peers = HashMap::new();
    for (name, urls) in &config.initial_cluster {
        let peer_id = member_ids[name];
        if peer_id == member_id {
            continue;
        }
        let addr = config::url_to_addr(&urls[0]).expect("validated URL");
        let link = PeerLink { cluster_id, from_id: member_id, to_id: peer_id, addr };
        peers
            .insert(peer_id, PeerHandle::start(link, driver.downgrade(), &tokio::runtime::Handle::current()));
    }
    peers
}

/// Starts the failure detector's task; returns what the peer and diagnostics
/// services share with it.
fn start_health(
    config: &ServerConfig,
    member_ids: &BTreeMap<String, u64>,
    cluster_id: u64,
    member_id: u64,
    metrics: std::sync::Arc<metrics::Metrics>,
    stop: &watch::Receiver<bool>,
) -> std::sync::Arc<health::Health> {
    let peers = config
        .initial_cluster
        .iter()
        .map(|(name, urls)| {
            (member_ids[name], (name.clone(), config::url_to_addr(&urls[0]).expect("validated URL")))
        })
        .collect();
    let health = health::Health::new(
        cluster_id,
        member_id,
        config.name.clone(),
        &peers,
        config.health.clone(),
        metrics,
    );
    tokio::spawn(health::run(health.clone(), stop.clone()));
    health
}

/// Starts the status poller (Raft gauges, leader-change log lines, readiness) and
/// the HTTP servers on the metrics listeners.
fn start_metrics(
    listeners: Vec<(TcpListener, SocketAddr)>,
    metrics: std::sync::Arc<metrics::Metrics>,
    ready_tx: watch::Sender<Result<(), String>>,
    ready_rx: watch::Receiver<Result<(), String>>,
    handle: NodeHandle,
    config: &ServerConfig,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let interval = Duration::from_millis(config.heartbeat_interval_ms);
    let mut tasks = vec![tokio::spawn(metrics::run_status_poller(
        metrics.clone(),
        handle,
        ready_tx,
        interval,
        stop.clone(),
    ))];
    for (listener, addr) in listeners {
        tracing::info!(member = %config.name, metrics = %addr, "serving metrics and health over HTTP");
        let (metrics, ready, stop) = (metrics.clone(), ready_rx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(error) = metrics::serve_http(listener, metrics, ready, stop).await {
                tracing::error!(%error, "metrics HTTP server failed");
            }
        }));
    }
    tasks
}

fn configured_members(
    config: &ServerConfig,
    member_ids: &BTreeMap<String, u64>,
) -> BTreeMap<u64, ConfiguredMember> {
    config
        .initial_cluster
        .iter()
        .map(|(name, urls)| {
            (member_ids[name], ConfiguredMember { name: name.clone(), peer_urls: urls.clone() })
        })
        .collect()
}

async fn run_ticker(inputs: mpsc::Sender<Input>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if inputs.send(Input::Tick).await.is_err() {
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn wait_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
