//! The test kit every telemesh suite uses (a dev-dependency only, never of a library):
//! free ports, waiting on a condition with a deadline (never a bare sleep), real `telemesh`
//! processes that are killed when dropped, certificates and configs for a mesh on
//! 127.0.0.1, raw MQTT packets for sending what no client library would, HTTP scrapes, and
//! a seeded generator for simulations.
//!
//! The commonly used helpers are re-exported at the root; the raw MQTT packet builders stay
//! in [`mqtt`] (their names are short and generic).

pub mod certs;
pub mod edge;
pub mod http;
pub mod mem;
pub mod mqtt;
pub mod net;
pub mod node;
pub mod process;
pub mod quic;
pub mod rng;
pub mod wait;

pub use certs::{fake_certs, mesh_certs};
pub use edge::{
    append, buffer_dir, look, payloads, publish, test_buffer, uplink_options, write_config, QoS,
    RunningUplink, MAP_SIZE,
};
pub use http::{http_get, http_get_blocking};
pub use mem::rss_anon_kib;
pub use net::{free_port, free_udp_port, wait_listening};
pub use node::{client_config, write_client_toml, NodeToml};
pub use process::Process;
pub use rng::Rng;
pub use wait::{wait_for, wait_for_async};
