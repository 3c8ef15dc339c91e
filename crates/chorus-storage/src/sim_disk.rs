//! A simulated disk for the deterministic simulator: the same redb code that runs on
//! a file runs on a [`SimDisk`], which lives in memory and models fsync.
//!
//! # Model
//!
//! The disk holds two images. `current` is what reads see; every `write` and
//! `set_len` changes it at once, as the page cache does. `durable` is what survives
//! a crash; `sync_data` brings it up to `current`. The operations since the last
//! sync are kept in order, so that a sync replays only them (a sync costs what was
//! written, not the size of the disk) and a crash can decide their fate:
//!
//! * [`SimDisk::new`]: a crash loses every unsynced write.
//! * [`SimDisk::with_partial_loss`]: a crash keeps, loses or tears (keeps a prefix
//!   of) each unsynced operation independently, drawn from a seed. redb documents
//!   that it tolerates this: its design notes (`docs/design.md` of redb 4.5, "Commit
//!   strategies" and "Assumptions about underlying media") assume only that single
//!   bytes are written atomically, that writes are durable after an fsync, and that
//!   a write changes no byte outside its range; a commit whose writes landed in part
//!   fails its checksums on the next open and is rolled back.
//!
//! # The process dies, the disk does not
//!
//! A [`SimDisk`] is a cheap handle: the simulator keeps one per node across that
//! node's restarts and hands a fresh [`SimBackend`] to each incarnation. A crash
//! ([`SimDisk::crash`], or [`SimDisk::crash_at_next_sync`] for a power failure in
//! the middle of an fsync) makes every backend handed out before it stale: its
//! operations return the io error "disk crashed" and touch nothing. The crashed
//! node's redb `Database` is still dropped afterwards, and redb's drop tries to
//! finish the work of a clean shutdown (it makes pending non-durable commits
//! durable and writes a "closed cleanly" header); a dead process does none of
//! that, so none of it may reach the disk. redb's drop ignores those errors.
//!
//! # Locking
//!
//! redb takes a byte-range lock on the file when it opens it, so a second process
//! opening the same file gets `DatabaseAlreadyOpen`. The disk models that lock as
//! one holder for the whole disk, taken by the first lock request of a backend and
//! released by its `close` or by a crash (the OS releases a dead process's locks).
//!
//! Everything is deterministic: no clocks, no threads, randomness only from the
//! seed given to [`SimDisk::with_partial_loss`].

use std::fmt;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{BackendError, StorageBackend};

/// One simulated disk. Clones are handles to the same disk.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
}

/// The write-ahead log's directory on a [`SimDisk`]: each segment is a file of the
/// same disk, following the same fsync model, and crashing with it. Creating and
/// deleting a segment is durable at once (as it is for a file once its directory
/// is synced). It stops working at the disk's next crash, as a [`SimBackend`] does.
#[derive(Clone)]
pub struct SimWalDir {
    state: Arc<Mutex<DiskState>>,
    generation: u64,
}

struct SimWalFile {
    state: Arc<Mutex<DiskState>>,
    seq: u64,
    generation: u64,
}

/// One log segment's images, as `DiskState` keeps the database's.
#[derive(Default)]
struct FileImage {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<UnsyncedOperation>,
}

/// The storage redb is given: a handle to a [`SimDisk`] that works until the disk's
/// next crash. A clone is the same handle (same lock holder, same staleness).
#[derive(Clone)]
pub struct SimBackend {
    state: Arc<Mutex<DiskState>>,
    /// Tells this backend apart from the others of the same disk, for the lock.
    backend_id: u64,
    /// The disk's crash count when this backend was handed out.
    generation: u64,
}

