//! The telemesh mesh node and what every QUIC peer of the mesh shares.
//!
//! - [`pki`]: `telemesh certs` — a CA and the node, edge and client certificates of a mesh.

pub mod client;
pub mod config;
pub mod log;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod tls;
pub mod wire;
