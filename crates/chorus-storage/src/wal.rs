//! The write-ahead log: raft log entries and the hard state, appended to segment
//! files and fsynced once per cycle.
//!
//! # Why a log beside the database
//!
//! A redb commit rewrites the path of B-tree pages it touched and its allocator
//! state, and fsyncs them: about sixteen scattered page writes per commit. Raft
//! needs only its new entries and its hard state on disk before a cycle ends. So
//! those go here, as one sequential append and one `fdatasync`, and the state
//! machine's changes go to redb without an fsync; redb is made durable now and
//! then (a checkpoint, see `DiskStorage`), and after a crash the entries applied
//! since the last checkpoint are applied again from this log. etcd does the same
//! with its WAL and its batched bbolt commits.
//!
//! # Format
//!
//! `<data-dir>/member/wal/<seq as 16 hex digits>.wal`, numbered upwards. A segment
//! is preallocated to [`SEGMENT_BYTES`] (zeros) and holds frames back to back:
//!
//! ```text
//! frame   := length u32 LE | crc32 u32 LE (of payload) | payload
//! payload := hard-state length u32 LE | HardState (raft-rs protobuf)
//!            | entry count u32 LE | (entry length u32 LE | Entry (protobuf))*
//! ```
//!
//! The bytes just past the last frame are written with zeros ahead of the frames,
//! [`ZERO_AHEAD_BYTES`] at a time (see there): a frame then lands on blocks the
//! file system has already recorded as written, and its `fdatasync` writes the
//! frame's data alone.
//!
//! A length of zero ends a segment. Every frame carries the whole hard state, so
//! the last frame read holds the current one, and a segment can be deleted once
//! the entries in it are compacted away and checkpointed. Entries in a frame
//! replace every entry read before at the same or a later index (a new leader
//! overwriting an uncommitted suffix).
//!
//! # Torn writes
//!
//! Only the newest segment can end in a frame that was being written when the
//! process or the machine died (it was never acknowledged: the fsync had not
//! returned). Reading stops at the first frame whose length runs past the segment
//! or whose checksum fails, and the bytes from there on are zeroed before anything
//! is appended. The same damage in an older segment, which was synced before the
//! next one began, is reported as corruption.

use std::io;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Entry, HardState};

/// The size a segment is preallocated to; a new segment begins when a frame would
/// not fit (a larger frame gets a segment of its own, grown as needed).
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// How far past the last frame the current segment is overwritten with zeros,
/// once the frames reach the end of the zeros written before.
///
/// `fallocate` reserves a segment's blocks but leaves them "unwritten" (they read
/// as zeros). The first write into such a block makes the `fdatasync` after it
/// record the block as written in the file's extent map as well: on ext4 a second
/// disk write that waits for the first. Zeros written ahead pay that once per
/// 256 KiB instead of once per frame. Measured on this project's machine
/// (ext4, 3 KB frames, each followed by `fdatasync`): p50 about 90 us over zeros
/// against 145-180 us over unwritten blocks; the sync that carries a 256 KiB
/// piece of zeros takes about 0.4 ms, once every ~85 such frames. etcd
/// preallocates its WAL files the same way but does not zero them.
pub const ZERO_AHEAD_BYTES: u64 = 256 * 1024;

static ZEROS: [u8; ZERO_AHEAD_BYTES as usize] = [0; ZERO_AHEAD_BYTES as usize];

const FRAME_HEADER: usize = 8;

/// One segment file, read and written at offsets.
pub trait WalFile: Send {
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
}

/// The directory of segments.
pub trait WalDir: Send {
    /// The sequence numbers of the segments present, in any order.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// Creates segment `seq`, empty (zeros) and preallocated to about `bytes`, and
    /// makes its existence durable.
    fn create(&self, seq: u64, bytes: u64) -> io::Result<Box<dyn WalFile>>;
    fn open(&self, seq: u64) -> io::Result<Box<dyn WalFile>>;
    /// Deletes segment `seq`; durable by the next [`WalDir::sync`].
    fn remove(&self, seq: u64) -> io::Result<()>;
    /// Makes the deletions so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Names the directory in messages.
    fn label(&self) -> PathBuf;
}

