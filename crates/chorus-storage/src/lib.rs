//! chorus-storage: one write-ahead log and one redb database per node, and the only
//! crate that calls fsync.
//!
//! # On-disk format (format version 2)
//!
//! `<data-dir>/member/wal/` holds the raft log and the hard state (see [`wal`]);
//! `<data-dir>/member/chorus.redb` holds the state machine, with these tables:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | bytes; see below |
//! | `raft_log` | raft index (`u64`) | empty since format 2 (format 1 kept the log here) |
//! | `kv` | 17-byte revision key (see `chorus_core::mvcc`) | `mvccpb.KeyValue`, protobuf-encoded |
//! | `members` | member id (`u64`) | `chorus.v1.MemberAttributes`, protobuf-encoded |
//! | `applied_proposals` | (proposer member id, proposal tag) | nothing: the key is the record |
//! | `leases` | lease id (`i64`) | the lease record of `chorus_core::lease` |
//!
//! `meta` holds `format_version`, `cluster_id`, `member_id`, `boot_count` (each a
//! big-endian `u64`), `hard_state` (raft-rs protobuf; the log's frames carry the
//! current one, this is the one for an empty log) and `conf_state`, `applied_index`,
//! `applied_term` and `compact_revision` (big-endian `u64` / `i64`),
//! `log_snapshot_index` and `log_snapshot_term` (big-endian `u64`): the index and
//! term of the last log entry compacted away (absent when none was), `wal_first_seq`
//! (the first log segment that belongs to this state; older ones predate an
//! installed snapshot), and `alarms` (`etcdserverpb.AlarmResponse` with only its
//! alarm list, protobuf-encoded).
//!
//! # Writing a cycle
//!
//! [`DiskStorage::persist`] appends the cycle's new log entries and hard state to
//! the log as one frame, fsynced when [`PersistBatch::must_sync`] says so (entries,
//! or a changed term or vote), and then writes the state machine's changes and the
//! applied index in ONE redb transaction WITHOUT an fsync. Every
//! [`CHECKPOINT_COMMITS`] commits, or [`CHECKPOINT_LOG_BYTES`] of log, one of those
//! transactions is made durable instead (a checkpoint), after syncing the log. A
//! crash therefore rolls the database back to its last checkpoint, whole (redb
//! guarantees that a non-durable commit is either kept with every earlier one or
//! lost), and the entries applied since are applied again from the log: the
//! applied index always matches the data it produced, and replaying is idempotent.
//! Log segments are deleted once a checkpoint records their entries as compacted.
//!
//! [`DiskStorage::persist_deferring`] (what the server calls) may let the database
//! writes of up to [`DEFERRED_CYCLES_MAX`] cycles wait, to commit them in one
//! transaction: a crash loses them as it loses any commit since the last checkpoint,
//! and the log holds their entries. Writes never wait past a checkpoint, a snapshot
//! installed, a log compaction or a defragmentation's start, and the server commits
//! them at every tick and before the database is read for a backup or a hash.
//!
//! Installing a snapshot from the leader replaces every table but `meta` with the
//! snapshot's image in one durable transaction that also names the next log segment
//! as the log's first; then the log is begun afresh in that segment. A crash between
//! the two leaves old segments that the next start-up deletes unread.
//!
//! A data directory of format 1 (the log in `raft_log`) is converted at start-up:
//! the log is written to a fresh segment and synced, and then `raft_log` is emptied.
//!
//! Defragmentation ([`DiskStorage::defrag_begin`], [`DefragCopy::run`],
//! [`DiskStorage::defrag_finish`]) writes a compact copy to `chorus.redb.defrag` from
//! one read transaction while the writer goes on, writes the batches persisted
//! meanwhile into it, and renames it over `chorus.redb`. A copy left by a crash is
//! deleted at start-up; the database itself is never written in place.
//!
//! The same code runs on any redb [`StorageBackend`] and any [`wal::WalDir`]:
//! [`DiskStorage::open`] uses files, and the simulator opens a [`sim_disk::SimDisk`]
//! with [`DiskStorage::open_with_backend`].

pub mod sim_disk;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chorus_core::limits::{DEFERRED_BYTES_MAX, DEFERRED_CYCLES_MAX, DEFRAG_RECORDED_BYTES_MAX};
use chorus_core::mvcc::MvccStore;
use chorus_core::node::{PersistBatch, Recovered};
use chorus_proto::chorus::v1::{MemberAttributes, StateImage};
use chorus_proto::etcdserverpb::AlarmResponse;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const MEMBERS: TableDefinition<u64, &[u8]> = TableDefinition::new("members");
const APPLIED_PROPOSALS: TableDefinition<(u64, u64), ()> = TableDefinition::new("applied_proposals");
const LEASES: TableDefinition<i64, &[u8]> = TableDefinition::new("leases");

/// The on-disk format this build writes and reads (it converts format 1).
pub const FORMAT_VERSION: u64 = 2;
/// A checkpoint (a durable database commit) every this many commits...
pub const CHECKPOINT_COMMITS: u32 = 1000;
/// ...or once this many bytes were appended to the log since the last one.
pub const CHECKPOINT_LOG_BYTES: u64 = 32 * 1024 * 1024;
/// The database file's name inside `<data-dir>/member/`.
pub const DB_FILE_NAME: &str = "chorus.redb";

/// Which cluster and member a data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// Why storage could not be opened or written. Every variant's message is one line
/// that names the path and says what is wrong, for an operator to act on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data directory {path} is unreadable: {error}")]
    Unreadable { path: PathBuf, error: std::io::Error },
    #[error("data directory {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "data directory {path} belongs to cluster {found:016x}, not to this cluster \
         {expected:016x} (check --initial-cluster and --initial-cluster-token, or use \
         another --data-dir)"
    )]
    WrongCluster { path: PathBuf, found: u64, expected: u64 },
    #[error(
        "data directory {path} belongs to member {found:016x}, not to this member \
         {expected:016x} (check --name and --initial-advertise-peer-urls)"
    )]
    WrongMember { path: PathBuf, found: u64, expected: u64 },
    #[error(
        "data directory {path} was written by format version {found}; this build reads {FORMAT_VERSION}"
    )]
    WrongFormat { path: PathBuf, found: u64 },
    #[error("data directory {path} is in use by another chorus process")]
    InUse { path: PathBuf },
    #[error("storage failure in {path}: {detail}")]
    Io { path: PathBuf, detail: String },
}

/// A node's storage: one redb database.
pub struct DiskStorage {
    db: std::sync::Arc<Database>,
    /// The database [`ImageReader`]s read, on other threads: `db`, replaced when a
    /// defragmentation swaps in the compacted copy.
    shared: SharedDb,
    /// Names the database in error messages: the file's path, or the label given to
    /// [`DiskStorage::open_with_backend`] (such as `sim://node2`).
    path: PathBuf,
    size: SizeSource,
    /// Bytes of the records held (kv records, keys included),
    /// without redb's own overhead: the size "in use".
    stored_bytes: u64,
    /// A defragmentation copying the database on another thread, if one runs.
    defrag: Option<DefragRunning>,
    /// The raft log (None only while opening).
    wal: Option<wal::Wal>,
    /// The log's compaction point as the database records it, and as its last
    /// durable commit records it (the log's segments up to it may go).
    log_snapshot_index: u64,
    durable_log_snapshot_index: u64,
    /// Database commits since the last durable one, and the log's size then.
    commits_since_checkpoint: u32,
    /// A checkpoint every this many commits ([`CHECKPOINT_COMMITS`]).
    checkpoint_commits: u32,
    /// [`DEFRAG_RECORDED_BYTES_MAX`], lower in tests.
    defrag_recorded_bytes_max: u64,
    log_bytes_at_checkpoint: u64,
    /// The applied index the last database commit wrote (None until the first,
    /// and after a defragmentation swapped the file): a batch that would write
    /// only the same again is not committed (see [`unchanged`]).
    applied_index_written: Option<u64>,
    /// Cycles whose log frame is written but whose database writes wait, to be
    /// committed in one transaction with later ones ([`DiskStorage::persist_deferring`]).
    deferred: Vec<PersistBatch>,
    /// Their bytes of records ([`batch_bytes`]).
    deferred_bytes: u64,
    /// At most this many wait ([`DEFERRED_CYCLES_MAX`]; 0: none ever does).
    deferred_max: usize,
}

