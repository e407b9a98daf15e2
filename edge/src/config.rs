//! `edge.toml`: the agent's configuration. Unknown keys are errors that name the key;
//! [`EdgeConfig::validate`] turns impossible values into errors that name the key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::buffer::{BufferOptions, Overflow, SyncMode};

/// The whole `edge.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Who the agent is and where it keeps its data.
    pub agent: AgentSection,
    /// The embedded MQTT broker devices publish to.
    #[serde(default)]
    pub mqtt: MqttSection,
    /// The durable-ack MQTT port (optional).
    pub durable: Option<DurableSection>,
    /// The durable buffer.
    #[serde(default)]
    pub buffer: BufferSection,
    /// The uplink to the mesh (optional: without it the agent only buffers).
    pub uplink: Option<UplinkSection>,
    /// `GET /metrics` and `GET /healthz` (optional).
    pub metrics: Option<telemesh_http::MetricsSection>,
}

/// `[uplink]`: batches over QUIC with mutual TLS to the first node that answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// `host:port` of nodes, tried in order.
    pub nodes: Vec<String>,
    /// The name to verify on the node's certificate (default: each entry's host).
    pub server_name: Option<String>,
    /// The mesh CA (PEM).
    pub ca: PathBuf,
    /// This agent's certificate (its name is `agent.id`).
    pub cert: PathBuf,
    /// This agent's key.
    pub key: PathBuf,
    /// Most events in one batch.
    #[serde(default = "default_batch_events")]
    pub batch_max_events: usize,
    /// Most event bytes in one batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: ByteSize,
    /// Batches in flight.
    #[serde(default = "default_window")]
    pub window: usize,
    /// The longest wait between reconnection rounds.
    #[serde(with = "humantime_serde", default = "default_backoff")]
    pub backoff_max: Duration,
    /// The longest a connection attempt may take before the next node is tried.
    #[serde(with = "humantime_serde", default = "default_uplink_connect")]
    pub connect_timeout: Duration,
    /// How long a batch that is not full may wait for more events (0: no waiting).
    #[serde(with = "humantime_serde", default)]
    pub linger: Duration,
    /// While on another node than the first, how often to check whether the first answers
    /// again, and go back to it.
    #[serde(with = "humantime_serde", default = "default_failback")]
    pub failback_interval: Duration,
    /// With batches in flight, the longest wait for the next acknowledgement before the
    /// connection is made anew.
    #[serde(with = "humantime_serde", default = "default_ack_timeout")]
    pub ack_timeout: Duration,
    /// `none` or `zstd`: compress batches when the node agrees.
    #[serde(default)]
    pub compression: UplinkCompression,
    /// At most this many bytes per second on the uplink on average (after compression);
    /// unlimited when absent.
    pub max_bandwidth: Option<ByteSize>,
}

/// How the uplink compresses its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkCompression {
    /// Batches as they are.
    #[default]
    None,
    /// zstd, level 3.
    Zstd,
}

fn default_failback() -> Duration {
    Duration::from_secs(10)
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_uplink_connect() -> Duration {
    Duration::from_secs(2)
}

fn default_batch_events() -> usize {
    1_000
}
fn default_batch_bytes() -> ByteSize {
    ByteSize::mib(1)
}
fn default_window() -> usize {
    8
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

/// `[durable]`: an MQTT 3.1.1 and 5 port for publishers whose acknowledgements mean "on disk".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurableSection {
    /// Address devices connect to.
    pub listen: SocketAddr,
    /// Optional TLS: certificate chain and key in PEM.
    pub tls: Option<TlsFiles>,
    /// Optional username → password; when set, every client must log in.
    pub users: Option<HashMap<String, String>>,
    /// Most concurrent connections.
    #[serde(default = "default_durable_connections")]
    pub max_connections: usize,
    /// Unanswered QoS 1/2 publishes per connection before the port stops reading it
    /// (announced to MQTT 5 clients as receive maximum).
    #[serde(default = "default_durable_inflight")]
    pub max_inflight: u16,
    /// Largest packet accepted.
    #[serde(default = "default_durable_packet")]
    pub max_packet: ByteSize,
    /// Time allowed for the TLS handshake and CONNECT.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// A client that set keep-alive 0 ("off") is disconnected after this long without a
    /// packet (others after 1.5 × their keep-alive, as MQTT says).
    #[serde(with = "humantime_serde", default = "default_idle_timeout")]
    pub idle_timeout: Duration,
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_durable_connections() -> usize {
    10_000
}
fn default_durable_inflight() -> u16 {
    1_000
}
fn default_durable_packet() -> ByteSize {
    ByteSize::kib(256)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[agent]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// The origin id of every event; must match the uplink certificate's name.
    pub id: String,
    /// Where the buffer lives (`data_dir/buffer`).
    pub data_dir: PathBuf,
}

/// `[mqtt]`: the embedded rumqttd broker (MQTT 3.1.1 and 5 on one port).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Address devices connect to with MQTT 3.1.1.
    pub listen: SocketAddr,
    /// Address devices connect to with MQTT 5 (optional; rumqttd serves each version on its
    /// own port).
    pub listen_v5: Option<SocketAddr>,
    /// Optional TLS: certificate and key in PEM; `ca` to require client certificates.
    pub tls: Option<TlsFiles>,
    /// Optional username → password; when set, every client must log in.
    pub users: Option<HashMap<String, String>>,
    /// Size of one in-memory segment of a topic's log in the broker.
    pub segment_bytes: ByteSize,
    /// Segments the broker keeps per topic; a reader further behind loses events (counted
    /// as an overrun and recorded as a gap).
    pub segments: usize,
    /// Largest payload a device may publish.
    pub max_payload: ByteSize,
    /// Most concurrent device connections.
    pub max_connections: usize,
    /// How long a new connection may take to send CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// QoS 1/2 messages in flight per connection.
    pub max_inflight: usize,
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// A CA to verify client certificates against (optional).
    pub ca: Option<PathBuf>,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            listen_v5: None,
            tls: None,
            users: None,
            segment_bytes: ByteSize::mib(16),
            segments: 4,
            max_payload: ByteSize::kib(256),
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            max_inflight: 100,
        }
    }
}

