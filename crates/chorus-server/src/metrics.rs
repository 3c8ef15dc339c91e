//! Metrics (Prometheus text format, through the Prometheus org's `prometheus-client`)
//! and health endpoints over HTTP on `--listen-metrics-urls`, as etcd:
//!
//! - `/metrics`: Raft, proposals, disk, gRPC latency, peers' phi, round trips and
//!   clock offsets, database size, watchers, leases;
//! - `/livez`: the process answers (200 `ok`);
//! - `/readyz`: the member knows a leader and its driver answers (200 `ok`, else 503
//!   with the reason);
//! - `/health`: etcd's JSON shape, `{"health":"true","reason":""}` (503 and
//!   `"false"` with the reason when not ready).
//!
//! One [`Metrics`] per member (`chorus dev` runs three members in one process).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::driver::NodeHandle;

type Labels = Vec<(String, String)>;

/// Distinct gRPC method labels kept; later unknown paths count as "other".
const GRPC_METHOD_LABELS_MAX: usize = 128;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18)) // 0.1 ms .. 13 s
}

/// Every metric of one member.
pub struct Metrics {
    registry: Registry,
    /// When this member started (for `process_start_time_seconds`).
    started_unix_s: f64,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_has_leader: Gauge,
    pub raft_leader_changes: Counter,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_apply_lag_entries: Gauge,
    pub proposals_committed: Counter,
    pub proposals_failed: Counter,
    pub disk_fsync_duration: Histogram,
    pub grpc_request_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub peer_phi: Family<Labels, Gauge<f64, AtomicU64>>,
    pub peer_rtt_p50: Family<Labels, Gauge<f64, AtomicU64>>,
    pub peer_clock_offset: Family<Labels, Gauge<f64, AtomicU64>>,
    pub peer_clock_offset_bound: Family<Labels, Gauge<f64, AtomicU64>>,
    pub peer_diagnosis: Family<Labels, Gauge>,
    pub peer_diagnosis_changes: Family<Labels, Counter>,
    pub clock_skew_alarms: Gauge,
    pub db_size_bytes: Gauge,
    pub watchers: Gauge,
    pub leases: Gauge,
    pub mvcc_revision: Gauge,
    /// The consensus thread's polls for input (`--busy-poll`), by how each ended:
    /// "input" (one arrived) or "timeout" (it went to sleep): the two members of
    /// the `busy_polls` family, made once, so that counting a poll allocates nothing.
    pub busy_polls_input: Counter,
    pub busy_polls_timeout: Counter,
    /// Time the consensus thread spent polling for input.
    pub busy_poll_seconds: Counter<f64, AtomicU64>,
    /// Each method path's histogram in `grpc_request_duration`, found once per path
    /// (at most `GRPC_METHOD_LABELS_MAX` paths), so that a request costs no label
    /// allocation and no exclusive lock.
    grpc_method_histograms: std::sync::RwLock<std::collections::HashMap<String, Histogram>>,
    /// The histogram labelled "other", made at the first request that needs it.
    grpc_other_histogram: std::sync::OnceLock<Histogram>,
}

