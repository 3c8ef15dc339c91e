//! etcd's `Maintenance` service: status, alarms, hashes, backups, leader moves and
//! defragmentation; `Downgrade` (a mixed-version upgrade aid) answers `Unimplemented`.

use std::pin::Pin;

use chorus_core::limits::SNAPSHOT_CHUNK_BYTES;
use chorus_core::node::OpResponse;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::etcdserverpb::maintenance_server::Maintenance;
use chorus_proto::etcdserverpb::AlarmType;
use chorus_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse,
    DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, ResponseHeader, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::not_yet;
use crate::driver::{DriverStatus, HeaderIds, NodeHandle};
use chorus_storage::{ImageReader, KvHash};

/// The etcd API version chorus speaks, reported by `Status` (etcdctl prints it).
pub const ETCD_API_VERSION: &str = "3.5.0";

pub struct MaintenanceService {
    node: NodeHandle,
    ids: HeaderIds,
    /// Reads the committed state on blocking threads: backups and hashes never
    /// hold up the member's driver.
    reader: ImageReader,
}

impl MaintenanceService {
    pub fn new(node: NodeHandle, ids: HeaderIds, reader: ImageReader) -> MaintenanceService {
        MaintenanceService { node, ids, reader }
    }

    /// HashKV at `revision`, from storage, on a blocking thread; with the driver's
    /// status asked first.
    ///
    /// The driver answers a write before its cycle's database write, and may let
    /// database writes wait a few cycles; it answers this status request after
    /// committing them: once the status is back, every write acknowledged before
    /// this request is in the database, so a client hashes what it has seen
    /// acknowledged (a compaction, say).
    async fn kv_hash(&self, revision: i64) -> Result<(KvHash, DriverStatus), Status> {
        let status = self.node.status_with_storage_flushed().await?;
        let reader = self.reader.clone();
        let hashed = tokio::task::spawn_blocking(move || reader.hash_kv(revision))
            .await
            .map_err(|e| Status::internal(format!("hashing failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let hashed = hashed.map_err(|e| Status::from(crate::status::RequestError::Kv(e)))?;
        Ok((hashed, status))
    }
}

pub(crate) fn header(ids: HeaderIds, status: &DriverStatus) -> ResponseHeader {
    ResponseHeader {
        cluster_id: ids.cluster_id,
        member_id: ids.member_id,
        revision: status.revision,
        raft_term: status.node.term,
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let request = request.into_inner();
        match AlarmAction::try_from(request.action) {
            Ok(AlarmAction::Get) => {
                let status = self.node.status().await?;
                let alarms = status
                    .alarms
                    .iter()
                    .filter(|a| request.alarm == 0 || a.alarm == request.alarm)
                    .filter(|a| request.member_id == 0 || a.member_id == request.member_id)
                    .cloned()
                    .collect();
                Ok(Response::new(AlarmResponse { header: Some(header(self.ids, &status)), alarms }))
            }
            Ok(_) => {
                if AlarmType::try_from(request.alarm).is_err() {
                    return Err(Status::invalid_argument("etcdserver: unknown alarm type"));
                }
                match self.node.propose(Op::Alarm(request)).await? {
                    OpResponse::Alarm(response) => Ok(Response::new(response)),
                    other => {
                        Err(Status::internal(format!("unexpected answer to an alarm request: {other:?}")))
                    }
                }
            }
            Err(_) => Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        }
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let status = self.node.status().await?;
        let is_learner = status.conf_state.learners.contains(&self.ids.member_id);
        Ok(Response::new(StatusResponse {
            header: Some(header(self.ids, &status)),
            version: ETCD_API_VERSION.to_string(),
            db_size: status.db_size_bytes as i64,
            leader: status.node.leader_id,
            raft_index: status.node.last_index,
            raft_term: status.node.term,
            raft_applied_index: status.node.applied_index,
            errors: status
                .alarms
                .iter()
                .map(|a| {
                    let name = AlarmType::try_from(a.alarm).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
                    format!("memberID:{} alarm:{name} ", a.member_id)
                })
                .collect(),
            db_size_in_use: status.db_size_in_use_bytes as i64,
            is_learner,
            ..Default::default()
        }))
    }

    /// Compacts this member's database file while it goes on serving: the copy
    /// is made in the background and swapped in (see `DiskStorage::defrag_begin`).
    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        match self.node.defragment().await? {
            Ok(_) => {
                let status = self.node.status().await?;
                Ok(Response::new(DefragmentResponse { header: Some(header(self.ids, &status)) }))
            }
            Err(error) => Err(Status::internal(format!("chorus: defragmentation failed: {error}"))),
        }
    }

    /// chorus's `Hash` is `HashKV` at the current revision: the replicated key
    /// space is the state members must agree on (etcd hashes its whole bbolt file,
    /// which holds member-local data too).
    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (hashed, status) = self.kv_hash(0).await?;
        let mut header = header(self.ids, &status);
        header.revision = hashed.current_revision;
        Ok(Response::new(HashResponse { header: Some(header), hash: hashed.hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let (hashed, status) = self.kv_hash(request.into_inner().revision).await?;
        let mut header = header(self.ids, &status);
        header.revision = hashed.current_revision;
        Ok(Response::new(HashKvResponse {
            header: Some(header),
            hash: hashed.hash,
            compact_revision: hashed.compact_revision,
            hash_revision: hashed.hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// A consistent backup: the image of this member's applied state followed by
    /// its SHA-256 (see `chorus_core::snapshot`), in pieces with the bytes left.
    async fn snapshot(&self, _: Request<SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        // Everything this member applied so far goes into the backup.
        let status = self.node.status_with_storage_flushed().await?;
        let started = std::time::Instant::now();
        let reader = self.reader.clone();
        let (bytes, revision) = tokio::task::spawn_blocking(move || {
            let image = reader.read()?;
            let revision =
                chorus_core::snapshot::restore(&image).map(|state| state.mvcc.revision()).map_err(|e| {
                    chorus_storage::StorageError::Io { path: "image".into(), detail: e.to_string() }
                })?;
            Ok::<_, chorus_storage::StorageError>((chorus_core::snapshot::encode_backup(&image), revision))
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot failed: {e}")))?
        .map_err(|e| Status::internal(format!("snapshot failed: {e}")))?;
        let mut header = header(self.ids, &status);
        header.revision = revision;
        tracing::info!(
            revision = header.revision,
            bytes = bytes.len(),
            encode_ms = started.elapsed().as_millis() as u64,
            "streaming a backup snapshot"
        );
        let bytes = std::sync::Arc::new(bytes);
        let total = bytes.len();
        let pieces = total.div_ceil(SNAPSHOT_CHUNK_BYTES).max(1);
        let stream = futures::stream::iter((0..pieces).map(move |piece| {
            let start = piece * SNAPSHOT_CHUNK_BYTES;
            let end = (start + SNAPSHOT_CHUNK_BYTES).min(total);
            Ok(SnapshotResponse {
                header: Some(header),
                remaining_bytes: (total - end) as u64,
                blob: bytes[start..end].to_vec(),
                version: ETCD_API_VERSION.to_string(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    /// Hands leadership to `target_id`; asked of the leader, as etcd requires.
    /// Answers once the target leads (or fails after an election timeout's worth).
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = request.into_inner().target_id;
        let status = self.node.status().await?;
        if status.node.leader_id != self.ids.member_id {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        if !status.conf_state.voters.contains(&target) {
            return Err(Status::failed_precondition(format!(
                "etcdserver: {target:x} is not a voting member of the cluster"
            )));
        }
        if target == self.ids.member_id {
            return Ok(Response::new(MoveLeaderResponse { header: Some(header(self.ids, &status)) }));
        }
        self.node.transfer_leader(target).await?;
        let started = std::time::Instant::now();
        while started.elapsed() < self.node.request_timeout() {
            let now = self.node.status().await?;
            if now.node.leader_id == target {
                return Ok(Response::new(MoveLeaderResponse { header: Some(header(self.ids, &now)) }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(Status::unavailable("etcdserver: request timed out, leader transfer took too long"))
    }

    async fn downgrade(&self, _: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(not_yet("Maintenance.Downgrade"))
    }
}
