//! Checks a KV request before it is proposed to raft, so that bad input is refused
//! with a precise error and never reaches the log (where it would cost every member a
//! write and an fsync, and change nothing).
//!
//! The rules are etcd's (`server/etcdserver/api/v3rpc/key.go`), with the same
//! errors, plus the limits of [`Limits`]. They depend only on the request, never
//! on the state: checks that depend on the state (does the key exist for
//! `ignore_value`, is the revision compacted) are made when the request is applied,
//! by [`crate::mvcc`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use chorus_proto::chorus::v1::{fenced_write, Fence, FencedWrite};
use chorus_proto::etcdserverpb::compare::{CompareResult, CompareTarget};
use chorus_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use chorus_proto::etcdserverpb::request_op::Request;
use chorus_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use prost::Message;

use crate::error::KvError;
use crate::limits::Limits;

/// Checks a range request.
pub fn validate_range(request: &RangeRequest, limits: &Limits) -> Result<(), KvError> {
    check_request_bytes(request.encoded_len(), limits)?;
    check_range_fields(request, limits)
}

/// Checks a put request.
pub fn validate_put(request: &PutRequest, limits: &Limits) -> Result<(), KvError> {
    check_request_bytes(request.encoded_len(), limits)?;
    check_put_fields(request, limits)
}

/// Checks a delete-range request.
pub fn validate_delete_range(request: &DeleteRangeRequest, limits: &Limits) -> Result<(), KvError> {
    check_request_bytes(request.encoded_len(), limits)?;
    check_delete_fields(request, limits)
}

/// Checks a txn: its size, every compare and every operation of both branches
/// (nested txns included), and that no branch writes a key twice.
pub fn validate_txn(request: &TxnRequest, limits: &Limits) -> Result<(), KvError> {
    check_request_bytes(request.encoded_len(), limits)?;
    check_txn_fields(request, limits, limits.txn_ops_max)?;
    // Like etcd, the overlap check runs after the cheap per-field checks, and each
    // top-level branch is checked on its own: only one of them will run.
    check_intervals(&request.success)?;
    check_intervals(&request.failure)?;
    Ok(())
}

/// Checks a fenced write: the fence (a lock name and a positive token) and the
/// write it guards, by the same rules as the unfenced write.
pub fn validate_fenced(request: &FencedWrite, limits: &Limits) -> Result<(), KvError> {
    let fence =
        request.fence.as_ref().ok_or_else(|| KvError::InvalidArgument("fence is not provided".into()))?;
    validate_fence(fence, limits)?;
    match &request.write {
        Some(fenced_write::Write::Put(put)) => validate_put(put, limits),
        Some(fenced_write::Write::DeleteRange(delete)) => validate_delete_range(delete, limits),
        Some(fenced_write::Write::Txn(txn)) => validate_txn(txn, limits),
        None => Err(KvError::InvalidArgument("fenced write has no operation".into())),
    }
}

/// Checks a fence: a lock name that could be a key, and a token that could be a revision.
pub fn validate_fence(fence: &Fence, limits: &Limits) -> Result<(), KvError> {
    if fence.lock.is_empty() {
        return Err(KvError::InvalidArgument("fence lock name is not provided".into()));
    }
    check_key_bytes(&fence.lock, limits)?;
    if fence.token <= 0 {
        return Err(KvError::InvalidArgument(format!(
            "fence token must be a positive revision, got {}",
            fence.token
        )));
    }
    Ok(())
}

/// Checks a compaction request. Whether the revision is already compacted or in
/// the future depends on the state, so that is checked at apply time.
pub fn validate_compaction(request: &CompactionRequest) -> Result<(), KvError> {
    check_not_negative("revision", request.revision)
}

