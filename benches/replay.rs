//! Replay from a node to one consumer using the client library and discarding the events:
//! N stored 100-byte events read from the start, all of them and then with a filter that
//! matches 1% of them. `cargo bench --bench replay` stores 2,000,000 (`REPLAY_EVENTS=N` for
//! another count); under `cargo test`, 5,000.

use std::time::Instant;

use telemesh_client::{Client, Item, SubscribeOptions};
use telemesh_mesh::node::Node;
use telemesh_proto::{Event, Start};
use telemesh_quic::pki::write_mesh;
use telemesh_testkit::NodeToml;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("REPLAY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 2_000_000 } else { 5_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("certs");
        write_mesh(&c, &["node-a".into()], &[], &["bench".into()]).unwrap();
        let cfg = NodeToml::new("node-a", &c, &dir.path().join("node"))
            .map_size("8GiB")
            .sync("none")
            .access("bench", "consumer", "read = [\"#\"]")
            .config();
        let node = Node::start(cfg).await.unwrap();
        let t = Instant::now();
        for b in 0..n / 1_000 {
            let events = (b * 1_000 + 1..=b * 1_000 + 1_000)
                .map(|seq| Event {
                    seq,
                    topic: if seq % 100 == 0 { "site-b/rare".into() } else { format!("site-a/line{}/s{}", seq % 4, seq % 50) },
                    payload: vec![b'x'; 100],
                    ts_us: seq,
                    qos: 1,
                    headers: None,
                })
                .collect();
            node.log().ingest("gw".into(), 1, events, vec![]).await.unwrap();
        }
        let stored = t.elapsed();
        let client = Client::connect(&telemesh_testkit::client_config(&c, &node.local_addr().to_string(), "node-a", "bench"))
        .await
        .unwrap();
        for (label, filter, expect) in [("all", "#", n), ("1% filter", "site-b/#", n / 100)] {
            let mut opts = SubscribeOptions::new(vec![filter.into()]).start(Start::Earliest);
            opts.credit_window = 20_000;
            let t = Instant::now();
            let mut sub = client.subscribe(opts).await.unwrap();
            let mut got = 0u64;
            while got < expect {
                if let Some(Item::Event(_)) = sub.next().await.unwrap() {
                    got += 1;
                }
            }
            let el = t.elapsed();
            println!(
                "replay ({label}): {got} events of {n} stored in {:.3}s = {:.0} events/s delivered, {:.0} stored events scanned/s",
                el.as_secs_f64(),
                got as f64 / el.as_secs_f64(),
                n as f64 / el.as_secs_f64()
            );
        }
        println!("replay: stored {n} events in {:.3}s (direct log ingest, sync=none)", stored.as_secs_f64());
        client.close().await;
        node.shutdown().await;
    });
}
