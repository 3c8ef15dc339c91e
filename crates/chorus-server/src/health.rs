//! The IO around `chorus_core::health`: heartbeats and indirect probes between
//! members (`chorus.v1.PeerHealth`, on the peer port), the operators' view
//! (`chorus.v1.Diagnostics`, on the client port), logs and metrics.
//!
//! One task ticks the [`HealthMonitor`] every [`TICK_MS`] and performs its effects:
//! each ping is a unary `PeerHealth.Ping` call with a deadline (so a stopped peer
//! costs at most `probe_timeout / heartbeat_interval` calls in flight), each probe a
//! `PeerHealth.Probe` call to the helper, which pings the target itself. Clocks are
//! read here only: the monotonic one (an `Instant` base) decides, the wall clock
//! only feeds the clock-offset estimate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_core::health::{answer_ping, Diagnosis, HealthEffect, HealthMonitor, Ping, Pong};
use chorus_proto::chorus::v1 as pb;
use chorus_proto::chorus::v1::diagnostics_server::{Diagnostics, DiagnosticsServer};
use chorus_proto::chorus::v1::peer_health_client::PeerHealthClient;
use chorus_proto::chorus::v1::peer_health_server::{PeerHealth, PeerHealthServer};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::driver::NodeHandle;
use crate::metrics::Metrics;

/// How often the monitor is ticked (the resolution of detection), in ms.
const TICK_MS: u64 = 10;
/// How long the Diagnostics call waits for the driver's Raft status.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// What the health task, the peer service and the diagnostics service share.
pub struct Health {
    cluster_id: u64,
    member_id: u64,
    name: String,
    started: Instant,
    monitor: Mutex<HealthMonitor>,
    clients: BTreeMap<u64, PeerHealthClient<Channel>>,
    names: BTreeMap<u64, String>,
    metrics: Arc<Metrics>,
}

