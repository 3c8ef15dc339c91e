//! The MVCC key space, with etcd's semantics (`server/storage/mvcc/` and
//! `server/etcdserver/txn/` in etcd): every change gets a revision, old revisions
//! stay readable until they are compacted, and a txn is applied all or nothing.
//!
//! # How it is driven
//!
//! [`MvccStore`] is the deterministic state machine for KV commands. The node applies
//! each committed command by calling [`MvccStore::put`], [`MvccStore::delete_range`],
//! [`MvccStore::txn`] or [`MvccStore::compact`] with a [`WriteSet`]; the store changes
//! its in-memory state and appends to the write set what the caller must persist,
//! in the same storage transaction as the raft applied index. At start-up,
//! [`MvccStore::restore`] rebuilds the same state from the persisted records. The
//! store does no IO: it only remembers, and tells.
//!
//! # Revisions
//!
//! A revision is `(main, sub)`. The store's revision starts at 1 (as in etcd: the
//! first write gets main revision 2). Each write request that changes something
//! (a put, a delete that deletes a key, a txn whose chosen branch does either) takes
//! the next main revision; each change within it takes the next sub revision, from
//! 0. A request that changes nothing (a read-only txn, a delete that matches
//! nothing) leaves the revision as it was.
//!
//! # On-disk format (owned by this module)
//!
//! One record per change, key [`RevKey`]: `main` as 8 bytes big-endian, `sub` as 8
//! bytes big-endian, then a flag byte, 0 for a put and 1 for a deletion
//! (tombstone). Byte order is revision order. The value is the prost-encoded
//! `mvccpb.KeyValue` the change produced; a tombstone holds only the key and
//! `mod_revision` (the deleting main revision). The compact revision is stored
//! beside the records by the caller. Compaction removes records, never rewrites
//! them.

use std::collections::BTreeMap;
use std::ops::Bound;

use chorus_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use chorus_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use chorus_proto::etcdserverpb::request_op::Request;
use chorus_proto::etcdserverpb::response_op::Response;
use chorus_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use chorus_proto::mvccpb::KeyValue;
use prost::Message;

use crate::error::KvError;
use crate::validate::{check_put_flags, EMPTY_OP_MESSAGE};

/// The key of one persisted record: see the module documentation.
pub type RevKey = [u8; 17];

/// The flag byte of a [`RevKey`] for a put.
const REV_KEY_FLAG_PUT: u8 = 0;
/// The flag byte of a [`RevKey`] for a deletion.
const REV_KEY_FLAG_TOMBSTONE: u8 = 1;

/// etcd's message when `ignore_value` or `ignore_lease` is set on a missing key.
const KEY_NOT_FOUND_MESSAGE: &str = "key not found";

/// The revision of one change: the write request's `main` revision, and the
/// change's place within that request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    /// The record key of the change at this revision.
    pub fn to_rev_key(self, tombstone: bool) -> RevKey {
        let mut rev_key = [0u8; 17];
        rev_key[..8].copy_from_slice(&self.main.to_be_bytes());
        rev_key[8..16].copy_from_slice(&self.sub.to_be_bytes());
        rev_key[16] = if tombstone { REV_KEY_FLAG_TOMBSTONE } else { REV_KEY_FLAG_PUT };
        rev_key
    }

    /// The revision and the tombstone flag of a record key.
    pub fn from_rev_key(rev_key: &RevKey) -> Result<(Revision, bool), KvError> {
        let mut main = [0u8; 8];
        let mut sub = [0u8; 8];
        main.copy_from_slice(&rev_key[..8]);
        sub.copy_from_slice(&rev_key[8..16]);
        let tombstone = match rev_key[16] {
            REV_KEY_FLAG_PUT => false,
            REV_KEY_FLAG_TOMBSTONE => true,
            flag => return Err(corrupt(format!("record key has flag byte {flag}"))),
        };
        let revision = Revision { main: i64::from_be_bytes(main), sub: i64::from_be_bytes(sub) };
        Ok((revision, tombstone))
    }
}

/// The end of the range of every key that starts with `prefix`, as etcdctl's
/// `--prefix` computes it: the prefix with its last byte below 0xff incremented
/// (and what follows dropped); `[0]` (every key from `prefix` on) when the prefix is
/// all 0xff bytes.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|byte| *byte < 0xff) {
        Some(index) => {
            let mut end = prefix[..=index].to_vec();
            end[index] += 1;
            end
        }
        None => vec![0],
    }
}

/// What a caller must persist after applying commands, in the same storage
/// transaction as the applied index; and the events the watch hub must deliver.
/// Methods append to it, so one write set may collect several commands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteSet {
    /// Records to insert, in revision order.
    pub puts: Vec<(RevKey, Vec<u8>)>,
    /// Records to delete (dropped by compaction).
    pub removes: Vec<RevKey>,
    /// The new compact revision, when a compaction was applied.
    pub compact_revision: Option<i64>,
    /// Every put and deletion, in revision order.
    pub changes: Vec<Change>,
}

