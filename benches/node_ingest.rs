//! Node ingest from 4 uplinks at once: four edge buffers of N/4 events each (100-byte
//! payloads), drained by four real uplinks (the gateway over QUIC with mutual TLS) into one
//! node with `sync = always`. The clock stops when the node has committed all N.
//! `cargo bench --bench node_ingest` runs N = 1,000,000; under `cargo test`, 4,000.

use std::sync::Arc;
use std::time::{Duration, Instant};

use telemesh_edge::buffer::{Buffer, BufferOptions, Incoming, SyncMode};
use telemesh_edge::uplink::BufferSource;
use telemesh_edge::EdgeMetrics;
use telemesh_gateway::{UplinkMetrics, UplinkOptions};
use telemesh_mesh::node::Node;
use telemesh_proto::forwarder::ForwarderConfig;
use telemesh_quic::pki::write_mesh;
use telemesh_quic::tls::{load_roots, Identity};
use telemesh_testkit::NodeToml;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 1_000_000 } else { 4_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("certs");
        let gws: Vec<String> = (1..=4).map(|i| format!("gw-{i}")).collect();
        write_mesh(&c, &["node-a".into()], &gws, &[]).unwrap();
        let mut toml = NodeToml::new("node-a", &c, &dir.path().join("node"))
            .map_size("4GiB")
            .sync("always");
        for g in &gws {
            toml = toml.access(g, "uplink", "publish = [\"#\"]");
        }
        let cfg = toml.config();
        let node = Node::start(cfg).await.unwrap();
        let mut buffers = Vec::new();
        for g in &gws {
            let b = Buffer::open(
                &dir.path().join(g),
                g,
                BufferOptions { max_bytes: 1 << 30, map_size: 2 << 30, sync: SyncMode::None, ..BufferOptions::default() },
                Arc::new(EdgeMetrics::default()),
            )
            .unwrap();
            let h = b.handle();
            for i in 0..n / 4 {
                h.append(Incoming {
                    topic: format!("{g}/line{}/s{}", i % 4, i % 50),
                    payload: vec![b'x'; 100],
                    ts_us: i,
                    qos: 1,
                    headers: None,
                })
                .unwrap();
            }
            h.flush().unwrap();
            buffers.push(b);
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (g, b) in gws.iter().zip(&buffers) {
            let opts = UplinkOptions {
                nodes: vec![node.local_addr().to_string()],
                server_name: Some("node-a".into()),
                roots: load_roots(&c.join("ca.pem")).unwrap(),
                forwarder: ForwarderConfig { batch_max_events: 1_000, batch_max_bytes: 1 << 20, window: 16, linger: Duration::ZERO },
                max_event_bytes: 65_536,
                backoff_max: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(2),
                failback_interval: Duration::from_secs(10),
                ack_timeout: Duration::from_secs(5),
                compression: telemesh_proto::frame::Compression::None,
                max_bandwidth: None,
            };
            let id = Identity::load(&c.join(format!("{g}.pem")), &c.join(format!("{g}.key"))).unwrap();
            let source = BufferSource::new(b.reader(), b.handle(), b.commits());
            tasks.push(tokio::spawn(telemesh_gateway::run(
                g.clone(),
                opts,
                id,
                source,
                Arc::new(UplinkMetrics::default()),
                stop_rx.clone(),
            )));
        }
        let committed = node.log().committed();
        let until = Instant::now() + Duration::from_secs(600);
        while *committed.borrow() < n {
            assert!(Instant::now() < until, "ingest did not finish");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let el = t0.elapsed();
        println!(
            "node_ingest: {n} events from 4 uplinks in {:.3}s = {:.0} events/s committed (node sync=always)",
            el.as_secs_f64(),
            n as f64 / el.as_secs_f64()
        );
        stop.send(true).unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        node.shutdown().await;
    });
}
