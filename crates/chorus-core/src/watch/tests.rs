//! Watch hub tests with a bounded in-memory sink.

use std::cell::RefCell;
use std::rc::Rc;

use chorus_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};

use super::*;
use crate::mvcc::WriteSet;

#[derive(Clone)]
struct Sink {
    sent: Rc<RefCell<Vec<WatchResponse>>>,
    capacity: Rc<RefCell<usize>>,
}

impl Sink {
    fn new(capacity: usize) -> Sink {
        Sink { sent: Rc::default(), capacity: Rc::new(RefCell::new(capacity)) }
    }
    fn take(&self) -> Vec<WatchResponse> {
        std::mem::take(&mut self.sent.borrow_mut())
    }
}

impl WatchSink for Sink {
    fn try_send(&self, response: WatchResponse) -> Result<(), SinkError> {
        if self.sent.borrow().len() >= *self.capacity.borrow() {
            return Err(SinkError::Full);
        }
        self.sent.borrow_mut().push(response);
        Ok(())
    }
}

struct Fixture {
    mvcc: MvccStore,
    hub: WatchHub<Sink>,
    sink: Sink,
}

impl Fixture {
    fn new(capacity: usize) -> Fixture {
        let sink = Sink::new(capacity);
        let mut hub = WatchHub::default();
        hub.open_stream(1, sink.clone());
        Fixture { mvcc: MvccStore::new(), hub, sink }
    }
    fn header(&self) -> ResponseHeader {
        ResponseHeader { revision: self.mvcc.revision(), ..Default::default() }
    }
    fn put(&mut self, key: &str, value: &str) {
        let mut writes = WriteSet::default();
        let request = PutRequest { key: key.into(), value: value.into(), ..Default::default() };
        self.mvcc.put(&request, &mut writes).unwrap();
        let header = self.header();
        self.hub.notify(&writes.changes, header);
    }
    fn delete(&mut self, key: &str) {
        let mut writes = WriteSet::default();
        let request = DeleteRangeRequest { key: key.into(), ..Default::default() };
        self.mvcc.delete_range(&request, &mut writes).unwrap();
        let header = self.header();
        self.hub.notify(&writes.changes, header);
    }
    fn watch(&mut self, request: WatchCreateRequest) {
        let header = self.header();
        self.hub.create(1, &request, header);
    }
    fn sync(&mut self) {
        let header = self.header();
        self.hub.sync(&self.mvcc, header, 2);
    }
}

fn watch_prefix(prefix: &str, start_revision: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.into(),
        range_end: crate::mvcc::prefix_range_end(prefix.as_bytes()),
        start_revision,
        ..Default::default()
    }
}

/// (watch id, revision, key) of every event, in order.
fn events(responses: &[WatchResponse]) -> Vec<(i64, i64, String)> {
    responses
        .iter()
        .flat_map(|r| {
            r.events.iter().map(move |e| {
                let kv = e.kv.as_ref().unwrap();
                (r.watch_id, kv.mod_revision, String::from_utf8(kv.key.clone()).unwrap())
            })
        })
        .collect()
}

#[test]
fn created_comes_first_then_matching_events_in_order() {
    let mut f = Fixture::new(100);
    f.watch(watch_prefix("a/", 0));
    f.put("a/1", "x");
    f.put("b/1", "y");
    f.put("a/2", "z");
    let sent = f.sink.take();
    assert!(sent[0].created && sent[0].watch_id == 0);
    assert_eq!(events(&sent), vec![(0, 2, "a/1".into()), (0, 4, "a/2".into())]);
}

#[test]
fn a_past_start_revision_is_caught_up_from_history_then_live() {
    let mut f = Fixture::new(100);
    for i in 0..5 {
        f.put(&format!("k/{i}"), "v");
    }
    f.watch(watch_prefix("k/", 3));
    f.sync(); // two events per round
    f.sync();
    f.put("k/9", "v");
    let revisions: Vec<i64> = events(&f.sink.take()).into_iter().map(|e| e.1).collect();
    assert_eq!(revisions, vec![3, 4, 5, 6, 7], "each event once, in order, no gap");
}