impl WriteSet {
    /// Whether there is nothing to persist and nothing to deliver.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty()
            && self.removes.is_empty()
            && self.compact_revision.is_none()
            && self.changes.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Delete,
}

/// One event for watchers. For a deletion, `kv` holds the key and the deleting
/// revision as `mod_revision` (as etcd's watch events do).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub kv: KeyValue,
    /// The key's live value before this change, if it had one.
    pub prev_kv: Option<KeyValue>,
}

/// One revision of one key, without the key (the map holds it once).
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    revision: Revision,
    tombstone: bool,
    create_revision: i64,
    version: i64,
    value: Vec<u8>,
    lease: i64,
}

impl Entry {
    fn tombstone(revision: Revision) -> Entry {
        Entry { revision, tombstone: true, create_revision: 0, version: 0, value: Vec::new(), lease: 0 }
    }

    /// The entry a persisted record describes. Inverse of `to_key_value`.
    fn from_record(revision: Revision, tombstone: bool, kv: KeyValue) -> Entry {
        Entry {
            revision,
            tombstone,
            create_revision: kv.create_revision,
            version: kv.version,
            value: kv.value,
            lease: kv.lease,
        }
    }

    fn to_key_value(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.revision.main,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }

    /// `to_key_value(key).encode_to_vec()`, written straight from the entry: the
    /// persisted record of every write, made without copying the key and value
    /// into a `KeyValue` first.
    fn encode_record(&self, key: &[u8]) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, int64, WireType};
        let ints = [(2, self.create_revision), (3, self.revision.main), (4, self.version)];
        let bytes_len = |tag: u32, len: usize| {
            if len == 0 {
                0
            } else {
                prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
            }
        };
        let int_len = |tag: u32, value: i64| if value == 0 { 0 } else { int64::encoded_len(tag, &value) };
        let len = bytes_len(1, key.len())
            + ints.iter().map(|&(tag, value)| int_len(tag, value)).sum::<usize>()
            + bytes_len(5, self.value.len())
            + int_len(6, self.lease);
        let mut buf = Vec::with_capacity(len);
        let put_bytes = |tag: u32, bytes: &[u8], buf: &mut Vec<u8>| {
            if !bytes.is_empty() {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(bytes.len() as u64, buf);
                buf.extend_from_slice(bytes);
            }
        };
        let put_int = |tag: u32, value: i64, buf: &mut Vec<u8>| {
            if value != 0 {
                int64::encode(tag, &value, buf);
            }
        };
        put_bytes(1, key, &mut buf);
        for (tag, value) in ints {
            put_int(tag, value, &mut buf);
        }
        put_bytes(5, &self.value, &mut buf);
        put_int(6, self.lease, &mut buf);
        debug_assert_eq!(buf.len(), len);
        buf
    }

    fn rev_key(&self) -> RevKey {
        self.revision.to_rev_key(self.tombstone)
    }
}

/// Every revision of one key still held, oldest first. A key's generation ends
/// with a tombstone; a later put starts a new one.
#[derive(Clone, Debug, Default, PartialEq)]
struct KeyHistory {
    entries: Vec<Entry>,
}

impl KeyHistory {
    /// The key's live entry at main revision `revision`: its last change at or
    /// before it, unless that change deleted it.
    fn live_at(&self, revision: i64) -> Option<&Entry> {
        let count = self.entries.partition_point(|e| e.revision.main <= revision);
        let entry = self.entries[..count].last()?;
        (!entry.tombstone).then_some(entry)
    }

    /// The key's live entry now (including changes of a write in progress).
    fn live(&self) -> Option<&Entry> {
        self.entries.last().filter(|entry| !entry.tombstone)
    }

    fn push(&mut self, entry: Entry) {
        assert!(
            self.entries.last().is_none_or(|last| last.revision < entry.revision),
            "mvcc: revision {:?} does not follow {:?}",
            entry.revision,
            self.entries.last().map(|last| last.revision),
        );
        // Most keys hold one revision: room for exactly one first (a Vec's first
        // push would make room for four, 216 bytes per key wasted).
        if self.entries.capacity() == 0 {
            self.entries.reserve_exact(1);
        }
        self.entries.push(entry);
    }

    /// Drops every entry older than the key's last change at or before `revision`,
    /// and that change too if it is a deletion: nothing can read them any more.
    fn compact(&mut self, revision: i64, removes: &mut Vec<RevKey>) {
        let count = self.entries.partition_point(|e| e.revision.main <= revision);
        let Some(last) = self.entries[..count].last() else {
            return;
        };
        let drop_count = if last.tombstone { count } else { count - 1 };
        removes.extend(self.entries.drain(..drop_count).map(|e| e.rev_key()));
    }
}

