//! A cluster of real `chorus serve` processes on loopback, for tests: start, kill
//! with SIGKILL, restart, and find the leader. Every wait is bounded.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// `chorus serve` flags of this member only (a joining member's).
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial_cluster: String,
    pub extra_args: Vec<String>,
}

/// A free loopback port (bound and released; good enough for tests on one machine).
///
/// Ports come from below Linux's ephemeral range (32768 and up): a port the kernel
/// picked for `bind(0)` is also where it puts the source ports of outgoing
/// connections, and members connect to each other while others are still
/// starting, so an ephemeral pick could be taken before its member binds it.
/// Each test process walks its own stretch of 10000..32000 (seeded by its pid).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

impl Cluster {
    /// Starts `size` members with the given extra `chorus serve` flags.
    pub fn start(size: usize, extra_args: &[&str]) -> Cluster {
        let mut cluster = Cluster::prepare(size);
        cluster.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        for i in 0..size {
            cluster.restart(i);
        }
        cluster
    }

    /// Chooses ports and directories for `size` members without starting any
    /// (start each with [`Cluster::restart`]).
    pub fn prepare(size: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (1..=size)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    data_dir: dir.path().join(&name),
                    log_path: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    metrics_port: free_port(),
                    extra_args: Vec::new(),
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        Cluster { dir, members, initial_cluster, extra_args: Vec::new() }
    }

    /// Adds a member that joins the running cluster (`--initial-cluster-state
    /// existing`, with every member so far in its `--initial-cluster`), without
    /// starting it; returns its index. Add it to the cluster first (MemberAdd with
    /// [`Cluster::peer_url`]), then start it with [`Cluster::restart`].
    pub fn add_member(&mut self) -> usize {
        let i = self.members.len();
        let name = format!("m{}", i + 1);
        let member = Member {
            data_dir: self.dir.path().join(&name),
            log_path: self.dir.path().join(format!("{name}.log")),
            client_port: free_port(),
            peer_port: free_port(),
            metrics_port: free_port(),
            extra_args: vec!["--initial-cluster-state".into(), "existing".into()],
            child: None,
            name,
        };
        // Founders keep their own --initial-cluster (it fixes the cluster id); a
        // joiner lists every member so far and itself.
        let initial_cluster = self
            .members
            .iter()
            .chain(std::iter::once(&member))
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        self.members.push(member);
        self.members[i].extra_args.extend(["--initial-cluster".to_string(), initial_cluster]);
        i
    }

    /// Member `i`'s peer URL.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].peer_port)
    }

    /// Waits (bounded) for member `i`'s process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let child = self.members[i].child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.members[i].child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The `--initial-cluster` the members start with.
    pub fn initial_cluster(&self) -> String {
        self.initial_cluster.clone()
    }

    /// Starts member `i` (again), appending to its log file.
    pub fn restart(&mut self, i: usize) {
        let member = &self.members[i];
        assert!(member.child.is_none(), "member {i} is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&member.log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chorus"))
            .arg("serve")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", member.client_port)])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", member.client_port)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", member.peer_port)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", member.peer_port)])
            .args(if member.extra_args.iter().any(|a| a == "--initial-cluster") {
                Vec::new()
            } else {
                vec!["--initial-cluster".to_string(), self.initial_cluster.clone()]
            })
            .args(["--initial-cluster-token", "chorus-test"])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", member.metrics_port)])
            .args(&self.extra_args)
            .args(&member.extra_args)
            .env("CHORUS_LOG", std::env::var("CHORUS_TEST_LOG").unwrap_or_else(|_| "info,raft=info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn chorus serve");
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
        }
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to member `i`'s process.
    pub fn signal(&self, i: usize, signal: &str) {
        let child = self.members[i].child.as_ref().expect("member is running");
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Member `i`'s process id.
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].child.as_ref().expect("member is running").id()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// A client of every member.
    pub async fn client(&self) -> Client {
        connect(&self.endpoints()).await
    }

    /// A client of member `i` only.
    pub async fn client_of(&self, i: usize) -> Client {
        connect(&[self.endpoint(i)]).await
    }

    /// Waits until a running member reports itself leader; returns its index.
    pub async fn wait_leader(&self, limit: Duration) -> usize {
        let start = Instant::now();
        while start.elapsed() < limit {
            for i in (0..self.members.len()).filter(|i| self.is_running(*i)) {
                if let Some(status) = status_of(&self.endpoint(i)).await {
                    if status.leader() != 0 && status.leader() == status.header().unwrap().member_id() {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.dump_logs();
        panic!("no leader within {limit:?}");
    }

    /// Waits until member `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = status_of(&self.endpoint(i)).await {
                if status.raft_applied_index() >= index {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.dump_logs();
        panic!("member {i} did not apply index {index} within {limit:?}");
    }

    /// Every key under `prefix` with its value, read serializably from member `i`.
    pub async fn local_range(&self, i: usize, prefix: &str) -> Vec<(String, String)> {
        let mut client = self.client_of(i).await;
        let options = GetOptions::new().with_prefix().with_serializable();
        let response = client.get(prefix, Some(options)).await.expect("serializable range");
        response
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
            .collect()
    }

    pub fn dump_logs(&self) {
        for member in &self.members {
            let log = std::fs::read_to_string(&member.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- log of {} (last 40 lines) ----", member.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Runs `etcdctl` (API v3) against `endpoints` with a 10 s command timeout.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoints, "--command-timeout", "10s"])
        .args(args)
        .output()
        .expect("run etcdctl")
}

pub async fn connect(endpoints: &[String]) -> Client {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(8));
    Client::connect(endpoints, Some(options)).await.expect("connect")
}

/// `Maintenance.Status` of one endpoint, or None if it does not answer.
pub async fn status_of(endpoint: &str) -> Option<etcd_client::StatusResponse> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(2));
    let mut client = Client::connect([endpoint], Some(options)).await.ok()?;
    client.status().await.ok()
}

/// Waits (bounded) until every member sees every member's name and client URLs,
/// which members publish through the log after the first election: then the log
/// is quiet and `member list` is complete.
pub async fn wait_members_published(cluster: &Cluster, limit: Duration) {
    let start = std::time::Instant::now();
    for i in 0..cluster.members.len() {
        let mut client = cluster.client_of(i).await;
        loop {
            if let Ok(response) = client.member_list().await {
                let members = response.members();
                let published =
                    members.iter().filter(|m| !m.name().is_empty() && !m.client_urls().is_empty());
                if members.len() == cluster.members.len() && published.count() == members.len() {
                    break;
                }
            }
            if start.elapsed() > limit {
                cluster.dump_logs();
                panic!("member {i} did not see every member published within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
