//! The replicated part of leases, with etcd's semantics (`server/lease/lessor.go`
//! in etcd): which leases exist, the TTL each was granted, the remaining TTL last
//! checkpointed for each, and which keys are attached to each.
//!
//! # What is not here
//!
//! Expiry. Only the leader decides that a lease has expired, on its monotonic
//! clock, and it carries the expiry out by proposing a revoke through the log
//! (DESIGN.md, section 5). Its timers are not replicated and live elsewhere. What
//! must survive a leader change is here: the granted TTL, and the remaining TTL
//! the leader checkpoints through the log, so that a new leader does not restart
//! every lease from its full TTL.
//!
//! # How it is driven
//!
//! [`LeaseStore`] is applied beside the [`MvccStore`], deterministically, on every
//! member. For each committed command the node calls:
//!
//! - [`LeaseStore::grant`], [`LeaseStore::revoke`] or [`LeaseStore::checkpoint`] for
//!   the lease commands. A revoke deletes the lease's keys through the
//!   [`MvccStore`], in one revision, and keeps its own key sets in step itself.
//! - For a put or a txn: first [`LeaseStore::check_put`] or [`LeaseStore::check_txn`]
//!   (at apply, not only at propose: a lease may be revoked in between), refusing the
//!   whole command on an error; then the [`MvccStore`] write; then
//!   [`LeaseStore::observe`] with the [`Change`]s that write produced. Deletes are
//!   observed too (they detach keys), though they need no check.
//!
//! Each method appends to a [`LeaseWrites`] the lease records the caller must
//! persist, in the same storage transaction as the key space's records and the
//! applied index. At start-up, [`LeaseStore::restore`] rebuilds the same store from
//! those records and the restored key space. The store does no IO.
//!
//! # Invariant
//!
//! Every live key whose `lease` field is not 0 is attached to a lease that exists,
//! and the lease's key set holds exactly those keys. The checks keep it at apply; a
//! change that would break it is a bug in the caller and panics in
//! [`LeaseStore::observe`]; persisted state that breaks it is `Corrupt`.
//!
//! # On-disk format (owned by this module)
//!
//! One record per lease, keyed by its id (the caller chooses how to store the key;
//! 8 bytes big-endian keeps them in id order). The value is [`RECORD_BYTES`] bytes:
//!
//! | bytes | field                                                                |
//! | ----- | -------------------------------------------------------------------- |
//! | 0..8  | the granted TTL in seconds, i64 big-endian, positive                 |
//! | 8     | 1 if a remaining TTL has been checkpointed, else 0                   |
//! | 9..17 | that remaining TTL in seconds, i64 big-endian, positive; else zeros  |
//!
//! The attached keys are not stored: they are the live keys whose `lease` field
//! names the lease, found again in the key space at restore.

use std::collections::{BTreeMap, BTreeSet};

use chorus_proto::etcdserverpb::request_op::Request;
use chorus_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseCheckpointRequest, LeaseCheckpointResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest,
};

use crate::error::KvError;
use crate::limits::{LEASES_MAX, LEASE_KEYS_MAX, LEASE_TTL_MAX_S, LEASE_TTL_MIN_S};
use crate::mvcc::{Change, ChangeKind, MvccStore, WriteSet};

/// The length of an encoded lease record: see the module documentation.
pub const RECORD_BYTES: usize = 17;

/// The flag byte of a record without a checkpointed remaining TTL.
const RECORD_FLAG_NO_REMAINING: u8 = 0;
/// The flag byte of a record with a checkpointed remaining TTL.
const RECORD_FLAG_REMAINING: u8 = 1;

/// The lease id that means "no lease" in a key and in a put.
const NO_LEASE: i64 = 0;

