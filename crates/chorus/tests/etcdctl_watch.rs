//! `etcdctl watch` (Debian's etcd-client) against a real chorus cluster: history
//! from a revision with previous values, then live events, printed as etcd prints them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Cluster;

fn etcdctl() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|candidate| candidate.is_file())
        .expect("etcdctl is not on PATH: apt-get install etcd-client (CI installs it)")
}

fn run(endpoints: &str, args: &[&str]) -> String {
    let output = Command::new(etcdctl())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoints, "--command-timeout", "5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(output.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prefix_from_a_revision_with_previous_values() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let all = cluster.endpoints().join(",");
    run(&all, &["put", "w/a", "1"]);
    run(&all, &["put", "w/a", "2"]);
    run(&all, &["put", "other", "x"]);

    // Watch on a follower from revision 1, with previous values.
    let mut child = Command::new(etcdctl())
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &cluster.endpoint(follower),
            "watch",
            "--prefix",
            "w/",
            "--rev",
            "1",
            "--prev-kv",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcdctl watch");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // A live delete after the history.
    std::thread::sleep(Duration::from_millis(500));
    run(&all, &["del", "w/a"]);

    let expected = ["PUT", "w/a", "1", "PUT", "w/a", "1", "w/a", "2", "DELETE", "w/a", "2", "w/a", ""];
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, expected, "etcdctl watch output");
}
