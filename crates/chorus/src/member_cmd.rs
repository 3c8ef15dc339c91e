//! `chorus member list|add|remove|update|promote`: etcd's `Cluster` service, with
//! etcdctl's arguments and output (`-w json` prints the response as etcdctl does,
//! ids as numbers). Each call goes to the first endpoint that answers, bounded by
//! `--dial-timeout` and `--command-timeout`; a refusal (another change in
//! progress, a quorum that would be lost) is printed as the server worded it.

use std::time::Duration;

use chorus_proto::etcdserverpb::cluster_client::ClusterClient;
use chorus_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    MemberUpdateRequest, ResponseHeader,
};
use serde_json::json;

use crate::client_cmd::{GlobalOpts, WriteOut};

#[derive(clap::Args, Debug, Clone)]
pub struct MemberArgs {
    #[command(subcommand)]
    pub command: MemberCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum MemberCommand {
    /// Lists every member: ID, status (started once it has published its name), name, peer
    /// URLs, client URLs, learner
    List,
    /// Adds a member (as a learner with --learner); then start it with
    /// `chorus serve --initial-cluster-state existing` and the flags printed
    Add {
        /// The new member's name (its --name)
        name: String,
        /// The new member's peer URLs, comma-separated
        #[arg(long, value_delimiter = ',', required = true)]
        peer_urls: Vec<String>,
        /// Add it as a learner (promoted once caught up with --auto-promote-learners)
        #[arg(long)]
        learner: bool,
    },
    /// Removes a member (hexadecimal ID, as `member list` prints it)
    Remove {
        #[arg(value_parser = parse_member_id)]
        id: u64,
    },
    /// Changes a member's peer URLs
    Update {
        #[arg(value_parser = parse_member_id)]
        id: u64,
        /// The member's new peer URLs, comma-separated
        #[arg(long, value_delimiter = ',', required = true)]
        peer_urls: Vec<String>,
    },
    /// Promotes a learner that has caught up to a voting member
    Promote {
        #[arg(value_parser = parse_member_id)]
        id: u64,
    },
}

fn parse_member_id(text: &str) -> Result<u64, String> {
    u64::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|_| format!("bad member ID {text:?}: expected hexadecimal, as `member list` prints it"))
}

pub async fn run(global: &GlobalOpts, args: MemberArgs) -> i32 {
    if global.write_out == WriteOut::Table {
        eprintln!("Error: -w table is not supported by member; use simple or json");
        return 2;
    }
    match execute(global, args.command).await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("Error: {error}");
            1
        }
    }
}

fn url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// A Cluster client on the first endpoint that accepts a connection.
async fn connect(global: &GlobalOpts) -> Result<ClusterClient<tonic::transport::Channel>, String> {
    let mut last = String::from("no endpoints given");
    for endpoint in &global.endpoints {
        let built = tonic::transport::Endpoint::from_shared(url(endpoint))
            .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
            .connect_timeout(global.dial_timeout);
        match tokio::time::timeout(global.dial_timeout, built.connect()).await {
            Ok(Ok(channel)) => return Ok(ClusterClient::new(channel)),
            Ok(Err(error)) => last = format!("{endpoint}: cannot connect: {error}"),
            Err(_) => {
                last = format!("{endpoint}: cannot connect within {} ms", global.dial_timeout.as_millis())
            }
        }
    }
    Err(last)
}