type SharedDb = std::sync::Arc<std::sync::RwLock<std::sync::Arc<Database>>>;

/// What the writer keeps while a defragmentation's copy is made: every batch
/// persisted since the copy's read transaction began, to write into the copy too.
struct DefragRunning {
    recorded: Recorded,
    target: PathBuf,
    /// Bytes of the batches recorded so far (their key-space and lease records).
    recorded_bytes: u64,
    /// Set when the recorded batches passed [`DiskStorage::defrag_recorded_bytes_max`]:
    /// nothing more is recorded, the copy stops at its next check, and the
    /// defragmentation ends in an error, the database unchanged.
    abandoned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Batches persisted since a defragmentation's read transaction began, in order:
/// the writer appends, the copy thread takes them from the front.
type Recorded = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<PersistBatch>>>;

/// Where [`DiskStorage::size_bytes`] reads the database's size from.
enum SizeSource {
    /// The file at `DiskStorage::path`.
    File,
    /// A handle sharing the storage that redb was given.
    Backend(Box<dyn StorageBackend>),
}

/// What [`DiskStorage::open`] hands back.
pub struct Opened {
    pub storage: DiskStorage,
    pub recovered: Recovered,
    /// Counts the times this data directory was opened; distinguishes boots.
    pub boot_count: u64,
    /// Whether the data directory was created by this call.
    pub created: bool,
}

impl DiskStorage {
    /// Opens (or creates) the data directory for `identity` and reads back
    /// everything persisted in it.
    pub fn open(data_dir: &Path, identity: Identity) -> Result<Opened, StorageError> {
        let member_dir = data_dir.join("member");
        std::fs::create_dir_all(&member_dir)
            .map_err(|source| StorageError::Unreadable { path: data_dir.to_path_buf(), error: source })?;
        let path = member_dir.join(DB_FILE_NAME);
        // A defragmentation cut off by a crash leaves its unfinished copy behind;
        // the database itself was never touched.
        let leftover = defrag_target(&path);
        if leftover.exists() {
            std::fs::remove_file(&leftover)
                .map_err(|error| StorageError::Unreadable { path: leftover.clone(), error })?;
        }
        let created = !path.exists();
        let db = open_database(&path, created)?;
        let wal_path = member_dir.join("wal");
        let wal_dir = wal::FsWalDir::new(&wal_path)
            .map_err(|error| StorageError::Unreadable { path: wal_path, error })?;
        DiskStorage::new(db, path, SizeSource::File).finish_open(identity, created, Box::new(wal_dir))
    }