/// `[buffer]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSection {
    /// The most bytes buffered events may take; at most 80% of `map_size`.
    pub max_bytes: ByteSize,
    /// LMDB's map size: the largest the buffer file may grow.
    pub map_size: ByteSize,
    /// `drop-oldest`, `drop-newest` or `block`.
    pub overflow: Overflow,
    /// The longest an event may wait for its commit.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// `always`, `interval` or `none`.
    pub sync: SyncMode,
    /// With `sync = "interval"`: how often to sync.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Bytes of events that may wait for the writer (queued, or parked under `block`)
    /// before the MQTT ports stop taking more: the durable port stops reading its sockets.
    pub queue_bytes: ByteSize,
}

impl Default for BufferSection {
    fn default() -> Self {
        let o = BufferOptions::default();
        BufferSection {
            max_bytes: ByteSize::b(o.max_bytes),
            map_size: ByteSize::b(o.map_size),
            overflow: o.overflow,
            commit_interval: o.commit_interval,
            sync: o.sync,
            sync_interval: o.sync_interval,
            queue_bytes: ByteSize::b(o.queue_bytes),
        }
    }
}

pub use telemesh_quic::config::ConfigError;
use telemesh_quic::config::{invalid, read_file};

impl EdgeConfig {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: EdgeConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read_file(path)?)
    }

    /// Checks every value that parses but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.agent.id;
        // The agent's id is the origin of its events, a storage key at every node.
        if let Err(why) = telemesh_proto::validate_name("agent.id", id) {
            return Err(invalid("agent.id", why));
        }
        let b = &self.buffer;
        if b.max_bytes.as_u64() == 0 {
            return Err(invalid("buffer.max_bytes", "must be above 0"));
        }
        if b.queue_bytes.as_u64() == 0 || b.queue_bytes.as_u64() > u64::from(u32::MAX) {
            return Err(invalid(
                "buffer.queue_bytes",
                "must be above 0 and below 4GiB",
            ));
        }
        if b.max_bytes.as_u64() > b.map_size.as_u64() / 10 * 8 {
            return Err(invalid(
                "buffer.max_bytes",
                format!(
                    "{} is more than 80% of buffer.map_size ({}): deletes need room too",
                    b.max_bytes, b.map_size
                ),
            ));
        }
        if b.map_size.as_u64() < 1 << 20 {
            return Err(invalid("buffer.map_size", "must be at least 1MiB"));
        }
        if b.commit_interval.is_zero() {
            return Err(invalid("buffer.commit_interval", "must be above 0"));
        }
        if b.sync == SyncMode::Interval && b.sync_interval.is_zero() {
            return Err(invalid("buffer.sync_interval", "must be above 0"));
        }
        let m = &self.mqtt;
        if m.segments == 0 {
            return Err(invalid("mqtt.segments", "must be at least 1"));
        }
        if m.segment_bytes.as_u64() < m.max_payload.as_u64() {
            return Err(invalid(
                "mqtt.segment_bytes",
                "must be at least mqtt.max_payload, or large publishes would be skipped",
            ));
        }
        if m.max_payload.as_u64() == 0 || m.max_payload.as_u64() > 256 * 1024 * 1024 {
            return Err(invalid("mqtt.max_payload", "must be between 1B and 256MiB"));
        }
        if m.connect_timeout.as_millis() == 0 || m.connect_timeout.as_millis() > u16::MAX as u128 {
            return Err(invalid(
                "mqtt.connect_timeout",
                "must be between 1ms and 65s",
            ));
        }
        if m.max_connections == 0 {
            return Err(invalid("mqtt.max_connections", "must be at least 1"));
        }
        if m.max_inflight == 0 || m.max_inflight > u16::MAX as usize {
            return Err(invalid("mqtt.max_inflight", "must be between 1 and 65535"));
        }
        if let Some(d) = &self.durable {
            if d.listen == m.listen || Some(d.listen) == m.listen_v5 {
                return Err(invalid(
                    "durable.listen",
                    "must differ from the broker's ports",
                ));
            }
            if d.max_inflight == 0 {
                return Err(invalid("durable.max_inflight", "must be at least 1"));
            }
            if d.max_connections == 0 {
                return Err(invalid("durable.max_connections", "must be at least 1"));
            }
            if d.max_packet.as_u64() < 64 || d.max_packet.as_u64() > 256 * 1024 * 1024 {
                return Err(invalid(
                    "durable.max_packet",
                    "must be between 64B and 256MiB",
                ));
            }
            if d.idle_timeout.is_zero() {
                return Err(invalid("durable.idle_timeout", "must be above 0"));
            }
            if d.connect_timeout.is_zero() {
                return Err(invalid("durable.connect_timeout", "must be above 0"));
            }
            if let Some(tls) = &d.tls {
                for (key, path) in [
                    ("durable.tls.cert", &tls.cert),
                    ("durable.tls.key", &tls.key),
                ] {
                    if !path.exists() {
                        return Err(invalid(key, format!("{} does not exist", path.display())));
                    }
                }
            }
        }
        if let Some(u) = &self.uplink {
            if u.nodes.is_empty() {
                return Err(invalid("uplink.nodes", "name at least one node"));
            }
            if let Some(n) = u.nodes.iter().find(|n| n.rsplit_once(':').is_none()) {
                return Err(invalid("uplink.nodes", format!("{n:?} is not host:port")));
            }
            for (key, path) in [
                ("uplink.ca", &u.ca),
                ("uplink.cert", &u.cert),
                ("uplink.key", &u.key),
            ] {
                if !path.exists() {
                    return Err(invalid(key, format!("{} does not exist", path.display())));
                }
            }
            if u.failback_interval.is_zero() {
                return Err(invalid("uplink.failback_interval", "must be above 0"));
            }
            if u.max_bandwidth.is_some_and(|b| b.as_u64() < 1024) {
                return Err(invalid(
                    "uplink.max_bandwidth",
                    "must be at least 1KiB (per second)",
                ));
            }
            if u.ack_timeout.is_zero() {
                return Err(invalid("uplink.ack_timeout", "must be above 0"));
            }
            if u.connect_timeout.is_zero() {
                return Err(invalid("uplink.connect_timeout", "must be above 0"));
            }
            if u.batch_max_events == 0 || u.window == 0 {
                return Err(invalid(
                    "uplink.window",
                    "batch_max_events and window must be at least 1",
                ));
            }
            if u.batch_max_events > telemesh_proto::bounded::MAX_BATCH_EVENTS {
                return Err(invalid(
                    "uplink.batch_max_events",
                    format!(
                        "must be at most {} (the most events a node decodes in one batch)",
                        telemesh_proto::bounded::MAX_BATCH_EVENTS
                    ),
                ));
            }
            if u.batch_max_bytes.as_u64() < m.max_payload.as_u64() {
                return Err(invalid(
                    "uplink.batch_max_bytes",
                    "must be at least mqtt.max_payload",
                ));
            }
        }
        if let Some(tls) = &m.tls {
            for (key, path) in [("mqtt.tls.cert", &tls.cert), ("mqtt.tls.key", &tls.key)] {
                if !path.exists() {
                    return Err(invalid(key, format!("{} does not exist", path.display())));
                }
            }
        }
        Ok(())
    }

    /// The largest event the agent takes in and sends, as [`telemesh_proto::Event::size`]
    /// counts it (topic, payload and headers): `mqtt.max_payload` plus 64 KiB for the topic
    /// and headers. The uplink announces it in its hello (a node with a smaller maximum
    /// refuses the uplink at the handshake); both MQTT ports refuse larger events.
    pub fn max_event_bytes(&self) -> usize {
        self.mqtt.max_payload.as_u64() as usize + 65_535
    }

    /// The buffer options this config asks for.
    pub fn buffer_options(&self) -> BufferOptions {
        let b = &self.buffer;
        BufferOptions {
            max_bytes: b.max_bytes.as_u64(),
            map_size: b.map_size.as_u64(),
            overflow: b.overflow,
            sync: b.sync,
            sync_interval: b.sync_interval,
            commit_interval: b.commit_interval,
            queue_bytes: b.queue_bytes.as_u64(),
            ..BufferOptions::default()
        }
    }

    /// The commented default configuration.
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }
}

