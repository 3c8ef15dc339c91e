//! Table tests for the MVCC store and request validation: etcd's range, compare,
//! txn and compaction semantics, case by case, and restore from persisted records.

// Each table is a slice of tuple rows whose columns are named in the line above
// it; a named type per table would add more lines than it would explain.
#![allow(clippy::type_complexity)]

use std::collections::BTreeMap;

use chorus_core::limits::Limits;
use chorus_core::mvcc::{prefix_range_end, ChangeKind, MvccStore, RevKey, Revision, WriteSet};
use chorus_core::validate::{
    validate_compaction, validate_delete_range, validate_put, validate_range, validate_txn,
};
use chorus_core::KvError;
use chorus_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use chorus_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use chorus_proto::etcdserverpb::request_op::Request;
use chorus_proto::etcdserverpb::response_op::Response;
use chorus_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    TxnRequest, TxnResponse,
};
use chorus_proto::mvccpb::KeyValue;
use prost::Message;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn put_request(key: &str, value: &str) -> PutRequest {
    PutRequest { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec(), ..PutRequest::default() }
}

fn range_request(key: &[u8], range_end: &[u8]) -> RangeRequest {
    RangeRequest { key: key.to_vec(), range_end: range_end.to_vec(), ..RangeRequest::default() }
}

fn delete_request(key: &[u8], range_end: &[u8]) -> DeleteRangeRequest {
    DeleteRangeRequest { key: key.to_vec(), range_end: range_end.to_vec(), prev_kv: true }
}

/// Puts `key` = `value` and returns the new store revision.
fn put(store: &mut MvccStore, key: &str, value: &str) -> i64 {
    let response = store.put(&put_request(key, value), &mut WriteSet::default()).expect("put");
    response.header.expect("header").revision
}

fn delete(store: &mut MvccStore, key: &str) -> i64 {
    let response =
        store.delete_range(&delete_request(key.as_bytes(), b""), &mut WriteSet::default()).expect("delete");
    response.header.expect("header").revision
}

fn get(store: &MvccStore, key: &str, revision: i64) -> Option<KeyValue> {
    let mut request = range_request(key.as_bytes(), b"");
    request.revision = revision;
    let response = store.range(&request).expect("range");
    assert!(response.kvs.len() <= 1);
    response.kvs.into_iter().next()
}

fn keys_of(response: &RangeResponse) -> Vec<String> {
    response.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
}

fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> KeyValue {
    KeyValue {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: 0,
    }
}

fn op(request: Request) -> RequestOp {
    RequestOp { request: Some(request) }
}

fn op_put(key: &str, value: &str) -> RequestOp {
    op(Request::RequestPut(put_request(key, value)))
}

fn op_range(key: &[u8], range_end: &[u8]) -> RequestOp {
    op(Request::RequestRange(range_request(key, range_end)))
}

fn op_delete(key: &[u8], range_end: &[u8]) -> RequestOp {
    op(Request::RequestDeleteRange(delete_request(key, range_end)))
}

fn op_txn(txn: TxnRequest) -> RequestOp {
    op(Request::RequestTxn(txn))
}

fn compare(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(union),
    }
}

fn txn(compares: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest { compare: compares, success, failure }
}

fn range_response(response: &TxnResponse, index: usize) -> &RangeResponse {
    match &response.responses[index].response {
        Some(Response::ResponseRange(range)) => range,
        other => panic!("response {index} is not a range: {other:?}"),
    }
}

/// a, ab, abc, abd, b, c: one key each, revisions 2..=7.
fn store_with_keys() -> MvccStore {
    let mut store = MvccStore::new();
    for key in ["a", "ab", "abc", "abd", "b", "c"] {
        put(&mut store, key, &format!("value of {key}"));
    }
    store
}

// ---------------------------------------------------------------------------------
// Range forms
// ---------------------------------------------------------------------------------

#[test]
fn range_forms() {
    let store = store_with_keys();
    let prefix_end = prefix_range_end(b"ab");
    let cases: &[(&str, &[u8], &[u8], &[&str])] = &[
        ("single key", b"ab", b"", &["ab"]),
        ("single missing key", b"aa", b"", &[]),
        ("half-open range", b"ab", b"b", &["ab", "abc", "abd"]),
        ("range end is exclusive", b"a", b"abd", &["a", "ab", "abc"]),
        ("prefix", b"ab", &prefix_end, &["ab", "abc", "abd"]),
        ("from key", b"abc", &[0], &["abc", "abd", "b", "c"]),
        ("all keys", &[0], &[0], &["a", "ab", "abc", "abd", "b", "c"]),
        ("range end equal to key is empty", b"ab", b"ab", &[]),
        ("inverted range is empty", b"b", b"a", &[]),
        ("range past every key", b"d", b"z", &[]),
    ];
    for (name, key, range_end, expected) in cases {
        let response = store.range(&range_request(key, range_end)).expect(name);
        assert_eq!(keys_of(&response), *expected, "{name}: keys");
        assert_eq!(response.count, expected.len() as i64, "{name}: count");
        assert!(!response.more, "{name}: more");
        assert_eq!(response.header.expect("header").revision, 7, "{name}: header");
    }
}

#[test]
fn range_returns_full_key_values() {
    let store = store_with_keys();
    let response = store.range(&range_request(b"abc", b"")).expect("range");
    assert_eq!(response.kvs, vec![kv("abc", "value of abc", 4, 4, 1)]);
}

// ---------------------------------------------------------------------------------
// Revision bookkeeping
// ---------------------------------------------------------------------------------

