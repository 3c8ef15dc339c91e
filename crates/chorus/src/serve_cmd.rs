//! `chorus serve` and `chorus dev`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chorus_core::limits::{self, Limits};
use chorus_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use chorus_proto::etcdserverpb::StatusRequest;
use chorus_server::config::{parse_initial_cluster, split_urls, url_to_addr};
use chorus_server::{ClusterState, ServerConfig};
use tokio::sync::watch;

/// Run one member of a chorus cluster. Flags are etcd's, with the same meaning;
/// each can also be given as an environment variable (`--name` as `CHORUS_NAME`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Human-readable name of this member.
    #[arg(long, env = "CHORUS_NAME", default_value = "default")]
    pub name: String,
    /// Where this member keeps its data (default: `<name>.chorus`).
    #[arg(long, env = "CHORUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic (comma separated).
    #[arg(long, env = "CHORUS_LISTEN_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    /// This member's client URLs to advertise to the rest of the cluster.
    #[arg(long, env = "CHORUS_ADVERTISE_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    /// URLs to listen on for peer traffic.
    #[arg(long, env = "CHORUS_LISTEN_PEER_URLS", default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    /// This member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, env = "CHORUS_INITIAL_ADVERTISE_PEER_URLS", default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration: `name=peer-url,name=peer-url,...`.
    #[arg(long, env = "CHORUS_INITIAL_CLUSTER", default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// `new` for a new cluster; `existing` to join one (not supported yet).
    #[arg(long, env = "CHORUS_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// A token unique to this cluster, so that two clusters with the same member
    /// URLs get different ids.
    #[arg(long, env = "CHORUS_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// Time between leader heartbeats, in milliseconds (raft's tick).
    #[arg(long, env = "CHORUS_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time without a leader before a follower campaigns, in milliseconds.
    #[arg(long, env = "CHORUS_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// How long a write or linearizable read may wait for the cluster before it is
    /// answered `Unavailable`, in milliseconds.
    #[arg(long, env = "CHORUS_REQUEST_TIMEOUT", default_value_t = 5000)]
    pub request_timeout: u64,
    /// How often idle watchers that asked for progress notifications are told the
    /// current revision, in milliseconds (etcd's default: ten minutes).
    #[arg(long, env = "CHORUS_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value_t = 600_000)]
    pub watch_progress_notify_interval: u64,
    /// Database size past which the member raises the NOSPACE alarm and the cluster refuses
    /// writes that grow it, in bytes (0: the default, 8 GiB)
    #[arg(long, env = "CHORUS_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,
    /// How often the leader compares every member's HashKV with its own and raises the
    /// CORRUPT alarm for a member that differs, in milliseconds (0: never)
    #[arg(long, env = "CHORUS_CORRUPT_CHECK_TIME", default_value_t = limits::CORRUPT_CHECK_INTERVAL_MS_DEFAULT)]
    pub corrupt_check_time: u64,
    /// The leader promotes a learner once its log has caught up (etcd needs `member promote`).
    #[arg(long, env = "CHORUS_AUTO_PROMOTE_LEARNERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_promote_learners: bool,
    /// Applied raft log entries kept before the log is compacted (etcd's flag).
    #[arg(long, env = "CHORUS_SNAPSHOT_COUNT", default_value_t = limits::LOG_ENTRIES_MAX_DEFAULT)]
    pub snapshot_count: u64,
    /// Payload bytes of raft log entries held before the log is compacted, whatever their
    /// count (chorus's own; keeps a log of large values from filling memory)
    #[arg(long, env = "CHORUS_SNAPSHOT_BYTES", default_value_t = limits::LOG_BYTES_MAX_DEFAULT)]
    pub snapshot_bytes: u64,
    /// Entries kept behind a compaction, for members slightly behind to catch up
    /// from the log instead of a snapshot.
    #[arg(long, env = "CHORUS_SNAPSHOT_CATCHUP_ENTRIES", default_value_t = limits::LOG_CATCHUP_ENTRIES_DEFAULT)]
    pub snapshot_catchup_entries: u64,
    /// Largest client request accepted, in bytes.
    #[arg(long, env = "CHORUS_MAX_REQUEST_BYTES", default_value_t = chorus_core::limits::REQUEST_BYTES_MAX_DEFAULT)]
    pub max_request_bytes: u64,
    /// Most operations in each branch of a txn.
    #[arg(long, env = "CHORUS_MAX_TXN_OPS", default_value_t = chorus_core::limits::TXN_OPS_MAX_DEFAULT)]
    pub max_txn_ops: u64,
    /// Threads that serve client and peer connections (0, the default: one per CPU). The
    /// consensus thread and the storage's threads come on top. Fewer suit members that
    /// share a machine's cores; serializable reads run on these threads, so a member on a
    /// machine of its own wants one per core.
    #[arg(long, env = "CHORUS_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=limits::SERVE_THREADS_MAX as i64))]
    pub threads: u32,
    /// URLs to serve /metrics, /livez, /readyz and /health on (comma separated; none by default).
    #[arg(long, env = "CHORUS_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,
    /// Time between two failure-detector heartbeats to each peer, in milliseconds.
    #[arg(long, env = "CHORUS_HEALTH_HEARTBEAT_INTERVAL", default_value_t = limits::HEALTH_HEARTBEAT_INTERVAL_MS_DEFAULT)]
    pub health_heartbeat_interval: u64,
    /// Phi from which a peer is suspected (and probed through the others).
    #[arg(long, env = "CHORUS_PHI_THRESHOLD", default_value_t = limits::HEALTH_PHI_THRESHOLD_DEFAULT)]
    pub phi_threshold: f64,
    /// Phi from which a peer not yet suspected is reported slow.
    #[arg(long, env = "CHORUS_PHI_SLOW_THRESHOLD", default_value_t = limits::HEALTH_PHI_SLOW_THRESHOLD_DEFAULT)]
    pub phi_slow_threshold: f64,
    /// Inter-arrival times the phi detector remembers per peer.
    #[arg(long, env = "CHORUS_PHI_WINDOW", default_value_t = limits::HEALTH_PHI_WINDOW_SAMPLES_DEFAULT)]
    pub phi_window: u32,
    /// Floor of the inter-arrival standard deviation, in milliseconds.
    #[arg(long, env = "CHORUS_PHI_MIN_STD_DEVIATION", default_value_t = limits::HEALTH_PHI_MIN_STD_DEVIATION_MS_DEFAULT)]
    pub phi_min_std_deviation: u64,
    /// Pause tolerated on top of the mean inter-arrival time, in milliseconds.
    #[arg(long, env = "CHORUS_PHI_ACCEPTABLE_PAUSE", default_value_t = limits::HEALTH_PHI_ACCEPTABLE_PAUSE_MS_DEFAULT)]
    pub phi_acceptable_pause: u64,
    /// How long an indirect probe (and a heartbeat) may take, in milliseconds.
    #[arg(long, env = "CHORUS_PROBE_TIMEOUT", default_value_t = limits::HEALTH_PROBE_TIMEOUT_MS_DEFAULT)]
    pub probe_timeout: u64,
    /// Wall-clock offset to a peer (beyond its error bound) that raises an alarm, in milliseconds.
    #[arg(long, env = "CHORUS_MAX_CLOCK_SKEW", default_value_t = limits::HEALTH_MAX_CLOCK_SKEW_MS_DEFAULT)]
    pub max_clock_skew: u64,
    /// After a pass that did replication work, the consensus thread polls for more input
    /// (yielding the CPU between polls) for this many microseconds before it sleeps (0, the
    /// default: never). Under load this saves a thread wake-up per message and lowers write
    /// latency, at the cost of CPU while busy; an idle member never polls. For members with
    /// cores to spare: where cores are short it delays other threads (watch delivery).
    #[arg(long, env = "CHORUS_BUSY_POLL", default_value_t = limits::BUSY_POLL_US_DEFAULT, value_parser = clap::value_parser!(u64).range(0..=limits::BUSY_POLL_US_MAX))]
    pub busy_poll: u64,
}