const DEFAULT_TOML: &str = r#"# telemesh edge agent
[agent]
id = "site-a-gw-1"                 # origin id of every event; the uplink certificate's name
data_dir = "/var/lib/telemesh/edge" # the buffer lives in data_dir/buffer

[mqtt]                             # embedded broker, MQTT 3.1.1 and 5
listen = "0.0.0.0:1883"             # MQTT 3.1.1
# listen_v5 = "0.0.0.0:1885"       # MQTT 5, on its own port
# tls = { cert = "certs/gw.pem", key = "certs/gw.key" }  # add ca = "..." to require client certs
# users = { "dev1" = "secret" }    # when set, every client must log in
segment_bytes = "16MiB"            # broker memory per topic = segment_bytes x segments
segments = 4                       # a tap further behind than this loses events (counted, gap recorded)
max_payload = "256KiB"
max_connections = 10000
connect_timeout = "5s"
max_inflight = 100

[durable]                          # acknowledges QoS 1/2 only after the event is on disk
listen = "0.0.0.0:1884"
# tls = { cert = "certs/gw.pem", key = "certs/gw.key" }
# users = { "dev1" = "secret" }
max_connections = 10000
max_inflight = 1000                # unanswered publishes per connection before it stops reading
max_packet = "256KiB"
connect_timeout = "5s"             # TLS handshake and CONNECT
idle_timeout = "5m"                # a keep-alive 0 client silent this long is disconnected

