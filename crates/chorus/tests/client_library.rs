//! The `chorus-client` library against a real cluster: by default a three-member chorus
//! cluster of real processes started by each test; set `CHORUS_TEST_ENDPOINTS` (comma
//! separated) to run the same tests against another cluster, for example etcd, to check
//! compatibility. An unreachable cluster is a failure, never a skip.
//!
//! Every test works under its own fresh key prefix, so tests can run in parallel, repeatedly,
//! against a cluster that holds other data. They never compact, which would affect others.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_client::proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use chorus_client::{prefix_range_end, Client, ClientOptions};

mod common;

const ENDPOINTS_VARIABLE: &str = "CHORUS_TEST_ENDPOINTS";

/// The client for the cluster under test, and the cluster itself when this test
/// started one (it stops when dropped).
async fn cluster_client(test_name: &str) -> (Option<common::Cluster>, Client) {
    let (cluster, endpoints) = match std::env::var(ENDPOINTS_VARIABLE) {
        Ok(endpoints) => {
            let endpoints: Vec<String> = endpoints
                .split(',')
                .map(|endpoint| endpoint.trim().to_string())
                .filter(|endpoint| !endpoint.is_empty())
                .collect();
            (None, endpoints)
        }
        Err(_) => {
            let cluster = common::Cluster::start(3, &[]);
            cluster.wait_leader(Duration::from_secs(20)).await;
            let endpoints = cluster.endpoints();
            (Some(cluster), endpoints)
        }
    };
    let options = ClientOptions { request_timeout: Duration::from_secs(10), ..ClientOptions::default() };
    let client = Client::connect(&endpoints, options)
        .await
        .unwrap_or_else(|error| panic!("{test_name}: {endpoints:?}: {error}"));
    (cluster, client)
}

/// A key prefix no other run or test uses.
fn unique_prefix(test_name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
    format!("chorus-client-test/{test_name}/{}-{nanos}/", std::process::id())
}

fn range_of(prefix: &str) -> RangeRequest {
    RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: prefix_range_end(prefix.as_bytes()),
        ..RangeRequest::default()
    }
}

#[tokio::test]
async fn put_then_get_returns_the_latest_value() {
    let (_cluster, client) = cluster_client("put_then_get").await;
    let key = format!("{}key", unique_prefix("put_then_get"));

    let missing = client.get(key.clone()).await.unwrap();
    assert!(missing.kvs.is_empty());
    assert_eq!(missing.count, 0);

    let first = client.put(key.clone(), "one").await.unwrap();
    let first_revision = first.header.expect("put has a header").revision;
    assert!(first_revision > 0);

    let second = client
        .put_with(PutRequest {
            key: key.clone().into_bytes(),
            value: b"two".to_vec(),
            prev_kv: true,
            ..PutRequest::default()
        })
        .await
        .unwrap();
    let prev_kv = second.prev_kv.expect("prev_kv was asked for");
    assert_eq!(prev_kv.value, b"one");
    assert_eq!(prev_kv.mod_revision, first_revision);
    let second_revision = second.header.expect("put has a header").revision;
    assert!(second_revision > first_revision);

    let read = client.get(key.clone()).await.unwrap();
    assert_eq!(read.count, 1);
    let kv = &read.kvs[0];
    assert_eq!(kv.key, key.as_bytes());
    assert_eq!(kv.value, b"two");
    assert_eq!(kv.version, 2);
    assert_eq!(kv.create_revision, first_revision);
    assert_eq!(kv.mod_revision, second_revision);
    assert!(read.header.expect("range has a header").revision >= second_revision);
}

