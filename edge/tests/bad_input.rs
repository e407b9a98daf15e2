//! Bad input at the broker port: garbage bytes, an oversized payload and a wildcard in a
//! PUBLISH topic. Each is refused (the connection closed, or the event refused and counted),
//! nothing invalid reaches the buffer, and a well-behaved client keeps being served.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use telemesh_testkit::mqtt::*;
use telemesh_testkit::{free_port, wait_for};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use telemesh_edge::{Agent, EdgeConfig};

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
    wait_for(
        "the broker to count the bad connection",
        Duration::from_secs(20),
        || telemesh_edge::broker_connection_errors() > errors_at_start,
    );
    let errors_before_big = telemesh_edge::broker_connection_errors();

    // A payload over max_payload.
    let mut big = connect_raw(addr, "big");
    big.write_all(&publish_raw(b"site/big", &[b'x'; 4096]))
        .unwrap();
    assert!(
        closed_by_server(&mut big),
        "an oversized publish closes the connection"
    );
    wait_for(
        "the broker to count the oversized packet",
        Duration::from_secs(20),
        || telemesh_edge::broker_connection_errors() > errors_before_big,
    );

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