impl Metrics {
    /// The latency histogram of the gRPC method at `path`. The path comes from a
    /// client: only known services' paths become labels, and at most
    /// GRPC_METHOD_LABELS_MAX of them, so a client cannot grow the label set
    /// without bound; others count as "other".
    fn grpc_histogram(&self, path: &str) -> Histogram {
        use std::sync::PoisonError;
        let histograms = self.grpc_method_histograms.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(histogram) = histograms.get(path) {
            return histogram.clone();
        }
        let known = path.starts_with("/etcdserverpb.") || path.starts_with("/chorus.v1.");
        let room = histograms.len() < GRPC_METHOD_LABELS_MAX;
        drop(histograms);
        if known && room {
            let mut histograms = self.grpc_method_histograms.write().unwrap_or_else(PoisonError::into_inner);
            if histograms.len() < GRPC_METHOD_LABELS_MAX {
                let histogram = histograms.entry(path.to_string()).or_insert_with(|| {
                    let label = path.trim_start_matches('/').chars().take(64).collect::<String>();
                    self.grpc_request_duration.get_or_create(&vec![("method".to_string(), label)]).clone()
                });
                return histogram.clone();
            }
        }
        // Unknown paths and those past the bound share one histogram, without a write lock.
        self.grpc_other_histogram
            .get_or_init(|| {
                let label = vec![("method".to_string(), "other".to_string())];
                self.grpc_request_duration.get_or_create(&label).clone()
            })
            .clone()
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("chorus");
        let busy_polls = Family::<Labels, Counter>::default();
        let busy_polls_by =
            |result: &str| busy_polls.get_or_create(&vec![("result".into(), result.into())]).clone();
        let (busy_polls_input, busy_polls_timeout) = (busy_polls_by("input"), busy_polls_by("timeout"));
        let m = Metrics {
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_has_leader: Gauge::default(),
            raft_leader_changes: Counter::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_apply_lag_entries: Gauge::default(),
            proposals_committed: Counter::default(),
            proposals_failed: Counter::default(),
            disk_fsync_duration: latency_histogram(),
            grpc_request_duration: Family::new_with_constructor(latency_histogram),
            peer_phi: Family::default(),
            peer_rtt_p50: Family::default(),
            peer_clock_offset: Family::default(),
            peer_clock_offset_bound: Family::default(),
            peer_diagnosis: Family::default(),
            peer_diagnosis_changes: Family::default(),
            clock_skew_alarms: Gauge::default(),
            db_size_bytes: Gauge::default(),
            watchers: Gauge::default(),
            leases: Gauge::default(),
            mvcc_revision: Gauge::default(),
            busy_polls_input,
            busy_polls_timeout,
            busy_poll_seconds: Counter::default(),
            registry: Registry::default(),
            grpc_method_histograms: Default::default(),
            grpc_other_histogram: Default::default(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs() as f64),
        };
        let r = &mut registry;
        r.register("raft_term", "Current Raft term", m.raft_term.clone());
        r.register("raft_is_leader", "1 if this member leads", m.raft_is_leader.clone());
        r.register("raft_has_leader", "1 if this member knows a leader", m.raft_has_leader.clone());
        r.register(
            "raft_leader_changes",
            "Leader changes seen by this member",
            m.raft_leader_changes.clone(),
        );
        r.register("raft_commit_index", "Raft commit index", m.raft_commit_index.clone());
        r.register("raft_applied_index", "Raft applied index", m.raft_applied_index.clone());
        r.register(
            "raft_apply_lag_entries",
            "Committed entries not yet applied (commit - applied)",
            m.raft_apply_lag_entries.clone(),
        );
        r.register("proposals_committed", "Proposals applied and answered", m.proposals_committed.clone());
        r.register(
            "proposals_failed",
            "Proposals answered with an error (timeout, no leader, leader changed)",
            m.proposals_failed.clone(),
        );
        r.register(
            "disk_wal_fsync_duration_seconds",
            "Duration of each durable (fsynced) storage write of a Raft cycle",
            m.disk_fsync_duration.clone(),
        );
        r.register(
            "grpc_request_duration_seconds",
            "Client gRPC request latency by method (streams: until the response starts)",
            m.grpc_request_duration.clone(),
        );
        r.register("peer_phi", "Phi accrual suspicion level of each peer", m.peer_phi.clone());
        r.register("peer_rtt_p50_ms", "Median heartbeat round trip to each peer, ms", m.peer_rtt_p50.clone());
        r.register(
            "peer_clock_offset_ms",
            "Estimated wall-clock offset of each peer (its clock minus ours), ms",
            m.peer_clock_offset.clone(),
        );
        r.register(
            "peer_clock_offset_bound_ms",
            "Error bound of the clock offset estimate (half the round trip), ms",
            m.peer_clock_offset_bound.clone(),
        );
        r.register(
            "peer_diagnosis",
            "1 for each peer's current diagnosis (healthy, slow, suspected, link-failure, node-down)",
            m.peer_diagnosis.clone(),
        );
        r.register(
            "peer_diagnosis_changes",
            "Diagnosis changes of each peer, by the diagnosis entered",
            m.peer_diagnosis_changes.clone(),
        );
        r.register(
            "clock_skew_alarms",
            "Peers whose clock skew alarm is raised",
            m.clock_skew_alarms.clone(),
        );
        r.register("db_size_bytes", "Size of the database file", m.db_size_bytes.clone());
        r.register("watchers", "Watchers open on this member", m.watchers.clone());
        r.register(
            "busy_polls",
            "Polls of the consensus thread for input after work (--busy-poll), by result (input, timeout)",
            busy_polls,
        );
        r.register(
            "busy_poll_seconds",
            "Time the consensus thread spent polling for input (--busy-poll)",
            m.busy_poll_seconds.clone(),
        );
        r.register("leases", "Leases in the replicated state", m.leases.clone());
        r.register("mvcc_revision", "Current MVCC revision", m.mvcc_revision.clone());
        Metrics { registry, ..m }
    }

    /// The whole registry in the text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("encoding into a String cannot fail");
        // The process's own metrics, under the names every Prometheus client
        // library exports (etcd's dashboards and `etcdctl check datascale` read
        // process_resident_memory_bytes), before the closing `# EOF`.
        let process = process_metrics(self.started_unix_s);
        match text.rfind("# EOF") {
            Some(at) => text.insert_str(at, &process),
            None => text.push_str(&process),
        }
        text
    }
}

