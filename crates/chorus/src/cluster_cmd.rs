//! `chorus cluster health`: every member's view of every peer (reachable, phi, round
//! trips, clock offset, diagnosis) and its Raft state, from `chorus.v1.Diagnostics`.
//!
//! The members are found with MemberList on the given endpoints (their published
//! client URLs), and the given endpoints are asked too. Every call is bounded by
//! `--dial-timeout` and `--command-timeout`: a member that cannot be asked is
//! reported as such, never waited for.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_proto::chorus::v1::diagnostics_client::DiagnosticsClient;
use chorus_proto::chorus::v1::{HealthRequest, HealthResponse};
use chorus_proto::etcdserverpb::cluster_client::ClusterClient;
use chorus_proto::etcdserverpb::MemberListRequest;
use serde_json::json;

use crate::client_cmd::{GlobalOpts, WriteOut};

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Every member's view of every peer: reachable, phi, rtt p50/p99, clock offset, diagnosis
    Health,
}

/// One member asked, by endpoint.
struct Answer {
    endpoint: String,
    /// The member's name, when MemberList gave it.
    name: Option<String>,
    result: Result<HealthResponse, String>,
}

pub async fn run(global: &GlobalOpts, args: ClusterArgs) -> i32 {
    match args.command {
        ClusterCommand::Health => health(global).await,
    }
}

fn url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
}

async fn connect(endpoint: &str, dial: Duration) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url(endpoint))
        .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?
        .connect_timeout(dial);
    match tokio::time::timeout(dial, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(format!("cannot connect: {error}")),
        Err(_) => Err(format!("cannot connect within {} ms", dial.as_millis())),
    }
}

/// Member names to client URLs from the first endpoint that answers MemberList.
async fn members(global: &GlobalOpts) -> BTreeMap<String, Vec<String>> {
    for endpoint in &global.endpoints {
        let Ok(channel) = connect(endpoint, global.dial_timeout).await else { continue };
        let mut client = ClusterClient::new(channel);
        let call = client.member_list(MemberListRequest { linearizable: false });
        if let Ok(Ok(response)) = tokio::time::timeout(global.command_timeout, call).await {
            return response.into_inner().members.into_iter().map(|m| (m.name, m.client_ur_ls)).collect();
        }
    }
    BTreeMap::new()
}

