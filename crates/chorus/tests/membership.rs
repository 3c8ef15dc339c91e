//! Membership changes with real processes: etcdctl's member commands, a learner
//! that joins with `--initial-cluster-state existing`, is caught up by a snapshot
//! and promoted automatically, and a cluster grown from three members to five and
//! shrunk back to three (removing the leader too) while a write load runs, with
//! every acknowledged write kept and a register's history linearizable.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{etcdctl, Cluster};
use etcd_client::{GetOptions, Txn, TxnOp};

/// Checks a single-writer register's history for linearizability. The writer
/// wrote 1, 2, 3... in order, one at a time: (invoked, acknowledged if it was, n).
/// Each read (invoked, answered, value) must return a value written no earlier
/// than the last write acknowledged before the read began and no later than the
/// last write begun before it was answered, and the reader's successive reads
/// never go back.
/// A write: sent, acknowledged (None if its outcome is unknown), value.
type Write = (Instant, Option<Instant>, u64);

fn check_register_history(writes: &[Write], reads: &[(Instant, Instant, u64)]) {
    assert!(!reads.is_empty(), "the reader read nothing");
    let mut previous = 0;
    for &(invoked, answered, value) in reads {
        let floor = writes
            .iter()
            .filter(|(_, acked, _)| acked.is_some_and(|a| a < invoked))
            .map(|w| w.2)
            .max()
            .unwrap_or(0);
        let ceiling = writes.iter().filter(|(begun, _, _)| *begun < answered).map(|w| w.2).max().unwrap_or(0);
        assert!(value >= floor, "a read begun after write {floor} was acknowledged returned {value} (stale)");
        assert!(value <= ceiling, "a read answered before write {} began returned {value}", ceiling + 1);
        assert!(value >= previous, "the register went back from {previous} to {value}");
        previous = value;
    }
    eprintln!("register history of {} writes and {} reads is linearizable", writes.len(), reads.len());
}

