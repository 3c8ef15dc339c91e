//! Wire formats and nothing else: etcd's v3 API with etcd's package, message and
//! field names and numbers (so etcd's clients work against chorus unchanged), and
//! chorus's own `chorus.v1` messages (log commands, peer transport). The etcd
//! packages also implement serde in grpc-gateway's JSON mapping (pbjson).

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

pub mod chorus {
    pub mod v1 {
        tonic::include_proto!("chorus.v1");
    }
}
