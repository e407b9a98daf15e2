//! Bad input at the broker port: garbage bytes, an oversized payload and a wildcard in a
//! PUBLISH topic. Each is refused (the connection closed, or the event refused and counted),
//! nothing invalid reaches the buffer, and a well-behaved client keeps being served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use telemesh_edge::{Agent, EdgeConfig};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
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

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 3.1.1 session over a plain socket, for sending what no client library would.
fn connect_raw(addr: SocketAddr, id: &str) -> TcpStream {
    handshake(TcpStream::connect(addr).unwrap(), id)
}

fn handshake(mut s: TcpStream, id: &str) -> TcpStream {
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

fn publish_raw(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// True when the server closes the connection (EOF or reset) within the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
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

fn wait_until(mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "condition not reached in time");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_clients_are_refused_and_good_ones_keep_being_served() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(telemesh_edge::BrokerErrorCounter)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = EdgeConfig::from_toml(&format!(
        "[agent]\nid = \"gw-bad\"\ndata_dir = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\nmax_payload = \"1KiB\"\n[buffer]\nmax_bytes = \"64MiB\"\nmap_size = \"128MiB\"\n",
        dir.path().display()
    ))
    .unwrap();
    let agent = Agent::start(&cfg).unwrap();
    // Wait for the port with a well-behaved session, so the wait itself is no error.
    let until = Instant::now() + Duration::from_secs(10);
    let probe = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) => {
                assert!(Instant::now() < until, "broker never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let mut probe = handshake(probe, "probe");
    probe.write_all(&[0xE0, 0]).unwrap(); // DISCONNECT
    assert!(closed_by_server(&mut probe));
    let errors_at_start = telemesh_edge::broker_connection_errors();

    // A good client publishing throughout.
    let good = std::thread::spawn(move || {
        let mut opts = MqttOptions::new("good", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 100);
        let producer = std::thread::spawn(move || {
            for n in 0..1_000u32 {
                client
                    .publish("site/good", QoS::AtLeastOnce, false, n.to_string())
                    .unwrap();
            }
            client
        });
        let mut acked = 0;
        for ev in conn.iter() {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = ev {
                acked += 1;
                if acked == 1_000 {
                    break;
                }
            }
        }
        drop(producer.join().unwrap());
        acked
    });

    // Garbage instead of CONNECT.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage
        .write_all(b"\xff\xff\xff\xff\x7fGET / HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_server(&mut garbage),
        "garbage closes the connection"
    );
    wait_until(|| telemesh_edge::broker_connection_errors() > errors_at_start);
    let errors_before_big = telemesh_edge::broker_connection_errors();

    // A payload over max_payload.
    let mut big = connect_raw(addr, "big");
    big.write_all(&publish_raw(b"site/big", &[b'x'; 4096]))
        .unwrap();
    assert!(
        closed_by_server(&mut big),
        "an oversized publish closes the connection"
    );
    wait_until(|| telemesh_edge::broker_connection_errors() > errors_before_big);

    // A wildcard in a PUBLISH topic: rumqttd takes it; the agent refuses it at the tap.
    let mut wild = connect_raw(addr, "wild");
    wild.write_all(&publish_raw(b"site/+/bad", b"1")).unwrap();

    assert_eq!(good.join().unwrap(), 1_000);
    let reader = agent.reader();
    let until = Instant::now() + Duration::from_secs(30);
    while reader.state().unwrap().events < 1_000 || agent.metrics().snapshot().rejected_invalid < 1
    {
        assert!(
            Instant::now() < until,
            "good events or the refusal never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = reader.read(None, usize::MAX).unwrap();
    let topics: std::collections::BTreeSet<&str> =
        events.iter().map(|s| s.event.topic.as_str()).collect();
    assert_eq!(topics.into_iter().collect::<Vec<_>>(), vec!["site/good"]);
    let payloads: Vec<u32> = events
        .iter()
        .map(|s| {
            std::str::from_utf8(&s.event.payload)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(payloads, (0..1_000).collect::<Vec<_>>());
    let m = agent.metrics().snapshot();
    assert_eq!(m.rejected_invalid, 1);
    assert_eq!(m.drops(), 0);
    agent.shutdown().unwrap();
}
