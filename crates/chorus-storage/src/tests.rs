//! Storage tests: what is persisted comes back, identity is enforced, and damaged
//! data directories give one-line errors instead of panics.

use super::*;
use chorus_core::mvcc::WriteSet;
use chorus_proto::etcdserverpb::{PutRequest, RangeRequest};

const IDENTITY: Identity = Identity { cluster_id: 0xc1, member_id: 0x61 };

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry { index, term, data: data.to_vec().into(), ..Default::default() }
}

fn batch_with(entries: Vec<Entry>, commit: u64, writes: WriteSet, applied_index: u64) -> PersistBatch {
    let hard_state = HardState { term: 1, commit, ..Default::default() };
    PersistBatch { entries, hard_state, writes, applied_index, must_sync: true, ..Default::default() }
}

#[test]
fn a_persisted_batch_comes_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut writes = WriteSet::default();
    let put = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() };
    store.put(&put, &mut writes).unwrap();
    {
        let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
        assert!(opened.created);
        let entries = vec![entry(1, 1, b""), entry(2, 1, b"x")];
        opened.storage.persist(&batch_with(entries, 2, writes, 2)).unwrap();
    }
    let opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert!(!opened.created);
    assert_eq!(opened.boot_count, 2);
    let recovered = opened.recovered;
    assert_eq!(recovered.entries.len(), 2);
    assert_eq!(recovered.entries[1].data.as_ref(), b"x");
    assert_eq!(recovered.hard_state.commit, 2);
    assert_eq!(recovered.applied_index, 2);
    assert_eq!(recovered.mvcc.state_hash(), store.state_hash());
    let range = RangeRequest { key: b"k".to_vec(), ..Default::default() };
    assert_eq!(recovered.mvcc.range(&range).unwrap().kvs[0].value, b"v");
}

#[test]
fn appending_at_an_earlier_index_replaces_the_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let first = vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")];
    opened.storage.persist(&batch_with(first, 1, WriteSet::default(), 0)).unwrap();
    let second = vec![entry(2, 2, b"B")];
    opened.storage.persist(&batch_with(second, 1, WriteSet::default(), 0)).unwrap();
    drop(opened);
    let recovered = DiskStorage::open(dir.path(), IDENTITY).unwrap().recovered;
    let terms: Vec<u64> = recovered.entries.iter().map(|e| e.term).collect();
    assert_eq!(terms, vec![1, 2], "entry 3 of the old term is gone");
}

#[test]
fn a_data_directory_of_another_cluster_or_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(DiskStorage::open(dir.path(), IDENTITY).unwrap());
    let other_cluster = Identity { cluster_id: 0xc2, ..IDENTITY };
    let error = DiskStorage::open(dir.path(), other_cluster).err().unwrap();
    assert!(matches!(error, StorageError::WrongCluster { found: 0xc1, expected: 0xc2, .. }), "{error}");
    assert!(error.to_string().contains("belongs to cluster"));
    let other_member = Identity { member_id: 0x62, ..IDENTITY };
    let error = DiskStorage::open(dir.path(), other_member).err().unwrap();
    assert!(matches!(error, StorageError::WrongMember { .. }), "{error}");
}

#[test]
fn a_corrupt_database_file_is_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("member")).unwrap();
    std::fs::write(dir.path().join("member").join(DB_FILE_NAME), vec![0x5a; 8192]).unwrap();
    let error = DiskStorage::open(dir.path(), IDENTITY).err().unwrap();
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("is corrupt") && !text.contains('\n'), "{text}");
}

