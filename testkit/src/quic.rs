//! A raw QUIC peer of a node, for tests that send what no well-behaved uplink or consumer
//! would.

use std::net::SocketAddr;
use std::path::Path;

use telemesh_proto::{Event, Frame, Role, PROTOCOL_VERSION};
use telemesh_quic::tls::{client_config, load_roots, Identity};
use telemesh_quic::wire::{write_frame, FrameReader};

/// Connects to the node at `addr` (verified as `server_name`) with the certificate
/// `certs/<name>.pem`, trusting `ca`.
pub async fn dial(
    certs: &Path,
    name: &str,
    ca: &Path,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, String> {
    let cfg = client_config(
        load_roots(ca).unwrap(),
        Identity::load(
            &certs.join(format!("{name}.pem")),
            &certs.join(format!("{name}.key")),
        )
        .unwrap(),
    )
    .unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep.connect(addr, server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// Opens a stream and says hello as `id` in `role` (an uplink's events up to 64 KiB; a
/// subscriber's frames as earlier releases take them); returns the stream and the answer.
pub async fn hello(
    conn: &quinn::Connection,
    id: &str,
    role: Role,
) -> (quinn::SendStream, FrameReader, Frame) {
    let max = if role == Role::Uplink { 65_536 } else { 0 };
    hello_with(conn, id, role, max).await
}

/// [`hello`] with the hello's `max_event_bytes` as given.
pub async fn hello_with(
    conn: &quinn::Connection,
    id: &str,
    role: Role,
    max_event_bytes: u32,
) -> (quinn::SendStream, FrameReader, Frame) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &Frame::Hello {
            version: PROTOCOL_VERSION,
            role,
            id: id.into(),
            max_event_bytes,
            compression: vec![],
        },
    )
    .await
    .unwrap();
    let mut reader = FrameReader::new(recv, 1 << 24);
    let answer = reader.next().await.unwrap().unwrap();
    (send, reader, answer)
}

/// Events `range` on `topic`, 100-byte payloads.
pub fn events(range: std::ops::RangeInclusive<u64>, topic: &str) -> Vec<Event> {
    range
        .map(|seq| Event {
            seq,
            topic: topic.into(),
            payload: vec![b'x'; 100],
            ts_us: seq,
            qos: 1,
            headers: None,
        })
        .collect()
}
