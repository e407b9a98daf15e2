//! `/metrics` and `/healthz` of a running edge agent and node (processes): after devices
//! publish through the durable port and a consumer reads, both scrapes parse as Prometheus
//! text and hold the SLIs — throughput, backlog, commit and end-to-end latency histograms
//! (edge receive → node commit, → consumer delivery), completeness, uplink state.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use telemesh_client::{Client, Item, SubscribeOptions};
use telemesh_proto::Start;

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The samples of a scrape: `name{labels}` → value; panics on a line that is not a sample.
fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l:?}"));
            let v = value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a sample: {l:?}"));
            (name.to_owned(), v)
        })
        .collect()
}

#[test]
fn edge_and_node_scrapes_hold_the_slis() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    telemesh_quic::pki::write_mesh(
        &d.join("certs"),
        &["node-a".into()],
        &["gw-crash".into()],
        &["analytics".into()],
    )
    .unwrap();
    let c = d.join("certs");
    let node_port = free_udp_port();
    let (node_http, edge_http, durable_port) = (free_port(), free_port(), free_port());
    let node_cfg = NodeToml::new("node-a", &c, &d.join("node"))
        .listen(&format!("127.0.0.1:{node_port}"))
        .section(&format!("[metrics]\nlisten = \"127.0.0.1:{node_http}\""))
        .access("gw-crash", "uplink", "publish = [\"site/#\"]")
        .access("analytics", "consumer", "")
        .write(&d.join("node.toml"));
    let mut node = spawn_role("node", &node_cfg);
    let edge_cfg = write_config(
        d,
        free_port(),
        &format!(
            "[durable]\nlisten = \"127.0.0.1:{durable_port}\"\n\
             [uplink]\nnodes = [\"127.0.0.1:{node_port}\"]\nca = \"{c}/ca.pem\"\n\
             cert = \"{c}/gw-crash.pem\"\nkey = \"{c}/gw-crash.key\"\nbackoff_max = \"200ms\"\n\
             [metrics]\nlisten = \"127.0.0.1:{edge_http}\"",
            c = c.display()
        ),
    );
    let mut agent = spawn_agent(&edge_cfg);
    let durable: SocketAddr = ([127, 0, 0, 1], durable_port).into();
    wait_listening(durable);
    assert_eq!(
        publish(durable, "dev-m", QoS::AtLeastOnce, 0, 200).len(),
        200
    );

    // A consumer reads the 200 (delivery latency is observed as they go out).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&telemesh_testkit::client_config(
            &c,
            &format!("127.0.0.1:{node_port}"),
            "node-a",
            "analytics",
        ))
        .await
        .unwrap();
        let mut sub = client
            .subscribe(SubscribeOptions::new(vec!["site/#".into()]).start(Start::Earliest))
            .await
            .unwrap();
        let mut got = 0;
        while got < 200 {
            let item = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Item::Event(_) = item {
                got += 1;
            }
        }
        client.close().await;
    });

    let edge_at: SocketAddr = ([127, 0, 0, 1], edge_http).into();
    let node_at: SocketAddr = ([127, 0, 0, 1], node_http).into();
    wait_for("the edge backlog to drain", Duration::from_secs(30), || {
        samples(&get(edge_at, "/metrics"))["telemesh_edge_backlog_events"] == 0.0
    });
    let edge = samples(&get(edge_at, "/metrics"));
    for (name, want) in [
        ("telemesh_edge_events_in_total", Some(200.0)),
        ("telemesh_edge_durable_acks_total", Some(200.0)),
        ("telemesh_edge_dropped_evicted_total", Some(0.0)),
        ("telemesh_edge_backlog_bytes", Some(0.0)),
        ("telemesh_uplink_connected", Some(1.0)),
        ("telemesh_uplink_in_flight_batches", Some(0.0)),
        ("telemesh_edge_buffer_utilization", None),
        ("telemesh_edge_commit_latency_seconds_count", None),
        ("telemesh_edge_fsyncs_total", None),
        ("telemesh_uplink_batches_acked_total", None),
    ] {
        let v = *edge
            .get(name)
            .unwrap_or_else(|| panic!("edge scrape lacks {name}: {edge:?}"));
        if let Some(w) = want {
            assert_eq!(v, w, "{name}");
        }
    }
    assert!(edge["telemesh_edge_commit_latency_seconds_count"] >= 1.0);
    let node_m = samples(&get(node_at, "/metrics"));
    for (name, want) in [
        ("telemesh_node_events_stored_total", 200.0),
        ("telemesh_node_ingest_latency_seconds_count", 200.0),
        ("telemesh_node_delivery_latency_seconds_count", 200.0),
        ("telemesh_node_delivered_total", 200.0),
    ] {
        assert_eq!(node_m.get(name), Some(&want), "{name} in {node_m:?}");
    }
    assert!(node_m
        .keys()
        .any(|k| k.starts_with("telemesh_origin_held_events{origin=\"gw-crash\"")));
    for at in [edge_at, node_at] {
        let h = get(at, "/healthz");
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok"), "{h}");
    }
    agent.sigterm();
    node.sigterm();
}