#[derive(Default)]
struct DiskState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// The operations applied to `current` but not yet to `durable`, in order.
    /// Bounded by what is written between two syncs (one durable commit's worth in
    /// chorus), unless the `sync_is_noop` bug switch is on, when it holds everything
    /// written since it was turned on.
    unsynced: Vec<UnsyncedOperation>,
    /// Counts crashes; backends handed out in an earlier generation are stale.
    generation: u64,
    /// The id the next backend gets.
    backend_id_next: u64,
    /// The backend holding the lock redb takes on open, if any.
    lock_holder: Option<u64>,
    /// `sync_data` calls by live backends, including a no-op or crashing one.
    sync_count: u64,
    /// Test-only bug switch: `sync_data` makes nothing durable.
    sync_is_noop: bool,
    /// When set, a crash keeps or loses unsynced operations at random.
    partial_loss: Option<SplitMix64>,
    /// The next `sync_data` crashes the disk instead of syncing.
    crash_at_next_sync: bool,
    /// The write-ahead log's segments, by sequence number.
    wal_files: std::collections::BTreeMap<u64, FileImage>,
}

enum UnsyncedOperation {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen { length_bytes: u64 },
}

impl SimDisk {
    /// An empty disk on which a crash loses every unsynced write.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// An empty disk on which a crash keeps, loses or tears each unsynced write at
    /// random, drawn from `seed`.
    pub fn with_partial_loss(seed: u64) -> SimDisk {
        let disk = SimDisk::new();
        disk.lock().partial_loss = Some(SplitMix64(seed));
        disk
    }

    /// A backend for the next incarnation of the node, to hand to
    /// [`crate::DiskStorage::open_with_backend`].
    pub fn backend(&self) -> SimBackend {
        let mut state = self.lock();
        let backend_id = state.backend_id_next;
        state.backend_id_next += 1;
        SimBackend { state: self.state.clone(), backend_id, generation: state.generation }
    }

    /// The power fails: unsynced writes are lost (or, with partial loss, some of
    /// them), and every backend handed out so far stops working.
    pub fn crash(&self) {
        self.lock().crash();
    }

    /// The write-ahead log directory for the next incarnation of the node.
    pub fn wal_dir(&self) -> SimWalDir {
        SimWalDir { state: self.state.clone(), generation: self.lock().generation }
    }

    /// Arms a power failure in the middle of the next fsync: that `sync_data`
    /// crashes the disk, as [`SimDisk::crash`] does, and returns an error.
    pub fn crash_at_next_sync(&self) {
        self.lock().crash_at_next_sync = true;
    }

    /// How many times a live backend called `sync_data`.
    pub fn sync_count(&self) -> u64 {
        self.lock().sync_count
    }

    /// How many times the disk crashed.
    pub fn crash_count(&self) -> u64 {
        self.lock().generation
    }

    /// Test-only bug switch: when on, `sync_data` succeeds but makes nothing durable
    /// (the simulator's `--bug ack-before-fsync`).
    pub fn set_sync_is_noop(&self, sync_is_noop: bool) {
        self.lock().sync_is_noop = sync_is_noop;
    }

    /// The length of what would survive a crash now, in bytes.
    pub fn durable_len(&self) -> u64 {
        self.lock().durable.len() as u64
    }

    /// The length reads see now, in bytes.
    pub fn current_len(&self) -> u64 {
        self.lock().current.len() as u64
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        lock(&self.state)
    }
}

fn live_state(state: &Arc<Mutex<DiskState>>, generation: u64) -> io::Result<MutexGuard<'_, DiskState>> {
    let state = lock(state);
    if state.generation == generation {
        Ok(state)
    } else {
        Err(crashed())
    }
}