#[test]
fn revision_bookkeeping_across_put_overwrite_delete_recreate() {
    enum Step {
        Put(&'static str, &'static str),
        Delete(&'static str),
    }
    let steps: &[(&str, Step, i64, Option<KeyValue>)] = &[
        ("create", Step::Put("k", "v1"), 2, Some(kv("k", "v1", 2, 2, 1))),
        ("overwrite", Step::Put("k", "v2"), 3, Some(kv("k", "v2", 2, 3, 2))),
        ("overwrite again", Step::Put("k", "v3"), 4, Some(kv("k", "v3", 2, 4, 3))),
        ("other key", Step::Put("other", "o"), 5, Some(kv("k", "v3", 2, 4, 3))),
        ("delete", Step::Delete("k"), 6, None),
        ("delete missing key changes nothing", Step::Delete("k"), 6, None),
        ("re-create starts a new generation", Step::Put("k", "v4"), 7, Some(kv("k", "v4", 7, 7, 1))),
        ("overwrite in new generation", Step::Put("k", "v5"), 8, Some(kv("k", "v5", 7, 8, 2))),
    ];
    let mut store = MvccStore::new();
    assert_eq!(store.revision(), 1, "empty store");
    for (name, step, revision, expected) in steps {
        let header_revision = match step {
            Step::Put(key, value) => put(&mut store, key, value),
            Step::Delete(key) => delete(&mut store, key),
        };
        assert_eq!(header_revision, *revision, "{name}: header revision");
        assert_eq!(store.revision(), *revision, "{name}: store revision");
        assert_eq!(get(&store, "k", 0), *expected, "{name}: k");
    }
}

#[test]
fn range_at_old_revisions() {
    let mut store = MvccStore::new();
    put(&mut store, "k", "v1"); // 2
    put(&mut store, "j", "j1"); // 3
    put(&mut store, "k", "v2"); // 4
    delete(&mut store, "k"); // 5
    put(&mut store, "k", "v3"); // 6
    let cases: &[(&str, i64, Option<KeyValue>, &[&str])] = &[
        ("before any write", 1, None, &[]),
        ("first put", 2, Some(kv("k", "v1", 2, 2, 1)), &["k"]),
        ("other key written", 3, Some(kv("k", "v1", 2, 2, 1)), &["j", "k"]),
        ("overwritten", 4, Some(kv("k", "v2", 2, 4, 2)), &["j", "k"]),
        ("deleted", 5, None, &["j"]),
        ("re-created", 6, Some(kv("k", "v3", 6, 6, 1)), &["j", "k"]),
        ("zero means current", 0, Some(kv("k", "v3", 6, 6, 1)), &["j", "k"]),
    ];
    for (name, revision, expected, all_keys) in cases {
        assert_eq!(get(&store, "k", *revision), *expected, "{name}: k");
        let mut request = range_request(&[0], &[0]);
        request.revision = *revision;
        let response = store.range(&request).expect(name);
        assert_eq!(keys_of(&response), *all_keys, "{name}: all keys");
        assert_eq!(response.count, all_keys.len() as i64, "{name}: count");
        // The header carries the store's revision, not the one read (as in etcd).
        assert_eq!(response.header.expect("header").revision, 6, "{name}: header");
    }
    let mut future = range_request(b"k", b"");
    future.revision = 7;
    assert_eq!(store.range(&future), Err(KvError::FutureRevision { current_revision: 6 }));
}

// ---------------------------------------------------------------------------------
// Limit, count, sort, keys_only, count_only, filters
// ---------------------------------------------------------------------------------

#[test]
fn range_limit_more_and_count() {
    let store = store_with_keys();
    let cases: &[(&str, i64, i64, &[&str], bool, i64)] = &[
        // name, limit, min_mod_revision, keys, more, count
        ("no limit", 0, 0, &["a", "ab", "abc", "abd", "b", "c"], false, 6),
        ("limit below count", 2, 0, &["a", "ab"], true, 6),
        ("limit one below count", 5, 0, &["a", "ab", "abc", "abd", "b"], true, 6),
        ("limit equal to count", 6, 0, &["a", "ab", "abc", "abd", "b", "c"], false, 6),
        ("limit above count", 10, 0, &["a", "ab", "abc", "abd", "b", "c"], false, 6),
        ("filter then limit", 2, 5, &["abd", "b"], true, 6),
        ("filter leaves exactly limit", 3, 5, &["abd", "b", "c"], false, 6),
    ];
    for (name, limit, min_mod, keys, more, count) in cases {
        let mut request = range_request(&[0], &[0]);
        request.limit = *limit;
        request.min_mod_revision = *min_mod;
        let response = store.range(&request).expect(name);
        assert_eq!(keys_of(&response), *keys, "{name}: keys");
        assert_eq!(response.more, *more, "{name}: more");
        assert_eq!(response.count, *count, "{name}: count");
    }
}

/// a: version 1, create 3, mod 3, value z; b: version 3, create 4, mod 7, value u;
/// c: version 2, create 2, mod 5, value w. Every target orders them differently.
fn store_for_sorting() -> MvccStore {
    let mut store = MvccStore::new();
    put(&mut store, "c", "x"); // 2
    put(&mut store, "a", "z"); // 3
    put(&mut store, "b", "y"); // 4
    put(&mut store, "c", "w"); // 5
    put(&mut store, "b", "v"); // 6
    put(&mut store, "b", "u"); // 7
    store
}

#[test]
fn range_every_sort_order_and_target() {
    let store = store_for_sorting();
    use SortOrder::{Ascend, Descend, None as Unsorted};
    use SortTarget::{Create, Key, Mod, Value, Version};
    let cases: &[(&str, SortOrder, SortTarget, [&str; 3])] = &[
        ("none by key", Unsorted, Key, ["a", "b", "c"]),
        ("none by version sorts ascending", Unsorted, Version, ["a", "c", "b"]),
        ("none by create sorts ascending", Unsorted, Create, ["c", "a", "b"]),
        ("none by mod sorts ascending", Unsorted, Mod, ["a", "c", "b"]),
        ("none by value sorts ascending", Unsorted, Value, ["b", "c", "a"]),
        ("ascend by key", Ascend, Key, ["a", "b", "c"]),
        ("ascend by version", Ascend, Version, ["a", "c", "b"]),
        ("ascend by create", Ascend, Create, ["c", "a", "b"]),
        ("ascend by mod", Ascend, Mod, ["a", "c", "b"]),
        ("ascend by value", Ascend, Value, ["b", "c", "a"]),
        ("descend by key", Descend, Key, ["c", "b", "a"]),
        ("descend by version", Descend, Version, ["b", "c", "a"]),
        ("descend by create", Descend, Create, ["b", "a", "c"]),
        ("descend by mod", Descend, Mod, ["b", "c", "a"]),
        ("descend by value", Descend, Value, ["a", "c", "b"]),
    ];
    for (name, order, target, expected) in cases {
        let mut request = range_request(&[0], &[0]);
        request.sort_order = *order as i32;
        request.sort_target = *target as i32;
        let response = store.range(&request).expect(name);
        assert_eq!(keys_of(&response), expected.to_vec(), "{name}");
    }
}

#[test]
fn range_sort_then_limit_and_stable_ties() {
    let mut store = MvccStore::new();
    for key in ["d", "b", "a", "c"] {
        put(&mut store, key, "same");
    }
    put(&mut store, "c", "same"); // c: version 2
    let cases: &[(&str, SortOrder, SortTarget, i64, &[&str], bool)] = &[
        ("descend by mod, limited", SortOrder::Descend, SortTarget::Mod, 2, &["c", "a"], true),
        (
            "ascend by value ties in key order",
            SortOrder::Ascend,
            SortTarget::Value,
            0,
            &["a", "b", "c", "d"],
            false,
        ),
        (
            "descend by version ties in key order",
            SortOrder::Descend,
            SortTarget::Version,
            3,
            &["c", "a", "b"],
            true,
        ),
    ];
    for (name, order, target, limit, expected, more) in cases {
        let mut request = range_request(&[0], &[0]);
        request.sort_order = *order as i32;
        request.sort_target = *target as i32;
        request.limit = *limit;
        let response = store.range(&request).expect(name);
        assert_eq!(keys_of(&response), *expected, "{name}");
        assert_eq!(response.more, *more, "{name}: more");
        assert_eq!(response.count, 4, "{name}: count");
    }
}

#[test]
fn range_keys_only_and_count_only() {
    let store = store_with_keys();
    let mut keys_only = range_request(b"ab", &prefix_range_end(b"ab"));
    keys_only.keys_only = true;
    let response = store.range(&keys_only).expect("keys_only");
    let mut expected = kv("abc", "", 4, 4, 1);
    assert_eq!(response.kvs.len(), 3, "keys_only: kvs");
    assert_eq!(response.kvs[1], expected.clone(), "keys_only: value stripped, rest kept");
    assert!(response.kvs.iter().all(|kv| kv.value.is_empty()));

    let mut count_only = range_request(b"ab", &prefix_range_end(b"ab"));
    count_only.count_only = true;
    count_only.limit = 1;
    let response = store.range(&count_only).expect("count_only");
    assert!(response.kvs.is_empty(), "count_only: no kvs");
    assert_eq!(response.count, 3, "count_only: count");
    assert!(!response.more, "count_only: more");
    expected.value = b"value of abc".to_vec();
    assert_eq!(get(&store, "abc", 0), Some(expected), "reads change nothing");
}

#[test]
fn range_min_and_max_filters() {
    let store = store_for_sorting();
    let cases: &[(&str, [i64; 4], &[&str])] = &[
        // [min_mod, max_mod, min_create, max_create]
        ("no filter", [0, 0, 0, 0], &["a", "b", "c"]),
        ("min mod", [5, 0, 0, 0], &["b", "c"]),
        ("max mod", [0, 5, 0, 0], &["a", "c"]),
        ("min create", [0, 0, 3, 0], &["a", "b"]),
        ("max create", [0, 0, 0, 3], &["a", "c"]),
        ("min and max mod", [4, 6, 0, 0], &["c"]),
        ("min and max create", [0, 0, 3, 3], &["a"]),
        ("nothing passes", [8, 0, 0, 0], &[]),
    ];
    for (name, [min_mod, max_mod, min_create, max_create], expected) in cases {
        let mut request = range_request(&[0], &[0]);
        request.min_mod_revision = *min_mod;
        request.max_mod_revision = *max_mod;
        request.min_create_revision = *min_create;
        request.max_create_revision = *max_create;
        let response = store.range(&request).expect(name);
        assert_eq!(keys_of(&response), *expected, "{name}");
        assert_eq!(response.count, 3, "{name}: count is before filters");
    }
}

#[test]
fn range_rejects_unknown_sort_options() {
    let store = store_with_keys();
    let mut request = range_request(b"a", b"");
    request.sort_order = 7;
    assert_eq!(store.range(&request), Err(KvError::InvalidArgument("invalid sort option".to_string())));
    request.sort_order = 0;
    request.sort_target = 9;
    assert!(matches!(store.range(&request), Err(KvError::InvalidArgument(_))));
}

// ---------------------------------------------------------------------------------
// Put and delete
// ---------------------------------------------------------------------------------

#[test]
fn put_prev_kv_ignore_value_and_ignore_lease() {
    let mut store = MvccStore::new();
    let mut first = put_request("k", "v1");
    first.lease = 42;
    first.prev_kv = true;
    let response = store.put(&first, &mut WriteSet::default()).expect("first");
    assert_eq!(response.prev_kv, None, "no previous value");

    let mut keep_value = put_request("k", "");
    keep_value.ignore_value = true;
    keep_value.lease = 43;
    keep_value.prev_kv = true;
    let response = store.put(&keep_value, &mut WriteSet::default()).expect("ignore_value");
    let mut before = kv("k", "v1", 2, 2, 1);
    before.lease = 42;
    assert_eq!(response.prev_kv, Some(before), "prev_kv");
    let mut after = kv("k", "v1", 2, 3, 2);
    after.lease = 43;
    assert_eq!(get(&store, "k", 0), Some(after.clone()), "value kept, lease replaced");

    let mut keep_lease = put_request("k", "v2");
    keep_lease.ignore_lease = true;
    let response = store.put(&keep_lease, &mut WriteSet::default()).expect("ignore_lease");
    assert_eq!(response.prev_kv, None, "prev_kv only when asked");
    let mut after = kv("k", "v2", 2, 4, 3);
    after.lease = 43;
    assert_eq!(get(&store, "k", 0), Some(after), "lease kept, value replaced");
}

#[test]
fn put_errors_change_nothing() {
    let mut store = MvccStore::new();
    put(&mut store, "k", "v");
    let value_on_missing = PutRequest { ignore_value: true, ..put_request("missing", "") };
    let lease_on_missing = PutRequest { ignore_lease: true, ..put_request("missing", "v") };
    let value_provided = PutRequest { ignore_value: true, ..put_request("k", "v") };
    let lease_provided = PutRequest { ignore_lease: true, lease: 5, ..put_request("k", "v") };
    let cases = [
        ("ignore_value on missing key", value_on_missing, "key not found"),
        ("ignore_lease on missing key", lease_on_missing, "key not found"),
        ("ignore_value with a value", value_provided, "value is provided"),
        ("ignore_lease with a lease", lease_provided, "lease is provided"),
    ];
    for (name, request, message) in cases {
        let before = store.clone();
        let mut write_set = WriteSet::default();
        let error = store.put(&request, &mut write_set).expect_err(name);
        assert_eq!(error, KvError::InvalidArgument(message.to_string()), "{name}");
        assert_eq!(error.to_string(), format!("etcdserver: {message}"), "{name}");
        assert_eq!(store, before, "{name}: state");
        assert!(write_set.is_empty(), "{name}: write set");
    }
}

#[test]
fn delete_range_forms() {
    let prefix_end = prefix_range_end(b"ab");
    let cases: &[(&str, &[u8], &[u8], &[&str], &[&str])] = &[
        // name, key, range_end, deleted, left
        ("single key", b"ab", b"", &["ab"], &["a", "abc", "abd", "b", "c"]),
        ("missing key", b"zz", b"", &[], &["a", "ab", "abc", "abd", "b", "c"]),
        ("range", b"ab", b"b", &["ab", "abc", "abd"], &["a", "b", "c"]),
        ("prefix", b"ab", &prefix_end, &["ab", "abc", "abd"], &["a", "b", "c"]),
        ("from key", b"abd", &[0], &["abd", "b", "c"], &["a", "ab", "abc"]),
        ("all keys", &[0], &[0], &["a", "ab", "abc", "abd", "b", "c"], &[]),
    ];
    for (name, key, range_end, deleted, left) in cases {
        let mut store = store_with_keys();
        let mut write_set = WriteSet::default();
        let response = store.delete_range(&delete_request(key, range_end), &mut write_set).expect(name);
        let expected_revision = if deleted.is_empty() { 7 } else { 8 };
        assert_eq!(response.deleted, deleted.len() as i64, "{name}: deleted");
        let prev_keys: Vec<String> =
            response.prev_kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
        assert_eq!(prev_keys, *deleted, "{name}: prev_kvs");
        assert_eq!(store.revision(), expected_revision, "{name}: revision");
        assert_eq!(response.header.expect("header").revision, expected_revision, "{name}");
        assert_eq!(write_set.changes.len(), deleted.len(), "{name}: changes");
        assert_eq!(store.key_count(), left.len() as u64, "{name}: key count");
        let all = store.range(&range_request(&[0], &[0])).expect(name);
        assert_eq!(keys_of(&all), *left, "{name}: left");
    }
}

#[test]
fn delete_without_prev_kv_returns_no_prev_kvs() {
    let mut store = store_with_keys();
    let mut request = delete_request(b"a", b"b");
    request.prev_kv = false;
    let response = store.delete_range(&request, &mut WriteSet::default()).expect("delete");
    assert_eq!(response.deleted, 4);
    assert!(response.prev_kvs.is_empty());
}

#[test]
fn write_set_records_and_changes() {
    let mut store = MvccStore::new();
    let mut write_set = WriteSet::default();
    store.put(&put_request("k", "v"), &mut write_set).expect("put");
    store.delete_range(&delete_request(b"k", b""), &mut write_set).expect("delete");
    let put_key = Revision { main: 2, sub: 0 }.to_rev_key(false);
    let tombstone_key = Revision { main: 3, sub: 0 }.to_rev_key(true);
    let mut expected_put_key = [0u8; 17];
    expected_put_key[7] = 2;
    assert_eq!(put_key, expected_put_key, "rev key layout");
    assert_eq!(tombstone_key[16], 1, "tombstone flag");
    let tombstone = KeyValue { key: b"k".to_vec(), mod_revision: 3, ..KeyValue::default() };
    assert_eq!(
        write_set.puts,
        vec![(put_key, kv("k", "v", 2, 2, 1).encode_to_vec()), (tombstone_key, tombstone.encode_to_vec()),]
    );
    assert_eq!(write_set.changes.len(), 2);
    assert_eq!(write_set.changes[0].kind, ChangeKind::Put);
    assert_eq!(write_set.changes[0].kv, kv("k", "v", 2, 2, 1));
    assert_eq!(write_set.changes[0].prev_kv, None);
    assert_eq!(write_set.changes[1].kind, ChangeKind::Delete);
    assert_eq!(write_set.changes[1].kv, tombstone);
    assert_eq!(write_set.changes[1].prev_kv, Some(kv("k", "v", 2, 2, 1)));
    assert!(write_set.removes.is_empty());
    assert_eq!(write_set.compact_revision, None);
}

// ---------------------------------------------------------------------------------
// Compares
// ---------------------------------------------------------------------------------

/// k: value "m", version 2, create 2, mod 3, lease 7. r1 version 1, r2 version 2.
fn store_for_compares() -> MvccStore {
    let mut store = MvccStore::new();
    let mut first = put_request("k", "l");
    first.lease = 7;
    store.put(&first, &mut WriteSet::default()).expect("k"); // 2
    let mut second = put_request("k", "m");
    second.lease = 7;
    store.put(&second, &mut WriteSet::default()).expect("k"); // 3
    put(&mut store, "r1", "1"); // 4
    put(&mut store, "r2", "2"); // 5
    put(&mut store, "r2", "3"); // 6
    store
}

#[test]
fn compare_every_target_and_operator() {
    use CompareResult::{Equal, Greater, Less, NotEqual};
    use CompareTarget::{Create, Lease, Mod, Value, Version};
    let on = |key: &str, target, result, union| compare(key, target, result, union);
    let version = |key, result, operand| on(key, Version, result, TargetUnion::Version(operand));
    let create = |result, operand| on("k", Create, result, TargetUnion::CreateRevision(operand));
    let modified = |result, operand| on("k", Mod, result, TargetUnion::ModRevision(operand));
    let lease = |key, result, operand| on(key, Lease, result, TargetUnion::Lease(operand));
    let value =
        |key, result, operand: &str| on(key, Value, result, TargetUnion::Value(operand.as_bytes().to_vec()));
    // One row per line reads as a table. k: version 2, create 2, mod 3, value "m",
    // lease 7; x does not exist. Columns: name, compare, holds.
    #[rustfmt::skip]
    let cases: Vec<(&str, Compare, bool)> = vec![
        ("version equal", version("k", Equal, 2), true),
        ("version equal, other", version("k", Equal, 1), false),
        ("version greater", version("k", Greater, 1), true),
        ("version greater, equal", version("k", Greater, 2), false),
        ("version less", version("k", Less, 3), true),
        ("version less, equal", version("k", Less, 2), false),
        ("version not equal", version("k", NotEqual, 1), true),
        ("version not equal, equal", version("k", NotEqual, 2), false),
        ("create equal", create(Equal, 2), true),
        ("create greater, equal", create(Greater, 2), false),
        ("create less", create(Less, 3), true),
        ("create not equal, equal", create(NotEqual, 2), false),
        ("mod equal", modified(Equal, 3), true),
        ("mod greater", modified(Greater, 2), true),
        ("mod less, equal", modified(Less, 3), false),
        ("mod not equal", modified(NotEqual, 4), true),
        ("value equal", value("k", Equal, "m"), true),
        ("value equal, other", value("k", Equal, "l"), false),
        ("value greater", value("k", Greater, "l"), true),
        ("value greater, operand longer", value("k", Greater, "ma"), false),
        ("value less", value("k", Less, "n"), true),
        ("value less, equal", value("k", Less, "m"), false),
        ("value not equal", value("k", NotEqual, "x"), true),
        ("value not equal, equal", value("k", NotEqual, "m"), false),
        ("lease equal", lease("k", Equal, 7), true),
        ("lease greater, equal", lease("k", Greater, 7), false),
        ("lease less", lease("k", Less, 8), true),
        ("lease not equal", lease("k", NotEqual, 0), true),
        // A key that does not exist compares as version, revisions and lease 0 ...
        ("missing: version equal 0", version("x", Equal, 0), true),
        ("missing: version greater 0", version("x", Greater, 0), false),
        ("missing: create less 1", on("x", Create, Less, TargetUnion::CreateRevision(1)), true),
        ("missing: mod equal 0", on("x", Mod, Equal, TargetUnion::ModRevision(0)), true),
        ("missing: lease equal 0", lease("x", Equal, 0), true),
        // ... except in a value compare, which is then always false.
        ("missing: value equal empty", value("x", Equal, ""), false),
        ("missing: value not equal", value("x", NotEqual, "a"), false),
        ("missing: value less", value("x", Less, "a"), false),
        // The operand counts only when it matches the target; otherwise it is 0.
        ("mismatched operand is 0", on("k", Version, Greater, TargetUnion::CreateRevision(9)), true),
        ("mismatched operand is not 2", on("k", Version, Equal, TargetUnion::ModRevision(2)), false),
    ];
    let mut store = store_for_compares();
    for (name, compare, expected) in cases {
        let before = store.clone();
        let response = store.txn(&txn(vec![compare], vec![], vec![]), &mut WriteSet::default()).expect(name);
        assert_eq!(response.succeeded, expected, "{name}");
        assert_eq!(store, before, "{name}: a compare changes nothing");
    }
}

#[test]
fn compare_over_ranges() {
    use CompareResult::{Equal, Greater, Less};
    use CompareTarget::{Create, Value, Version};
    let ranged = |key: &str, end: &[u8], target, result, union| Compare {
        range_end: end.to_vec(),
        ..compare(key, target, result, union)
    };
    let prefix_r = prefix_range_end(b"r");
    // r1: version 1, create 4; r2: version 2, create 5; k: version 2.
    // Columns: name, compare, holds.
    #[rustfmt::skip]
    let cases: Vec<(&str, Compare, bool)> = vec![
        ("all keys exist", ranged("r", b"s", Version, Greater, TargetUnion::Version(0)), true),
        ("all keys below", ranged("r", b"s", Version, Less, TargetUnion::Version(3)), true),
        ("one key fails", ranged("r", b"s", Version, Equal, TargetUnion::Version(1)), false),
        ("prefix, create", ranged("r", &prefix_r, Create, Greater, TargetUnion::CreateRevision(3)), true),
        ("from key covers k and r*", ranged("k", &[0], Version, Greater, TargetUnion::Version(0)), true),
        ("from key, one fails", ranged("k", &[0], Version, Equal, TargetUnion::Version(2)), false),
        ("empty range: version 0", ranged("x", b"y", Version, Equal, TargetUnion::Version(0)), true),
        ("empty range: value false", ranged("x", b"y", Value, Equal, TargetUnion::Value(vec![])), false),
    ];
    let mut store = store_for_compares();
    for (name, compare, expected) in cases {
        let response = store.txn(&txn(vec![compare], vec![], vec![]), &mut WriteSet::default()).expect(name);
        assert_eq!(response.succeeded, expected, "{name}");
    }
}

#[test]
fn compares_must_all_hold() {
    use CompareResult::Equal;
    use CompareTarget::Version;
    let cases: &[(&str, &[(&str, i64)], bool)] = &[
        ("no compares", &[], true),
        ("both hold", &[("k", 2), ("r1", 1)], true),
        ("first fails", &[("k", 1), ("r1", 1)], false),
        ("second fails", &[("k", 2), ("r1", 2)], false),
    ];
    let mut store = store_for_compares();
    for (name, compares, expected) in cases {
        let compares = compares
            .iter()
            .map(|(key, version)| compare(key, Version, Equal, TargetUnion::Version(*version)))
            .collect();
        let response = store.txn(&txn(compares, vec![], vec![]), &mut WriteSet::default()).expect(name);
        assert_eq!(response.succeeded, *expected, "{name}");
    }
}

// ---------------------------------------------------------------------------------
// Txn
// ---------------------------------------------------------------------------------

fn version_is(key: &str, version: i64) -> Compare {
    compare(key, CompareTarget::Version, CompareResult::Equal, TargetUnion::Version(version))
}

#[test]
fn txn_branches_run_range_put_delete_and_nested_txn() {
    let branches = [("success", 2, true), ("failure", 1, false)];
    for (name, version, succeeded) in branches {
        let mut store = store_for_compares(); // revision 6
        let ops = vec![
            op_range(b"r1", b""),
            op_put("new", name),
            op_delete(b"r2", b""),
            op_txn(txn(vec![], vec![op_put("nested", name)], vec![])),
            op_range(&[0], &[0]),
        ];
        let request = if succeeded {
            txn(vec![version_is("k", version)], ops, vec![op_put("wrong", "branch")])
        } else {
            txn(vec![version_is("k", version)], vec![op_put("wrong", "branch")], ops)
        };
        let mut write_set = WriteSet::default();
        let response = store.txn(&request, &mut write_set).expect(name);
        assert_eq!(response.succeeded, succeeded, "{name}");
        assert_eq!(response.responses.len(), 5, "{name}: responses");
        assert_eq!(response.header.expect("header").revision, 7, "{name}: header");
        assert_eq!(store.revision(), 7, "{name}: one revision for the txn");
        assert_eq!(keys_of(range_response(&response, 0)), ["r1"], "{name}: range");
        assert!(matches!(
            &response.responses[2].response,
            Some(Response::ResponseDeleteRange(d)) if d.deleted == 1
        ));
        assert!(matches!(
            &response.responses[3].response,
            Some(Response::ResponseTxn(t)) if t.succeeded && t.responses.len() == 1
        ));
        // The last range sees the txn's own writes.
        assert_eq!(
            keys_of(range_response(&response, 4)),
            ["k", "nested", "new", "r1"],
            "{name}: reads see earlier writes"
        );
        assert_eq!(get(&store, "new", 0), Some(kv("new", name, 7, 7, 1)), "{name}");
        assert_eq!(get(&store, "nested", 0), Some(kv("nested", name, 7, 7, 1)), "{name}");
        assert_eq!(get(&store, "wrong", 0), None, "{name}: other branch not run");
        let revisions: Vec<RevKey> = write_set.puts.iter().map(|(key, _)| *key).collect();
        let expected = vec![
            Revision { main: 7, sub: 0 }.to_rev_key(false),
            Revision { main: 7, sub: 1 }.to_rev_key(true),
            Revision { main: 7, sub: 2 }.to_rev_key(false),
        ];
        assert_eq!(revisions, expected, "{name}: sub revisions in op order");
        let kinds: Vec<ChangeKind> = write_set.changes.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChangeKind::Put, ChangeKind::Delete, ChangeKind::Put], "{name}");
    }
}