/// The keys a request names, decoded from etcd's `key` / `range_end` convention.
#[derive(Clone, Copy, Debug)]
enum KeyRange<'a> {
    /// `range_end` empty: just `key`.
    Single(&'a [u8]),
    /// `range_end` = `[0]`: every key from `key` on (`key` = `[0]` too: every key).
    From(&'a [u8]),
    /// `[key, range_end)`; empty when `range_end <= key`.
    Between(&'a [u8], &'a [u8]),
}

impl<'a> KeyRange<'a> {
    fn new(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::From(key),
            _ => KeyRange::Between(key, range_end),
        }
    }

    fn bounds(self) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        match self {
            KeyRange::Single(key) => (Bound::Included(key), Bound::Included(key)),
            KeyRange::From(key) => (Bound::Included(key), Bound::Unbounded),
            // BTreeMap::range panics when start > end: an inverted range is empty.
            KeyRange::Between(key, end) if end <= key => (Bound::Included(key), Bound::Excluded(key)),
            KeyRange::Between(key, end) => (Bound::Included(key), Bound::Excluded(end)),
        }
    }
}

/// A key's live entry found by a read.
#[derive(Clone, Copy, Debug)]
struct Found<'a> {
    key: &'a [u8],
    entry: &'a Entry,
}

impl Found<'_> {
    fn to_key_value(self, keys_only: bool) -> KeyValue {
        let mut kv = self.entry.to_key_value(self.key);
        if keys_only {
            kv.value = Vec::new();
        }
        kv
    }
}

/// One write request in progress. Every change it makes shares `main`; what it
/// touched is remembered so that an error can undo it (a txn is all or nothing).
#[derive(Debug)]
struct Batch {
    main: i64,
    /// The sub revision of the next change; also the number of changes so far.
    sub: i64,
    touched_keys: Vec<Vec<u8>>,
    write_set_puts_len: usize,
    write_set_changes_len: usize,
}

impl Batch {
    fn next_revision(&mut self) -> Revision {
        let revision = Revision { main: self.main, sub: self.sub };
        self.sub += 1;
        revision
    }

    /// The store's revision before this request.
    fn begin_revision(&self) -> i64 {
        self.main - 1
    }

    /// The revision reads see now: this request's once it has changed something.
    fn current_revision(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.begin_revision()
        }
    }
}

/// The MVCC key space: for every key, its revisions still held, in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct MvccStore {
    /// Ordered, so that ranges, compaction and hashing visit keys deterministically.
    keys: BTreeMap<Vec<u8>, KeyHistory>,
    revision: i64,
    compact_revision: i64,
}

impl Default for MvccStore {
    fn default() -> Self {
        MvccStore::new()
    }
}

impl MvccStore {
    /// An empty store at revision 1.
    pub fn new() -> MvccStore {
        MvccStore { keys: BTreeMap::new(), revision: 1, compact_revision: 0 }
    }

    /// Rebuilds the store from its persisted records, which must come in [`RevKey`]
    /// order, and its compact revision. An error means the records are corrupt.
    pub fn restore(
        records: impl IntoIterator<Item = (RevKey, Vec<u8>)>,
        compact_revision: i64,
    ) -> Result<MvccStore, KvError> {
        if compact_revision < 0 {
            return Err(corrupt(format!("compact revision {compact_revision}")));
        }
        let mut store = MvccStore::new();
        store.compact_revision = compact_revision;
        store.revision = compact_revision.max(1);
        let mut previous: Option<Revision> = None;
        for (rev_key, bytes) in records {
            let (revision, tombstone) = Revision::from_rev_key(&rev_key)?;
            if previous.is_some_and(|previous| revision <= previous) {
                return Err(corrupt(format!("record {revision:?} is out of order")));
            }
            previous = Some(revision);
            let mut kv = KeyValue::decode(bytes.as_slice())
                .map_err(|e| corrupt(format!("record {revision:?} does not decode: {e}")))?;
            let revision_valid = revision.main > 1 && revision.sub >= 0;
            if !revision_valid || kv.key.is_empty() || kv.mod_revision != revision.main {
                return Err(corrupt(format!("record {revision:?} is inconsistent")));
            }
            let key = std::mem::take(&mut kv.key);
            let entry = Entry::from_record(revision, tombstone, kv);
            store.keys.entry(key).or_default().push(entry);
            store.revision = store.revision.max(revision.main);
        }
        Ok(store)
    }

    /// The revision of the last change.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Revisions below this one can no longer be read.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// The number of keys that exist now (deleted keys excluded). Walks every key:
    /// meant for status and metrics, not for a hot path.
    pub fn key_count(&self) -> u64 {
        self.keys.values().filter(|h| h.live().is_some()).count() as u64
    }

