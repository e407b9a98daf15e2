//! Replication from one node to another over QUIC on loopback, 100-byte events, both nodes in
//! this process:
//! 1. throughput: node A holds N events; node B starts with `[[replicate]] from = A` and the
//!    clock runs until B has committed all N (B with sync = always, then interval);
//! 2. lag: A takes a steady 10,000 events/s (10 every millisecond) while B replicates; per
//!    event, the time from A's ingest to B's commit (seen on B's committed mark), with both
//!    nodes at sync = interval, then at sync = always.
//!
//! `cargo bench --bench replication` replicates 1,000,000 events and runs the steady load for
//! 10 s; under `cargo test`, 5,000 events and 0.5 s.

use std::time::{Duration, Instant};

use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::log::Record;
use telemesh_mesh::node::Node;
use telemesh_proto::Event;
use telemesh_quic::pki::write_mesh;
use telemesh_testkit::NodeToml;

fn config(
    dir: &std::path::Path,
    id: &str,
    sync: &str,
    upstream: Option<std::net::SocketAddr>,
) -> NodeConfig {
    let mut t = NodeToml::new(id, &dir.join("certs"), &dir.join(format!("{id}-{sync}")))
        .map_size("8GiB")
        .sync(sync)
        .access("node-b", "peer", "");
    if let Some(up) = upstream {
        t = t.section(&format!(
            "[[replicate]]\nfrom = \"{up}\"\nserver_name = \"node-a\"\nfilters = [\"#\"]\n"
        ));
    }
    t.config()
}

fn events(from: u64, n: u64) -> Vec<Event> {
    (from..from + n)
        .map(|seq| Event {
            seq,
            topic: format!("site-a/line{}/s{}", seq % 4, seq % 50),
            payload: vec![b'x'; 100],
            ts_us: seq,
            qos: 1,
            headers: None,
        })
        .collect()
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn throughput(dir: &std::path::Path, n: u64, sync: &str) {
    let a = Node::start(config(dir, "node-a", "none", None))
        .await
        .unwrap();
    for b in 0..n / 1_000 {
        a.log()
            .ingest("gw".into(), 1, events(b * 1_000 + 1, 1_000), vec![])
            .await
            .unwrap();
    }
    let t = Instant::now();
    let b = Node::start(config(dir, "node-b", sync, Some(a.local_addr())))
        .await
        .unwrap();
    let mut committed = b.log().committed();
    while *committed.borrow_and_update() < n {
        committed.changed().await.unwrap();
    }
    let el = t.elapsed();
    println!(
        "replication throughput (B sync={sync}): {n} events in {:.3}s = {:.0} events/s",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64()
    );
    b.shutdown().await;
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(dir.join("node-a-none"));
    let _ = std::fs::remove_dir_all(dir.join(format!("node-b-{sync}")));
}

async fn lag(dir: &std::path::Path, secs: f64, sync: &str) {
    let a = Node::start(config(dir, "node-a", sync, None))
        .await
        .unwrap();
    let b = Node::start(config(dir, "node-b", sync, Some(a.local_addr())))
        .await
        .unwrap();
    let total = (secs * 10_000.0) as u64;
    // B's watcher: when each record became visible (committed) at B.
    let blog = b.log().clone();
    let watcher = tokio::spawn(async move {
        let mut committed = blog.committed();
        let mut seen = 0u64;
        let mut visible: Vec<(u64, u64)> = Vec::new();
        loop {
            let head = *committed.borrow_and_update();
            let at = now_us();
            while seen < head {
                let recs = blog.read(seen + 1, 10_000).unwrap();
                for (s, r) in recs {
                    if s > head {
                        break;
                    }
                    if let Record::Event { event, .. } = r {
                        visible.push((event.seq, at));
                    }
                    seen = s;
                }
            }
            if visible.len() as u64 >= total {
                return visible;
            }
            committed.changed().await.unwrap();
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 1;
    let t = Instant::now();
    while seq <= total {
        tick.tick().await;
        a.log()
            .ingest("gw".into(), 1, events(seq, 10), vec![])
            .await
            .unwrap();
        seq += 10;
    }
    let sent = t.elapsed();
    let visible = watcher.await.unwrap();
    // A's ingest times.
    let ingest: std::collections::HashMap<u64, u64> = a
        .log()
        .read(1, usize::MAX)
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Event {
                event, ingest_us, ..
            } => Some((event.seq, ingest_us)),
            _ => None,
        })
        .collect();
    b.shutdown().await;
    let mut lags: Vec<u64> = visible
        .iter()
        .map(|(s, at)| at.saturating_sub(ingest[s]))
        .collect();
    lags.sort_unstable();
    println!(
        "replication lag (both sync={sync}, {} events at {:.0}/s): p50 {} µs p99 {} µs p99.9 {} µs max {} µs",
        lags.len(),
        total as f64 / sent.as_secs_f64(),
        pct(&lags, 0.5),
        pct(&lags, 0.99),
        pct(&lags, 0.999),
        lags.last().unwrap()
    );
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(dir.join(format!("node-a-{sync}")));
    let _ = std::fs::remove_dir_all(dir.join(format!("node-b-{sync}")));
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (n, secs) = if full {
        (1_000_000, 10.0)
    } else {
        (5_000, 0.5)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        write_mesh(
            &dir.path().join("certs"),
            &["node-a".into(), "node-b".into()],
            &[],
            &[],
        )
        .unwrap();
        throughput(dir.path(), n, "always").await;
        throughput(dir.path(), n, "interval").await;
        lag(dir.path(), secs, "interval").await;
        lag(dir.path(), secs, "always").await;
    });
}
