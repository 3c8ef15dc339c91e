//! Queues and barriers (`chorus.v1.Queue`, `chorus.v1.Barrier`) against real
//! `chorus serve` processes, over gRPC and through the `chorus queue` and
//! `chorus barrier` CLI verbs.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use chorus_proto::chorus::v1::barrier_client::BarrierClient;
use chorus_proto::chorus::v1::queue_client::QueueClient;
use chorus_proto::chorus::v1::{
    DequeueRequest, EnqueueRequest, EnterRequest, LeaveRequest, LenRequest, PeekRequest, QueueMessage,
    SettleRequest,
};
use chorus_proto::etcdserverpb::kv_client::KvClient;
use chorus_proto::etcdserverpb::lease_client::LeaseClient;
use chorus_proto::etcdserverpb::{
    request_op, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use common::Cluster;
use tonic::transport::Channel;
use tonic::Code;

/// How long any CLI process may run.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

async fn channel(cluster: &Cluster) -> Channel {
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (0..cluster.members.len()).find(|i| *i != leader).unwrap_or(leader);
    // Through a follower: the services work on any member.
    Channel::from_shared(format!("http://{}", cluster.endpoint(follower))).unwrap().connect().await.unwrap()
}

async fn grant(channel: &Channel, ttl: i64) -> i64 {
    LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn revoke(channel: &Channel, id: i64) {
    LeaseClient::new(channel.clone()).lease_revoke(LeaseRevokeRequest { id }).await.unwrap();
}

async fn push(queue: &mut QueueClient<Channel>, name: &str, payload: &str) -> u64 {
    let request = EnqueueRequest { queue: name.into(), payload: payload.into() };
    queue.enqueue(request).await.unwrap().into_inner().id
}

async fn pop(
    queue: &mut QueueClient<Channel>,
    name: &str,
    lease: i64,
    timeout_ms: i64,
) -> Result<QueueMessage, tonic::Status> {
    let request = DequeueRequest { queue: name.into(), lease, timeout_ms, max_deliveries: 0 };
    queue.dequeue(request).await.map(|r| r.into_inner().message.expect("a message"))
}

async fn settle(
    queue: &mut QueueClient<Channel>,
    name: &str,
    message: &QueueMessage,
    ack: bool,
) -> Result<i64, tonic::Status> {
    let request = SettleRequest { queue: name.into(), id: message.id, claim_token: message.claim_token };
    let response = if ack { queue.ack(request).await } else { queue.nack(request).await };
    response.map(|r| r.into_inner().revision)
}

async fn len(queue: &mut QueueClient<Channel>, name: &str) -> (u64, u64) {
    let response = queue.len(LenRequest { queue: name.into() }).await.unwrap().into_inner();
    (response.count, response.claimed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delivers_in_order_with_claims_acks_nacks_and_dead_letters() {
    let cluster = Cluster::start(3, &[]);
    let channel = channel(&cluster).await;
    let mut queue = QueueClient::new(channel.clone());
    let lease = grant(&channel, 30).await;

    // FIFO, peek, len.
    for payload in ["a", "b", "c"] {
        push(&mut queue, "jobs", payload).await;
    }
    assert_eq!(len(&mut queue, "jobs").await, (3, 0));
    let peeked =
        queue.peek(PeekRequest { queue: "jobs".into() }).await.unwrap().into_inner().message.unwrap();
    assert_eq!(peeked.payload, b"a");
    let a = pop(&mut queue, "jobs", lease, 0).await.unwrap();
    let b = pop(&mut queue, "jobs", lease, 0).await.unwrap();
    assert_eq!((a.payload.as_slice(), a.deliveries, b.payload.as_slice()), (&b"a"[..], 1, &b"b"[..]));
    assert_eq!(len(&mut queue, "jobs").await, (3, 2));
    let peeked =
        queue.peek(PeekRequest { queue: "jobs".into() }).await.unwrap().into_inner().message.unwrap();
    assert_eq!(peeked.payload, b"c", "peek skips claimed messages");

    // Ack, then ack again with the same token: stale, and the message names why.
    settle(&mut queue, "jobs", &a, true).await.unwrap();
    let again = settle(&mut queue, "jobs", &a, true).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("no longer in queue"), "{}", again.message());

    // Nack returns b to its place (before c); its old token is stale once it is claimed again.
    settle(&mut queue, "jobs", &b, false).await.unwrap();
    let b2 = pop(&mut queue, "jobs", lease, 0).await.unwrap();
    assert_eq!((b2.payload.as_slice(), b2.deliveries), (&b"b"[..], 2));
    let stale = settle(&mut queue, "jobs", &b, true).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains(&format!("now claimed with token {}", b2.claim_token)),
        "{}",
        stale.message()
    );
    assert_eq!(len(&mut queue, "jobs").await, (2, 1), "the stale ack changed nothing");

    // A consumer whose lease is revoked loses its claim; the message goes to the next one.
    let doomed = grant(&channel, 30).await;
    let c = pop(&mut queue, "jobs", doomed, 0).await.unwrap();
    assert_eq!(c.payload, b"c");
    assert_eq!(pop(&mut queue, "jobs", lease, 0).await.unwrap_err().code(), Code::DeadlineExceeded);
    revoke(&channel, doomed).await;
    let c2 = pop(&mut queue, "jobs", lease, 0).await.unwrap();
    assert_eq!((c2.id, c2.deliveries), (c.id, 2));
    assert_eq!(settle(&mut queue, "jobs", &c, true).await.unwrap_err().code(), Code::FailedPrecondition);
    settle(&mut queue, "jobs", &c2, true).await.unwrap();
    settle(&mut queue, "jobs", &b2, true).await.unwrap();
    assert_eq!(len(&mut queue, "jobs").await, (0, 0));

    // A blocked dequeue is woken by an enqueue (a watch, not a poll).
    let mut waiter = queue.clone();
    let started = Instant::now();
    let blocked = tokio::spawn(async move { pop(&mut waiter, "later", lease, 30_000).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushed_at = Instant::now();
    push(&mut queue, "later", "woken").await;
    let woken = blocked.await.unwrap().unwrap();
    println!(
        "blocked dequeue returned {:?} after the enqueue ({:?} in all)",
        pushed_at.elapsed(),
        started.elapsed()
    );
    assert_eq!(woken.payload, b"woken");

    // FIFO over more messages.
    let payloads: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for payload in &payloads {
        push(&mut queue, "fifo", payload).await;
    }
    for payload in &payloads {
        let message = pop(&mut queue, "fifo", lease, 0).await.unwrap();
        assert_eq!(String::from_utf8(message.payload.clone()).unwrap(), *payload);
        settle(&mut queue, "fifo", &message, true).await.unwrap();
    }

    // Dead-lettering after max deliveries; the dead-letter queue is a queue.
    let id = push(&mut queue, "flaky", "poison").await;
    for delivery in 1..=2 {
        let request = DequeueRequest { queue: "flaky".into(), lease, timeout_ms: 0, max_deliveries: 2 };
        let message = queue.dequeue(request).await.unwrap().into_inner().message.unwrap();
        assert_eq!((message.id, message.deliveries), (id, delivery));
        settle(&mut queue, "flaky", &message, false).await.unwrap();
    }
    let request = DequeueRequest { queue: "flaky".into(), lease, timeout_ms: 0, max_deliveries: 2 };
    assert_eq!(queue.dequeue(request).await.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(len(&mut queue, "flaky").await, (0, 0));
    assert_eq!(len(&mut queue, "flaky.dead-letter").await, (1, 0));
    let dead = pop(&mut queue, "flaky.dead-letter", lease, 0).await.unwrap();
    assert_eq!((dead.id, dead.payload.as_slice(), dead.deliveries), (id, &b"poison"[..], 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queue_and_barrier_input_gets_precise_errors_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]);
    let channel = channel(&cluster).await;
    let mut queue = QueueClient::new(channel.clone());
    let mut barrier = BarrierClient::new(channel.clone());
    let mut kv = KvClient::new(channel.clone());
    let lease = grant(&channel, 30).await;
    let revision = |kv: &mut KvClient<Channel>| {
        let mut kv = kv.clone();
        async move {
            kv.range(RangeRequest { key: b"x".to_vec(), ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision
        }
    };
    let before = revision(&mut kv).await;

    let check = |result: Result<(), tonic::Status>, code: Code, text: &str| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(text), "{:?} should contain {text:?}", status.message());
    };
    let big = vec![0u8; 1_048_577];
    check(
        queue.enqueue(EnqueueRequest { queue: "q".into(), payload: big }).await.map(drop),
        Code::InvalidArgument,
        "payload is too large",
    );
    check(
        queue.enqueue(EnqueueRequest { queue: "".into(), payload: b"x".to_vec() }).await.map(drop),
        Code::InvalidArgument,
        "name is empty",
    );
    check(
        queue.enqueue(EnqueueRequest { queue: "a/b".into(), payload: b"x".to_vec() }).await.map(drop),
        Code::InvalidArgument,
        "contains '/'",
    );
    check(
        queue.len(LenRequest { queue: "x".repeat(201) }).await.map(drop),
        Code::InvalidArgument,
        "too long",
    );
    let dequeue = |lease, timeout_ms, max_deliveries| DequeueRequest {
        queue: "q".into(),
        lease,
        timeout_ms,
        max_deliveries,
    };
    check(
        queue.dequeue(dequeue(0, 0, 0)).await.map(drop),
        Code::InvalidArgument,
        "needs the consumer's lease",
    );
    check(queue.dequeue(dequeue(lease, -1, 0)).await.map(drop), Code::InvalidArgument, "timeout_ms");
    check(queue.dequeue(dequeue(lease, 0, 1_001)).await.map(drop), Code::InvalidArgument, "max_deliveries");
    let settle = SettleRequest { queue: "q".into(), id: 1, claim_token: 0 };
    check(queue.ack(settle).await.map(drop), Code::InvalidArgument, "claim token must be positive");
    let enter = |count, lease| EnterRequest { name: "b".into(), count, lease, timeout_ms: 0 };
    check(barrier.enter(enter(0, lease)).await.map(drop), Code::InvalidArgument, "between 1 and 100");
    check(barrier.enter(enter(101, lease)).await.map(drop), Code::InvalidArgument, "between 1 and 100");
    check(barrier.enter(enter(2, 0)).await.map(drop), Code::InvalidArgument, "session lease");
    let leave = LeaveRequest { name: "".into(), lease, timeout_ms: 0 };
    check(barrier.leave(leave).await.map(drop), Code::InvalidArgument, "name is empty");
    assert_eq!(revision(&mut kv).await, before, "no rejected request wrote anything");

    // A lease that does not exist: the claim txn fails as a whole.
    push(&mut queue, "q", "x").await;
    check(queue.dequeue(dequeue(0x7777, 0, 0)).await.map(drop), Code::NotFound, "lease not found");
    assert_eq!(len(&mut queue, "q").await, (1, 0));

    // A full queue. It is filled through the KV API (the layout is documented), 128 keys a txn.
    let full_at = 10_000u64;
    let mut id = 0u64;
    while id < full_at {
        let success = (0..128.min(full_at - id))
            .map(|_| {
                id += 1;
                let key = format!("\x00chorus/queue/full/m/{id:016x}").into_bytes();
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest { key, ..Default::default() })),
                }
            })
            .collect();
        kv.txn(TxnRequest { compare: vec![], success, failure: vec![] }).await.unwrap();
    }
    assert_eq!(len(&mut queue, "full").await, (full_at, 0));
    let request = EnqueueRequest { queue: "full".into(), payload: b"one more".to_vec() };
    check(queue.enqueue(request).await.map(drop), Code::ResourceExhausted, "is full (10000 messages");
    assert_eq!(len(&mut queue, "full").await, (full_at, 0));
    let started = Instant::now();
    let message = pop(&mut queue, "full", lease, 0).await.unwrap();
    println!("dequeue from a full queue ({full_at} messages) took {:?}", started.elapsed());
    assert_eq!(message.id, 1, "the oldest message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_trips_at_count_without_the_dead_and_double_barrier_leaves() {
    let cluster = Cluster::start(3, &[]);
    let channel = channel(&cluster).await;
    let barrier = BarrierClient::new(channel.clone());
    let enter = |lease: i64, count: u32, timeout_ms: i64| {
        let mut barrier = barrier.clone();
        tokio::spawn(async move {
            barrier
                .enter(EnterRequest { name: "start".into(), count, lease, timeout_ms })
                .await
                .map(|r| r.into_inner())
        })
    };
    let (a, b, c, d) = (
        grant(&channel, 30).await,
        grant(&channel, 30).await,
        grant(&channel, 30).await,
        grant(&channel, 30).await,
    );
    let waiting_a = enter(a, 3, 30_000);
    let waiting_b = enter(b, 3, 30_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // b dies before the barrier trips: its participant key goes with its lease.
    revoke(&channel, b).await;
    // Its (still running) Enter learns that it has left.
    let lost = waiting_b.await.unwrap().unwrap_err();
    assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
    assert!(lost.message().contains("ended before the barrier tripped"), "{}", lost.message());
    let waiting_c = enter(c, 3, 30_000);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    if waiting_a.is_finished() || waiting_c.is_finished() {
        panic!("two live participants of three must wait: {:?} {:?}", waiting_a.await, waiting_c.await);
    }
    let tripped_at = Instant::now();
    let waiting_d = enter(d, 3, 30_000);
    let (ra, rc, rd) = (
        waiting_a.await.unwrap().unwrap(),
        waiting_c.await.unwrap().unwrap(),
        waiting_d.await.unwrap().unwrap(),
    );
    println!("barrier passed by all {:?} after the third live participant entered", tripped_at.elapsed());
    assert_eq!(ra.trip_revision, rc.trip_revision);
    assert_eq!(ra.trip_revision, rd.trip_revision);
    assert_eq!(ra.participants, 3);

    // Tripped stays tripped: a departure (a's lease ends) does not untrip it for c.
    revoke(&channel, a).await;
    let again = enter(c, 3, 0).await.unwrap().unwrap();
    assert_eq!(again.trip_revision, ra.trip_revision);

    // Double barrier: Leave returns once every participant has left.
    let leave = |lease: i64| {
        let mut barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.leave(LeaveRequest { name: "start".into(), lease, timeout_ms: 30_000 }).await
        })
    };
    let leaving_c = leave(c);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!leaving_c.is_finished(), "d has not left yet");
    leave(d).await.unwrap().unwrap();
    leaving_c.await.unwrap().unwrap();
    let mut kv = KvClient::new(channel.clone());
    let prefix = b"\x00chorus/barrier/start/".to_vec();
    let left = kv
        .range(RangeRequest {
            key: prefix.clone(),
            range_end: b"\x00chorus/barrier/start0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.into_inner().count, 0, "participants and the trip record are gone: the name is reusable");

    // Alone at a barrier of two: the deadline passes and the participant is withdrawn.
    let e = grant(&channel, 30).await;
    let mut alone = barrier.clone();
    let status = alone
        .enter(EnterRequest { name: "pair".into(), count: 2, lease: e, timeout_ms: 800 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("withdrawn"), "{}", status.message());
    let left = kv
        .range(RangeRequest {
            key: b"\x00chorus/barrier/pair/".to_vec(),
            range_end: b"\x00chorus/barrier/pair0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.into_inner().count, 0);
}

/// Runs the chorus CLI; returns (exit code, stdout, stderr).
async fn chorus(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PROCESS_TIMEOUT, output).await.expect("chorus exits").unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.code().unwrap_or(-1), text(output.stdout), text(output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_verbs_and_a_consumer_process_that_exits_without_acking() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let endpoints = endpoints.as_str();

    let (code, out, err) = chorus(endpoints, &["queue", "push", "work", "first"]).await;
    assert_eq!(code, 0, "{err}");
    let first_id: u64 = out.trim().parse().unwrap();
    chorus(endpoints, &["queue", "push", "work", "second"]).await;
    let (_, out, _) = chorus(endpoints, &["queue", "len", "work", "-w", "json"]).await;
    let len: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(len["count"], 2);
    let (_, out, _) = chorus(endpoints, &["queue", "peek", "work"]).await;
    assert_eq!(out, format!("{first_id}\nfirst\n"));

    // A consumer process pops without acking and exits: its lease (5 s) runs out and the
    // message is delivered again, to the next consumer.
    let (code, out, err) = chorus(endpoints, &["queue", "pop", "work", "--ttl", "5s"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!((lines[0], lines[2]), (first_id.to_string().as_str(), "first"));
    let stale_token = lines[1].to_string();
    // pop --ack takes the next message (the first is claimed) and acknowledges it.
    let (code, out, err) = chorus(endpoints, &["queue", "pop", "work", "--ack"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("second\n"), "{out}");
    let started = Instant::now();
    let (code, out, err) =
        chorus(endpoints, &["queue", "pop", "work", "--timeout", "30s", "-w", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let popped: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("redelivered {:?} after the first consumer's exit (lease TTL 5 s)", started.elapsed());
    assert_eq!((popped["id"].as_u64(), popped["deliveries"].as_u64()), (Some(first_id), Some(2)));
    assert_eq!(popped["payload"], "Zmlyc3Q="); // base64("first")

    // The first consumer's token is stale: a non-zero exit with the server's message.
    let (code, _, err) =
        chorus(endpoints, &["queue", "ack", "work", &first_id.to_string(), &stale_token]).await;
    assert_eq!(code, 1);
    assert!(err.contains("is stale") && err.contains("now claimed with token"), "{err}");
    let token = popped["claim_token"].as_i64().unwrap().to_string();
    let (code, out, err) = chorus(endpoints, &["queue", "ack", "work", &first_id.to_string(), &token]).await;
    assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");

    let (code, _, err) = chorus(endpoints, &["queue", "pop", "work", "--timeout", "0s"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no message in queue"), "{err}");
    let (code, _, err) = chorus(endpoints, &["queue", "push", "", "x"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("queue name is empty"), "{err}");

    // Two barrier processes meet; then both leave.
    let e1 = endpoints.to_string();
    let e2 = endpoints.to_string();
    let first =
        tokio::spawn(
            async move { chorus(&e1, &["barrier", "enter", "meet", "2", "--timeout", "30s"]).await },
        );
    let second = tokio::spawn(async move {
        chorus(&e2, &["barrier", "enter", "meet", "2", "--timeout", "30s", "-w", "json"]).await
    });
    let (code1, out1, err1) = first.await.unwrap();
    let (code2, out2, err2) = second.await.unwrap();
    assert_eq!((code1, code2), (0, 0), "{err1} {err2}");
    let entered: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(entered["participants"], 2);
    let lease1 = out1.trim().to_string();
    let lease2 = entered["lease"].as_str().unwrap().to_string();
    let e1 = endpoints.to_string();
    let leaving =
        tokio::spawn(async move { chorus(&e1, &["barrier", "leave", "meet", "--lease", &lease1]).await });
    let (code, out, err) = chorus(endpoints, &["barrier", "leave", "meet", "--lease", &lease2]).await;
    assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");
    assert_eq!(leaving.await.unwrap().0, 0);
    let (code, _, err) = chorus(endpoints, &["barrier", "enter", "alone", "2", "--timeout", "1s"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("did not trip in time"), "{err}");
}