/// The message etcd gives when `ignore_value` is set and a value is given too.
pub(crate) const VALUE_PROVIDED_MESSAGE: &str = "value is provided";
/// The message etcd gives when `ignore_lease` is set and a lease is given too.
pub(crate) const LEASE_PROVIDED_MESSAGE: &str = "lease is provided";
/// The message etcd gives for an empty `RequestOp` (etcd's `ErrGRPCKeyNotFound`:
/// odd, but clients may match on it).
pub(crate) const EMPTY_OP_MESSAGE: &str = "key not found";
/// etcd's `ErrGRPCInvalidSortOption`.
const INVALID_SORT_MESSAGE: &str = "invalid sort option";

/// The flag combinations of a put that contradict themselves. Shared with the MVCC
/// store, which checks them again at apply time (a request may reach the log
/// without passing through this module, for example from an older member).
pub(crate) fn check_put_flags(request: &PutRequest) -> Result<(), KvError> {
    if request.ignore_value && !request.value.is_empty() {
        return Err(KvError::InvalidArgument(VALUE_PROVIDED_MESSAGE.to_string()));
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(KvError::InvalidArgument(LEASE_PROVIDED_MESSAGE.to_string()));
    }
    Ok(())
}

fn check_request_bytes(size_bytes: usize, limits: &Limits) -> Result<(), KvError> {
    let size_bytes = size_bytes as u64;
    if size_bytes > limits.request_bytes_max {
        return Err(KvError::RequestTooLarge { size_bytes, max_bytes: limits.request_bytes_max });
    }
    Ok(())
}

fn check_key(key: &[u8], limits: &Limits) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    check_key_bytes(key, limits)
}

fn check_key_bytes(key: &[u8], limits: &Limits) -> Result<(), KvError> {
    let size_bytes = key.len() as u64;
    if size_bytes > limits.key_bytes_max {
        return Err(KvError::KeyTooLarge { size_bytes, max_bytes: limits.key_bytes_max });
    }
    Ok(())
}

/// `range_end` is empty (one key), `[0]` (every key from `key` on), or a bound that
/// is not below `key` (equal to `key` is an empty range, which is allowed).
fn check_range_end(key: &[u8], range_end: &[u8], limits: &Limits) -> Result<(), KvError> {
    if range_end.is_empty() || range_end == [0] {
        return Ok(());
    }
    check_key_bytes(range_end, limits)?;
    if range_end < key {
        return Err(KvError::InvalidRangeEnd);
    }
    Ok(())
}

fn check_not_negative(field: &str, value: i64) -> Result<(), KvError> {
    if value < 0 {
        return Err(KvError::InvalidArgument(format!("{field} must not be negative (got {value})")));
    }
    Ok(())
}

fn check_range_fields(request: &RangeRequest, limits: &Limits) -> Result<(), KvError> {
    check_key(&request.key, limits)?;
    check_range_end(&request.key, &request.range_end, limits)?;
    check_not_negative("revision", request.revision)?;
    check_not_negative("limit", request.limit)?;
    if SortOrder::try_from(request.sort_order).is_err() || SortTarget::try_from(request.sort_target).is_err()
    {
        return Err(KvError::InvalidArgument(INVALID_SORT_MESSAGE.to_string()));
    }
    Ok(())
}

fn check_put_fields(request: &PutRequest, limits: &Limits) -> Result<(), KvError> {
    check_key(&request.key, limits)?;
    let size_bytes = request.value.len() as u64;
    if size_bytes > limits.value_bytes_max {
        return Err(KvError::ValueTooLarge { size_bytes, max_bytes: limits.value_bytes_max });
    }
    check_put_flags(request)
}

fn check_delete_fields(request: &DeleteRangeRequest, limits: &Limits) -> Result<(), KvError> {
    check_key(&request.key, limits)?;
    check_range_end(&request.key, &request.range_end, limits)
}

fn check_compare(compare: &Compare, limits: &Limits) -> Result<(), KvError> {
    check_key(&compare.key, limits)?;
    check_range_end(&compare.key, &compare.range_end, limits)?;
    if CompareResult::try_from(compare.result).is_err() {
        return Err(KvError::InvalidArgument(format!("unknown compare result {}", compare.result)));
    }
    if CompareTarget::try_from(compare.target).is_err() {
        return Err(KvError::InvalidArgument(format!("unknown compare target {}", compare.target)));
    }
    Ok(())
}

