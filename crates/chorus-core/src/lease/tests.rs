use std::collections::BTreeMap;

use chorus_proto::etcdserverpb::{CompactionRequest, LeaseCheckpoint, RangeRequest, RequestOp, TxnRequest};
use chorus_proto::mvccpb::KeyValue;

use super::*;
use crate::mvcc::RevKey;

// ---------------------------------------------------------------------------------
// A member: the key space and the leases, applied the way the node applies them,
// with a fake disk (two maps) that receives every write set.
// ---------------------------------------------------------------------------------

/// Lease records as a disk hands them back: (id, encoded record).
type Records = Vec<(i64, Vec<u8>)>;

#[derive(Default)]
struct Disk {
    kv_records: BTreeMap<RevKey, Vec<u8>>,
    compact_revision: i64,
    lease_records: BTreeMap<i64, Vec<u8>>,
}

impl Disk {
    fn persist(&mut self, kv_writes: WriteSet, lease_writes: LeaseWrites) {
        for (rev_key, record) in kv_writes.puts {
            self.kv_records.insert(rev_key, record);
        }
        for rev_key in kv_writes.removes {
            self.kv_records.remove(&rev_key);
        }
        if let Some(revision) = kv_writes.compact_revision {
            self.compact_revision = revision;
        }
        // The two lists are disjoint, so the order does not matter: removes first
        // here, the opposite of the obvious order, to check that.
        for id in lease_writes.removes {
            self.lease_records.remove(&id);
        }
        for (id, record) in lease_writes.puts {
            self.lease_records.insert(id, record);
        }
    }

    fn restore(&self) -> (MvccStore, LeaseStore) {
        let records = self.kv_records.iter().map(|(k, v)| (*k, v.clone()));
        let mvcc = MvccStore::restore(records, self.compact_revision).expect("mvcc restore");
        let records = self.lease_records.iter().rev().map(|(id, r)| (*id, r.clone()));
        let leases = LeaseStore::restore(records, &mvcc).expect("lease restore");
        (mvcc, leases)
    }
}

#[derive(Default)]
struct Member {
    mvcc: MvccStore,
    leases: LeaseStore,
    kv_writes: WriteSet,
    lease_writes: LeaseWrites,
    disk: Disk,
}

impl Member {
    fn grant(&mut self, id: i64, ttl: i64) -> Result<LeaseGrantResponse, KvError> {
        let request = LeaseGrantRequest { ttl, id };
        self.leases.grant(&request, &mut self.lease_writes)
    }

    fn revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, KvError> {
        let request = LeaseRevokeRequest { id };
        self.leases.revoke(&request, &mut self.mvcc, &mut self.kv_writes, &mut self.lease_writes)
    }