#[tokio::test]
async fn prefix_range_and_delete_stay_inside_the_prefix() {
    let (_cluster, client) = cluster_client("prefix").await;
    let base = unique_prefix("prefix");
    let prefix = format!("{base}dir/");
    for name in ["c", "a", "b"] {
        client.put(format!("{prefix}{name}"), name).await.unwrap();
    }
    // '0' is the byte after '/', so this key sorts right after the prefix's range.
    let outside = format!("{base}dir0");
    client.put(outside.clone(), "outside").await.unwrap();

    let all = client.range(range_of(&prefix)).await.unwrap();
    assert_eq!(all.count, 3);
    let keys: Vec<Vec<u8>> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    let expected: Vec<Vec<u8>> =
        ["a", "b", "c"].iter().map(|name| format!("{prefix}{name}").into_bytes()).collect();
    assert_eq!(keys, expected, "keys in ascending order");

    let limited =
        client.range(RangeRequest { limit: 2, keys_only: true, ..range_of(&prefix) }).await.unwrap();
    assert_eq!(limited.kvs.len(), 2);
    assert!(limited.more);
    assert_eq!(limited.count, 3);
    assert!(limited.kvs.iter().all(|kv| kv.value.is_empty()));

    let deleted = client
        .delete(DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_range_end(prefix.as_bytes()),
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(deleted.deleted, 3);
    let mut deleted_values: Vec<Vec<u8>> = deleted.prev_kvs.iter().map(|kv| kv.value.clone()).collect();
    deleted_values.sort();
    assert_eq!(deleted_values, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);

    let after = client.range(range_of(&prefix)).await.unwrap();
    assert_eq!(after.count, 0);
    let outside_read = client.get(outside).await.unwrap();
    assert_eq!(outside_read.kvs[0].value, b"outside");
}

fn value_equals(key: &str, value: &str) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Value as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::Value(value.as_bytes().to_vec())),
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..PutRequest::default()
        })),
    }
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..RangeRequest::default()
        })),
    }
}

#[tokio::test]
async fn txn_runs_the_branch_its_compares_choose() {
    let (_cluster, client) = cluster_client("txn").await;
    let prefix = unique_prefix("txn");
    let (lock, owner) = (format!("{prefix}lock"), format!("{prefix}owner"));
    client.put(lock.clone(), "free").await.unwrap();

    // The compare holds: the success branch runs, and its get sees its own put.
    let taken = client
        .txn(TxnRequest {
            compare: vec![value_equals(&lock, "free")],
            success: vec![put_op(&lock, "taken"), put_op(&owner, "me"), get_op(&lock)],
            failure: vec![get_op(&lock)],
        })
        .await
        .unwrap();
    assert!(taken.succeeded);
    assert_eq!(taken.responses.len(), 3);
    match &taken.responses[2].response {
        Some(response_op::Response::ResponseRange(range)) => {
            assert_eq!(range.kvs[0].value, b"taken")
        }
        other => panic!("expected a range response, got {other:?}"),
    }

    // The same compare now fails: the failure branch runs and nothing is written.
    let refused = client
        .txn(TxnRequest {
            compare: vec![value_equals(&lock, "free")],
            success: vec![put_op(&owner, "someone else")],
            failure: vec![get_op(&owner)],
        })
        .await
        .unwrap();
    assert!(!refused.succeeded);
    match &refused.responses[..] {
        [op] => match &op.response {
            Some(response_op::Response::ResponseRange(range)) => {
                assert_eq!(range.kvs[0].value, b"me")
            }
            other => panic!("expected a range response, got {other:?}"),
        },
        other => panic!("expected one response, got {other:?}"),
    }

    // A compare on a missing key's version (0) is how "create if absent" is written.
    let absent = format!("{prefix}absent");
    let created = client
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Version as i32,
                key: absent.as_bytes().to_vec(),
                range_end: Vec::new(),
                target_union: Some(compare::TargetUnion::Version(0)),
            }],
            success: vec![put_op(&absent, "created")],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(created.succeeded);
    assert_eq!(client.get(absent).await.unwrap().kvs[0].value, b"created");
}

#[tokio::test]
async fn every_endpoint_reports_its_status() {
    let (_cluster, client) = cluster_client("status").await;
    for endpoint in client.endpoints() {
        let status = client.status(&endpoint).await.unwrap_or_else(|error| panic!("{endpoint}: {error}"));
        let header = status.header.expect("status has a header");
        assert_ne!(header.member_id, 0, "{endpoint}: member id");
        assert_ne!(status.leader, 0, "{endpoint}: a leader is known");
        assert!(status.raft_applied_index <= status.raft_index, "{endpoint}: {status:?}");
    }
    let members = client.member_list().await.unwrap();
    assert!(!members.members.is_empty());
}
