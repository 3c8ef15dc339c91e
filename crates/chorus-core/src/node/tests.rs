//! Scripted cluster tests of the node logic: three nodes in memory, messages passed
//! by hand, with a filter to cut links. Persist batches are dropped (no storage
//! here); `chorus-storage` and the simulator cover persistence.

use super::*;
use chorus_proto::etcdserverpb::{PutRequest, RangeRequest};

struct Cluster {
    nodes: Vec<Node>,
    /// Links that drop every message: (from, to).
    cut: Vec<(u64, u64)>,
    replies: Vec<(u64, Reply)>,
    reads: Vec<(u64, u64)>,
    /// Drops the next accepting append answer on this link: (from, to).
    lose_next_append_answer: Option<(u64, u64)>,
}

fn config(id: u64) -> NodeConfig {
    NodeConfig {
        id,
        initial_voters: vec![1, 2, 3],
        election_ticks: 10,
        heartbeat_ticks: 1,
        seed: 7,
        boot_id: 1,
        tick_ms: 100,
        log_entries_max: 1_000_000,
        log_bytes_max: u64::MAX,
        log_catchup_entries: 0,
        log_held_entries_min: 0,
        snapshot_retry_ticks: 30,
        inline_snapshots: true,
    }
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_config(config)
    }

    fn with_config(config: impl Fn(u64) -> NodeConfig) -> Cluster {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes =
            (1..=3).map(|id| Node::new(&config(id), Recovered::default(), &logger).unwrap()).collect();
        Cluster {
            nodes,
            cut: Vec::new(),
            replies: Vec::new(),
            reads: Vec::new(),
            lose_next_append_answer: None,
        }
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Runs cycles and delivers messages until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut messages = Vec::new();
            for node in &mut self.nodes {
                let id = node.status().id;
                while node.has_work() {
                    let cycle = node.begin_cycle();
                    messages.extend(cycle.messages);
                    let finished = node.finish_cycle();
                    messages.extend(finished.messages);
                    for reply in cycle.replies.into_iter().chain(finished.replies) {
                        self.replies.push((id, reply));
                    }
                    for ctx in cycle.reads_ready.into_iter().chain(finished.reads_ready) {
                        self.reads.push((id, ctx));
                    }
                }
            }
            if messages.is_empty() {
                return;
            }
            for message in messages {
                if self.lose_next_append_answer == Some((message.from, message.to))
                    && message.get_msg_type() == raft::prelude::MessageType::MsgAppendResponse
                    && !message.reject
                {
                    self.lose_next_append_answer = None;
                    continue;
                }
                if !self.cut.contains(&(message.from, message.to)) {
                    self.node(message.to).step(message);
                }
            }
        }
        panic!("cluster did not settle");
    }

    fn tick_all(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for node in &mut self.nodes {
                node.tick();
            }
            self.settle();
        }
    }

    fn leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.status().role == StateRole::Leader)
            .map(|n| n.status().id)
            .collect();
        assert!(
            leaders.len() <= 1 || {
                let terms: Vec<u64> =
                    leaders.iter().map(|id| self.nodes[(*id - 1) as usize].status().term).collect();
                terms.windows(2).all(|w| w[0] != w[1])
            }
        );
        leaders.into_iter().max_by_key(|id| self.nodes[(*id - 1) as usize].status().term)
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(PutRequest { key: key.into(), value: value.into(), ..Default::default() })
}

#[test]
fn three_nodes_elect_one_leader() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().expect("a leader");
    for node in &cluster.nodes {
        assert_eq!(node.status().leader_id, leader);
    }
}

#[test]
fn proposals_of_one_pass_reach_each_follower_in_one_append_and_are_acknowledged_once() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    for seq in 1..=10 {
        cluster.node(leader).propose(seq, put(&format!("k{seq}"), "v")).unwrap();
    }
    let cycle = cluster.node(leader).begin_cycle();
    let _ = cluster.node(leader).finish_cycle();
    let appends: Vec<&Message> =
        cycle.messages.iter().filter(|m| m.get_msg_type() == raft::prelude::MessageType::MsgAppend).collect();
    assert_eq!(appends.len(), 2, "one append per follower: {appends:?}");
    for append in &appends {
        assert_eq!(append.entries.len(), 10);
    }
    let mut responses = Vec::new();
    for append in appends.into_iter().cloned() {
        let to = append.to;
        cluster.node(to).step(append);
        let cycle = cluster.node(to).begin_cycle();
        let finished = cluster.node(to).finish_cycle();
        let sent = cycle.messages.into_iter().chain(finished.messages);
        responses.extend(sent.filter(|m| m.get_msg_type() == raft::prelude::MessageType::MsgAppendResponse));
    }
    assert_eq!(responses.len(), 2, "one acknowledgement per follower");
    for response in responses {
        cluster.node(leader).step(response);
    }
    cluster.settle();
    let answered = cluster.replies.iter().filter(|(id, r)| *id == leader && (1..=10).contains(&r.seq));
    assert_eq!(answered.count(), 10);
}

#[test]
fn put_on_a_follower_is_forwarded_applied_everywhere_and_answered_there() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.node(follower).propose(42, put("k", "v")).unwrap();
    cluster.settle();
    cluster.tick_all(2); // followers learn the new commit index on the next heartbeat
    let answered: Vec<_> = cluster.replies.iter().filter(|(_, r)| r.seq == 42).collect();
    assert_eq!(answered.len(), 1, "exactly one reply, from the proposer");
    assert_eq!(answered[0].0, follower);
    assert!(matches!(answered[0].1.result, Ok(OpResponse::Put(_))));
    let hashes: Vec<u32> = cluster.nodes.iter().map(|n| n.mvcc().state_hash()).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "states differ: {hashes:?}");
    let range = RangeRequest { key: "k".into(), ..Default::default() };
    for node in &cluster.nodes {
        let response = node.mvcc().range(&range).unwrap();
        assert_eq!(response.kvs[0].value, b"v");
    }
}