/// (id, name, is_learner) of every member, from `etcdctl member list -w json`.
fn member_list(endpoint: &str) -> Vec<(u64, String, bool)> {
    let output = etcdctl(endpoint, &["member", "list", "-w", "json"]);
    assert!(output.status.success(), "member list: {}", String::from_utf8_lossy(&output.stderr));
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).expect("member list json");
    list["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["ID"].as_u64().expect("id"),
                m["name"].as_str().unwrap_or_default().to_string(),
                m["isLearner"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// `etcdctl member add NAME --peer-urls URL [--learner]`: the new member's id.
fn member_add(cluster: &Cluster, endpoint: &str, name: &str, peer_url: &str, learner: bool) -> u64 {
    let mut args = vec!["member", "add", name, "--peer-urls", peer_url, "-w", "json"];
    if learner {
        args.push("--learner");
    }
    let output = etcdctl(endpoint, &args);
    if !output.status.success() {
        cluster.dump_logs();
        panic!("member add: {}", String::from_utf8_lossy(&output.stderr));
    }
    let added: serde_json::Value = serde_json::from_slice(&output.stdout).expect("member add json");
    added["member"]["ID"].as_u64().expect("the new member's id")
}

/// Waits until `id` is a voter in the member list of `endpoint`.
async fn wait_voter(cluster: &Cluster, endpoint: &str, id: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if member_list(endpoint).iter().any(|(m, _, learner)| *m == id && !learner) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.dump_logs();
    panic!("member {id:x} was not promoted within {limit:?}");
}

fn member_id_of(cluster: &Cluster, i: usize) -> u64 {
    let list = member_list(&cluster.endpoint(i));
    let name = &cluster.members[i].name;
    list.iter().find(|(_, n, _)| n == name).map(|(id, _, _)| *id).expect("the member is listed by name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_member_commands_and_a_learner_that_joins_and_is_promoted() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "500", "--snapshot-catchup-entries", "50"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    common::wait_members_published(&cluster, Duration::from_secs(10)).await;
    let endpoints = cluster.endpoints().join(",");
    let mut client = cluster.client().await;
    for i in 0..1000 {
        client.put(format!("before/{i:04}"), format!("v{i}"), None).await.expect("put");
    }

    // Bad input first: each is refused and changes nothing.
    let first = member_list(&endpoints);
    assert_eq!(first.len(), 3);
    let taken = etcdctl(&endpoints, &["member", "add", "dup", "--peer-urls", &cluster.peer_url(0)]);
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("Peer URLs already exists"), "{taken:?}");
    let unknown = etcdctl(&endpoints, &["member", "remove", "1234abcd"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("member not found"), "{unknown:?}");
    let voter = format!("{:x}", first[0].0);
    let promote_voter = etcdctl(&endpoints, &["member", "promote", &voter]);
    assert!(String::from_utf8_lossy(&promote_voter.stderr).contains("can only promote a learner member"));
    let bad_url = etcdctl(&endpoints, &["member", "add", "bad", "--peer-urls", "http://127.0.0.1"]);
    assert!(!bad_url.status.success());
    assert_eq!(member_list(&endpoints), first, "refused changes changed the member list");

    // A learner joins: added, started with --initial-cluster-state existing,
    // caught up by a snapshot, then promoted by the leader on its own.
    let joiner = cluster.add_member();
    let id = member_add(&cluster, &endpoints, "m4", &cluster.peer_url(joiner), true);
    let listed = member_list(&endpoints);
    assert!(listed.iter().any(|(m, name, learner)| *m == id && name.is_empty() && *learner), "{listed:?}");
    let started = Instant::now();
    cluster.restart(joiner);
    let promoted_after = wait_voter(&cluster, &endpoints, id, Duration::from_secs(30)).await;
    eprintln!("learner joined and was promoted {:?} after it started", started.elapsed().max(promoted_after));
    let log = std::fs::read_to_string(&cluster.members[joiner].log_path).unwrap();
    assert!(log.contains("received a snapshot"), "the learner was not caught up by a snapshot");
    let mut local = cluster.client_of(joiner).await;
    let all = local.get("before/", Some(GetOptions::new().with_prefix().with_serializable())).await.unwrap();
    assert_eq!(all.kvs().len(), 1000, "the new member holds every key");
    let listed = member_list(&cluster.endpoint(joiner));
    assert!(listed.iter().any(|(m, name, learner)| *m == id && name == "m4" && !learner), "{listed:?}");

    // Writes go on through the new member, and removing it stops it.
    local.put("after", "join", None).await.expect("put through the new member");
    let removed = etcdctl(&endpoints, &["member", "remove", &format!("{id:x}")]);
    assert!(removed.status.success(), "member remove: {}", String::from_utf8_lossy(&removed.stderr));
    let exit = cluster.wait_exit(joiner, Duration::from_secs(10));
    assert!(exit.is_some(), "a removed member keeps running");
    let log = std::fs::read_to_string(&cluster.members[joiner].log_path).unwrap();
    assert!(log.contains("permanently removed from the cluster"), "no removal line in the log");
    assert_eq!(member_list(&endpoints).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_to_three_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &["--snapshot-count", "2000", "--snapshot-catchup-entries", "200"]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    common::wait_members_published(&cluster, Duration::from_secs(10)).await;

    // The load: one writer through the member that stays (m3), each key once,
    // recording what was acknowledged; bounded in count and time. Each write also
    // sets the register `reg` to its number, in the same txn, and a reader reads
    // `reg` (linearizably) through m3 throughout: the history of that register is
    // checked below.
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acknowledged, writes, stop) = (acknowledged.clone(), writes.clone(), stop.clone());
        let mut client = cluster.client_of(2).await;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut failed = 0u64;
            for i in 1..200_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || started.elapsed() > Duration::from_secs(120)
                {
                    break;
                }
                let (key, value) = (format!("load/{i:06}"), format!("v{i}"));
                let txn = Txn::new().and_then([
                    TxnOp::put(key.clone(), value.clone(), None),
                    TxnOp::put("reg", i.to_string(), None),
                ]);
                let invoked = Instant::now();
                match client.txn(txn).await {
                    Ok(_) => {
                        writes.lock().unwrap().push((invoked, Some(Instant::now()), i));
                        acknowledged.lock().unwrap().insert(key, value);
                    }
                    Err(_) => {
                        writes.lock().unwrap().push((invoked, None, i));
                        failed += 1
                    }
                }
            }
            failed
        })
    };
    let reader = {
        let stop = stop.clone();
        let mut client = cluster.client_of(2).await;
        tokio::spawn(async move {
            let mut reads = Vec::new();
            for _ in 0..200_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let invoked = Instant::now();
                if let Ok(got) = client.get("reg", None).await {
                    let value =
                        got.kvs().first().map_or(0, |kv| kv.value_str().unwrap().parse::<u64>().unwrap());
                    reads.push((invoked, Instant::now(), value));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };
    // The load is under way before the first change (bounded wait; no speed asserted).
    let waited = Instant::now();
    while acknowledged.lock().unwrap().len() < 100 {
        assert!(waited.elapsed() < Duration::from_secs(60), "the load did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_changes = acknowledged.lock().unwrap().len();

    let endpoint = cluster.endpoint(2);
    let started = Instant::now();
    for _ in 0..2 {
        let joiner = cluster.add_member();
        let id = member_add(
            &cluster,
            &endpoint,
            &cluster.members[joiner].name.clone(),
            &cluster.peer_url(joiner),
            true,
        );
        cluster.restart(joiner);
        wait_voter(&cluster, &endpoint, id, Duration::from_secs(60)).await;
    }
    assert_eq!(member_list(&endpoint).iter().filter(|(_, _, learner)| !learner).count(), 5);
    eprintln!("grew to five voters in {:?}", started.elapsed());

    // Shrink: remove m1 and m2, through m3 (which asks the leader to hand over
    // first when the leader is the one removed), then make sure the leader is
    // among them at least once: move leadership to m1 before removing it.
    let m1 = member_id_of(&cluster, 0);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    if leader != 0 {
        let output = etcdctl(&cluster.endpoint(leader), &["move-leader", &format!("{m1:x}")]);
        assert!(output.status.success(), "move-leader: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(cluster.wait_leader(Duration::from_secs(10)).await, 0, "m1 leads after move-leader");
    }
    for i in 0..2 {
        let id = member_id_of(&cluster, i);
        let through = endpoint.clone();
        let removed = etcdctl(&through, &["member", "remove", &format!("{id:x}")]);
        assert!(removed.status.success(), "remove m{}: {}", i + 1, String::from_utf8_lossy(&removed.stderr));
        assert!(cluster.wait_exit(i, Duration::from_secs(15)).is_some(), "removed m{} keeps running", i + 1);
    }
    let remaining = member_list(&endpoint);
    assert_eq!(remaining.len(), 3, "{remaining:?}");
    eprintln!("grew to five and shrank to three in {:?}", started.elapsed());

    let waited = Instant::now();
    while acknowledged.lock().unwrap().len() <= before_changes + 10 {
        assert!(waited.elapsed() < Duration::from_secs(60), "no write was acknowledged after the changes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = writer.await.expect("writer");
    let reads = reader.await.expect("reader");
    let acknowledged = acknowledged.lock().unwrap().clone();
    check_register_history(&writes.lock().unwrap(), &reads);
    eprintln!(
        "{} writes acknowledged, {failed} failed (outcome unknown) during the changes",
        acknowledged.len()
    );

    // Every acknowledged write is on every remaining member.
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let revision = common::status_of(&cluster.endpoint(leader)).await.unwrap().header().unwrap().revision();
    for i in 2..5 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::status_of(&cluster.endpoint(i)).await.map_or(0, |s| s.header().unwrap().revision())
            < revision
        {
            assert!(Instant::now() < deadline, "member m{} did not catch up", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut client = cluster.client_of(i).await;
        let held =
            client.get("load/", Some(GetOptions::new().with_prefix().with_serializable())).await.unwrap();
        let held: BTreeMap<String, String> = held
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
            .collect();
        let missing: Vec<&String> =
            acknowledged.keys().filter(|k| held.get(*k) != acknowledged.get(*k)).collect();
        assert!(
            missing.is_empty(),
            "m{} lost {} acknowledged writes, e.g. {:?}",
            i + 1,
            missing.len(),
            missing.first()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_membership_change_while_one_is_pending_is_refused() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    common::wait_members_published(&cluster, Duration::from_secs(10)).await;
    let mut client = cluster.client_of(leader).await;
    let first_url = format!("http://127.0.0.1:{}", common::free_port());
    let second_url = format!("http://127.0.0.1:{}", common::free_port());

    // With both followers paused the first change cannot commit, so it is still
    // pending when the second arrives.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &i in &followers {
        cluster.signal(i, "STOP");
    }
    let first = {
        let mut client = client.clone();
        let options = etcd_client::MemberAddOptions::new().with_is_learner();
        tokio::spawn(async move { client.member_add([first_url], Some(options)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let options = etcd_client::MemberAddOptions::new().with_is_learner();
    let second = client.member_add([second_url], Some(options)).await;
    for &i in &followers {
        cluster.signal(i, "CONT");
    }
    let refused = second.expect_err("a second change while one is pending");
    let text = refused.to_string();
    assert!(text.contains("a membership change is already in progress"), "{text}");
    // tonic's description of FailedPrecondition.
    assert!(text.contains("not in a state required for the operation"), "{text}");
    let added = first.await.unwrap().expect("the first change completes once the followers are back");
    let id = added.member().expect("the added member").id();
    let listed = member_list(&cluster.endpoint(leader));
    assert_eq!(listed.len(), 4, "only the first change was made: {listed:?}");
    assert!(listed.iter().any(|(m, _, learner)| *m == id && *learner));
}

/// Runs `chorus member ARGS` against `endpoint`.
fn chorus_member(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["member", "--endpoints", endpoint])
        .args(args)
        .output()
        .expect("run chorus member")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_member_commands() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(10)).await;
    common::wait_members_published(&cluster, Duration::from_secs(10)).await;
    let endpoint = cluster.endpoint(0);
    let text = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).to_string();

    let listed = chorus_member(&endpoint, &["list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let lines: Vec<String> = text(&listed).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains(", started, ") && l.ends_with(", false")), "{lines:?}");

    let peer_url = format!("http://127.0.0.1:{}", common::free_port());
    let added = chorus_member(&endpoint, &["add", "newcomer", "--peer-urls", &peer_url, "--learner"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let said = text(&added);
    assert!(said.starts_with("Member ") && said.contains(" added to cluster "), "{said}");
    assert!(
        said.contains(&format!("newcomer={peer_url}")) && said.contains("--initial-cluster-state existing"),
        "{said}"
    );
    let id = said.split_whitespace().nth(1).unwrap().to_string();

    let json = chorus_member(&endpoint, &["list", "-w", "json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("member list -w json");
    let members = parsed["members"].as_array().unwrap();
    assert_eq!(members.len(), 4);
    let newcomer = members.iter().find(|m| format!("{:x}", m["ID"].as_u64().unwrap()) == id).expect("listed");
    assert_eq!(newcomer["isLearner"], true);
    assert!(newcomer.get("name").is_none(), "not started yet: {newcomer}");
    // The same as etcdctl sees it.
    assert_eq!(member_list(&endpoint).len(), 4);

    // A learner that has not caught up cannot be promoted; the server's reason is shown.
    let promote = chorus_member(&endpoint, &["promote", &id]);
    assert!(!promote.status.success());
    assert!(String::from_utf8_lossy(&promote.stderr).contains("learner"), "{promote:?}");

    let removed = chorus_member(&endpoint, &["remove", &id]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert!(text(&removed).contains(&format!("Member {id} removed from cluster")), "{}", text(&removed));
    assert_eq!(member_list(&endpoint).len(), 3);

    let bad = chorus_member(&endpoint, &["remove", "not-hex"]);
    assert_eq!(bad.status.code(), Some(2), "a bad ID is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hexadecimal"));
}
