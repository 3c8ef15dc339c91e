//! Server configuration, with etcd's flag names and meanings, and the member and
//! cluster ids derived from it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chorus_core::limits::Limits;
use sha2::{Digest, Sha256};

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// Everything `chorus serve` needs, already parsed and validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Addresses to listen on for clients, as `host:port`.
    pub listen_client_addrs: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    /// Addresses to listen on for peers, as `host:port`.
    pub listen_peer_addrs: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// `--initial-cluster`: member name to its peer URLs.
    pub initial_cluster: BTreeMap<String, Vec<String>>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    /// Raft's tick: a leader heartbeats every tick.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for this long (plus up to as much again of
    /// jitter) starts an election.
    pub election_timeout_ms: u64,
    /// How long a write or linearizable read may wait for consensus before it is
    /// answered `Unavailable`.
    pub request_timeout_ms: u64,
    /// How often a watcher that asked for progress notifications and saw no event
    /// is told the current revision (etcd's default is ten minutes).
    pub watch_progress_notify_interval_ms: u64,
    /// The leader promotes learners whose log caught up (etcd needs a manual
    /// MemberPromote).
    pub auto_promote_learners: bool,
    /// `--quota-backend-bytes`: past this size the member raises NOSPACE.
    pub quota_backend_bytes: u64,
    /// `--snapshot-count`: applied log entries held before the log is compacted.
    pub snapshot_count: u64,
    /// `--corrupt-check-time`: how often the leader compares members' HashKV with
    /// its own (0: never).
    pub corrupt_check_interval_ms: u64,
    /// `--snapshot-catchup-entries`: entries kept behind a compaction.
    pub snapshot_catchup_entries: u64,
    /// `--snapshot-bytes`: payload bytes of log entries held before compaction.
    pub snapshot_bytes: u64,
    pub limits: Limits,
    /// `--listen-metrics-urls`: where `/metrics`, `/livez`, `/readyz` and `/health`
    /// are served, as `host:port` (none: not served).
    pub listen_metrics_addrs: Vec<String>,
    /// The failure detector's and clock monitor's parameters.
    pub health: chorus_core::health::HealthConfig,
    /// `--busy-poll`: how long the consensus thread polls for more inputs after a
    /// pass that did work before it sleeps, in microseconds (0: never polls).
    pub busy_poll_us: u64,
}

/// A configuration that cannot work, with a message that says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ServerConfig {
    /// Checks everything that can be checked before opening any file or socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.name.is_empty() {
            return fail("--name must not be empty".into());
        }
        let Some(own_urls) = self.initial_cluster.get(&self.name) else {
            return fail(format!("--initial-cluster has no member named {:?} (--name)", self.name));
        };
        let mut advertised = self.initial_advertise_peer_urls.clone();
        advertised.sort();
        let mut listed = own_urls.clone();
        listed.sort();
        if advertised != listed {
            return fail(format!(
                "--initial-advertise-peer-urls {} does not match --initial-cluster's {}={}",
                self.initial_advertise_peer_urls.join(","),
                self.name,
                own_urls.join(",")
            ));
        }
        if self.listen_client_addrs.is_empty() || self.listen_peer_addrs.is_empty() {
            return fail("--listen-client-urls and --listen-peer-urls must not be empty".into());
        }
        if self.heartbeat_interval_ms == 0 || self.election_timeout_ms < 5 * self.heartbeat_interval_ms {
            return fail(format!(
                "--election-timeout ({} ms) must be at least 5 times --heartbeat-interval ({} ms), which must be positive",
                self.election_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.election_timeout_ms > 50_000 {
            return fail("--election-timeout must be at most 50000 ms".into());
        }
        let request_max = chorus_core::limits::REQUEST_BYTES_MAX_MAX;
        if self.limits.request_bytes_max == 0 || self.limits.request_bytes_max > request_max {
            return fail(format!(
                "--max-request-bytes must be between 1 and {request_max} (32 MiB): every request accepted must fit in one message to the other members"
            ));
        }
        if self.request_timeout_ms == 0 {
            return fail("--request-timeout must be positive".into());
        }
        if self.quota_backend_bytes > chorus_core::limits::QUOTA_BACKEND_BYTES_MAX {
            return fail(format!(
                "--quota-backend-bytes must be at most {} (0 for the default)",
                chorus_core::limits::QUOTA_BACKEND_BYTES_MAX
            ));
        }
        let log_max = chorus_core::limits::LOG_ENTRIES_MAX_MAX;
        if self.snapshot_count == 0 || self.snapshot_count > log_max {
            return fail(format!("--snapshot-count must be between 1 and {log_max}"));
        }
        if self.snapshot_bytes < 1024 * 1024 {
            return fail("--snapshot-bytes must be at least 1048576 (1 MiB)".into());
        }
        if self.snapshot_catchup_entries > log_max {
            return fail(format!("--snapshot-catchup-entries must be at most {log_max}"));
        }
        self.health.validate().map_err(ConfigError)?;
        Ok(())
    }

    /// This member's id, derived as etcd does from its peer URLs and the cluster token.
    pub fn member_id(&self) -> u64 {
        member_id(&self.initial_cluster[&self.name], &self.initial_cluster_token)
    }

    /// Every initial member's id, by name.
    pub fn member_ids(&self) -> BTreeMap<String, u64> {
        self.initial_cluster
            .iter()
            .map(|(name, urls)| (name.clone(), member_id(urls, &self.initial_cluster_token)))
            .collect()
    }

    /// The cluster's id: a hash of its initial members' ids.
    pub fn cluster_id(&self) -> u64 {
        cluster_id(self.member_ids().into_values())
    }

    pub fn election_ticks(&self) -> usize {
        (self.election_timeout_ms / self.heartbeat_interval_ms) as usize
    }
}

/// Parses `--initial-cluster` (`name=url,name=url,...`; a name may repeat to give
/// several URLs).
pub fn parse_initial_cluster(text: &str) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
    let mut cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, url)) = item.split_once('=') else {
            return Err(ConfigError(format!("--initial-cluster entry {item:?} is not name=url")));
        };
        url_to_addr(url)?;
        cluster.entry(name.to_string()).or_default().push(url.to_string());
    }
    if cluster.is_empty() {
        return Err(ConfigError("--initial-cluster is empty".into()));
    }
    Ok(cluster)
}

