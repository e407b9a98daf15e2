//! `node.toml`: a node's configuration. Unknown keys are errors that name the key;
//! [`NodeConfig::validate`] names the key of every impossible value.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use telemesh_proto::topic::validate_filter;
use telemesh_proto::Role;

pub use telemesh_http::MetricsSection;
pub use telemesh_quic::config::{invalid, read_file, ConfigError};

use crate::log::Sync;

/// The whole `node.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node itself.
    pub node: NodeSection,
    /// How long and how much the log keeps.
    #[serde(default)]
    pub retention: Retention,
    /// Who may do what (default deny).
    #[serde(default)]
    pub access: Vec<Access>,
    /// `GET /metrics` and `GET /healthz` (optional).
    pub metrics: Option<MetricsSection>,
    /// Upstream nodes this node pulls topics from.
    #[serde(default)]
    pub replicate: Vec<Replicate>,
}

/// `[[replicate]]`: pull `filters` from another node (which needs an `[[access]]` entry with
/// role `peer` for this node's identity). The cursor is stored with the events it covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replicate {
    /// The upstream's address, `host:port` (UDP).
    pub from: String,
    /// The name the upstream's certificate must carry (default: the host of `from`).
    pub server_name: Option<String>,
    /// MQTT filters to replicate.
    pub filters: Vec<String>,
    /// Where to start the first time: `earliest` (default) or `latest`.
    #[serde(default = "default_replicate_start")]
    pub start: ReplicateStart,
    /// Events received from the upstream and not yet stored, at most.
    #[serde(default = "default_replicate_window")]
    pub window: u32,
    /// Longest wait between reconnect attempts.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: std::time::Duration,
    /// `zstd` to receive the rounds compressed (for a thin link between sites), or `none`.
    #[serde(default)]
    pub compression: ReplicateCompression,
}

/// How replication rounds travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicateCompression {
    /// As they are.
    #[default]
    None,
    /// zstd, level 3.
    Zstd,
}

/// Where a replication starts when it has no cursor yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicateStart {
    /// The oldest record the upstream holds.
    Earliest,
    /// After the upstream's last record at the first connection.
    Latest,
}

fn default_replicate_start() -> ReplicateStart {
    ReplicateStart::Earliest
}
fn default_replicate_window() -> u32 {
    20_000
}
fn default_backoff_max() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

impl Replicate {
    /// The name the upstream's certificate must carry.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            let host = self.from.rsplit_once(':').map_or(&*self.from, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
    }
}

/// `[retention]`: the log deletes its oldest records in the background, in chunks, never
/// waiting for consumers; a consumer whose position was deleted is told `truncated`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Records older than this (by ingest time) are deleted.
    #[serde(with = "humantime_serde")]
    pub max_age: std::time::Duration,
    /// The log's records are kept under this size, oldest deleted first (default: 75% of
    /// `node.map_size`).
    pub max_bytes: Option<ByteSize>,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub interval: std::time::Duration,
    /// A durable consumer not connected for this long is deleted (its name starts afresh).
    #[serde(with = "humantime_serde")]
    pub consumer_ttl: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: std::time::Duration::from_secs(7 * 24 * 3600),
            max_bytes: None,
            interval: std::time::Duration::from_secs(1),
            consumer_ttl: std::time::Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's id; its certificate's name.
    pub id: String,
    /// Where the log lives (`data_dir/log`).
    pub data_dir: PathBuf,
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// The mesh CA (PEM).
    pub ca: PathBuf,
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's key (PEM).
    pub key: PathBuf,
    /// `always`, `interval` or `none`.
    #[serde(default = "default_sync")]
    pub sync: Sync,
    /// LMDB map size of the log.
    #[serde(default = "default_map_size")]
    pub map_size: ByteSize,
    /// Largest event (topic + payload) stored.
    #[serde(default = "default_max_event")]
    pub max_event_bytes: ByteSize,
    /// Largest frame accepted from an uplink (consumers and peers send small frames only:
    /// [`SUBSCRIBER_MAX_FRAME`]).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: ByteSize,
    /// How long a new stream may take to send its hello (read with a limit of
    /// [`HELLO_MAX_FRAME`] bytes) before the connection is closed.
    #[serde(default = "default_hello_timeout", with = "humantime_serde")]
    pub hello_timeout: std::time::Duration,
    /// Connections at most, all identities together; more are refused before their
    /// handshake.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections of one identity at most; more are closed after the handshake with
    /// LIMIT_EXCEEDED.
    #[serde(default = "default_max_connections_per_identity")]
    pub max_connections_per_identity: usize,
}

/// Room for an event's framing in a frame (ids, lengths, the frame's other fields).
pub const FRAME_HEADROOM: u32 = 64 * 1024;
/// The largest frame a consumer or peer accepts when its hello names none (0): what the
/// client library and nodes of earlier releases accept.
pub const LEGACY_SUBSCRIBER_FRAME: u32 = 64 * 1024 * 1024;

/// The largest first frame of a stream (a hello), in bytes.
pub const HELLO_MAX_FRAME: u32 = 4 * 1024;
/// The largest frame a consumer or a peer may send (subscribe, credit, acks), in bytes.
pub const SUBSCRIBER_MAX_FRAME: u32 = 64 * 1024;

