//! etcd's `Cluster` service: `MemberList`. Membership changes belong to later work
//! and answer `Unimplemented`.

use std::collections::BTreeMap;

use chorus_proto::etcdserverpb::cluster_server::Cluster;
use chorus_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use super::maintenance::header;
use super::not_yet;
use crate::driver::{HeaderIds, NodeHandle};

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
}

impl ClusterService {
    pub fn new(
        node: NodeHandle,
        ids: HeaderIds,
        configured: BTreeMap<u64, ConfiguredMember>,
    ) -> ClusterService {
        ClusterService { node, ids, configured }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let status = self.node.status().await?;
        let conf = &status.conf_state;
        let ids = conf.voters.iter().map(|id| (*id, false)).chain(conf.learners.iter().map(|id| (*id, true)));
        let mut members: Vec<Member> = ids
            .map(|(id, is_learner)| {
                let configured = self.configured.get(&id);
                let published = status.members.get(&id);
                Member {
                    id,
                    // etcd shows an empty name for a member that has not started yet.
                    name: published.map(|p| p.name.clone()).unwrap_or_default(),
                    peer_ur_ls: configured.map(|c| c.peer_urls.clone()).unwrap_or_default(),
                    client_ur_ls: published.map(|p| p.client_urls.clone()).unwrap_or_default(),
                    is_learner,
                }
            })
            .collect();
        // etcd lists members ordered by id.
        members.sort_by_key(|m| m.id);
        Ok(Response::new(MemberListResponse { header: Some(header(self.ids, &status)), members }))
    }

    async fn member_add(&self, _: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(not_yet("Cluster.MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(not_yet("Cluster.MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(not_yet("Cluster.MemberUpdate"))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(not_yet("Cluster.MemberPromote"))
    }
}