#[test]
fn txn_that_changes_nothing_keeps_the_revision() {
    let cases: Vec<(&str, TxnRequest)> = vec![
        ("empty", txn(vec![], vec![], vec![])),
        ("reads only", txn(vec![], vec![op_range(b"k", b"")], vec![])),
        ("deletes nothing", txn(vec![], vec![op_delete(b"zz", b"")], vec![])),
        (
            "nested reads only",
            txn(vec![], vec![op_txn(txn(vec![], vec![op_range(b"k", b"")], vec![]))], vec![]),
        ),
    ];
    for (name, request) in cases {
        let mut store = store_for_compares();
        let mut write_set = WriteSet::default();
        let response = store.txn(&request, &mut write_set).expect(name);
        assert_eq!(store.revision(), 6, "{name}");
        assert_eq!(response.header.expect("header").revision, 6, "{name}");
        assert!(write_set.is_empty(), "{name}: write set");
    }
}

#[test]
fn txn_nested_compares_see_the_state_before_the_txn() {
    // etcd evaluates every compare, nested ones included, before any op runs.
    let mut store = MvccStore::new();
    let nested =
        txn(vec![version_is("x", 1)], vec![op_put("y", "saw x")], vec![op_put("y", "did not see x")]);
    let request = txn(vec![], vec![op_put("x", "1"), op_txn(nested)], vec![]);
    let response = store.txn(&request, &mut WriteSet::default()).expect("txn");
    assert!(response.succeeded);
    assert_eq!(get(&store, "y", 0), Some(kv("y", "did not see x", 2, 2, 1)));
    assert_eq!(get(&store, "x", 0), Some(kv("x", "1", 2, 2, 1)));
}

