//! The watch hub: every watcher of one member, fed from that member's applied
//! changes, with etcd's `Watch` semantics.
//!
//! A watcher is either **synced** (it has seen every revision up to the store's
//! current one, and gets new events as they are applied) or **unsynced** (it is
//! behind: it started at an old revision, or its stream was too slow to take the
//! last events). Unsynced watchers are caught up from the MVCC history, a bounded
//! number of events per [`WatchHub::sync`] call, until they are synced again; one
//! whose next revision has been compacted away is cancelled with the compact
//! revision, as etcd does. So a slow watcher never blocks the member or other
//! watchers, and is never silently dropped: every event after its start revision
//! is delivered exactly once, in revision order, all events of one revision in
//! one response (or one fragmented sequence of responses, if asked).
//!
//! Control responses (created, cancelled, progress) wait in a small per-stream
//! outbox and always leave before any later event, so a client sees `created`
//! before the watcher's first event.
//!
//! No IO: responses go to a [`WatchSink`] the driver supplies (a bounded channel
//! in the server, a queue in the simulator).

use std::collections::{BTreeMap, VecDeque};

use chorus_proto::etcdserverpb::watch_create_request::FilterType;
use chorus_proto::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchResponse};
use chorus_proto::mvccpb::{event::EventType, Event};
use prost::Message as _;

use crate::limits::{WATCHERS_PER_STREAM_MAX, WATCH_OUTBOX_RESPONSES_MAX, WATCH_RESPONSE_BYTES_MAX};
use crate::mvcc::{Change, ChangeKind, MvccStore};

/// Why a response could not be handed to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkError {
    /// The stream's buffer is full: try again later.
    Full,
    /// The stream is gone.
    Closed,
}

/// Where one watch stream's responses go.
pub trait WatchSink {
    fn try_send(&self, response: WatchResponse) -> Result<(), SinkError>;
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The first revision this watcher has not been given yet.
    next_revision: i64,
    synced: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// Ticks since this watcher was last sent anything (for progress notifications).
    idle_ticks: u64,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match self.range_end.as_slice() {
            [] => key == self.key.as_slice(),
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        }
    }

    fn event(&self, change: &Change) -> Option<Event> {
        let filtered = match change.kind {
            ChangeKind::Put => self.no_put,
            ChangeKind::Delete => self.no_delete,
        };
        if filtered || !self.matches(&change.kv.key) {
            return None;
        }
        let r#type = match change.kind {
            ChangeKind::Put => EventType::Put,
            ChangeKind::Delete => EventType::Delete,
        };
        Some(Event {
            r#type: r#type as i32,
            kv: Some(change.kv.clone()),
            prev_kv: if self.prev_kv { change.prev_kv.clone() } else { None },
        })
    }
}

struct Stream<S> {
    sink: S,
    outbox: VecDeque<WatchResponse>,
    next_watch_id: i64,
    /// Set when the outbox overflowed or the sink closed: the stream is dropped.
    broken: bool,
}

/// All watch streams and watchers of one member.
pub struct WatchHub<S> {
    streams: BTreeMap<u64, Stream<S>>,
    watchers: BTreeMap<(u64, i64), Watcher>,
}

impl<S> Default for WatchHub<S> {
    fn default() -> Self {
        WatchHub { streams: BTreeMap::new(), watchers: BTreeMap::new() }
    }
}

impl<S: WatchSink> WatchHub<S> {
    pub fn open_stream(&mut self, stream: u64, sink: S) {
        self.streams
            .insert(stream, Stream { sink, outbox: VecDeque::new(), next_watch_id: 0, broken: false });
    }

    pub fn close_stream(&mut self, stream: u64) {
        self.streams.remove(&stream);
        self.watchers.retain(|(s, _), _| *s != stream);
    }

    pub fn watchers_count(&self) -> usize {
        self.watchers.len()
    }