    /// The identity a data directory records, if it has a database (None for a
    /// new directory). Used by a member joining a cluster, which learns its cluster
    /// id from its peers only the first time.
    pub fn stored_identity(data_dir: &Path) -> Result<Option<Identity>, StorageError> {
        let path = data_dir.join("member").join(DB_FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        let db = open_database(&path, false)?;
        let io = |e: &dyn std::fmt::Display| StorageError::Io { path: path.clone(), detail: e.to_string() };
        let txn = db.begin_read().map_err(|e| io(&e))?;
        let meta = txn.open_table(META).map_err(|e| io(&e))?;
        let read = |name: &str| -> Result<Option<u64>, StorageError> {
            Ok(meta.get(name).map_err(|e| io(&e))?.and_then(|v| decode_u64(v.value())))
        };
        match (read("cluster_id")?, read("member_id")?) {
            (Some(cluster_id), Some(member_id)) => Ok(Some(Identity { cluster_id, member_id })),
            _ => Ok(None),
        }
    }

    /// Opens (or, when `backend` is empty, creates) the database on `backend` for
    /// `identity` and reads back everything persisted in it, as [`DiskStorage::open`]
    /// does for a file. `label` stands for the path in error messages. `backend` is
    /// cloned to read its length for [`DiskStorage::size_bytes`], so a clone must
    /// share the storage, as a [`sim_disk::SimBackend`]'s clone does.
    pub fn open_with_backend<B: StorageBackend + Clone>(
        backend: B,
        wal_dir: impl wal::WalDir + 'static,
        label: &str,
        identity: Identity,
    ) -> Result<Opened, StorageError> {
        let path = PathBuf::from(label);
        let length_bytes = backend.len();
        let length_bytes =
            length_bytes.map_err(|source| StorageError::Unreadable { path: path.clone(), error: source })?;
        let size = SizeSource::Backend(Box::new(backend.clone()));
        let db = builder().create_with_backend(backend);
        let db = db.map_err(|error| database_error(&path, error))?;
        DiskStorage::new(db, path, size).finish_open(identity, length_bytes == 0, Box::new(wal_dir))
    }

    fn new(db: Database, path: PathBuf, size: SizeSource) -> DiskStorage {
        let db = std::sync::Arc::new(db);
        let shared = std::sync::Arc::new(std::sync::RwLock::new(db.clone()));
        DiskStorage {
            db,
            shared,
            path,
            size,
            stored_bytes: 0,
            defrag: None,
            wal: None,
            log_snapshot_index: 0,
            durable_log_snapshot_index: 0,
            commits_since_checkpoint: 0,
            checkpoint_commits: CHECKPOINT_COMMITS,
            defrag_recorded_bytes_max: DEFRAG_RECORDED_BYTES_MAX,
            log_bytes_at_checkpoint: 0,
            applied_index_written: None,
            deferred: Vec::new(),
            deferred_bytes: 0,
            deferred_max: DEFERRED_CYCLES_MAX,
        }
    }

    /// The part of opening that is the same for every backend: check (or record) the
    /// identity, count the boot, and read everything back.
    fn finish_open(
        mut self,
        identity: Identity,
        created: bool,
        wal_dir: Box<dyn wal::WalDir>,
    ) -> Result<Opened, StorageError> {
        let boot_count = self.check_identity(identity, created)?;
        let (mut recovered, stored_bytes, first_seq) = self.recover()?;
        self.stored_bytes = stored_bytes;
        let wal_label = wal_dir.label();
        let (mut log, mut from_log) =
            wal::Wal::open(wal_dir, first_seq).map_err(|e| wal_error(&wal_label, e))?;
        if from_log.torn_bytes > 0 {
            // An unacknowledged frame cut short by a crash: expected, but worth a line.
            eprintln!(
                "chorus: {}: dropped a log frame cut short by a crash ({} bytes, never acknowledged)",
                wal_label.display(),
                from_log.torn_bytes
            );
        }
        self.convert_format_1(&mut log, &mut from_log)?;
        let snapshot_index = recovered.log_snapshot.0;
        let mut entries = from_log.entries;
        entries.retain(|e| e.index > snapshot_index);
        if let Some(hard_state) = from_log.hard_state {
            recovered.hard_state = hard_state;
        }
        if let Some(first) = entries.first() {
            if first.index != snapshot_index + 1 {
                return Err(self.corrupt(format!(
                    "the log ({}) starts at index {}, but entries up to {snapshot_index} were compacted",
                    wal_label.display(),
                    first.index
                )));
            }
        }
        let last_index = entries.last().map_or(snapshot_index, |e| e.index);
        if recovered.applied_index > last_index {
            return Err(self.corrupt(format!(
                "applied index {} is past the last log entry {last_index} (log in {})",
                recovered.applied_index,
                wal_label.display()
            )));
        }
        // The log's hard state may be older than the database's last checkpoint
        // (a frame not yet synced); everything applied was committed.
        recovered.hard_state.commit = recovered.hard_state.commit.max(recovered.applied_index);
        if recovered.hard_state.commit > last_index {
            return Err(self.corrupt(format!(
                "commit index {} is past the last log entry {last_index} (log in {})",
                recovered.hard_state.commit,
                wal_label.display()
            )));
        }
        recovered.entries = entries;
        self.log_snapshot_index = snapshot_index;
        self.durable_log_snapshot_index = snapshot_index;
        self.log_bytes_at_checkpoint = log.appended_bytes;
        self.wal = Some(log);
        Ok(Opened { storage: self, recovered, boot_count, created })
    }

    /// Moves a format-1 log (in the `raft_log` table) into the write-ahead log:
    /// appended as one synced frame (unless an earlier, interrupted conversion
    /// already did), then the table is emptied.
    fn convert_format_1(
        &mut self,
        log: &mut wal::Wal,
        from_log: &mut wal::WalRecovered,
    ) -> Result<(), StorageError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let (entries, _) = self.read_log(&txn)?;
        if entries.is_empty() {
            return Ok(());
        }
        let meta = txn.open_table(META).map_err(|e| self.io(e))?;
        let hard_state = match meta.get("hard_state").map_err(|e| self.io(e))? {
            Some(bytes) => HardState::parse_from_bytes(bytes.value())
                .map_err(|e| self.corrupt(format!("hard state: {e}")))?,
            None => HardState::default(),
        };
        drop(meta);
        drop(txn);
        if from_log.entries.is_empty() && from_log.hard_state.is_none() {
            let label = self.path.clone();
            log.append(&entries, &hard_state, true).map_err(|e| wal_error(&label, e))?;
            from_log.entries = entries;
            from_log.hard_state = Some(hard_state);
        }
        let applied = self.recover_applied_index()?;
        let applied_term = from_log.entries.iter().find(|e| e.index == applied).map(|e| e.term);
        let mut txn = self.db.begin_write().map_err(|e| self.io(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
        {
            let mut table = txn.open_table(RAFT_LOG).map_err(|e| self.io(e))?;
            table.retain(|_, _| false).map_err(|e| self.io(e))?;
            if let Some(term) = applied_term {
                let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
                meta.insert("applied_term", term.to_be_bytes().as_slice()).map_err(|e| self.io(e))?;
            }
        }
        txn.commit().map_err(|e| self.io(e))
    }

    fn recover_applied_index(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let meta = txn.open_table(META).map_err(|e| self.io(e))?;
        let value = meta.get("applied_index").map_err(|e| self.io(e))?;
        Ok(value.and_then(|v| decode_u64(v.value())).unwrap_or(0))
    }

    fn log(&mut self) -> &mut wal::Wal {
        self.wal.as_mut().expect("the log is open")
    }

    /// Writes one cycle's batch: its entries and hard state to the log (synced when
    /// the batch says so), then everything else in one database transaction, which
    /// is durable only at a checkpoint (see the module documentation).
    pub fn persist(&mut self, batch: &PersistBatch) -> Result<(), StorageError> {
        match self.append_to_log(batch)? {
            Some(checkpoint) => self.commit_database(Some(batch), checkpoint),
            None => Ok(()),
        }
    }

    /// [`DiskStorage::persist`], except that the database writes may wait, to be
    /// committed in one transaction with those of the next cycles: a commit costs
    /// about as much as the writes of a dozen puts (it rewrites the B-trees' paths
    /// and the allocator's state), and under load a cycle holds few writes. Nothing
    /// is less safe for it: like every commit between checkpoints, a waiting write
    /// is lost in a crash and made again from the log. The log frame is written (and
    /// synced) at once as always. Writes wait until [`DEFERRED_CYCLES_MAX`] cycles or
    /// [`DEFERRED_BYTES_MAX`] bytes are waiting, a checkpoint, a snapshot installed, a
    /// log compaction (so that an image read from the database never predates the
    /// log's first entry), a defragmentation, or [`DiskStorage::flush`], which the
    /// driver calls at every tick and before a backup is read.
    pub fn persist_deferring(&mut self, batch: PersistBatch) -> Result<(), StorageError> {
        let Some(checkpoint) = self.append_to_log(&batch)? else { return Ok(()) };
        let bytes = batch_bytes(&batch);
        let defer = !checkpoint
            && self.deferred.len() + 1 < self.deferred_max
            && self.deferred_bytes + bytes <= DEFERRED_BYTES_MAX
            && batch.install.is_none()
            && batch.log_compacted_to.is_none();
        if !defer {
            return self.commit_database(Some(&batch), checkpoint);
        }
        self.record_for_defrag(&batch);
        self.applied_index_written = Some(batch.applied_index);
        self.deferred_bytes += bytes;
        self.deferred.push(batch);
        Ok(())
    }

    /// Commits the database writes still waiting (see [`DiskStorage::persist_deferring`]).
    pub fn flush(&mut self) -> Result<(), StorageError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        self.commit_database(None, false)
    }

    /// Cycles whose database writes are waiting.
    pub fn deferred_cycles(&self) -> usize {
        self.deferred.len()
    }

    /// Lets at most `cycles` cycles' database writes wait (0: none; the simulator
    /// varies it).
    pub fn set_deferred_max(&mut self, cycles: usize) {
        self.deferred_max = cycles;
    }

    /// The log half of a cycle's write: installs a snapshot if the batch carries
    /// one, appends the frame, and says whether the database must be written too
    /// (None: the cycle changed nothing there) and if so, whether as a checkpoint.
    fn append_to_log(&mut self, batch: &PersistBatch) -> Result<Option<bool>, StorageError> {
        let wal_label = self.path.with_file_name("wal");
        if let Some(image) = &batch.install {
            // Writes waiting predate the image, which replaces them.
            self.flush()?;
            // The image, durably, naming the segment the log begins afresh in.
            let mut txn = self.db.begin_write().map_err(|e| self.io(e))?;
            txn.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
            self.stored_bytes = write_image(&self.path, &txn, image)?;
            {
                let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
                let next = self.log().next_seq();
                meta.insert("wal_first_seq", next.to_be_bytes().as_slice()).map_err(|e| self.io(e))?;
                let bytes = batch.hard_state.write_to_bytes().expect("encode hard state");
                meta.insert("hard_state", bytes.as_slice()).map_err(|e| self.io(e))?;
                let term = image.applied_term.to_be_bytes();
                meta.insert("applied_term", term.as_slice()).map_err(|e| self.io(e))?;
            }
            txn.commit().map_err(|e| self.io(e))?;
            self.log().reset().map_err(|e| wal_error(&wal_label, e))?;
            self.log_snapshot_index = image.applied_index;
            self.durable_log_snapshot_index = image.applied_index;
            self.commits_since_checkpoint = 0;
            self.log_bytes_at_checkpoint = self.log().appended_bytes;
        }
        let log = self.wal.as_mut().expect("the log is open");
        log.append(&batch.entries, &batch.hard_state, batch.must_sync)
            .map_err(|e| wal_error(&wal_label, e))?;
        // A cycle that only exchanged messages (heartbeats, read-index rounds)
        // would give the database the same applied index again: it is not
        // committed, but counts towards the next checkpoint while commits since
        // the last one wait for it, so that an idle member makes them durable too.
        let idle = batch.install.is_none()
            && self.applied_index_written == Some(batch.applied_index)
            && unchanged(batch);
        if idle && self.commits_since_checkpoint == 0 {
            return Ok(None);
        }
        self.commits_since_checkpoint += 1;
        let checkpoint = self.commits_since_checkpoint >= self.checkpoint_commits
            || log.appended_bytes - self.log_bytes_at_checkpoint >= CHECKPOINT_LOG_BYTES;
        if idle && !checkpoint {
            return Ok(None);
        }
        Ok(Some(checkpoint))
    }

    /// Commits the waiting database writes and then `batch`'s in one transaction,
    /// durable when it is a checkpoint (after syncing the log: nothing the database
    /// records as applied may be missing from the log after a crash).
    fn commit_database(
        &mut self,
        batch: Option<&PersistBatch>,
        checkpoint: bool,
    ) -> Result<(), StorageError> {
        let wal_label = self.path.with_file_name("wal");
        if checkpoint {
            self.log().sync().map_err(|e| wal_error(&wal_label, e))?;
        }
        let mut stored = self.stored_bytes;
        let mut txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let durability = if checkpoint { Durability::Immediate } else { Durability::None };
        txn.set_durability(durability).map_err(|e| self.io(e))?;
        let deferred = std::mem::take(&mut self.deferred);
        self.deferred_bytes = 0;
        write_batches(&self.path, &txn, deferred.iter().chain(batch), &mut stored)?;
        txn.commit().map_err(|e| self.io(e))?;
        self.stored_bytes = stored;
        if let Some(last) = batch.or(deferred.last()) {
            self.applied_index_written = Some(last.applied_index);
        }
        // A batch that compacts the log never waits, so only `batch` can carry one.
        if let Some((index, _)) = batch.and_then(|b| b.log_compacted_to) {
            self.log_snapshot_index = self.log_snapshot_index.max(index);
        }
        if checkpoint {
            self.commits_since_checkpoint = 0;
            self.durable_log_snapshot_index = self.log_snapshot_index;
            let index = self.durable_log_snapshot_index;
            let log = self.wal.as_mut().expect("the log is open");
            self.log_bytes_at_checkpoint = log.appended_bytes;
            log.release(index).map_err(|e| wal_error(&wal_label, e))?;
        }
        if let Some(batch) = batch {
            self.record_for_defrag(batch);
        }
        Ok(())
    }

    /// Keeps `batch` for the defragmentation's copy, if one is being made.
    fn record_for_defrag(&mut self, batch: &PersistBatch) {
        if let Some(defrag) = &mut self.defrag {
            use std::sync::atomic::Ordering;
            if !defrag.abandoned.load(Ordering::Acquire) {
                defrag.recorded_bytes += batch_bytes(batch);
                let mut recorded = defrag.recorded.lock().expect("recorded batches");
                if defrag.recorded_bytes > self.defrag_recorded_bytes_max {
                    defrag.abandoned.store(true, Ordering::Release);
                    recorded.clear();
                } else {
                    recorded.push_back(batch.clone());
                }
            }
        }
    }

    /// Sets the most bytes of batches a defragmentation keeps (tests use a small one).
    pub fn set_defrag_recorded_bytes_max(&mut self, bytes: u64) {
        self.defrag_recorded_bytes_max = bytes;
    }

    /// Checkpoints every `commits` commits and rolls log segments at
    /// `segment_bytes` (the simulator makes both small, to exercise them).
    pub fn set_tuning(&mut self, commits: u32, segment_bytes: u64) {
        self.checkpoint_commits = commits.max(1);
        self.log().set_segment_bytes(segment_bytes);
    }

    /// Makes everything persisted so far durable in the database (a checkpoint),
    /// so that a start-up replays nothing; a clean shutdown calls it.
    pub fn checkpoint(&mut self) -> Result<(), StorageError> {
        self.commit_database(None, true)
    }

    /// Writes `image` as the whole state of a fresh data directory, with `hard_state`:
    /// what `chorus snapshot restore` does to bootstrap a member of a new cluster
    /// from a backup. Durable when it returns.
    pub fn bootstrap_from_image(
        &mut self,
        image: &StateImage,
        hard_state: &HardState,
    ) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().map_err(|e| self.io(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
        self.stored_bytes = write_image(&self.path, &txn, image)?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
            let bytes = hard_state.write_to_bytes().expect("encode hard state");
            meta.insert("hard_state", bytes.as_slice()).map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))
    }