#[test]
fn a_slow_stream_misses_nothing_and_gets_nothing_twice() {
    let mut f = Fixture::new(2);
    f.watch(watch_prefix("k/", 0));
    for i in 0..6 {
        f.put(&format!("k/{i}"), "v");
    }
    let mut seen = events(&f.sink.take());
    *f.sink.capacity.borrow_mut() = 100;
    for _ in 0..5 {
        f.sync();
    }
    f.put("k/last", "v");
    seen.extend(events(&f.sink.take()));
    let revisions: Vec<i64> = seen.into_iter().map(|e| e.1).collect();
    assert_eq!(revisions, vec![2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn a_watcher_behind_a_compaction_is_cancelled_with_the_compact_revision() {
    let mut f = Fixture::new(1);
    f.watch(watch_prefix("k/", 0));
    for i in 0..4 {
        f.put(&format!("k/{i}"), "v");
    }
    f.sink.take();
    let mut writes = WriteSet::default();
    f.mvcc.compact(&CompactionRequest { revision: 4, physical: false }, &mut writes).unwrap();
    *f.sink.capacity.borrow_mut() = 100;
    f.sync();
    let sent = f.sink.take();
    let cancel = sent.iter().find(|r| r.canceled).expect("a cancel response");
    assert_eq!(cancel.compact_revision, 4);
    assert_eq!(f.hub.watchers_count(), 0);
}

#[test]
fn filters_and_prev_kv() {
    let mut f = Fixture::new(100);
    let mut request = watch_prefix("k", 0);
    request.key = b"k".to_vec();
    request.range_end = Vec::new();
    request.prev_kv = true;
    request.filters = vec![FilterType::Noput as i32];
    f.watch(request);
    f.put("k", "one");
    f.put("k", "two");
    f.delete("k");
    let sent = f.sink.take();
    let all: Vec<&Event> = sent.iter().flat_map(|r| &r.events).collect();
    assert_eq!(all.len(), 1, "puts filtered out");
    assert_eq!(all[0].r#type, EventType::Delete as i32);
    assert_eq!(all[0].prev_kv.as_ref().unwrap().value, b"two");
}

#[test]
fn cancel_and_duplicate_ids() {
    let mut f = Fixture::new(100);
    let mut request = watch_prefix("k/", 0);
    request.watch_id = 7;
    f.watch(request.clone());
    f.watch(request);
    let header = f.header();
    f.hub.cancel(1, 7, header);
    f.put("k/1", "v");
    let sent = f.sink.take();
    assert!(sent[0].created && !sent[0].canceled && sent[0].watch_id == 7);
    assert!(sent[1].created && sent[1].canceled, "a duplicate id is refused");
    assert!(sent[2].canceled && sent[2].watch_id == 7);
    assert!(events(&sent).is_empty(), "no events after cancel");
}

#[test]
fn large_responses_are_fragmented_when_asked() {
    let mut f = Fixture::new(100);
    let mut request = watch_prefix("k/", 0);
    request.fragment = true;
    f.watch(request);
    let big = "x".repeat(WATCH_RESPONSE_BYTES_MAX / 2);
    let mut writes = WriteSet::default();
    let txn_puts: Vec<_> = (0..3)
        .map(|i| chorus_proto::etcdserverpb::RequestOp {
            request: Some(chorus_proto::etcdserverpb::request_op::Request::RequestPut(PutRequest {
                key: format!("k/{i}").into(),
                value: big.clone().into(),
                ..Default::default()
            })),
        })
        .collect();
    let txn = chorus_proto::etcdserverpb::TxnRequest { success: txn_puts, ..Default::default() };
    f.mvcc.txn(&txn, &mut writes).unwrap();
    let header = f.header();
    f.hub.notify(&writes.changes, header);
    let sent: Vec<WatchResponse> = f.sink.take().into_iter().filter(|r| !r.events.is_empty()).collect();
    assert!(sent.len() >= 2, "split into fragments");
    assert!(sent[..sent.len() - 1].iter().all(|r| r.fragment));
    assert!(!sent.last().unwrap().fragment);
    assert_eq!(events(&sent).len(), 3);
}

#[test]
fn a_watcher_starting_ahead_of_a_lagging_member_gets_nothing_older() {
    let mut f = Fixture::new(100);
    // The client has seen up to revision 4 elsewhere; this member is still at 1.
    f.watch(watch_prefix("k/", 5));
    f.sync();
    for i in 0..5 {
        f.put(&format!("k/{i}"), "v"); // revisions 2..=6 as the member catches up
        f.sync();
    }
    let revisions: Vec<i64> = events(&f.sink.take()).into_iter().map(|e| e.1).collect();
    assert_eq!(revisions, vec![5, 6], "nothing below the start revision, nothing twice");
}