    fn checkpoint(&mut self, checkpoints: &[(i64, i64)]) {
        let request = LeaseCheckpointRequest {
            checkpoints: checkpoints
                .iter()
                .map(|&(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                .collect(),
        };
        self.leases.checkpoint(&request, &mut self.lease_writes).expect("checkpoint");
    }

    fn put_request(&mut self, request: &PutRequest) -> Result<(), KvError> {
        self.leases.check_put(request)?;
        let before = self.kv_writes.changes.len();
        self.mvcc.put(request, &mut self.kv_writes)?;
        self.leases.observe(&self.kv_writes.changes[before..]);
        Ok(())
    }

    fn put(&mut self, key: &str, lease: i64) -> Result<(), KvError> {
        self.put_request(&put_request(key, lease))
    }

    fn delete(&mut self, key: &str, range_end: &str) {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: range_end.as_bytes().to_vec(),
            prev_kv: false,
        };
        let before = self.kv_writes.changes.len();
        self.mvcc.delete_range(&request, &mut self.kv_writes).expect("delete");
        self.leases.observe(&self.kv_writes.changes[before..]);
    }

    fn txn(&mut self, request: &TxnRequest) -> Result<(), KvError> {
        self.leases.check_txn(request)?;
        let before = self.kv_writes.changes.len();
        self.mvcc.txn(request, &mut self.kv_writes)?;
        self.leases.observe(&self.kv_writes.changes[before..]);
        Ok(())
    }

    fn compact(&mut self, revision: i64) {
        let request = CompactionRequest { revision, physical: false };
        self.mvcc.compact(&request, &mut self.kv_writes).expect("compact");
    }

    /// Hands the writes collected so far to the disk, as a node's cycle does.
    fn persist(&mut self) {
        let kv_writes = std::mem::take(&mut self.kv_writes);
        let lease_writes = std::mem::take(&mut self.lease_writes);
        self.disk.persist(kv_writes, lease_writes);
    }

    /// Persists, restores from the disk, and checks that nothing was lost.
    fn persist_and_check_restore(&mut self) {
        self.persist();
        let (mvcc, leases) = self.disk.restore();
        assert_eq!(mvcc, self.mvcc);
        assert_eq!(leases, self.leases);
    }

    fn keys_of(&self, id: i64) -> Vec<String> {
        let lease = self.leases.get(id).expect("lease exists");
        lease.keys.iter().map(|key| String::from_utf8_lossy(key).into_owned()).collect()
    }

    fn get(&self, key: &str) -> Option<KeyValue> {
        let request = RangeRequest { key: key.as_bytes().to_vec(), ..RangeRequest::default() };
        self.mvcc.range(&request).expect("range").kvs.pop()
    }
}

fn put_request(key: &str, lease: i64) -> PutRequest {
    PutRequest { key: key.as_bytes().to_vec(), value: b"v".to_vec(), lease, ..PutRequest::default() }
}

fn op_put(key: &str, lease: i64) -> RequestOp {
    RequestOp { request: Some(Request::RequestPut(put_request(key, lease))) }
}

fn op_txn(txn: TxnRequest) -> RequestOp {
    RequestOp { request: Some(Request::RequestTxn(txn)) }
}

// ---------------------------------------------------------------------------------
// Grant
// ---------------------------------------------------------------------------------

#[test]
fn grant_uses_the_given_id_and_ttl() {
    let mut member = Member::default();
    let response = member.grant(7, 60).expect("grant");
    assert_eq!((response.id, response.ttl), (7, 60));
    assert!(response.error.is_empty());
    let lease = member.leases.get(7).expect("lease");
    assert_eq!(lease.granted_ttl_s, 60);
    assert_eq!(lease.remaining_ttl_s, None);
    assert!(lease.keys.is_empty());
    assert_eq!(member.leases.ids().collect::<Vec<_>>(), vec![7]);
    assert_eq!(member.leases.len(), 1);
    assert_eq!(member.lease_writes.puts, vec![(7, lease.encode_record())]);
    // A negative id is an id like any other (etcd accepts it from a client).
    member.grant(-3, 60).expect("grant");
    assert_eq!(member.leases.ids().collect::<Vec<_>>(), vec![-3, 7]);
}

#[test]
fn grant_refuses_id_zero_and_changes_nothing() {
    let mut member = Member::default();
    let result = member.grant(0, 60);
    assert!(matches!(result, Err(KvError::InvalidArgument(_))), "{result:?}");
    assert!(member.leases.is_empty());
    assert!(member.lease_writes.is_empty());
}

#[test]
fn grant_refuses_an_existing_id_and_changes_nothing() {
    let mut member = Member::default();
    member.grant(7, 60).expect("grant");
    member.persist();
    let before = member.leases.clone();
    assert_eq!(member.grant(7, 30), Err(KvError::LeaseExists));
    assert_eq!(member.leases, before);
    assert!(member.lease_writes.is_empty());
}

#[test]
fn grant_raises_a_ttl_below_the_minimum() {
    let mut member = Member::default();
    let cases = [
        (1, -5, LEASE_TTL_MIN_S),
        (2, 0, LEASE_TTL_MIN_S),
        (3, 1, LEASE_TTL_MIN_S),
        (4, LEASE_TTL_MIN_S - 1, LEASE_TTL_MIN_S),
        (5, LEASE_TTL_MIN_S, LEASE_TTL_MIN_S),
        (6, LEASE_TTL_MIN_S + 1, LEASE_TTL_MIN_S + 1),
    ];
    for (id, ttl, expected_ttl) in cases {
        let response = member.grant(id, ttl).expect("grant");
        assert_eq!(response.ttl, expected_ttl, "asked for {ttl}");
        assert_eq!(member.leases.get(id).expect("lease").granted_ttl_s, expected_ttl);
    }
}

#[test]
fn grant_refuses_a_ttl_above_the_maximum() {
    let mut member = Member::default();
    let result = member.grant(1, LEASE_TTL_MAX_S + 1);
    assert_eq!(result, Err(KvError::LeaseTtlTooLarge { ttl_s: LEASE_TTL_MAX_S + 1, max_s: LEASE_TTL_MAX_S }));
    assert_eq!(result.unwrap_err().to_string(), "etcdserver: too large lease TTL");
    assert!(member.leases.is_empty());
    assert!(member.lease_writes.is_empty());
    let response = member.grant(2, LEASE_TTL_MAX_S).expect("grant");
    assert_eq!(response.ttl, LEASE_TTL_MAX_S);
}

#[test]
fn grant_refuses_more_than_leases_max() {
    let mut member = Member::default();
    for id in 1..=LEASES_MAX as i64 {
        member.grant(id, 60).expect("grant");
    }
    member.lease_writes = LeaseWrites::default();
    let result = member.grant(LEASES_MAX as i64 + 1, 60);
    assert_eq!(result, Err(KvError::TooManyLeases { max_count: LEASES_MAX as u64 }));
    assert_eq!(member.leases.len(), LEASES_MAX);
    assert!(member.lease_writes.is_empty());
    // Room again once one is revoked.
    member.revoke(1).expect("revoke");
    member.grant(LEASES_MAX as i64 + 1, 60).expect("grant");
}

// ---------------------------------------------------------------------------------
// Revoke
// ---------------------------------------------------------------------------------

#[test]
fn revoke_deletes_every_key_in_one_revision() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.grant(2, 60).expect("grant");
    for key in ["a", "b", "c"] {
        member.put(key, 1).expect("put");
    }
    member.put("d", 2).expect("put");
    member.put("e", 0).expect("put");
    member.persist();
    let revision_before = member.mvcc.revision();

