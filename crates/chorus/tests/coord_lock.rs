//! Locks, elections and fencing against a real three-member cluster: etcdctl's
//! lock and elect (which use etcd's client-side recipe on the same keys), the
//! Election service through the etcd-client crate, fenced writes (request field
//! and metadata), the `chorus elect --exec` hot standby, and the lost-update test
//! with paused (SIGSTOP) lock holders, with and without fencing.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chorus_proto::chorus::v1::fenced_kv_client::FencedKvClient;
use chorus_proto::chorus::v1::{Fence, FencedPutRequest};
use chorus_proto::etcdserverpb::kv_client::KvClient;
use chorus_proto::etcdserverpb::PutRequest;
use common::Cluster;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

const CHORUS: &str = env!("CARGO_BIN_EXE_chorus");

fn etcdctl_binary() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|candidate| candidate.is_file())
        .expect("etcdctl is not on PATH: apt-get install etcd-client (CI installs it)")
}

/// Spawns a command in its own process group (so the test can stop or kill the
/// whole of it, as a machine pause or crash would), output to `log`.
fn spawn_group(mut command: Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn")
}

fn chorus(endpoints: &str) -> Command {
    let mut command = Command::new(CHORUS);
    command.env("CHORUS_ENDPOINTS", endpoints).env_remove("CHORUS_FENCE");
    command
}