/// `ops_max` is the budget for this txn. Like etcd, a nested txn gets what its
/// parent left: `ops_max` minus the parent's largest of compares, success and
/// failure, so nesting cannot multiply the work of one request without bound.
fn check_txn_fields(request: &TxnRequest, limits: &Limits, ops_max: u64) -> Result<(), KvError> {
    let ops_count = request.compare.len().max(request.success.len()).max(request.failure.len()) as u64;
    if ops_count > ops_max {
        return Err(KvError::TooManyOps { ops_count, max_count: ops_max });
    }
    for compare in &request.compare {
        check_compare(compare, limits)?;
    }
    for op in request.success.iter().chain(&request.failure) {
        check_op(op, limits, ops_max - ops_count)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, limits: &Limits, ops_max: u64) -> Result<(), KvError> {
    match &op.request {
        None => Err(KvError::InvalidArgument(EMPTY_OP_MESSAGE.to_string())),
        Some(Request::RequestRange(range)) => check_range_fields(range, limits),
        Some(Request::RequestPut(put)) => check_put_fields(put, limits),
        Some(Request::RequestDeleteRange(delete)) => check_delete_fields(delete, limits),
        Some(Request::RequestTxn(txn)) => check_txn_fields(txn, limits, ops_max),
    }
}

/// etcd's `checkIntervals`: within one list of operations (and the txns nested in
/// it), a key may not be put twice, and a put key may not lie inside a deleted range.
/// Deleted ranges may overlap each other. The two branches of a nested txn may put
/// the same key, since only one of them runs. Returns the keys put and the ranges
/// deleted, for the parent's check.
///
/// The order of the checks is etcd's, including its blind spots, so that every txn
/// etcd accepts is accepted here: a nested txn's puts are checked against the ranges
/// deleted by this list and by the nested txns before it, not after it; and a
/// from-key delete (`range_end` = `[0]`) conflicts with nothing, because etcd's
/// interval for it, `[key, "\0")`, is empty. The MVCC store gives every change of
/// a revision its own sub-revision, so a key changed twice in one txn is still
/// stored and watched correctly.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<&[u8]>, DeletedRanges), KvError> {
    let mut deleted = DeletedRanges::default();
    for op in ops {
        if let Some(Request::RequestDeleteRange(delete)) = &op.request {
            deleted.insert_request(&delete.key, &delete.range_end);
        }
    }
    let mut puts = BTreeSet::new();
    for op in ops {
        if let Some(Request::RequestTxn(txn)) = &op.request {
            let (puts_then, deleted_then) = check_intervals(&txn.success)?;
            let (puts_else, deleted_else) = check_intervals(&txn.failure)?;
            for key in &puts_then {
                if puts.contains(key) || deleted.contains(key) {
                    return Err(KvError::DuplicateKey);
                }
                puts.insert(*key);
            }
            for key in puts_else {
                let from_earlier_op = puts.contains(key) && !puts_then.contains(key);
                if from_earlier_op || deleted.contains(key) {
                    return Err(KvError::DuplicateKey);
                }
                puts.insert(key);
            }
            deleted.extend(deleted_then);
            deleted.extend(deleted_else);
        }
    }
    for op in ops {
        if let Some(Request::RequestPut(put)) = &op.request {
            if !puts.insert(put.key.as_slice()) || deleted.contains(&put.key) {
                return Err(KvError::DuplicateKey);
            }
        }
    }
    Ok((puts, deleted))
}