    let response = member.revoke(1).expect("revoke");

    let revision = member.mvcc.revision();
    assert_eq!(revision, revision_before + 1);
    assert_eq!(response.header.expect("header").revision, revision);
    let changes = &member.kv_writes.changes;
    assert_eq!(changes.len(), 3);
    for (change, key) in changes.iter().zip(["a", "b", "c"]) {
        assert_eq!(change.kind, ChangeKind::Delete);
        assert_eq!(change.kv.key, key.as_bytes());
        assert_eq!(change.kv.mod_revision, revision);
        assert_eq!(change.prev_kv.as_ref().expect("prev_kv").lease, 1);
    }
    for key in ["a", "b", "c"] {
        assert_eq!(member.get(key), None, "{key} survived the revoke");
    }
    assert!(member.get("d").is_some() && member.get("e").is_some());
    assert!(member.leases.get(1).is_none());
    assert_eq!(member.keys_of(2), vec!["d"]);
    assert_eq!(member.lease_writes.removes, vec![1]);
    assert!(member.lease_writes.puts.is_empty());
    member.persist_and_check_restore();
}

#[test]
fn revoke_of_a_lease_without_keys_takes_no_revision() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.put("k", 0).expect("put");
    let revision_before = member.mvcc.revision();
    let changes_before = member.kv_writes.changes.len();
    let response = member.revoke(1).expect("revoke");
    assert_eq!(member.mvcc.revision(), revision_before);
    assert_eq!(response.header.expect("header").revision, revision_before);
    assert_eq!(member.kv_writes.changes.len(), changes_before);
    assert!(member.leases.is_empty());
}

