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
