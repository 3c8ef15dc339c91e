use chorus_proto::chorus::v1::Fence;
use chorus_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

use super::*;
use crate::mvcc::{MvccStore, WriteSet};

fn enter(store: &mut MvccStore, name: &[u8], lease: i64) -> Entered {
    let response = store.txn(&enter_txn(name, lease, Vec::new()), &mut WriteSet::default()).unwrap();
    read_entered(&response).expect("enter answer has its shape")
}

fn predecessor(store: &MvccStore, name: &[u8], own: i64) -> Option<Vec<u8>> {
    store.range(&predecessor_request(name, own)).unwrap().kvs.first().map(|kv| kv.key.clone())
}

fn fence(name: &[u8], token: i64) -> Fence {
    Fence { lock: name.to_vec(), token }
}

#[test]
fn contender_keys_are_etcds_layout() {
    assert_eq!(contender_key(b"jobs", 0x694d8a2b1c), b"jobs/694d8a2b1c".to_vec());
    assert_eq!(name_of_key(b"jobs/694d8a2b1c"), Some(&b"jobs"[..]));
    assert_eq!(name_of_key(b"a/b/12"), Some(&b"a/b"[..]));
}

#[test]
fn first_contender_holds_and_the_next_waits_for_it_alone() {
    let mut store = MvccStore::new();
    let first = enter(&mut store, b"l", 1);
    assert!(first.created && first.holds());
    let second = enter(&mut store, b"l", 2);
    let third = enter(&mut store, b"l", 3);
    assert!(!second.holds() && !third.holds());
    assert!(second.own.create_revision > first.own.create_revision);
    // Each waits for the one just before it, not for the holder.
    assert_eq!(predecessor(&store, b"l", second.own.create_revision), Some(b"l/1".to_vec()));
    assert_eq!(predecessor(&store, b"l", third.own.create_revision), Some(b"l/2".to_vec()));
    assert_eq!(predecessor(&store, b"l", first.own.create_revision), None);
    // Entering again with the same lease finds the same key.
    let again = enter(&mut store, b"l", 2);
    assert!(!again.created);
    assert_eq!(again.own.create_revision, second.own.create_revision);
}

#[test]
fn a_lock_named_like_a_prefix_of_another_is_separate() {
    let mut store = MvccStore::new();
    enter(&mut store, b"ab", 1);
    let other = enter(&mut store, b"a", 2);
    assert!(other.holds(), "lock 'a' is not held by a contender of 'ab'");
}

#[test]
fn fence_holds_only_for_the_current_holder() {
    let mut store = MvccStore::new();
    let first = enter(&mut store, b"l", 1);
    let second = enter(&mut store, b"l", 2);
    let t1 = first.own.create_revision;
    let t2 = second.own.create_revision;
    assert_eq!(check_fence(&store, &fence(b"l", t1)), Ok(()));
    assert_eq!(
        check_fence(&store, &fence(b"l", t2)),
        Err(KvError::FenceStale { lock: "l".into(), token: t2, current: Some(t1) })
    );
    // The holder leaves: the next contender's token is current, the old one stale.
    store.txn(&leave_txn(first.own.key.clone(), t1), &mut WriteSet::default()).unwrap();
    assert_eq!(check_fence(&store, &fence(b"l", t2)), Ok(()));
    let error = check_fence(&store, &fence(b"l", t1)).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("chorus: fence token {t1} for lock \"l\" is stale: the lock's current token is {t2}")
    );
    // Nobody holds it: every token is stale.
    store
        .delete_range(
            &DeleteRangeRequest { key: b"l/2".to_vec(), ..Default::default() },
            &mut WriteSet::default(),
        )
        .unwrap();
    assert_eq!(
        check_fence(&store, &fence(b"l", t2)).unwrap_err().to_string(),
        format!("chorus: fence token {t2} for lock \"l\" is stale: the lock has no holder")
    );
}

#[test]
fn a_key_recreated_by_the_same_lease_gets_a_new_token() {
    let mut store = MvccStore::new();
    let first = enter(&mut store, b"l", 1);
    store
        .txn(&leave_txn(first.own.key.clone(), first.own.create_revision), &mut WriteSet::default())
        .unwrap();
    let again = enter(&mut store, b"l", 1);
    assert!(again.own.create_revision > first.own.create_revision);
    assert!(check_fence(&store, &fence(b"l", first.own.create_revision)).is_err());
    // Leaving with the old generation's revision does not delete the new key.
    let answer = store
        .txn(&leave_txn(first.own.key.clone(), first.own.create_revision), &mut WriteSet::default())
        .unwrap();
    assert!(!answer.succeeded);
    let put = PutRequest { key: b"other".to_vec(), ..Default::default() };
    store.put(&put, &mut WriteSet::default()).unwrap();
    assert_eq!(current_token(&store, b"l"), Some(again.own.create_revision));
}