#[test]
fn revoke_of_an_unknown_lease_is_not_found_and_changes_nothing() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.put("k", 1).expect("put");
    member.persist();
    let (mvcc_before, leases_before) = (member.mvcc.clone(), member.leases.clone());
    assert_eq!(member.revoke(2), Err(KvError::LeaseNotFound));
    assert_eq!(KvError::LeaseNotFound.to_string(), "etcdserver: requested lease not found");
    assert_eq!(member.mvcc, mvcc_before);
    assert_eq!(member.leases, leases_before);
    assert!(member.kv_writes.is_empty());
    assert!(member.lease_writes.is_empty());
}

#[test]
fn observing_a_revokes_changes_again_changes_nothing() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.grant(2, 60).expect("grant");
    member.put("a", 1).expect("put");
    member.put("b", 2).expect("put");
    member.persist();
    member.revoke(1).expect("revoke");
    let before = member.leases.clone();
    member.leases.observe(&member.kv_writes.changes);
    assert_eq!(member.leases, before);
}

#[test]
fn a_lease_revoked_and_granted_again_in_one_batch_is_stored() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.checkpoint(&[(1, 30)]);
    member.revoke(1).expect("revoke");
    assert_eq!(member.lease_writes.puts, Vec::new());
    assert_eq!(member.lease_writes.removes, vec![1]);
    member.grant(1, 90).expect("grant");
    assert_eq!(member.lease_writes.removes, Vec::<i64>::new());
    member.persist_and_check_restore();
    assert_eq!(member.leases.get(1).expect("lease").granted_ttl_s, 90);
}

// ---------------------------------------------------------------------------------
// Observe and the checks
// ---------------------------------------------------------------------------------

#[test]
fn observe_follows_overwrites_deletes_and_puts_without_a_lease() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.grant(2, 60).expect("grant");
    member.put("a", 1).expect("put");
    member.put("b", 1).expect("put");
    member.put("c", 1).expect("put");
    assert_eq!(member.keys_of(1), vec!["a", "b", "c"]);

    // An overwrite with another lease moves the key.
    member.put("a", 2).expect("put");
    assert_eq!(member.keys_of(1), vec!["b", "c"]);
    assert_eq!(member.keys_of(2), vec!["a"]);

    // An overwrite with no lease detaches it.
    member.put("b", 0).expect("put");
    assert_eq!(member.keys_of(1), vec!["c"]);

    // ignore_lease keeps the key's lease.
    let mut keep = put_request("c", 0);
    keep.ignore_lease = true;
    member.put_request(&keep).expect("put");
    assert_eq!(member.keys_of(1), vec!["c"]);

    // A delete detaches it.
    member.delete("c", "");
    assert!(member.keys_of(1).is_empty());

    // A range delete detaches every key in it.
    member.put("x1", 2).expect("put");
    member.put("x2", 2).expect("put");
    member.delete("x", "y");
    assert_eq!(member.keys_of(2), vec!["a"]);

    // A txn's puts and deletes, nested ones included.
    let nested = TxnRequest { success: vec![op_put("n", 1)], ..TxnRequest::default() };
    let txn =
        TxnRequest { success: vec![op_put("a", 1), op_put("t", 2), op_txn(nested)], ..TxnRequest::default() };
    member.txn(&txn).expect("txn");
    assert_eq!(member.keys_of(1), vec!["a", "n"]);
    assert_eq!(member.keys_of(2), vec!["t"]);
    member.persist_and_check_restore();
}

#[test]
#[should_panic(expected = "does not exist")]
fn observe_panics_on_a_key_attached_to_a_lease_that_does_not_exist() {
    let mut member = Member::default();
    let mut writes = WriteSet::default();
    member.mvcc.put(&put_request("k", 9), &mut writes).expect("put");
    member.leases.observe(&writes.changes);
}