    /// A handle that reads images of the last committed state on another thread,
    /// while this storage goes on writing (redb's read transactions are snapshots).
    pub fn image_reader(&self) -> ImageReader {
        ImageReader { db: self.shared.clone(), path: self.path.clone() }
    }

    /// The database's size on disk, in bytes (0 when it cannot be read).
    pub fn size_bytes(&self) -> u64 {
        match &self.size {
            SizeSource::File => std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
            SizeSource::Backend(backend) => backend.len().unwrap_or(0),
        }
    }

    /// The bytes of the records the database holds (kv records,
    /// keys included), without redb's page overhead and free space: etcd's
    /// `dbSizeInUse`, what a defragmentation could shrink the file towards.
    pub fn size_in_use_bytes(&self) -> u64 {
        self.stored_bytes.min(self.size_bytes().max(self.stored_bytes))
    }

    /// Starts a defragmentation: from now on every batch persisted is also kept,
    /// and the returned copy (run it on another thread) writes the state as of
    /// now into a fresh file next to the database. [`DiskStorage::defrag_finish`]
    /// then writes the batches kept into the copy and swaps it in. The member goes
    /// on reading and writing the old file meanwhile.
    pub fn defrag_begin(&mut self) -> Result<DefragCopy, StorageError> {
        if !matches!(self.size, SizeSource::File) {
            return Err(self.io("defragmentation needs a database file"));
        }
        if self.defrag.is_some() {
            return Err(self.io("a defragmentation is already running"));
        }
        let target = defrag_target(&self.path);
        if target.exists() {
            std::fs::remove_file(&target)
                .map_err(|e| self.io(format!("removing {}: {e}", target.display())))?;
        }
        // The copy starts from the database as committed: nothing may wait.
        self.flush()?;
        let read = self.db.begin_read().map_err(|e| self.io(e))?;
        let recorded = Recorded::default();
        let abandoned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.defrag = Some(DefragRunning {
            recorded: recorded.clone(),
            target: target.clone(),
            recorded_bytes: 0,
            abandoned: abandoned.clone(),
        });
        Ok(DefragCopy { read, target, recorded, path: self.path.clone(), abandoned })
    }