impl ServeArgs {
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let addrs = |urls: &str| -> anyhow::Result<Vec<String>> {
            split_urls(urls).iter().map(|u| url_to_addr(u).map_err(anyhow::Error::from)).collect()
        };
        let initial_cluster_state = match self.initial_cluster_state.as_str() {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            other => anyhow::bail!("--initial-cluster-state must be new or existing, not {other:?}"),
        };
        let limits = Limits {
            request_bytes_max: self.max_request_bytes,
            value_bytes_max: self.max_request_bytes.min(Limits::default().value_bytes_max),
            txn_ops_max: self.max_txn_ops,
            ..Limits::default()
        };
        Ok(ServerConfig {
            name: self.name.clone(),
            data_dir: self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.chorus", self.name))),
            listen_client_addrs: addrs(&self.listen_client_urls)?,
            advertise_client_urls: split_urls(&self.advertise_client_urls),
            listen_peer_addrs: addrs(&self.listen_peer_urls)?,
            initial_advertise_peer_urls: split_urls(&self.initial_advertise_peer_urls),
            initial_cluster: parse_initial_cluster(&self.initial_cluster)?,
            initial_cluster_state,
            initial_cluster_token: self.initial_cluster_token.clone(),
            heartbeat_interval_ms: self.heartbeat_interval,
            election_timeout_ms: self.election_timeout,
            request_timeout_ms: self.request_timeout,
            watch_progress_notify_interval_ms: self.watch_progress_notify_interval,
            auto_promote_learners: self.auto_promote_learners,
            quota_backend_bytes: if self.quota_backend_bytes == 0 {
                limits::QUOTA_BACKEND_BYTES_DEFAULT
            } else {
                self.quota_backend_bytes
            },
            snapshot_count: self.snapshot_count,
            corrupt_check_interval_ms: self.corrupt_check_time,
            snapshot_catchup_entries: self.snapshot_catchup_entries,
            snapshot_bytes: self.snapshot_bytes,
            limits,
            listen_metrics_addrs: addrs(&self.listen_metrics_urls)?,
            health: chorus_core::health::HealthConfig {
                heartbeat_interval_ms: self.health_heartbeat_interval,
                phi_threshold: self.phi_threshold,
                phi_slow_threshold: self.phi_slow_threshold,
                phi_window_samples: self.phi_window,
                phi_min_std_deviation_ms: self.phi_min_std_deviation,
                phi_acceptable_pause_ms: self.phi_acceptable_pause,
                probe_timeout_ms: self.probe_timeout,
                max_clock_skew_ms: self.max_clock_skew,
            },
            busy_poll_us: self.busy_poll,
        })
    }
}

