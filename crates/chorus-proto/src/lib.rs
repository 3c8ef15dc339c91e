//! Wire formats and nothing else: etcd's v3 API with etcd's package, message and
//! field names and numbers (so etcd's clients work against chorus unchanged), and
//! chorus's own `chorus.v1` messages (log commands, peer transport).

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

pub mod chorus {
    pub mod v1 {
        tonic::include_proto!("chorus.v1");
    }
}