/// `process_*` metrics of this process, from `/proc/self` (Linux), in OpenMetrics
/// text; a figure that cannot be read is left out.
fn process_metrics(started_unix_s: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let suffix = if kind == "counter" { "_total" } else { "" };
        let _ = writeln!(out, "# TYPE {name} {kind}\n# HELP {name} {help}\n{name}{suffix} {value}");
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let status_kib = |field: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        line[field.len()..].trim().trim_end_matches("kB").trim().parse::<f64>().ok().map(|kib| kib * 1024.0)
    };
    // utime and stime, in clock ticks of 1/100 s (USER_HZ is 100 on Linux), are
    // fields 14 and 15; the command name (field 2) may hold spaces, so count from ')'.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let cpu_s = stat.rfind(')').and_then(|at| {
        let fields: Vec<&str> = stat[at + 1..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    });
    if let Some(cpu_s) = cpu_s {
        metric("process_cpu_seconds", "counter", "Total user and system CPU time spent in seconds.", cpu_s);
    }
    if let Some(rss) = status_kib("VmRSS:") {
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss);
    }
    if let Some(vm) = status_kib("VmSize:") {
        metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vm);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric("process_open_fds", "gauge", "Number of open file descriptors.", fds.count() as f64);
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l["Max open files".len()..].split_whitespace().next()?.parse::<f64>().ok());
    if let Some(max_fds) = max_fds {
        metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds);
    }
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        started_unix_s,
    );
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Polls the driver's status into the Raft, storage, watch and lease gauges, and
/// logs one line per leader change seen. Ends when `stop` turns true.
pub async fn run_status_poller(
    metrics: Arc<Metrics>,
    node: NodeHandle,
    ready: watch::Sender<Result<(), String>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_seen = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let status = match tokio::time::timeout(Duration::from_secs(2), node.status()).await {
            Ok(Ok(status)) => status,
            _ => {
                let _ = ready.send(Err("the node driver does not answer".into()));
                continue;
            }
        };
        let raft = &status.node;
        metrics.raft_term.set(raft.term as i64);
        metrics.raft_is_leader.set(i64::from(raft.role == raft::StateRole::Leader));
        metrics.raft_has_leader.set(i64::from(raft.leader_id != raft::INVALID_ID));
        metrics.raft_commit_index.set(raft.commit_index as i64);
        metrics.raft_applied_index.set(raft.applied_index as i64);
        metrics.raft_apply_lag_entries.set(raft.commit_index.saturating_sub(raft.applied_index) as i64);
        metrics.db_size_bytes.set(status.db_size_bytes as i64);
        metrics.watchers.set(status.watchers_count as i64);
        metrics.mvcc_revision.set(status.revision);
        if raft.leader_id != leader_seen {
            if raft.leader_id != raft::INVALID_ID {
                metrics.raft_leader_changes.inc();
            }
            tracing::info!(
                leader = %format!("{:016x}", raft.leader_id),
                previous = %format!("{leader_seen:016x}"),
                term = raft.term,
                "leader changed"
            );
            leader_seen = raft.leader_id;
        }
        if let Ok(Ok(leases)) = tokio::time::timeout(Duration::from_secs(2), node.lease_leases()).await {
            metrics.leases.set(leases.leases.len() as i64);
        }
        let readiness =
            if raft.leader_id == raft::INVALID_ID { Err("no leader".to_string()) } else { Ok(()) };
        let _ = ready.send(readiness);
    }
}

/// Serves `/metrics`, `/livez`, `/readyz` and `/health` on `listener` until `stop`.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    let ready_for_health = ready.clone();
    let health = move || {
        let ready = ready_for_health.borrow().clone();
        async move {
            let (code, healthy, reason) = match ready {
                Ok(()) => (StatusCode::OK, "true", String::new()),
                Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, "false", reason),
            };
            let body = serde_json::json!({ "health": healthy, "reason": reason }).to_string();
            (code, [(header::CONTENT_TYPE, "application/json")], body)
        }
    };
    let app = router(metrics, ready).route("/health", axum::routing::get(health));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await
}

/// `/metrics`, `/livez` and `/readyz`: on the metrics listeners and, as etcd does,
/// on the client port (whose `/health` is the gateway's).
pub fn router(metrics: Arc<Metrics>, ready: watch::Receiver<Result<(), String>>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let metrics_route = move || {
        let metrics = metrics.clone();
        async move {
            (
                [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                metrics.encode(),
            )
        }
    };
    let readyz = move || {
        let ready = ready.borrow().clone();
        async move {
            match ready {
                Ok(()) => (StatusCode::OK, "ok".to_string()),
                Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}")),
            }
        }
    };
    axum::Router::new()
        .route("/metrics", get(metrics_route))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

/// A tower layer that times every client gRPC request by its method path.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let histogram = self.metrics.grpc_histogram(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            histogram.observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Binds every metrics address before the member talks to anyone.
pub async fn bind(addrs: &[String]) -> Result<Vec<(TcpListener, SocketAddr)>, (String, std::io::Error)> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr).await.map_err(|error| (addr.clone(), error))?;
        let local = listener.local_addr().map_err(|error| (addr.clone(), error))?;
        listeners.push((listener, local));
    }
    Ok(listeners)
}