impl Health {
    /// `peers`: every other member's id, name and peer address (`host:port`).
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        name: String,
        peers: &BTreeMap<u64, (String, String)>,
        config: chorus_core::health::HealthConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Health> {
        let mut clients = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (&id, (peer_name, addr)) in peers {
            if id == member_id {
                continue;
            }
            names.insert(id, peer_name.clone());
            if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
                let endpoint = endpoint
                    .connect_timeout(Duration::from_millis(config.probe_timeout_ms))
                    .tcp_nodelay(true);
                clients.insert(id, PeerHealthClient::new(endpoint.connect_lazy()));
            }
        }
        let monitor = HealthMonitor::new(member_id, names.keys().copied(), config, 0);
        Arc::new(Health {
            cluster_id,
            member_id,
            name,
            started: Instant::now(),
            monitor: Mutex::new(monitor),
            clients,
            names,
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn peer_name(&self, id: u64) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| format!("{id:016x}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthMonitor> {
        self.monitor.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Performs effects: calls go out as tasks; changes are logged and counted.
    fn perform(self: &Arc<Self>, effects: Vec<HealthEffect>) {
        for effect in effects {
            match effect {
                HealthEffect::SendPing { to, ping } => self.spawn_ping(to, ping),
                HealthEffect::AskProbe { helper, target, round } => self.spawn_probe(helper, target, round),
                HealthEffect::DiagnosisChanged { peer, from, to, phi } => {
                    let peer_name = self.peer_name(peer);
                    tracing::warn!(
                        member = %self.name,
                        peer = %peer_name,
                        from = from.as_str(),
                        to = to.as_str(),
                        phi = format!("{phi:.2}"),
                        "peer diagnosis changed"
                    );
                    self.metrics
                        .peer_diagnosis_changes
                        .get_or_create(&vec![
                            ("peer".to_string(), peer_name),
                            ("diagnosis".to_string(), to.as_str().to_string()),
                        ])
                        .inc();
                }
                HealthEffect::ClockAlarm { peer, offset, raised } => {
                    let skew = self.lock().config().max_clock_skew_ms;
                    if raised {
                        tracing::warn!(
                            member = %self.name,
                            peer = %self.peer_name(peer),
                            offset_ms = format!("{:.1}", offset.offset_ms),
                            bound_ms = format!("{:.1}", offset.bound_ms),
                            max_clock_skew_ms = skew,
                            "clock skew alarm raised"
                        );
                    } else {
                        tracing::info!(
                            member = %self.name,
                            peer = %self.peer_name(peer),
                            offset_ms = format!("{:.1}", offset.offset_ms),
                            bound_ms = format!("{:.1}", offset.bound_ms),
                            "clock skew alarm cleared"
                        );
                    }
                }
            }
        }
    }

    fn spawn_ping(self: &Arc<Self>, to: u64, ping: Ping) {
        let Some(mut client) = self.clients.get(&to).cloned() else { return };
        let health = self.clone();
        let timeout = Duration::from_millis(self.lock().config().probe_timeout_ms);
        let request = pb::Ping {
            cluster_id: self.cluster_id,
            from_id: self.member_id,
            to_id: to,
            seq: ping.seq,
            sent_mono_ms: ping.sent_mono_ms,
            sent_wall_ms: ping.sent_wall_ms,
        };
        tokio::spawn(async move {
            let mut request = Request::new(request);
            request.set_timeout(timeout);
            let Ok(Ok(pong)) = tokio::time::timeout(timeout, client.ping(request)).await else { return };
            let pong = pong.into_inner();
            if pong.from_id != to {
                return;
            }
            let pong = Pong {
                seq: pong.seq,
                sent_mono_ms: pong.sent_mono_ms,
                sent_wall_ms: pong.sent_wall_ms,
                reply_wall_ms: pong.reply_wall_ms,
            };
            let now = health.now_ms();
            let effects = health.lock().on_pong(to, &pong, now);
            health.perform(effects);
        });
    }

    fn spawn_probe(self: &Arc<Self>, helper: u64, target: u64, round: u64) {
        let health = self.clone();
        let client = self.clients.get(&helper).cloned();
        let timeout_ms = self.lock().config().probe_timeout_ms;
        let request = pb::ProbeRequest {
            cluster_id: self.cluster_id,
            from_id: self.member_id,
            target_id: target,
            // The helper gets most of our budget; the rest covers the way back.
            timeout_ms: timeout_ms * 3 / 4,
        };
        tokio::spawn(async move {
            let reached = match client {
                Some(mut client) => {
                    let call = client.probe(request);
                    matches!(
                        tokio::time::timeout(Duration::from_millis(timeout_ms), call).await,
                        Ok(Ok(response)) if response.get_ref().reached
                    )
                }
                None => false,
            };
            let now = health.now_ms();
            let effects = health.lock().on_probe_result(helper, target, round, reached, now);
            health.perform(effects);
        });
    }

    fn update_metrics(&self, now_ms: u64) {
        let (reports, alarms) = {
            let monitor = self.lock();
            let reports = monitor.report(now_ms);
            let alarms = reports.iter().filter(|r| r.clock_alarm).count();
            (reports, alarms)
        };
        let m = &self.metrics;
        m.clock_skew_alarms.set(alarms as i64);
        for report in reports {
            let peer = vec![("peer".to_string(), self.peer_name(report.peer))];
            m.peer_phi.get_or_create(&peer).set(report.phi);
            if let Some(rtt) = report.rtt_ms_p50 {
                m.peer_rtt_p50.get_or_create(&peer).set(rtt);
            }
            if let Some(clock) = report.clock {
                m.peer_clock_offset.get_or_create(&peer).set(clock.offset_ms);
                m.peer_clock_offset_bound.get_or_create(&peer).set(clock.bound_ms);
            }
            for diagnosis in ALL_DIAGNOSES {
                let mut labels = peer.clone();
                labels.push(("diagnosis".to_string(), diagnosis.as_str().to_string()));
                m.peer_diagnosis.get_or_create(&labels).set(i64::from(report.diagnosis == diagnosis));
            }
        }
    }
}

const ALL_DIAGNOSES: [Diagnosis; 5] =
    [Diagnosis::Healthy, Diagnosis::Slow, Diagnosis::Suspected, Diagnosis::LinkFailure, Diagnosis::NodeDown];

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Ticks the monitor until `stop` turns true.
pub async fn run(health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(Duration::from_millis(TICK_MS));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks_count = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let now = health.now_ms();
        let effects = health.lock().on_tick(now, wall_ms());
        health.perform(effects);
        ticks_count += 1;
        if ticks_count.is_multiple_of(10) {
            health.update_metrics(now);
        }
    }
}

/// `chorus.v1.PeerHealth`: answers pings and indirect probes from peers.
pub struct PeerHealthService {
    health: Arc<Health>,
}

impl PeerHealthService {
    pub fn new_server(health: Arc<Health>) -> PeerHealthServer<PeerHealthService> {
        PeerHealthServer::new(PeerHealthService { health })
    }

    fn check_cluster(&self, cluster_id: u64) -> Result<(), Status> {
        if cluster_id != self.health.cluster_id {
            return Err(Status::failed_precondition(format!(
                "peer belongs to cluster {cluster_id:016x}, this member to {:016x}",
                self.health.cluster_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl PeerHealth for PeerHealthService {
    async fn ping(&self, request: Request<pb::Ping>) -> Result<Response<pb::Pong>, Status> {
        let ping = request.into_inner();
        self.check_cluster(ping.cluster_id)?;
        if ping.to_id != self.health.member_id {
            return Err(Status::failed_precondition(format!(
                "ping is for member {:016x}, this is {:016x}",
                ping.to_id, self.health.member_id
            )));
        }
        let core_ping =
            Ping { seq: ping.seq, sent_mono_ms: ping.sent_mono_ms, sent_wall_ms: ping.sent_wall_ms };
        let pong = answer_ping(&core_ping, wall_ms());
        Ok(Response::new(pb::Pong {
            from_id: self.health.member_id,
            seq: pong.seq,
            sent_mono_ms: pong.sent_mono_ms,
            sent_wall_ms: pong.sent_wall_ms,
            reply_wall_ms: pong.reply_wall_ms,
        }))
    }

    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let probe = request.into_inner();
        self.check_cluster(probe.cluster_id)?;
        let limit_ms = self.health.lock().config().probe_timeout_ms;
        let timeout = Duration::from_millis(probe.timeout_ms.clamp(1, limit_ms));
        let Some(mut client) = self.health.clients.get(&probe.target_id).cloned() else {
            return Err(Status::invalid_argument(format!(
                "{:016x} is not a peer of this member",
                probe.target_id
            )));
        };
        let ping = pb::Ping {
            cluster_id: self.health.cluster_id,
            from_id: self.health.member_id,
            to_id: probe.target_id,
            seq: 0,
            sent_mono_ms: self.health.now_ms(),
            sent_wall_ms: wall_ms(),
        };
        let started = Instant::now();
        let reached = matches!(tokio::time::timeout(timeout, client.ping(ping)).await, Ok(Ok(_)));
        let rtt_ms = if reached { started.elapsed().as_secs_f64() * 1000.0 } else { 0.0 };
        Ok(Response::new(pb::ProbeResponse { reached, rtt_ms }))
    }
}

/// `chorus.v1.Diagnostics`: this member's view of its peers and its Raft state.
pub struct DiagnosticsService {
    health: Arc<Health>,
    node: NodeHandle,
}

impl DiagnosticsService {
    pub fn new_server(health: Arc<Health>, node: NodeHandle) -> DiagnosticsServer<DiagnosticsService> {
        DiagnosticsServer::new(DiagnosticsService { health, node })
    }
}

#[tonic::async_trait]
impl Diagnostics for DiagnosticsService {
    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let now = self.health.now_ms();
        let (reports, config) = {
            let monitor = self.health.lock();
            (monitor.report(now), monitor.config().clone())
        };
        let peers = reports
            .into_iter()
            .map(|report| pb::PeerHealthReport {
                peer_id: report.peer,
                peer_name: self.health.peer_name(report.peer),
                diagnosis: report.diagnosis.as_str().to_string(),
                reachable: report.diagnosis.is_reachable(),
                phi: report.phi,
                has_rtt: report.rtt_ms_p50.is_some(),
                rtt_ms_p50: report.rtt_ms_p50.unwrap_or(0.0),
                rtt_ms_p99: report.rtt_ms_p99.unwrap_or(0.0),
                has_clock_offset: report.clock.is_some(),
                clock_offset_ms: report.clock.map_or(0.0, |c| c.offset_ms),
                clock_offset_bound_ms: report.clock.map_or(0.0, |c| c.bound_ms),
                clock_alarm: report.clock_alarm,
                last_heard_ms_ago: report.last_heard_ms_ago,
            })
            .collect();
        let mut response = pb::HealthResponse {
            member_id: self.health.member_id,
            name: self.health.name.clone(),
            raft_role: "unknown".into(),
            peers,
            max_clock_skew_ms: config.max_clock_skew_ms,
            phi_threshold: config.phi_threshold,
            ..Default::default()
        };
        // The peers' view is answered even when the driver is too busy to say its
        // Raft state in time: that is when an operator needs it most.
        if let Ok(Ok(status)) = tokio::time::timeout(STATUS_WAIT, self.node.status()).await {
            let raft = status.node;
            response.raft_role = match raft.role {
                raft::StateRole::Leader => "leader",
                raft::StateRole::Follower => "follower",
                raft::StateRole::Candidate => "candidate",
                raft::StateRole::PreCandidate => "pre-candidate",
            }
            .into();
            response.raft_term = raft.term;
            response.leader_id = raft.leader_id;
            response.commit_index = raft.commit_index;
            response.applied_index = raft.applied_index;
        }
        Ok(Response::new(response))
    }
}
