//! Failure detection, diagnostics, metrics and health endpoints on real processes:
//! a member paused with SIGSTOP is suspected by the others (the time it takes is
//! measured and printed) and healthy again after SIGCONT; `chorus cluster health`
//! answers within its timeouts with a member stopped; `/metrics` parses as
//! Prometheus text; `/livez`, `/readyz` and `/health` answer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use chorus_proto::chorus::v1::diagnostics_client::DiagnosticsClient;
use chorus_proto::chorus::v1::{HealthRequest, HealthResponse};
use common::{wait_members_published, Cluster};

/// A plain HTTP/1.1 GET on loopback: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (code, body.to_string())
}

async fn health_of(endpoint: &str) -> Option<HealthResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500));
    let call = async {
        let mut client = DiagnosticsClient::new(channel.connect().await.ok()?);
        client.health(HealthRequest {}).await.ok().map(|r| r.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(3), call).await.ok().flatten()
}

/// The diagnosis `observer` (a member index) gives the member named `peer`.
async fn diagnosis(cluster: &Cluster, observer: usize, peer: &str) -> Option<String> {
    let health = health_of(&cluster.endpoint(observer)).await?;
    health.peers.iter().find(|p| p.peer_name == peer).map(|p| p.diagnosis.clone())
}

/// Polls until every member in `observers` gives `peer` one of `wanted`; returns the time it took.
async fn wait_diagnosis(
    cluster: &Cluster,
    observers: &[usize],
    peer: &str,
    wanted: &[&str],
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for &observer in observers {
            let seen = diagnosis(cluster, observer, peer).await;
            all &= seen.as_deref().is_some_and(|d| wanted.contains(&d));
        }
        if all {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            cluster.dump_logs();
            panic!("members {observers:?} did not diagnose {peer} as {wanted:?} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cluster_health_json(endpoints: &[String]) -> (Vec<serde_json::Value>, Duration) {
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["--endpoints", &endpoints.join(","), "--dial-timeout", "1s", "--command-timeout", "2s"])
        .args(["-w", "json", "cluster", "health"])
        .output()
        .expect("run chorus cluster health");
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<serde_json::Value> = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("cluster health -w json printed {text:?}: {e}"));
    (rows, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_is_suspected_and_recovers_and_metrics_parse() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    wait_members_published(&cluster, Duration::from_secs(20)).await;
    let mut client = cluster.client().await;
    for i in 0..20 {
        client.put(format!("k{i}"), "v", None).await.expect("put");
    }
    let names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
    for (i, name) in names.iter().enumerate() {
        let others: Vec<usize> = (0..3).filter(|&j| j != i).collect();
        wait_diagnosis(&cluster, &others, name, &["healthy"], Duration::from_secs(15)).await;
    }

    // `chorus cluster health -w json`: one object per (node, peer), all healthy.
    let (rows, _) = cluster_health_json(&cluster.endpoints()[..1]);
    assert_eq!(rows.len(), 6, "{rows:?}");
    for row in &rows {
        assert_eq!(row["diagnosis"], "healthy", "{row}");
        assert!(row["phi"].as_f64().unwrap() < 8.0);
        for field in ["rtt_ms_p50", "rtt_ms_p99", "clock_offset_ms", "clock_offset_bound_ms"] {
            assert!(row[field].as_f64().is_some(), "{field} in {row}");
        }
        assert!(
            row["clock_offset_ms"].as_f64().unwrap().abs()
                <= row["clock_offset_bound_ms"].as_f64().unwrap() + 50.0
        );
    }

    // The gauges are refreshed every heartbeat interval: wait (bounded) for the puts.
    let start = Instant::now();
    while !http_get(cluster.members[leader].metrics_port, "/metrics").1.lines().any(|l| {
        l.strip_prefix("chorus_raft_applied_index ")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 20.0)
    }) {
        assert!(start.elapsed() < Duration::from_secs(10), "applied index gauge never reached 20");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_metrics_and_health_endpoints(&cluster, leader);

    // SIGSTOP a follower: the other two suspect it (or find it down).
    let paused = (0..3).find(|&i| i != leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != paused).collect();
    cluster.signal(paused, "STOP");
    let detected = wait_diagnosis(
        &cluster,
        &others,
        &names[paused],
        &["suspected", "node-down"],
        Duration::from_secs(20),
    )
    .await;
    println!("detection after SIGSTOP: {} ms (both other members)", detected.as_millis());
    let down =
        wait_diagnosis(&cluster, &others, &names[paused], &["node-down"], Duration::from_secs(20)).await;
    println!("node-down after SIGSTOP: {} ms more", down.as_millis());

    // The CLI reports the stopped member without hanging.
    let (rows, elapsed) = cluster_health_json(&cluster.endpoints());
    println!("chorus cluster health with a stopped member took {} ms", elapsed.as_millis());
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    let stopped_endpoint = cluster.endpoint(paused);
    assert!(
        rows.iter().any(|r| r["node_reachable"] == false
            && r["node"] == names[paused].as_str()
            && r["endpoint"].as_str().unwrap().contains(&stopped_endpoint)),
        "{rows:?}"
    );
    assert!(rows.iter().any(|r| r["peer"] == names[paused].as_str() && r["diagnosis"] == "node-down"));

    cluster.signal(paused, "CONT");
    let recovered =
        wait_diagnosis(&cluster, &others, &names[paused], &["healthy", "slow"], Duration::from_secs(20))
            .await;
    println!("healthy again {} ms after SIGCONT", recovered.as_millis());
    let log = std::fs::read_to_string(&cluster.members[others[0]].log_path).unwrap();
    assert!(log.contains("peer diagnosis changed"), "no diagnosis-change log line");
}

fn check_metrics_and_health_endpoints(cluster: &Cluster, leader: usize) {
    let port = cluster.members[leader].metrics_port;
    let (code, text) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str| -> Vec<f64> {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .collect()
    };
    assert!(value("chorus_raft_term")[0] >= 1.0);
    assert_eq!(value("chorus_raft_is_leader"), vec![1.0]);
    assert!(value("chorus_raft_leader_changes_total")[0] >= 1.0);
    assert_eq!(value("chorus_proposals_failed_total").len(), 1);
    // Proposals are counted where the client sent them: 20 puts, over the members.
    let committed: f64 = cluster
        .members
        .iter()
        .map(|m| {
            let (_, text) = http_get(m.metrics_port, "/metrics");
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
            let sample = scrape.samples.iter().find(|s| s.metric == "chorus_proposals_committed_total");
            match sample.map(|s| &s.value) {
                Some(prometheus_parse::Value::Counter(v)) | Some(prometheus_parse::Value::Untyped(v)) => *v,
                other => panic!("proposals committed: {other:?}"),
            }
        })
        .sum();
    assert!(committed >= 20.0, "{committed} proposals committed");
    assert!(value("chorus_raft_applied_index")[0] >= 20.0);
    assert!(value("chorus_db_size_bytes")[0] > 0.0);
    let phis = value("chorus_peer_phi");
    assert_eq!(phis.len(), 2, "one phi per peer");
    assert!(phis.iter().all(|&phi| (0.0..8.0).contains(&phi)), "{phis:?}");
    assert_eq!(value("chorus_peer_clock_offset_ms").len(), 2);
    let fsync = scrape
        .samples
        .iter()
        .find(|s| s.metric == "chorus_disk_wal_fsync_duration_seconds")
        .expect("fsync histogram");
    match &fsync.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.last().unwrap().count >= 20.0, "{buckets:?}")
        }
        other => panic!("fsync duration is not a histogram: {other:?}"),
    }
    assert!(
        scrape.samples.iter().any(|s| s.metric == "chorus_grpc_request_duration_seconds"
            && s.labels.get("method") == Some("etcdserverpb.KV/Put")),
        "no Put latency histogram"
    );
    // The process's own metrics, under the names every Prometheus client exports.
    assert!(value("process_resident_memory_bytes")[0] > 1_000_000.0);
    assert!(value("process_cpu_seconds_total")[0] > 0.0);
    assert!(value("process_open_fds")[0] >= 3.0);
    assert!(value("process_start_time_seconds")[0] > 1.6e9);
    // etcd serves /metrics on its client port too (`etcdctl check datascale` reads
    // process_resident_memory_bytes there), and so does chorus.
    let client_port = cluster.members[leader].client_port;
    let (code, text) = http_get(client_port, "/metrics");
    assert_eq!(code, 200);
    assert!(text.lines().any(|l| l.starts_with("process_resident_memory_bytes ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("chorus_raft_term ")), "{text}");
    assert_eq!(http_get(client_port, "/readyz"), (200, "ok".to_string()));
    assert_eq!(http_get(client_port, "/livez"), (200, "ok".to_string()));

    assert_eq!(http_get(port, "/livez"), (200, "ok".to_string()));
    assert_eq!(http_get(port, "/readyz"), (200, "ok".to_string()));
    let (code, body) = http_get(port, "/health");
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health, serde_json::json!({"health": "true", "reason": ""}));
    assert_eq!(http_get(port, "/nothing").0, 404);
}

/// A member's `chorus_busy_polls_total` counters: (polls that took an input,
/// polls that ended in sleep).
fn busy_polls(port: u16) -> (u64, u64) {
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    let count = |result: &str| {
        let prefix = format!("chorus_busy_polls_total{{result=\"{result}\"}} ");
        body.lines().find_map(|line| line.strip_prefix(prefix.as_str())).map_or(0, |n| n.parse().unwrap())
    };
    (count("input"), count("timeout"))
}

/// `--busy-poll`: the consensus thread polls for input after replication work,
/// and only then. Under writes the leader's polls take inputs; then, with the
/// members idle for 3 s (ticks, heartbeats and the metrics' status questions every
/// 100 ms still arrive), no member starts a single poll. With `--busy-poll 0` no
/// member ever polls. A value past the limit is refused naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_polls_only_after_work() {
    for poll in ["1000", "0"] {
        let cluster = Cluster::start(3, &["--busy-poll", poll]);
        let leader = cluster.wait_leader(Duration::from_secs(20)).await;
        let mut client = cluster.client_of(leader).await;
        for i in 0..200 {
            client.put(format!("poll/{i}"), poll, None).await.unwrap();
        }
        let (leader_input, _) = busy_polls(cluster.members[leader].metrics_port);
        if poll == "0" {
            assert_eq!(leader_input, 0, "--busy-poll 0 polled");
        } else {
            assert!(leader_input > 0, "the leader never took an input by polling under writes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before: Vec<(u64, u64)> = cluster.members.iter().map(|m| busy_polls(m.metrics_port)).collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after: Vec<(u64, u64)> = cluster.members.iter().map(|m| busy_polls(m.metrics_port)).collect();
        assert_eq!(before, after, "--busy-poll {poll}: idle members polled");
    }
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--busy-poll", "100001"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "--busy-poll 100001 was accepted");
    assert!(stderr.contains("--busy-poll") && stderr.contains("0..=100000"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused flag created files");
}

#[test]
fn bad_failure_detector_flags_are_refused() {
    for (flag, value, expected) in [
        ("--phi-threshold", "0", "--phi-threshold must be above 0"),
        ("--phi-slow-threshold", "9", "--phi-slow-threshold must be above 0 and below --phi-threshold"),
        ("--phi-window", "1", "--phi-window must be between 2"),
        ("--health-heartbeat-interval", "0", "--health-heartbeat-interval must be between 1"),
        ("--probe-timeout", "5", "--probe-timeout must be between"),
        ("--max-clock-skew", "0", "--max-clock-skew must be at least 1 ms"),
        ("--listen-metrics-urls", "127.0.0.1:1", "must start with http://"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["serve", "--data-dir"])
            .arg(dir.path())
            .args([flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flag} {value} was accepted");
        assert!(stderr.contains(expected), "{flag} {value}: {stderr}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "{flag} {value} created files");
    }
}