#[test]
fn an_unreadable_data_directory_is_reported() {
    if running_as_root() {
        // root can read anything; a file where the directory should be still fails.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocked");
        std::fs::write(&path, b"not a directory").unwrap();
        let error = DiskStorage::open(&path, IDENTITY).err().unwrap();
        assert!(matches!(error, StorageError::Unreadable { .. }), "{error}");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    drop(DiskStorage::open(dir.path(), IDENTITY).unwrap());
    let file = dir.path().join("member").join(DB_FILE_NAME);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    let error = DiskStorage::open(dir.path(), IDENTITY).err().unwrap();
    assert!(matches!(error, StorageError::Unreadable { .. }), "{error}");
}

/// Whether the tests run as root (permission bits do not stop root).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A batch putting `count` keys `prefix-i` with 1 KiB values into `store`.
fn put_batch(store: &mut MvccStore, prefix: &str, count: usize, index: u64) -> PersistBatch {
    let mut writes = WriteSet::default();
    for i in 0..count {
        let put = PutRequest {
            key: format!("{prefix}-{i}").into_bytes(),
            value: vec![b'v'; 1024],
            ..Default::default()
        };
        store.put(&put, &mut writes).unwrap();
    }
    batch_with(vec![entry(index, 1, b"")], index, writes, index)
}

#[test]
fn defragmentation_shrinks_the_file_and_keeps_writes_made_during_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let storage = &mut opened.storage;
    for index in 1..=20 {
        storage.persist(&put_batch(&mut store, &format!("old{index}"), 500, index)).unwrap();
    }
    // Compacting away every old revision frees most of the file.
    let mut writes = WriteSet::default();
    for index in 1..=20 {
        let key = format!("old{index}").into_bytes();
        let mut end = key.clone();
        end.push(0xff);
        let delete =
            chorus_proto::etcdserverpb::DeleteRangeRequest { key, range_end: end, ..Default::default() };
        store.delete_range(&delete, &mut writes).unwrap();
    }
    let revision = store.revision();
    let compaction = chorus_proto::etcdserverpb::CompactionRequest { revision, ..Default::default() };
    store.compact(&compaction, &mut writes).unwrap();
    storage.persist(&batch_with(vec![entry(21, 1, b"")], 21, writes, 21)).unwrap();
    let in_use = storage.size_in_use_bytes();
    let size_before = storage.size_bytes();
    assert!(in_use < size_before / 4, "in use {in_use} of {size_before}");

    let copy = storage.defrag_begin().unwrap();
    assert!(storage.defrag_begin().is_err(), "a second defragmentation is refused while one runs");
    // Written while the copy is made: must be in the result.
    storage.persist(&put_batch(&mut store, "during", 50, 22)).unwrap();
    let copied = std::thread::spawn(move || copy.run()).join().unwrap();
    let report = storage.defrag_finish(copied).unwrap();
    assert_eq!(report.batches_replayed, 1);
    assert!(report.size_after < report.size_before / 2, "{report:?}");
    // Written after the swap, into the new file.
    storage.persist(&put_batch(&mut store, "after", 10, 23)).unwrap();
    let hash = storage.image_reader().hash_kv(0).unwrap().unwrap();
    let in_use_after = storage.size_in_use_bytes();
    assert!(!defrag_target(storage.path()).exists());
    drop(opened);

    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert_eq!(reopened.recovered.applied_index, 23);
    assert_eq!(reopened.recovered.mvcc.state_hash(), store.state_hash());
    assert_eq!(reopened.storage.image_reader().hash_kv(0).unwrap().unwrap(), hash);
    assert_eq!(reopened.storage.size_in_use_bytes(), in_use_after, "the running count matches a recount");
}

#[test]
fn a_failed_defragmentation_leaves_the_database_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    opened.storage.persist(&put_batch(&mut store, "k", 10, 1)).unwrap();
    let copy = opened.storage.defrag_begin().unwrap();
    drop(copy);
    let failed = Err(StorageError::Io { path: "copy".into(), detail: "disk full".into() });
    assert!(opened.storage.defrag_finish(failed).is_err());
    opened.storage.persist(&put_batch(&mut store, "j", 10, 2)).unwrap();
    drop(opened);
    // A copy left behind by a crash is removed at start-up.
    std::fs::write(defrag_target(&dir.path().join("member").join(DB_FILE_NAME)), b"half a copy").unwrap();
    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert_eq!(reopened.recovered.mvcc.state_hash(), store.state_hash());
    assert!(!defrag_target(reopened.storage.path()).exists());
}

#[test]
fn a_format_1_data_directory_is_converted_and_keeps_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let member = dir.path().join("member");
    std::fs::create_dir_all(&member).unwrap();
    {
        // What a format-1 build left: the log, hard state and applied index in redb.
        let db = Database::create(member.join(DB_FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let values =
                [("format_version", 1u64), ("cluster_id", 0xc1), ("member_id", 0x61), ("boot_count", 3)];
            for (name, value) in values {
                meta.insert(name, value.to_be_bytes().as_slice()).unwrap();
            }
            meta.insert("applied_index", 2u64.to_be_bytes().as_slice()).unwrap();
            let hard_state = HardState { term: 4, vote: 0x61, commit: 3, ..Default::default() };
            meta.insert("hard_state", hard_state.write_to_bytes().unwrap().as_slice()).unwrap();
            let mut log = txn.open_table(RAFT_LOG).unwrap();
            for index in 1..=3 {
                let bytes = entry(index, 4, b"e").write_to_bytes().unwrap();
                log.insert(index, bytes.as_slice()).unwrap();
            }
            txn.open_table(KV).unwrap();
            txn.open_table(MEMBERS).unwrap();
            txn.open_table(APPLIED_PROPOSALS).unwrap();
            txn.open_table(LEASES).unwrap();
        }
        txn.commit().unwrap();
    }
    for boot in [4, 5] {
        let opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
        assert_eq!(opened.boot_count, boot);
        let recovered = &opened.recovered;
        assert_eq!(recovered.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(
            (recovered.hard_state.term, recovered.hard_state.vote, recovered.hard_state.commit),
            (4, 0x61, 3)
        );
        assert_eq!(recovered.applied_index, 2);
        let txn = opened.storage.db.begin_read().unwrap();
        assert!(
            txn.open_table(RAFT_LOG).unwrap().iter().unwrap().next().is_none(),
            "the old log table is emptied"
        );
    }
}

#[test]
fn checkpoints_delete_compacted_log_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    opened.storage.set_tuning(5, 2048);
    for index in 1..=40u64 {
        let mut batch = put_batch(&mut store, &format!("k{index}"), 1, index);
        batch.entries[0].data = vec![b'e'; 300].into();
        batch.applied_term = 1;
        if index % 10 == 0 {
            batch.log_compacted_to = Some((index - 2, 1));
        }
        opened.storage.persist(&batch).unwrap();
    }
    let segments = opened.storage.log().segment_count();
    assert!(segments < 10, "compacted segments were deleted: {segments} left");
    drop(opened);
    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let recovered = &reopened.recovered;
    assert_eq!(recovered.log_snapshot, (38, 1));
    assert_eq!(recovered.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![39, 40]);
    assert_eq!(recovered.applied_index, 40);
    assert_eq!(recovered.mvcc.state_hash(), store.state_hash());
}

