//! Ports on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use crate::wait::wait_for;

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most 20 s) until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    wait_for(
        &format!("a listener on {addr}"),
        Duration::from_secs(20),
        || std::net::TcpStream::connect(addr).is_ok(),
    );
}