    /// Creates a watcher, answering `created` (or `created` and `canceled` with a
    /// reason, for a request that cannot be served).
    pub fn create(&mut self, stream_id: u64, request: &WatchCreateRequest, header: ResponseHeader) {
        let Some(stream) = self.streams.get_mut(&stream_id) else { return };
        let count = self.watchers.range((stream_id, i64::MIN)..=(stream_id, i64::MAX)).count();
        let requested_id = request.watch_id;
        let refusal = if count >= WATCHERS_PER_STREAM_MAX {
            Some(format!("etcdserver: too many watchers on one stream (at most {WATCHERS_PER_STREAM_MAX})"))
        } else if requested_id < 0 {
            Some("etcdserver: watch id must not be negative".to_string())
        } else if requested_id != 0 && self.watchers.contains_key(&(stream_id, requested_id)) {
            Some("mvcc: duplicate watch ID provided on the WatchStream".to_string())
        } else if request.key.is_empty() {
            Some("etcdserver: key is not provided".to_string())
        } else {
            None
        };
        if let Some(reason) = refusal {
            let watch_id = if requested_id > 0 { requested_id } else { -1 };
            let response = control(header, watch_id, |r| {
                r.created = true;
                r.canceled = true;
                r.cancel_reason = reason;
            });
            push_control(stream, response);
            return;
        }
        let watch_id = if requested_id != 0 {
            requested_id
        } else {
            while self.watchers.contains_key(&(stream_id, stream.next_watch_id)) {
                stream.next_watch_id += 1;
            }
            stream.next_watch_id
        };
        let current = header.revision;
        let next_revision = if request.start_revision > 0 { request.start_revision } else { current + 1 };
        let filters = &request.filters;
        let watcher = Watcher {
            key: request.key.clone(),
            range_end: request.range_end.clone(),
            next_revision,
            synced: next_revision > current,
            prev_kv: request.prev_kv,
            no_put: filters.contains(&(FilterType::Noput as i32)),
            no_delete: filters.contains(&(FilterType::Nodelete as i32)),
            fragment: request.fragment,
            progress_notify: request.progress_notify,
            idle_ticks: 0,
        };
        self.watchers.insert((stream_id, watch_id), watcher);
        push_control(stream, control(header, watch_id, |r| r.created = true));
    }

    /// Cancels a watcher at the client's request.
    pub fn cancel(&mut self, stream_id: u64, watch_id: i64, header: ResponseHeader) {
        let Some(stream) = self.streams.get_mut(&stream_id) else { return };
        if self.watchers.remove(&(stream_id, watch_id)).is_some() {
            push_control(stream, control(header, watch_id, |r| r.canceled = true));
        }
    }

    /// Answers a progress request: every synced watcher of the stream learns that
    /// it has seen everything up to the header's revision. An unsynced watcher is
    /// skipped (telling it would claim events it has not been given).
    pub fn progress(&mut self, stream_id: u64, header: ResponseHeader) {
        let Some(stream) = self.streams.get_mut(&stream_id) else { return };
        for ((_, watch_id), watcher) in self.watchers.range((stream_id, i64::MIN)..=(stream_id, i64::MAX)) {
            if watcher.synced {
                push_control(stream, control(header, *watch_id, |_| {}));
            }
        }
    }

    /// The state jumped (a snapshot from the leader replaced it): every watcher
    /// catches up from the store's history at the next [`WatchHub::sync`].
    pub fn resync_all(&mut self) {
        for watcher in self.watchers.values_mut() {
            watcher.synced = false;
        }
    }

    /// Hands newly applied changes (in revision order, up to the header's
    /// revision) to every synced watcher they concern.
    pub fn notify(&mut self, changes: &[Change], header: ResponseHeader) {
        self.flush_outboxes();
        for ((stream_id, watch_id), watcher) in self.watchers.iter_mut() {
            if !watcher.synced {
                continue;
            }
            let Some(stream) = self.streams.get_mut(stream_id) else { continue };
            let events: Vec<Event> = changes
                .iter()
                .filter(|c| c.kv.mod_revision >= watcher.next_revision)
                .filter_map(|c| watcher.event(c))
                .collect();
            if !events.is_empty() && !stream.outbox.is_empty() {
                // Control responses wait ahead of these events: catch up later.
                watcher.synced = false;
                continue;
            }
            match send_events(stream, *watch_id, watcher.fragment, events, header) {
                // Never lower it: a watcher may start ahead of this member's state
                // (a client resuming on a member that lags behind).
                Ok(()) => watcher.next_revision = watcher.next_revision.max(header.revision + 1),
                Err(SinkError::Full) => watcher.synced = false,
                Err(SinkError::Closed) => stream.broken = true,
            }
            watcher.idle_ticks = 0;
        }
        self.drop_broken_streams();
    }

    /// Catches unsynced watchers up from the store's history, at most about
    /// `events_max` events each; cancels those whose revision was compacted.
    pub fn sync(&mut self, mvcc: &MvccStore, header: ResponseHeader, events_max: usize) {
        self.flush_outboxes();
        let current = mvcc.revision();
        let mut compacted = Vec::new();
        for ((stream_id, watch_id), watcher) in self.watchers.iter_mut() {
            if watcher.synced {
                continue;
            }
            let Some(stream) = self.streams.get_mut(stream_id) else { continue };
            if !stream.outbox.is_empty() {
                continue;
            }
            let (changes, next_revision) =
                match mvcc.events(&watcher.key, &watcher.range_end, watcher.next_revision, events_max) {
                    Ok(found) => found,
                    Err(_) => {
                        compacted.push((*stream_id, *watch_id));
                        continue;
                    }
                };
            let events: Vec<Event> = changes.iter().filter_map(|c| watcher.event(c)).collect();
            match send_events(stream, *watch_id, watcher.fragment, events, header) {
                Ok(()) => {
                    watcher.next_revision = watcher.next_revision.max(next_revision);
                    watcher.synced = watcher.next_revision > current;
                    watcher.idle_ticks = 0;
                }
                Err(SinkError::Full) => {}
                Err(SinkError::Closed) => stream.broken = true,
            }
        }
        for (stream_id, watch_id) in compacted {
            self.watchers.remove(&(stream_id, watch_id));
            if let Some(stream) = self.streams.get_mut(&stream_id) {
                let compact_revision = mvcc.compact_revision();
                let response = control(header, watch_id, |r| {
                    r.canceled = true;
                    r.compact_revision = compact_revision;
                    r.cancel_reason = "mvcc: required revision has been compacted".to_string();
                });
                push_control(stream, response);
            }
        }
        self.drop_broken_streams();
    }