#[test]
fn read_index_on_a_follower_waits_for_apply() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.node(leader).propose(1, put("a", "1")).unwrap();
    cluster.settle();
    cluster.node(follower).read_index(99);
    cluster.settle();
    cluster.tick_all(2);
    assert!(cluster.reads.contains(&(follower, 99)));
    let range = RangeRequest { key: "a".into(), ..Default::default() };
    assert_eq!(cluster.node(follower).mvcc().range(&range).unwrap().kvs.len(), 1);
}

#[test]
fn an_isolated_leader_steps_down_and_cannot_commit() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let old = cluster.leader().unwrap();
    for other in 1..=3 {
        if other != old {
            cluster.cut.push((old, other));
            cluster.cut.push((other, old));
        }
    }
    cluster.node(old).propose(5, put("lost", "x")).unwrap();
    cluster.tick_all(60);
    let new = cluster.leader().unwrap();
    assert_ne!(new, old, "the majority elected a new leader");
    assert_ne!(cluster.node(old).status().role, StateRole::Leader, "check-quorum stepped down");
    assert!(cluster.replies.iter().all(|(_, r)| r.seq != 5), "nothing committed without a quorum");
    assert!(matches!(cluster.node(old).propose(6, put("x", "y")), Err(ProposeError::NoLeader)));
}

#[test]
fn an_entry_from_an_earlier_boot_is_not_taken_for_a_new_proposal() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    cluster.node(leader).boot_id = 2;
    let command = Command { proposer_id: leader, proposal_seq: (1 << 40) | 3, op: Some(put("k", "v")) };
    cluster.node(leader).raw.propose(Vec::new(), command.encode_to_vec()).unwrap();
    cluster.settle();
    assert!(cluster.replies.iter().all(|(_, r)| r.seq != 3));
}

#[test]
fn a_proposal_that_is_in_the_log_twice_is_applied_once() {
    let mut cluster = Cluster::new();
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    let tag = (1u64 << 40) | 77;
    let cas = Op::Txn(chorus_proto::etcdserverpb::TxnRequest {
        compare: vec![chorus_proto::etcdserverpb::Compare {
            target: chorus_proto::etcdserverpb::compare::CompareTarget::Version as i32,
            key: b"k".to_vec(),
            target_union: Some(chorus_proto::etcdserverpb::compare::TargetUnion::Version(0)),
            ..Default::default()
        }],
        success: vec![chorus_proto::etcdserverpb::RequestOp {
            request: Some(chorus_proto::etcdserverpb::request_op::Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                value: b"first".to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![],
    });
    let command = Command { proposer_id: leader, proposal_seq: tag, op: Some(cas) };
    for _ in 0..2 {
        cluster.node(leader).raw.propose(Vec::new(), command.encode_to_vec()).unwrap();
        cluster.settle();
    }
    cluster.tick_all(2);
    let replies: Vec<_> = cluster.replies.iter().filter(|(_, r)| r.seq == 77).collect();
    assert_eq!(replies.len(), 1, "one answer for one proposal");
    for node in &cluster.nodes {
        assert_eq!(node.mvcc().revision(), 2, "applied once: one revision");
    }
}

/// A snapshot the transport delivered, whose member's answer was lost (sent before
/// its link to the leader was open): raft-rs would hold the member in snapshot
/// state, sending it nothing, until the retry (`snapshot_retry_ticks`, 30 here).
/// Told that the snapshot was delivered, the leader probes the member at its next
/// heartbeat answer and catches it up within a few ticks.
#[test]
fn a_delivered_snapshot_whose_answer_is_lost_is_followed_up_at_the_next_heartbeat() {
    let mut cluster = Cluster::with_config(|id| NodeConfig { log_entries_max: 10, ..config(id) });
    cluster.tick_all(30);
    let leader = cluster.leader().unwrap();
    let lagging = (1..=3).find(|&id| id != leader).unwrap();
    cluster.cut = vec![(leader, lagging), (lagging, leader)];
    for i in 0..50 {
        cluster.node(leader).propose(100 + i, put(&format!("k{i}"), "v")).unwrap();
        cluster.settle();
    }
    let applied = cluster.node(leader).status().applied_index;
    assert!(cluster.node(lagging).status().applied_index < applied - 40);

    cluster.cut.clear();
    cluster.lose_next_append_answer = Some((lagging, leader));
    cluster.tick_all(3);
    assert!(cluster.lose_next_append_answer.is_none(), "the member never answered a snapshot");
    let in_snapshot_state = |cluster: &mut Cluster| {
        cluster.node(leader).raw.raft.prs().get(lagging).unwrap().state == raft::ProgressState::Snapshot
    };
    assert!(in_snapshot_state(&mut cluster), "the leader still waits for the lost answer");
    let behind_by = applied - cluster.node(lagging).status().applied_index;
    cluster.tick_all(3);
    assert!(in_snapshot_state(&mut cluster), "without the report, raft-rs goes on waiting");

    cluster.node(leader).propose(200, put("after", "v")).unwrap();
    cluster.settle();
    cluster.node(leader).report_snapshot(lagging, true);
    cluster.tick_all(3);
    assert!(!in_snapshot_state(&mut cluster));
    let leader_applied = cluster.node(leader).status().applied_index;
    assert_eq!(
        cluster.node(lagging).status().applied_index,
        leader_applied,
        "the member was {behind_by} entries behind after the snapshot and did not catch up"
    );
}