impl crate::wal::WalDir for SimWalDir {
    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(live_state(&self.state, self.generation)?.wal_files.keys().copied().collect())
    }

    fn create(&self, seq: u64, _bytes: u64) -> io::Result<Box<dyn crate::wal::WalFile>> {
        live_state(&self.state, self.generation)?.wal_files.insert(seq, FileImage::default());
        Ok(Box::new(SimWalFile { state: self.state.clone(), seq, generation: self.generation }))
    }

    fn open(&self, seq: u64) -> io::Result<Box<dyn crate::wal::WalFile>> {
        if !live_state(&self.state, self.generation)?.wal_files.contains_key(&seq) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such segment"));
        }
        Ok(Box::new(SimWalFile { state: self.state.clone(), seq, generation: self.generation }))
    }

    fn remove(&self, seq: u64) -> io::Result<()> {
        live_state(&self.state, self.generation)?.wal_files.remove(&seq);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        live_state(&self.state, self.generation).map(|_| ())
    }

    fn label(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("sim://wal")
    }
}

impl SimWalFile {
    fn with<T>(&self, f: impl FnOnce(&mut FileImage) -> T) -> io::Result<T> {
        let mut state = live_state(&self.state, self.generation)?;
        let file = state
            .wal_files
            .get_mut(&self.seq)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "segment deleted"))?;
        Ok(f(file))
    }
}

impl crate::wal::WalFile for SimWalFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|file| file.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.with(|file| {
            let range = byte_range(offset, out.len(), file.current.len()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the segment")
            })?;
            out.copy_from_slice(&file.current[range]);
            Ok(())
        })?
    }

    /// A write past the end extends the segment, as it extends a file.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(|file| {
            let operation = UnsyncedOperation::Write { offset, bytes: data.to_vec() };
            operation.clone_apply(&mut file.current);
            file.unsynced.push(operation);
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = live_state(&self.state, self.generation)?;
        state.sync_count += 1;
        if state.crash_at_next_sync {
            state.crash();
            return Err(crashed());
        }
        if !state.sync_is_noop {
            let file = state
                .wal_files
                .get_mut(&self.seq)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "segment deleted"))?;
            for operation in file.unsynced.drain(..) {
                operation.apply(&mut file.durable);
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("SimDisk")
            .field("current_len", &state.current.len())
            .field("durable_len", &state.durable.len())
            .field("generation", &state.generation)
            .finish()
    }
}

/// Locks the disk's state. A panic while it was held (a bug in this file) leaves
/// the state consistent enough to read, and redb may drop a database while a panic
/// unwinds, so a poisoned lock is read through rather than turned into a second
/// panic.
fn lock(state: &Mutex<DiskState>) -> MutexGuard<'_, DiskState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DiskState {
    fn crash(&mut self) {
        let unsynced = std::mem::take(&mut self.unsynced);
        lose_unsynced(unsynced, &mut self.durable, &mut self.partial_loss);
        self.current.clone_from(&self.durable);
        for file in self.wal_files.values_mut() {
            let unsynced = std::mem::take(&mut file.unsynced);
            lose_unsynced(unsynced, &mut file.durable, &mut self.partial_loss);
            file.current.clone_from(&file.durable);
        }
        self.generation += 1;
        self.lock_holder = None;
        self.crash_at_next_sync = false;
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_count += 1;
        if self.crash_at_next_sync {
            self.crash();
            return Err(crashed());
        }
        if !self.sync_is_noop {
            for operation in self.unsynced.drain(..) {
                operation.apply(&mut self.durable);
            }
        }
        Ok(())
    }
}

/// What a crash leaves of unsynced operations: nothing, or with partial loss
/// each one kept, lost or torn at random.
fn lose_unsynced(
    unsynced: Vec<UnsyncedOperation>,
    durable: &mut Vec<u8>,
    partial_loss: &mut Option<SplitMix64>,
) {
    if let Some(random) = partial_loss {
        for operation in unsynced {
            match random.below(4) {
                // Kept whole twice as often as lost or torn, so that whole
                // commits survive often enough to be seen.
                0 | 1 => operation.apply(durable),
                2 => {}
                _ => operation.torn(random).apply(durable),
            }
        }
    }
}

