//! A node process under kill -9: a durable consumer resumes right after its last stored ack,
//! and the log keeps every event the uplink had acknowledged, once.

mod common;

use std::time::Duration;

use common::*;
use telemesh_client::{Client, Item, SubscribeOptions};
use telemesh_edge::buffer::Incoming;
use telemesh_gateway::UplinkOptions;
use telemesh_proto::forwarder::ForwarderConfig;
use telemesh_proto::Start;
use telemesh_quic::pki::write_mesh;
use telemesh_quic::tls::load_roots;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_kill_dash_nine_of_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("certs");
    write_mesh(
        &c,
        &["node-a".into()],
        &["gw-1".into()],
        &["analytics".into()],
    )
    .unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let node_toml = NodeToml::new("node-a", &c, &dir.path().join("node"))
        .listen(&port.to_string())
        .access("gw-1", "uplink", "publish = [\"site/#\"]")
        .access("analytics", "consumer", "read = [\"site/#\"]")
        .write(&dir.path().join("node.toml"));
    let mut node = spawn_role("node", &node_toml);

    // An uplink feeding 1,000 events.
    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 8 << 20);
    let h = buffer.handle();
    for n in 0..1_000u64 {
        h.append(Incoming {
            topic: "site/x".into(),
            payload: n.to_string().into_bytes(),
            ts_us: n,
            qos: 1,
            headers: None,
        })
        .unwrap();
    }
    let opts = UplinkOptions {
        nodes: vec![port.to_string()],
        server_name: Some("node-a".into()),
        roots: load_roots(&c.join("ca.pem")).unwrap(),
        forwarder: ForwarderConfig {
            batch_max_events: 100,
            ..ForwarderConfig::default()
        },
        max_event_bytes: 65_536,
        backoff_max: Duration::from_millis(100),
        connect_timeout: Duration::from_millis(500),
        failback_interval: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(5),
        compression: telemesh_proto::frame::Compression::None,
        max_bandwidth: None,
    };
    let up = RunningUplink::start("gw-1", opts, &c, "gw-1", &buffer);
    let reader = buffer.reader();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while reader.state().unwrap().events > 0 {
        assert!(
            std::time::Instant::now() < until,
            "the uplink never drained"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let client_cfg = telemesh_testkit::client_config(&c, &port.to_string(), "node-a", "analytics");
    let opts = SubscribeOptions::new(vec!["site/#".into()])
        .start(Start::Earliest)
        .durable("svc");
    let client = Client::connect(&client_cfg).await.unwrap();
    let mut sub = client.subscribe(opts.clone()).await.unwrap();
    let mut last = 0;
    for _ in 0..400 {
        if let Some(Item::Event(e)) = sub.next().await.unwrap() {
            last = e.node_seq;
        }
    }
    sub.ack(last).await.unwrap();
    sub.finish().await.unwrap(); // returns once the node has stored the ack
    node.kill9();
    client.close().await;

    let mut node = spawn_role("node", &node_toml);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let client = loop {
        match Client::connect(&client_cfg).await {
            Ok(c) => break c,
            Err(_) => {
                assert!(
                    std::time::Instant::now() < until,
                    "the node never came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut sub = client.subscribe(opts).await.unwrap();
    assert_eq!(
        sub.from,
        last + 1,
        "resumes right after the last stored ack"
    );
    let mut payloads = Vec::new();
    while payloads.len() < 600 {
        if let Some(Item::Event(e)) = sub.next().await.unwrap() {
            payloads.push(
                String::from_utf8(e.event.payload)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
    }
    assert_eq!(
        payloads,
        (400..1_000).collect::<Vec<_>>(),
        "the rest, once, in order"
    );
    client.close().await;
    up.stop().await;
    node.sigterm();
}