    /// Counts a tick; watchers that asked for progress notifications and have been
    /// idle for `interval_ticks` get one (synced watchers only).
    pub fn tick(&mut self, header: ResponseHeader, interval_ticks: u64) {
        for ((stream_id, watch_id), watcher) in self.watchers.iter_mut() {
            watcher.idle_ticks += 1;
            if !watcher.progress_notify || !watcher.synced || watcher.idle_ticks < interval_ticks {
                continue;
            }
            watcher.idle_ticks = 0;
            if let Some(stream) = self.streams.get_mut(stream_id) {
                push_control(stream, control(header, *watch_id, |_| {}));
            }
        }
        self.flush_outboxes();
        self.drop_broken_streams();
    }

    fn flush_outboxes(&mut self) {
        for stream in self.streams.values_mut() {
            flush_outbox(stream);
        }
    }

    fn drop_broken_streams(&mut self) {
        let broken: Vec<u64> = self.streams.iter().filter(|(_, s)| s.broken).map(|(id, _)| *id).collect();
        for stream in broken {
            self.close_stream(stream);
        }
    }
}

fn control(header: ResponseHeader, watch_id: i64, fill: impl FnOnce(&mut WatchResponse)) -> WatchResponse {
    let mut response = WatchResponse { header: Some(header), watch_id, ..Default::default() };
    fill(&mut response);
    response
}

/// Queues a control response; a stream whose outbox overflows is hopelessly slow
/// and is dropped (its client reconnects and resumes from its last revision).
fn push_control<S: WatchSink>(stream: &mut Stream<S>, response: WatchResponse) {
    if stream.outbox.len() >= WATCH_OUTBOX_RESPONSES_MAX {
        stream.broken = true;
        return;
    }
    stream.outbox.push_back(response);
    flush_outbox(stream);
}

/// Sends queued control responses in order until the sink is full or closed.
fn flush_outbox<S: WatchSink>(stream: &mut Stream<S>) {
    while let Some(response) = stream.outbox.pop_front() {
        match stream.sink.try_send(response.clone()) {
            Ok(()) => {}
            Err(SinkError::Full) => {
                stream.outbox.push_front(response);
                return;
            }
            Err(SinkError::Closed) => {
                stream.broken = true;
                return;
            }
        }
    }
}

/// Sends a watcher's events as one response, or as fragments when it asked for
/// them and the response would be too large. Nothing to send is success.
fn send_events<S: WatchSink>(
    stream: &mut Stream<S>,
    watch_id: i64,
    fragment: bool,
    events: Vec<Event>,
    header: ResponseHeader,
) -> Result<(), SinkError> {
    if events.is_empty() {
        return Ok(());
    }
    let response = WatchResponse { header: Some(header), watch_id, events, ..Default::default() };
    if !fragment || response.encoded_len() <= WATCH_RESPONSE_BYTES_MAX {
        return stream.sink.try_send(response);
    }
    // Fragments must all go or none: a partial sequence cannot be resumed.
    let mut fragments = Vec::new();
    let mut current = WatchResponse { header: Some(header), watch_id, fragment: true, ..Default::default() };
    for event in response.events {
        if !current.events.is_empty()
            && current.encoded_len() + event.encoded_len() > WATCH_RESPONSE_BYTES_MAX
        {
            fragments.push(std::mem::replace(
                &mut current,
                WatchResponse { header: Some(header), watch_id, fragment: true, ..Default::default() },
            ));
        }
        current.events.push(event);
    }
    current.fragment = false;
    fragments.push(current);
    // The sink is bounded; send the whole sequence only if the first fits, and treat
    // a later Full as fatal for the stream rather than leave it half-sent.
    let mut first = true;
    for part in fragments {
        match stream.sink.try_send(part) {
            Ok(()) => first = false,
            Err(SinkError::Full) if first => return Err(SinkError::Full),
            Err(_) => return Err(SinkError::Closed),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