    /// Ends the defragmentation begun with [`DiskStorage::defrag_begin`]: with the
    /// copy made, writes the batches persisted since into it, durably, and makes
    /// it the database (an atomic rename); the old file is gone once the last
    /// reader still in it finishes. When the copy failed, removes it and answers
    /// its error; the database is unchanged either way.
    pub fn defrag_finish(
        &mut self,
        copied: Result<DefragCopied, StorageError>,
    ) -> Result<DefragReport, StorageError> {
        let Some(running) = self.defrag.take() else {
            return Err(self.io("no defragmentation is running"));
        };
        let discard = |error: StorageError| {
            let _ = std::fs::remove_file(&running.target);
            error
        };
        if running.abandoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(discard(self.io(format!(
                "defragmentation abandoned: more than {} MiB were written while the copy was made, \
                 more than it keeps in memory; retry when the write load is lower",
                self.defrag_recorded_bytes_max >> 20
            ))));
        }
        let copied = copied.map_err(discard)?;
        let size_before = self.size_bytes();
        let tail: Vec<PersistBatch> = running.recorded.lock().expect("recorded batches").drain(..).collect();
        let replayed = copied.replayed + tail.len();
        let written = (|| {
            let mut txn = copied.db.begin_write().map_err(|e| self.io(e))?;
            txn.set_durability(Durability::Immediate).map_err(|e| self.io(e))?;
            let mut ignored = 0;
            for batch in &tail {
                write_replayed(&self.path, &txn, batch, &mut ignored)?;
            }
            txn.commit().map_err(|e| self.io(e))?;
            std::fs::rename(&running.target, &self.path).map_err(|e| {
                self.io(format!("renaming {} over the database: {e}", running.target.display()))
            })?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| self.io(format!("syncing {}: {e}", dir.display())))?;
            }
            Ok(())
        })();
        written.map_err(discard)?;
        let old = std::mem::replace(&mut self.db, std::sync::Arc::new(copied.db));
        self.applied_index_written = None;
        // Every write still waiting was recorded, so the copy has it.
        self.deferred.clear();
        self.deferred_bytes = 0;
        *self.shared.write().expect("shared database") = self.db.clone();
        // Closing a large database writes its allocator state and syncs (about a
        // second for gigabytes): not on the writer's time. Nothing in it is needed
        // any more; a crash before it closes loses nothing. (Should the thread not
        // start, it is closed here.)
        let _ = std::thread::Builder::new().name("chorus-defrag-close".into()).spawn(move || drop(old));
        Ok(DefragReport {
            size_before,
            size_after: self.size_bytes(),
            batches_replayed: replayed,
            batches_replayed_at_swap: tail.len(),
        })
    }

    /// Whether a defragmentation's copy is being made.
    pub fn defrag_running(&self) -> bool {
        self.defrag.is_some()
    }

    /// The database file's path, or the label of the backend it was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, error: impl std::fmt::Display) -> StorageError {
        StorageError::Io { path: self.path.clone(), detail: error.to_string() }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StorageError {
        StorageError::Corrupt { path: self.path.clone(), detail: detail.into() }
    }

    /// Checks (or, for a new directory, records) which cluster and member the data
    /// belongs to, and counts this boot. Returns the boot count.
    fn check_identity(&self, identity: Identity, created: bool) -> Result<u64, StorageError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let boot_count;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
            let read = |meta: &redb::Table<&str, &[u8]>, name: &str| -> Result<Option<u64>, StorageError> {
                let value = meta.get(name).map_err(|e| self.io(e))?;
                value
                    .map(|v| {
                        decode_u64(v.value()).ok_or_else(|| self.corrupt(format!("meta {name} is malformed")))
                    })
                    .transpose()
            };
            match read(&meta, "format_version")? {
                // Format 1 is converted once the log is open.
                Some(1) | Some(FORMAT_VERSION) => {}
                Some(found) => return Err(StorageError::WrongFormat { path: self.path.clone(), found }),
                None if created => {}
                None => return Err(self.corrupt("no format version: not a chorus data directory")),
            }
            if let Some(found) = read(&meta, "cluster_id")? {
                if found != identity.cluster_id {
                    let path = self.path.clone();
                    return Err(StorageError::WrongCluster { path, found, expected: identity.cluster_id });
                }
            }
            if let Some(found) = read(&meta, "member_id")? {
                if found != identity.member_id {
                    let path = self.path.clone();
                    return Err(StorageError::WrongMember { path, found, expected: identity.member_id });
                }
            }
            boot_count = read(&meta, "boot_count")?.unwrap_or(0) + 1;
            let writes = [
                ("format_version", FORMAT_VERSION),
                ("cluster_id", identity.cluster_id),
                ("member_id", identity.member_id),
                ("boot_count", boot_count),
            ];
            for (name, value) in writes {
                meta.insert(name, value.to_be_bytes().as_slice()).map_err(|e| self.io(e))?;
            }
            txn.open_table(RAFT_LOG).map_err(|e| self.io(e))?;
            txn.open_table(KV).map_err(|e| self.io(e))?;
            txn.open_table(MEMBERS).map_err(|e| self.io(e))?;
            txn.open_table(APPLIED_PROPOSALS).map_err(|e| self.io(e))?;
            txn.open_table(LEASES).map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))?;
        Ok(boot_count)
    }

    /// Everything the database holds (the log is read by the caller), the bytes
    /// of its records, and the log's first segment.
    fn recover(&self) -> Result<(Recovered, u64, u64), StorageError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let meta = txn.open_table(META).map_err(|e| self.io(e))?;
        let meta_bytes = |name: &str| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(meta.get(name).map_err(|e| self.io(e))?.map(|v| v.value().to_vec()))
        };
        let mut recovered = Recovered::default();
        if let Some(bytes) = meta_bytes("hard_state")? {
            recovered.hard_state =
                HardState::parse_from_bytes(&bytes).map_err(|e| self.corrupt(format!("hard state: {e}")))?;
        }
        if let Some(bytes) = meta_bytes("conf_state")? {
            recovered.conf_state =
                ConfState::parse_from_bytes(&bytes).map_err(|e| self.corrupt(format!("conf state: {e}")))?;
        }
        if let Some(bytes) = meta_bytes("applied_index")? {
            recovered.applied_index =
                decode_u64(&bytes).ok_or_else(|| self.corrupt("applied index is malformed"))?;
        }
        let compact_revision = match meta_bytes("compact_revision")? {
            Some(bytes) => {
                decode_u64(&bytes).ok_or_else(|| self.corrupt("compact revision is malformed"))? as i64
            }
            None => 0,
        };
        let read_u64 = |name: &str| -> Result<u64, StorageError> {
            match meta_bytes(name)? {
                Some(bytes) => {
                    decode_u64(&bytes).ok_or_else(|| self.corrupt(format!("meta {name} is malformed")))
                }
                None => Ok(0),
            }
        };
        recovered.log_snapshot = (read_u64("log_snapshot_index")?, read_u64("log_snapshot_term")?);
        if let Some(bytes) = meta_bytes("alarms")? {
            let alarms =
                AlarmResponse::decode(bytes.as_slice()).map_err(|e| self.corrupt(format!("alarms: {e}")))?;
            recovered.alarms = alarms.alarms;
        }
        let first_seq = read_u64("wal_first_seq")?.max(1);
        let mut stored_bytes = 0u64;
        let snapshot_index = recovered.log_snapshot.0;
        if recovered.applied_index < snapshot_index {
            return Err(self.corrupt(format!(
                "applied index {} is before the compacted log's start {snapshot_index}",
                recovered.applied_index
            )));
        }
        let kv = txn.open_table(KV).map_err(|e| self.io(e))?;
        let mut records = Vec::new();
        for item in kv.iter().map_err(|e| self.io(e))? {
            let (key, value) = item.map_err(|e| self.io(e))?;
            let key: [u8; 17] =
                key.value().try_into().map_err(|_| self.corrupt("a kv record key is not 17 bytes"))?;
            stored_bytes += (key.len() + value.value().len()) as u64;
            records.push((key, value.value().to_vec()));
        }
        recovered.mvcc = MvccStore::restore(records, compact_revision)
            .map_err(|e| self.corrupt(format!("kv records: {e}")))?;
        let members = txn.open_table(MEMBERS).map_err(|e| self.io(e))?;
        let mut by_id = BTreeMap::new();
        for item in members.iter().map_err(|e| self.io(e))? {
            let (id, value) = item.map_err(|e| self.io(e))?;
            let member = MemberAttributes::decode(value.value())
                .map_err(|e| self.corrupt(format!("member {:016x}: {e}", id.value())))?;
            by_id.insert(id.value(), member);
        }
        recovered.members = by_id;
        let proposals = txn.open_table(APPLIED_PROPOSALS).map_err(|e| self.io(e))?;
        for item in proposals.iter().map_err(|e| self.io(e))? {
            let (key, _) = item.map_err(|e| self.io(e))?;
            let (proposer, tag) = key.value();
            recovered.applied_proposals.entry(proposer).or_default().insert(tag);
        }
        let leases = txn.open_table(LEASES).map_err(|e| self.io(e))?;
        let mut records = Vec::new();
        for item in leases.iter().map_err(|e| self.io(e))? {
            let (id, record) = item.map_err(|e| self.io(e))?;
            records.push((id.value(), record.value().to_vec()));
        }
        recovered.leases = chorus_core::lease::LeaseStore::restore(records, &recovered.mvcc)
            .map_err(|e| self.corrupt(format!("leases: {e}")))?;
        Ok((recovered, stored_bytes, first_seq))
    }

    /// The log's entries, and their bytes as stored.
    fn read_log(&self, txn: &redb::ReadTransaction) -> Result<(Vec<Entry>, u64), StorageError> {
        let log = txn.open_table(RAFT_LOG).map_err(|e| self.io(e))?;
        let mut entries: Vec<Entry> = Vec::new();
        let mut stored_bytes = 0u64;
        for item in log.iter().map_err(|e| self.io(e))? {
            let (index, value) = item.map_err(|e| self.io(e))?;
            stored_bytes += 8 + value.value().len() as u64;
            let entry = Entry::parse_from_bytes(value.value())
                .map_err(|e| self.corrupt(format!("log entry {}: {e}", index.value())))?;
            if entry.index != index.value() {
                return Err(self.corrupt(format!(
                    "log entry stored at {} says index {}",
                    index.value(),
                    entry.index
                )));
            }
            if let Some(previous) = entries.last() {
                if entry.index != previous.index + 1 {
                    return Err(self.corrupt(format!("log has a gap after index {}", previous.index)));
                }
            }
            entries.push(entry);
        }
        Ok((entries, stored_bytes))
    }
}