fn default_hello_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}
fn default_max_connections() -> usize {
    4_096
}
fn default_max_connections_per_identity() -> usize {
    64
}

fn default_sync() -> Sync {
    Sync::Always
}
fn default_map_size() -> ByteSize {
    ByteSize::gib(64)
}
fn default_max_event() -> ByteSize {
    ByteSize::mib(1)
}
fn default_max_frame() -> ByteSize {
    ByteSize::mib(16)
}

/// `[[access]]`: one identity's role and filters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// The certificate identity.
    pub identity: String,
    /// `uplink`, `consumer` or `peer`.
    pub role: RoleName,
    /// For uplinks: MQTT filters every event's topic must match.
    #[serde(default)]
    pub publish: Vec<String>,
    /// For consumers and peers: filters a subscription must lie within.
    pub read: Option<Vec<String>>,
}

/// A role as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// An edge agent's uplink.
    Uplink,
    /// A consumer.
    Consumer,
    /// Another node.
    Peer,
}

impl RoleName {
    /// The wire role.
    pub fn role(self) -> Role {
        match self {
            RoleName::Uplink => Role::Uplink,
            RoleName::Consumer => Role::Consumer,
            RoleName::Peer => Role::Peer,
        }
    }
}

impl NodeConfig {
    /// Parses and validates TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read_file(path)?)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if let Err(why) = telemesh_proto::validate_name("node.id", &n.id) {
            return Err(invalid("node.id", why));
        }
        for (key, path) in [
            ("node.ca", &n.ca),
            ("node.cert", &n.cert),
            ("node.key", &n.key),
        ] {
            if !path.exists() {
                return Err(invalid(key, format!("{} does not exist", path.display())));
            }
        }
        if n.map_size.as_u64() < 1 << 20 {
            return Err(invalid("node.map_size", "must be at least 1MiB"));
        }
        // One event with its framing must fit in one frame, the node's and every consumer's
        // (earlier client releases accept frames up to 64 MiB).
        let fits = |limit: u64| n.max_event_bytes.as_u64() + u64::from(FRAME_HEADROOM) <= limit;
        if n.max_event_bytes.as_u64() == 0
            || !fits(n.max_frame_bytes.as_u64())
            || !fits(u64::from(LEGACY_SUBSCRIBER_FRAME))
        {
            return Err(invalid(
                "node.max_event_bytes",
                "must be above 0, and with 64KiB of framing fit in node.max_frame_bytes and in 64MiB",
            ));
        }
        if n.max_frame_bytes.as_u64() > u64::from(u32::MAX) {
            return Err(invalid("node.max_frame_bytes", "must be below 4GiB"));
        }
        if n.hello_timeout.is_zero() {
            return Err(invalid("node.hello_timeout", "must be above 0"));
        }
        if n.max_connections == 0 {
            return Err(invalid("node.max_connections", "must be at least 1"));
        }
        if n.max_connections_per_identity == 0 {
            return Err(invalid(
                "node.max_connections_per_identity",
                "must be at least 1",
            ));
        }
        if self.retention.interval.is_zero() {
            return Err(invalid("retention.interval", "must be above 0"));
        }
        if self
            .retention
            .max_bytes
            .is_some_and(|b| b.as_u64() > n.map_size.as_u64() / 10 * 8)
        {
            return Err(invalid(
                "retention.max_bytes",
                "must be at most 80% of node.map_size",
            ));
        }
        for (i, a) in self.access.iter().enumerate() {
            for f in a.publish.iter().chain(a.read.iter().flatten()) {
                validate_filter(f)
                    .map_err(|e| invalid(format!("access[{i}]"), format!("filter {f:?}: {e}")))?;
            }
            if a.role == RoleName::Uplink && a.publish.is_empty() {
                return Err(invalid(
                    format!("access[{i}].publish"),
                    "an uplink needs at least one filter",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.replicate.iter().enumerate() {
            if r.from
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(invalid(format!("replicate[{i}].from"), "must be host:port"));
            }
            if !seen.insert(r.from.as_str()) {
                return Err(invalid(
                    format!("replicate[{i}].from"),
                    "another entry pulls from the same address",
                ));
            }
            if r.filters.is_empty() {
                return Err(invalid(
                    format!("replicate[{i}].filters"),
                    "at least one filter",
                ));
            }
            for f in &r.filters {
                validate_filter(f).map_err(|e| {
                    invalid(format!("replicate[{i}].filters"), format!("{f:?}: {e}"))
                })?;
            }
            if r.window == 0 {
                return Err(invalid(format!("replicate[{i}].window"), "must be above 0"));
            }
        }
        Ok(())
    }

    /// The retention size limit in force.
    pub fn retention_max_bytes(&self) -> u64 {
        self.retention
            .max_bytes
            .map_or(self.node.map_size.as_u64() / 4 * 3, |b| b.as_u64())
    }

    /// The commented default configuration.
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }

    /// The access entry for `identity` in `role`, if any.
    pub fn access_for(&self, identity: &str, role: Role) -> Option<&Access> {
        self.access
            .iter()
            .find(|a| a.identity == identity && a.role.role() == role)
    }
}

