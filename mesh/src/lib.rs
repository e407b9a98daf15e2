//! The telemesh mesh node: the QUIC server, the LMDB event log, replication.
//!
//! - [`node`]: the QUIC server — hello and access checks, uplink ingest, subscriptions, peers.
//! - [`log`]: the node's LMDB event log.
//! - [`replica`]: replication from upstream nodes (`[[replicate]]`).
//! - [`config`]: `node.toml`; [`metrics`]: the node's `/metrics` collector.
//!
//! What every QUIC peer shares (TLS, frames, certificates) is in `telemesh-quic`; the client
//! library for consumers is `telemesh-client`.

pub mod config;
pub mod log;
pub mod metrics;
pub mod node;
pub mod replica;
