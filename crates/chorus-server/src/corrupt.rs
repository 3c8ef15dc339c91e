//! The leader's corruption check (`--corrupt-check-time`): every interval the
//! leader hashes its key space at its current revision (etcd's `HashKV`, read from
//! storage on a blocking thread) and asks every other member, over the peer port,
//! for its hash at the same revision. A member that answers with the same compact
//! revision but another hash holds a different key space than the leader at the
//! same point of the log: the leader raises the CORRUPT alarm for it, through the
//! log, as etcd does. Every member then refuses key-space writes until an
//! operator has repaired the member and disarmed the alarm.
//!
//! A member that has not applied the revision yet, or compacted it away, cannot
//! be compared this round and is skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::peer_client::PeerClient;
use chorus_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, HashKvRequest, HashKvResponse,
};
use chorus_storage::{ImageReader, KvHash};
use tokio::sync::watch;

use crate::driver::NodeHandle;

/// How long the leader waits for one member's hash (a large key space takes a
/// while to hash).
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the check every `interval` while this member leads, until `stop`.
/// `initial_peers` (member id to `host:port`, from `--initial-cluster`) stands in
/// for members whose peer URLs the member table does not hold (the founding ones).
pub async fn run(
    node: NodeHandle,
    reader: ImageReader,
    member_id: u64,
    initial_peers: BTreeMap<u64, String>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        if let Err(error) = check_once(&node, &reader, member_id, &initial_peers).await {
            tracing::warn!(%error, "the corruption check could not run this round");
        }
    }
}

/// One round; answers the members found to differ (empty when this member does
/// not lead, or every member agrees).
pub async fn check_once(
    node: &NodeHandle,
    reader: &ImageReader,
    member_id: u64,
    initial_peers: &BTreeMap<u64, String>,
) -> Result<Vec<u64>, String> {
    // The database holds everything applied so far (its writes may wait).
    let status = node.status_with_storage_flushed().await.map_err(|e| e.to_string())?;
    if status.node.leader_id != member_id {
        return Ok(Vec::new());
    }
    let reader = reader.clone();
    let own: KvHash = tokio::task::spawn_blocking(move || reader.hash_kv(0))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut differing = Vec::new();
    let members = status.conf_state.voters.iter().chain(&status.conf_state.learners);
    for &id in members.filter(|id| **id != member_id) {
        let addr = status
            .members
            .get(&id)
            .and_then(|m| m.peer_urls.first())
            .and_then(|url| crate::config::url_to_addr(url).ok())
            .or_else(|| initial_peers.get(&id).cloned());
        let Some(addr) = addr else {
            tracing::debug!(member = %format!("{id:016x}"), "no peer address known for the member");
            continue;
        };
        let theirs = match ask_hash(&addr, own.hash_revision).await {
            Ok(theirs) => theirs,
            Err(error) => {
                tracing::debug!(member = %format!("{id:016x}"), %error, "no hash from the member this round");
                continue;
            }
        };
        if theirs.compact_revision != own.compact_revision {
            continue; // compacted at another point: the hashes cover different records
        }
        if theirs.hash != own.hash {
            tracing::error!(
                member = %format!("{id:016x}"),
                revision = own.hash_revision,
                leader_hash = own.hash,
                member_hash = theirs.hash,
                "the member's key space differs from the leader's at the same revision: raising the CORRUPT alarm"
            );
            differing.push(id);
        }
    }
    let corrupt = AlarmType::Corrupt as i32;
    for &id in &differing {
        if status.alarms.iter().any(|a| a.member_id == id && a.alarm == corrupt) {
            continue;
        }
        let request = AlarmRequest { action: AlarmAction::Activate as i32, member_id: id, alarm: corrupt };
        node.propose(Op::Alarm(request)).await.map_err(|e| e.to_string())?;
    }
    Ok(differing)
}

async fn ask_hash(addr: &str, revision: i64) -> Result<HashKvResponse, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(PEER_HASH_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let answer = PeerClient::new(channel)
        .hash_kv(HashKvRequest { revision })
        .await
        .map_err(|e| e.message().to_string())?;
    Ok(answer.into_inner())
}
