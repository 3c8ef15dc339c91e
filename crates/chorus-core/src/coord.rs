//! What queues ([`crate::queue`]) and barriers ([`crate::barrier`]) share: their
//! reserved key prefix, name validation, their errors, and small builders for the
//! txns and ranges they run through the ordinary replicated KV.
//!
//! Queues and barriers are pure request builders and response interpreters: the
//! server runs the requests through its node, the simulator through its world, so
//! both run the same logic, and the state machine needs nothing new.
//!
//! # Key layout
//!
//! Everything lives under [`RESERVED_PREFIX`] (`"\x00chorus/"`). A key starting
//! with a NUL byte is not typed by accident (etcdctl cannot even take it as an
//! argument without shell quoting), and it sorts before every printable key, so a
//! `get "" --from-key` shows it first and a printable prefix range never includes it.
//!
//! - `\x00chorus/queue/<queue>/m/<id>`: a message (value: payload; version - 1:
//!   deliveries so far; create revision: its place in the queue);
//! - `\x00chorus/queue/<queue>/c/<id>`: its claim, attached to the consumer's
//!   lease (value empty; create revision: the claim token);
//! - `\x00chorus/barrier/<name>/p/<lease>`: a participant, attached to its lease;
//! - `\x00chorus/barrier/<name>/tripped`: the durable trip record (no lease).
//!
//! Names may not contain `/` or NUL, so one name's keys are never inside another's.

use chorus_proto::etcdserverpb::{
    compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
};

use crate::limits::COORD_NAME_BYTES_MAX;

/// The prefix of every key chorus's coordination services write.
pub const RESERVED_PREFIX: &[u8] = b"\x00chorus/";

/// Why a queue or barrier call failed. Each one leaves the state unchanged unless
/// its text says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// Bad input (gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// A limit was reached (gRPC RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The state does not allow the call, e.g. a stale claim token (gRPC FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Nothing happened in time (gRPC DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
}

/// Checks a queue or barrier name: non-empty, at most [`COORD_NAME_BYTES_MAX`]
/// bytes, no `/` and no NUL.
pub fn validate_name(kind: &str, name: &str) -> Result<(), CoordError> {
    if name.is_empty() {
        return Err(CoordError::InvalidArgument(format!("{kind} name is empty")));
    }
    if name.len() > COORD_NAME_BYTES_MAX {
        return Err(CoordError::InvalidArgument(format!(
            "{kind} name is too long ({} bytes, at most {COORD_NAME_BYTES_MAX})",
            name.len()
        )));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(CoordError::InvalidArgument(format!("{kind} name {name:?} contains '/' or NUL")));
    }
    Ok(())
}

/// Checks a wait in milliseconds: 0 (do not wait) up to [`crate::limits::COORD_WAIT_MS_MAX`].
pub fn validate_timeout_ms(timeout_ms: i64) -> Result<(), CoordError> {
    if !(0..=crate::limits::COORD_WAIT_MS_MAX).contains(&timeout_ms) {
        return Err(CoordError::InvalidArgument(format!(
            "timeout_ms must be between 0 and {} (got {timeout_ms})",
            crate::limits::COORD_WAIT_MS_MAX
        )));
    }
    Ok(())
}

/// The end of the range of every key starting with `prefix` (`prefix` never ends in 0xff here).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(crate) fn compare_create(key: Vec<u8>, create_revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        target_union: Some(compare::TargetUnion::CreateRevision(create_revision)),
        ..Default::default()
    }
}

pub(crate) fn compare_version(key: Vec<u8>, version: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Version as i32,
        key,
        target_union: Some(compare::TargetUnion::Version(version)),
        ..Default::default()
    }
}

pub(crate) fn compare_mod(key: Vec<u8>, mod_revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        target_union: Some(compare::TargetUnion::ModRevision(mod_revision)),
        ..Default::default()
    }
}

pub(crate) fn put_op(put: PutRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(put)) }
}

pub(crate) fn delete_op(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

pub(crate) fn get_op(key: Vec<u8>) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key, ..Default::default() })) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("queue", "jobs").is_ok());
        assert!(validate_name("queue", "").is_err());
        assert!(validate_name("queue", "a/b").is_err());
        assert!(validate_name("queue", "a\0b").is_err());
        assert!(validate_name("queue", &"x".repeat(COORD_NAME_BYTES_MAX)).is_ok());
        let long = validate_name("queue", &"x".repeat(COORD_NAME_BYTES_MAX + 1));
        assert!(matches!(long, Err(CoordError::InvalidArgument(m)) if m.contains("too long")));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"ab/"), b"ab0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