/// One lease, as every member holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// The TTL granted, after raising it to [`LEASE_TTL_MIN_S`]; a keep-alive
    /// restarts the lease from it.
    pub granted_ttl_s: i64,
    /// The remaining TTL the leader last checkpointed, if any since the grant or
    /// the last keep-alive (which checkpoints 0 to clear it). Always positive.
    pub remaining_ttl_s: Option<i64>,
    /// The live keys whose `lease` field is this lease's id.
    pub keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    /// The persisted record: see the module documentation.
    pub fn encode_record(&self) -> Vec<u8> {
        let mut record = Vec::with_capacity(RECORD_BYTES);
        record.extend_from_slice(&self.granted_ttl_s.to_be_bytes());
        match self.remaining_ttl_s {
            Some(remaining_ttl_s) => {
                record.push(RECORD_FLAG_REMAINING);
                record.extend_from_slice(&remaining_ttl_s.to_be_bytes());
            }
            None => {
                record.push(RECORD_FLAG_NO_REMAINING);
                record.extend_from_slice(&[0; 8]);
            }
        }
        record
    }

    /// The lease a persisted record describes, with no keys yet.
    pub fn decode_record(id: i64, record: &[u8]) -> Result<Lease, KvError> {
        let bytes: &[u8; RECORD_BYTES] =
            record.try_into().map_err(|_| corrupt(id, format!("is {} bytes long", record.len())))?;
        let int_at = |start: usize| {
            let mut int = [0u8; 8];
            int.copy_from_slice(&bytes[start..start + 8]);
            i64::from_be_bytes(int)
        };
        let granted_ttl_s = int_at(0);
        let remaining_ttl_s = match bytes[8] {
            RECORD_FLAG_NO_REMAINING if int_at(9) == 0 => None,
            RECORD_FLAG_REMAINING if int_at(9) > 0 => Some(int_at(9)),
            flag => {
                let detail = format!("has flag {flag} and remaining TTL {} s", int_at(9));
                return Err(corrupt(id, detail));
            }
        };
        if id == NO_LEASE || granted_ttl_s <= 0 {
            return Err(corrupt(id, format!("has granted TTL {granted_ttl_s} s")));
        }
        Ok(Lease { id, granted_ttl_s, remaining_ttl_s, keys: BTreeSet::new() })
    }
}

/// What a caller must persist after applying lease commands, in the same storage
/// transaction as the key space's records and the applied index. Methods append to
/// it, so one value may collect several commands. An id is never in both lists, so
/// they may be applied in either order; if `puts` holds one id twice, the later
/// record replaces the earlier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseWrites {
    /// Lease records to store: id -> encoded record.
    pub puts: Vec<(i64, Vec<u8>)>,
    /// Lease records to delete, by id.
    pub removes: Vec<i64>,
}

impl LeaseWrites {
    /// Whether there is nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.removes.is_empty()
    }

    fn put(&mut self, lease: &Lease) {
        // A lease revoked earlier in the batch and granted again: keep only the put.
        self.removes.retain(|id| *id != lease.id);
        self.puts.push((lease.id, lease.encode_record()));
    }

    fn remove(&mut self, id: i64) {
        // A lease granted or checkpointed earlier in the batch: keep only the removal.
        self.puts.retain(|(put_id, _)| *put_id != id);
        self.removes.push(id);
    }
}

/// Every lease, by id. Ordered, so that iteration (restore, listing, the leader
/// rebuilding its timers) is the same on every member.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseStore {
    leases: BTreeMap<i64, Lease>,
}

impl LeaseStore {
    /// An empty store.
    pub fn new() -> LeaseStore {
        LeaseStore::default()
    }

    /// Rebuilds the store from its persisted records (in any order) and the
    /// restored key space: each lease's keys are the live keys whose `lease` field
    /// names it. An error means the persisted state is corrupt: a record that does
    /// not decode, an id twice, or a live key naming a lease that does not exist.
    /// The limits are not checked: they bound what may be added, and may have been
    /// lowered since.
    pub fn restore(
        records: impl IntoIterator<Item = (i64, Vec<u8>)>,
        mvcc: &MvccStore,
    ) -> Result<LeaseStore, KvError> {
        let mut store = LeaseStore::new();
        for (id, record) in records {
            let lease = Lease::decode_record(id, &record)?;
            if store.leases.insert(id, lease).is_some() {
                return Err(corrupt(id, "is stored twice".to_string()));
            }
        }
        let every_key =
            RangeRequest { key: vec![0], range_end: vec![0], keys_only: true, ..RangeRequest::default() };
        for kv in mvcc.range(&every_key)?.kvs {
            if kv.lease == NO_LEASE {
                continue;
            }
            let Some(lease) = store.leases.get_mut(&kv.lease) else {
                return Err(KvError::Corrupt(format!(
                    "lease: key {:?} is attached to lease {}, which does not exist",
                    String::from_utf8_lossy(&kv.key),
                    kv.lease
                )));
            };
            lease.keys.insert(kv.key);
        }
        Ok(store)
    }