/// Whether `batch` holds nothing for the database beyond its applied index (and
/// that index's term, which goes with it).
fn unchanged(batch: &PersistBatch) -> bool {
    batch.writes.is_empty()
        && batch.leases.is_empty()
        && batch.log_compacted_to.is_none()
        && batch.conf_state.is_none()
        && batch.alarms.is_none()
        && batch.members.is_empty()
        && batch.members_removed.is_empty()
        && batch.proposals_applied.is_empty()
        && batch.proposals_forgotten.is_empty()
}

/// Writes `batches` inside `txn`, in order, counting the bytes of records written
/// and removed in `stored`. Each table is opened once for all of them. An image a
/// batch installs is not written here (see [`write_replayed`]).
fn write_batches<'a>(
    path: &Path,
    txn: &redb::WriteTransaction,
    batches: impl Iterator<Item = &'a PersistBatch>,
    stored: &mut u64,
) -> Result<(), StorageError> {
    let io = |e: &dyn std::fmt::Display| io_error(path, e);
    let batches: Vec<&PersistBatch> = batches.collect();
    {
        let mut meta = txn.open_table(META).map_err(|e| io(&e))?;
        for batch in &batches {
            if let Some((index, term)) = batch.log_compacted_to {
                meta.insert("log_snapshot_index", index.to_be_bytes().as_slice()).map_err(|e| io(&e))?;
                meta.insert("log_snapshot_term", term.to_be_bytes().as_slice()).map_err(|e| io(&e))?;
            }
            if let Some(conf_state) = &batch.conf_state {
                let bytes = conf_state.write_to_bytes().expect("encode conf state");
                meta.insert("conf_state", bytes.as_slice()).map_err(|e| io(&e))?;
            }
            if let Some(alarms) = &batch.alarms {
                let bytes = AlarmResponse { header: None, alarms: alarms.clone() }.encode_to_vec();
                meta.insert("alarms", bytes.as_slice()).map_err(|e| io(&e))?;
            }
            if let Some(revision) = batch.writes.compact_revision {
                let bytes = revision.to_be_bytes();
                meta.insert("compact_revision", bytes.as_slice()).map_err(|e| io(&e))?;
            }
        }
        // Written once, from the last batch that has each (later ones win).
        if let Some(term) = batches.iter().rev().map(|b| b.applied_term).find(|&t| t > 0) {
            meta.insert("applied_term", term.to_be_bytes().as_slice()).map_err(|e| io(&e))?;
        }
        if let Some(last) = batches.last() {
            let applied = last.applied_index.to_be_bytes();
            meta.insert("applied_index", applied.as_slice()).map_err(|e| io(&e))?;
        }
        let mut kv = txn.open_table(KV).map_err(|e| io(&e))?;
        for batch in &batches {
            for (key, value) in &batch.writes.puts {
                *stored += (key.len() + value.len()) as u64;
                if let Some(old) = kv.insert(key.as_slice(), value.as_slice()).map_err(|e| io(&e))? {
                    *stored = stored.saturating_sub((key.len() + old.value().len()) as u64);
                }
            }
            for key in &batch.writes.removes {
                if let Some(old) = kv.remove(key.as_slice()).map_err(|e| io(&e))? {
                    *stored = stored.saturating_sub((key.len() + old.value().len()) as u64);
                }
            }
        }
        let mut members = txn.open_table(MEMBERS).map_err(|e| io(&e))?;
        let mut proposals = txn.open_table(APPLIED_PROPOSALS).map_err(|e| io(&e))?;
        let mut leases = txn.open_table(LEASES).map_err(|e| io(&e))?;
        for batch in &batches {
            for member in &batch.members {
                let bytes = member.encode_to_vec();
                members.insert(member.member_id, bytes.as_slice()).map_err(|e| io(&e))?;
            }
            for id in &batch.members_removed {
                members.remove(*id).map_err(|e| io(&e))?;
            }
            for key in &batch.proposals_applied {
                proposals.insert(*key, ()).map_err(|e| io(&e))?;
            }
            for key in &batch.proposals_forgotten {
                proposals.remove(*key).map_err(|e| io(&e))?;
            }
            for (id, record) in &batch.leases.puts {
                leases.insert(*id, record.as_slice()).map_err(|e| io(&e))?;
            }
            for id in &batch.leases.removes {
                leases.remove(*id).map_err(|e| io(&e))?;
            }
        }
    }
    Ok(())
}

