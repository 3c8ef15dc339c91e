//! Log compaction, snapshots between members, and backups, with real processes.
//!
//! - A member killed while the others take 50,000 writes and compact their logs
//!   comes back, is caught up by a snapshot (its log says so), and ends with the
//!   same key space, record for record, as the leader.
//! - A backup saved with `chorus snapshot save` while a load runs, checked with
//!   `chorus snapshot status`, and restored into a fresh three-member cluster holds
//!   exactly the key space the old cluster had at the backup's revision.
//! - A backup taken right after a put holds it, though database writes may wait.
//! - `etcdctl snapshot save` gets the same backup format; a damaged backup is
//!   refused by status and restore, and restore never writes into a used directory.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Cluster;
use etcd_client::GetOptions;

/// Every record of the key space as member `i` holds it (serializable read at
/// `revision`, 0 = current): key, value, create and mod revision, version, lease.
async fn key_space(
    cluster: &Cluster,
    i: usize,
    revision: i64,
) -> Vec<(Vec<u8>, Vec<u8>, i64, i64, i64, i64)> {
    let mut client = cluster.client_of(i).await;
    let options = GetOptions::new().with_all_keys().with_serializable().with_revision(revision);
    let response = client.get(vec![0u8], Some(options)).await.expect("serializable range of every key");
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

/// `Maintenance.HashKV` of member `i` at `revision`.
async fn hash_kv(cluster: &Cluster, i: usize, revision: i64) -> u32 {
    let client = cluster.client_of(i).await;
    client.maintenance_client().hash_kv(revision).await.expect("hashkv").hash()
}

/// `etcdctl endpoint hashkv` of every member: (endpoint, hash) pairs.
fn etcdctl_hashkv(cluster: &Cluster, revision: i64) -> Vec<(String, u64)> {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &cluster.endpoints().join(","), "endpoint", "hashkv", "-w", "json"])
        .args(["--rev", &revision.to_string()])
        .output()
        .expect("run etcdctl");
    assert!(output.status.success(), "etcdctl endpoint hashkv: {}", String::from_utf8_lossy(&output.stderr));
    let answers: serde_json::Value = serde_json::from_slice(&output.stdout).expect("hashkv json");
    answers
        .as_array()
        .expect("one answer per endpoint")
        .iter()
        .map(|a| (a["Endpoint"].as_str().unwrap().to_string(), a["HashKV"]["hash"].as_u64().unwrap()))
        .collect()
}

fn chorus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chorus")).args(args).output().expect("run chorus")
}