    /// Grants a lease, as etcd's `Lessor.Grant`. The id must not be 0: the
    /// proposing member picks one when the client leaves it to the server, so that
    /// every member applies the same. A TTL below [`LEASE_TTL_MIN_S`] is raised to
    /// it. The response's header is left for the caller to stamp.
    pub fn grant(
        &mut self,
        request: &LeaseGrantRequest,
        writes: &mut LeaseWrites,
    ) -> Result<LeaseGrantResponse, KvError> {
        let id = request.id;
        if id == NO_LEASE {
            return Err(KvError::InvalidArgument(
                "lease ID must be chosen before the grant is applied".to_string(),
            ));
        }
        if request.ttl > LEASE_TTL_MAX_S {
            return Err(KvError::LeaseTtlTooLarge { ttl_s: request.ttl, max_s: LEASE_TTL_MAX_S });
        }
        if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists);
        }
        if self.leases.len() >= LEASES_MAX {
            return Err(KvError::TooManyLeases { max_count: LEASES_MAX as u64 });
        }
        let lease = Lease {
            id,
            granted_ttl_s: request.ttl.max(LEASE_TTL_MIN_S),
            remaining_ttl_s: None,
            keys: BTreeSet::new(),
        };
        writes.put(&lease);
        let ttl = lease.granted_ttl_s;
        self.leases.insert(id, lease);
        Ok(LeaseGrantResponse { header: None, id, ttl, error: String::new() })
    }

    /// Revokes a lease, as etcd's `Lessor.Revoke`: deletes every key attached to it
    /// through `mvcc` as one txn of deletes, so the deletions take one revision and
    /// watchers see them together, then removes the lease. A lease without keys
    /// changes no revision. The response's header holds the revision after the
    /// deletions (the caller stamps the rest).
    ///
    /// The deletions' [`Change`]s are appended to `kv_writes` for the watch hub.
    /// This store is already in step with them; observing them again is harmless.
    pub fn revoke(
        &mut self,
        request: &LeaseRevokeRequest,
        mvcc: &mut MvccStore,
        kv_writes: &mut WriteSet,
        writes: &mut LeaseWrites,
    ) -> Result<LeaseRevokeResponse, KvError> {
        let id = request.id;
        let Some(lease) = self.leases.get(&id) else {
            return Err(KvError::LeaseNotFound);
        };
        let deletes = TxnRequest {
            success: lease.keys.iter().map(|key| delete_op(key)).collect(),
            ..TxnRequest::default()
        };
        let changes_before = kv_writes.changes.len();
        let revision_before = mvcc.revision();
        mvcc.txn(&deletes, kv_writes)?;
        let changes = &kv_writes.changes[changes_before..];
        assert_eq!(
            changes.len(),
            lease.keys.len(),
            "lease {id}: revoke deleted a different number of keys than were attached"
        );
        for change in changes {
            let deleted_lease = change.prev_kv.as_ref().map(|kv| kv.lease);
            assert!(
                change.kind == ChangeKind::Delete && deleted_lease == Some(id),
                "lease {id}: revoke produced a change that is not a deletion of its key"
            );
        }
        assert!(
            changes.is_empty() || mvcc.revision() == revision_before + 1,
            "lease {id}: revoke took more than one revision"
        );
        self.leases.remove(&id);
        writes.remove(id);
        Ok(LeaseRevokeResponse {
            header: Some(ResponseHeader { revision: mvcc.revision(), ..ResponseHeader::default() }),
        })
    }

    /// Stores the remaining TTLs the leader checkpointed, as etcd's
    /// `Lessor.Checkpoint`: an unknown id is skipped (the lease was revoked since),
    /// and a remaining TTL of 0 or less clears the checkpoint (a keep-alive sends 0,
    /// so that the lease restarts from its granted TTL). The response's header is
    /// left for the caller to stamp.
    pub fn checkpoint(
        &mut self,
        request: &LeaseCheckpointRequest,
        writes: &mut LeaseWrites,
    ) -> Result<LeaseCheckpointResponse, KvError> {
        for checkpoint in &request.checkpoints {
            let Some(lease) = self.leases.get_mut(&checkpoint.id) else {
                continue;
            };
            let remaining_ttl_s = Some(checkpoint.remaining_ttl).filter(|ttl_s| *ttl_s > 0);
            if lease.remaining_ttl_s != remaining_ttl_s {
                lease.remaining_ttl_s = remaining_ttl_s;
                writes.put(lease);
            }
        }
        Ok(LeaseCheckpointResponse { header: None })
    }

    /// Keeps key attachments in step with the key space. Call it with the changes
    /// one applied write produced, in order: a put detaches the key from
    /// `prev_kv.lease` and attaches it to `kv.lease`; a delete detaches it from
    /// `prev_kv.lease`. A detachment from a lease that no longer exists is nothing
    /// (a revoke's own deletions). An attachment to a lease that does not exist
    /// panics: the caller skipped [`LeaseStore::check_put`] or
    /// [`LeaseStore::check_txn`], and the key space would name a lease nobody can
    /// revoke.
    pub fn observe(&mut self, changes: &[Change]) {
        for change in changes {
            if let Some(prev_kv) = &change.prev_kv {
                self.detach(prev_kv.lease, &prev_kv.key);
            }
            if change.kind == ChangeKind::Put {
                self.attach(change.kv.lease, &change.kv.key);
            }
        }
    }

    /// Whether `keys_added_count` more keys may be attached to lease `lease_id`:
    /// `LeaseNotFound` if it does not exist, `TooManyLeaseKeys` if it would hold
    /// more than [`LEASE_KEYS_MAX`] keys. Lease 0 (no lease) always may.
    pub fn check_attach(&self, lease_id: i64, keys_added_count: u64) -> Result<(), KvError> {
        if lease_id == NO_LEASE {
            return Ok(());
        }
        let Some(lease) = self.leases.get(&lease_id) else {
            return Err(KvError::LeaseNotFound);
        };
        if lease.keys.len() as u64 + keys_added_count > LEASE_KEYS_MAX as u64 {
            return Err(KvError::TooManyLeaseKeys { lease_id, max_count: LEASE_KEYS_MAX as u64 });
        }
        Ok(())
    }

    /// Whether a put may be applied: [`LeaseStore::check_attach`] of its lease.
    pub fn check_put(&self, request: &PutRequest) -> Result<(), KvError> {
        self.check_attach(request.lease, 1)
    }

    /// Whether a txn may be applied: [`LeaseStore::check_attach`] of every lease a
    /// put in it names, with as many keys as the branch that puts the most with
    /// that lease (both branches are counted, as etcd checks leases before it knows
    /// which branch runs). Puts to keys already attached are counted too, so this
    /// is an upper bound. Leases are checked in id order, so the error is the
    /// same on every member.
    pub fn check_txn(&self, request: &TxnRequest) -> Result<(), KvError> {
        for (lease_id, keys_added_count) in txn_puts_by_lease(request) {
            self.check_attach(lease_id, keys_added_count)?;
        }
        Ok(())
    }

    /// The lease a put would attach its key to, if any.
    pub fn leases_named_by_put(request: &PutRequest) -> impl Iterator<Item = i64> {
        Some(request.lease).filter(|id| *id != NO_LEASE).into_iter()
    }

    /// Every lease a txn would attach keys to, in id order, each once: the puts
    /// of both branches, nested txns included.
    pub fn leases_named_by_txn(request: &TxnRequest) -> impl Iterator<Item = i64> {
        txn_puts_by_lease(request).into_keys()
    }

    /// The lease with this id, if it exists.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease id, ascending.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.leases.keys().copied()
    }

    /// Every lease, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> + '_ {
        self.leases.values()
    }

    /// The number of leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    fn attach(&mut self, lease_id: i64, key: &[u8]) {
        if lease_id == NO_LEASE {
            return;
        }
        let Some(lease) = self.leases.get_mut(&lease_id) else {
            panic!("lease {lease_id}: a key was attached to it, but it does not exist");
        };
        lease.keys.insert(key.to_vec());
    }

    fn detach(&mut self, lease_id: i64, key: &[u8]) {
        if let Some(lease) = self.leases.get_mut(&lease_id) {
            let was_attached = lease.keys.remove(key);
            assert!(was_attached, "lease {lease_id}: a key was detached from it, but it was not attached");
        }
    }
}

/// For each lease a put in `request` names, the most puts with it on any one path
/// through the txn (the ops of a branch add up; of the two branches, the larger
/// counts).
fn txn_puts_by_lease(request: &TxnRequest) -> BTreeMap<i64, u64> {
    let mut counts = ops_puts_by_lease(&request.success);
    for (lease_id, count) in ops_puts_by_lease(&request.failure) {
        let most = counts.entry(lease_id).or_default();
        *most = (*most).max(count);
    }
    counts
}

fn ops_puts_by_lease(ops: &[RequestOp]) -> BTreeMap<i64, u64> {
    let mut counts = BTreeMap::new();
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(put)) if put.lease != NO_LEASE => {
                *counts.entry(put.lease).or_default() += 1;
            }
            Some(Request::RequestTxn(nested)) => {
                for (lease_id, count) in txn_puts_by_lease(nested) {
                    *counts.entry(lease_id).or_default() += count;
                }
            }
            _ => {}
        }
    }
    counts
}

fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            ..DeleteRangeRequest::default()
        })),
    }
}

fn corrupt(id: i64, detail: String) -> KvError {
    KvError::Corrupt(format!("lease record {id}: {detail}"))
}

#[cfg(test)]
mod tests;