#[test]
fn txn_range_honours_revision() {
    let mut store = MvccStore::new();
    put(&mut store, "k", "old"); // 2
    put(&mut store, "k", "new"); // 3
    let at = |revision: i64| {
        let mut request = range_request(b"k", b"");
        request.revision = revision;
        op(Request::RequestRange(request))
    };
    let request = txn(vec![], vec![op_put("k", "newest"), at(2), at(3), at(0)], vec![]);
    let response = store.txn(&request, &mut WriteSet::default()).expect("txn");
    let values: Vec<Vec<u8>> = (1..4).map(|i| range_response(&response, i).kvs[0].value.clone()).collect();
    assert_eq!(values, [b"old".to_vec(), b"new".to_vec(), b"newest".to_vec()]);
    assert_eq!(range_response(&response, 3).header.expect("header").revision, 4);
}

#[test]
fn txn_errors_leave_no_change() {
    let future = {
        let mut request = range_request(b"k", b"");
        request.revision = 8; // the store is at 7; the txn's own revision is not readable
        op(Request::RequestRange(request))
    };
    let compacted = {
        let mut request = range_request(b"k", b"");
        request.revision = 2;
        op(Request::RequestRange(request))
    };
    let ignore_value_missing =
        op(Request::RequestPut(PutRequest { ignore_value: true, ..put_request("missing", "") }));
    let cases: Vec<(&str, TxnRequest, KvError)> = vec![
        (
            "put ignore_value on missing key after writes",
            txn(vec![], vec![op_put("a", "1"), op_delete(b"r1", b""), ignore_value_missing.clone()], vec![]),
            KvError::InvalidArgument("key not found".to_string()),
        ),
        (
            "error inside a nested txn",
            txn(
                vec![],
                vec![
                    op_put("a", "1"),
                    op_txn(txn(vec![], vec![op_put("b", "2"), ignore_value_missing], vec![])),
                ],
                vec![],
            ),
            KvError::InvalidArgument("key not found".to_string()),
        ),
        (
            "range at a future revision after a put",
            txn(vec![], vec![op_put("a", "1"), future], vec![]),
            KvError::FutureRevision { current_revision: 7 },
        ),
        (
            "range at a compacted revision after a delete",
            txn(vec![], vec![op_delete(b"k", b""), compacted], vec![]),
            KvError::Compacted { compact_revision: 3 },
        ),
        (
            "empty op after a put in the failure branch",
            txn(vec![version_is("k", 9)], vec![], vec![op_put("a", "1"), RequestOp { request: None }]),
            KvError::InvalidArgument("key not found".to_string()),
        ),
    ];
    for (name, request, error) in cases {
        let mut store = store_for_compares();
        store
            .compact(&CompactionRequest { revision: 3, physical: false }, &mut WriteSet::default())
            .expect("compact");
        // The write set already holds an earlier command's writes; they must stay.
        let mut write_set = WriteSet::default();
        put_into(&mut store, "earlier", &mut write_set);
        let store_before = store.clone();
        let write_set_before = write_set.clone();
        let hash_before = store.state_hash();
        assert_eq!(store.txn(&request, &mut write_set), Err(error), "{name}");
        assert_eq!(store, store_before, "{name}: state");
        assert_eq!(store.revision(), 7, "{name}: revision");
        assert_eq!(store.state_hash(), hash_before, "{name}: hash");
        assert_eq!(write_set, write_set_before, "{name}: write set");
    }
}

