//! etcd's `Cluster` service: the member list and membership changes, through
//! raft-rs conf changes (`ConfChangeV2`), one at a time.
//!
//! - MemberAdd computes the new member's id from its peer URLs and the cluster
//!   token, as the joining member does (`chorus serve --initial-cluster-state
//!   existing` with the same token and `--initial-advertise-peer-urls`).
//! - A change that would leave fewer recently active voters than a quorum is
//!   refused (checked where the leader's view is known, i.e. when this member
//!   leads), unless the request carries the `chorus-force: true` metadata.
//! - Removing the leader through the leader hands leadership to the most caught-up
//!   voter first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chorus_core::node::OpResponse;
use chorus_proto::chorus::v1::command::Op;
use chorus_proto::chorus::v1::MemberAttributes;
use chorus_proto::etcdserverpb::cluster_server::Cluster;
use chorus_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse, ResponseHeader,
};
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use tonic::{Request, Response, Status};

use super::maintenance::header;
use crate::driver::{DriverStatus, HeaderIds, NodeHandle};

/// How long removing the leader waits for its leadership to move first.
const TRANSFER_WAIT: Duration = Duration::from_secs(5);

/// A member as configured: its name and peer URLs, by id.
#[derive(Debug, Clone)]
pub struct ConfiguredMember {
    pub name: String,
    pub peer_urls: Vec<String>,
}

pub struct ClusterService {
    node: NodeHandle,
    ids: HeaderIds,
    configured: BTreeMap<u64, ConfiguredMember>,
    token: String,
}

impl ClusterService {
    pub fn new(
        node: NodeHandle,
        ids: HeaderIds,
        configured: BTreeMap<u64, ConfiguredMember>,
        token: String,
    ) -> ClusterService {
        ClusterService { node, ids, configured, token }
    }

    /// Every member of the configuration as etcd lists them, ordered by id.
    fn members(&self, status: &DriverStatus) -> Vec<Member> {
        let conf = &status.conf_state;
        let ids = conf.voters.iter().map(|id| (*id, false)).chain(conf.learners.iter().map(|id| (*id, true)));
        let mut members: Vec<Member> =
            ids.map(|(id, is_learner)| self.member(status, id, is_learner)).collect();
        members.sort_by_key(|m| m.id);
        members
    }

    fn member(&self, status: &DriverStatus, id: u64, is_learner: bool) -> Member {
        let published = status.members.get(&id);
        let peer_urls = match published.map(|p| p.peer_urls.clone()).filter(|urls| !urls.is_empty()) {
            Some(urls) => urls,
            None => self.configured.get(&id).map(|c| c.peer_urls.clone()).unwrap_or_default(),
        };
        Member {
            id,
            // etcd shows an empty name for a member that has not started yet.
            name: published.map(|p| p.name.clone()).unwrap_or_default(),
            peer_ur_ls: peer_urls,
            client_ur_ls: published.map(|p| p.client_urls.clone()).unwrap_or_default(),
            is_learner,
        }
    }

    fn in_conf(status: &DriverStatus, id: u64) -> Option<bool> {
        let conf = &status.conf_state;
        if conf.voters.contains(&id) {
            Some(false)
        } else if conf.learners.contains(&id) {
            Some(true)
        } else {
            None
        }
    }

    /// Proposes one change and answers with the header and member list after it.
    async fn change(
        &self,
        kind: ConfChangeType,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<(ResponseHeader, Vec<Member>), Status> {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id;
        let mut change = ConfChangeV2::default();
        change.set_changes(vec![single].into());
        let member = MemberAttributes { member_id: id, peer_urls, ..Default::default() };
        match self.node.conf_change(change, member).await? {
            OpResponse::ConfChange(_) => {}
            other => return Err(Status::internal(format!("unexpected answer to a conf change: {other:?}"))),
        }
        let status = self.node.status().await?;
        Ok((header(self.ids, &status), self.members(&status)))
    }

    /// Refuses a change after which fewer recently active voters than a quorum
    /// would remain (when this member leads and so knows who is active).
    fn check_quorum_after(status: &DriverStatus, voters_after: &[u64], forced: bool) -> Result<(), Status> {
        let Some(active) = &status.active_voters else { return Ok(()) };
        let active_after = voters_after.iter().filter(|id| active.contains(id)).count();
        let quorum = voters_after.len() / 2 + 1;
        if active_after < quorum && !forced {
            return Err(Status::failed_precondition(format!(
                "etcdserver: re-configuration failed due to not enough started members ({active_after} of \
                 {} voters would be active, a quorum is {quorum}; set the chorus-force: true metadata to force it)",
                voters_after.len()
            )));
        }
        Ok(())
    }
}

/// Asks the leader at its client URL to hand leadership to `target`.
async fn ask_move_leader(url: &str, target: u64, limit: Duration) -> Result<(), String> {
    use chorus_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use chorus_proto::etcdserverpb::MoveLeaderRequest;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(limit);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = MaintenanceClient::new(channel);
    client.move_leader(MoveLeaderRequest { target_id: target }).await.map_err(|e| e.message().to_string())?;
    Ok(())
}

/// Marks a request one member forwarded to the leader, which must not forward it again.
const FORWARDED: &str = "chorus-forwarded";

/// Asks the leader at its client URL to promote `id`.
async fn forward_promote(url: &str, id: u64) -> Result<MemberPromoteResponse, Status> {
    use chorus_proto::etcdserverpb::cluster_client::ClusterClient;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Status::internal(format!("leader's client URL {url}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the leader at {url}: {e}")))?;
    let mut request = Request::new(MemberPromoteRequest { id });
    request.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("true"));
    Ok(ClusterClient::new(channel).member_promote(request).await?.into_inner())
}

