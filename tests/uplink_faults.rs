//! The uplink in process against a real node over real QUIC: a path cut by a UDP relay that
//! drops everything for a while, and certificates that must be refused (expired, a name the
//! node does not allow, a name that is not the agent's id). Afterwards every event has
//! arrived exactly once, in order, and the buffer is empty.

mod common;

use common::{
    append, mesh_certs, test_buffer, uplink_options, wait_for_async, NodeToml, RunningUplink,
};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use telemesh_edge::buffer::Incoming;
use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::log::Record;
use telemesh_mesh::node::Node;
use telemesh_quic::pki::{write_mesh, Authority, Kind};
use telemesh_quic::relay::Relay;

/// A temporary directory with certificates for node-a and gw-1.
fn certs_for_gw1() -> tempfile::TempDir {
    mesh_certs(&["node-a"], &["gw-1"], &[])
}

fn node_config(dir: &std::path::Path) -> NodeConfig {
    NodeToml::new("node-a", &dir.join("certs"), &dir.join("node"))
        .access("gw-1", "uplink", "publish = [\"site/#\"]")
        .config()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_path_heals_and_every_event_arrives_once_in_order() {
    let dir = certs_for_gw1();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let relay = Relay::start(node.local_addr()).await.unwrap();
    let relay_addr = relay.addr();

    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 32 << 20);
    let up = RunningUplink::start(
        "gw-1",
        uplink_options(&dir.path().join("certs"), vec![relay_addr.to_string()]),
        &dir.path().join("certs"),
        "gw-1",
        &buffer,
    );
    let stored = || node.log().read(1, usize::MAX).unwrap().len();
    append(&buffer, 0, 2_000);
    wait_for_async(
        "the first events at the node",
        Duration::from_secs(30),
        || stored() >= 500,
    )
    .await;

    // Cut the path; keep appending; heal once the relay has dropped a good number of packets
    // and the uplink, seeing no acknowledgement within its ack timeout (1 s here, against
    // QUIC's 30 s idle timeout), has given the connection up.
    relay.set_cut(true);
    append(&buffer, 2_000, 4_000);
    let reconnects = up.metrics.reconnects.load(Relaxed);
    wait_for_async(
        "packets dropped by the cut",
        Duration::from_secs(30),
        || relay.dropped() >= 20,
    )
    .await;
    wait_for_async(
        "the ack timeout to end the connection",
        Duration::from_secs(10),
        || up.metrics.reconnects.load(Relaxed) > reconnects,
    )
    .await;
    let during = stored();
    relay.set_cut(false);
    wait_for_async("every event at the node", Duration::from_secs(60), || {
        stored() >= 4_000
    })
    .await;
    assert!(during < 4_000, "the cut held events back");

    let records = node.log().read(1, usize::MAX).unwrap();
    let numbers: Vec<u64> = records
        .iter()
        .map(|(_, r)| match r {
            Record::Event { event, .. } => std::str::from_utf8(&event.payload)
                .unwrap()
                .parse()
                .unwrap(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        numbers,
        (0..4_000).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    let reader = buffer.reader();
    wait_for_async("the buffer trimmed", Duration::from_secs(30), || {
        reader.state().unwrap().events == 0
    })
    .await;
    up.stop().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_unlisted_certificates_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // One CA for everything, so the expired certificate fails on its dates alone.
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = Authority::new("mesh CA").unwrap();
    std::fs::write(certs.join("ca.pem"), ca.cert_pem()).unwrap();
    let write = |file: &str, issued: telemesh_quic::pki::Issued| {
        std::fs::write(certs.join(format!("{file}.pem")), issued.cert_pem).unwrap();
        std::fs::write(certs.join(format!("{file}.key")), issued.key_pem).unwrap();
    };
    write("node-a", ca.issue("node-a", Kind::Node).unwrap());
    write("gw-9", ca.issue("gw-9", Kind::Edge).unwrap());
    write(
        "expired",
        ca.issue_with("gw-1", Kind::Edge, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
        .unwrap(),
    );
    let node = Node::start(node_config(dir.path())).await.unwrap();

    for (cert, name) in [("expired", "gw-1"), ("gw-9", "gw-9")] {
        let buffer = test_buffer(&dir.path().join(format!("edge-{cert}")), name, 8 << 20);
        append(&buffer, 0, 10);
        buffer.handle().flush().unwrap();
        let up = RunningUplink::start(
            name,
            uplink_options(
                &dir.path().join("certs"),
                vec![node.local_addr().to_string()],
            ),
            &dir.path().join("certs"),
            cert,
            &buffer,
        );
        wait_for_async("refusals", Duration::from_secs(30), || {
            up.metrics.reconnects.load(Relaxed) >= 2
        })
        .await;
        assert!(!up.metrics.connected.load(Relaxed));
        assert_eq!(up.metrics.batches_acked.load(Relaxed), 0);
        assert_eq!(
            buffer.reader().state().unwrap().events,
            10,
            "nothing trimmed"
        );
        up.stop().await;
    }
    assert!(
        node.log().read(1, 10).unwrap().is_empty(),
        "no data reached the node"
    );
    assert!(node.metrics().refused.load(Relaxed) >= 2);
    node.shutdown().await;
}

#[test]
fn an_uplink_certificate_naming_another_agent_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-other".into()],
        &[],
    )
    .unwrap();
    let port = telemesh_testkit::free_port();
    let c = dir.path().join("certs");
    let cfg = telemesh_edge::EdgeConfig::from_toml(&format!(
        "[agent]\nid = \"gw-1\"\ndata_dir = \"{d}/edge\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\
         [buffer]\nmax_bytes = \"8MiB\"\nmap_size = \"16MiB\"\n\
         [uplink]\nnodes = [\"127.0.0.1:7800\"]\nca = \"{c}/ca.pem\"\ncert = \"{c}/gw-other.pem\"\nkey = \"{c}/gw-other.key\"\n",
        d = dir.path().display(),
        c = c.display()
    ))
    .unwrap();
    let err = telemesh_edge::Agent::start(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("\"gw-other\"") && err.contains("must be the same"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_skipped_for_the_next() {
    let dir = certs_for_gw1();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    // A port where nothing listens: QUIC gets no answer at all.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap();
    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 8 << 20);
    append(&buffer, 0, 500);
    let mut opts = uplink_options(
        &dir.path().join("certs"),
        vec![dead.to_string(), node.local_addr().to_string()],
    );
    opts.connect_timeout = Duration::from_millis(300);
    let up = RunningUplink::start("gw-1", opts, &dir.path().join("certs"), "gw-1", &buffer);
    wait_for_async(
        "every event at the second node",
        Duration::from_secs(30),
        || node.log().read(1, usize::MAX).unwrap().len() >= 500,
    )
    .await;
    assert!(
        up.metrics.reconnects.load(Relaxed) >= 1,
        "the first node was tried and given up on"
    );
    up.stop().await;
    drop(silent);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_goes_back_to_the_first_node_when_it_answers_again() {
    let dir = certs_for_gw1();
    // Node B runs from the start; node A (listed first) only later, on a port chosen now.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::create_dir_all(b_dir.join("certs")).unwrap();
    for f in ["ca.pem", "node-a.pem", "node-a.key"] {
        std::fs::copy(
            dir.path().join("certs").join(f),
            b_dir.join("certs").join(f),
        )
        .unwrap();
    }
    let node_b = Node::start(node_config(&b_dir)).await.unwrap();
    let a_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 8 << 20);
    let mut opts = uplink_options(
        &dir.path().join("certs"),
        vec![a_port.to_string(), node_b.local_addr().to_string()],
    );
    opts.connect_timeout = Duration::from_millis(300);
    let up = RunningUplink::start("gw-1", opts, &dir.path().join("certs"), "gw-1", &buffer);
    append(&buffer, 0, 100);
    wait_for_async("the first 100 at node B", Duration::from_secs(30), || {
        node_b.log().read(1, usize::MAX).unwrap().len() >= 100
    })
    .await;

    let mut cfg_a = node_config(dir.path());
    cfg_a.node.listen = a_port;
    let node_a = Node::start(cfg_a).await.unwrap();
    // The uplink probes A, finds it, and moves: new events go to A.
    wait_for_async("the uplink back on node A", Duration::from_secs(30), || {
        node_a.metrics().connections.load(Relaxed) >= 1
    })
    .await;
    append(&buffer, 100, 200);
    wait_for_async("the next 100 at node A", Duration::from_secs(30), || {
        node_a.log().read(1, usize::MAX).unwrap().len() >= 100
    })
    .await;
    let at_a: Vec<u64> = node_a
        .log()
        .read(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, r)| match r {
            Record::Event { event, .. } => std::str::from_utf8(&event.payload)
                .unwrap()
                .parse()
                .unwrap(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        at_a,
        (100..200).collect::<Vec<_>>(),
        "after failing back, A gets what followed"
    );
    up.stop().await;
    node_a.shutdown().await;
    node_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_travel_from_the_edge_buffer_through_the_node_to_a_consumer() {
    use telemesh_client::{Client, Item, SubscribeOptions};
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into()],
        &["svc".into()],
    )
    .unwrap();
    let mut cfg = node_config(dir.path());
    cfg.access.push(telemesh_mesh::config::Access {
        identity: "svc".into(),
        role: telemesh_mesh::config::RoleName::Consumer,
        publish: vec![],
        read: None,
    });
    let node = Node::start(cfg).await.unwrap();
    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 8 << 20);
    let headers = telemesh_proto::Headers {
        user_properties: vec![("unit".into(), "C".into())],
        content_type: Some("text/plain".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    buffer
        .handle()
        .append(Incoming {
            topic: "site/h".into(),
            payload: b"21.5".to_vec(),
            ts_us: 7,
            qos: 1,
            headers: Some(Box::new(headers.clone())),
        })
        .unwrap();
    let up = RunningUplink::start(
        "gw-1",
        uplink_options(
            &dir.path().join("certs"),
            vec![node.local_addr().to_string()],
        ),
        &dir.path().join("certs"),
        "gw-1",
        &buffer,
    );
    let c = dir.path().join("certs");
    let client = Client::connect(&telemesh_testkit::client_config(
        &c,
        &node.local_addr().to_string(),
        "node-a",
        "svc",
    ))
    .await
    .unwrap();
    let mut sub = client
        .subscribe(SubscribeOptions::new(vec!["#".into()]).start(telemesh_proto::Start::Earliest))
        .await
        .unwrap();
    let Some(Item::Event(e)) = sub.next().await.unwrap() else {
        panic!("expected an event")
    };
    assert_eq!(e.event.headers.as_deref(), Some(&headers));
    assert_eq!(e.origin, "gw-1");
    client.close().await;
    up.stop().await;
    node.shutdown().await;
}

/// Drains 3,000 telemetry-like events through an uplink with `compression` and `cap`;
/// returns the frame bytes written and how long the drain took.
async fn drain_with(
    compression: telemesh_proto::frame::Compression,
    cap: Option<u64>,
) -> (u64, Duration) {
    let dir = certs_for_gw1();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let buffer = test_buffer(&dir.path().join("edge"), "gw-1", 32 << 20);
    let h = buffer.handle();
    for n in 0..3_000u64 {
        h.append(Incoming {
            topic: format!("site/line{}/temp", n % 8),
            payload: format!(
                "{{\"n\":{n},\"celsius\":{}.{},\"ok\":true}}",
                20 + n % 5,
                n % 10
            )
            .into_bytes(),
            ts_us: n,
            qos: 1,
            headers: None,
        })
        .unwrap();
    }
    let mut opts = uplink_options(
        &dir.path().join("certs"),
        vec![node.local_addr().to_string()],
    );
    opts.compression = compression;
    opts.max_bandwidth = cap;
    let t = Instant::now();
    let up = RunningUplink::start("gw-1", opts, &dir.path().join("certs"), "gw-1", &buffer);
    let stored = || node.log().read(1, usize::MAX).unwrap().len();
    wait_for_async("every event at the node", Duration::from_secs(60), || {
        stored() >= 3_000
    })
    .await;
    let took = t.elapsed();
    // Intact, once each, in order.
    let numbers: Vec<u64> = node
        .log()
        .read(1, usize::MAX)
        .unwrap()
        .iter()
        .map(|(_, r)| match r {
            Record::Event { event, .. } => {
                let p = std::str::from_utf8(&event.payload).unwrap();
                p[5..p.find(',').unwrap()].parse().unwrap()
            }
            Record::Gap { .. } => panic!("no gaps here"),
        })
        .collect();
    assert_eq!(numbers, (0..3_000).collect::<Vec<_>>());
    let bytes = up.metrics.frame_bytes.load(Relaxed);
    up.stop().await;
    node.shutdown().await;
    (bytes, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_batches_arrive_intact_in_fewer_bytes_and_the_bandwidth_cap_paces_them() {
    use telemesh_proto::frame::Compression;
    let (plain, _) = drain_with(Compression::None, None).await;
    let (zstd, _) = drain_with(Compression::Zstd, None).await;
    assert!(zstd * 3 < plain, "zstd {zstd} bytes vs plain {plain}");
    // Capped at a third of what the plain drain writes per second of cap: the drain cannot
    // be faster than (bytes − one second's burst) ÷ cap.
    let cap = plain / 3;
    let (capped, took) = drain_with(Compression::None, Some(cap)).await;
    let floor = (capped - cap) as f64 / cap as f64;
    assert!(
        took.as_secs_f64() >= floor * 0.95,
        "{capped} bytes at {cap} B/s took {took:?}, at least {floor:.2}s expected"
    );
}