impl UnsyncedOperation {
    /// Applies a copy of the operation (what reads see at once).
    fn clone_apply(&self, image: &mut Vec<u8>) {
        match self {
            UnsyncedOperation::Write { offset, bytes } => {
                let start = *offset as usize;
                let end = start + bytes.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[start..end].copy_from_slice(bytes);
            }
            UnsyncedOperation::SetLen { length_bytes } => image.resize(*length_bytes as usize, 0),
        }
    }

    /// Applies the operation to a disk image. A write past the end extends the
    /// image, as it extends a file (a partial loss can drop the `set_len` before it).
    fn apply(self, image: &mut Vec<u8>) {
        match self {
            UnsyncedOperation::Write { offset, bytes } => {
                let start = offset as usize;
                let end = start + bytes.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[start..end].copy_from_slice(&bytes);
            }
            UnsyncedOperation::SetLen { length_bytes } => image.resize(length_bytes as usize, 0),
        }
    }

    /// The part of the operation that reached the disk when power failed in the
    /// middle of it: a prefix of a write (any subset of bytes is allowed by redb's
    /// assumptions; a prefix is one), or a length change whole.
    fn torn(self, random: &mut SplitMix64) -> UnsyncedOperation {
        match self {
            UnsyncedOperation::Write { offset, mut bytes } => {
                bytes.truncate(random.below(bytes.len() as u64) as usize);
                UnsyncedOperation::Write { offset, bytes }
            }
            set_len => set_len,
        }
    }
}

impl SimBackend {
    /// The disk's state, or the "disk crashed" error when the disk crashed after
    /// this backend was handed out.
    fn live(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let state = lock(&self.state);
        if state.generation == self.generation {
            Ok(state)
        } else {
            Err(crashed())
        }
    }

    /// Takes the disk's lock for this backend: `false` when another live backend
    /// holds it.
    fn try_lock(&self) -> Result<bool, BackendError> {
        let mut state = self.live()?;
        match state.lock_holder {
            None => {
                state.lock_holder = Some(self.backend_id);
                Ok(true)
            }
            Some(holder) => Ok(holder == self.backend_id),
        }
    }
}

impl fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimBackend")
            .field("backend_id", &self.backend_id)
            .field("generation", &self.generation)
            .finish()
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.live()?;
        let range = byte_range(offset, out.len(), state.current.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk"))?;
        out.copy_from_slice(&state.current[range]);
        Ok(())
    }

    fn set_len(&self, length_bytes: u64) -> io::Result<()> {
        let mut state = self.live()?;
        let length = usize::try_from(length_bytes).map_err(|_| too_large())?;
        state.current.resize(length, 0);
        state.unsynced.push(UnsyncedOperation::SetLen { length_bytes });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.live()?.sync()
    }

    /// Writes inside the disk's length; like redb's own in-memory backend, a write
    /// past the end is an error (redb always calls `set_len` first).
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.live()?;
        let range = byte_range(offset, data.len(), state.current.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the end of the disk"))?;
        state.current[range].copy_from_slice(data);
        state.unsynced.push(UnsyncedOperation::Write { offset, bytes: data.to_vec() });
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        let mut state = self.live()?;
        if state.lock_holder == Some(self.backend_id) {
            state.lock_holder = None;
        }
        Ok(())
    }

    fn try_lock_range(&self, _start: Bound<u64>, _end: Bound<u64>) -> Result<bool, BackendError> {
        self.try_lock()
    }

    fn try_lock_shared_range(&self, _start: Bound<u64>, _end: Bound<u64>) -> Result<bool, BackendError> {
        self.try_lock()
    }

    /// The disk's one lock is released by `close`; redb unlocks single ranges only
    /// on paths that `close` follows.
    fn unlock_range(&self, _start: Bound<u64>, _end: Bound<u64>) -> Result<(), BackendError> {
        drop(self.live()?);
        Ok(())
    }
}

/// The index range `offset .. offset + count` when it lies inside `length`.
fn byte_range(offset: u64, count: usize, length: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(count)?;
    (end <= length).then_some(start..end)
}

