//! What every QUIC peer of a telemesh mesh shares — the node, the edge agent's uplink, the
//! client library — and nothing that only one of them needs.
//!
//! - [`tls`]: mutual TLS (rustls on ring, TLS 1.3, ALPN `telemesh/1`), the identity a
//!   certificate names, quinn's transport settings, UDP sockets with large buffers.
//! - [`wire`]: frames over quinn streams, size-bounded before any allocation; zstd-compressed
//!   frames where the handshake agreed.
//! - [`pki`]: `telemesh certs` — a CA and the node, edge and client certificates of a mesh.
//! - [`config`]: the config error every role's config reader returns.
//! - [`relay`]: a UDP relay that can cut a path (`telemesh demo` and the fault tests).

pub mod config;
pub mod pki;
pub mod relay;
pub mod tls;
pub mod wire;
