//! The watch workload and its checker.
//!
//! Watcher clients watch every key from revision 1 through a random node's watch
//! hub (the production `chorus_core::watch` code). Their streams are bounded and
//! drained slowly at times, so watchers fall behind and are caught up from
//! history; when a node crashes the stream dies with it and the client resumes on
//! another node from the revision after the last one it saw.
//!
//! The checker compares what each client received with the converged store's
//! history: every event after the start exactly once, in revision order, no gap,
//! the right `prev_kv`, and all events of one revision in one response.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use chorus_core::mvcc::{prefix_range_end, ChangeKind, MvccStore};
use chorus_core::watch::{SinkError, WatchSink};
use chorus_proto::etcdserverpb::{WatchCreateRequest, WatchResponse};
use chorus_proto::mvccpb::event::EventType;

/// The prefix every simulated key starts with.
pub const KEY_PREFIX: &[u8] = b"key";

/// A bounded stream buffer shared by a node's hub and the client draining it.
#[derive(Clone)]
pub struct SimSink {
    buffer: Rc<RefCell<VecDeque<WatchResponse>>>,
    capacity: usize,
}

impl SimSink {
    pub fn new(capacity: usize) -> SimSink {
        SimSink { buffer: Rc::default(), capacity }
    }

    /// Takes up to `count` responses, oldest first.
    pub fn drain(&self, count: usize) -> Vec<WatchResponse> {
        let mut buffer = self.buffer.borrow_mut();
        let count = count.min(buffer.len());
        buffer.drain(..count).collect()
    }
}

impl WatchSink for SimSink {
    fn try_send(&self, response: WatchResponse) -> Result<(), SinkError> {
        let mut buffer = self.buffer.borrow_mut();
        if buffer.len() >= self.capacity {
            return Err(SinkError::Full);
        }
        buffer.push_back(response);
        Ok(())
    }
}

/// One event as received: (revision, key, is_delete, value, prev value).
pub type Seen = (i64, Vec<u8>, bool, Vec<u8>, Option<Vec<u8>>);

/// A watcher client.
pub struct WatchClient {
    /// The node, its boot number and the stream id the current stream lives on.
    pub stream: Option<(usize, u64, u64)>,
    pub sink: SimSink,
    /// The first revision not yet received.
    pub next_revision: i64,
    pub seen: Vec<Seen>,
    /// Revisions whose events arrived split over two responses.
    pub split_revisions: Vec<i64>,
    pub problems: Vec<String>,
    pub resumes: u64,
}

impl Default for WatchClient {
    fn default() -> Self {
        WatchClient::new()
    }
}

impl WatchClient {
    pub fn new() -> WatchClient {
        WatchClient {
            stream: None,
            sink: SimSink::new(1),
            next_revision: 1,
            seen: Vec::new(),
            split_revisions: Vec::new(),
            problems: Vec::new(),
            resumes: 0,
        }
    }

    /// The create request that resumes this client where it stopped.
    pub fn create_request(&self) -> WatchCreateRequest {
        WatchCreateRequest {
            key: KEY_PREFIX.to_vec(),
            range_end: prefix_range_end(KEY_PREFIX),
            start_revision: self.next_revision,
            prev_kv: true,
            ..Default::default()
        }
    }

    /// Takes in responses drained from the stream. Returns false when the stream
    /// was cancelled (the client must resume elsewhere).
    pub fn receive(&mut self, responses: Vec<WatchResponse>) -> bool {
        for response in responses {
            if response.canceled {
                if response.compact_revision > 0 {
                    self.problems.push(format!("cancelled as compacted at {}", response.compact_revision));
                }
                return false;
            }
            let mut revisions_here = Vec::new();
            for event in &response.events {
                let kv = event.kv.clone().unwrap_or_default();
                if !revisions_here.contains(&kv.mod_revision) {
                    revisions_here.push(kv.mod_revision);
                }
                let is_delete = event.r#type == EventType::Delete as i32;
                let prev = event.prev_kv.as_ref().map(|p| p.value.clone());
                self.seen.push((kv.mod_revision, kv.key, is_delete, kv.value, prev));
                self.next_revision = kv.mod_revision + 1;
            }
            if let (Some(first), Some(before)) =
                (revisions_here.first(), self.seen.iter().rev().nth(response.events.len()))
            {
                if before.0 == *first {
                    self.split_revisions.push(*first);
                }
            }
        }
        true
    }
}

/// Checks every client's events against the converged store's full history.
pub fn check(clients: &[WatchClient], store: &MvccStore) -> Vec<String> {
    let mut violations = Vec::new();
    let (reference, _) = store
        .events(KEY_PREFIX, &prefix_range_end(KEY_PREFIX), 1, usize::MAX)
        .expect("the simulator never compacts");
    let expected: Vec<Seen> = reference
        .into_iter()
        .map(|c| {
            let is_delete = c.kind == ChangeKind::Delete;
            let value = if is_delete { Vec::new() } else { c.kv.value };
            (c.kv.mod_revision, c.kv.key, is_delete, value, c.prev_kv.map(|p| p.value))
        })
        .collect();
    let mut per_revision: BTreeMap<i64, usize> = BTreeMap::new();
    for event in &expected {
        *per_revision.entry(event.0).or_default() += 1;
    }
    for (index, client) in clients.iter().enumerate() {
        for problem in &client.problems {
            violations.push(format!("watcher {index}: {problem}"));
        }
        let prefix = &expected[..client.seen.len().min(expected.len())];
        if client.seen.len() > expected.len() || client.seen.as_slice() != prefix {
            let at = client.seen.iter().zip(prefix).position(|(a, b)| a != b).unwrap_or(prefix.len());
            violations.push(format!(
                "watcher {index}: event {at} differs from the history: got {:?}, expected {:?} ({} received, {} in history)",
                client.seen.get(at).map(describe),
                expected.get(at).map(describe),
                client.seen.len(),
                expected.len()
            ));
        }
        for revision in &client.split_revisions {
            violations
                .push(format!("watcher {index}: the events of revision {revision} came in two responses"));
        }
    }
    violations
}

fn describe(seen: &Seen) -> String {
    let kind = if seen.2 { "delete" } else { "put" };
    format!("rev {} {kind} {}", seen.0, String::from_utf8_lossy(&seen.1))
}
