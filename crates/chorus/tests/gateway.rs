//! The HTTP/JSON gateway (etcd's grpc-gateway) on the client port of real `chorus serve`
//! processes, spoken to by a plain HTTP/1.1 client. Every path's answer is checked
//! against the gRPC answer for the same request; errors against the gRPC status.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_proto::etcdserverpb::auth_client::AuthClient;
use chorus_proto::etcdserverpb::cluster_client::ClusterClient;
use chorus_proto::etcdserverpb::kv_client::KvClient;
use chorus_proto::etcdserverpb::lease_client::LeaseClient;
use chorus_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use chorus_proto::etcdserverpb::{
    compare, request_op, AlarmRequest, AuthStatusRequest, AuthUserListRequest, CompactionRequest, Compare,
    DefragmentRequest, DeleteRangeRequest, DowngradeRequest, HashKvRequest, HashRequest, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, MemberAddRequest,
    MemberListRequest, MemberPromoteRequest, MemberRemoveRequest, MemberUpdateRequest, MoveLeaderRequest,
    PutRequest, RangeRequest, RequestOp, SnapshotRequest, StatusRequest, TxnRequest,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

mod common;

const LIMIT: Duration = Duration::from_secs(20);

/// grpc-gateway's HTTP status for a gRPC code (written out here independently of the server).
fn http_of(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 408,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::Unauthenticated => 401,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

/// Sends one HTTP/1.1 request on a new connection; returns the response with its body unread.
async fn send(addr: &str, method: &str, path: &str, body: impl Into<Bytes>) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    tokio::time::timeout(LIMIT, sender.send_request(request)).await.expect("answer in time").expect("answer")
}

/// A unary call over HTTP/2 without TLS (h2c, prior knowledge), as gRPC uses the port.
async fn post_h2(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

/// A unary call: status and JSON body.
async fn call(addr: &str, method: &str, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let response = send(addr, method, path, body).await;
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json", "{path}");
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    call(addr, "POST", path, body.to_string()).await
}

/// The JSON of a message in grpc-gateway's mapping (what chorus-proto's serde impls give).
fn json_of<T: Serialize>(message: &T) -> Value {
    serde_json::to_value(message).unwrap()
}

fn without(mut value: Value, fields: &[&str]) -> Value {
    if let Value::Object(map) = &mut value {
        for field in fields.iter().chain(&["header"]) {
            map.remove(*field);
        }
    }
    value
}

/// Posts `request` as JSON to `path` and checks the answer against the gRPC one:
/// the same body (without the header and `volatile` fields) or the same error.
/// Returns the HTTP body.
async fn same_as_grpc<Req: Serialize, Resp: Serialize>(
    addr: &str,
    path: &str,
    request: &Req,
    grpc: Result<tonic::Response<Resp>, Status>,
    volatile: &[&str],
) -> Value {
    let (status, body) = post(addr, path, &json_of(request)).await;
    match grpc {
        Ok(response) => {
            assert_eq!(status, 200, "{path}: {body}");
            assert_eq!(
                without(body.clone(), volatile),
                without(json_of(response.get_ref()), volatile),
                "{path}: HTTP and gRPC answers differ"
            );
        }
        Err(grpc_status) => {
            assert_eq!(status, http_of(grpc_status.code()), "{path}: {body} vs {grpc_status:?}");
            assert_eq!(body["code"], json!(grpc_status.code() as i32), "{path}: {body}");
            assert_eq!(body["message"], json!(grpc_status.message()), "{path}: {body}");
            assert_eq!(body["error"], json!(grpc_status.message()), "{path}: {body}");
        }
    }
    body
}

/// Reads the next `\n`-terminated JSON object of a streaming answer, waiting at most `limit`.
async fn next_chunk(body: &mut Incoming, buffer: &mut Vec<u8>, limit: Duration) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            return Some(serde_json::from_slice(&line).expect("a JSON chunk"));
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buffer.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) => panic!("stream failed: {e}"),
            Ok(None) => {
                assert!(buffer.iter().all(u8::is_ascii_whitespace), "unterminated chunk");
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// All chunks of a streaming answer that ends.
async fn all_chunks(addr: &str, path: &str, body: String) -> Vec<Value> {
    let response = send(addr, "POST", path, body).await;
    assert_eq!(response.status(), 200, "{path}");
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut chunks = Vec::new();
    while let Some(chunk) = next_chunk(&mut body, &mut buffer, LIMIT).await {
        chunks.push(chunk);
    }
    chunks
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("gRPC connect")
}

async fn grpc_revision(kv: &mut KvClient<Channel>) -> i64 {
    let request = RangeRequest { key: b"any".to_vec(), ..Default::default() };
    kv.range(request).await.unwrap().into_inner().header.unwrap().revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_answers_as_grpc_does() {
    let mut cluster = common::Cluster::start(3, &[]);
    let leader = cluster.wait_leader(LIMIT).await;
    let addr = cluster.endpoint(leader);
    let grpc = channel(&addr).await;
    let mut kv = KvClient::new(grpc.clone());
    let mut lease = LeaseClient::new(grpc.clone());
    let mut members = ClusterClient::new(grpc.clone());
    let mut maintenance = MaintenanceClient::new(grpc.clone());

    let (status, version) = call(&addr, "GET", "/version", "").await;
    assert_eq!((status, version), (200, json!({"etcdserver": "3.5.0", "etcdcluster": "3.5.0"})));
    let (status, health) = call(&addr, "GET", "/health", "").await;
    assert_eq!((status, health), (200, json!({"health": "true", "reason": ""})));

    // KV: writes through HTTP, read back through gRPC and HTTP.
    let (status, put) = post(&addr, "/v3/kv/put", &json!({"key": b64(b"gw/a"), "value": b64(b"1")})).await;
    assert_eq!(status, 200, "{put}");
    let put_revision: i64 = put["header"]["revision"].as_str().unwrap().parse().unwrap();
    let request = RangeRequest { key: b"gw/a".to_vec(), ..Default::default() };
    let range = same_as_grpc(&addr, "/v3/kv/range", &request, kv.range(request.clone()).await, &[]).await;
    assert_eq!(range["kvs"][0]["value"], json!(b64(b"1")));
    assert_eq!(range["kvs"][0]["mod_revision"], json!(put_revision.to_string()), "64-bit ints as strings");
    assert_eq!(range["count"], json!("1"));
    let (status, over_h2) = post_h2(&addr, "/v3/kv/range", &json_of(&request)).await;
    assert_eq!(status, 200, "{over_h2}");
    assert_eq!(over_h2["kvs"], range["kvs"], "the same answer over HTTP/2");
    // The request in grpc-gateway's other accepted shapes: numbers for int64, enum numbers.
    let (status, sorted) = post(
        &addr,
        "/v3/kv/range",
        &json!({"key": b64(b"gw/"), "range_end": b64(b"gw0"), "limit": 5, "sort_order": 2, "sort_target": "KEY"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sorted["kvs"], range["kvs"]);

    let put = PutRequest { key: b"gw/b".to_vec(), value: b"2".to_vec(), prev_kv: true, ..Default::default() };
    let (status, _) = post(&addr, "/v3/kv/put", &json_of(&put)).await;
    assert_eq!(status, 200);
    let request = RangeRequest { key: b"gw/".to_vec(), range_end: b"gw0".to_vec(), ..Default::default() };
    same_as_grpc(&addr, "/v3/kv/range", &request, kv.range(request.clone()).await, &[]).await;

    let txn = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: b"gw/a".to_vec(),
            target_union: Some(compare::TargetUnion::Value(b"1".to_vec())),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"gw/c".to_vec(),
                value: b"3".to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![],
    };
    let (status, answer) = post(&addr, "/v3/kv/txn", &json_of(&txn)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["succeeded"], json!(true));
    let got = kv.range(RangeRequest { key: b"gw/c".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(got.into_inner().kvs[0].value, b"3");
    // A read-only txn answers the same on both.
    let read_txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"gw/".to_vec(),
                range_end: b"gw0".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    same_as_grpc(&addr, "/v3/kv/txn", &read_txn, kv.txn(read_txn.clone()).await, &[]).await;
    // Errors: the same status and etcd message on both.
    let bad = PutRequest::default();
    same_as_grpc(&addr, "/v3/kv/put", &bad, kv.put(bad.clone()).await, &[]).await;

    let delete = DeleteRangeRequest { key: b"gw/c".to_vec(), prev_kv: true, ..Default::default() };
    let (status, deleted) = post(&addr, "/v3/kv/deleterange", &json_of(&delete)).await;
    assert_eq!((status, &deleted["deleted"]), (200, &json!("1")), "{deleted}");
    assert_eq!(deleted["prev_kvs"][0]["key"], json!(b64(b"gw/c")));
    let gone = kv.range(RangeRequest { key: b"gw/c".to_vec(), ..Default::default() }).await.unwrap();
    assert!(gone.into_inner().kvs.is_empty());
    // Deleting nothing: the same answer (no `deleted` field: zero values are left out).
    let none = DeleteRangeRequest { key: b"gw/none".to_vec(), ..Default::default() };
    let body =
        same_as_grpc(&addr, "/v3/kv/deleterange", &none, kv.delete_range(none.clone()).await, &[]).await;
    assert!(body.get("deleted").is_none(), "{body}");

    let compact = CompactionRequest { revision: put_revision, physical: false };
    let (status, _) = post(&addr, "/v3/kv/compaction", &json_of(&compact)).await;
    assert_eq!(status, 200);
    let old = RangeRequest { key: b"gw/a".to_vec(), revision: put_revision - 1, ..Default::default() };
    let body = same_as_grpc(&addr, "/v3/kv/range", &old, kv.range(old.clone()).await, &[]).await;
    assert_eq!(body["message"], json!("etcdserver: mvcc: required revision has been compacted"));
    let again = CompactionRequest { revision: put_revision - 1, physical: false };
    same_as_grpc(&addr, "/v3/kv/compaction", &again, kv.compact(again).await, &[]).await;

    // Lease.
    let (status, granted) = post(&addr, "/v3/lease/grant", &json!({"TTL": "30"})).await;
    assert_eq!(status, 200, "{granted}");
    let id: i64 = granted["ID"].as_str().unwrap().parse().unwrap();
    assert_eq!(granted["TTL"], json!("30"));
    let put =
        PutRequest { key: b"gw/leased".to_vec(), value: b"x".to_vec(), lease: id, ..Default::default() };
    assert_eq!(post(&addr, "/v3/kv/put", &json_of(&put)).await.0, 200);
    let ttl = LeaseTimeToLiveRequest { id, keys: true };
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        let body = same_as_grpc(&addr, path, &ttl, lease.lease_time_to_live(ttl).await, &["TTL"]).await;
        assert_eq!(body["keys"], json!([b64(b"gw/leased")]));
        assert_eq!(body["grantedTTL"], json!("30"));
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let request = LeaseLeasesRequest {};
        let body = same_as_grpc(&addr, path, &request, lease.lease_leases(request).await, &[]).await;
        assert_eq!(body["leases"], json!([{"ID": id.to_string()}]));
    }
    let chunks = all_chunks(&addr, "/v3/lease/keepalive", json!({"ID": id.to_string()}).to_string()).await;
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0]["result"]["ID"], json!(id.to_string()));
    assert_eq!(chunks[0]["result"]["TTL"], json!("30"));
    let revoke = LeaseRevokeRequest { id };
    assert_eq!(post(&addr, "/v3/kv/lease/revoke", &json_of(&revoke)).await.0, 200);
    let leased = kv.range(RangeRequest { key: b"gw/leased".to_vec(), ..Default::default() }).await.unwrap();
    assert!(leased.into_inner().kvs.is_empty(), "revoking deletes the lease's keys");
    let body = same_as_grpc(&addr, "/v3/lease/revoke", &revoke, lease.lease_revoke(revoke).await, &[]).await;
    assert_eq!(
        (body["code"].clone(), body["error"].clone()),
        (json!(5), json!("etcdserver: requested lease not found"))
    );
    let grant = LeaseGrantRequest { ttl: 10, id: 0 };
    let (status, _) = post(&addr, "/v3/lease/grant", &json_of(&grant)).await;
    assert_eq!(status, 200);
    let taken = LeaseGrantRequest { ttl: 10, id: 4242 };
    assert_eq!(post(&addr, "/v3/lease/grant", &json_of(&taken)).await.0, 200);
    same_as_grpc(&addr, "/v3/lease/grant", &taken, lease.lease_grant(taken).await, &[]).await;

    // Cluster.
    let list = MemberListRequest { linearizable: false };
    let body =
        same_as_grpc(&addr, "/v3/cluster/member/list", &list, members.member_list(list).await, &[]).await;
    assert_eq!(body["members"].as_array().unwrap().len(), 3, "{body}");
    // Refused alike on both paths (a member really added would change the cluster under the test).
    let add = MemberAddRequest { peer_ur_ls: vec![], is_learner: false };
    same_as_grpc(&addr, "/v3/cluster/member/add", &add, members.member_add(add.clone()).await, &[]).await;
    let remove = MemberRemoveRequest { id: 1 };
    same_as_grpc(&addr, "/v3/cluster/member/remove", &remove, members.member_remove(remove).await, &[]).await;
    let update = MemberUpdateRequest { id: 1, peer_ur_ls: vec![] };
    let answer = members.member_update(update.clone()).await;
    same_as_grpc(&addr, "/v3/cluster/member/update", &update, answer, &[]).await;
    let promote = MemberPromoteRequest { id: 1 };
    let answer = members.member_promote(promote).await;
    same_as_grpc(&addr, "/v3/cluster/member/promote", &promote, answer, &[]).await;

    // Maintenance.
    let volatile = ["raftIndex", "raftAppliedIndex", "dbSize", "dbSizeInUse", "raftTerm"];
    let status = StatusRequest {};
    let body =
        same_as_grpc(&addr, "/v3/maintenance/status", &status, maintenance.status(status).await, &volatile)
            .await;
    assert_eq!(body["version"], json!("3.5.0"));
    let alarm = AlarmRequest::default();
    same_as_grpc(&addr, "/v3/maintenance/alarm", &alarm, maintenance.alarm(alarm).await, &[]).await;
    let defragment = DefragmentRequest {};
    let answer = maintenance.defragment(defragment).await;
    same_as_grpc(&addr, "/v3/maintenance/defragment", &defragment, answer, &[]).await;
    let hash = HashRequest {};
    same_as_grpc(&addr, "/v3/maintenance/hash", &hash, maintenance.hash(hash).await, &[]).await;
    let hash_kv = HashKvRequest { revision: 0 };
    same_as_grpc(&addr, "/v3/maintenance/hashkv", &hash_kv, maintenance.hash_kv(hash_kv).await, &[]).await;
    // A backup over gRPC and over HTTP: pieces that count down to zero remaining
    // bytes and join into a backup file with a good SHA-256, of the same revision.
    let mut grpc_backup = Vec::new();
    let mut pieces = maintenance.snapshot(SnapshotRequest {}).await.expect("snapshot").into_inner();
    while let Some(piece) = pieces.message().await.expect("snapshot piece") {
        grpc_backup.extend_from_slice(&piece.blob);
    }
    let grpc_image = chorus_core::snapshot::decode_backup(&grpc_backup).expect("a whole backup over gRPC");
    let chunks = all_chunks(&addr, "/v3/maintenance/snapshot", "{}".to_string()).await;
    let mut http_backup = Vec::new();
    for chunk in &chunks {
        let blob = chunk["result"]["blob"].as_str().unwrap_or_else(|| panic!("{chunk}"));
        use base64::Engine;
        http_backup.extend(base64::engine::general_purpose::STANDARD.decode(blob).expect("base64 blob"));
    }
    // The last piece has no bytes remaining (a zero is left out of the JSON, as every default is).
    let remaining = &chunks.last().unwrap()["result"]["remaining_bytes"];
    assert!(remaining.is_null() || remaining == &json!("0"), "{remaining}");
    let http_image = chorus_core::snapshot::decode_backup(&http_backup).expect("a whole backup over HTTP");
    assert_eq!(http_image.compact_revision, grpc_image.compact_revision);
    assert_eq!(http_image.kv, grpc_image.kv, "both backups hold the same key space");
    let move_leader = MoveLeaderRequest { target_id: 12345 };
    let answer = maintenance.move_leader(move_leader).await;
    same_as_grpc(&addr, "/v3/maintenance/transfer-leadership", &move_leader, answer, &[]).await;
    let downgrade = DowngradeRequest::default();
    let answer = maintenance.downgrade(downgrade.clone()).await;
    same_as_grpc(&addr, "/v3/maintenance/downgrade", &downgrade, answer, &[]).await;

    // Paths and methods nobody serves.
    let (status, body) = post(&addr, "/v3/nothing/here", &json!({})).await;
    assert_eq!((status, body), (404, json!({"error": "Not Found", "code": 5, "message": "Not Found"})));
    let (status, body) = call(&addr, "GET", "/v3/kv/range", "").await;
    assert_eq!((status, body["code"].clone()), (405, json!(12)));
    // Auth: off, and the rest answers Unimplemented with a sentence, alike on both.
    let auth = AuthClient::new(grpc.clone()).auth_status(AuthStatusRequest {}).await.expect("auth status");
    assert!(!auth.get_ref().enabled);
    let (status, body) = post(&addr, "/v3/auth/status", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["enabled"], json!(true), "{body}");
    let users = AuthClient::new(grpc.clone()).user_list(AuthUserListRequest {}).await.unwrap_err();
    assert_eq!(users.code(), Code::Unimplemented);
    assert!(users.message().contains("does not support authentication"), "{users:?}");
    let (status, body) = post(&addr, "/v3/auth/user/list", &json!({})).await;
    assert_eq!(
        (status, body["code"].clone()),
        (501, json!(12)),
        "Auth answers Unimplemented as on gRPC: {body}"
    );
    assert_eq!(body["message"].as_str(), Some(users.message()), "{body}");

    // Without a quorum the member cannot serve a linearizable read: /health says so.
    let survivor = (leader + 1) % 3;
    let survivor_addr = cluster.endpoint(survivor);
    for i in (0..3).filter(|i| *i != survivor) {
        cluster.kill(i);
    }
    let (status, health) = call(&survivor_addr, "GET", "/health", "").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["health"], json!("false"));
    assert!(health["reason"].as_str().unwrap().starts_with("RANGE ERROR:"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_events_while_open_and_keep_alive_of_an_expired_lease_has_no_ttl() {
    let cluster = common::Cluster::start(1, &[]);
    cluster.wait_leader(LIMIT).await;
    let addr = cluster.endpoint(0);
    let grpc = channel(&addr).await;
    let mut kv = KvClient::new(grpc.clone());
    let mut lease = LeaseClient::new(grpc.clone());
    let granted = Instant::now();
    let (status, short) = post(&addr, "/v3/lease/grant", &json!({"TTL": 5})).await;
    assert_eq!(status, 200);
    let short_id: i64 = short["ID"].as_str().unwrap().parse().unwrap();

    // Two watchers in one body: a key and a prefix.
    let body = format!(
        "{}\n{}",
        json!({"create_request": {"key": b64(b"w/key")}}),
        json!({"create_request": {"key": b64(b"w/p/"), "range_end": b64(b"w/p0"), "prev_kv": true}})
    );
    let response = send(&addr, "POST", "/v3/watch", body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let mut buffer = Vec::new();
    let mut watch_ids = Vec::new();
    for _ in 0..2 {
        let created = next_chunk(&mut stream, &mut buffer, LIMIT).await.expect("created");
        assert_eq!(created["result"]["created"], json!(true), "{created}");
        watch_ids.push(created["result"]["watch_id"].clone());
    }
    assert_ne!(watch_ids[0], watch_ids[1]);

    for (key, value) in
        [(&b"w/key"[..], &b"v1"[..]), (b"w/p/x", b"v2"), (b"w/other", b"no"), (b"w/p/x", b"v3")]
    {
        let put = PutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
        kv.put(put).await.unwrap();
        if key == b"w/other" {
            continue;
        }
        // The event arrives on the still-open stream.
        let started = Instant::now();
        let event =
            next_chunk(&mut stream, &mut buffer, LIMIT).await.expect("an event while the stream is open");
        eprintln!("watch event over HTTP {} ms after the put", started.elapsed().as_millis());
        let events = event["result"]["events"].as_array().unwrap_or_else(|| panic!("{event}"));
        assert_eq!(events.len(), 1, "{event}");
        let expected_id = if key == b"w/key" { &watch_ids[0] } else { &watch_ids[1] };
        assert_eq!(&event["result"]["watch_id"], expected_id, "{event}");
        let now =
            kv.range(RangeRequest { key: key.to_vec(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(events[0]["kv"], json_of(&now.kvs[0]), "the event's kv is the key as gRPC reads it");
        if value == b"v3" {
            assert_eq!(events[0]["prev_kv"]["value"], json!(b64(b"v2")));
        }
    }
    drop(stream);

    // A keep-alive stream for the lease once it has expired answers without a TTL, as etcd.
    let deadline = granted + Duration::from_secs(5) + LIMIT;
    loop {
        let ttl = LeaseTimeToLiveRequest { id: short_id, keys: false };
        let answer = lease.lease_time_to_live(ttl).await.unwrap().into_inner();
        if answer.ttl == -1 {
            break;
        }
        assert!(Instant::now() < deadline, "the lease did not expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("5 s lease seen expired {} ms after the grant", granted.elapsed().as_millis());
    let request = json!({"ID": short_id.to_string()});
    let chunks = all_chunks(&addr, "/v3/lease/keepalive", format!("{request}{request}")).await;
    assert_eq!(chunks.len(), 2, "one answer per request message: {chunks:?}");
    for chunk in &chunks {
        assert_eq!(chunk["result"]["ID"], json!(short_id.to_string()), "{chunk}");
        assert!(chunk["result"].get("TTL").is_none(), "no TTL for an expired lease: {chunk}");
    }
    let (responses, requests) = tokio::sync::mpsc::channel(1);
    responses.send(LeaseKeepAliveRequest { id: short_id }).await.unwrap();
    drop(responses);
    let mut grpc_stream = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let grpc_answer = grpc_stream.message().await.unwrap().expect("a gRPC keep-alive answer");
    assert_eq!(without(chunks[0]["result"].clone(), &[]), without(json_of(&grpc_answer), &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = common::Cluster::start(1, &["--max-request-bytes", "1024"]);
    cluster.wait_leader(LIMIT).await;
    let addr = cluster.endpoint(0);
    let mut kv = KvClient::new(channel(&addr).await);
    let before = grpc_revision(&mut kv).await;

    let big = "A".repeat(200_000);
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("malformed JSON", "/v3/kv/put", r#"{"key": "YQ==", "value""#.into(), 400, "invalid JSON request"),
        ("wrong type", "/v3/kv/put", r#"{"key": "YQ==", "lease": true}"#.into(), 400, "invalid JSON request"),
        ("wrong type of key", "/v3/kv/put", r#"{"key": 5}"#.into(), 400, "invalid JSON request"),
        (
            "bad base64",
            "/v3/kv/put",
            r#"{"key": "not base64!", "value": "YQ=="}"#.into(),
            400,
            "invalid JSON request",
        ),
        (
            "unknown enum",
            "/v3/kv/range",
            r#"{"key": "YQ==", "sort_order": "SIDEWAYS"}"#.into(),
            400,
            "invalid JSON",
        ),
        ("not an object", "/v3/kv/txn", "[1, 2]".into(), 400, "invalid JSON request"),
        (
            "two requests to a unary rpc",
            "/v3/kv/put",
            r#"{"key":"YQ=="}{"key":"Yg=="}"#.into(),
            400,
            "more than 1",
        ),
        (
            "body over the limit",
            "/v3/kv/put",
            format!(r#"{{"key": "YQ==", "value": "{big}"}}"#),
            413,
            "larger than max",
        ),
        (
            "request over --max-request-bytes",
            "/v3/kv/put",
            format!(r#"{{"key": "YQ==", "value": "{}"}}"#, "A".repeat(4000)),
            400,
            "etcdserver: request is too large",
        ),
        (
            "malformed watch",
            "/v3/watch",
            r#"{"create_request": {"key": 1}}"#.into(),
            400,
            "invalid JSON request",
        ),
        (
            "malformed txn in a watch body",
            "/v3/watch",
            r#"{"create_request": {}} {"#.into(),
            400,
            "invalid JSON",
        ),
    ];
    for (what, path, body, status, message) in cases {
        let (got_status, got) = call(&addr, "POST", path, body).await;
        assert_eq!(got_status, status, "{what}: {got}");
        let text = got["message"].as_str().unwrap_or_else(|| panic!("{what}: {got}"));
        assert!(text.contains(message), "{what}: {got}");
        assert_eq!(got["error"], got["message"], "{what}");
        assert!(got["code"].as_i64().is_some(), "{what}: {got}");
        eprintln!("{what}: {got_status} {text}");
        assert_eq!(grpc_revision(&mut kv).await, before, "{what} changed the store");
    }
    let missing = kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() }).await.unwrap();
    assert!(missing.into_inner().kvs.is_empty());
    // gRPC's own limit is unchanged: a message over it is refused before decoding.
    let huge = PutRequest { key: b"a".to_vec(), value: vec![b'x'; 200_000], ..Default::default() };
    let refused = kv.put(huge).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    // A good request still works afterwards.
    let (status, _) = post(&addr, "/v3/kv/put", &json!({"key": "YQ==", "value": "Yg=="})).await;
    assert_eq!(status, 200);
    assert_eq!(grpc_revision(&mut kv).await, before + 1);
}

/// Lock and Election over the gateway, each answer checked against gRPC's view, and
/// the `chorus-fence` header honoured on `/v3/kv/put` as the gRPC metadata is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_election_and_fences_over_http() {
    use chorus_proto::v3electionpb::election_client::ElectionClient;
    use chorus_proto::v3electionpb::LeaderRequest;
    let cluster = common::Cluster::start(3, &[]);
    let leader = cluster.wait_leader(LIMIT).await;
    let addr = cluster.endpoint(leader);
    let grpc = channel(&addr).await;
    let mut kv = KvClient::new(grpc.clone());
    let mut elections = ElectionClient::new(grpc);

    let (status, granted) = post(&addr, "/v3/lease/grant", &json!({"TTL": "30"})).await;
    assert_eq!(status, 200, "{granted}");
    let lease = granted["ID"].as_str().unwrap().to_string();
    let (status, locked) = post(&addr, "/v3/lock/lock", &json!({"name": b64(b"res"), "lease": lease})).await;
    assert_eq!(status, 200, "{locked}");
    let key = locked["key"].as_str().unwrap().to_string();
    let range =
        kv.range(RangeRequest { key: base64_decode(&key), ..Default::default() }).await.unwrap().into_inner();
    let token = range.kvs[0].create_revision;

    // A fenced put over HTTP: the current token applies, a stale one is refused with
    // the gRPC status's HTTP code and message.
    let fenced_put = |fence: String, value: &str| {
        let body = json!({"key": b64(b"data"), "value": b64(value.as_bytes())}).to_string();
        let output = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H", &format!("chorus-fence: {fence}"), "-d", &body])
            .arg(format!("http://{addr}/v3/kv/put"))
            .output()
            .expect("curl runs");
        let text = String::from_utf8(output.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };
    assert_eq!(fenced_put(format!("res:{token}"), "v1").0, "200");
    let (code, body) = fenced_put(format!("res:{}", token - 1), "stale");
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("is stale"), "{body}");
    let (status, unlocked) = post(&addr, "/v3/lock/unlock", &json!({"key": key})).await;
    assert_eq!(status, 200, "{unlocked}");

    // Election: campaign, leader (same as gRPC), proclaim, resign, no leader.
    let name = b64(b"pool");
    let (status, campaign) =
        post(&addr, "/v3/election/campaign", &json!({"name": name, "lease": lease, "value": b64(b"one")}))
            .await;
    assert_eq!(status, 200, "{campaign}");
    let leader_key = campaign["leader"].clone();
    let (status, answer) = post(&addr, "/v3/election/leader", &json!({"name": name})).await;
    assert_eq!(status, 200);
    let grpc_leader = elections.leader(LeaderRequest { name: b"pool".to_vec() }).await.unwrap().into_inner();
    assert_eq!(answer["kv"], json_of(&grpc_leader.kv));
    let (status, _) =
        post(&addr, "/v3/election/proclaim", &json!({"leader": leader_key, "value": b64(b"two")})).await;
    assert_eq!(status, 200);
    let grpc_leader = elections.leader(LeaderRequest { name: b"pool".to_vec() }).await.unwrap().into_inner();
    assert_eq!(grpc_leader.kv.unwrap().value, b"two");
    let (status, _) = post(&addr, "/v3/election/resign", &json!({"leader": leader_key})).await;
    assert_eq!(status, 200);
    let (status, error) = post(&addr, "/v3/election/leader", &json!({"name": name})).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["message"], "election: no leader");
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}
