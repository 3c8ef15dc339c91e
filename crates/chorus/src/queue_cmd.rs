//! `chorus queue ...` and `chorus barrier ...`: clients of chorus's own
//! `chorus.v1.Queue` and `chorus.v1.Barrier` services (etcdctl has no such verbs).
//!
//! `queue pop` claims a message under a lease it grants (`--ttl`) and keeps alive
//! while it waits. After printing, it leaves the lease to run out: the printed id
//! and claim token let a later `queue ack` (or `nack`) succeed only until then,
//! after which the message goes back to the queue. `pop --ack` acknowledges the
//! message at once after printing it (at-most-once for the printed payload).

use std::time::Duration;

use base64::Engine as _;
use chorus_proto::chorus::v1::barrier_client::BarrierClient;
use chorus_proto::chorus::v1::queue_client::QueueClient;
use chorus_proto::chorus::v1::{
    DequeueRequest, EnqueueRequest, EnterRequest, LeaveRequest, LenRequest, PeekRequest, QueueMessage,
    SettleRequest,
};
use chorus_proto::etcdserverpb::lease_client::LeaseClient;
use chorus_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client_cmd::{parse_duration, parse_lease_id, GlobalOpts, WriteOut};

#[derive(clap::Args, Debug, Clone)]
pub struct QueueArgs {
    #[command(subcommand)]
    verb: QueueVerb,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum QueueVerb {
    /// Appends PAYLOAD to QUEUE; prints the message id and revision
    Push { queue: String, payload: String },
    /// Claims the oldest message (waiting up to --timeout); prints id, claim token and payload
    Pop {
        queue: String,
        /// How long to wait for a message (e.g. 10s; 0s: do not wait)
        #[arg(long, default_value = "10s", value_parser = parse_wait)]
        timeout: Duration,
        /// TTL of the lease the claim is held under: a later `ack` must come before it ends
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        ttl: Duration,
        /// Acknowledge the message right after printing it
        #[arg(long)]
        ack: bool,
        /// Deliveries before a message moves to QUEUE.dead-letter (0: the server's default)
        #[arg(long, default_value_t = 0)]
        max_deliveries: u32,
    },
    /// Removes a claimed message (ID and TOKEN as `pop` printed them)
    Ack { queue: String, id: u64, token: i64 },
    /// Returns a claimed message to the queue
    Nack { queue: String, id: u64, token: i64 },
    /// Prints how many messages QUEUE holds, and how many are claimed
    Len { queue: String },
    /// Prints the message `pop` would claim next, without claiming it
    Peek { queue: String },
}

#[derive(clap::Args, Debug, Clone)]
pub struct BarrierArgs {
    #[command(subcommand)]
    verb: BarrierVerb,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum BarrierVerb {
    /// Enters barrier NAME and returns once COUNT participants have entered
    Enter {
        name: String,
        count: u32,
        /// How long to wait (e.g. 30s)
        #[arg(long, default_value = "30s", value_parser = parse_wait)]
        timeout: Duration,
        /// Enter with this existing lease (hex) instead of granting one
        #[arg(long, value_parser = parse_lease_id)]
        lease: Option<i64>,
        /// TTL of the lease granted when --lease is not given
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Leaves barrier NAME and returns once every participant has left
    Leave {
        name: String,
        /// The lease (hex) the participant entered with, as `enter` printed it
        #[arg(long, value_parser = parse_lease_id)]
        lease: i64,
        #[arg(long, default_value = "30s", value_parser = parse_wait)]
        timeout: Duration,
    },
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    if text.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

type Failure = String;

async fn channel(global: &GlobalOpts) -> Result<Channel, Failure> {
    let mut last = String::from("no endpoints given");
    for endpoint in &global.endpoints {
        let endpoint = endpoint.trim();
        let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let Ok(target) = tonic::transport::Endpoint::from_shared(uri.clone()) else {
            last = format!("invalid endpoint {endpoint:?}");
            continue;
        };
        match target.connect_timeout(global.dial_timeout).tcp_nodelay(true).connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) => last = format!("cannot connect to {uri}: {error}"),
        }
    }
    Err(last)
}

fn status_text(status: tonic::Status) -> Failure {
    status.message().to_string()
}

/// Bounds one call: its own wait plus the command timeout.
fn timed<T>(wait: Duration, global: &GlobalOpts, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(wait + global.command_timeout);
    request
}

fn print(write_out: WriteOut, json: &impl Serialize, simple: String) -> Result<(), Failure> {
    match write_out {
        WriteOut::Json => {
            println!("{}", serde_json::to_string(json).map_err(|e| format!("encoding JSON: {e}"))?)
        }
        WriteOut::Simple | WriteOut::Table => print!("{simple}"),
    }
    Ok(())
}

#[derive(Serialize)]
struct MessageJson {
    id: u64,
    claim_token: i64,
    deliveries: u32,
    create_revision: i64,
    /// Standard base64, as etcdctl prints bytes.
    payload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    acked: bool,
}

fn message_json(message: &QueueMessage, lease: Option<i64>, acked: bool) -> MessageJson {
    MessageJson {
        id: message.id,
        claim_token: message.claim_token,
        deliveries: message.deliveries,
        create_revision: message.create_revision,
        payload: base64::engine::general_purpose::STANDARD.encode(&message.payload),
        lease: lease.map(|l| format!("{l:x}")),
        acked,
    }
}

/// Grants a lease and keeps it alive in the background until the returned guard drops.
async fn session_lease(
    channel: &Channel,
    ttl: Duration,
) -> Result<(i64, tokio::task::JoinHandle<()>), Failure> {
    let mut leases = LeaseClient::new(channel.clone());
    let ttl_s = ttl.as_secs().max(1) as i64;
    let granted = leases.lease_grant(LeaseGrantRequest { ttl: ttl_s, id: 0 }).await.map_err(status_text)?;
    let id = granted.into_inner().id;
    let keeper = tokio::spawn(async move {
        let period = Duration::from_secs((ttl_s as u64 / 3).max(1));
        let requests = futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(period).await;
            Some((LeaseKeepAliveRequest { id }, ()))
        });
        if let Ok(responses) = leases.lease_keep_alive(requests).await {
            let mut responses = responses.into_inner();
            while let Ok(Some(_)) = responses.message().await {}
        }
    });
    Ok((id, keeper))
}

