//! Draining an edge backlog into a node over QUIC on loopback, and reconnecting.
//!
//! 1. A buffer holding N events (100-byte payloads) is drained by the uplink into a node in
//!    this process (`sync = always` on the node: every ack follows an fsync'd commit). The
//!    clock stops when the node has committed the last event. Reports events/s, frame bytes
//!    per event and UDP bytes per event (QUIC and TLS included).
//! 2. The node is stopped until the uplink's backoff has reached its cap (1 s), then started
//!    again on the same port: reports the time from the node accepting connections to the
//!    first acknowledged batch.
//!
//! `cargo bench --bench uplink_drain` runs N = 1,000,000; under `cargo test` N = 2,000 and a
//! 100 ms cap. `UPLINK_COMPRESSION=zstd` compresses the batches; `UPLINK_PAYLOAD=json` makes
//! the payloads ~100-byte JSON telemetry records (distinct values per event) instead of a
//! repeated byte, which would flatter compression.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use telemesh_edge::buffer::{Buffer, BufferOptions, Incoming, SyncMode};
use telemesh_edge::uplink::BufferSource;
use telemesh_edge::EdgeMetrics;
use telemesh_gateway::{UplinkMetrics, UplinkOptions};
use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::node::Node;
use telemesh_proto::forwarder::ForwarderConfig;
use telemesh_quic::pki::write_mesh;
use telemesh_quic::tls::{load_roots, Identity};
use telemesh_testkit::NodeToml;

fn node_config(dir: &std::path::Path, listen: &str) -> NodeConfig {
    NodeToml::new("node-a", &dir.join("certs"), &dir.join("node"))
        .listen(listen)
        .map_size("4GiB")
        .sync("always")
        .access("gw-bench", "uplink", "publish = [\"site-a/#\"]")
        .config()
}

async fn wait(mut done: impl FnMut() -> bool, limit: Duration) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "benchmark step timed out");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 1_000_000 } else { 2_000 };
    let cap = Duration::from_millis(if full { 1_000 } else { 100 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        write_mesh(&dir.path().join("certs"), &["node-a".into()], &["gw-bench".into()], &[]).unwrap();
        let node = Node::start(node_config(dir.path(), "127.0.0.1:0")).await.unwrap();
        let addr = node.local_addr();

        let buffer = Buffer::open(
            &dir.path().join("edge"),
            "gw-bench",
            BufferOptions {
                max_bytes: 1 << 30,
                map_size: 2 << 30,
                sync: SyncMode::None,
                ..BufferOptions::default()
            },
            Arc::new(EdgeMetrics::default()),
        )
        .unwrap();
        let json = std::env::var("UPLINK_PAYLOAD").is_ok_and(|v| v == "json");
        let zstd = std::env::var("UPLINK_COMPRESSION").is_ok_and(|v| v == "zstd");
        let h = buffer.handle();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..n {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let payload = if json {
                format!(
                    "{{\"device\":\"dev-{:04}\",\"seq\":{i},\"celsius\":{}.{:02},\"humidity\":{}.{},\"battery\":3.{:02},\"ok\":true}}",
                    i % 50,
                    15 + rng % 15,
                    (rng >> 8) % 100,
                    30 + (rng >> 16) % 40,
                    (rng >> 24) % 10,
                    (rng >> 32) % 100
                )
                .into_bytes()
            } else {
                vec![b'x'; 100]
            };
            h.append(Incoming {
                topic: format!("site-a/line{}/sensor{}", i % 4, i % 50),
                payload,
                ts_us: 1_764_150_000_000_000 + i,
                qos: 1,
                headers: None,
            })
            .unwrap();
        }
        h.flush().unwrap();

        let metrics = Arc::new(UplinkMetrics::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let opts = UplinkOptions {
            nodes: vec![addr.to_string()],
            server_name: Some("node-a".into()),
            roots: load_roots(&dir.path().join("certs/ca.pem")).unwrap(),
            forwarder: ForwarderConfig {
                batch_max_events: 1_000,
                batch_max_bytes: 1 << 20,
                window: 16,
                linger: Duration::ZERO,
            },
            max_event_bytes: 65_536,
            backoff_max: cap,
            connect_timeout: Duration::from_millis(if full { 2_000 } else { 300 }),
            failback_interval: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(5),
            compression: if zstd {
                telemesh_proto::frame::Compression::Zstd
            } else {
                telemesh_proto::frame::Compression::None
            },
            max_bandwidth: None,
        };
        let identity = Identity::load(&dir.path().join("certs/gw-bench.pem"), &dir.path().join("certs/gw-bench.key")).unwrap();
        let source = BufferSource::new(buffer.reader(), buffer.handle(), buffer.commits());
        let t0 = Instant::now();
        let up = tokio::spawn(telemesh_gateway::run("gw-bench".into(), opts, identity, source, metrics.clone(), stop_rx));
        let committed = node.log().committed();
        wait(|| *committed.borrow() >= n, Duration::from_secs(600)).await;
        let drain = t0.elapsed();
        let frame_bytes = metrics.frame_bytes.load(Relaxed);

        // Reconnect: stop the node, let the backoff reach its cap, start it again.
        node.shutdown().await;
        wait(|| metrics.reconnects.load(Relaxed) >= 1, Duration::from_secs(60)).await;
        let udp_bytes = metrics.udp_bytes.load(Relaxed);
        let rounds = if full { 7 } else { 2 };
        wait(|| metrics.reconnects.load(Relaxed) >= rounds, Duration::from_secs(120)).await;
        let acked_before = metrics.batches_acked.load(Relaxed);
        for i in 0..100u64 {
            h.append(Incoming {
                topic: "site-a/after".into(),
                payload: vec![b'y'; 100],
                ts_us: i,
                qos: 1,
                headers: None,
            })
            .unwrap();
        }
        h.flush().unwrap();
        let node = Node::start(node_config(dir.path(), &addr.to_string())).await.unwrap();
        let t1 = Instant::now();
        wait(|| metrics.batches_acked.load(Relaxed) > acked_before, Duration::from_secs(30)).await;
        let reconnect = t1.elapsed();

        stop.send(true).unwrap();
        up.await.unwrap().unwrap();
        println!(
            "uplink_drain: {n} events in {:.3}s = {:.0} events/s (node sync=always, payload {}, compression {}); \
             {:.1} frame bytes/event, {:.1} UDP bytes/event; \
             reconnect to first ack {} ms with backoff cap {} ms",
            drain.as_secs_f64(),
            n as f64 / drain.as_secs_f64(),
            if json { "json" } else { "100 x" },
            if zstd { "zstd" } else { "none" },
            frame_bytes as f64 / n as f64,
            udp_bytes as f64 / n as f64,
            reconnect.as_millis(),
            cap.as_millis(),
        );
        node.shutdown().await;
    });
}