/// Runs one call within the command timeout, turning a gRPC status into its message.
async fn call<T>(
    timeout: Duration,
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn execute(global: &GlobalOpts, command: MemberCommand) -> Result<(), String> {
    let mut client = connect(global).await?;
    let timeout = global.command_timeout;
    let json_out = global.write_out == WriteOut::Json;
    match command {
        MemberCommand::List => {
            let response =
                call(timeout, client.member_list(MemberListRequest { linearizable: true })).await?;
            if json_out {
                print_json(json!({
                    "header": header_json(response.header.as_ref()),
                    "members": response.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            } else {
                for member in &response.members {
                    let status = if member.name.is_empty() { "unstarted" } else { "started" };
                    println!(
                        "{:x}, {status}, {}, {}, {}, {}",
                        member.id,
                        member.name,
                        member.peer_ur_ls.join(","),
                        member.client_ur_ls.join(","),
                        member.is_learner
                    );
                }
            }
        }
        MemberCommand::Add { name, peer_urls, learner } => {
            let request = MemberAddRequest { peer_ur_ls: peer_urls.clone(), is_learner: learner };
            let response = call(timeout, client.member_add(request)).await?;
            let added = response.member.clone().unwrap_or_default();
            if json_out {
                print_json(json!({
                    "header": header_json(response.header.as_ref()),
                    "member": member_json(&added),
                    "members": response.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            let cluster_id = response.header.as_ref().map_or(0, |h| h.cluster_id);
            println!("Member {:x} added to cluster {cluster_id:x}", added.id);
            // The --initial-cluster the new member starts with: every member, by name
            // (the new one by the name given), with its peer URLs.
            let mut initial = Vec::new();
            for member in &response.members {
                let member_name = if member.id == added.id { name.clone() } else { member.name.clone() };
                if member_name.is_empty() {
                    continue; // a member that has not started yet has no name to list
                }
                for peer_url in &member.peer_ur_ls {
                    initial.push(format!("{member_name}={peer_url}"));
                }
            }
            println!();
            println!("Start it with:");
            println!(
                "  chorus serve --name {name} --initial-cluster-state existing --initial-cluster {} \
                 --initial-advertise-peer-urls {} --listen-peer-urls {} --initial-cluster-token <the cluster's token> ...",
                initial.join(","),
                peer_urls.join(","),
                peer_urls.join(",")
            );
        }
        MemberCommand::Remove { id } => {
            let response = call(timeout, client.member_remove(MemberRemoveRequest { id })).await?;
            if json_out {
                print_json(json!({
                    "header": header_json(response.header.as_ref()),
                    "members": response.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            } else {
                let cluster_id = response.header.as_ref().map_or(0, |h| h.cluster_id);
                println!("Member {id:x} removed from cluster {cluster_id:x}");
            }
        }
        MemberCommand::Update { id, peer_urls } => {
            let request = MemberUpdateRequest { id, peer_ur_ls: peer_urls };
            let response = call(timeout, client.member_update(request)).await?;
            if json_out {
                print_json(json!({
                    "header": header_json(response.header.as_ref()),
                    "members": response.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            } else {
                let cluster_id = response.header.as_ref().map_or(0, |h| h.cluster_id);
                println!("Member {id:x} updated in cluster {cluster_id:x}");
            }
        }
        MemberCommand::Promote { id } => {
            let response = call(timeout, client.member_promote(MemberPromoteRequest { id })).await?;
            if json_out {
                print_json(json!({
                    "header": header_json(response.header.as_ref()),
                    "members": response.members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            } else {
                let cluster_id = response.header.as_ref().map_or(0, |h| h.cluster_id);
                println!("Member {id:x} promoted in cluster {cluster_id:x}");
            }
        }
    }
    Ok(())
}

fn print_json(value: serde_json::Value) {
    println!("{value}");
}

/// A header as etcdctl's JSON prints it (numbers, not strings).
fn header_json(header: Option<&ResponseHeader>) -> serde_json::Value {
    let header = header.cloned().unwrap_or_default();
    json!({
        "cluster_id": header.cluster_id,
        "member_id": header.member_id,
        "raft_term": header.raft_term,
    })
}

/// A member as etcdctl's JSON prints it.
fn member_json(member: &Member) -> serde_json::Value {
    let mut value = json!({ "ID": member.id, "peerURLs": member.peer_ur_ls });
    if !member.name.is_empty() {
        value["name"] = json!(member.name);
    }
    if !member.client_ur_ls.is_empty() {
        value["clientURLs"] = json!(member.client_ur_ls);
    }
    if member.is_learner {
        value["isLearner"] = json!(true);
    }
    value
}