pub async fn run_queue(global: &GlobalOpts, args: QueueArgs) -> i32 {
    report(queue(global, args).await)
}

pub async fn run_barrier(global: &GlobalOpts, args: BarrierArgs) -> i32 {
    report(barrier(global, args).await)
}

fn report(result: Result<(), Failure>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("Error: {message}");
            1
        }
    }
}

async fn queue(global: &GlobalOpts, args: QueueArgs) -> Result<(), Failure> {
    let channel = channel(global).await?;
    let mut client = QueueClient::new(channel.clone());
    let none = Duration::ZERO;
    let is_ack = matches!(args.verb, QueueVerb::Ack { .. });
    match args.verb {
        QueueVerb::Push { queue, payload } => {
            let request = EnqueueRequest { queue, payload: payload.into_bytes() };
            let response =
                client.enqueue(timed(none, global, request)).await.map_err(status_text)?.into_inner();
            #[derive(Serialize)]
            struct Pushed {
                id: u64,
                revision: i64,
            }
            let simple = format!("{}\n", response.id);
            print(global.write_out, &Pushed { id: response.id, revision: response.revision }, simple)
        }
        QueueVerb::Pop { queue, timeout, ttl, ack, max_deliveries } => {
            let (lease, keeper) = session_lease(&channel, ttl).await?;
            let request = DequeueRequest {
                queue: queue.clone(),
                lease,
                timeout_ms: timeout.as_millis() as i64,
                max_deliveries,
            };
            let popped = client.dequeue(timed(timeout, global, request)).await;
            keeper.abort();
            let mut leases = LeaseClient::new(channel.clone());
            let message = match popped {
                Ok(response) => {
                    response.into_inner().message.ok_or("the server answered without a message")?
                }
                Err(status) => {
                    let _ = leases.lease_revoke(LeaseRevokeRequest { id: lease }).await;
                    return Err(status_text(status));
                }
            };
            if ack {
                let settle = SettleRequest { queue, id: message.id, claim_token: message.claim_token };
                client.ack(timed(none, global, settle)).await.map_err(status_text)?;
                let _ = leases.lease_revoke(LeaseRevokeRequest { id: lease }).await;
            }
            let simple = format!(
                "{}\n{}\n{}\n",
                message.id,
                message.claim_token,
                String::from_utf8_lossy(&message.payload)
            );
            print(global.write_out, &message_json(&message, (!ack).then_some(lease), ack), simple)
        }
        QueueVerb::Ack { queue, id, token } | QueueVerb::Nack { queue, id, token } => {
            let request = timed(none, global, SettleRequest { queue, id, claim_token: token });
            let response = if is_ack { client.ack(request).await } else { client.nack(request).await }
                .map_err(status_text)?;
            #[derive(Serialize)]
            struct Settled {
                revision: i64,
            }
            let revision = response.into_inner().revision;
            let simple = format!("{}\n", if is_ack { "OK" } else { "RETURNED" });
            print(global.write_out, &Settled { revision }, simple)
        }
        QueueVerb::Len { queue } => {
            let response =
                client.len(timed(none, global, LenRequest { queue })).await.map_err(status_text)?;
            let response = response.into_inner();
            #[derive(Serialize)]
            struct Length {
                count: u64,
                claimed: u64,
                revision: i64,
            }
            let simple = format!("{}\n", response.count);
            let json =
                Length { count: response.count, claimed: response.claimed, revision: response.revision };
            print(global.write_out, &json, simple)
        }
        QueueVerb::Peek { queue } => {
            let response =
                client.peek(timed(none, global, PeekRequest { queue })).await.map_err(status_text)?;
            match response.into_inner().message {
                Some(message) => {
                    let simple = format!("{}\n{}\n", message.id, String::from_utf8_lossy(&message.payload));
                    print(global.write_out, &message_json(&message, None, false), simple)
                }
                None => print(global.write_out, &serde_json::json!({}), String::new()),
            }
        }
    }
}