fn put_into(store: &mut MvccStore, key: &str, write_set: &mut WriteSet) {
    store.put(&put_request(key, "v"), write_set).expect("put");
}

// ---------------------------------------------------------------------------------
// Compaction
// ---------------------------------------------------------------------------------

#[test]
fn compaction() {
    let mut store = MvccStore::new();
    put(&mut store, "k", "v1"); // 2
    put(&mut store, "gone", "g"); // 3
    put(&mut store, "k", "v2"); // 4
    delete(&mut store, "gone"); // 5
    put(&mut store, "late", "l"); // 6
    put(&mut store, "k", "v3"); // 7
    let mut write_set = WriteSet::default();
    let response =
        store.compact(&CompactionRequest { revision: 5, physical: true }, &mut write_set).expect("compact");
    assert_eq!(response.header.expect("header").revision, 7);
    assert_eq!(store.compact_revision(), 5);
    assert_eq!(write_set.compact_revision, Some(5));
    // k keeps v2 (its last change at or below 5); gone loses everything, its
    // tombstone included; late is untouched.
    let mut removed = write_set.removes.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            Revision { main: 2, sub: 0 }.to_rev_key(false),
            Revision { main: 3, sub: 0 }.to_rev_key(false),
            Revision { main: 5, sub: 0 }.to_rev_key(true),
        ]
    );
    assert!(write_set.puts.is_empty() && write_set.changes.is_empty());

    let range_at = |store: &MvccStore, revision: i64| {
        let mut request = range_request(&[0], &[0]);
        request.revision = revision;
        store.range(&request)
    };
    let cases: &[(&str, i64, Result<Vec<&str>, KvError>)] = &[
        ("below compaction", 4, Err(KvError::Compacted { compact_revision: 5 })),
        ("far below compaction", 1, Err(KvError::Compacted { compact_revision: 5 })),
        ("at compaction", 5, Ok(vec!["k"])),
        ("after compaction", 6, Ok(vec!["k", "late"])),
        ("current", 0, Ok(vec!["k", "late"])),
    ];
    for (name, revision, expected) in cases {
        let got = range_at(&store, *revision).map(|r| keys_of(&r));
        let expected = expected.clone().map(|keys| keys.iter().map(|k| k.to_string()).collect());
        assert_eq!(got, expected, "{name}");
    }
    assert_eq!(get(&store, "k", 5), Some(kv("k", "v2", 2, 4, 2)), "value at compaction");
    assert_eq!(get(&store, "k", 7), Some(kv("k", "v3", 2, 7, 3)), "current value");
    assert_eq!(store.key_count(), 2);

    let errors: &[(&str, i64, KvError)] = &[
        ("same revision again", 5, KvError::Compacted { compact_revision: 5 }),
        ("older revision", 3, KvError::Compacted { compact_revision: 5 }),
        ("future revision", 8, KvError::FutureRevision { current_revision: 7 }),
        (
            "negative revision",
            -1,
            KvError::InvalidArgument("revision must not be negative (got -1)".to_string()),
        ),
    ];
    for (name, revision, error) in errors {
        let before = store.clone();
        let mut write_set = WriteSet::default();
        let request = CompactionRequest { revision: *revision, physical: false };
        assert_eq!(store.compact(&request, &mut write_set), Err(error.clone()), "{name}");
        assert_eq!(store, before, "{name}: state");
        assert!(write_set.is_empty(), "{name}: write set");
    }
    let mut write_set = WriteSet::default();
    store
        .compact(&CompactionRequest { revision: 7, physical: false }, &mut write_set)
        .expect("compact at current revision");
    assert_eq!(write_set.removes, vec![Revision { main: 4, sub: 0 }.to_rev_key(false)]);
}

