//! Bootstrapping a member of a new cluster from a backup (`chorus snapshot
//! restore`, as `etcdutl snapshot restore` does).
//!
//! Every member of the new cluster is restored from the same backup with the same
//! `--initial-cluster`, so they all start from the same state: the backup's key
//! space (revisions, leases and compact revision kept), the new cluster's voters,
//! no log, and the log's start at the backup's applied index in term 1. The old
//! cluster's member table is dropped: the new members publish themselves.

use std::path::{Path, PathBuf};

use chorus_core::snapshot::{self, ImageError};
use chorus_proto::chorus::v1::StateImage;
use chorus_storage::{DiskStorage, Identity, StorageError};
use protobuf::Message as _;
use raft::prelude::{ConfState, HardState};

use crate::config::{self, ConfigError};

/// What a restore needs to know about the new member and cluster.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: Vec<String>,
    /// Accept a backup whose SHA-256 trailer is missing or wrong.
    pub skip_hash_check: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    pub revision: i64,
    pub keys_count: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data directory {0} exists and is not empty: restore into a new directory")]
    DataDirExists(PathBuf),
    #[error("cannot use the backup: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Decodes a backup file's bytes: checks the SHA-256 trailer unless told not to.
pub fn decode(bytes: &[u8], skip_hash_check: bool) -> Result<StateImage, ImageError> {
    match snapshot::decode_backup(bytes) {
        Err(ImageError::HashMismatch) if skip_hash_check => {
            snapshot::decode_body(&bytes[..bytes.len() - snapshot::BACKUP_HASH_BYTES])
        }
        other => other,
    }
}

/// Writes a new member's data directory from a backup.
pub fn restore(backup: &[u8], config: &RestoreConfig) -> Result<Restored, RestoreError> {
    let cluster = config::parse_initial_cluster(&config.initial_cluster)?;
    let Some(own_urls) = cluster.get(&config.name) else {
        return Err(
            ConfigError(format!("--initial-cluster has no member named {:?} (--name)", config.name)).into()
        );
    };
    let (mut advertised, mut listed) = (config.initial_advertise_peer_urls.clone(), own_urls.clone());
    advertised.sort();
    listed.sort();
    if advertised != listed {
        return Err(ConfigError(format!(
            "--initial-advertise-peer-urls {advertised:?} differs from {listed:?}, this member's URLs in --initial-cluster"
        ))
        .into());
    }
    if is_non_empty_dir(&config.data_dir) {
        return Err(RestoreError::DataDirExists(config.data_dir.clone()));
    }
    let mut image = decode(backup, config.skip_hash_check)?;
    // Checks the whole image before anything is written.
    let state = snapshot::restore(&image)?;
    let member_ids: Vec<u64> =
        cluster.values().map(|urls| config::member_id(urls, &config.initial_cluster_token)).collect();
    let member_id = config::member_id(own_urls, &config.initial_cluster_token);
    let cluster_id = config::cluster_id(member_ids.iter().copied());
    let mut voters = member_ids;
    voters.sort_unstable();
    let conf_state = ConfState { voters, ..Default::default() };
    image.conf_state = conf_state.write_to_bytes().expect("encode conf state");
    image.applied_term = 1;
    image.members.clear();
    let hard_state = HardState { term: 1, vote: 0, commit: image.applied_index, ..Default::default() };
    let identity = Identity { cluster_id, member_id };
    let opened = DiskStorage::open(&config.data_dir, identity)?;
    let mut storage = opened.storage;
    storage.bootstrap_from_image(&image, &hard_state)?;
    Ok(Restored {
        member_id,
        cluster_id,
        revision: state.mvcc.revision(),
        keys_count: state.mvcc.key_count(),
    })
}

fn is_non_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).map(|mut entries| entries.next().is_some()).unwrap_or(false)
}