const DEFAULT_TOML: &str = r#"# telemesh mesh node
[node]
id = "node-a"                      # the node's certificate name
data_dir = "/var/lib/telemesh/node" # the log lives in data_dir/log
listen = "0.0.0.0:7800"            # UDP (QUIC, ALPN telemesh/1)
ca = "certs/ca.pem"                # the mesh CA; every peer must present a certificate from it
cert = "certs/node-a.pem"
key = "certs/node-a.key"
sync = "always"                    # or "interval", or "none"
map_size = "64GiB"                 # LMDB map size of the log
max_event_bytes = "1MiB"           # largest event (topic + payload) stored
max_frame_bytes = "16MiB"          # largest frame accepted from an uplink
hello_timeout = "5s"               # a new stream's hello (at most 4 KiB) must come this fast
max_connections = 4096             # connections at most; more are refused before the handshake
max_connections_per_identity = 64  # per certificate identity; more are closed (limit_exceeded)

[retention]
max_age = "7d"                     # records older than this (ingest time) are deleted
max_bytes = "50GiB"                # oldest first, to stay under this; at most 80% of map_size
interval = "1s"                    # how often retention runs (in chunks, never stalling ingest)
consumer_ttl = "7d"                # a durable consumer away this long is deleted

[metrics]
listen = "127.0.0.1:9402"          # GET /metrics (Prometheus text), GET /healthz

# Default deny: every identity needs an entry.
[[access]]
identity = "site-a-gw-1"           # an edge agent's certificate name
role = "uplink"
publish = ["site-a/#"]             # every event's topic must match one of these

[[access]]
identity = "analytics"             # a cloud service
role = "consumer"
read = ["site-a/#", "site-b/#"]    # every subscription filter must lie within one of these

[[access]]
identity = "node-b"                # another node replicating from this one
role = "peer"                      # may replicate what `read` allows (everything without it)

# Pull topics from other nodes (each needs a `peer` access entry there for this node).
[[replicate]]
from = "node-b.example:7800"       # the upstream's UDP address
server_name = "node-b"             # its certificate name (default: the host of `from`)
filters = ["site-b/#"]             # what to replicate
start = "earliest"                 # or "latest": where to start the first time
window = 20000                     # events received and not yet stored, at most
backoff_max = "1s"                 # longest wait between reconnect attempts
compression = "zstd"               # or "none" (default): receive the rounds compressed
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_unknown_keys_are_named() {
        let cfg: NodeConfig = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(cfg.node.id, "node-a");
        assert_eq!(cfg.access[0].role, RoleName::Uplink);
        assert_eq!(cfg.replicate[0].server_name(), "node-b");
        assert_eq!(cfg.replicate[0].start, ReplicateStart::Earliest);
        let err = toml::from_str::<NodeConfig>(&DEFAULT_TOML.replace("map_size", "mapsize"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mapsize"), "{err}");
    }

    #[test]
    fn an_event_size_that_cannot_fit_a_frame_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.pem", "node-a.pem", "node-a.key"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let d = dir.path().display();
        let base = format!(
            "[node]\nid = \"node-a\"\ndata_dir = \"{d}/x\"\nlisten = \"127.0.0.1:0\"\n\
             ca = \"{d}/ca.pem\"\ncert = \"{d}/node-a.pem\"\nkey = \"{d}/node-a.key\"\n"
        );
        // The event plus 64 KiB of framing must fit the node's frame and 64 MiB.
        for bad in [
            "max_event_bytes = \"16MiB\"\nmax_frame_bytes = \"16MiB\"",
            "max_event_bytes = \"64MiB\"\nmax_frame_bytes = \"256MiB\"",
        ] {
            let err = NodeConfig::from_toml(&format!("{base}{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("node.max_event_bytes"), "{err}");
        }
        for bad in [
            "hello_timeout = \"0s\"",
            "max_connections = 0",
            "max_connections_per_identity = 0",
        ] {
            let err = NodeConfig::from_toml(&format!("{base}{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("node."), "{err}");
        }
        NodeConfig::from_toml(&format!(
            "{base}max_event_bytes = \"8MiB\"\nmax_frame_bytes = \"16MiB\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn bad_filters_and_missing_files_name_their_key() {
        let mut cfg: NodeConfig = toml::from_str(DEFAULT_TOML).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("node.ca:"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "n.pem", "n.key"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        cfg.node.ca = dir.path().join("ca.pem");
        cfg.node.cert = dir.path().join("n.pem");
        cfg.node.key = dir.path().join("n.key");
        cfg.validate().unwrap();
        cfg.access[0].publish = vec!["site-a/#/x".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("access[0]:"), "{err}");
        cfg.access[0].publish = vec!["site-a/#".into()];
        cfg.replicate[0].filters = vec!["a/#/b".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("replicate[0].filters:"), "{err}");
        cfg.replicate[0].filters = vec!["a/#".into()];
        cfg.replicate[0].from = "node-b".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("replicate[0].from:"), "{err}");
    }
}