/// A union of half-open key intervals `[begin, end)`, kept disjoint and keyed by
/// `begin`, so "is this key deleted?" is one ordered-map lookup. (etcd uses an
/// interval tree; the union is all this check needs.)
#[derive(Debug, Default)]
struct DeletedRanges {
    end_by_begin: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl DeletedRanges {
    /// Adds the keys a delete-range request names, as etcd's check sees them.
    fn insert_request(&mut self, key: &[u8], range_end: &[u8]) {
        if range_end.is_empty() {
            let mut end = key.to_vec();
            end.push(0);
            self.insert(key.to_vec(), end);
        } else {
            // A from-key range_end ([0]) sorts below every non-empty key, so this
            // interval is empty, as in etcd (see `check_intervals`).
            self.insert(key.to_vec(), range_end.to_vec());
        }
    }

    fn insert(&mut self, mut begin: Vec<u8>, mut end: Vec<u8>) {
        if end <= begin {
            return;
        }
        let before = (Bound::Unbounded, Bound::Included(begin.as_slice()));
        if let Some((previous_begin, previous_end)) = self.end_by_begin.range::<[u8], _>(before).next_back() {
            if *previous_end >= begin {
                begin = previous_begin.clone();
                end = end.max(previous_end.clone());
            }
        }
        let overlapping = (Bound::Included(begin.as_slice()), Bound::Included(end.as_slice()));
        let absorbed: Vec<Vec<u8>> = self
            .end_by_begin
            .range::<[u8], _>(overlapping)
            .map(|(absorbed_begin, _)| absorbed_begin.clone())
            .collect();
        for absorbed_begin in absorbed {
            if let Some(absorbed_end) = self.end_by_begin.remove(&absorbed_begin) {
                end = end.max(absorbed_end);
            }
        }
        self.end_by_begin.insert(begin, end);
    }

    fn extend(&mut self, other: DeletedRanges) {
        for (begin, end) in other.end_by_begin {
            self.insert(begin, end);
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        let at_or_before = (Bound::Unbounded, Bound::Included(key));
        self.end_by_begin
            .range::<[u8], _>(at_or_before)
            .next_back()
            .is_some_and(|(_, end)| key < end.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(intervals: &[(&str, &str)]) -> DeletedRanges {
        let mut deleted = DeletedRanges::default();
        for (begin, end) in intervals {
            deleted.insert(begin.as_bytes().to_vec(), end.as_bytes().to_vec());
        }
        deleted
    }

    #[test]
    fn deleted_ranges_merge_overlapping_and_adjacent_intervals() {
        let deleted = ranges(&[("c", "e"), ("a", "b"), ("d", "g"), ("b", "c"), ("x", "z")]);
        let merged: Vec<(&[u8], &[u8])> =
            deleted.end_by_begin.iter().map(|(b, e)| (b.as_slice(), e.as_slice())).collect();
        assert_eq!(merged, vec![(&b"a"[..], &b"g"[..]), (&b"x"[..], &b"z"[..])]);
    }

    #[test]
    fn deleted_ranges_contains_is_half_open() {
        let deleted = ranges(&[("b", "d"), ("m", "n")]);
        let cases: &[(&str, bool)] = &[
            ("a", false),
            ("b", true),
            ("c", true),
            ("czzz", true),
            ("d", false),
            ("m", true),
            ("m\0", true),
            ("n", false),
        ];
        for (key, expected) in cases {
            assert_eq!(deleted.contains(key.as_bytes()), *expected, "key {key:?}");
        }
    }

    #[test]
    fn deleted_ranges_ignore_empty_and_from_key_intervals() {
        let mut deleted = ranges(&[("b", "b"), ("d", "c")]);
        deleted.insert_request(b"a", &[0]);
        assert!(deleted.end_by_begin.is_empty());
        deleted.insert_request(b"k", b"");
        assert!(deleted.contains(b"k"));
        assert!(!deleted.contains(b"k\0"));
    }

    #[test]
    fn deleted_ranges_absorb_an_interval_inside_an_existing_one() {
        let deleted = ranges(&[("a", "z"), ("c", "d")]);
        assert_eq!(deleted.end_by_begin.len(), 1);
        assert!(deleted.contains(b"y"));
    }
}
