//! The durable-ack port with real clients (rumqttc, and raw sockets for what clients would
//! not send): acknowledgements after commit, QoS 2 exactly once, session handling, protocol
//! errors answered with the right reason codes, and backpressure instead of loss.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemesh_edge::{Agent, EdgeConfig};
use telemesh_testkit::mqtt::*;
use telemesh_testkit::{free_port, wait_for};

fn agent(dir: &std::path::Path, buffer: &str) -> (Agent, SocketAddr) {
    let cfg = EdgeConfig::from_toml(&format!(
        "[agent]\nid = \"gw-durable\"\ndata_dir = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{}\"\n\
         [durable]\nlisten = \"127.0.0.1:0\"\nmax_inflight = 100\nmax_packet = \"4KiB\"\n[buffer]\n{buffer}\n",
        dir.display(),
        free_port()
    ))
    .unwrap();
    let agent = Agent::start(&cfg).unwrap();
    let addr = agent.durable_addr().unwrap();
    (agent, addr)
}

const BIG: &str = "max_bytes = \"64MiB\"\nmap_size = \"128MiB\"";

#[test]
fn qos1_from_ten_clients_all_acked_after_commit_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(dir.path(), BIG);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..10usize {
            tasks.push(tokio::spawn(async move {
                let mut o = MqttOptions::new(format!("d{c}"), "127.0.0.1", addr.port());
                o.set_keep_alive(Duration::from_secs(30));
                let (cli, mut ev) = AsyncClient::new(o, 200);
                tokio::spawn(async move {
                    for n in 0..5_000u32 {
                        cli.publish(
                            format!("site/d{c}"),
                            QoS::AtLeastOnce,
                            false,
                            format!("{c}:{n}"),
                        )
                        .await
                        .unwrap();
                    }
                    cli
                });
                let mut acked = 0;
                while acked < 5_000 {
                    if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await.unwrap() {
                        acked += 1;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Every PUBACK was sent after the commit: the events are there the moment acks are in.
    let events = agent.reader().read(None, usize::MAX).unwrap();
    assert_eq!(events.len(), 50_000);
    let mut next: HashMap<usize, usize> = HashMap::new();
    for s in &events {
        let (c, n) = std::str::from_utf8(&s.event.payload)
            .unwrap()
            .split_once(':')
            .unwrap();
        let (c, n): (usize, usize) = (c.parse().unwrap(), n.parse().unwrap());
        let e = next.entry(c).or_default();
        assert_eq!(n, *e, "per-client order");
        *e += 1;
        assert_eq!(s.event.qos, 1);
    }
    let m = agent.metrics().snapshot();
    assert_eq!(m.durable_acks, 50_000);
    assert!(m.commits < 50_000, "pipelined publishes share commits");
    agent.shutdown().unwrap();
}

#[test]
fn qos2_is_exactly_once_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(dir.path(), BIG);
    let connect = connect_packet(4, "q2", false, 30, None);
    let (mut s, ack) = open(addr, &connect, 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    s.write_all(&publish_qos(4, 2, false, 7, b"site/q2", b"first"))
        .unwrap();
    assert_eq!(read_n(&mut s, 4), [0x50, 2, 0, 7], "PUBREC after commit");
    drop(s); // the connection drops before PUBREL

    let (mut s, ack) = open(addr, &connect, 4);
    assert_eq!(
        ack,
        [0x20, 2, 1, 0],
        "the session (its QoS 2 state) is present"
    );
    s.write_all(&publish_qos(4, 2, true, 7, b"site/q2", b"first"))
        .unwrap();
    assert_eq!(
        read_n(&mut s, 4),
        [0x50, 2, 0, 7],
        "a resend is answered, not stored"
    );
    s.write_all(&[0x62, 2, 0, 7]).unwrap(); // PUBREL
    assert_eq!(read_n(&mut s, 4), [0x70, 2, 0, 7], "PUBCOMP");
    // The packet id is free again: a new message with it is a new event.
    s.write_all(&publish_qos(4, 2, false, 7, b"site/q2", b"second"))
        .unwrap();
    assert_eq!(read_n(&mut s, 4), [0x50, 2, 0, 7]);
    s.write_all(&[0x62, 2, 0, 7]).unwrap();
    assert_eq!(read_n(&mut s, 4), [0x70, 2, 0, 7]);
    let payloads: Vec<Vec<u8>> = agent
        .reader()
        .read(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.event.payload)
        .collect();
    assert_eq!(payloads, vec![b"first".to_vec(), b"second".to_vec()]);
    assert!(agent.metrics().snapshot().durable_duplicates >= 1);

    // A clean session forgets QoS 2 state.
    let (_s, ack) = open(addr, &connect_packet(4, "q2", true, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    agent.shutdown().unwrap();
}

#[test]
fn protocol_errors_close_with_reason_codes_and_others_keep_going() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(dir.path(), BIG);
    let v5_connack_len = |s: &mut std::net::TcpStream| {
        // CONNACK: 0x20, remaining length, then that many bytes.
        let head = read_n(s, 2);
        assert_eq!(head[0], 0x20);
        let rest = read_n(s, head[1] as usize);
        assert_eq!(rest[1], 0, "v5 CONNACK success");
    };
    let disconnect_reason = |s: &mut std::net::TcpStream| -> u8 {
        let head = read_n(s, 2);
        assert_eq!(head[0], 0xE0, "a DISCONNECT");
        read_n(s, head[1] as usize)[0]
    };
    // A good client publishing alongside.
    let mut good = {
        let (s, ack) = open(addr, &connect_packet(4, "good", true, 30, None), 4);
        assert_eq!(ack, [0x20, 2, 0, 0]);
        s
    };
    // Oversized.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&connect_packet(5, "big", true, 30, None))
        .unwrap();
    v5_connack_len(&mut s);
    s.write_all(&publish_qos(5, 1, false, 1, b"site/big", &[0u8; 8192]))
        .unwrap();
    assert_eq!(disconnect_reason(&mut s), 0x95, "packet too large");
    // A wildcard in the topic.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&connect_packet(5, "wild", true, 30, None))
        .unwrap();
    v5_connack_len(&mut s);
    s.write_all(&publish_qos(5, 1, false, 1, b"site/+", b"x"))
        .unwrap();
    assert_eq!(disconnect_reason(&mut s), 0x90, "topic name invalid");
    // A second CONNECT.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&connect_packet(5, "twice", true, 30, None))
        .unwrap();
    v5_connack_len(&mut s);
    s.write_all(&connect_packet(5, "twice", true, 30, None))
        .unwrap();
    assert_eq!(disconnect_reason(&mut s), 0x82, "protocol error");
    // Garbage after CONNECT (3.1.1: just closed).
    let (mut s, _) = open(addr, &connect_packet(4, "junk", true, 30, None), 4);
    s.write_all(&[0x00, 0xff, 0xff, 0xff, 0xff, 0x7f]).unwrap();
    assert!(closed_by_server(&mut s));
    // An unsupported protocol level is answered 0x01 and closed.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&connect_packet(3, "old", true, 30, None))
        .unwrap();
    assert_eq!(read_n(&mut s, 4), [0x20, 2, 0, 1]);

    good.write_all(&publish_qos(4, 1, false, 9, b"site/good", b"still-served"))
        .unwrap();
    assert_eq!(read_n(&mut good, 4), [0x40, 2, 0, 9]);
    let events = agent.reader().read(None, usize::MAX).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.payload, b"still-served");
    let m = agent.metrics().snapshot();
    assert!(m.durable_protocol_errors >= 4, "{m:?}");
    assert_eq!(m.rejected_invalid, 1);
    agent.shutdown().unwrap();
}

#[test]
fn sessions_ping_subscribe_keepalive_will_and_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(dir.path(), BIG);
    // PINGREQ and a refused SUBSCRIBE.
    let (mut s, _) = open(addr, &connect_packet(4, "p", true, 30, None), 4);
    s.write_all(&[0xC0, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), [0xD0, 0], "PINGRESP");
    let mut sub = vec![0, 5];
    string(b"site/#", &mut sub);
    sub.push(1);
    s.write_all(&packet(0x82, &sub)).unwrap();
    assert_eq!(read_n(&mut s, 5), [0x90, 3, 0, 5, 0x80], "SUBACK failure");

    // Keep-alive of 1 s and silence: closed after 1.5 s.
    let (mut idle, _) = open(addr, &connect_packet(4, "idle", true, 1, None), 4);
    let t = std::time::Instant::now();
    assert!(closed_by_server(&mut idle));
    assert!(t.elapsed() >= Duration::from_millis(1_400));

    // A will is stored when the connection drops, not after DISCONNECT.
    let (w, _) = open(
        addr,
        &connect_packet(4, "w1", true, 30, Some(("site/will", b"gone"))),
        4,
    );
    drop(w);
    let (mut w, _) = open(
        addr,
        &connect_packet(4, "w2", true, 30, Some(("site/will", b"polite"))),
        4,
    );
    w.write_all(&[0xE0, 0]).unwrap();
    assert!(closed_by_server(&mut w));
    wait_for("the event to be stored", Duration::from_secs(20), || {
        agent.reader().state().unwrap().events >= 1
    });

    // Takeover: a second connection with the same id ends the first.
    let (mut first, _) = open(addr, &connect_packet(4, "same", true, 30, None), 4);
    let (_second, ack) = open(addr, &connect_packet(4, "same", true, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    assert!(closed_by_server(&mut first));

    let events = agent.reader().read(None, usize::MAX).unwrap();
    let wills: Vec<&[u8]> = events.iter().map(|s| s.event.payload.as_slice()).collect();
    assert_eq!(wills, vec![b"gone".as_slice()]);
    agent.shutdown().unwrap();
}

#[test]
fn a_full_buffer_under_block_stops_reading_instead_of_losing() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(
        dir.path(),
        "max_bytes = \"64KiB\"\nmap_size = \"1MiB\"\noverflow = \"block\"",
    );
    // About 130 bytes each: 1,000 events are twice the budget.
    let (mut s, _) = open(addr, &connect_packet(4, "blk", true, 30, None), 4);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for n in 0..1_000u16 {
        s.write_all(&publish_qos(4, 1, false, n + 1, b"site/blk", &[b'x'; 64]))
            .unwrap();
    }
    // Acks stop when the buffer is full: read what came.
    let mut acked = 0usize;
    let mut buf = [0u8; 4];
    while std::io::Read::read_exact(&mut s, &mut buf).is_ok() {
        assert_eq!(buf[0], 0x40);
        acked += 1;
    }
    let state = agent.reader().state().unwrap();
    assert!(acked < 1_000, "a full buffer must hold acks back");
    assert_eq!(
        state.events as usize, acked,
        "every ack is a stored event, nothing else"
    );
    assert_eq!(agent.metrics().snapshot().drops(), 0, "nothing was dropped");
    // Trimming (what a node's ack does) frees room; the rest goes in, in order.
    let h = agent.handle();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while acked < 1_000 {
        let evs = agent.reader().read(None, usize::MAX).unwrap();
        if let Some(last) = evs.last() {
            h.trim(Some((last.epoch, last.event.seq)), vec![]).unwrap();
        }
        if std::io::Read::read_exact(&mut s, &mut buf).is_ok() {
            acked += 1;
        }
    }
    h.flush().unwrap();
    let st = agent.reader().state().unwrap();
    assert_eq!(st.next_seq - 1, 1_000, "every publish got exactly one seq");
    assert!(
        agent.reader().gaps().unwrap().is_empty(),
        "no loss under block"
    );
    agent.shutdown().unwrap();
}

#[test]
fn tls_login_connection_limit_handshake_timeout_and_mqtt5_headers() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("gw.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("gw.key"), cert.signing_key.serialize_pem()).unwrap();
    let cfg = EdgeConfig::from_toml(&format!(
        r#"
[agent]
id = "gw-durable-tls"
data_dir = "{d}/data"
[mqtt]
listen = "127.0.0.1:{p}"
[durable]
listen = "127.0.0.1:0"
tls = {{ cert = "{d}/gw.pem", key = "{d}/gw.key" }}
users = {{ "dev1" = "secret" }}
max_connections = 3
connect_timeout = "1s"
[buffer]
max_bytes = "64MiB"
map_size = "128MiB"
"#,
        d = dir.path().display(),
        p = free_port()
    ))
    .unwrap();
    let agent = Agent::start(&cfg).unwrap();
    let addr = agent.durable_addr().unwrap();
    let tls = || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(c)))
    };

    // The connection limit: with 3 open, a 4th is closed at once.
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    wait_for("three durable connections", Duration::from_secs(20), || {
        agent.metrics().snapshot().durable_connections >= 3
    });
    let mut fourth = std::net::TcpStream::connect(addr).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_by_server(&mut fourth), "over the limit: closed");
    drop(held);
    wait_for(
        "every durable connection to close",
        Duration::from_secs(20),
        || agent.metrics().snapshot().durable_connections == 0,
    );

    // A silent TCP connection is closed when the handshake times out.
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        closed_by_server(&mut silent),
        "no TLS handshake within 1 s: closed"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // MQTT 3.1.1 over TLS, right password, keep-alive 0 (allowed here, unlike rumqttd).
        let mut o = MqttOptions::new("tls-ok", "localhost", addr.port());
        o.set_credentials("dev1", "secret");
        o.set_keep_alive(Duration::from_secs(0));
        o.set_transport(tls());
        let (c, mut ev) = AsyncClient::new(o, 10);
        c.publish("site/tls", QoS::AtLeastOnce, false, "on-disk")
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
        // QoS 0 is stored too (no acknowledgement to wait for): flush by a QoS 1 after it.
        c.publish("site/tls", QoS::AtMostOnce, false, "qos0")
            .await
            .unwrap();
        c.publish("site/tls", QoS::AtLeastOnce, false, "after")
            .await
            .unwrap();
        let mut acks = 0;
        while acks < 1 {
            if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await.unwrap() {
                acks += 1;
            }
        }

        // A wrong password is refused.
        let mut o = MqttOptions::new("tls-bad", "localhost", addr.port());
        o.set_credentials("dev1", "nope");
        o.set_transport(tls());
        let (_c, mut ev) = AsyncClient::new(o, 10);
        loop {
            match ev.poll().await {
                Err(e) => {
                    assert!(
                        e.to_string().to_lowercase().contains("refused")
                            || e.to_string().contains("BadUserNamePassword"),
                        "{e}"
                    );
                    break;
                }
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    panic!("accepted with a wrong password: {a:?}")
                }
                Ok(_) => {}
            }
        }

        // MQTT 5 user properties and content type become headers.
        let mut o = rumqttc::v5::MqttOptions::new("tls-v5", "localhost", addr.port());
        o.set_credentials("dev1", "secret");
        o.set_transport(tls());
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: vec![("unit".into(), "C".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        c.publish_with_properties(
            "site/v5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "21.5",
            props,
        )
        .await
        .unwrap();
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)) =
                ev.poll().await.unwrap()
            {
                break;
            }
        }
    });

    // Clients gone, their connections end on the server too.
    wait_for(
        "every durable connection to close",
        Duration::from_secs(20),
        || agent.metrics().snapshot().durable_connections == 0,
    );

    let events = agent.reader().read(None, usize::MAX).unwrap();
    let payloads: Vec<&[u8]> = events.iter().map(|s| s.event.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"on-disk"[..], b"qos0", b"after", b"21.5"]);
    let h = events[3].event.headers.as_ref().expect("headers");
    assert_eq!(h.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        h.user_properties,
        vec![("unit".to_string(), "C".to_string())]
    );
    let m = agent.metrics().snapshot();
    assert!(m.durable_refused >= 2, "bad login and the limit: {m:?}");
    assert!(
        m.durable_protocol_errors >= 1,
        "the handshake timeout: {m:?}"
    );
    agent.shutdown().unwrap();
}