/// Start a local three-member cluster for development: client ports 2379, 22379
/// and 32379, peer ports 2380, 22380 and 32380 on 127.0.0.1, as etcd's own local
/// cluster setup uses.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Where the three members keep their data (one subdirectory each).
    #[arg(long, env = "CHORUS_DEV_DATA_DIR", default_value = "./chorus-data")]
    pub data_dir: PathBuf,
    /// First client port; members use it, +20000 and +30000 (peer port = client + 1).
    #[arg(long, default_value_t = 2379)]
    pub base_port: u16,
}

pub async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    config.validate()?;
    let name = config.name.clone();
    chorus_server::serve(config, shutdown_signal(), move |addrs| {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        tracing::info!(member = %name, clients = %list.join(","), "serving");
    })
    .await?;
    Ok(())
}

/// The three members of `chorus dev`, as (name, client port, peer port).
fn dev_members(base_port: u16) -> anyhow::Result<Vec<(String, u16, u16)>> {
    let offsets = [0u32, 20_000, 30_000];
    offsets
        .iter()
        .enumerate()
        .map(|(i, offset)| {
            let client = u16::try_from(u32::from(base_port) + offset).context("--base-port too large")?;
            let peer = client.checked_add(1).context("--base-port too large")?;
            client.checked_add(2).context("--base-port too large")?; // metrics port
            Ok((format!("node{}", i + 1), client, peer))
        })
        .collect()
}