    /// A checksum of the whole state: a CRC-32 over every record held, in
    /// [`RevKey`] order (each as its key, its value's length as 4 bytes big-endian,
    /// and its value), then the revision and the compact revision (8 bytes
    /// big-endian each). Equal on every member that applied the same log, and
    /// computable from the persisted records alone.
    pub fn state_hash(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        for (rev_key, value) in self.records() {
            hasher.update(&rev_key);
            hasher.update(&(value.len() as u32).to_be_bytes());
            hasher.update(&value);
        }
        hasher.update(&self.revision.to_be_bytes());
        hasher.update(&self.compact_revision.to_be_bytes());
        hasher.finalize()
    }

    /// etcd's `HashKV`: a CRC-32 over every record held whose revision is at or
    /// below `revision` (0: the current one), each as its revision key, its
    /// value's length as 4 bytes big-endian and its value, in [`RevKey`] order.
    /// Members that applied the same log agree on it at any revision both hold.
    /// Returns the hash and the revision it covers.
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64), KvError> {
        let at = if revision <= 0 { self.revision } else { revision };
        if at > self.revision {
            return Err(KvError::FutureRevision { current_revision: self.revision });
        }
        if at < self.compact_revision {
            return Err(KvError::Compacted { compact_revision: self.compact_revision });
        }
        let mut hasher = crc32fast::Hasher::new();
        for (rev_key, value) in self.records() {
            let main = i64::from_be_bytes(rev_key[..8].try_into().expect("8 bytes"));
            if main > at {
                break;
            }
            hasher.update(&rev_key);
            hasher.update(&(value.len() as u32).to_be_bytes());
            hasher.update(&value);
        }
        Ok((hasher.finalize(), at))
    }

    /// Every record held, in [`RevKey`] order, as storage persists them (the input
    /// [`MvccStore::restore`] takes back).
    pub fn records(&self) -> Vec<(RevKey, Vec<u8>)> {
        let mut records: Vec<(RevKey, &[u8], &Entry)> = self
            .keys
            .iter()
            .flat_map(|(key, history)| {
                let key = key.as_slice();
                history.entries.iter().map(move |e| (e.rev_key(), key, e))
            })
            .collect();
        records.sort_unstable_by_key(|record| record.0);
        records.into_iter().map(|(rev_key, key, entry)| (rev_key, entry.encode_record(key))).collect()
    }

    /// Reads keys at the current revision or an older one. Changes nothing.
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, KvError> {
        self.range_at(request, self.revision, self.revision)
    }

    /// The live key under `prefix` created first (lowest create revision): the
    /// holder of a lock or the leader of an election named by that prefix.
    pub fn first_created_under(&self, prefix: &[u8]) -> Option<KeyValue> {
        let range_end = prefix_range_end(prefix);
        let range = KeyRange::new(prefix, &range_end);
        self.live_in(range, self.revision)
            .into_iter()
            .min_by_key(|found| found.entry.create_revision)
            .map(|found| found.entry.to_key_value(found.key))
    }

    /// Puts one key.
    pub fn put(&mut self, request: &PutRequest, write_set: &mut WriteSet) -> Result<PutResponse, KvError> {
        self.write(write_set, |store, batch, write_set| store.put_in(request, batch, write_set))
    }

    /// Deletes one key, a range, or every key from a key on.
    pub fn delete_range(
        &mut self,
        request: &DeleteRangeRequest,
        write_set: &mut WriteSet,
    ) -> Result<DeleteRangeResponse, KvError> {
        self.write(write_set, |store, batch, write_set| Ok(store.delete_in(request, batch, write_set)))
    }

    /// Applies a txn, all or nothing: on an error, the store and `write_set` are as
    /// they were.
    ///
    /// As in etcd, every compare, the nested txns' included, is evaluated against
    /// the state before the txn, before any operation runs; the operations then run
    /// in order, each reading the writes of those before it.
    pub fn txn(&mut self, request: &TxnRequest, write_set: &mut WriteSet) -> Result<TxnResponse, KvError> {
        let mut path = Vec::new();
        self.compare_path(request, &mut path)?;
        self.write(write_set, |store, batch, write_set| {
            store.txn_in(request, &path, &mut 0, batch, write_set)
        })
    }

    /// Forgets every revision that no read at or after `request.revision` needs.
    /// Compaction is synchronous here, so `physical` changes nothing.
    pub fn compact(
        &mut self,
        request: &CompactionRequest,
        write_set: &mut WriteSet,
    ) -> Result<CompactionResponse, KvError> {
        let revision = request.revision;
        if revision < 0 {
            return Err(KvError::InvalidArgument(format!("revision must not be negative (got {revision})")));
        }
        if revision <= self.compact_revision {
            return Err(self.compacted());
        }
        if revision > self.revision {
            return Err(KvError::FutureRevision { current_revision: self.revision });
        }
        let removes = &mut write_set.removes;
        self.keys.retain(|_, history| {
            history.compact(revision, removes);
            !history.entries.is_empty()
        });
        self.compact_revision = revision;
        write_set.compact_revision = Some(revision);
        Ok(CompactionResponse { header: header(self.revision) })
    }

    fn compacted(&self) -> KvError {
        KvError::Compacted { compact_revision: self.compact_revision }
    }

    /// Runs one write request as a batch: commits its revision if it changed
    /// something, or undoes everything it did if it failed.
    fn write<T>(
        &mut self,
        write_set: &mut WriteSet,
        apply: impl FnOnce(&mut Self, &mut Batch, &mut WriteSet) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let mut batch = Batch {
            main: self.revision + 1,
            sub: 0,
            touched_keys: Vec::new(),
            write_set_puts_len: write_set.puts.len(),
            write_set_changes_len: write_set.changes.len(),
        };
        match apply(self, &mut batch, write_set) {
            Ok(response) => {
                if batch.sub > 0 {
                    self.revision = batch.main;
                }
                Ok(response)
            }
            Err(error) => {
                self.undo(batch, write_set);
                Err(error)
            }
        }
    }

    /// Removes every change of a failed batch. Each touched key's newest entries are
    /// the batch's, so popping them in reverse order restores the key exactly.
    fn undo(&mut self, batch: Batch, write_set: &mut WriteSet) {
        write_set.puts.truncate(batch.write_set_puts_len);
        write_set.changes.truncate(batch.write_set_changes_len);
        for key in batch.touched_keys.iter().rev() {
            let Some(history) = self.keys.get_mut(key) else {
                continue;
            };
            let popped = history.entries.pop();
            assert!(
                popped.is_some_and(|entry| entry.revision.main == batch.main),
                "mvcc: undo found a change that is not the batch's"
            );
            if history.entries.is_empty() {
                self.keys.remove(key);
            }
        }
    }

    /// Appends one change: to the key's history, to the records to persist, and to
    /// the events.
    fn record(
        &mut self,
        key: &[u8],
        entry: Entry,
        change: Change,
        batch: &mut Batch,
        write_set: &mut WriteSet,
    ) {
        let record = entry.encode_record(key);
        write_set.puts.push((entry.rev_key(), record));
        write_set.changes.push(change);
        match self.keys.get_mut(key) {
            Some(history) => history.push(entry),
            None => self.keys.entry(key.to_vec()).or_default().push(entry),
        }
        batch.touched_keys.push(key.to_vec());
    }

    fn live_kv(&self, key: &[u8]) -> Option<KeyValue> {
        let entry = self.keys.get(key)?.live()?;
        Some(entry.to_key_value(key))
    }

    fn put_in(
        &mut self,
        request: &PutRequest,
        batch: &mut Batch,
        write_set: &mut WriteSet,
    ) -> Result<PutResponse, KvError> {
        if request.key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        check_put_flags(request)?;
        let prev_kv = self.live_kv(&request.key);
        if (request.ignore_value || request.ignore_lease) && prev_kv.is_none() {
            return Err(KvError::InvalidArgument(KEY_NOT_FOUND_MESSAGE.to_string()));
        }
        let value = match &prev_kv {
            Some(prev) if request.ignore_value => prev.value.clone(),
            _ => request.value.clone(),
        };
        let lease = match &prev_kv {
            Some(prev) if request.ignore_lease => prev.lease,
            _ => request.lease,
        };
        let revision = batch.next_revision();
        let (create_revision, version) = match &prev_kv {
            Some(prev) => (prev.create_revision, prev.version + 1),
            None => (revision.main, 1),
        };
        let entry = Entry { revision, tombstone: false, create_revision, version, value, lease };
        let change =
            Change { kind: ChangeKind::Put, kv: entry.to_key_value(&request.key), prev_kv: prev_kv.clone() };
        self.record(&request.key, entry, change, batch, write_set);
        Ok(PutResponse {
            header: header(batch.current_revision()),
            prev_kv: prev_kv.filter(|_| request.prev_kv),
        })
    }

    fn delete_in(
        &mut self,
        request: &DeleteRangeRequest,
        batch: &mut Batch,
        write_set: &mut WriteSet,
    ) -> DeleteRangeResponse {
        let range = KeyRange::new(&request.key, &request.range_end);
        let deleted_kvs: Vec<KeyValue> = self
            .keys
            .range::<[u8], _>(range.bounds())
            .filter_map(|(key, history)| Some(history.live()?.to_key_value(key)))
            .collect();
        for prev in &deleted_kvs {
            let revision = batch.next_revision();
            let change = Change {
                kind: ChangeKind::Delete,
                kv: KeyValue { key: prev.key.clone(), mod_revision: revision.main, ..KeyValue::default() },
                prev_kv: Some(prev.clone()),
            };
            self.record(&prev.key, Entry::tombstone(revision), change, batch, write_set);
        }
        DeleteRangeResponse {
            header: header(batch.current_revision()),
            deleted: deleted_kvs.len() as i64,
            prev_kvs: if request.prev_kv { deleted_kvs } else { Vec::new() },
        }
    }

    /// Evaluates the compares of a txn and of the txns nested in the branch it
    /// takes, depth first: etcd's `compareToPath`.
    fn compare_path(&self, request: &TxnRequest, path: &mut Vec<bool>) -> Result<(), KvError> {
        let mut succeeded = true;
        for compare in &request.compare {
            if !self.compare_holds(compare)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        let ops = if succeeded { &request.success } else { &request.failure };
        for op in ops {
            if let Some(Request::RequestTxn(nested)) = &op.request {
                self.compare_path(nested, path)?;
            }
        }
        Ok(())
    }

    /// A compare holds when every key in its range satisfies it. With no key in the
    /// range, it is checked against an absent key (version, revisions and lease 0),
    /// except that a value compare is then false: a missing value cannot be told
    /// from an empty one (etcd's rule).
    fn compare_holds(&self, compare: &Compare) -> Result<bool, KvError> {
        let result = CompareResult::try_from(compare.result)
            .map_err(|_| KvError::InvalidArgument(format!("unknown compare result {}", compare.result)))?;
        let target = CompareTarget::try_from(compare.target)
            .map_err(|_| KvError::InvalidArgument(format!("unknown compare target {}", compare.target)))?;
        let found = self.live_in(KeyRange::new(&compare.key, &compare.range_end), self.revision);
        if found.is_empty() {
            let absent = Entry::tombstone(Revision { main: 0, sub: 0 });
            return Ok(target != CompareTarget::Value && compare_entry(compare, result, target, &absent));
        }
        Ok(found.iter().all(|f| compare_entry(compare, result, target, f.entry)))
    }

    /// Runs the branch that `path` (from `compare_path`) chose, and the nested txns
    /// in it, consuming `path` from `cursor` on.
    fn txn_in(
        &mut self,
        request: &TxnRequest,
        path: &[bool],
        cursor: &mut usize,
        batch: &mut Batch,
        write_set: &mut WriteSet,
    ) -> Result<TxnResponse, KvError> {
        let succeeded = path[*cursor];
        *cursor += 1;
        let ops = if succeeded { &request.success } else { &request.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = self.op_in(op, path, cursor, batch, write_set)?;
            responses.push(ResponseOp { response: Some(response) });
        }
        Ok(TxnResponse { header: header(batch.current_revision()), succeeded, responses })
    }

    fn op_in(
        &mut self,
        op: &RequestOp,
        path: &[bool],
        cursor: &mut usize,
        batch: &mut Batch,
        write_set: &mut WriteSet,
    ) -> Result<Response, KvError> {
        Ok(match &op.request {
            None => return Err(KvError::InvalidArgument(EMPTY_OP_MESSAGE.to_string())),
            // A range in a txn reads the txn's writes so far, and may name any
            // revision up to the one before the txn (etcd's checkRequestRange).
            Some(Request::RequestRange(range)) => Response::ResponseRange(self.range_at(
                range,
                batch.current_revision(),
                batch.begin_revision(),
            )?),
            Some(Request::RequestPut(put)) => Response::ResponsePut(self.put_in(put, batch, write_set)?),
            Some(Request::RequestDeleteRange(delete)) => {
                Response::ResponseDeleteRange(self.delete_in(delete, batch, write_set))
            }
            Some(Request::RequestTxn(nested)) => {
                Response::ResponseTxn(self.txn_in(nested, path, cursor, batch, write_set)?)
            }
        })
    }

    /// The changes to keys in `[key, range_end)` (etcd's range forms) from main
    /// revision `from_revision` on, in revision order, for watchers that catch up
    /// from history. At most about `events_max` events, never splitting one
    /// revision's events; also returns the revision to continue from.
    /// `Compacted` when `from_revision` is below the compact revision.
    pub fn events(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        events_max: usize,
    ) -> Result<(Vec<Change>, i64), KvError> {
        if from_revision < self.compact_revision {
            return Err(self.compacted());
        }
        let mut found: Vec<(Revision, Change)> = Vec::new();
        for (key, history) in self.keys.range::<[u8], _>(KeyRange::new(key, range_end).bounds()) {
            let first = history.entries.partition_point(|e| e.revision.main < from_revision);
            for index in first..history.entries.len() {
                let entry = &history.entries[index];
                let previous = index.checked_sub(1).map(|i| &history.entries[i]);
                let prev_kv = previous.filter(|p| !p.tombstone).map(|p| p.to_key_value(key));
                let (kind, kv) = if entry.tombstone {
                    let mut kv = KeyValue { key: key.clone(), ..Default::default() };
                    kv.mod_revision = entry.revision.main;
                    (ChangeKind::Delete, kv)
                } else {
                    (ChangeKind::Put, entry.to_key_value(key))
                };
                found.push((entry.revision, Change { kind, kv, prev_kv }));
            }
        }
        found.sort_by_key(|(revision, _)| *revision);
        let mut next_revision = self.revision + 1;
        if found.len() > events_max {
            let cut_main = found[events_max].0.main;
            let keep = found.partition_point(|(revision, _)| revision.main < cut_main).max(
                // One revision larger than the limit is still sent whole.
                found.partition_point(|(revision, _)| revision.main <= found[0].0.main),
            );
            next_revision = found[keep - 1].0.main + 1;
            found.truncate(keep);
        }
        Ok((found.into_iter().map(|(_, change)| change).collect(), next_revision))
    }

    /// Every live key in `range` at main revision `revision`, in key order.
    fn live_in(&self, range: KeyRange<'_>, revision: i64) -> Vec<Found<'_>> {
        self.keys
            .range::<[u8], _>(range.bounds())
            .filter_map(|(key, history)| {
                let entry = history.live_at(revision)?;
                Some(Found { key, entry })
            })
            .collect()
    }

    /// A range read. `current_revision` is what revision 0 means; a request may
    /// name a revision up to `newest_revision`.
    fn range_at(
        &self,
        request: &RangeRequest,
        current_revision: i64,
        newest_revision: i64,
    ) -> Result<RangeResponse, KvError> {
        let (order, target) = sort_options(request)?;
        let revision = self.read_revision(request.revision, current_revision, newest_revision)?;
        let mut found = self.live_in(KeyRange::new(&request.key, &request.range_end), revision);
        // etcd counts before filtering and limiting.
        let count = found.len() as i64;
        let header = header(current_revision);
        if request.count_only {
            return Ok(RangeResponse { header, kvs: Vec::new(), more: false, count });
        }
        found.retain(|f| passes_filters(request, f.entry));
        sort_found(&mut found, order, target);
        let mut more = false;
        if request.limit > 0 && found.len() as u64 > request.limit as u64 {
            found.truncate(request.limit as usize);
            more = true;
        }
        Ok(RangeResponse {
            header,
            kvs: found.into_iter().map(|f| f.to_key_value(request.keys_only)).collect(),
            more,
            count,
        })
    }

    /// The main revision a read at `requested` sees.
    fn read_revision(
        &self,
        requested: i64,
        current_revision: i64,
        newest_revision: i64,
    ) -> Result<i64, KvError> {
        if requested < 0 {
            return Err(KvError::InvalidArgument(format!("revision must not be negative (got {requested})")));
        }
        if requested > newest_revision {
            return Err(KvError::FutureRevision { current_revision: newest_revision });
        }
        let revision = if requested == 0 { current_revision } else { requested };
        if revision < self.compact_revision {
            return Err(self.compacted());
        }
        Ok(revision)
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..ResponseHeader::default() })
}