fn crashed() -> io::Error {
    io::Error::other("disk crashed")
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "length does not fit in memory")
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a few coin flips per crash need no
/// more, and an inline generator keeps this crate free of a dependency whose output
/// could change between versions and break seed replay.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0). The modulo bias is far below
    /// anything a simulation could notice.
    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next() % bound
        }
    }
}

#[cfg(test)]
mod tests {
    //! The disk model on its own, then chorus's storage on it: what a crash keeps,
    //! that the bug switch bites, that a crashed node's late drop is harmless, and
    //! that seeded partial loss never breaks a database.

    use super::*;
    use crate::{DiskStorage, Identity, Opened, StorageError};
    use chorus_core::mvcc::{MvccStore, WriteSet};
    use chorus_core::node::PersistBatch;
    use chorus_proto::etcdserverpb::PutRequest;
    use raft::prelude::{Entry, HardState};

    const IDENTITY: Identity = Identity { cluster_id: 0xc1, member_id: 0x61 };
    const LABEL: &str = "sim://node1";

    #[test]
    fn reads_see_writes_at_once_and_a_crash_keeps_only_synced_ones() {
        let disk = SimDisk::new();
        let backend = disk.backend();
        backend.set_len(8).unwrap();
        backend.write(0, b"durable!").unwrap();
        backend.sync_data().unwrap();
        backend.set_len(16).unwrap();
        backend.write(0, b"volatile").unwrap();
        let mut out = [0; 8];
        backend.read(0, &mut out).unwrap();
        assert_eq!(&out, b"volatile");
        assert_eq!((disk.current_len(), disk.durable_len()), (16, 8));
        disk.crash();
        let error = backend.read(0, &mut out).unwrap_err();
        assert_eq!(error.to_string(), "disk crashed");
        assert!(backend.write(0, b"late").is_err() && backend.sync_data().is_err());
        let backend = disk.backend();
        assert_eq!(backend.len().unwrap(), 8);
        backend.read(0, &mut out).unwrap();
        assert_eq!(&out, b"durable!");
        assert_eq!(disk.sync_count(), 1);
        assert!(backend.read(4, &mut out).is_err(), "a read past the end fails");
        assert!(backend.write(4, &out).is_err(), "a write past the end fails");
    }

    #[test]
    fn a_sync_makes_the_durable_image_equal_to_the_current_one() {
        let disk = SimDisk::new();
        let backend = disk.backend();
        backend.set_len(64).unwrap();
        for round in 0..8u8 {
            backend.write(u64::from(round) * 5, &[round; 7]).unwrap();
            backend.set_len(64 - u64::from(round)).unwrap();
        }
        backend.sync_data().unwrap();
        let state = lock(&disk.state);
        assert_eq!(state.current, state.durable);
        assert!(state.unsynced.is_empty());
    }

    /// Batch `index` of a run: log entry `index` and its effect, a put of key
    /// `k<index>`, applied in the same batch.
    fn batch(index: u64, store: &mut MvccStore, must_sync: bool) -> PersistBatch {
        let mut writes = WriteSet::default();
        let put = PutRequest {
            key: format!("k{index}").into_bytes(),
            value: vec![b'v'; 100],
            ..Default::default()
        };
        store.put(&put, &mut writes).unwrap();
        let hard_state = HardState { term: 1, commit: index, ..Default::default() };
        let entries = vec![Entry { index, term: 1, ..Default::default() }];
        PersistBatch { entries, hard_state, writes, applied_index: index, must_sync, ..Default::default() }
    }

    fn open(disk: &SimDisk) -> Opened {
        DiskStorage::open_with_backend(disk.backend(), disk.wal_dir(), LABEL, IDENTITY).unwrap()
    }