#[test]
fn a_put_naming_an_unknown_lease_is_refused_before_it_is_applied() {
    let mut member = Member::default();
    assert_eq!(member.put("k", 9), Err(KvError::LeaseNotFound));
    assert_eq!(member.mvcc, MvccStore::new());
    member.grant(9, 60).expect("grant");
    member.revoke(9).expect("revoke");
    assert_eq!(member.put("k", 9), Err(KvError::LeaseNotFound));
}

#[test]
fn check_attach_counts_keys_against_the_limit() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.put("a", 1).expect("put");
    member.put("b", 1).expect("put");
    let room = LEASE_KEYS_MAX as u64 - 2;
    assert_eq!(member.leases.check_attach(1, room), Ok(()));
    assert_eq!(
        member.leases.check_attach(1, room + 1),
        Err(KvError::TooManyLeaseKeys { lease_id: 1, max_count: LEASE_KEYS_MAX as u64 })
    );
    assert_eq!(member.leases.check_attach(0, u64::MAX / 2), Ok(()));
    assert_eq!(member.leases.check_attach(2, 0), Err(KvError::LeaseNotFound));
}

#[test]
fn check_txn_counts_the_larger_branch_and_adds_nested_txns() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.grant(2, 60).expect("grant");
    let nested = TxnRequest {
        success: vec![op_put("n1", 1)],
        failure: vec![op_put("n2", 1), op_put("n3", 1), op_put("n4", 2)],
        ..TxnRequest::default()
    };
    let txn = TxnRequest {
        success: vec![op_put("a", 1), op_txn(nested)],
        failure: vec![op_put("b", 2), op_put("c", 0)],
        ..TxnRequest::default()
    };
    assert_eq!(txn_puts_by_lease(&txn), BTreeMap::from([(1, 1 + 2), (2, 1)]));
    assert_eq!(LeaseStore::leases_named_by_txn(&txn).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(member.leases.check_txn(&txn), Ok(()));

    // An unknown lease anywhere refuses the whole txn, the lowest id first.
    let mut bad = txn.clone();
    bad.failure.push(op_put("x", 8));
    bad.success.push(op_txn(TxnRequest { failure: vec![op_put("y", 5)], ..TxnRequest::default() }));
    assert_eq!(LeaseStore::leases_named_by_txn(&bad).collect::<Vec<_>>(), vec![1, 2, 5, 8]);
    assert_eq!(member.txn(&bad), Err(KvError::LeaseNotFound));
    assert_eq!(member.mvcc, MvccStore::new());
}

#[test]
fn leases_named_by_put_skips_no_lease() {
    let named = |lease| LeaseStore::leases_named_by_put(&put_request("k", lease)).collect::<Vec<i64>>();
    assert_eq!(named(0), Vec::<i64>::new());
    assert_eq!(named(4), vec![4]);
}

// ---------------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------------

#[test]
fn checkpoint_stores_remaining_ttls_and_skips_unknown_leases() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.grant(2, 60).expect("grant");
    member.persist();
    member.checkpoint(&[(1, 42), (3, 10), (2, 7)]);
    assert_eq!(member.leases.get(1).expect("lease").remaining_ttl_s, Some(42));
    assert_eq!(member.leases.get(2).expect("lease").remaining_ttl_s, Some(7));
    assert!(member.leases.get(3).is_none());
    let ids: Vec<i64> = member.lease_writes.puts.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![1, 2]);
    member.persist_and_check_restore();

    // The same value again writes nothing; 0 (a keep-alive) clears it.
    member.checkpoint(&[(1, 42)]);
    assert!(member.lease_writes.is_empty());
    member.checkpoint(&[(1, 0), (2, -1)]);
    assert_eq!(member.leases.get(1).expect("lease").remaining_ttl_s, None);
    assert_eq!(member.leases.get(2).expect("lease").remaining_ttl_s, None);
    member.persist_and_check_restore();
}

// ---------------------------------------------------------------------------------
// Records and restore
// ---------------------------------------------------------------------------------

