//! `chorus bench` against a real etcd (Debian's `etcd-server`, installed by `.ci/run`): the
//! load generator must work unchanged against the system it is compared with. Every workload
//! that opens a stream, and `--key-prefix`, are checked against one etcd member.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long etcd has to start and take a write.
const READY_LIMIT: Duration = Duration::from_secs(30);

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn chorus(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["--endpoints", endpoint])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Starts a one-member etcd on free loopback ports and waits until it takes a write.
fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let child = Command::new("etcd")
        .args(["--name", "e1", "--data-dir"])
        .arg(dir.path().join("e1"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("e1={peer_url}"), "--logger", "zap", "--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian's etcd-server, installed by .ci/run) must be on PATH");
    let etcd = Etcd { child, endpoint: format!("127.0.0.1:{client_port}"), _dir: dir };
    let started = Instant::now();
    while started.elapsed() < READY_LIMIT {
        if chorus(&etcd.endpoint, &["put", "ready", "1"]).status.success() {
            return etcd;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("etcd did not take a write within {READY_LIMIT:?}");
}

/// Runs `chorus -w json bench ARGS` and returns its JSON rows, failing on a non-zero exit.
fn bench(endpoint: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut argv = vec!["-w", "json", "bench"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--duration-max", "30s"]);
    let output = chorus(endpoint, &argv);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chorus bench {args:?} against etcd failed: {stderr}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn bench_runs_every_stream_workload_and_key_prefix_against_etcd() {
    let etcd = start_etcd();

    // Keep-alive: grpc-go sends the stream's headers only with its first answer, so a client
    // that waits for them before sending its first keep-alive waits forever.
    let rows = bench(&etcd.endpoint, &["lease-keepalive", "--clients", "4", "--total", "40"]);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0]["ops"].as_u64(), rows[0]["errors"].as_u64()), (Some(40), Some(0)), "{rows:?}");

    let rows = bench(&etcd.endpoint, &["watch", "--clients", "3", "--total", "10"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!((row["ops"].as_u64(), row["errors"].as_u64()), (Some(30), Some(0)), "{rows:?}");
    }

    // --key-prefix: every key the run wrote, and only those, are under the prefix.
    let args = ["put", "--key-prefix", "cmp/r1/", "--key-space", "10", "--sequential-keys", "--total", "10"];
    let rows = bench(&etcd.endpoint, &args);
    assert_eq!(rows[0]["ops"].as_u64(), Some(10), "{rows:?}");
    let listed = chorus(&etcd.endpoint, &["get", "cmp/", "--prefix", "--keys-only"]);
    let keys: Vec<String> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 10, "{keys:?}");
    assert!(keys.iter().all(|key| key.starts_with("cmp/r1/") && key.len() == 32), "{keys:?}");
}
