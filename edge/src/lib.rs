//! The telemesh edge agent: device-facing MQTT ingest and the durable LMDB buffer.

pub mod buffer;
pub mod metrics;

pub use buffer::{Buffer, BufferOptions, Incoming, Overflow, SyncMode};
pub use metrics::{EdgeMetrics, EdgeSnapshot};
pub mod agent;
pub mod config;

pub use agent::{broker_connection_errors, Agent, AgentError, BrokerErrorCounter};
pub use config::EdgeConfig;
pub mod demo;
pub mod durable;
pub mod sim;
pub mod uplink;