/// Segments as files in a directory.
pub struct FsWalDir {
    dir: PathBuf,
}

impl FsWalDir {
    /// The directory `dir`, created if missing.
    pub fn new(dir: &Path) -> io::Result<FsWalDir> {
        std::fs::create_dir_all(dir)?;
        Ok(FsWalDir { dir: dir.to_path_buf() })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}.wal"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

struct FsWalFile(std::fs::File);

impl WalFile for FsWalFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, out, offset)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl WalDir for FsWalDir {
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(&self.dir)? {
            let name = item?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(".wal") {
                if let Ok(seq) = u64::from_str_radix(hex, 16) {
                    seqs.push(seq);
                }
            }
        }
        Ok(seqs)
    }

    fn create(&self, seq: u64, bytes: u64) -> io::Result<Box<dyn WalFile>> {
        let path = self.path(seq);
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        // Blocks allocated up front: appending then changes no file size, and
        // the file system need not find space at every fsync. Where fallocate is
        // not supported the file grows as it is written.
        let _ = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes);
        file.sync_all()?;
        self.sync_dir()?;
        Ok(Box::new(FsWalFile(file)))
    }

    fn open(&self, seq: u64) -> io::Result<Box<dyn WalFile>> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(self.path(seq))?;
        Ok(Box::new(FsWalFile(file)))
    }

    fn remove(&self, seq: u64) -> io::Result<()> {
        std::fs::remove_file(self.path(seq))
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_dir()
    }

    fn label(&self) -> PathBuf {
        self.dir.clone()
    }
}

/// What [`Wal::open`] read back.
#[derive(Debug, Default)]
pub struct WalRecovered {
    /// The entries, in index order, with overwritten suffixes replaced.
    pub entries: Vec<Entry>,
    /// The hard state of the last frame, if there was one.
    pub hard_state: Option<HardState>,
    /// Bytes of a torn frame zeroed at the end of the newest segment.
    pub torn_bytes: u64,
}

/// Why the log could not be read or written.
#[derive(Debug)]
pub enum WalError {
    Io(String),
    Corrupt(String),
}

struct Segment {
    seq: u64,
    /// The highest entry index ever written to it (0: none).
    max_index: u64,
}

/// The write-ahead log of one member.
pub struct Wal {
    dir: Box<dyn WalDir>,
    /// Every segment present, oldest first; the last is written.
    segments: Vec<Segment>,
    current: Box<dyn WalFile>,
    /// Where the next frame goes in the current segment.
    offset: u64,
    /// The current segment is written with zeros (or frames) up to here.
    zeroed_to: u64,
    /// Frames were written to the current segment since its last sync.
    unsynced: bool,
    last_hard_state: HardState,
    buf: Vec<u8>,
    /// Bytes appended since this log was opened (for the checkpoint policy).
    pub appended_bytes: u64,
    /// The size a segment is preallocated to and rolled at.
    segment_bytes: u64,
}