fn corrupt(detail: String) -> KvError {
    KvError::Corrupt(format!("mvcc record: {detail}"))
}

/// The sort a range asks for, as etcd applies it: no order but a target other than
/// the key means ascending; ascending by key is the natural order already.
fn sort_options(request: &RangeRequest) -> Result<(SortOrder, SortTarget), KvError> {
    let invalid = |_| KvError::InvalidArgument("invalid sort option".to_string());
    let order = SortOrder::try_from(request.sort_order).map_err(invalid)?;
    let target = SortTarget::try_from(request.sort_target).map_err(invalid)?;
    let order = match (order, target) {
        (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key) => SortOrder::None,
        (SortOrder::None, _) => SortOrder::Ascend,
        (order, _) => order,
    };
    Ok((order, target))
}

/// Sorts stably, so keys that tie on the target stay in ascending key order (etcd's
/// sort is not stable; any order of ties is etcd-compatible, this one is
/// deterministic).
fn sort_found(found: &mut [Found<'_>], order: SortOrder, target: SortTarget) {
    let by_target = |a: &Found<'_>, b: &Found<'_>| match target {
        SortTarget::Key => a.key.cmp(b.key),
        SortTarget::Version => a.entry.version.cmp(&b.entry.version),
        SortTarget::Create => a.entry.create_revision.cmp(&b.entry.create_revision),
        SortTarget::Mod => a.entry.revision.main.cmp(&b.entry.revision.main),
        SortTarget::Value => a.entry.value.cmp(&b.entry.value),
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => found.sort_by(by_target),
        SortOrder::Descend => found.sort_by(|a, b| by_target(b, a)),
    }
}

/// The min/max mod and create revision filters; 0 means no filter.
fn passes_filters(request: &RangeRequest, entry: &Entry) -> bool {
    let mod_revision = entry.revision.main;
    let create_revision = entry.create_revision;
    (request.min_mod_revision == 0 || mod_revision >= request.min_mod_revision)
        && (request.max_mod_revision == 0 || mod_revision <= request.max_mod_revision)
        && (request.min_create_revision == 0 || create_revision >= request.min_create_revision)
        && (request.max_create_revision == 0 || create_revision <= request.max_create_revision)
}

/// One key against one compare. The operand is the union's value when it matches
/// the target, else zero (or empty), as in etcd.
fn compare_entry(compare: &Compare, result: CompareResult, target: CompareTarget, entry: &Entry) -> bool {
    let ordering = match (target, &compare.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(value))) => entry.value.cmp(value),
        (CompareTarget::Value, _) => entry.value.as_slice().cmp(&[][..]),
        (CompareTarget::Version, union) => entry.version.cmp(&int_operand(target, union)),
        (CompareTarget::Create, union) => entry.create_revision.cmp(&int_operand(target, union)),
        (CompareTarget::Mod, union) => entry.revision.main.cmp(&int_operand(target, union)),
        (CompareTarget::Lease, union) => entry.lease.cmp(&int_operand(target, union)),
    };
    match result {
        CompareResult::Equal => ordering.is_eq(),
        CompareResult::NotEqual => ordering.is_ne(),
        CompareResult::Greater => ordering.is_gt(),
        CompareResult::Less => ordering.is_lt(),
    }
}

