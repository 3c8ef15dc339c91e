//! Real processes on loopback: three `chorus serve` members, killed with SIGKILL
//! and restarted, checked through the `etcd-client` crate (a third-party client).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use etcd_client::{Client, GetOptions};

const KEYS_COUNT: usize = 1000;
const WRITERS_COUNT: usize = 8;

/// Puts `key`, retrying (bounded) while the cluster fails over. Returns whether the
/// put was acknowledged.
async fn put_with_retry(client: &mut Client, key: &str, value: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if client.put(key, value, None).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_load_new_leader_takes_writes_and_restarted_member_catches_up() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut writers = Vec::new();
    for w in 0..WRITERS_COUNT {
        let mut client = cluster.client().await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for k in (w..KEYS_COUNT).step_by(WRITERS_COUNT) {
                let (key, value) = (format!("load/{k:04}"), format!("value-{k}"));
                if put_with_retry(&mut client, &key, &value, deadline).await {
                    acked.lock().unwrap().insert(key, value);
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < KEYS_COUNT / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    cluster.kill(leader);
    let acked_at_kill = acked.lock().unwrap().len();
    // The first write acknowledged after the kill.
    let mut probe = cluster.client().await;
    assert!(put_with_retry(&mut probe, "probe", "after-kill", deadline).await, "no write after the kill");
    let failover = killed_at.elapsed();
    eprintln!("failover: first write {} ms after SIGKILL of the leader", failover.as_millis());
    let new_leader = cluster.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), KEYS_COUNT, "every write was acknowledged in the end");
    assert!(acked_at_kill < KEYS_COUNT, "the kill happened during the load");

    cluster.restart(leader);
    let leader_status = common::status_of(&cluster.endpoint(new_leader)).await.unwrap();
    cluster.wait_applied(leader, leader_status.raft_applied_index(), Duration::from_secs(30)).await;
    let mut ranges = Vec::new();
    for i in 0..3 {
        ranges.push(cluster.local_range(i, "load/").await);
    }
    let expected: Vec<(String, String)> = acked.into_iter().collect();
    for (i, range) in ranges.iter().enumerate() {
        assert_eq!(range, &expected, "member {i} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_sigkilled_during_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(3);
    let mut writers = Vec::new();
    for w in 0..WRITERS_COUNT {
        let mut client = cluster.client().await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..100_000u64 {
                if Instant::now() > stop {
                    break;
                }
                let (key, value) = (format!("crash/{w}/{n:06}"), format!("v{n}"));
                match client.put(key.as_str(), value.as_str(), None).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key, value);
                    }
                    Err(_) => break, // the cluster is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        cluster.kill(i);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "the load was running when the cluster died ({} acked)", acked.len());
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut client = cluster.client().await;
    let response = client.get("crash/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let stored: BTreeMap<String, String> = response
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
        .collect();
    let lost: Vec<&String> = acked.keys().filter(|k| stored.get(*k) != acked.get(*k)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), lost.first());
    eprintln!("whole-cluster crash: {} acknowledged writes, all present", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_quorum_answers_unavailable_within_the_request_timeout() {
    let mut cluster = Cluster::start(3, &["--request-timeout", "2000"]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut client = cluster.client_of(0).await;
    client.put("before", "ok", None).await.unwrap();
    cluster.kill(1);
    cluster.kill(2);
    for _ in 0..2 {
        let start = Instant::now();
        let error = client.put("after", "never", None).await.expect_err("a minority cannot write");
        let elapsed = start.elapsed();
        match &error {
            etcd_client::Error::GRpcStatus(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            }
            other => panic!("expected a gRPC status, got {other:?}"),
        }
        assert!(elapsed < Duration::from_millis(3500), "answered after {elapsed:?}");
        let start = Instant::now();
        let error = client.get("before", None).await.expect_err("a minority cannot read linearizably");
        assert!(
            matches!(&error, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable),
            "{error:?}"
        );
        assert!(start.elapsed() < Duration::from_millis(3500));
    }
    let local = client.get("before", Some(GetOptions::new().with_serializable())).await.unwrap();
    assert_eq!(local.kvs()[0].value(), b"ok", "serializable reads are still served locally");
}

/// A serializable get is answered by the member asked, from what it applied, with that
/// member's id, the cluster's id and term, and the revision of the state it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_reads_answer_from_the_member_asked_with_its_header() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut client = cluster.client().await;
    let put = client.put("serial/k", "v1", None).await.unwrap();
    let written = put.header().unwrap().revision();
    let linear = client.get("serial/k", None).await.unwrap();
    let (cluster_id, term) = (linear.header().unwrap().cluster_id(), linear.header().unwrap().raft_term());
    for i in 0..3 {
        let status = common::status_of(&cluster.endpoint(i)).await.expect("status");
        let member_id = status.header().unwrap().member_id();
        let mut local = cluster.client_of(i).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let response = loop {
            let response = local.get("serial/k", Some(GetOptions::new().with_serializable())).await.unwrap();
            if !response.kvs().is_empty() || Instant::now() > deadline {
                break response;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(response.kvs().len(), 1, "member {i} applied the put within 10 s");
        assert_eq!(response.kvs()[0].value(), b"v1");
        assert_eq!(response.kvs()[0].mod_revision(), written);
        let header = response.header().unwrap();
        assert_eq!(header.member_id(), member_id, "member {i} answers for itself");
        assert_eq!(header.cluster_id(), cluster_id);
        assert_eq!(header.raft_term(), term, "member {i}'s term");
        assert!(header.revision() >= written, "member {i}: header revision {}", header.revision());
        // A revision past the member's own is refused, as etcd refuses it.
        let future = local
            .get(
                "serial/k",
                Some(GetOptions::new().with_serializable().with_revision(header.revision() + 1000)),
            )
            .await
            .expect_err("a future revision");
        assert!(format!("{future:?}").contains("future revision"), "{future:?}");
    }
}

/// Linearizable reads on the followers, many at once, each see every write the
/// leader acknowledged before the read was sent: reads batched behind one read
/// index are released only once it is applied on the member asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_on_followers_see_every_write_acknowledged_before_them() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const WRITES: u64 = 400;
    const READERS: usize = 16;
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let acked = Arc::new(AtomicU64::new(0));
    let mut writer = cluster.client_of(leader).await;
    writer.put("linear/counter", "0", None).await.unwrap();
    let mut readers = Vec::new();
    for r in 0..READERS {
        let follower = (leader + 1 + r % 2) % 3;
        let mut client = cluster.client_of(follower).await;
        let acked = acked.clone();
        readers.push(tokio::spawn(async move {
            let (mut reads, mut stale) = (0u64, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let before = acked.load(Ordering::SeqCst);
                if before >= WRITES || Instant::now() > deadline {
                    break;
                }
                let response = client.get("linear/counter", None).await.expect("linearizable get");
                let seen: u64 = std::str::from_utf8(response.kvs()[0].value()).unwrap().parse().unwrap();
                if seen < before {
                    stale.push((follower, before, seen));
                }
                reads += 1;
            }
            (reads, stale)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 1..=WRITES {
        assert!(put_with_retry(&mut writer, "linear/counter", &n.to_string(), deadline).await);
        acked.store(n, Ordering::SeqCst);
    }
    let mut total = 0;
    for reader in readers {
        let (reads, stale) = reader.await.unwrap();
        assert!(stale.is_empty(), "stale linearizable reads (member, acknowledged, seen): {stale:?}");
        total += reads;
    }
    assert!(total >= WRITES, "readers ran alongside the writes: {total} reads");
    eprintln!("{total} linearizable reads on followers during {WRITES} writes, none stale");
}

/// The names of a process's threads, from /proc.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_sets_how_many_threads_serve_connections() {
    // tokio names its worker threads and its blocking-pool threads alike; two members
    // that did the same work have the same blocking threads, so the difference counts
    // workers.
    let mut runtime_threads = Vec::new();
    for threads in ["1", "3"] {
        let cluster = common::Cluster::start(1, &["--threads", threads]);
        cluster.wait_leader(Duration::from_secs(10)).await;
        let mut client = cluster.client().await;
        client.put("threads", threads, None).await.unwrap();
        let names = thread_names(cluster.pid(0));
        assert!(names.iter().any(|name| name.starts_with("chorus-driver")), "{names:?}");
        runtime_threads.push(names.iter().filter(|name| name.starts_with("tokio-")).count());
    }
    assert_eq!(runtime_threads[1] - runtime_threads[0], 2, "{runtime_threads:?}");
}

/// A follower stopped with SIGSTOP for longer than the raft links' timeouts
/// (`IDLE_TIMEOUT`, `TCP_USER_TIMEOUT`, both 5 s) while 4 KB puts pour in: the
/// leader's writes to it back up in its socket and then in the link's outbox, and
/// must never hold up the leader's driver; the links are closed and reopened as
/// the timeouts say; once resumed, the follower holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_past_the_link_timeouts_never_stalls_the_leader_and_catches_up() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let value = "v".repeat(4096);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop_writing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut writers = Vec::new();
    for w in 0..WRITERS_COUNT {
        let mut client = cluster.client_of(leader).await;
        let (acked, stop_writing, value) = (acked.clone(), stop_writing.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            for k in (w..20_000).step_by(WRITERS_COUNT) {
                if stop_writing.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let key = format!("paused/{k:05}");
                let value = format!("{k}-{value}");
                if client.put(key.as_str(), value.as_str(), None).await.is_ok() {
                    acked.lock().unwrap().insert(key, value);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.signal(follower, "STOP");
    let acked_at_stop = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let acked_while_stopped = acked.lock().unwrap().len() - acked_at_stop;
    cluster.signal(follower, "CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    eprintln!(
        "acknowledged: {acked_while_stopped} while the follower was stopped, {} in all",
        acked.lock().unwrap().len()
    );
    assert!(acked_while_stopped >= 50, "the leader stalled: {acked_while_stopped} puts in 7 s");

    let leader_status = common::status_of(&cluster.endpoint(leader)).await.unwrap();
    cluster.wait_applied(follower, leader_status.raft_applied_index(), Duration::from_secs(30)).await;
    // All of it is too large for one response: every key, then values of a sample.
    let acked = acked.lock().unwrap().clone();
    let mut local = cluster.client_of(follower).await;
    let keys_only = GetOptions::new().with_prefix().with_serializable().with_keys_only();
    let held = local.get("paused/", Some(keys_only)).await.expect("keys of the resumed follower");
    let held: Vec<String> = held.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(held.len(), acked.len(), "the resumed follower's key count");
    assert!(held.iter().eq(acked.keys()), "the resumed follower holds other keys than were acknowledged");
    for (key, value) in acked.iter().step_by(97).chain(acked.iter().rev().take(20)) {
        let got = local.get(key.as_str(), Some(GetOptions::new().with_serializable())).await.unwrap();
        assert_eq!(got.kvs()[0].value_str().unwrap(), value, "{key} on the resumed follower");
    }
    // Its own link to the leader works again: it forwards a write.
    let mut through_follower = cluster.client_of(follower).await;
    through_follower.put("after", "resume", None).await.expect("a put through the resumed follower");
}

/// The largest `--max-request-bytes` accepted (`REQUEST_BYTES_MAX_MAX`, 32 MiB)
/// still replicates: a txn of 21 puts of 1.5 MiB values (31.5 MiB, one log entry)
/// is acknowledged and reaches every member, so every request a member can accept
/// fits in one raft frame to the others. Writing and syncing 31.5 MiB on every
/// member can take longer than the election timeout on a loaded machine, and the
/// leader may step down meanwhile ("leader changed"): the txn (idempotent puts) is
/// then sent again, to the new leader, within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_the_largest_accepted_size_reaches_every_member() {
    use chorus_proto::etcdserverpb::kv_client::KvClient;
    use chorus_proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
    const LIMIT: usize = 32 * 1024 * 1024;
    const VALUE_BYTES: usize = 1_572_864;
    let cluster = Cluster::start(3, &["--max-request-bytes", &LIMIT.to_string()]);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let log = std::fs::read_to_string(&cluster.members[leader].log_path).unwrap();
    assert!(log.contains("--max-request-bytes is above the recommended most"), "no warning at start-up");
    let kv = |i: usize| {
        let endpoint = format!("http://{}", cluster.endpoint(i));
        async move {
            KvClient::connect(endpoint)
                .await
                .unwrap()
                .max_encoding_message_size(2 * LIMIT)
                .max_decoding_message_size(2 * LIMIT)
        }
    };
    let success: Vec<RequestOp> = (0..21)
        .map(|i| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: format!("big/{i:02}").into_bytes(),
                value: vec![b'a' + i as u8; VALUE_BYTES],
                ..Default::default()
            })),
        })
        .collect();
    let txn = TxnRequest { success, ..Default::default() };
    assert!(prost::Message::encoded_len(&txn) < LIMIT);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut leader = leader;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match kv(leader).await.txn(txn.clone()).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                eprintln!("attempt {attempts}: {}; sending the txn again", status.message());
                leader = cluster.wait_leader(Duration::from_secs(20)).await;
            }
            Err(status) => panic!("the 31.5 MiB txn was refused (attempt {attempts}): {status}"),
        }
    }
    for member in 0..3 {
        let mut client = kv(member).await;
        loop {
            let range = RangeRequest { key: b"big/20".to_vec(), serializable: true, ..Default::default() };
            let got = client.range(range).await.unwrap().into_inner();
            if let Some(found) = got.kvs.first() {
                assert_eq!(found.value, vec![b'a' + 20; VALUE_BYTES], "member {member}");
                break;
            }
            assert!(Instant::now() < deadline, "member {member} never received the 31.5 MiB entry");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