fn forced<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get("chorus-force")
        .is_some_and(|v| v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("true")))
}

fn not_found() -> Status {
    Status::not_found("etcdserver: member not found")
}

fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(Status::invalid_argument("etcdserver: member peer URLs must not be empty"));
    }
    for url in urls {
        crate::config::url_to_addr(url)
            .map_err(|e| Status::invalid_argument(format!("etcdserver: {}", e.0)))?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let status = self.node.status().await?;
        Ok(Response::new(MemberListResponse {
            header: Some(header(self.ids, &status)),
            members: self.members(&status),
        }))
    }

    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let forced = forced(&request);
        let MemberAddRequest { peer_ur_ls: peer_urls, is_learner } = request.into_inner();
        check_peer_urls(&peer_urls)?;
        let status = self.node.status().await?;
        let taken =
            self.members(&status).into_iter().any(|m| m.peer_ur_ls.iter().any(|u| peer_urls.contains(u)));
        if taken {
            return Err(Status::failed_precondition("etcdserver: Peer URLs already exists"));
        }
        let id = crate::config::member_id(&peer_urls, &self.token);
        if Self::in_conf(&status, id).is_some() {
            return Err(Status::failed_precondition("etcdserver: member ID already exist"));
        }
        if !is_learner {
            let mut voters_after = status.conf_state.voters.clone();
            voters_after.push(id);
            Self::check_quorum_after(&status, &voters_after, forced)?;
        }
        let kind = if is_learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode };
        let (header, members) = self.change(kind, id, peer_urls.clone()).await?;
        let member = Member { id, peer_ur_ls: peer_urls, is_learner, ..Default::default() };
        Ok(Response::new(MemberAddResponse { header: Some(header), member: Some(member), members }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let forced = forced(&request);
        let id = request.into_inner().id;
        let status = self.node.status().await?;
        let is_learner = Self::in_conf(&status, id).ok_or_else(not_found)?;
        if !is_learner {
            let voters_after: Vec<u64> =
                status.conf_state.voters.iter().copied().filter(|v| *v != id).collect();
            if voters_after.is_empty() {
                return Err(Status::failed_precondition("etcdserver: cannot remove the last voting member"));
            }
            Self::check_quorum_after(&status, &voters_after, forced)?;
        }
        if status.node.leader_id == id {
            // Removing the leader: hand leadership over first, then remove it
            // through the new leader (proposals are forwarded to it). Asked of the
            // leader, it picks the most caught-up voter; asked of another voter,
            // that voter asks the leader (MoveLeader at its client URL) for it.
            let moved = if id == self.ids.member_id {
                match status.most_caught_up_voter {
                    Some(to) => self.node.transfer_leader(to).await.is_ok(),
                    None => false,
                }
            } else if status.conf_state.voters.contains(&self.ids.member_id) {
                let url = status.members.get(&id).and_then(|m| m.client_urls.first().cloned());
                match url {
                    Some(url) => ask_move_leader(&url, self.ids.member_id, TRANSFER_WAIT).await.is_ok(),
                    None => false,
                }
            } else {
                false
            };
            if moved {
                let started = Instant::now();
                while started.elapsed() < TRANSFER_WAIT {
                    let now = self.node.status().await?;
                    if now.node.leader_id != id && now.node.leader_id != 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let (header, members) = self.change(ConfChangeType::RemoveNode, id, Vec::new()).await?;
        Ok(Response::new(MemberRemoveResponse { header: Some(header), members }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let MemberUpdateRequest { id, peer_ur_ls: peer_urls } = request.into_inner();
        check_peer_urls(&peer_urls)?;
        let status = self.node.status().await?;
        Self::in_conf(&status, id).ok_or_else(not_found)?;
        let taken = self
            .members(&status)
            .into_iter()
            .any(|m| m.id != id && m.peer_ur_ls.iter().any(|u| peer_urls.contains(u)));
        if taken {
            return Err(Status::failed_precondition("etcdserver: Peer URLs already exists"));
        }
        let update = MemberAttributes { member_id: id, peer_urls, ..Default::default() };
        self.node.propose(Op::UpdatePeerUrls(update)).await?;
        let status = self.node.status().await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(header(self.ids, &status)),
            members: self.members(&status),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let forwarded = request.metadata().get(FORWARDED).is_some();
        let id = request.into_inner().id;
        let status = self.node.status().await?;
        let is_learner = Self::in_conf(&status, id).ok_or_else(not_found)?;
        if !is_learner {
            return Err(Status::failed_precondition("etcdserver: can only promote a learner member"));
        }
        if status.active_voters.is_none() {
            // Only the leader knows how far the learner's log is: ask it (once).
            if forwarded {
                return Err(Status::unavailable("etcdserver: leader changed"));
            }
            let leader = status.node.leader_id;
            let url = status.members.get(&leader).and_then(|m| m.client_urls.first().cloned());
            let url = url.ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
            return forward_promote(&url, id).await.map(Response::new);
        }
        if !status.learners_caught_up.contains(&id) {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member which is in sync with leader",
            ));
        }
        let (header, members) = self.change(ConfChangeType::AddNode, id, Vec::new()).await?;
        Ok(Response::new(MemberPromoteResponse { header: Some(header), members }))
    }
}
