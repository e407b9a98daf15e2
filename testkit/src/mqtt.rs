//! Raw MQTT 3.1.1 and 5 packets over plain sockets: for sending what no client library
//! would, and for watching exactly what a server answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Appends MQTT's variable-length "remaining length" encoding of `n`.
pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A packet: the first byte, the remaining length and the body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// Appends an MQTT string (u16 length, bytes).
pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 3.1.1 session over a plain socket, for sending what no client library would.
pub fn connect_raw(addr: SocketAddr, id: &str) -> TcpStream {
    handshake(TcpStream::connect(addr).unwrap(), id)
}

/// Sends CONNECT (protocol level 4, clean session, keep-alive 30 s) on `s` and asserts the
/// CONNACK accepts it.
pub fn handshake(mut s: TcpStream, id: &str) -> TcpStream {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0x02, 0, 30]);
    string(id.as_bytes(), &mut body);
    s.write_all(&packet(0x10, &body)).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    s
}

/// A QoS 1 PUBLISH (packet id 1) of protocol level 4.
pub fn publish_raw(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// True when the server closes the connection (EOF or reset) within the read timeout.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// CONNECT with protocol level `level` (4 or 5), clean flag, keep-alive and optional will.
pub fn connect_packet(
    level: u8,
    id: &str,
    clean: bool,
    keep_alive: u16,
    will: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    let mut flags = if clean { 0x02 } else { 0 };
    if will.is_some() {
        flags |= 0x04;
    }
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(id.as_bytes(), &mut body);
    if let Some((topic, msg)) = will {
        if level == 5 {
            body.push(0);
        }
        string(topic.as_bytes(), &mut body);
        string(msg, &mut body);
    }
    packet(0x10, &body)
}

/// PUBLISH at `qos` (1 or 2) with a packet id, for protocol level 4 or 5.
pub fn publish_qos(
    level: u8,
    qos: u8,
    dup: bool,
    pkid: u16,
    topic: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let first = 0x30 | (qos << 1) | if dup { 0x08 } else { 0 };
    packet(first, &body)
}

/// Reads exactly `n` bytes (bounded by the socket's read timeout).
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Opens a socket and sends CONNECT; returns it with the CONNACK bytes read.
pub fn open(addr: SocketAddr, connect: &[u8], connack_len: usize) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(connect).unwrap();
    let ack = read_n(&mut s, connack_len);
    (s, ack)
}