pub async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let members = dev_members(args.base_port)?;
    let initial_cluster: Vec<String> =
        members.iter().map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}")).collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (name, client, peer) in &members {
        let serve = ServeArgs {
            name: name.clone(),
            data_dir: Some(args.data_dir.join(name)),
            listen_client_urls: format!("http://127.0.0.1:{client}"),
            advertise_client_urls: format!("http://127.0.0.1:{client}"),
            listen_peer_urls: format!("http://127.0.0.1:{peer}"),
            initial_advertise_peer_urls: format!("http://127.0.0.1:{peer}"),
            initial_cluster: initial_cluster.join(","),
            initial_cluster_state: "new".into(),
            initial_cluster_token: "chorus-dev".into(),
            heartbeat_interval: 100,
            election_timeout: 1000,
            request_timeout: 5000,
            watch_progress_notify_interval: 600_000,
            auto_promote_learners: true,
            quota_backend_bytes: 0,
            corrupt_check_time: limits::CORRUPT_CHECK_INTERVAL_MS_DEFAULT,
            snapshot_count: limits::LOG_ENTRIES_MAX_DEFAULT,
            snapshot_catchup_entries: limits::LOG_CATCHUP_ENTRIES_DEFAULT,
            snapshot_bytes: limits::LOG_BYTES_MAX_DEFAULT,
            max_request_bytes: chorus_core::limits::REQUEST_BYTES_MAX_DEFAULT,
            max_txn_ops: chorus_core::limits::TXN_OPS_MAX_DEFAULT,
            // The three members share the process's runtime.
            threads: 0,
            listen_metrics_urls: format!("http://127.0.0.1:{}", client + 2),
            health_heartbeat_interval: limits::HEALTH_HEARTBEAT_INTERVAL_MS_DEFAULT,
            phi_threshold: limits::HEALTH_PHI_THRESHOLD_DEFAULT,
            phi_slow_threshold: limits::HEALTH_PHI_SLOW_THRESHOLD_DEFAULT,
            phi_window: limits::HEALTH_PHI_WINDOW_SAMPLES_DEFAULT,
            phi_min_std_deviation: limits::HEALTH_PHI_MIN_STD_DEVIATION_MS_DEFAULT,
            phi_acceptable_pause: limits::HEALTH_PHI_ACCEPTABLE_PAUSE_MS_DEFAULT,
            probe_timeout: limits::HEALTH_PROBE_TIMEOUT_MS_DEFAULT,
            max_clock_skew: limits::HEALTH_MAX_CLOCK_SKEW_MS_DEFAULT,
            busy_poll: limits::BUSY_POLL_US_DEFAULT,
        };
        let config = serve.to_config()?;
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        tasks.push(tokio::spawn(chorus_server::serve(config, shutdown, |_| {})));
    }
    let endpoints: Vec<String> = members.iter().map(|(_, client, _)| format!("127.0.0.1:{client}")).collect();
    println!("chorus dev: three members, data under {}", args.data_dir.display());
    for ((name, client, peer), endpoint) in members.iter().zip(&endpoints) {
        println!(
            "  {name}: client http://{endpoint}  peer http://127.0.0.1:{peer}  metrics http://127.0.0.1:{}/metrics",
            client + 2
        );
    }
    let ready = tokio::select! {
        ready = wait_for_leader(&endpoints, Duration::from_secs(30)) => ready,
        _ = shutdown_signal() => { let _ = stop_tx.send(true); Ok(()) }
    };
    match ready {
        Ok(()) if !*stop_tx.borrow() => {
            println!("chorus dev: ready; try: etcdctl --endpoints {} put hello world", endpoints.join(","));
            println!("chorus dev: press Ctrl-C to stop");
            shutdown_signal().await;
        }
        Ok(()) => {}
        Err(error) => eprintln!("chorus dev: {error:#}"),
    }
    let _ = stop_tx.send(true);
    let mut failed = false;
    for task in tasks {
        if let Ok(Err(error)) = task.await {
            eprintln!("chorus dev: member failed: {error}");
            failed = true;
        }
    }
    println!("chorus dev: stopped");
    if failed {
        anyhow::bail!("a member failed");
    }
    Ok(())
}

/// Polls `Status` on every endpoint until one reports a leader.
async fn wait_for_leader(endpoints: &[String], limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        for endpoint in endpoints {
            let Ok(mut client) = MaintenanceClient::connect(format!("http://{endpoint}")).await else {
                continue;
            };
            if let Ok(status) = client.status(StatusRequest {}).await {
                if status.into_inner().leader != 0 {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no leader was elected within {} s", limit.as_secs())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal during start-up is not
/// lost (or fatal).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}