/// Replaces the whole replicated state with `image`, inside `txn`: every table
/// but `meta` is emptied and refilled, the log is emptied, and `meta` records
/// the image's applied index as the applied index and the log's start.
/// Returns the bytes of the kv records written (the log is empty after it).
fn write_image(path: &Path, txn: &redb::WriteTransaction, image: &StateImage) -> Result<u64, StorageError> {
    let kv_records = chorus_core::snapshot::kv_records(image).map_err(|e| io_error(path, e))?;
    let conf_state = ConfState::parse_from_bytes(&image.conf_state)
        .map_err(|e| io_error(path, format!("conf state: {e}")))?;
    let mut log = txn.open_table(RAFT_LOG).map_err(|e| io_error(path, e))?;
    log.retain(|_, _| false).map_err(|e| io_error(path, e))?;
    let mut kv = txn.open_table(KV).map_err(|e| io_error(path, e))?;
    kv.retain(|_, _| false).map_err(|e| io_error(path, e))?;
    let mut stored = 0u64;
    for (key, value) in &kv_records {
        stored += (key.len() + value.len()) as u64;
        kv.insert(key.as_slice(), value.as_slice()).map_err(|e| io_error(path, e))?;
    }
    let mut members = txn.open_table(MEMBERS).map_err(|e| io_error(path, e))?;
    members.retain(|_, _| false).map_err(|e| io_error(path, e))?;
    for member in &image.members {
        members.insert(member.member_id, member.encode_to_vec().as_slice()).map_err(|e| io_error(path, e))?;
    }
    let mut proposals = txn.open_table(APPLIED_PROPOSALS).map_err(|e| io_error(path, e))?;
    proposals.retain(|_, _| false).map_err(|e| io_error(path, e))?;
    for proposal in &image.applied_proposals {
        proposals.insert((proposal.proposer_id, proposal.tag), ()).map_err(|e| io_error(path, e))?;
    }
    let mut leases = txn.open_table(LEASES).map_err(|e| io_error(path, e))?;
    leases.retain(|_, _| false).map_err(|e| io_error(path, e))?;
    for lease in &image.leases {
        leases.insert(lease.id, lease.record.as_slice()).map_err(|e| io_error(path, e))?;
    }
    let mut meta = txn.open_table(META).map_err(|e| io_error(path, e))?;
    let conf_state = conf_state.write_to_bytes().expect("encode conf state");
    let alarms = AlarmResponse { header: None, alarms: image.alarms.clone() }.encode_to_vec();
    let writes: [(&str, &[u8]); 6] = [
        ("alarms", &alarms),
        ("conf_state", &conf_state),
        ("applied_index", &image.applied_index.to_be_bytes()),
        ("compact_revision", &image.compact_revision.to_be_bytes()),
        ("log_snapshot_index", &image.applied_index.to_be_bytes()),
        ("log_snapshot_term", &image.applied_term.to_be_bytes()),
    ];
    for (name, value) in writes {
        meta.insert(name, value).map_err(|e| io_error(path, e))?;
    }
    Ok(stored)
}

/// Writes a batch recorded during a defragmentation into its copy: the image it
/// installs, if any, then the rest.
fn write_replayed(
    path: &Path,
    txn: &redb::WriteTransaction,
    batch: &PersistBatch,
    stored: &mut u64,
) -> Result<(), StorageError> {
    if let Some(image) = &batch.install {
        *stored = write_image(path, txn, image)?;
    }
    write_batches(path, txn, std::iter::once(batch), stored)
}

/// About how many bytes a recorded batch holds (its records; the rest is small).
fn batch_bytes(batch: &PersistBatch) -> u64 {
    let puts: usize = batch.writes.puts.iter().map(|(k, v)| k.len() + v.len()).sum();
    let removes: usize = batch.writes.removes.iter().map(|k| k.len()).sum();
    let leases: usize = batch.leases.puts.iter().map(|(_, r)| 8 + r.len()).sum();
    (256 + puts + removes + leases) as u64
}

fn wal_error(path: &Path, error: wal::WalError) -> StorageError {
    match error {
        wal::WalError::Io(detail) => StorageError::Io { path: path.to_path_buf(), detail },
        wal::WalError::Corrupt(detail) => StorageError::Corrupt { path: path.to_path_buf(), detail },
    }
}

fn io_error(path: &Path, error: impl std::fmt::Display) -> StorageError {
    StorageError::Io { path: path.to_path_buf(), detail: error.to_string() }
}

/// Where a defragmentation writes its copy of the database at `path`.
fn defrag_target(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".defrag");
    path.with_file_name(name)
}

/// The copy of a defragmentation, made on a thread of its own from one read
/// transaction of the database (see [`DiskStorage::defrag_begin`]).
pub struct DefragCopy {
    read: redb::ReadTransaction,
    target: PathBuf,
    recorded: Recorded,
    /// The database's path, for error messages of replayed batches.
    path: PathBuf,
    abandoned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A finished copy, for [`DiskStorage::defrag_finish`].
pub struct DefragCopied {
    db: Database,
    /// Batches already written into the copy by the copy thread.
    replayed: usize,
}

/// What a defragmentation did.
#[derive(Debug, Clone, Copy)]
pub struct DefragReport {
    pub size_before: u64,
    pub size_after: u64,
    /// Batches persisted while the copy was made, written into it too.
    pub batches_replayed: usize,
    /// Of those, the ones written during the swap itself (the writer waits for
    /// them); the copy thread writes the rest while the writer goes on.
    pub batches_replayed_at_swap: usize,
}

/// The copy thread catches up with the batches persisted meanwhile until at most
/// this many are left, which the swap writes while the writer waits.
const DEFRAG_TAIL_BATCHES: usize = 16;
/// Rounds of catching up before the copy thread hands over whatever is left (a
/// writer faster than the copy would otherwise keep it from ever finishing).
const DEFRAG_CATCH_UP_ROUNDS_MAX: usize = 50;

/// Rows and bytes copied per (durable) write transaction of a defragmentation's copy.
const DEFRAG_ROWS_PER_TXN: usize = 50_000;
const DEFRAG_BYTES_PER_TXN: usize = 16 << 20;

impl DefragCopy {
    /// Writes every table into a fresh database file, table by table and key by
    /// key (so pages are filled in order), then lets redb compact it.
    pub fn run(self) -> Result<DefragCopied, StorageError> {
        let io =
            |e: &dyn std::fmt::Display| StorageError::Io { path: self.target.clone(), detail: e.to_string() };
        let mut db = builder().create(&self.target).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, META).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, RAFT_LOG).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, KV).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, MEMBERS).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, APPLIED_PROPOSALS).map_err(|e| io(&e))?;
        copy_table(&self.read, &db, LEASES).map_err(|e| io(&e))?;
        drop(self.read);
        let abandoned = || self.abandoned.load(std::sync::atomic::Ordering::Acquire);
        if abandoned() {
            return Err(io(&"abandoned"));
        }
        while db.compact().map_err(|e| io(&e))? {}
        let mut replayed = 0;
        for _ in 0..DEFRAG_CATCH_UP_ROUNDS_MAX {
            if abandoned() {
                return Err(io(&"abandoned"));
            }
            let batches: Vec<PersistBatch> = {
                let mut recorded = self.recorded.lock().expect("recorded batches");
                if recorded.len() <= DEFRAG_TAIL_BATCHES {
                    break;
                }
                recorded.drain(..).collect()
            };
            let mut txn = db.begin_write().map_err(|e| io(&e))?;
            txn.set_durability(Durability::None).map_err(|e| io(&e))?;
            let mut ignored = 0;
            for batch in &batches {
                write_replayed(&self.path, &txn, batch, &mut ignored)?;
            }
            txn.commit().map_err(|e| io(&e))?;
            replayed += batches.len();
        }
        // Made durable here, so that the swap syncs only its own few batches.
        let mut txn = db.begin_write().map_err(|e| io(&e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| io(&e))?;
        txn.commit().map_err(|e| io(&e))?;
        Ok(DefragCopied { db, replayed })
    }
}