impl Wal {
    /// Opens the log in `dir`, reading every segment numbered `first_seq` or
    /// higher; older ones (left by a snapshot installed just before a crash) are
    /// deleted. With no segment, one numbered `first_seq` is created.
    pub fn open(dir: Box<dyn WalDir>, first_seq: u64) -> Result<(Wal, WalRecovered), WalError> {
        let label = dir.label();
        let io = |what: &str, e: io::Error| WalError::Io(format!("{what} in {}: {e}", label.display()));
        let mut seqs = dir.list().map_err(|e| io("listing segments", e))?;
        seqs.sort_unstable();
        let mut removed = false;
        for &seq in seqs.iter().filter(|&&s| s < first_seq) {
            dir.remove(seq).map_err(|e| io("removing a segment older than the installed snapshot", e))?;
            removed = true;
        }
        if removed {
            dir.sync().map_err(|e| io("syncing", e))?;
        }
        seqs.retain(|&s| s >= first_seq);
        let mut recovered = WalRecovered::default();
        let mut segments = Vec::new();
        let mut last_open = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let newest = i + 1 == seqs.len();
            let file = dir.open(seq).map_err(|e| io(&format!("opening segment {seq:016x}"), e))?;
            let len = file.size().map_err(|e| io(&format!("reading segment {seq:016x}"), e))?;
            let mut bytes = vec![0u8; len as usize];
            file.read(0, &mut bytes).map_err(|e| io(&format!("reading segment {seq:016x}"), e))?;
            let (end, max_index) = read_segment(&bytes, &mut recovered).map_err(|detail| {
                WalError::Corrupt(format!("segment {seq:016x} of {}: {detail}", label.display()))
            })?;
            let garbage_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            if garbage_end > end {
                if !newest {
                    return Err(WalError::Corrupt(format!(
                        "segment {seq:016x} of {} is damaged at offset {end} (a later segment exists, so \
                         this was synced)",
                        label.display()
                    )));
                }
                let zeros = vec![0u8; garbage_end - end];
                file.write(end as u64, &zeros).map_err(|e| io("zeroing a torn frame", e))?;
                file.sync().map_err(|e| io("zeroing a torn frame", e))?;
                recovered.torn_bytes = zeros.len() as u64;
            }
            segments.push(Segment { seq, max_index });
            if newest {
                last_open = Some((file, end as u64));
            }
        }
        let (current, offset) = match last_open {
            Some(open) => open,
            None => {
                let file =
                    dir.create(first_seq, SEGMENT_BYTES).map_err(|e| io("creating the first segment", e))?;
                segments.push(Segment { seq: first_seq, max_index: 0 });
                (file, 0)
            }
        };
        let last_hard_state = recovered.hard_state.clone().unwrap_or_default();
        let wal = Wal {
            dir,
            segments,
            current,
            offset,
            // Recovery read zeros after `offset`, but the blocks may be unwritten.
            zeroed_to: offset,
            unsynced: false,
            last_hard_state,
            buf: Vec::new(),
            appended_bytes: 0,
            segment_bytes: SEGMENT_BYTES,
        };
        Ok((wal, recovered))
    }

    /// Appends `entries` and `hard_state` as one frame, and syncs when `sync`
    /// (or when an earlier frame was left unsynced and this one must be). Writes
    /// nothing when there are no entries, the hard state is unchanged, and no
    /// sync is asked for.
    pub fn append(&mut self, entries: &[Entry], hard_state: &HardState, sync: bool) -> Result<(), WalError> {
        if !entries.is_empty() || *hard_state != self.last_hard_state {
            self.write_frame(entries, hard_state)?;
        }
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes every frame written so far durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.unsynced {
            let label = self.dir.label();
            self.current
                .sync()
                .map_err(|e| WalError::Io(format!("syncing the log in {}: {e}", label.display())))?;
            self.unsynced = false;
        }
        Ok(())
    }

    fn write_frame(&mut self, entries: &[Entry], hard_state: &HardState) -> Result<(), WalError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0u8; FRAME_HEADER]);
        let hs = hard_state.write_to_bytes().expect("encode hard state");
        buf.extend_from_slice(&(hs.len() as u32).to_le_bytes());
        buf.extend_from_slice(&hs);
        buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for entry in entries {
            let at = buf.len();
            buf.extend_from_slice(&[0u8; 4]);
            entry.write_to_vec(&mut buf).expect("encode raft entry");
            let len = (buf.len() - at - 4) as u32;
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        let payload_len = (buf.len() - FRAME_HEADER) as u32;
        let crc = crc32fast::hash(&buf[FRAME_HEADER..]);
        buf[0..4].copy_from_slice(&payload_len.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        if self.offset > 0 && self.offset + buf.len() as u64 > self.segment_bytes {
            self.roll()?;
        }
        let label = self.dir.label();
        let written = self.current.write(self.offset, &buf);
        written.map_err(|e| WalError::Io(format!("appending to the log in {}: {e}", label.display())))?;
        self.offset += buf.len() as u64;
        self.appended_bytes += buf.len() as u64;
        self.unsynced = true;
        self.zero_ahead()?;
        let segment = self.segments.last_mut().expect("a current segment");
        if let Some(last) = entries.last() {
            segment.max_index = segment.max_index.max(last.index);
        }
        self.last_hard_state = hard_state.clone();
        self.buf = buf;
        Ok(())
    }

    /// Once the frames reach the end of the zeros written ahead, writes the next
    /// [`ZERO_AHEAD_BYTES`] after them (never past the segment's size): they become
    /// durable with the frame's own sync.
    fn zero_ahead(&mut self) -> Result<(), WalError> {
        if self.offset < self.zeroed_to {
            return Ok(());
        }
        let to = (self.offset + ZERO_AHEAD_BYTES).min(self.segment_bytes).max(self.offset);
        if to > self.offset {
            let zeros = &ZEROS[..(to - self.offset) as usize];
            self.current.write(self.offset, zeros).map_err(|e| {
                WalError::Io(format!("writing zeros ahead in the log in {}: {e}", self.dir.label().display()))
            })?;
        }
        self.zeroed_to = to;
        Ok(())
    }

    /// Ends the current segment (synced) and begins the next.
    fn roll(&mut self) -> Result<(), WalError> {
        self.sync()?;
        let seq = self.segments.last().expect("a current segment").seq + 1;
        let label = self.dir.label();
        let file = self.dir.create(seq, self.segment_bytes);
        self.current =
            file.map_err(|e| WalError::Io(format!("creating a log segment in {}: {e}", label.display())))?;
        self.segments.push(Segment { seq, max_index: 0 });
        self.offset = 0;
        self.zeroed_to = 0;
        Ok(())
    }

    /// The number the segment after the current one will have.
    pub fn next_seq(&self) -> u64 {
        self.segments.last().expect("a current segment").seq + 1
    }

    /// Throws the whole log away (a snapshot replaced the state and the log):
    /// begins segment [`Wal::next_seq`] and deletes every older one. Call it once
    /// the database durably records that number as the log's first segment.
    pub fn reset(&mut self) -> Result<(), WalError> {
        let label = self.dir.label();
        let io = |what: &str, e: io::Error| WalError::Io(format!("{what} in {}: {e}", label.display()));
        let seq = self.next_seq();
        self.current =
            self.dir.create(seq, self.segment_bytes).map_err(|e| io("creating a log segment", e))?;
        for old in self.segments.drain(..) {
            self.dir.remove(old.seq).map_err(|e| io("removing a log segment", e))?;
        }
        self.dir.sync().map_err(|e| io("syncing", e))?;
        self.segments.push(Segment { seq, max_index: 0 });
        self.offset = 0;
        self.zeroed_to = 0;
        self.unsynced = false;
        self.last_hard_state = HardState::default();
        Ok(())
    }

    /// Deletes the oldest segments whose entries all lie at or below `index`
    /// (compacted away, and checkpointed: never needed again). Never the current one.
    pub fn release(&mut self, index: u64) -> Result<(), WalError> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[0].max_index <= index {
            let seq = self.segments[0].seq;
            let label = self.dir.label();
            self.dir.remove(seq).map_err(|e| {
                WalError::Io(format!("removing log segment {seq:016x} in {}: {e}", label.display()))
            })?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            let label = self.dir.label();
            self.dir.sync().map_err(|e| WalError::Io(format!("syncing {}: {e}", label.display())))?;
        }
        Ok(())
    }

    /// Sets the segment size (the simulator uses small ones, to roll and delete
    /// segments often).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.max(1);
    }

    /// How many segments are present.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

