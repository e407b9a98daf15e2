//! The telemesh edge agent: device-facing MQTT ingest, the durable LMDB buffer and the
//! uplink that drains it.
//!
//! - [`agent`]: the agent — embedded rumqttd and its tap, the durable port, the uplink, the
//!   HTTP surface, started and stopped together.
//! - [`buffer`]: the LMDB buffer (format and invariants in its module header).
//! - [`durable`]: the durable-ack MQTT port.
//! - [`uplink`]: the buffer as the gateway uplink's `Source`.
//! - [`config`]: `edge.toml`; [`metrics`]: the agent's counters and `/metrics` collector.
//!
//! The edge depends on `telemesh-proto`, `telemesh-quic`, `telemesh-gateway` and
//! `telemesh-http`, never on the node (`telemesh-mesh`).

pub mod agent;
pub mod buffer;
pub mod config;
pub mod durable;
pub mod metrics;
pub mod uplink;

pub use agent::{broker_connection_errors, Agent, AgentError, BrokerErrorCounter};
pub use buffer::{Buffer, BufferOptions, Incoming, Overflow, SyncMode};
pub use config::EdgeConfig;
pub use metrics::{EdgeMetrics, EdgeSnapshot};