async fn ask(endpoint: String, name: Option<String>, dial: Duration, timeout: Duration) -> Answer {
    let result = async {
        let channel = connect(&endpoint, dial).await?;
        let mut client = DiagnosticsClient::new(channel);
        let call = client.health(HealthRequest {});
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(format!("Diagnostics.Health failed: {}", status.message())),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
    .await;
    Answer { endpoint, name, result }
}

async fn health(global: &GlobalOpts) -> i32 {
    let members = members(global).await;
    // Every member's first client URL, then any given endpoint not among them.
    let mut endpoints: Vec<String> = members.values().filter_map(|urls| urls.first().cloned()).collect();
    let known: Vec<String> = endpoints.iter().map(|e| url(e)).collect();
    for endpoint in &global.endpoints {
        if !known.contains(&url(endpoint)) {
            endpoints.push(endpoint.clone());
        }
    }
    let unpublished: Vec<String> =
        members.iter().filter(|(_, urls)| urls.is_empty()).map(|(name, _)| name.clone()).collect();
    let name_of_endpoint = |endpoint: &str| {
        members
            .iter()
            .find(|(_, urls)| urls.first().is_some_and(|u| url(u) == url(endpoint)))
            .map(|(n, _)| n.clone())
    };
    let asks = endpoints.into_iter().map(|e| {
        let name = name_of_endpoint(&e);
        ask(e, name, global.dial_timeout, global.command_timeout)
    });
    let answers = futures::future::join_all(asks).await;
    match global.write_out {
        WriteOut::Json => print_json(&answers, &unpublished),
        _ => print_table(&answers, &unpublished),
    }
    i32::from(answers.iter().all(|a| a.result.is_err()))
}

fn name_of(answers: &[Answer], id: u64) -> String {
    answers
        .iter()
        .filter_map(|a| a.result.as_ref().ok())
        .find(|r| r.member_id == id)
        .map(|r| r.name.clone())
        .or_else(|| {
            answers
                .iter()
                .filter_map(|a| a.result.as_ref().ok())
                .flat_map(|r| r.peers.iter())
                .find(|p| p.peer_id == id)
                .map(|p| p.peer_name.clone())
        })
        .unwrap_or_else(|| if id == 0 { "none".into() } else { format!("{id:016x}") })
}

fn print_table(answers: &[Answer], unpublished: &[String]) {
    for answer in answers {
        match &answer.result {
            Err(error) => println!(
                "{} ({}): UNREACHABLE: {error}\n",
                answer.name.as_deref().unwrap_or("?"),
                answer.endpoint
            ),
            Ok(r) => {
                println!(
                    "{} ({}): {} term {} commit {} applied {} leader {}",
                    r.name,
                    answer.endpoint,
                    r.raft_role,
                    r.raft_term,
                    r.commit_index,
                    r.applied_index,
                    name_of(answers, r.leader_id)
                );
                println!(
                    "  {:<12} {:<9} {:>7} {:>9} {:>9} {:>22} {:<12} CLOCK-ALARM",
                    "PEER", "REACHABLE", "PHI", "RTT-P50", "RTT-P99", "CLOCK-OFFSET", "DIAGNOSIS"
                );
                for p in &r.peers {
                    let rtt = |v: f64| if p.has_rtt { format!("{v:.2}ms") } else { "-".into() };
                    let clock = if p.has_clock_offset {
                        format!("{:+.1}ms ±{:.1}ms", p.clock_offset_ms, p.clock_offset_bound_ms)
                    } else {
                        "-".into()
                    };
                    println!(
                        "  {:<12} {:<9} {:>7.2} {:>9} {:>9} {:>22} {:<12} {}",
                        p.peer_name,
                        if p.reachable { "yes" } else { "no" },
                        p.phi,
                        rtt(p.rtt_ms_p50),
                        rtt(p.rtt_ms_p99),
                        clock,
                        p.diagnosis,
                        if p.clock_alarm { "ALARM" } else { "-" }
                    );
                }
                println!();
            }
        }
    }
    for name in unpublished {
        println!("{name}: no client URL published (the member has not started yet)\n");
    }
}

fn print_json(answers: &[Answer], unpublished: &[String]) {
    let mut rows = Vec::new();
    for answer in answers {
        match &answer.result {
            Err(error) => rows.push(json!({
                "node": answer.name.clone().unwrap_or_else(|| answer.endpoint.clone()),
                "endpoint": answer.endpoint,
                "node_reachable": false,
                "error": error,
                "peer": null,
                "diagnosis": null,
            })),
            Ok(r) => {
                for p in &r.peers {
                    let opt = |present: bool, v: f64| if present { json!(v) } else { json!(null) };
                    rows.push(json!({
                        "node": r.name,
                        "node_id": format!("{:016x}", r.member_id),
                        "endpoint": answer.endpoint,
                        "node_reachable": true,
                        "raft_role": r.raft_role,
                        "raft_term": r.raft_term,
                        "commit_index": r.commit_index,
                        "applied_index": r.applied_index,
                        "leader": name_of(answers, r.leader_id),
                        "peer": p.peer_name,
                        "peer_id": format!("{:016x}", p.peer_id),
                        "reachable": p.reachable,
                        "phi": p.phi,
                        "rtt_ms_p50": opt(p.has_rtt, p.rtt_ms_p50),
                        "rtt_ms_p99": opt(p.has_rtt, p.rtt_ms_p99),
                        "clock_offset_ms": opt(p.has_clock_offset, p.clock_offset_ms),
                        "clock_offset_bound_ms": opt(p.has_clock_offset, p.clock_offset_bound_ms),
                        "clock_alarm": p.clock_alarm,
                        "last_heard_ms_ago": p.last_heard_ms_ago,
                        "diagnosis": p.diagnosis,
                    }));
                }
            }
        }
    }
    for name in unpublished {
        rows.push(json!({
            "node": name, "node_reachable": false, "error": "no client URL published",
            "peer": null, "diagnosis": null,
        }));
    }
    println!("{}", serde_json::Value::Array(rows));
}