fn group(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `path` contains `needle`, at most `limit`.
fn wait_for(path: &Path, needle: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if read(path).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stop(mut child: Child) {
    let _ = killpg(group(&child), Signal::SIGKILL);
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_chorus_lock_exclude_each_other_and_wait_in_order() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let dir = cluster.dir.path();
    let trace = dir.join("trace");
    let critical =
        |who: &str| format!("echo {who}-in >> {t}; sleep 1; echo {who}-out >> {t}", t = trace.display());
    let mut etcdctl = Command::new(etcdctl_binary());
    etcdctl.env("ETCDCTL_API", "3").args(["--endpoints", &endpoints, "lock", "shared", "--"]);
    etcdctl.args(["sh", "-c", &critical("etcdctl")]);
    let first = spawn_group(etcdctl, &dir.join("etcdctl.log"));
    assert!(wait_for(&trace, "etcdctl-in", Duration::from_secs(10)), "etcdctl never got the lock");
    let mut ours = chorus(&endpoints);
    ours.args(["lock", "shared", "--ttl", "5", "--", "sh", "-c", &critical("chorus")]);
    let second = spawn_group(ours, &dir.join("chorus.log"));
    assert!(
        wait_for(&trace, "chorus-out", Duration::from_secs(15)),
        "chorus lock: {}",
        read(&dir.join("chorus.log"))
    );
    assert_eq!(
        read(&trace),
        "etcdctl-in\netcdctl-out\nchorus-in\nchorus-out\n",
        "the critical sections overlapped"
    );
    let _ = (stop(first), stop(second));

    // A waiter watches only its predecessor: three queued holders run in order.
    std::fs::remove_file(&trace).unwrap();
    let mut holders = Vec::new();
    for who in ["a", "b", "c"] {
        let mut command = chorus(&endpoints);
        command.args(["lock", "ordered", "--ttl", "5", "--", "sh", "-c", &critical(who)]);
        holders.push(spawn_group(command, &dir.join(format!("{who}.log"))));
        assert!(wait_for(&trace, &format!("{who}-in"), Duration::from_millis(300)) || who != "a");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(wait_for(&trace, "c-out", Duration::from_secs(20)), "queue did not drain: {}", read(&trace));
    assert_eq!(read(&trace), "a-in\na-out\nb-in\nb-out\nc-in\nc-out\n");
    for holder in holders {
        stop(holder);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_campaigns_observes_and_takes_over() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let dir = cluster.dir.path();
    let etcdctl = |args: &[&str]| {
        let mut command = Command::new(etcdctl_binary());
        command.env("ETCDCTL_API", "3").args(["--endpoints", &endpoints, "elect"]).args(args);
        command
    };
    let observer = spawn_group(etcdctl(&["-l", "pool"]), &dir.join("observer.log"));
    let first = spawn_group(etcdctl(&["pool", "p1"]), &dir.join("p1.log"));
    assert!(wait_for(&dir.join("p1.log"), "p1", Duration::from_secs(10)), "p1 never led");
    let second = spawn_group(etcdctl(&["pool", "p2"]), &dir.join("p2.log"));
    std::thread::sleep(Duration::from_millis(800));
    assert!(!read(&dir.join("p2.log")).contains("p2"), "p2 led while p1 did");
    // Our Election service sees etcdctl's leader (same keys).
    let mut client = cluster.client().await;
    let leader = client.leader("pool").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"p1");
    // p1 resigns (SIGINT makes etcdctl resign): p2 takes over at once.
    killpg(group(&first), Signal::SIGINT).unwrap();
    assert!(wait_for(&dir.join("p2.log"), "p2", Duration::from_secs(10)), "p2 never took over");
    assert!(wait_for(&dir.join("observer.log"), "p2", Duration::from_secs(10)));
    let observed = read(&dir.join("observer.log"));
    assert!(observed.find("p1").unwrap() < observed.find("p2").unwrap(), "{observed}");
    for child in [observer, first, second] {
        stop(child);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_service_through_the_etcd_client_crate() {
    use etcd_client::{LeaderKey, ProclaimOptions, ResignOptions};
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut client = cluster.client().await;
    let error = client.leader("jobs").await.unwrap_err();
    assert!(error.to_string().contains("election: no leader"), "{error}");

    let first_lease = client.lease_grant(10, None).await.unwrap().id();
    let second_lease = client.lease_grant(10, None).await.unwrap().id();
    let first = client.campaign("jobs", "one", first_lease).await.unwrap();
    let first_key = first.leader().unwrap().clone();
    assert_eq!(first_key.name(), b"jobs");
    assert_eq!(first_key.key(), format!("jobs/{first_lease:x}").as_bytes());
    assert!(first_key.rev() > 0);
    let mut observe = client.observe("jobs").await.unwrap();
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"one");

    // A second campaign waits while the first leads.
    let mut waiter = client.clone();
    let campaign = tokio::spawn(async move { waiter.campaign("jobs", "two", second_lease).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!campaign.is_finished());

    client.proclaim("uno", Some(ProclaimOptions::new().with_leader(first_key.clone()))).await.unwrap();
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"uno");
    assert_eq!(client.leader("jobs").await.unwrap().kv().unwrap().value(), b"uno");

    client.resign(Some(ResignOptions::new().with_leader(first_key.clone()))).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), campaign).await.unwrap().unwrap().unwrap();
    let second_key = second.leader().unwrap().clone();
    assert!(second_key.rev() > first_key.rev(), "tokens increase across holders");
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"two");

    // The old leader key can no longer proclaim: the Proclaim is a fenced write.
    let stale = LeaderKey::new()
        .with_name("jobs")
        .with_key(first_key.key())
        .with_rev(first_key.rev())
        .with_lease(first_lease);
    let error = client.proclaim("stale", Some(ProclaimOptions::new().with_leader(stale))).await.unwrap_err();
    assert!(error.to_string().contains("election: not leader"), "{error}");
    assert_eq!(client.leader("jobs").await.unwrap().kv().unwrap().value(), b"two");

    // Lock service through the crate, with a lease that does not exist.
    let error = client.lock("l", Some(etcd_client::LockOptions::new().with_lease(12345))).await.unwrap_err();
    assert!(error.to_string().contains("requested lease not found"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_apply_only_for_the_current_holder() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let mut etcd = cluster.client().await;
    let first_lease = etcd.lease_grant(30, None).await.unwrap().id();
    let second_lease = etcd.lease_grant(30, None).await.unwrap().id();
    let first =
        etcd.lock("res", Some(etcd_client::LockOptions::new().with_lease(first_lease))).await.unwrap();
    let token1 = etcd.get(first.key(), None).await.unwrap().kvs()[0].create_revision();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.endpoint(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let fence = |token: i64| Fence { lock: b"res".to_vec(), token };
    let put = |value: &str| PutRequest {
        key: b"data".to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    let mut fenced = FencedKvClient::new(channel.clone());
    fenced.put(FencedPutRequest { fence: Some(fence(token1)), request: Some(put("v1")) }).await.unwrap();

    // A second holder queues; the first releases; the second takes over.
    let mut waiter = etcd.clone();
    let second = tokio::spawn(async move {
        waiter.lock("res", Some(etcd_client::LockOptions::new().with_lease(second_lease))).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.unlock(first.key()).await.unwrap();
    let second = second.await.unwrap().unwrap();
    let token2 = etcd.get(second.key(), None).await.unwrap().kvs()[0].create_revision();
    assert!(token2 > token1);

    // The old token: refused as a request field, as metadata, and from the CLI.
    let error = fenced
        .put(FencedPutRequest { fence: Some(fence(token1)), request: Some(put("stale")) })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        error.message(),
        format!(
            "chorus: fence token {token1} for lock \"res\" is stale: the lock's current token is {token2}"
        )
    );
    let mut kv = KvClient::new(channel);
    let mut request = tonic::Request::new(put("stale"));
    request.metadata_mut().insert("chorus-fence", format!("res:{token1}").parse().unwrap());
    assert_eq!(kv.put(request).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let mut request = tonic::Request::new(put("bad"));
    request.metadata_mut().insert("chorus-fence", "res-without-token".parse().unwrap());
    assert_eq!(kv.put(request).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let output = chorus(&endpoints)
        .args(["put", "data", "stale", "--fence", &format!("res:{token1}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is stale"), "{output:?}");
    let output =
        chorus(&endpoints).args(["del", "data", "--fence", &format!("res:{token1}")]).output().unwrap();
    assert!(!output.status.success());
    assert_eq!(etcd.get("data", None).await.unwrap().kvs()[0].value(), b"v1", "no stale write landed");

    // The current token works the same three ways.
    let mut request = tonic::Request::new(put("v2"));
    request.metadata_mut().insert("chorus-fence", format!("res:{token2}").parse().unwrap());
    kv.put(request).await.unwrap();
    let output =
        chorus(&endpoints).args(["put", "data", "v3", "--fence", &format!("res:{token2}")]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(etcd.get("data", None).await.unwrap().kvs()[0].value(), b"v3");

    // The holder's lease ends: its token is stale too, and nobody holds the lock.
    etcd.lease_revoke(second_lease).await.unwrap();
    let error = fenced
        .put(FencedPutRequest { fence: Some(fence(token2)), request: Some(put("late")) })
        .await
        .unwrap_err();
    assert!(error.message().ends_with("the lock has no holder"), "{}", error.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_elect_exec_standby_takes_over_within_the_ttl_and_never_overlaps() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let dir = cluster.dir.path();
    let trace = dir.join("trace");
    let ttl_s = 5;
    let supervisor = |who: &str| {
        let script = format!("echo {who}-start-$CHORUS_FENCE_TOKEN >> {}; exec sleep 600", trace.display());
        let mut command = chorus(&endpoints);
        command.args(["elect", "svc", who, "--ttl", &ttl_s.to_string(), "--exec", "--", "sh", "-c", &script]);
        spawn_group(command, &dir.join(format!("{who}.log")))
    };
    let primary = supervisor("primary");
    assert!(wait_for(&trace, "primary-start", Duration::from_secs(10)), "{}", read(&dir.join("primary.log")));
    let standby = supervisor("standby");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!read(&trace).contains("standby-start"), "two ran at once: {}", read(&trace));

    // The primary's machine dies: supervisor and command, at once.
    let killed_at = Instant::now();
    stop(primary);
    assert!(
        wait_for(&trace, "standby-start", Duration::from_secs(ttl_s + 10)),
        "standby never started: {}",
        read(&dir.join("standby.log"))
    );
    let takeover = killed_at.elapsed();
    println!("standby started {} ms after the primary was killed (TTL {ttl_s} s)", takeover.as_millis());
    // The lease runs from the primary's last keep-alive, sent every third of the TTL.
    let earliest = Duration::from_millis(ttl_s * 1000 * 2 / 3) - Duration::from_millis(100);
    assert!(takeover >= earliest, "took over {takeover:?} after the kill, before the lease could expire");
    assert!(takeover <= Duration::from_secs(ttl_s + 5), "took {takeover:?}");
    let lines: Vec<String> = read(&trace).lines().map(str::to_string).collect();
    let token = |line: &str| line.rsplit('-').next().unwrap().parse::<i64>().unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(token(&lines[1]) > token(&lines[0]), "fencing tokens increase: {lines:?}");
    stop(standby);
}

/// The lost-update test, as Jepsen ran it against etcd's locks: workers lock,
/// read a counter, write it plus one, unlock. One worker is paused (SIGSTOP of its
/// whole process group) between its read and its write for longer than its lease
/// TTL; the lock passes on; when it resumes it writes its stale count. Its command
/// ignores SIGTERM for the grace period, as a real process in a long pause would
/// not notice in time. Returns (acknowledged increments, final counter).
async fn lost_update_run(cluster: &Cluster, fenced: bool, pauses: usize) -> (u64, u64) {
    let endpoints = cluster.endpoints().join(",");
    let dir = cluster.dir.path().join(if fenced { "fenced" } else { "unfenced" });
    std::fs::create_dir_all(&dir).unwrap();
    let counter = if fenced { "counter-fenced" } else { "counter-unfenced" };
    let output = chorus(&endpoints).args(["put", counter, "0"]).output().unwrap();
    assert!(output.status.success());
    let acks = dir.join("acks");
    let unfence = if fenced { "" } else { "env -u CHORUS_FENCE " };
    // $1 = worker id. A worker told to hold (file hold.<id>) marks its read and
    // waits; the test pauses it there.
    let script = format!(
        "trap '' TERM; v=$({chorus} get {counter} --print-value-only) || exit 1; \
         if [ -e {dir}/hold.$1 ]; then echo $v > {dir}/read.$1; while [ -e {dir}/hold.$1 ]; do sleep 0.02; done; fi; \
         {unfence}{chorus} put {counter} $((v+1)) > /dev/null && echo ack >> {acks}",
        chorus = CHORUS,
        dir = dir.display(),
        acks = acks.display(),
    );
    let worker = |id: usize| {
        let mut command = chorus(&endpoints);
        command.args(["lock", counter, "--ttl", "5", "--grace", "3s", "--", "sh", "-c", &script, "sh"]);
        command.arg(id.to_string());
        spawn_group(command, &dir.join(format!("worker{id}.log")))
    };
    let workers_count = 3;
    let mut running: Vec<Option<Child>> = (0..workers_count).map(|id| Some(worker(id))).collect();
    let mut paused = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut iterations = 0u64;
    while paused < pauses && Instant::now() < deadline {
        // Keep every worker looping: restart the ones whose lock command finished.
        for (id, slot) in running.iter_mut().enumerate() {
            if let Some(child) = slot {
                if child.try_wait().unwrap().is_some() {
                    *slot = Some(worker(id));
                    iterations += 1;
                }
            }
        }
        if iterations >= 4 * (paused as u64 + 1) {
            let victim = paused % workers_count;
            let hold = dir.join(format!("hold.{victim}"));
            std::fs::write(&hold, "").unwrap();
            let read_marker = dir.join(format!("read.{victim}"));
            let _ = std::fs::remove_file(&read_marker);
            // Wait for the victim's next critical section to reach its read.
            let start = Instant::now();
            while !read_marker.exists() && start.elapsed() < Duration::from_secs(30) {
                for (id, slot) in running.iter_mut().enumerate() {
                    if let Some(child) = slot {
                        if child.try_wait().unwrap().is_some() {
                            *slot = Some(worker(id));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(read_marker.exists(), "worker {victim} never reached its read");
            let victim_group = group(running[victim].as_ref().unwrap());
            killpg(victim_group, Signal::SIGSTOP).unwrap();
            // Longer than the TTL: the lease expires and the others go on.
            let pause_end = Instant::now() + Duration::from_secs(8);
            while Instant::now() < pause_end {
                for (id, slot) in running.iter_mut().enumerate() {
                    if id == victim {
                        continue;
                    }
                    if let Some(child) = slot {
                        if child.try_wait().unwrap().is_some() {
                            *slot = Some(worker(id));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::fs::remove_file(&hold).unwrap();
            killpg(victim_group, Signal::SIGCONT).unwrap();
            paused += 1;
            iterations = 0;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(paused, pauses, "the run did not finish its pauses in time");
    // Let everything in flight finish, then stop.
    std::thread::sleep(Duration::from_secs(4));
    for child in running.into_iter().flatten() {
        stop(child);
    }
    let acked = read(&acks).lines().count() as u64;
    let output = chorus(&endpoints).args(["get", counter, "--print-value-only"]).output().unwrap();
    let value: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
    (acked, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_updates_under_pauses_happen_without_fencing_and_never_with_it() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let (acked, value) = lost_update_run(&cluster, false, 2).await;
    let lost = acked.saturating_sub(value);
    println!(
        "without fencing: {acked} acknowledged increments, counter {value}: {lost} lost ({:.1}%)",
        100.0 * lost as f64 / acked.max(1) as f64
    );
    assert!(lost > 0, "a paused holder's stale write should have overwritten newer increments");

    let (acked, value) = lost_update_run(&cluster, true, 2).await;
    println!(
        "with fencing: {acked} acknowledged increments, counter {value}: {} lost",
        acked.saturating_sub(value)
    );
    assert_eq!(value, acked, "with fenced writes every acknowledged increment is in the counter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lock_election_and_fence_requests_get_precise_errors_and_change_nothing() {
    use chorus_proto::chorus::v1::FencedTxnRequest;
    use chorus_proto::v3electionpb::election_client::ElectionClient;
    use chorus_proto::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
    use chorus_proto::v3lockpb::lock_client::LockClient;
    use chorus_proto::v3lockpb::LockRequest;
    use tonic::Code;

    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut etcd = cluster.client().await;
    let lease = etcd.lease_grant(30, None).await.unwrap().id();
    let revision = etcd.get("x", None).await.unwrap().header().unwrap().revision();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.endpoint(1)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut locks = LockClient::new(channel.clone());
    let mut elections = ElectionClient::new(channel.clone());
    let mut fenced = FencedKvClient::new(channel);
    let huge = vec![b'n'; 70_000];

    let lock = |name: &[u8], lease: i64| LockRequest { name: name.to_vec(), lease };
    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        ("lock without a name", Code::InvalidArgument, locks.lock(lock(b"", lease)).await.map(drop)),
        ("lock without a lease", Code::InvalidArgument, locks.lock(lock(b"l", 0)).await.map(drop)),
        ("lock with a huge name", Code::InvalidArgument, locks.lock(lock(&huge, lease)).await.map(drop)),
        ("lock with an unknown lease", Code::NotFound, locks.lock(lock(b"l", 0x5eed)).await.map(drop)),
        (
            "campaign with a huge value",
            Code::InvalidArgument,
            elections
                .campaign(CampaignRequest { name: b"e".to_vec(), lease, value: vec![0; 2 << 20] })
                .await
                .map(drop),
        ),
        (
            "proclaim without a leader key",
            Code::InvalidArgument,
            elections.proclaim(ProclaimRequest { leader: None, value: b"v".to_vec() }).await.map(drop),
        ),
        (
            "resign without a leader key",
            Code::InvalidArgument,
            elections.resign(ResignRequest { leader: None }).await.map(drop),
        ),
        (
            "leader of no name",
            Code::InvalidArgument,
            elections.leader(LeaderRequest { name: Vec::new() }).await.map(drop),
        ),
        (
            "leader of nobody",
            Code::NotFound,
            elections.leader(LeaderRequest { name: b"nobody".to_vec() }).await.map(drop),
        ),
        (
            "fenced put without a fence",
            Code::InvalidArgument,
            fenced
                .put(FencedPutRequest { fence: None, request: Some(PutRequest::default()) })
                .await
                .map(drop),
        ),
        (
            "fence with token 0",
            Code::InvalidArgument,
            fenced
                .put(FencedPutRequest {
                    fence: Some(Fence { lock: b"l".to_vec(), token: 0 }),
                    request: Some(PutRequest { key: b"k".to_vec(), ..Default::default() }),
                })
                .await
                .map(drop),
        ),
        (
            "fence without a lock name",
            Code::InvalidArgument,
            fenced
                .txn(FencedTxnRequest {
                    fence: Some(Fence { lock: Vec::new(), token: 3 }),
                    request: Some(Default::default()),
                })
                .await
                .map(drop),
        ),
        (
            "fenced put with an empty key",
            Code::InvalidArgument,
            fenced
                .put(FencedPutRequest {
                    fence: Some(Fence { lock: b"l".to_vec(), token: 3 }),
                    request: Some(PutRequest::default()),
                })
                .await
                .map(drop),
        ),
    ];
    for (what, code, result) in cases {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}");
        println!("{what}: {:?} {}", status.code(), status.message());
    }
    let after = etcd.get("x", None).await.unwrap().header().unwrap().revision();
    assert_eq!(after, revision, "a refused request changed the store");
    let keys = etcd.get("", Some(etcd_client::GetOptions::new().with_all_keys())).await.unwrap();
    assert_eq!(keys.count(), 0, "no contender key was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_lock_exec_exits_with_the_command_and_stops_it_when_the_lock_is_lost() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let dir = cluster.dir.path();

    // The command's status is the supervisor's, and the lock is released after it.
    let output = chorus(&endpoints).args(["lock", "job", "--", "sh", "-c", "exit 7"]).output().unwrap();
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    let mut etcd = cluster.client().await;
    let held = etcd.get("job/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(held.count(), 0, "the lock was released");

    // The lease is revoked under a running command that ignores SIGTERM: the
    // supervisor notices, sends SIGTERM, then SIGKILL after the grace period.
    let lease_file = dir.join("lease");
    let script = format!("trap '' TERM; echo $CHORUS_LEASE > {}; exec sleep 600", lease_file.display());
    let mut command = chorus(&endpoints);
    command.args(["lock", "job", "--ttl", "5", "--grace", "1s", "--", "sh", "-c", &script]);
    let mut supervisor = spawn_group(command, &dir.join("supervisor.log"));
    assert!(wait_for(&lease_file, "\n", Duration::from_secs(10)), "{}", read(&dir.join("supervisor.log")));
    let lease = i64::from_str_radix(read(&lease_file).trim(), 16).unwrap();
    let revoked_at = Instant::now();
    etcd.lease_revoke(lease).await.unwrap();
    let status = loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            break status;
        }
        assert!(revoked_at.elapsed() < Duration::from_secs(15), "the supervisor never stopped its command");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "supervisor exited {:?} {} ms after the revoke",
        status.code(),
        revoked_at.elapsed().as_millis()
    );
    // `exec sleep` ignores SIGTERM (inherited), so SIGKILL ended it: 128 + 9.
    assert_eq!(status.code(), Some(137), "{}", read(&dir.join("supervisor.log")));
    assert!(read(&dir.join("supervisor.log")).contains("lost job"), "{}", read(&dir.join("supervisor.log")));
}
