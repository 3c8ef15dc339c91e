//! The state image: the whole replicated state at one applied index, as one
//! `chorus.v1.StateImage`. It is what a raft snapshot carries to a member that
//! needs entries the leader has compacted away, and (followed by its SHA-256)
//! what a backup file holds.
//!
//! # Backup file format
//!
//! `chorus snapshot save` and `Maintenance.Snapshot` produce:
//!
//! | bytes | content |
//! | --- | --- |
//! | 8 | the magic `CHORUSSN` |
//! | 8 | the encoded image's length, big-endian |
//! | length | the encoded `StateImage` |
//! | to a multiple of 512 | zeros |
//! | 32 | the SHA-256 of everything before it |
//!
//! The padding and the trailer are etcd's own convention (its snapshot stream is
//! a database file of whole 512-byte sectors followed by a SHA-256, and
//! `etcdctl snapshot save` refuses a stream whose length is not so), so etcdctl
//! saves chorus backups too. [`decode_backup`] checks the hash before it trusts a
//! byte.

use std::collections::{BTreeMap, BTreeSet};

use chorus_proto::chorus::v1::{AppliedProposal, KvRecord, LeaseRecord, MemberAttributes, StateImage};
use chorus_proto::etcdserverpb::AlarmMember;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::ConfState;
use sha2::{Digest, Sha256};

use crate::lease::LeaseStore;
use crate::mvcc::{MvccStore, RevKey};

/// The length of the SHA-256 trailer of a backup file.
pub const BACKUP_HASH_BYTES: usize = 32;
/// The first bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 8] = b"CHORUSSN";
/// The body of a backup file is padded to a multiple of this (etcd's sector size).
pub const BACKUP_ALIGN_BYTES: usize = 512;

/// The replicated state decoded from an image, ready to replace a node's.
#[derive(Debug)]
pub struct RestoredState {
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: ConfState,
    pub mvcc: MvccStore,
    pub leases: LeaseStore,
    pub members: BTreeMap<u64, MemberAttributes>,
    pub applied_proposals: BTreeMap<u64, BTreeSet<u64>>,
    pub alarms: Vec<AlarmMember>,
}

/// Why an image or a backup file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the file is too short to be a chorus snapshot ({0} bytes)")]
    TooShort(usize),
    #[error("the snapshot's SHA-256 does not match its contents: the file is damaged or truncated")]
    HashMismatch,
    #[error("not a chorus snapshot (it does not start with {:?})", String::from_utf8_lossy(BACKUP_MAGIC))]
    NotChorus,
    #[error("the snapshot does not decode: {0}")]
    Undecodable(String),
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// Everything an image is built from.
pub struct ImageSource<'a> {
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: &'a ConfState,
    pub mvcc: &'a MvccStore,
    pub leases: &'a LeaseStore,
    pub members: &'a BTreeMap<u64, MemberAttributes>,
    pub applied_proposals: &'a BTreeMap<u64, BTreeSet<u64>>,
    pub alarms: &'a [AlarmMember],
}

/// Builds the image of a state.
pub fn build(source: ImageSource<'_>) -> StateImage {
    StateImage {
        applied_index: source.applied_index,
        applied_term: source.applied_term,
        conf_state: source.conf_state.write_to_bytes().expect("encode conf state"),
        compact_revision: source.mvcc.compact_revision(),
        kv: source
            .mvcc
            .records()
            .into_iter()
            .map(|(rev_key, value)| KvRecord { rev_key: rev_key.to_vec(), value })
            .collect(),
        leases: source.leases.iter().map(|l| LeaseRecord { id: l.id, record: l.encode_record() }).collect(),
        members: source.members.values().cloned().collect(),
        applied_proposals: source
            .applied_proposals
            .iter()
            .flat_map(|(proposer, tags)| {
                tags.iter().map(|tag| AppliedProposal { proposer_id: *proposer, tag: *tag })
            })
            .collect(),
        alarms: source.alarms.to_vec(),
    }
}

/// The MVCC records of an image, checked to be revision keys.
pub fn kv_records(image: &StateImage) -> Result<Vec<(RevKey, Vec<u8>)>, ImageError> {
    image
        .kv
        .iter()
        .map(|record| {
            let key: RevKey = record
                .rev_key
                .as_slice()
                .try_into()
                .map_err(|_| ImageError::Inconsistent("a kv record key is not 17 bytes".into()))?;
            Ok((key, record.value.clone()))
        })
        .collect()
}