async fn barrier(global: &GlobalOpts, args: BarrierArgs) -> Result<(), Failure> {
    let channel = channel(global).await?;
    let mut client = BarrierClient::new(channel.clone());
    match args.verb {
        BarrierVerb::Enter { name, count, timeout, lease, ttl } => {
            let (lease, keeper) = match lease {
                Some(lease) => (lease, None),
                None => {
                    let (lease, keeper) = session_lease(&channel, ttl).await?;
                    (lease, Some(keeper))
                }
            };
            let request = EnterRequest { name, count, lease, timeout_ms: timeout.as_millis() as i64 };
            let entered = client.enter(timed(timeout, global, request)).await;
            if let Some(keeper) = keeper {
                keeper.abort();
            }
            let response = entered.map_err(status_text)?.into_inner();
            #[derive(Serialize)]
            struct Entered {
                trip_revision: i64,
                participants: u32,
                lease: String,
            }
            let simple = format!("{lease:x}\n");
            let json = Entered {
                trip_revision: response.trip_revision,
                participants: response.participants,
                lease: format!("{lease:x}"),
            };
            print(global.write_out, &json, simple)
        }
        BarrierVerb::Leave { name, lease, timeout } => {
            let request = LeaveRequest { name, lease, timeout_ms: timeout.as_millis() as i64 };
            let response = client.leave(timed(timeout, global, request)).await.map_err(status_text)?;
            #[derive(Serialize)]
            struct Left {
                revision: i64,
            }
            print(global.write_out, &Left { revision: response.into_inner().revision }, "OK\n".to_string())
        }
    }
}