    /// The storage agrees with itself: one key per applied batch, and the log
    /// holds every applied entry (and maybe more, to apply again). Returns the
    /// log's length.
    fn assert_consistent(opened: &Opened) -> u64 {
        let recovered = &opened.recovered;
        let applied = recovered.applied_index;
        let logged = recovered.entries.len() as u64;
        assert!(logged >= applied, "log {logged} applied {applied}");
        assert!(recovered.hard_state.commit >= applied);
        assert_eq!(recovered.mvcc.key_count(), applied);
        logged
    }

    #[test]
    fn a_durable_batch_survives_a_crash_and_an_unsynced_one_leaves_a_consistent_database() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        assert!(opened.created);
        assert!(opened.storage.size_bytes() > 0);
        assert_eq!(opened.storage.path().to_str(), Some(LABEL));
        let mut store = MvccStore::default();
        opened.storage.persist(&batch(1, &mut store, true)).unwrap();
        let hash_after_durable = store.state_hash();
        opened.storage.persist(&batch(2, &mut store, false)).unwrap();
        disk.crash();
        drop(opened);
        let opened = open(&disk);
        assert!(!opened.created);
        assert_eq!(opened.boot_count, 2);
        // The synced entry is in the log; the database holds what was applied
        // at its last checkpoint (here: nothing), the rest is applied again.
        assert_eq!(assert_consistent(&opened), 1);
        match opened.recovered.applied_index {
            0 => assert_eq!(opened.recovered.mvcc.state_hash(), MvccStore::default().state_hash()),
            1 => assert_eq!(opened.recovered.mvcc.state_hash(), hash_after_durable),
            other => panic!("applied {other}"),
        }
    }

    #[test]
    fn database_writes_waiting_are_lost_in_a_crash_and_their_entries_kept_to_apply_again() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        opened.storage.set_deferred_max(16);
        let mut store = MvccStore::default();
        opened.storage.persist(&batch(1, &mut store, true)).unwrap();
        opened.storage.persist_deferring(batch(2, &mut store, true)).unwrap();
        opened.storage.persist_deferring(batch(3, &mut store, true)).unwrap();
        assert_eq!(opened.storage.deferred_cycles(), 2);
        disk.crash();
        drop(opened);
        let opened = open(&disk);
        assert_eq!(assert_consistent(&opened), 3, "both waiting cycles' entries are in the log");
        assert!(opened.recovered.applied_index <= 1, "applied {}", opened.recovered.applied_index);
    }

    #[test]
    fn with_sync_as_a_noop_a_durable_batch_is_lost_in_a_crash() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        disk.set_sync_is_noop(true);
        let mut store = MvccStore::default();
        opened.storage.persist(&batch(1, &mut store, true)).unwrap();
        disk.crash();
        drop(opened);
        disk.set_sync_is_noop(false);
        let opened = open(&disk);
        assert_eq!(assert_consistent(&opened), 0, "the acknowledged batch is gone");
        assert_eq!(opened.boot_count, 2, "the open before the switch was synced");
    }

    #[test]
    fn dropping_a_crashed_nodes_storage_neither_panics_nor_writes() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        let mut store = MvccStore::default();
        opened.storage.persist(&batch(1, &mut store, true)).unwrap();
        // redb's drop would make this non-durable commit durable in a clean close.
        opened.storage.persist(&batch(2, &mut store, false)).unwrap();
        disk.crash();
        let image_after_crash = lock(&disk.state).durable.clone();
        let syncs_after_crash = disk.sync_count();
        assert_eq!(opened.storage.size_bytes(), 0, "a stale backend reads nothing");
        drop(opened);
        assert_eq!(lock(&disk.state).durable, image_after_crash);
        assert_eq!(lock(&disk.state).current, image_after_crash);
        assert_eq!(disk.sync_count(), syncs_after_crash);
        let opened = open(&disk);
        assert_eq!(assert_consistent(&opened), 1, "the unsynced batch was not promoted");
        assert!(opened.recovered.applied_index <= 1);
    }

    #[test]
    fn a_clean_close_makes_a_pending_non_durable_batch_durable() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        let mut store = MvccStore::default();
        opened.storage.persist(&batch(1, &mut store, false)).unwrap();
        drop(opened);
        disk.crash();
        assert_eq!(assert_consistent(&open(&disk)), 1);
    }

    #[test]
    fn a_durable_persist_syncs_and_a_non_durable_one_does_not() {
        let disk = SimDisk::new();
        let mut opened = open(&disk);
        let mut store = MvccStore::default();
        let before = disk.sync_count();
        assert!(before > 0, "creating the database syncs");
        opened.storage.persist(&batch(1, &mut store, true)).unwrap();
        let after_durable = disk.sync_count();
        assert!(after_durable > before);
        opened.storage.persist(&batch(2, &mut store, false)).unwrap();
        assert_eq!(disk.sync_count(), after_durable);
    }

    #[test]
    fn a_second_open_of_a_disk_in_use_is_refused() {
        let disk = SimDisk::new();
        let opened = open(&disk);
        let error =
            DiskStorage::open_with_backend(disk.backend(), disk.wal_dir(), LABEL, IDENTITY).err().unwrap();
        assert!(matches!(error, StorageError::InUse { .. }), "{error}");
        assert!(error.to_string().contains(LABEL), "{error}");
        drop(opened);
        drop(open(&disk));
    }

    #[test]
    fn an_open_of_a_corrupt_disk_is_reported_with_the_label() {
        let disk = SimDisk::new();
        let backend = disk.backend();
        backend.set_len(8192).unwrap();
        backend.write(0, &[0x5a; 8192]).unwrap();
        let error = DiskStorage::open_with_backend(backend, disk.wal_dir(), LABEL, IDENTITY).err().unwrap();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(LABEL), "{error}");
    }

    /// Seeded runs of durable and non-durable batches, crashes between batches and in
    /// the middle of fsyncs, on disks that keep a random part of unsynced writes.
    /// Every reopen must succeed, be consistent, keep every acknowledged durable
    /// batch, and hold exactly the state the run had at its applied index.
    #[test]
    fn partial_loss_never_breaks_the_database_nor_loses_a_durable_batch() {
        let mut outcomes = [0u32; 2];
        for seed in 0..48 {
            let disk = SimDisk::with_partial_loss(seed);
            let mut choices = SplitMix64(seed ^ 0x5eed);
            let mut hashes = vec![MvccStore::default().state_hash()];
            let mut opened = open(&disk);
            let mut store = MvccStore::default();
            let mut durable_index = 0;
            for _ in 0..40 {
                let index = hashes.len() as u64;
                let must_sync = choices.below(2) == 0;
                let crash_in_sync = must_sync && choices.below(4) == 0;
                if crash_in_sync {
                    disk.crash_at_next_sync();
                }
                let result = opened.storage.persist(&batch(index, &mut store, must_sync));
                hashes.truncate(index as usize);
                hashes.push(store.state_hash());
                assert_eq!(result.is_err(), crash_in_sync, "seed {seed}");
                if must_sync && !crash_in_sync {
                    durable_index = index;
                }
                if crash_in_sync || choices.below(5) == 0 {
                    disk.crash();
                    drop(opened);
                    opened = open(&disk);
                    let logged = assert_consistent(&opened);
                    assert!(logged >= durable_index, "seed {seed}: lost durable batch {durable_index}");
                    let applied = opened.recovered.applied_index;
                    assert_eq!(opened.recovered.mvcc.state_hash(), hashes[applied as usize], "seed {seed}");
                    if crash_in_sync {
                        outcomes[usize::from(logged == index)] += 1;
                    }
                    hashes.truncate(applied as usize + 1);
                    store = std::mem::take(&mut opened.recovered.mvcc);
                    durable_index = applied;
                }
            }
        }
        assert!(
            outcomes[0] > 0 && outcomes[1] > 0,
            "a crash in fsync both kept and lost a commit: {outcomes:?}"
        );
    }
}
