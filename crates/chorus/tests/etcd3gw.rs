//! Python's etcd3gw (a grpc-gateway client, used by OpenStack) against a real chorus
//! member: put, get, prefix get, delete, leases with keys and expiry, watches on a key
//! and a prefix, and etcd3gw's locks (KV txns on leases). The checks are in
//! `etcd3gw_check.py`.
//!
//! The Python with etcd3gw installed is `$CHORUS_PYTHON`, or else the venv `.ci/run`
//! makes at `target/py-venv`. If neither works the test fails, saying so: it never skips.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

fn python() -> PathBuf {
    if let Ok(python) = std::env::var("CHORUS_PYTHON") {
        return PathBuf::from(python);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/py-venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd3gw_works_against_chorus() {
    let python = python();
    let probe = Command::new(&python).args(["-c", "import etcd3gw"]).output();
    match probe {
        Ok(output) if output.status.success() => {}
        other => panic!(
            "this test needs Python with etcd3gw at {} (or $CHORUS_PYTHON); `.ci/run` installs it \
             (python3 -m venv target/py-venv && target/py-venv/bin/pip install etcd3gw): {other:?}",
            python.display()
        ),
    }
    let cluster = common::Cluster::start(1, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/etcd3gw_check.py");
    let started = Instant::now();
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("127.0.0.1")
        .arg(cluster.members[0].client_port.to_string())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("etcd3gw checks finish within 120 s")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("etcd3gw checks took {} ms\n{stdout}{stderr}", started.elapsed().as_millis());
    if !output.status.success() {
        cluster.dump_logs();
    }
    assert!(output.status.success(), "etcd3gw checks failed: {}", output.status);
    assert!(stdout.contains("etcd3gw: all checks passed"), "{stdout}");
}