impl Drop for Wal {
    /// A clean close leaves nothing unsynced (as redb's own close makes its
    /// pending commits durable). After a crash the files refuse, and nothing is
    /// written.
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

/// Reads the frames of one segment into `recovered`. Returns where the valid
/// frames end and the highest entry index read.
fn read_segment(bytes: &[u8], recovered: &mut WalRecovered) -> Result<(usize, u64), String> {
    let mut at = 0usize;
    let mut max_index = 0;
    loop {
        if at + FRAME_HEADER > bytes.len() {
            return Ok((at, max_index));
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || at + FRAME_HEADER + len > bytes.len() {
            return Ok((at, max_index));
        }
        let payload = &bytes[at + FRAME_HEADER..at + FRAME_HEADER + len];
        if crc32fast::hash(payload) != crc {
            return Ok((at, max_index));
        }
        // A frame whose checksum holds was written whole: a malformed one is not
        // a torn write but a bug or damage.
        let (hard_state, entries) =
            decode_payload(payload).map_err(|e| format!("frame at offset {at}: {e}"))?;
        recovered.hard_state = Some(hard_state);
        for entry in entries {
            max_index = max_index.max(entry.index);
            let log = &mut recovered.entries;
            if let Some(first) = log.first() {
                if entry.index < first.index {
                    log.clear();
                } else {
                    let keep = (entry.index - first.index) as usize;
                    if keep > log.len() {
                        let last = log.last().expect("not empty").index;
                        return Err(format!(
                            "frame at offset {at}: entry {} follows {last}: a gap",
                            entry.index
                        ));
                    }
                    log.truncate(keep);
                }
            }
            log.push(entry);
        }
        at += FRAME_HEADER + len;
    }
}

fn decode_payload(payload: &[u8]) -> Result<(HardState, Vec<Entry>), String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at.checked_add(n).filter(|&end| end <= payload.len()).ok_or("truncated")?;
        let slice = &payload[at..end];
        at = end;
        Ok(slice)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    let hs_len = u32_at(take(4)?);
    let hard_state = HardState::parse_from_bytes(take(hs_len)?).map_err(|e| format!("hard state: {e}"))?;
    let count = u32_at(take(4)?);
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = u32_at(take(4)?);
        entries.push(Entry::parse_from_bytes(take(len)?).map_err(|e| format!("entry: {e}"))?);
    }
    Ok((hard_state, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 100].into(), ..Default::default() }
    }

    fn hard(term: u64, commit: u64) -> HardState {
        HardState { term, commit, ..Default::default() }
    }

    fn open(dir: &Path, first_seq: u64) -> (Wal, WalRecovered) {
        Wal::open(Box::new(FsWalDir::new(dir).unwrap()), first_seq).unwrap()
    }

    fn indexes(recovered: &WalRecovered) -> Vec<(u64, u64)> {
        recovered.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn frames_come_back_with_overwritten_suffixes_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, recovered) = open(dir.path(), 1);
        assert!(recovered.entries.is_empty() && recovered.hard_state.is_none());
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], &hard(1, 1), true).unwrap();
        wal.append(&[entry(2, 2)], &hard(2, 1), true).unwrap();
        wal.append(&[], &hard(2, 2), false).unwrap();
        drop(wal);
        let (_, recovered) = open(dir.path(), 1);
        assert_eq!(indexes(&recovered), vec![(1, 1), (2, 2)]);
        assert_eq!(recovered.hard_state, Some(hard(2, 2)));
        assert_eq!(recovered.torn_bytes, 0);
    }

    #[test]
    fn a_torn_last_frame_is_dropped_and_zeroed_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.append(&[entry(1, 1)], &hard(1, 1), true).unwrap();
        let end = wal.offset;
        wal.append(&[entry(2, 1)], &hard(1, 2), true).unwrap();
        let torn_end = wal.offset;
        drop(wal);
        // The second frame half written, as a crash in the middle of it leaves it.
        let path = dir.path().join(format!("{:016x}.wal", 1));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let half = (torn_end - end) / 2;
        let zeros = vec![0u8; (torn_end - end - half) as usize];
        std::os::unix::fs::FileExt::write_all_at(&file, &zeros, end + half).unwrap();
        drop(file);
        let (mut wal, recovered) = open(dir.path(), 1);
        assert_eq!(indexes(&recovered), vec![(1, 1)]);
        assert_eq!(recovered.hard_state, Some(hard(1, 1)));
        assert!(recovered.torn_bytes > 0);
        wal.append(&[entry(2, 3)], &hard(3, 2), true).unwrap();
        drop(wal);
        let (_, recovered) = open(dir.path(), 1);
        assert_eq!(indexes(&recovered), vec![(1, 1), (2, 3)]);
        assert_eq!(recovered.torn_bytes, 0);
    }

    #[test]
    fn damage_in_a_segment_that_a_later_one_follows_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.set_segment_bytes(300);
        for index in 1..=6 {
            wal.append(&[entry(index, 1)], &hard(1, index), true).unwrap();
        }
        assert!(wal.segment_count() > 2, "{}", wal.segment_count());
        drop(wal);
        let path = dir.path().join(format!("{:016x}.wal", 1));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xff; 4], 20).unwrap();
        let error = Wal::open(Box::new(FsWalDir::new(dir.path()).unwrap()), 1).err().unwrap();
        match error {
            WalError::Corrupt(detail) => assert!(detail.contains("damaged"), "{detail}"),
            WalError::Io(detail) => panic!("{detail}"),
        }
    }

    #[test]
    fn released_segments_are_deleted_and_reset_begins_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.set_segment_bytes(300);
        for index in 1..=10 {
            wal.append(&[entry(index, 1)], &hard(1, index), true).unwrap();
        }
        let before = wal.segment_count();
        wal.release(4).unwrap();
        assert!(wal.segment_count() < before);
        wal.release(u64::MAX).unwrap();
        assert_eq!(wal.segment_count(), 1, "the current segment is never deleted");
        drop(wal);
        let (mut wal, recovered) = open(dir.path(), 1);
        let first = recovered.entries.first().unwrap().index;
        assert!(first > 4, "{first}");
        assert_eq!(recovered.entries.last().unwrap().index, 10);
        assert_eq!(recovered.hard_state, Some(hard(1, 10)));
        // A snapshot: the next segment is named first, then the log begins there.
        let next = wal.next_seq();
        wal.reset().unwrap();
        wal.append(&[entry(21, 2)], &hard(2, 21), true).unwrap();
        drop(wal);
        let (_, recovered) = open(dir.path(), next);
        assert_eq!(indexes(&recovered), vec![(21, 2)]);
        assert_eq!(FsWalDir::new(dir.path()).unwrap().list().unwrap(), vec![next]);
    }

    #[test]
    fn segments_older_than_the_first_named_are_deleted_unread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.append(&[entry(1, 1)], &hard(1, 1), true).unwrap();
        drop(wal);
        // A crash after the database named segment 2 first, before the log moved.
        let (_, recovered) = open(dir.path(), 2);
        assert!(recovered.entries.is_empty());
        assert_eq!(FsWalDir::new(dir.path()).unwrap().list().unwrap(), vec![2]);
    }

    /// Every write to a segment, as (offset, length, all zeros).
    type Writes = std::sync::Arc<std::sync::Mutex<Vec<(u64, usize, bool)>>>;

    struct RecordingDir(FsWalDir, Writes);
    struct RecordingFile(Box<dyn WalFile>, Writes);

    impl WalFile for RecordingFile {
        fn size(&self) -> io::Result<u64> {
            self.0.size()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.0.read(offset, out)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.1.lock().unwrap().push((offset, data.len(), data.iter().all(|&b| b == 0)));
            self.0.write(offset, data)
        }
        fn sync(&self) -> io::Result<()> {
            self.0.sync()
        }
    }

    impl WalDir for RecordingDir {
        fn list(&self) -> io::Result<Vec<u64>> {
            self.0.list()
        }
        fn create(&self, seq: u64, bytes: u64) -> io::Result<Box<dyn WalFile>> {
            Ok(Box::new(RecordingFile(self.0.create(seq, bytes)?, self.1.clone())))
        }
        fn open(&self, seq: u64) -> io::Result<Box<dyn WalFile>> {
            Ok(Box::new(RecordingFile(self.0.open(seq)?, self.1.clone())))
        }
        fn remove(&self, seq: u64) -> io::Result<()> {
            self.0.remove(seq)
        }
        fn sync(&self) -> io::Result<()> {
            self.0.sync()
        }
        fn label(&self) -> PathBuf {
            self.0.label()
        }
    }

    #[test]
    fn zeros_are_written_ahead_of_the_frames_in_pieces_and_never_past_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let writes = Writes::default();
        let recording = RecordingDir(FsWalDir::new(dir.path()).unwrap(), writes.clone());
        let (mut wal, _) = Wal::open(Box::new(recording), 1).unwrap();
        let segment = 2 * ZERO_AHEAD_BYTES + ZERO_AHEAD_BYTES / 2;
        wal.set_segment_bytes(segment);
        // Frames of about 4 KB: the first segment fills up and a second begins.
        let big = |index: u64| Entry { index, term: 1, data: vec![7u8; 4000].into(), ..Default::default() };
        let count = segment * 3 / 2 / 4000;
        for index in 1..=count {
            wal.append(&[big(index)], &hard(1, index), true).unwrap();
        }
        assert_eq!(wal.segment_count(), 2);
        let writes = writes.lock().unwrap().clone();
        let frames: Vec<_> = writes.iter().filter(|w| !w.2).collect();
        let zeros: Vec<_> = writes.iter().filter(|w| w.2).collect();
        assert_eq!(frames.len() as u64, count);
        // In the first segment: zeros after the first frame, then each time the
        // frames reach the end of them; the last piece stops at the segment's size.
        let first_frame_end = frames[0].0 + frames[0].1 as u64;
        assert_eq!(*zeros[0], (first_frame_end, ZERO_AHEAD_BYTES as usize, true));
        let mut zeroed_to = 0;
        let mut pieces_in_first = 0;
        for (at, (offset, len, is_zero)) in writes.iter().enumerate() {
            let end = offset + *len as u64;
            if *offset == 0 && at > 0 {
                break; // the second segment began
            }
            if *is_zero {
                assert!(end <= segment, "zeros past the segment: {offset}+{len}");
                let (previous, previous_len, _) = writes[at - 1];
                assert!(*offset >= zeroed_to, "zeros written twice at {offset}");
                assert_eq!(previous + previous_len as u64, *offset, "zeros begin where the frame ends");
                zeroed_to = end;
                pieces_in_first += 1;
            } else if at + 1 < writes.len() && writes[at + 1].2 {
                assert!(end >= zeroed_to, "zeros written though the frame at {offset} ended inside them");
            } else {
                assert!(end < zeroed_to || end >= segment, "no zeros after the frame at {offset}");
            }
        }
        assert_eq!(pieces_in_first, 3, "{zeros:?}");
        assert_eq!(zeroed_to, segment);
        drop(wal);
        let (_, recovered) = open(dir.path(), 1);
        assert_eq!(recovered.entries.len() as u64, count);
        assert_eq!(recovered.torn_bytes, 0);
    }
}