/// Copies one table from `read` into `db`, in write transactions of
/// [`DEFRAG_ROWS_PER_TXN`] rows or [`DEFRAG_BYTES_PER_TXN`] bytes, each durable.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    read: &redb::ReadTransaction,
    db: &Database,
    definition: TableDefinition<K, V>,
) -> Result<(), String> {
    let source = read.open_table(definition).map_err(|e| e.to_string())?;
    let mut rows = source.iter().map_err(|e| e.to_string())?.peekable();
    loop {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        let last = {
            let mut table = txn.open_table(definition).map_err(|e| e.to_string())?;
            let mut bytes = 0;
            for _ in 0..DEFRAG_ROWS_PER_TXN {
                let Some(row) = rows.next() else { break };
                let (key, value) = row.map_err(|e| e.to_string())?;
                bytes +=
                    K::as_bytes(&key.value()).as_ref().len() + V::as_bytes(&value.value()).as_ref().len();
                table.insert(key.value(), value.value()).map_err(|e| e.to_string())?;
                if bytes >= DEFRAG_BYTES_PER_TXN {
                    break;
                }
            }
            rows.peek().is_none()
        };
        // Every piece is durable as it is written, so the disk writes the copy a
        // few megabytes at a time: the member's own fsyncs then never queue behind
        // a gigabyte of the copy's dirty pages (one durable commit at the end
        // stalled the member's writes about twice as long; syncing pieces through
        // another handle, longer still; measured with scripts/defrag-big.sh).
        txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        if last {
            return Ok(());
        }
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Opens the database file, turning redb's errors into one-line answers.
/// redb's page cache. The key space is served from memory, never from redb, so
/// the cache only needs the pages a commit touches (redb's default is 1 GiB,
/// which a member with a few hundred megabytes of data would fill with pages
/// nobody reads again).
pub const DB_CACHE_BYTES: usize = 32 * 1024 * 1024;

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(DB_CACHE_BYTES);
    builder
}

fn open_database(path: &Path, create: bool) -> Result<Database, StorageError> {
    let result = if create { builder().create(path) } else { builder().open(path) };
    result.map_err(|error| database_error(path, error))
}

/// Turns an error of opening a database into a one-line answer naming `path`.
fn database_error(path: &Path, error: redb::DatabaseError) -> StorageError {
    match error {
        redb::DatabaseError::DatabaseAlreadyOpen => StorageError::InUse { path: path.to_path_buf() },
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            StorageError::Unreadable { path: path.to_path_buf(), error: source }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::InvalidData
                || source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            StorageError::Corrupt { path: path.to_path_buf(), detail: source.to_string() }
        }
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => {
            StorageError::Corrupt { path: path.to_path_buf(), detail }
        }
        other => StorageError::Corrupt { path: path.to_path_buf(), detail: other.to_string() },
    }
}

#[cfg(test)]
mod tests;

/// Reads images of a member's committed state without blocking its writer.
#[derive(Clone)]
pub struct ImageReader {
    db: SharedDb,
    path: PathBuf,
}

/// What [`ImageReader::hash_kv`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The revision the hash covers.
    pub hash_revision: i64,
    pub compact_revision: i64,
    /// The store's revision when it was read.
    pub current_revision: i64,
}

impl ImageReader {
    /// The member's database now (a defragmentation may have replaced it since
    /// this reader was made; a read begun before goes on in the old one).
    fn database(&self) -> std::sync::Arc<Database> {
        self.db.read().expect("shared database").clone()
    }

    /// etcd's `HashKV` at `revision` (0: the current one), computed from the last
    /// committed state exactly as `MvccStore::hash_kv` computes it from memory,
    /// without holding up the writer.
    pub fn hash_kv(&self, revision: i64) -> Result<Result<KvHash, chorus_core::KvError>, StorageError> {
        let io =
            |e: &dyn std::fmt::Display| StorageError::Io { path: self.path.clone(), detail: e.to_string() };
        let txn = self.database().begin_read().map_err(|e| io(&e))?;
        let meta = txn.open_table(META).map_err(|e| io(&e))?;
        let compact_revision = meta
            .get("compact_revision")
            .map_err(|e| io(&e))?
            .and_then(|v| decode_u64(v.value()))
            .unwrap_or(0) as i64;
        let kv = txn.open_table(KV).map_err(|e| io(&e))?;
        let main_of =
            |key: &[u8]| i64::from_be_bytes(key[..8].try_into().expect("revision keys are 17 bytes"));
        let last = kv.last().map_err(|e| io(&e))?;
        let current_revision =
            last.map_or(compact_revision.max(1), |(key, _)| main_of(key.value()).max(compact_revision));
        let at = if revision <= 0 { current_revision } else { revision };
        if at > current_revision {
            return Ok(Err(chorus_core::KvError::FutureRevision { current_revision }));
        }
        if at < compact_revision {
            return Ok(Err(chorus_core::KvError::Compacted { compact_revision }));
        }
        let mut hasher = crc32fast::Hasher::new();
        for item in kv.iter().map_err(|e| io(&e))? {
            let (key, value) = item.map_err(|e| io(&e))?;
            let (key, value) = (key.value(), value.value());
            if main_of(key) > at {
                break;
            }
            hasher.update(key);
            hasher.update(&(value.len() as u32).to_be_bytes());
            hasher.update(value);
        }
        Ok(Ok(KvHash { hash: hasher.finalize(), hash_revision: at, compact_revision, current_revision }))
    }

    /// The image of the state as of the last committed transaction: its applied
    /// index, that entry's term, the conf state and every table, all from one read
    /// transaction, so they agree with each other.
    pub fn read(&self) -> Result<StateImage, StorageError> {
        let io =
            |e: &dyn std::fmt::Display| StorageError::Io { path: self.path.clone(), detail: e.to_string() };
        let txn = self.database().begin_read().map_err(|e| io(&e))?;
        let meta = txn.open_table(META).map_err(|e| io(&e))?;
        let meta_u64 = |name: &str| -> Result<u64, StorageError> {
            let value = meta.get(name).map_err(|e| io(&e))?;
            Ok(value.and_then(|v| decode_u64(v.value())).unwrap_or(0))
        };
        let applied_index = meta_u64("applied_index")?;
        let compact_revision = meta_u64("compact_revision")? as i64;
        let (snapshot_index, snapshot_term) =
            (meta_u64("log_snapshot_index")?, meta_u64("log_snapshot_term")?);
        let conf_state = meta.get("conf_state").map_err(|e| io(&e))?.map(|v| v.value().to_vec());
        let conf_state = conf_state.ok_or_else(|| io(&"no configuration stored yet"))?;
        let applied_term = if applied_index == snapshot_index {
            snapshot_term
        } else {
            match meta_u64("applied_term")? {
                0 => {
                    return Err(StorageError::Corrupt {
                        path: self.path.clone(),
                        detail: format!("the term of the applied entry {applied_index} is not recorded"),
                    })
                }
                term => term,
            }
        };
        let mut image =
            StateImage { applied_index, applied_term, conf_state, compact_revision, ..Default::default() };
        if let Some(bytes) = meta.get("alarms").map_err(|e| io(&e))? {
            image.alarms = AlarmResponse::decode(bytes.value()).map_err(|e| io(&e))?.alarms;
        }
        let kv = txn.open_table(KV).map_err(|e| io(&e))?;
        for item in kv.iter().map_err(|e| io(&e))? {
            let (key, value) = item.map_err(|e| io(&e))?;
            image.kv.push(chorus_proto::chorus::v1::KvRecord {
                rev_key: key.value().to_vec(),
                value: value.value().to_vec(),
            });
        }
        let leases = txn.open_table(LEASES).map_err(|e| io(&e))?;
        for item in leases.iter().map_err(|e| io(&e))? {
            let (id, record) = item.map_err(|e| io(&e))?;
            image.leases.push(chorus_proto::chorus::v1::LeaseRecord {
                id: id.value(),
                record: record.value().to_vec(),
            });
        }
        let members = txn.open_table(MEMBERS).map_err(|e| io(&e))?;
        for item in members.iter().map_err(|e| io(&e))? {
            let (_, value) = item.map_err(|e| io(&e))?;
            image.members.push(MemberAttributes::decode(value.value()).map_err(|e| io(&e))?);
        }
        let proposals = txn.open_table(APPLIED_PROPOSALS).map_err(|e| io(&e))?;
        for item in proposals.iter().map_err(|e| io(&e))? {
            let (key, _) = item.map_err(|e| io(&e))?;
            let (proposer_id, tag) = key.value();
            image.applied_proposals.push(chorus_proto::chorus::v1::AppliedProposal { proposer_id, tag });
        }
        Ok(image)
    }
}