// ---------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------

fn small_limits() -> Limits {
    Limits { request_bytes_max: 200, key_bytes_max: 8, value_bytes_max: 16, txn_ops_max: 3 }
}

fn key_too_large() -> KvError {
    KvError::KeyTooLarge { size_bytes: 9, max_bytes: 8 }
}

fn negative(field: &str) -> Result<(), KvError> {
    let message = format!("{field} must not be negative (got -1)");
    Err(KvError::InvalidArgument(message))
}

fn invalid(message: &str) -> Result<(), KvError> {
    Err(KvError::InvalidArgument(message.to_string()))
}

#[test]
fn validate_range_requests() {
    let limits = small_limits();
    let range = |key: &[u8], end: &[u8]| validate_range(&range_request(key, end), &limits);
    let range_with = |edit: &dyn Fn(&mut RangeRequest)| {
        let mut request = range_request(b"k", b"");
        edit(&mut request);
        validate_range(&request, &limits)
    };
    let too_large = Err(KvError::RequestTooLarge { size_bytes: 306, max_bytes: 200 });
    // Columns: name, result, expected.
    #[rustfmt::skip]
    let cases: Vec<(&str, Result<(), KvError>, Result<(), KvError>)> = vec![
        ("ok", range(b"k", b""), Ok(())),
        ("empty key", range(b"", b""), Err(KvError::EmptyKey)),
        ("key too large", range(b"123456789", b""), Err(key_too_large())),
        ("range end too large", range(b"k", b"123456789"), Err(key_too_large())),
        ("range end below key", range(b"k", b"j"), Err(KvError::InvalidRangeEnd)),
        ("range end equal to key", range(b"k", b"k"), Ok(())),
        ("from key", range(b"k", &[0]), Ok(())),
        ("all keys", range(&[0], &[0]), Ok(())),
        ("negative revision", range_with(&|r| r.revision = -1), negative("revision")),
        ("negative limit", range_with(&|r| r.limit = -1), negative("limit")),
        ("unknown sort order", range_with(&|r| r.sort_order = 3), invalid("invalid sort option")),
        ("unknown sort target", range_with(&|r| r.sort_target = 5), invalid("invalid sort option")),
        ("request too large", range_with(&|r| r.range_end = vec![b'z'; 300]), too_large),
    ];
    for (name, got, expected) in cases {
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn validate_put_requests() {
    let limits = small_limits();
    let put_with = |edit: &dyn Fn(&mut PutRequest)| {
        let mut request = put_request("k", "v");
        edit(&mut request);
        validate_put(&request, &limits)
    };
    let value_too_large = |size_bytes| Err(KvError::ValueTooLarge { size_bytes, max_bytes: 16 });
    let too_large = |size_bytes| Err(KvError::RequestTooLarge { size_bytes, max_bytes: 200 });
    // Columns: name, result, expected. A 194-byte value makes a 200-byte request:
    // within the request limit, so the value check speaks.
    #[rustfmt::skip]
    let cases: Vec<(&str, Result<(), KvError>, Result<(), KvError>)> = vec![
        ("ok", put_with(&|_| {}), Ok(())),
        ("empty key", put_with(&|p| p.key.clear()), Err(KvError::EmptyKey)),
        ("key too large", put_with(&|p| p.key = b"123456789".to_vec()), Err(key_too_large())),
        ("value at the limit", put_with(&|p| p.value = vec![1; 16]), Ok(())),
        ("value too large", put_with(&|p| p.value = vec![1; 17]), value_too_large(17)),
        ("request at the limit", put_with(&|p| p.value = vec![1; 194]), value_too_large(194)),
        ("request one byte over", put_with(&|p| p.value = vec![1; 195]), too_large(201)),
        ("ignore_value with a value", put_with(&|p| p.ignore_value = true), invalid("value is provided")),
        ("ignore_lease with a lease", put_with(&|p| { p.ignore_lease = true; p.lease = 1 }), invalid("lease is provided")),
        ("ignore_value without a value", put_with(&|p| { p.ignore_value = true; p.value.clear() }), Ok(())),
    ];
    for (name, got, expected) in cases {
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn validate_delete_and_compaction_requests() {
    let limits = small_limits();
    let delete = |key: &[u8], end: &[u8]| validate_delete_range(&delete_request(key, end), &limits);
    let compaction = |revision| validate_compaction(&CompactionRequest { revision, physical: false });
    // Columns: name, result, expected.
    #[rustfmt::skip]
    let cases: Vec<(&str, Result<(), KvError>, Result<(), KvError>)> = vec![
        ("delete: ok", delete(b"a", b"b"), Ok(())),
        ("delete: empty key", delete(b"", b"b"), Err(KvError::EmptyKey)),
        ("delete: key too large", delete(b"123456789", b""), Err(key_too_large())),
        ("delete: range end below key", delete(b"b", b"a"), Err(KvError::InvalidRangeEnd)),
        ("delete: from key", delete(b"b", &[0]), Ok(())),
        // 3 bytes of key, 303 of range end, 2 of prev_kv.
        ("delete: request too large", delete(b"a", &[b'z'; 300]), Err(KvError::RequestTooLarge { size_bytes: 308, max_bytes: 200 })),
        ("compaction: ok", compaction(5), Ok(())),
        ("compaction: zero is left to the store", compaction(0), Ok(())),
        ("compaction: negative revision", compaction(-1), negative("revision")),
    ];
    for (name, got, expected) in cases {
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn validate_txn_requests() {
    let limits = small_limits();
    let compare_with = |edit: &dyn Fn(&mut Compare)| {
        let mut compare = version_is("k", 1);
        edit(&mut compare);
        compare
    };
    let nested = |success, failure| op_txn(txn(vec![], success, failure));
    let compares_only = |compares| txn(compares, vec![], vec![]);
    let success_only = |ops| txn(vec![], ops, vec![]);
    let too_many = |ops_count, max_count| Err(KvError::TooManyOps { ops_count, max_count });
    let empty_op = RequestOp { request: None };
    let ok = txn(
        vec![version_is("k", 1)],
        vec![op_put("a", "1"), op_range(b"a", b"")],
        vec![op_delete(b"a", b"")],
    );
    // Columns: name, request, expected. Like etcd, a nested txn gets the budget its
    // parent left: 3 - 2 = 1 below.
    #[rustfmt::skip]
    let cases: Vec<(&str, TxnRequest, Result<(), KvError>)> = vec![
        ("ok", ok, Ok(())),
        ("empty", txn(vec![], vec![], vec![]), Ok(())),
        ("compare: empty key", compares_only(vec![compare_with(&|c| c.key.clear())]), Err(KvError::EmptyKey)),
        ("compare: key too large", compares_only(vec![compare_with(&|c| c.key = b"123456789".to_vec())]), Err(key_too_large())),
        ("compare: unknown target", compares_only(vec![compare_with(&|c| c.target = 9)]), invalid("unknown compare target 9")),
        ("compare: unknown result", compares_only(vec![compare_with(&|c| c.result = 9)]), invalid("unknown compare result 9")),
        ("compare: range end below key", compares_only(vec![compare_with(&|c| c.range_end = b"a".to_vec())]), Err(KvError::InvalidRangeEnd)),
        ("op: empty put key", success_only(vec![op_put("", "1")]), Err(KvError::EmptyKey)),
        ("op: empty range key in failure", txn(vec![], vec![], vec![op_range(b"", b"")]), Err(KvError::EmptyKey)),
        ("op: empty delete key", success_only(vec![op_delete(b"", b"")]), Err(KvError::EmptyKey)),
        ("op: empty key in nested txn", success_only(vec![nested(vec![], vec![op_put("", "1")])]), Err(KvError::EmptyKey)),
        ("op: empty compare key in nested txn", success_only(vec![op_txn(compares_only(vec![compare_with(&|c| c.key.clear())]))]), Err(KvError::EmptyKey)),
        ("op: value too large", success_only(vec![op_put("a", "0123456789abcdefg")]), Err(KvError::ValueTooLarge { size_bytes: 17, max_bytes: 16 })),
        ("op: range end below key", success_only(vec![op_range(b"b", b"a")]), Err(KvError::InvalidRangeEnd)),
        ("op: no request", success_only(vec![empty_op]), invalid("key not found")),
        ("ops: at the limit", txn(vec![version_is("k", 1); 3], vec![op_put("a", "1"), op_put("b", "1"), op_put("c", "1")], vec![]), Ok(())),
        ("ops: too many compares", compares_only(vec![version_is("k", 1); 4]), too_many(4, 3)),
        ("ops: too many in success", success_only(vec![op_range(b"a", b""); 4]), too_many(4, 3)),
        ("ops: too many in failure", txn(vec![], vec![], vec![op_range(b"a", b""); 4]), too_many(4, 3)),
        ("ops: nested within budget", success_only(vec![op_range(b"a", b""), nested(vec![op_range(b"b", b"")], vec![])]), Ok(())),
        ("ops: nested over budget", success_only(vec![op_range(b"a", b""), nested(vec![op_range(b"b", b""); 2], vec![])]), too_many(2, 1)),
        ("ops: nested failure over budget", success_only(vec![op_range(b"a", b""), nested(vec![], vec![op_range(b"b", b""); 2])]), too_many(2, 1)),
    ];
    for (name, request, expected) in cases {
        assert_eq!(validate_txn(&request, &limits), expected, "{name}");
    }
    let large = success_only(vec![op_put("k", &"x".repeat(300))]);
    let size_bytes = large.encoded_len() as u64;
    assert!(size_bytes > 300, "the request is over the limit");
    let expected = Err(KvError::RequestTooLarge { size_bytes, max_bytes: 200 });
    assert_eq!(validate_txn(&large, &limits), expected, "request too large");
}

#[test]
fn validate_txn_duplicate_keys() {
    let limits = Limits::default();
    let nested = |success, failure| op_txn(txn(vec![], success, failure));
    // Columns: name, the ops of one branch, accepted.
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<RequestOp>, bool)> = vec![
        ("distinct puts", vec![op_put("a", "1"), op_put("b", "1")], true),
        ("same key put twice", vec![op_put("a", "1"), op_put("a", "2")], false),
        ("put inside a deleted range", vec![op_delete(b"a", b"c"), op_put("b", "1")], false),
        ("put before a delete of the same key", vec![op_put("a", "1"), op_delete(b"a", b"")], false),
        ("put at the exclusive range end", vec![op_delete(b"a", b"c"), op_put("c", "1")], true),
        ("overlapping deletes", vec![op_delete(b"a", b"c"), op_delete(b"b", b"d"), op_delete(b"b", b"")], true),
        ("reads do not conflict", vec![op_range(b"a", b""), op_put("a", "1"), op_range(b"a", b"")], true),
        ("put in nested txn and outer", vec![op_put("a", "1"), nested(vec![op_put("a", "2")], vec![])], false),
        ("put in two nested txns", vec![nested(vec![op_put("a", "1")], vec![]), nested(vec![op_put("a", "2")], vec![])], false),
        ("same key in both branches of a nested txn", vec![nested(vec![op_put("a", "1")], vec![op_put("a", "2")])], true),
        ("nested success put inside outer delete", vec![op_delete(b"a", b"z"), nested(vec![op_put("m", "1")], vec![])], false),
        ("nested failure put inside outer delete", vec![op_delete(b"a", b"z"), nested(vec![], vec![op_put("m", "1")])], false),
        ("outer put inside nested delete", vec![nested(vec![op_delete(b"a", b"z")], vec![]), op_put("m", "1")], false),
        ("deeply nested duplicate", vec![op_put("a", "1"), nested(vec![nested(vec![op_put("a", "2")], vec![])], vec![])], false),
        // etcd's check sees a from-key delete as an empty interval; so does ours.
        ("put after a from-key delete (etcd allows)", vec![op_delete(b"a", &[0]), op_put("b", "1")], true),
    ];
    for (name, ops, accepted) in cases {
        let in_success = validate_txn(&txn(vec![], ops.clone(), vec![]), &limits);
        let in_failure = validate_txn(&txn(vec![], vec![], ops), &limits);
        let expected = if accepted { Ok(()) } else { Err(KvError::DuplicateKey) };
        assert_eq!(in_success, expected, "{name} (success branch)");
        assert_eq!(in_failure, expected, "{name} (failure branch)");
    }
    let across_branches = txn(vec![], vec![op_put("a", "1")], vec![op_put("a", "2")]);
    assert_eq!(validate_txn(&across_branches, &limits), Ok(()), "the two top-level branches");
}

// ---------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------

/// A fake disk: the records a storage transaction would hold.
#[derive(Default)]
struct Disk {
    records: BTreeMap<RevKey, Vec<u8>>,
    compact_revision: i64,
}

impl Disk {
    fn apply(&mut self, write_set: WriteSet) {
        for (key, value) in write_set.puts {
            assert!(self.records.insert(key, value).is_none(), "a record is never rewritten");
        }
        for key in write_set.removes {
            assert!(self.records.remove(&key).is_some(), "removed record exists");
        }
        if let Some(revision) = write_set.compact_revision {
            self.compact_revision = revision;
        }
    }

    fn restore(&self) -> MvccStore {
        let records = self.records.iter().map(|(key, value)| (*key, value.clone()));
        MvccStore::restore(records, self.compact_revision).expect("restore")
    }
}

/// Applies one command, persists its writes, and checks that a store restored from
/// the disk equals the live one.
fn step(name: &str, store: &mut MvccStore, disk: &mut Disk, apply: &dyn Fn(&mut MvccStore, &mut WriteSet)) {
    let mut write_set = WriteSet::default();
    apply(store, &mut write_set);
    disk.apply(write_set);
    let restored = disk.restore();
    assert_eq!(&restored, store, "{name}: restored state");
    assert_eq!(restored.state_hash(), store.state_hash(), "{name}: hash");
    assert_eq!(restored.revision(), store.revision(), "{name}: revision");
}

#[test]
fn restore_rebuilds_the_same_state() {
    let mut store = MvccStore::new();
    let mut disk = Disk::default();
    step("empty", &mut store, &mut disk, &|_, _| {});
    step("puts", &mut store, &mut disk, &|s, ws| {
        for key in ["a", "b", "c", "d"] {
            s.put(&put_request(key, "1"), ws).expect("put");
        }
    });
    step("overwrite with lease", &mut store, &mut disk, &|s, ws| {
        let request = PutRequest { lease: 9, ..put_request("a", "2") };
        s.put(&request, ws).expect("put");
    });
    step("delete range", &mut store, &mut disk, &|s, ws| {
        s.delete_range(&delete_request(b"b", b"d"), ws).expect("delete");
    });
    step("txn", &mut store, &mut disk, &|s, ws| {
        let request = txn(
            vec![version_is("a", 2)],
            vec![
                op_put("e", "1"),
                op_delete(b"d", b""),
                op_txn(txn(vec![], vec![op_put("b", "again")], vec![])),
            ],
            vec![],
        );
        assert!(s.txn(&request, ws).expect("txn").succeeded);
    });
    step("failed txn", &mut store, &mut disk, &|s, ws| {
        let bad = txn(vec![], vec![op_put("f", "1"), RequestOp { request: None }], vec![]);
        assert!(s.txn(&bad, ws).is_err());
    });
    step("compact", &mut store, &mut disk, &|s, ws| {
        s.compact(&CompactionRequest { revision: 5, physical: false }, ws).expect("compact");
    });
    step("delete everything", &mut store, &mut disk, &|s, ws| {
        s.delete_range(&delete_request(&[0], &[0]), ws).expect("delete");
    });
    step("compact at current revision", &mut store, &mut disk, &|s, ws| {
        let revision = s.revision();
        s.compact(&CompactionRequest { revision, physical: false }, ws).expect("compact");
    });
    assert!(disk.records.is_empty(), "everything compacted away");
    let restored = disk.restore();
    assert_eq!(restored.revision(), 9, "revision survives through the compact revision");
    assert_eq!(restored.key_count(), 0);
    step("write after restore", &mut store, &mut disk, &|s, ws| {
        let response = s.put(&put_request("z", "1"), ws).expect("put");
        assert_eq!(response.header.expect("header").revision, 10);
    });
}

#[test]
fn restore_keeps_history_readable() {
    let mut store = MvccStore::new();
    let mut disk = Disk::default();
    step("put", &mut store, &mut disk, &|s, ws| {
        s.put(&put_request("k", "v1"), ws).expect("put"); // 2
    });
    step("overwrite", &mut store, &mut disk, &|s, ws| {
        s.put(&put_request("k", "v2"), ws).expect("put"); // 3
    });
    step("other key", &mut store, &mut disk, &|s, ws| {
        s.put(&put_request("j", "j1"), ws).expect("put"); // 4
    });
    step("delete", &mut store, &mut disk, &|s, ws| {
        s.delete_range(&delete_request(b"k", b""), ws).expect("delete"); // 5
    });
    step("compact", &mut store, &mut disk, &|s, ws| {
        let request = CompactionRequest { revision: 3, physical: false };
        s.compact(&request, ws).expect("compact");
    });
    let restored = disk.restore();
    assert_eq!(restored.state_hash(), store.state_hash());
    assert_eq!(restored.compact_revision(), 3);
    for revision in [0, 3, 4, 5] {
        for (key, end) in [(&b"k"[..], &b""[..]), (&[0][..], &[0][..])] {
            let mut request = range_request(key, end);
            request.revision = revision;
            assert_eq!(restored.range(&request), store.range(&request), "at {revision}");
        }
    }
    assert_eq!(get(&restored, "k", 3), Some(kv("k", "v2", 2, 3, 2)));
    let mut compacted = range_request(b"k", b"");
    compacted.revision = 2;
    assert_eq!(restored.range(&compacted), Err(KvError::Compacted { compact_revision: 3 }));
}

#[test]
fn restore_rejects_corrupt_records() {
    let good_key = Revision { main: 2, sub: 0 }.to_rev_key(false);
    let good_value = kv("k", "v", 2, 2, 1).encode_to_vec();
    let mut bad_flag = good_key;
    bad_flag[16] = 2;
    let cases: Vec<(&str, Vec<(RevKey, Vec<u8>)>)> = vec![
        ("value does not decode", vec![(good_key, vec![0xff, 0xff, 0xff])]),
        ("unknown flag byte", vec![(bad_flag, good_value.clone())]),
        ("mod revision differs from key", vec![(good_key, kv("k", "v", 3, 3, 1).encode_to_vec())]),
        ("empty key", vec![(good_key, kv("", "v", 2, 2, 1).encode_to_vec())]),
        (
            "revision 1 holds no change",
            vec![(Revision { main: 1, sub: 0 }.to_rev_key(false), kv("k", "v", 1, 1, 1).encode_to_vec())],
        ),
        (
            "out of order",
            vec![
                (Revision { main: 3, sub: 0 }.to_rev_key(false), kv("k", "v", 3, 3, 1).encode_to_vec()),
                (good_key, good_value.clone()),
            ],
        ),
    ];
    for (name, records) in cases {
        let result = MvccStore::restore(records, 0);
        assert!(matches!(result, Err(KvError::Corrupt(_))), "{name}: {result:?}");
    }
    let store = MvccStore::restore(vec![(good_key, good_value)], 0).expect("good record");
    assert_eq!(get(&store, "k", 0), Some(kv("k", "v", 2, 2, 1)));
    assert_eq!(store.revision(), 2);
}

#[test]
fn state_hash_tells_states_apart() {
    let mut a = MvccStore::new();
    let mut b = MvccStore::new();
    put(&mut a, "k", "v");
    put(&mut b, "k", "v");
    assert_eq!(a.state_hash(), b.state_hash(), "same log, same hash");
    put(&mut b, "k", "w");
    assert_ne!(a.state_hash(), b.state_hash(), "different value");
    let mut c = MvccStore::new();
    put(&mut c, "k", "v");
    put(&mut c, "x", "1");
    delete(&mut c, "x");
    put(&mut a, "k", "v");
    assert_ne!(a.state_hash(), c.state_hash(), "same live keys, different history");
    assert_ne!(MvccStore::new().state_hash(), 0);

    // Compacting at 2 removes nothing here (k@2 is the only record at or below it),
    // yet the states differ: reads at revision 1 are no longer allowed.
    let mut compacted = MvccStore::new();
    put(&mut compacted, "k", "v");
    put(&mut compacted, "j", "1");
    let uncompacted = compacted.clone();
    let mut write_set = WriteSet::default();
    let request = CompactionRequest { revision: 2, physical: false };
    compacted.compact(&request, &mut write_set).expect("compact");
    assert!(write_set.removes.is_empty());
    assert_ne!(compacted.state_hash(), uncompacted.state_hash(), "compact revision");
}