fn bench_put(endpoints: &str, total: u64, prefix: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["bench", "put", "--clients", "32", "--conns", "4", "--key-space", "5000"])
        .args(["--total", &total.to_string(), "--duration-max", "240s", "--key-prefix", prefix])
        .args(["--endpoints", endpoints, "-w", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn chorus bench")
}

async fn wait_revision(cluster: &Cluster, i: usize, revision: i64, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = common::status_of(&cluster.endpoint(i)).await {
            if status.header().map_or(0, |h| h.revision()) >= revision {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.dump_logs();
    panic!("member {i} did not reach revision {revision} within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_away_during_50000_writes_is_caught_up_by_a_snapshot() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "2000", "--snapshot-catchup-entries", "500"]);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let away = (leader + 1) % 3;
    common::wait_members_published(&cluster, Duration::from_secs(10)).await;
    cluster.kill(away);
    let others: Vec<String> = (0..3).filter(|i| *i != away).map(|i| cluster.endpoint(i)).collect();
    let started = Instant::now();
    let bench = bench_put(&others.join(","), 50_000, "away/").wait_with_output().expect("bench runs");
    assert!(bench.status.success(), "bench failed: {}", String::from_utf8_lossy(&bench.stdout));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench json");
    let errors = report["errors"].as_u64().unwrap_or(0);
    assert_eq!(errors, 0, "bench report: {report}");
    assert_eq!(report["ops"].as_u64(), Some(50_000), "bench report: {report}");
    eprintln!("50,000 puts with one member away in {:?}", started.elapsed());

    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let leader_status = common::status_of(&cluster.endpoint(leader)).await.expect("leader status");
    let revision = leader_status.header().unwrap().revision();
    assert!(revision > 50_000, "revision {revision} after 50,000 puts");

    let back = Instant::now();
    cluster.restart(away);
    wait_revision(&cluster, away, revision, Duration::from_secs(60)).await;
    eprintln!("member caught up to revision {revision} in {:?}", back.elapsed());
    let log = std::fs::read_to_string(&cluster.members[away].log_path).unwrap();
    assert!(log.contains("received a snapshot"), "the member was not caught up by a snapshot");
    let leader_log = std::fs::read_to_string(&cluster.members[leader].log_path).unwrap();
    let sent = leader_log.lines().rfind(|l| l.contains("sent a snapshot")).unwrap_or_default();
    eprintln!("leader: {sent}");

    let expected = key_space(&cluster, leader, revision).await;
    assert_eq!(expected.len(), 5000, "every key of the key space was written");
    let caught_up = key_space(&cluster, away, revision).await;
    assert!(caught_up == expected, "the member caught up by a snapshot holds a different key space");
    let leader_hash = hash_kv(&cluster, leader, revision).await;
    assert_eq!(hash_kv(&cluster, away, revision).await, leader_hash, "HashKV of the caught-up member");
    let hashes = etcdctl_hashkv(&cluster, revision);
    assert_eq!(hashes.len(), 3);
    assert!(
        hashes.iter().all(|(_, hash)| *hash == leader_hash as u64),
        "etcdctl endpoint hashkv: {hashes:?}"
    );

    // It keeps up from the log afterwards, and survives a restart from its
    // compacted log (the snapshot was installed durably).
    let mut client = cluster.client().await;
    client.put("after", "snapshot", None).await.expect("put after the catch-up");
    cluster.kill(away);
    cluster.restart(away);
    wait_revision(&cluster, away, revision + 1, Duration::from_secs(30)).await;
    let mut local = cluster.client_of(away).await;
    let after = local.get("after", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(after.kvs()[0].value(), b"snapshot");
}

/// A member may let the database writes of a few cycles wait, for up to a tick
/// (here 400 ms); a backup still holds every write acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_every_write_acknowledged_before_it() {
    let cluster = Cluster::start(3, &["--heartbeat-interval", "400", "--election-timeout", "4000"]);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut client = cluster.client_of(leader).await;
    let file = cluster.dir.path().join("just-after.snap");
    for round in 0..3 {
        let put = client.put(format!("round{round}"), "value", None).await.expect("put");
        let revision = put.header().expect("header").revision();
        let _ = std::fs::remove_file(&file);
        let saved = chorus(&[
            "snapshot",
            "save",
            file.to_str().unwrap(),
            "--endpoints",
            &cluster.endpoint(leader),
            "-w",
            "json",
        ]);
        assert!(saved.status.success(), "save failed: {}", String::from_utf8_lossy(&saved.stderr));
        let saved: serde_json::Value = serde_json::from_slice(&saved.stdout).expect("save json");
        assert_eq!(saved["revision"].as_i64(), Some(revision), "round {round}: {saved}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_saved_under_load_restores_into_a_new_cluster() {
    let cluster = Cluster::start(3, &["--snapshot-count", "1000", "--snapshot-catchup-entries", "100"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut client = cluster.client().await;
    let lease = client.lease_grant(3600, None).await.expect("grant").id();
    let with_lease = etcd_client::PutOptions::new().with_lease(lease);
    client.put("leased", "value", Some(with_lease)).await.expect("leased put");
    let load = bench_put(&cluster.endpoints().join(","), 20_000, "load/");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let file = cluster.dir.path().join("backup.snap");
    let file_arg = file.to_str().unwrap();
    let saved = chorus(&["snapshot", "save", file_arg, "--endpoints", &cluster.endpoint(0), "-w", "json"]);
    assert!(saved.status.success(), "save failed: {}", String::from_utf8_lossy(&saved.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&saved.stdout).expect("save json");
    let revision = saved["revision"].as_i64().expect("revision");
    let load = load.wait_with_output().expect("bench ends");
    assert!(load.status.success());
    eprintln!("saved {saved}");

    let status = chorus(&["snapshot", "status", file_arg, "-w", "json"]);
    assert!(status.status.success(), "status failed: {}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["revision"].as_i64(), Some(revision), "status: {status}");
    assert_eq!(status["totalSize"].as_u64(), Some(std::fs::metadata(&file).unwrap().len()));
    let expected = key_space(&cluster, 0, revision).await;
    let expected_hash = hash_kv(&cluster, 0, revision).await;
    assert_eq!(status["totalKey"].as_u64(), Some(expected.len() as u64));
    assert!(expected.len() > 100, "the backup was taken under load: {} keys", expected.len());

    // Restore into three fresh data directories with a new membership.
    let restored = Cluster::prepare(3);
    for i in 0..3 {
        let member = &restored.members[i];
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let output = chorus(&[
            "snapshot",
            "restore",
            file_arg,
            "--data-dir",
            member.data_dir.to_str().unwrap(),
            "--name",
            &member.name,
            "--initial-cluster",
            &restored.initial_cluster(),
            "--initial-cluster-token",
            "chorus-test",
            "--initial-advertise-peer-urls",
            &peer_url,
        ]);
        assert!(output.status.success(), "restore failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    // A second restore into a used directory is refused and writes nothing.
    let again = chorus(&[
        "snapshot",
        "restore",
        file_arg,
        "--data-dir",
        restored.members[0].data_dir.to_str().unwrap(),
        "--name",
        "m1",
        "--initial-cluster",
        &restored.initial_cluster(),
        "--initial-cluster-token",
        "chorus-test",
        "--initial-advertise-peer-urls",
        &format!("http://127.0.0.1:{}", restored.members[0].peer_port),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));

    let mut restored = restored;
    for i in 0..3 {
        restored.restart(i);
    }
    restored.wait_leader(Duration::from_secs(15)).await;
    for i in 0..3 {
        wait_revision(&restored, i, revision, Duration::from_secs(15)).await;
        let holds = key_space(&restored, i, 0).await;
        assert!(
            holds == expected,
            "restored member {i} holds a different key space than the backup's revision"
        );
        assert_eq!(hash_kv(&restored, i, revision).await, expected_hash, "HashKV of restored member {i}");
    }
    // The lease came along, and the new cluster takes writes.
    let mut new_client = restored.client().await;
    let ttl = new_client.lease_time_to_live(lease, None).await.expect("lease time to live");
    assert!(ttl.ttl() > 0, "the restored lease is alive: {ttl:?}");
    let put = new_client.put("new", "cluster", None).await.expect("put into the restored cluster");
    assert_eq!(put.header().unwrap().revision(), revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_and_damaged_backups() {
    let cluster = Cluster::start(1, &[]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut client = cluster.client().await;
    for i in 0..50 {
        client.put(format!("k{i:02}"), format!("v{i}"), None).await.unwrap();
    }
    let file = cluster.dir.path().join("etcdctl.snap");
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &cluster.endpoint(0), "snapshot", "save"])
        .arg(&file)
        .output()
        .expect("run etcdctl");
    assert!(output.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&output.stderr));
    let status = chorus(&["snapshot", "status", file.to_str().unwrap()]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let line = String::from_utf8_lossy(&status.stdout).to_string();
    let fields: Vec<&str> = line.trim().split(", ").collect();
    assert_eq!(fields[1], "51", "revision in {line:?}");
    assert_eq!(fields[2], "50", "key count in {line:?}");

    // HashKV at a revision not reached yet, or compacted away, is refused as etcd does.
    let mut maintenance = client.maintenance_client();
    let future = maintenance.hash_kv(1000).await.expect_err("a future revision");
    assert!(future.to_string().contains("required revision is a future revision"), "{future}");
    client.compact(40, None).await.expect("compact");
    let compacted = maintenance.hash_kv(20).await.expect_err("a compacted revision");
    assert!(compacted.to_string().contains("required revision has been compacted"), "{compacted}");
    let at_compaction = maintenance.hash_kv(40).await.expect("hashkv at the compact revision");
    assert_eq!(at_compaction.compact_version(), 40);

    // One flipped byte: status and restore both refuse it, and restore writes nothing.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let damaged = cluster.dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).unwrap();
    let status = chorus(&["snapshot", "status", damaged.to_str().unwrap()]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("SHA-256 does not match"));
    let target = cluster.dir.path().join("restore-target");
    let restore =
        chorus(&["snapshot", "restore", damaged.to_str().unwrap(), "--data-dir", target.to_str().unwrap()]);
    assert!(!restore.status.success());
    assert!(String::from_utf8_lossy(&restore.stderr).contains("SHA-256 does not match"));
    assert!(!target.exists(), "a refused restore created its data directory");
}