fn int_operand(target: CompareTarget, union: &Option<TargetUnion>) -> i64 {
    match (target, union) {
        (CompareTarget::Version, Some(TargetUnion::Version(operand)))
        | (CompareTarget::Create, Some(TargetUnion::CreateRevision(operand)))
        | (CompareTarget::Mod, Some(TargetUnion::ModRevision(operand)))
        | (CompareTarget::Lease, Some(TargetUnion::Lease(operand))) => *operand,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rev_key_round_trips_and_sorts_like_revisions() {
        let revisions = [
            Revision { main: 2, sub: 0 },
            Revision { main: 2, sub: 1 },
            Revision { main: 3, sub: 0 },
            Revision { main: 256, sub: 0 },
        ];
        for pair in revisions.windows(2) {
            assert!(pair[0].to_rev_key(true) < pair[1].to_rev_key(false));
        }
        for (revision, tombstone) in [(revisions[1], false), (revisions[3], true)] {
            let rev_key = revision.to_rev_key(tombstone);
            assert_eq!(Revision::from_rev_key(&rev_key), Ok((revision, tombstone)));
        }
        let mut bad = revisions[0].to_rev_key(false);
        bad[16] = 7;
        assert!(Revision::from_rev_key(&bad).is_err());
    }

    #[test]
    fn prefix_range_end_is_etcdctls() {
        assert_eq!(prefix_range_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn undo_restores_a_key_created_by_the_failed_batch() {
        let mut store = MvccStore::new();
        let mut write_set = WriteSet::default();
        let put = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..PutRequest::default() };
        let result: Result<(), KvError> = store.write(&mut write_set, |store, batch, ws| {
            store.put_in(&put, batch, ws)?;
            Err(KvError::EmptyKey)
        });
        assert_eq!(result, Err(KvError::EmptyKey));
        assert_eq!(store, MvccStore::new());
        assert!(write_set.is_empty());
    }

    #[test]
    fn a_record_is_encoded_as_its_key_value_would_be() {
        let values = [Vec::new(), b"v".to_vec(), vec![7u8; 127], vec![7u8; 128], vec![0u8; 70_000]];
        let ints = [0i64, 1, 127, 128, 1 << 40, i64::MAX, -1, i64::MIN];
        let keys: [&[u8]; 3] = [b"", b"k", &[0xff; 300]];
        let mut cases = 0;
        for key in keys {
            for value in &values {
                for (i, &int) in ints.iter().enumerate() {
                    let other = ints[(i + 3) % ints.len()];
                    for tombstone in [false, true] {
                        let entry = Entry {
                            revision: Revision { main: other, sub: 0 },
                            tombstone,
                            create_revision: int,
                            version: other,
                            value: value.clone(),
                            lease: int,
                        };
                        let expected = entry.to_key_value(key).encode_to_vec();
                        assert_eq!(entry.encode_record(key), expected, "{entry:?}");
                        assert_eq!(KeyValue::decode(expected.as_slice()).unwrap(), entry.to_key_value(key));
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 3 * 5 * 8 * 2);
    }
}