#[test]
fn records_round_trip() {
    for remaining_ttl_s in [None, Some(1), Some(LEASE_TTL_MAX_S)] {
        let lease = Lease { id: -12, granted_ttl_s: 3_600, remaining_ttl_s, keys: BTreeSet::new() };
        let record = lease.encode_record();
        assert_eq!(record.len(), RECORD_BYTES);
        assert_eq!(Lease::decode_record(-12, &record), Ok(lease));
    }
    let lease = Lease { id: 1, granted_ttl_s: 258, remaining_ttl_s: Some(3), keys: BTreeSet::new() };
    assert_eq!(lease.encode_record(), [0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 3]);
}

#[test]
fn restore_refuses_corrupt_records() {
    let good =
        Lease { id: 1, granted_ttl_s: 60, remaining_ttl_s: Some(5), keys: BTreeSet::new() }.encode_record();
    let with = |index: usize, byte: u8| {
        let mut record = good.clone();
        record[index] = byte;
        record
    };
    let negative_ttl = [&(-60i64).to_be_bytes()[..], &good[8..]].concat();
    let cases: Vec<(&str, Records)> = vec![
        ("short", vec![(1, good[..16].to_vec())]),
        ("long", vec![(1, [&good[..], &[0]].concat())]),
        ("unknown flag", vec![(1, with(8, 2))]),
        ("no flag but a remaining TTL", vec![(1, with(8, 0))]),
        ("flag but no remaining TTL", vec![(1, with(16, 0))]),
        ("id zero", vec![(0, good.clone())]),
        ("granted TTL not positive", vec![(1, negative_ttl)]),
        ("an id twice", vec![(1, good.clone()), (1, good.clone())]),
    ];
    for (name, records) in cases {
        let result = LeaseStore::restore(records, &MvccStore::new());
        assert!(matches!(result, Err(KvError::Corrupt(_))), "{name}: {result:?}");
    }
}

#[test]
fn restore_refuses_a_key_attached_to_a_lease_that_was_not_stored() {
    let mut member = Member::default();
    member.grant(1, 60).expect("grant");
    member.put("k", 1).expect("put");
    member.persist();
    let result = LeaseStore::restore(Vec::new(), &member.mvcc);
    assert!(matches!(result, Err(KvError::Corrupt(_))), "{result:?}");
}

/// A long sequence of every kind of command, persisted in batches of different
/// sizes; after every batch, what the disk holds restores to exactly the store
/// that wrote it.
#[test]
fn restore_gives_the_store_that_wrote_the_records() {
    let mut member = Member::default();
    member.persist_and_check_restore();
    for round in 0..40i64 {
        let id = round % 7 + 1;
        if member.leases.get(id).is_none() {
            member.grant(id, 10 + round).expect("grant");
        }
        for key_index in 0..(round % 5) {
            let key = format!("k{}", (round * 3 + key_index) % 23);
            let lease = if key_index % 3 == 2 { 0 } else { (key_index + round) % 7 + 1 };
            // Some leases are revoked by now: those puts are refused, as they must be.
            let _ = member.put(&key, lease);
        }
        match round % 6 {
            0 => member.checkpoint(&[(id, round + 1), (99, 5)]),
            1 => member.delete(&format!("k{}", round % 23), ""),
            2 => {
                let _ = member.revoke(round % 7 + 1);
            }
            3 => member.checkpoint(&[(id, 0)]),
            4 if member.mvcc.revision() - 1 > member.mvcc.compact_revision() => {
                member.compact(member.mvcc.revision() - 1)
            }
            4 => {}
            _ => {
                let _ = member.revoke((round + 3) % 7 + 1);
                let _ = member.grant((round + 3) % 7 + 1, 30);
            }
        }
        if round % 3 == 0 {
            member.persist_and_check_restore();
        }
    }
    member.persist_and_check_restore();
    assert!(!member.leases.is_empty(), "the sequence left no lease to restore");
    assert!(member.leases.iter().any(|lease| !lease.keys.is_empty()));
}