[buffer]
max_bytes = "1GiB"                 # at most 80% of map_size
map_size = "2GiB"
overflow = "drop-oldest"           # or "drop-newest", or "block"
commit_interval = "5ms"            # longest wait; commits happen as soon as the writer is free
sync = "always"                    # or "interval" (with sync_interval), or "none"
sync_interval = "100ms"
queue_bytes = "64MiB"              # events waiting for the writer, at most; then ports stop reading

# [uplink]                         # forward to the mesh (without it the agent only buffers)
# nodes = ["node-a.example:7800", "node-b.example:7800"]   # tried in order
# server_name = "node-a"           # name to verify on the node certificate (default: the host)
# ca = "certs/ca.pem"
# cert = "certs/site-a-gw-1.pem"   # its name must be agent.id
# key = "certs/site-a-gw-1.key"
# batch_max_events = 1000
# batch_max_bytes = "1MiB"
# window = 8                       # batches in flight
# backoff_max = "1s"               # longest wait between reconnection rounds
# connect_timeout = "2s"           # a node that is down is given up on after this
# linger = "0ms"                   # how long a batch that is not full may wait to fill
# failback_interval = "10s"        # on a later node, how often to check the first again
# ack_timeout = "5s"               # batches in flight and no ack for this long: reconnect
# compression = "zstd"             # or "none" (default): compress batches when the node agrees
# max_bandwidth = "1MiB"           # at most this many bytes per second on average (default: no cap)

[metrics]
listen = "127.0.0.1:9401"          # GET /metrics (Prometheus text), GET /healthz
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_validates() {
        let cfg = EdgeConfig::from_toml(DEFAULT_TOML).unwrap();
        assert_eq!(cfg.agent.id, "site-a-gw-1");
        assert_eq!(cfg.buffer.max_bytes, ByteSize::gib(1));
        assert_eq!(cfg.buffer.commit_interval, Duration::from_millis(5));
        assert_eq!(cfg.buffer.overflow, Overflow::DropOldest);
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = DEFAULT_TOML.replace("segments = 4", "segmnets = 4");
        let err = EdgeConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("segmnets"), "{err}");
    }

    #[test]
    fn impossible_values_name_their_key() {
        let text = DEFAULT_TOML.replace("max_bytes = \"1GiB\"", "max_bytes = \"1900MiB\"");
        let err = EdgeConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.starts_with("buffer.max_bytes:"), "{err}");
        let text = DEFAULT_TOML.replace("id = \"site-a-gw-1\"", "id = \"a/b\"");
        let err = EdgeConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.starts_with("agent.id:"), "{err}");
        let text = DEFAULT_TOML.replace("\"drop-oldest\"", "\"drop-some\"");
        let err = EdgeConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("drop-some"), "{err}");
    }
}