/// Turns `http://host:port` into `host:port` for binding or dialing. `https` is
/// refused: TLS is not supported yet.
pub fn url_to_addr(url: &str) -> Result<String, ConfigError> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") || url.starts_with("unixs://") {
        return Err(ConfigError(format!("{url}: TLS is not supported yet; use http://")));
    } else {
        return Err(ConfigError(format!("{url}: a URL must start with http://")));
    };
    let addr = rest.trim_end_matches('/');
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(addr.to_string()),
        _ => Err(ConfigError(format!("{url}: expected http://host:port"))),
    }
}

/// Splits a comma-separated URL list.
pub fn split_urls(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// A cluster's id: a hash of its initial members' ids (in any order).
pub fn cluster_id(member_ids: impl IntoIterator<Item = u64>) -> u64 {
    let mut ids: Vec<u64> = member_ids.into_iter().collect();
    ids.sort_unstable();
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.to_be_bytes());
    }
    nonzero_u64(&hasher.finalize())
}

/// A member's id, derived as etcd does from its peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut hasher = Sha256::new();
    hasher.update(urls.join(",").as_bytes());
    hasher.update(b"\0");
    hasher.update(token.as_bytes());
    nonzero_u64(&hasher.finalize())
}

fn nonzero_u64(digest: &[u8]) -> u64 {
    let value = u64::from_be_bytes(digest[..8].try_into().expect("digest has 8 bytes"));
    value.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_groups_urls_by_name() {
        let cluster =
            parse_initial_cluster("a=http://127.0.0.1:1,b=http://127.0.0.1:2,a=http://10.0.0.1:1").unwrap();
        assert_eq!(cluster["a"], vec!["http://127.0.0.1:1", "http://10.0.0.1:1"]);
        assert_eq!(cluster["b"], vec!["http://127.0.0.1:2"]);
        assert!(parse_initial_cluster("a").is_err());
        assert!(parse_initial_cluster("a=https://x:1").is_err());
        assert!(parse_initial_cluster("").is_err());
    }

    #[test]
    fn ids_depend_on_urls_and_token() {
        let a = member_id(&["http://127.0.0.1:2380".into()], "t1");
        let b = member_id(&["http://127.0.0.1:2380".into()], "t2");
        let c = member_id(&["http://127.0.0.1:2381".into()], "t1");
        assert!(a != b && a != c && b != c);
        assert_eq!(a, member_id(&["http://127.0.0.1:2380".into()], "t1"));
    }

    #[test]
    fn urls_become_addresses() {
        assert_eq!(url_to_addr("http://127.0.0.1:2379").unwrap(), "127.0.0.1:2379");
        assert_eq!(url_to_addr("http://localhost:2379/").unwrap(), "localhost:2379");
        assert!(url_to_addr("127.0.0.1:2379").is_err());
        assert!(url_to_addr("http://127.0.0.1").is_err());
        assert!(url_to_addr("http://127.0.0.1:99999").is_err());
    }
}
