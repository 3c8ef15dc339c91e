//! Locks, elections and fencing tokens, on the key space.
//!
//! A lock (or an election) named `N` is the set of live keys under `N/`. Each
//! contender owns one key, `N/<lease id in hex>`, attached to its session lease
//! (etcd's layout, so etcd's Lock and Election services and its `concurrency`
//! package see the same keys). The holder is the key created first; its create
//! revision is the **fencing token**: strictly increasing across holders, leaders
//! and restarts, because revisions are. A contender waits only for the key created
//! just before its own (its predecessor), so a release wakes one waiter.
//!
//! The functions here build the requests for each step and read their answers;
//! the server runs them through its node and the simulator through its world.
//! [`check_fence`] is the apply-time check of a fenced write.

use chorus_proto::chorus::v1::Fence;
use chorus_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, TxnResponse,
};
use chorus_proto::mvccpb::KeyValue;

use crate::error::KvError;
use crate::mvcc::{prefix_range_end, MvccStore};

/// The prefix under which the contenders for `name` keep their keys.
pub fn prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The key a contender holding `lease` owns for `name`.
pub fn contender_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix(name);
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

/// The lock name a contender key belongs to (its prefix without the slash).
pub fn name_of_key(key: &[u8]) -> Option<&[u8]> {
    let slash = key.iter().rposition(|&b| b == b'/')?;
    Some(&key[..slash])
}

/// A range over every contender of `name`, the first created first, `limit` of them.
fn contenders(name: &[u8], limit: i64, order: range_request::SortOrder) -> RangeRequest {
    let prefix = prefix(name);
    RangeRequest {
        range_end: prefix_range_end(&prefix),
        key: prefix,
        limit,
        sort_order: order as i32,
        sort_target: range_request::SortTarget::Create as i32,
        ..Default::default()
    }
}

/// The request that reads the current holder of `name` (or leader of an election).
pub fn holder_request(name: &[u8]) -> RangeRequest {
    contenders(name, 1, range_request::SortOrder::Ascend)
}

/// The txn that enters `name` as the contender of `lease`: creates its key with
/// `value` unless it exists, and reads the key and the current holder either way.
pub fn enter_txn(name: &[u8], lease: i64, value: Vec<u8>) -> TxnRequest {
    let key = contender_key(name, lease);
    let read_own = RangeRequest { key: key.clone(), ..Default::default() };
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.clone(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        }],
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key,
                    value,
                    lease,
                    ..Default::default()
                })),
            },
            RequestOp { request: Some(request_op::Request::RequestRange(read_own.clone())) },
            RequestOp { request: Some(request_op::Request::RequestRange(holder_request(name))) },
        ],
        failure: vec![
            RequestOp { request: Some(request_op::Request::RequestRange(read_own)) },
            RequestOp { request: Some(request_op::Request::RequestRange(holder_request(name))) },
        ],
    }
}

/// What entering a lock or election found.
#[derive(Clone, Debug, PartialEq)]
pub struct Entered {
    /// The contender's own key, as it is now.
    pub own: KeyValue,
    /// Whether the key was created by this txn (false: the lease already contended).
    pub created: bool,
    /// The current holder: the contender itself when `holder.create_revision == own.create_revision`.
    pub holder: Option<KeyValue>,
}

impl Entered {
    /// Whether the contender holds the lock (leads the election) already.
    pub fn holds(&self) -> bool {
        self.holder.as_ref().is_some_and(|holder| holder.create_revision == self.own.create_revision)
    }
}

/// Reads the answer to [`enter_txn`]; `None` if it does not have that shape (the
/// key vanished between the put and the read, which one txn cannot do).
pub fn read_entered(response: &TxnResponse) -> Option<Entered> {
    let ranges: Vec<&[KeyValue]> = response
        .responses
        .iter()
        .filter_map(|op| match &op.response {
            Some(response_op::Response::ResponseRange(range)) => Some(&range.kvs[..]),
            _ => None,
        })
        .collect();
    let [own, holder] = ranges[..] else {
        return None;
    };
    Some(Entered { own: own.first()?.clone(), created: response.succeeded, holder: holder.first().cloned() })
}

/// The request that finds the contender created just before `own_revision`: the
/// one to wait for. An empty answer means nobody is ahead.
pub fn predecessor_request(name: &[u8], own_revision: i64) -> RangeRequest {
    RangeRequest {
        max_create_revision: own_revision - 1,
        ..contenders(name, 1, range_request::SortOrder::Descend)
    }
}

/// The txn that leaves: deletes `key` only while it is still the generation
/// created at `create_revision` (a later contender with the same lease is not touched).
pub fn leave_txn(key: Vec<u8>, create_revision: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key.clone(), create_revision)],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key,
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    }
}

/// A compare that holds while `key` is the generation created at `create_revision`.
pub fn created_at(key: Vec<u8>, create_revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(create_revision)),
    }
}

/// The current fencing token of lock `name`: its holder's create revision.
pub fn current_token(mvcc: &MvccStore, name: &[u8]) -> Option<i64> {
    mvcc.first_created_under(&prefix(name)).map(|holder| holder.create_revision)
}

/// The apply-time check of a fenced write: the fence must name the lock's holder
/// now, in the log's order, or the write fails and changes nothing.
pub fn check_fence(mvcc: &MvccStore, fence: &Fence) -> Result<(), KvError> {
    let current = current_token(mvcc, &fence.lock);
    if current == Some(fence.token) {
        return Ok(());
    }
    Err(KvError::FenceStale {
        lock: String::from_utf8_lossy(&fence.lock).into_owned(),
        token: fence.token,
        current,
    })
}

#[cfg(test)]
mod tests;
