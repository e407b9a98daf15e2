//! The telemesh mesh node and what every QUIC peer of the mesh shares.
//!
//! - [`node`]: the QUIC server — hello and access checks, uplink ingest, subscriptions, peers.
//! - [`log`]: the node's LMDB event log.
//! - [`replica`]: replication from upstream nodes (`[[replicate]]`).
//! - [`client`]: the consumer client library (`telemesh sub`, `telemesh status`).
//! - [`config`], [`metrics`], [`tls`], [`wire`]; [`relay`], a UDP relay that can cut a path.
//! - [`pki`]: `telemesh certs` — a CA and the node, edge and client certificates of a mesh.

pub mod client;
pub mod config;
pub mod log;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod relay;
pub mod replica;
pub mod tls;
pub mod wire;