/// Decodes an image into the state it describes, checking it as storage checks
/// its own records at start-up.
pub fn restore(image: &StateImage) -> Result<RestoredState, ImageError> {
    let conf_state = ConfState::parse_from_bytes(&image.conf_state)
        .map_err(|e| ImageError::Undecodable(format!("conf state: {e}")))?;
    let mvcc = MvccStore::restore(kv_records(image)?, image.compact_revision)
        .map_err(|e| ImageError::Inconsistent(format!("kv records: {e}")))?;
    let leases = LeaseStore::restore(image.leases.iter().map(|l| (l.id, l.record.clone())), &mvcc)
        .map_err(|e| ImageError::Inconsistent(format!("leases: {e}")))?;
    let members = image.members.iter().map(|m| (m.member_id, m.clone())).collect();
    let mut applied_proposals: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for proposal in &image.applied_proposals {
        applied_proposals.entry(proposal.proposer_id).or_default().insert(proposal.tag);
    }
    Ok(RestoredState {
        applied_index: image.applied_index,
        applied_term: image.applied_term,
        conf_state,
        mvcc,
        leases,
        members,
        applied_proposals,
        alarms: image.alarms.clone(),
    })
}

/// Encodes an image as a backup file (see the module documentation).
pub fn encode_backup(image: &StateImage) -> Vec<u8> {
    let length = image.encoded_len();
    let body_bytes = (16 + length).div_ceil(BACKUP_ALIGN_BYTES) * BACKUP_ALIGN_BYTES;
    let mut bytes = Vec::with_capacity(body_bytes + BACKUP_HASH_BYTES);
    bytes.extend_from_slice(BACKUP_MAGIC);
    bytes.extend_from_slice(&(length as u64).to_be_bytes());
    image.encode(&mut bytes).expect("a Vec grows as needed");
    bytes.resize(body_bytes, 0);
    let hash = Sha256::digest(&bytes);
    bytes.extend_from_slice(&hash);
    bytes
}

/// Checks a backup file's SHA-256 and decodes its image.
pub fn decode_backup(bytes: &[u8]) -> Result<StateImage, ImageError> {
    if bytes.len() < BACKUP_HASH_BYTES {
        return Err(ImageError::TooShort(bytes.len()));
    }
    let (body, hash) = bytes.split_at(bytes.len() - BACKUP_HASH_BYTES);
    if Sha256::digest(body).as_slice() != hash {
        return Err(ImageError::HashMismatch);
    }
    decode_body(body)
}

/// Decodes a backup file's body (everything before the hash), unchecked.
pub fn decode_body(body: &[u8]) -> Result<StateImage, ImageError> {
    if body.len() < 16 {
        return Err(ImageError::TooShort(body.len()));
    }
    if &body[..8] != BACKUP_MAGIC {
        return Err(ImageError::NotChorus);
    }
    let length = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
    let image = usize::try_from(length)
        .ok()
        .and_then(|length| body.get(16..16usize.checked_add(length)?))
        .ok_or_else(|| ImageError::Inconsistent(format!("the image's length {length} runs past the file")))?;
    StateImage::decode(image).map_err(|e| ImageError::Undecodable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::WriteSet;
    use chorus_proto::etcdserverpb::PutRequest;

    fn sample_store() -> MvccStore {
        let mut store = MvccStore::new();
        for i in 0..5 {
            let request =
                PutRequest { key: format!("k{i}").into_bytes(), value: vec![i; 3], ..Default::default() };
            store.put(&request, &mut WriteSet::default()).expect("put");
        }
        store
    }

    #[test]
    fn an_image_restores_the_same_state() {
        let mvcc = sample_store();
        let conf_state = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        let members = BTreeMap::new();
        let mut proposals = BTreeMap::new();
        proposals.insert(1u64, BTreeSet::from([7u64, 9]));
        let image = build(ImageSource {
            applied_index: 42,
            applied_term: 3,
            conf_state: &conf_state,
            mvcc: &mvcc,
            leases: &LeaseStore::new(),
            members: &members,
            applied_proposals: &proposals,
            alarms: &[],
        });
        let restored = restore(&image).expect("restores");
        assert_eq!(restored.mvcc.state_hash(), mvcc.state_hash());
        assert_eq!(restored.mvcc, mvcc);
        assert_eq!(restored.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((restored.applied_index, restored.applied_term), (42, 3));
        assert_eq!(restored.applied_proposals, proposals);
    }

    #[test]
    fn a_damaged_backup_is_refused() {
        let mvcc = sample_store();
        let image = build(ImageSource {
            applied_index: 1,
            applied_term: 1,
            conf_state: &ConfState::default(),
            mvcc: &mvcc,
            leases: &LeaseStore::new(),
            members: &BTreeMap::new(),
            applied_proposals: &BTreeMap::new(),
            alarms: &[],
        });
        let mut bytes = encode_backup(&image);
        assert_eq!(bytes.len() % BACKUP_ALIGN_BYTES, BACKUP_HASH_BYTES, "etcdctl's length check");
        assert_eq!(decode_backup(&bytes).expect("intact"), image);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        assert_eq!(decode_backup(&bytes), Err(ImageError::HashMismatch));
        assert_eq!(decode_backup(&bytes[..40]), Err(ImageError::HashMismatch));
        assert_eq!(decode_backup(&bytes[..5]), Err(ImageError::TooShort(5)));
    }
}