#[test]
fn a_defragmentation_outrun_by_writes_gives_up_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let storage = &mut opened.storage;
    storage.set_defrag_recorded_bytes_max(100 * 1024);
    storage.persist(&put_batch(&mut store, "before", 10, 1)).unwrap();
    let copy = storage.defrag_begin().unwrap();
    // 200 KiB written while the copy is made: more than the 100 KiB it may keep.
    for index in 2..=21 {
        storage.persist(&put_batch(&mut store, &format!("during{index}"), 10, index)).unwrap();
    }
    let copied = std::thread::spawn(move || copy.run()).join().unwrap();
    let error = storage.defrag_finish(copied).err().unwrap();
    assert!(error.to_string().contains("defragmentation abandoned"), "{error}");
    assert!(!defrag_target(storage.path()).exists(), "the copy is removed");
    assert!(!storage.defrag_running());
    storage.persist(&put_batch(&mut store, "after", 10, 22)).unwrap();
    drop(opened);
    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert_eq!(reopened.recovered.mvcc.state_hash(), store.state_hash());
}

#[test]
fn database_writes_wait_until_the_limit_a_flush_or_a_log_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let storage = &mut opened.storage;
    storage.set_deferred_max(4);
    let reader = storage.image_reader();
    let committed_revision = || reader.hash_kv(0).unwrap().unwrap().current_revision;
    let empty = committed_revision();
    for index in 1..=3 {
        storage.persist_deferring(put_batch(&mut store, &format!("k{index}"), 2, index)).unwrap();
    }
    assert_eq!(storage.deferred_cycles(), 3);
    assert_eq!(committed_revision(), empty, "nothing is committed yet");
    storage.persist_deferring(put_batch(&mut store, "k4", 2, 4)).unwrap();
    assert_eq!(storage.deferred_cycles(), 0, "the fourth cycle commits all four");
    assert_eq!(committed_revision(), store.revision());

    storage.persist_deferring(put_batch(&mut store, "k5", 2, 5)).unwrap();
    assert_eq!(storage.deferred_cycles(), 1);
    storage.flush().unwrap();
    assert_eq!(storage.deferred_cycles(), 0);
    assert_eq!(committed_revision(), store.revision());

    // A log compaction never waits: an image read from the database must not
    // predate the log's first entry.
    storage.persist_deferring(put_batch(&mut store, "k6", 2, 6)).unwrap();
    let mut compacting = put_batch(&mut store, "k7", 2, 7);
    compacting.log_compacted_to = Some((5, 1));
    storage.persist_deferring(compacting).unwrap();
    assert_eq!(storage.deferred_cycles(), 0);
    assert_eq!(committed_revision(), store.revision());

    storage.set_deferred_max(0);
    storage.persist_deferring(put_batch(&mut store, "k8", 2, 8)).unwrap();
    assert_eq!(storage.deferred_cycles(), 0, "with a limit of 0 nothing waits");
    let in_use = storage.size_in_use_bytes();
    drop(reader);
    drop(opened);

    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert_eq!(reopened.recovered.applied_index, 8);
    assert_eq!(reopened.recovered.mvcc.state_hash(), store.state_hash());
    assert_eq!(reopened.storage.size_in_use_bytes(), in_use, "the running count matches a recount");
}

#[test]
fn a_defragmentation_keeps_the_database_writes_that_were_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = MvccStore::default();
    let mut opened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    let storage = &mut opened.storage;
    storage.set_deferred_max(16);
    storage.persist_deferring(put_batch(&mut store, "before1", 2, 1)).unwrap();
    storage.persist_deferring(put_batch(&mut store, "before2", 2, 2)).unwrap();
    let copy = storage.defrag_begin().unwrap();
    assert_eq!(storage.deferred_cycles(), 0, "committed before the copy began");
    storage.persist_deferring(put_batch(&mut store, "during", 2, 3)).unwrap();
    assert_eq!(storage.deferred_cycles(), 1);
    let copied = std::thread::spawn(move || copy.run()).join().unwrap();
    storage.defrag_finish(copied).unwrap();
    assert_eq!(storage.deferred_cycles(), 0, "the copy has the waiting write");
    storage.persist_deferring(put_batch(&mut store, "after", 2, 4)).unwrap();
    storage.flush().unwrap();
    drop(opened);

    let reopened = DiskStorage::open(dir.path(), IDENTITY).unwrap();
    assert_eq!(reopened.recovered.applied_index, 4);
    assert_eq!(reopened.recovered.mvcc.state_hash(), store.state_hash());
}
