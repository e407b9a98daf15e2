//! Three sites in a triangle, all real processes on 127.0.0.1 with real certificates: per
//! site a `telemesh node` and a `telemesh edge` agent whose devices publish through the
//! durable port; every node replicates `#` from both others (so events also travel two hops
//! and come round the cycle). One replication link (A ← C) runs through a UDP relay that is
//! cut for a while, and node B is killed with kill -9 mid-stream and restarted. After
//! healing, a consumer on every node sees every acknowledged event exactly once, each
//! origin's events in seq order along each path.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use telemesh_client::{Client, ClientConfig, Item, SubscribeOptions};
use telemesh_mesh::log::{inspect, Record};
use telemesh_proto::Start;
use telemesh_quic::relay::Relay;

const SITES: [&str; 3] = ["a", "b", "c"];
const WAVE: u64 = 1_500;

/// node.toml of site `me`: its agent may publish, the other nodes may replicate, it pulls
/// `#` from each upstream address given.
fn node_config(dir: &Path, me: &str, port: u16, upstreams: &[(String, &str)]) -> PathBuf {
    let mut t = NodeToml::new(
        &format!("node-{me}"),
        &dir.join("certs"),
        &dir.join(format!("node-{me}")),
    )
    .listen(&format!("127.0.0.1:{port}"))
    .map_size("256MiB")
    .sync("interval")
    .access(&format!("gw-{me}"), "uplink", "publish = [\"site/#\"]")
    .access("analytics", "consumer", "");
    for other in SITES.iter().filter(|s| **s != me) {
        t = t.access(&format!("node-{other}"), "peer", "");
    }
    for (from, node) in upstreams {
        t = t.section(&format!(
            "[[replicate]]\nfrom = \"{from}\"\nserver_name = \"node-{node}\"\nfilters = [\"#\"]\nbackoff_max = \"200ms\"\n"
        ));
    }
    t.write(&dir.join(format!("node-{me}.toml")))
}

fn edge_config(dir: &Path, me: &str, durable: u16, node_port: u16) -> PathBuf {
    let c = dir.join("certs");
    let t = format!(
        "[agent]\nid = \"gw-{me}\"\ndata_dir = \"{d}/edge-{me}\"\n\
         [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
         [durable]\nlisten = \"127.0.0.1:{durable}\"\n\
         [buffer]\nmax_bytes = \"64MiB\"\nmap_size = \"128MiB\"\n\
         [uplink]\nnodes = [\"127.0.0.1:{node_port}\"]\nca = \"{c}/ca.pem\"\n\
         cert = \"{c}/gw-{me}.pem\"\nkey = \"{c}/gw-{me}.key\"\nbackoff_max = \"200ms\"\n",
        d = dir.display(),
        c = c.display(),
        mqtt = free_port(),
    );
    let path = dir.join(format!("edge-{me}.toml"));
    std::fs::write(&path, t).unwrap();
    path
}

/// Publishes `WAVE` events numbered from `first` to every site's durable port at once.
fn publish_wave(durable: &BTreeMap<&'static str, SocketAddr>, first: u64) {
    let handles: Vec<_> = durable
        .iter()
        .map(|(s, at)| {
            let at = *at;
            let client = format!("dev-{s}-{first}");
            std::thread::spawn(move || publish(at, &client, QoS::AtLeastOnce, first, WAVE))
        })
        .collect();
    for h in handles {
        assert_eq!(
            h.join().unwrap().len() as u64,
            WAVE,
            "every publish acknowledged"
        );
    }
}

/// Node `me`'s log, read from its files while it runs.
fn log_of(dir: &Path, me: &str) -> Vec<(u64, Record)> {
    inspect(&dir.join(format!("node-{me}/log")), 256 << 20).unwrap_or_default()
}

/// Reads everything node `me` holds from earliest: per origin, the payload numbers in the
/// order delivered; panics on an event delivered twice.
async fn consume(dir: &Path, me: &str, port: u16, total: usize) -> BTreeMap<String, Vec<u64>> {
    let c = dir.join("certs");
    let cfg = ClientConfig {
        node: format!("127.0.0.1:{port}"),
        server_name: Some(format!("node-{me}")),
        ca: c.join("ca.pem"),
        cert: c.join("analytics.pem"),
        key: c.join("analytics.key"),
    };
    let client = Client::connect(&cfg).await.unwrap();
    let mut sub = client
        .subscribe(SubscribeOptions::new(vec!["#".into()]).start(Start::Earliest))
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while seen.len() < total {
        let item = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .unwrap_or_else(|_| panic!("node-{me}: {} of {total} events, then nothing", seen.len()))
            .unwrap()
            .unwrap();
        let Item::Event(e) = item else { continue };
        let id = (e.origin.clone(), e.epoch, e.event.seq);
        assert!(
            seen.insert(id),
            "node-{me} delivered {}/{}/{} twice",
            e.origin,
            e.epoch,
            e.event.seq
        );
        let n: u64 = std::str::from_utf8(&e.event.payload)
            .unwrap()
            .parse()
            .unwrap();
        out.entry(e.origin).or_default().push(n);
    }
    client.close().await;
    out
}

#[test]
fn a_triangle_of_sites_delivers_every_event_once_through_a_cut_and_a_node_kill() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    telemesh_quic::pki::write_mesh(
        &d.join("certs"),
        &["node-a".into(), "node-b".into(), "node-c".into()],
        &["gw-a".into(), "gw-b".into(), "gw-c".into()],
        &["analytics".into()],
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ports: BTreeMap<&str, u16> = SITES.iter().map(|s| (*s, free_udp_port())).collect();
    let addr = |s: &str| format!("127.0.0.1:{}", ports[s]);
    // A pulls from C through a relay that can cut the path.
    let c_addr: SocketAddr = addr("c").parse().unwrap();
    let relay = rt.block_on(Relay::start(c_addr)).unwrap();
    let relay_addr = relay.addr();
    let node_cfgs: BTreeMap<&str, PathBuf> = [
        ("a", vec![(addr("b"), "b"), (relay_addr.to_string(), "c")]),
        ("b", vec![(addr("a"), "a"), (addr("c"), "c")]),
        ("c", vec![(addr("a"), "a"), (addr("b"), "b")]),
    ]
    .into_iter()
    .map(|(s, ups)| (s, node_config(d, s, ports[s], &ups)))
    .collect();
    let mut nodes: BTreeMap<&str, Process> = node_cfgs
        .iter()
        .map(|(s, cfg)| (*s, spawn_role("node", cfg)))
        .collect();
    let durable: BTreeMap<&'static str, SocketAddr> = SITES
        .iter()
        .map(|s| (*s, SocketAddr::from(([127, 0, 0, 1], free_port()))))
        .collect();
    let _agents: Vec<Process> = SITES
        .iter()
        .map(|s| spawn_agent(&edge_config(d, s, durable[s].port(), ports[s])))
        .collect();
    for s in SITES {
        wait_listening(durable[s]);
    }

    // Wave 1 with the A ← C path cut: C's events reach A only through B meanwhile.
    relay.set_cut(true);
    publish_wave(&durable, 0);
    // The cut is in force once A's traffic to C is being dropped (an idle link sends little:
    // a few datagrams per reconnect attempt).
    wait_for("the cut to drop packets", Duration::from_secs(30), || {
        relay.dropped() >= 3
    });
    // Wave 2: node B is killed with kill -9 once it has stored part of it.
    let wave2 = {
        let durable = durable.clone();
        std::thread::spawn(move || publish_wave(&durable, WAVE))
    };
    wait_for(
        "node B to store part of wave 2",
        Duration::from_secs(60),
        || log_of(d, "b").len() >= (3 * WAVE + 500) as usize,
    );
    nodes.get_mut("b").unwrap().kill9();
    wave2.join().unwrap();
    relay.set_cut(false);
    nodes.insert("b", spawn_role("node", &node_cfgs["b"]));
    publish_wave(&durable, 2 * WAVE);

    let total = (3 * WAVE) as usize * SITES.len();
    for s in SITES {
        let got = rt.block_on(consume(d, s, ports[s], total));
        assert_eq!(got.len(), 3, "node-{s} holds every origin");
        for (origin, numbers) in got {
            let set: std::collections::BTreeSet<u64> = numbers.iter().copied().collect();
            assert_eq!(set.len(), numbers.len(), "node-{s}: {origin} once each");
            assert_eq!(
                set,
                (0..3 * WAVE).collect(),
                "node-{s}: every acknowledged event of {origin}"
            );
        }
    }
    // Each origin's events keep their seq order along each path (same origin, epoch, path).
    for s in SITES {
        type Along = (String, u64, Vec<(String, u64)>);
        let mut last: BTreeMap<Along, u64> = BTreeMap::new();
        for (_, rec) in log_of(d, s) {
            if let Record::Event {
                origin,
                epoch,
                event,
                path,
                ..
            } = rec
            {
                let prev = last.insert((origin.clone(), epoch, path.clone()), event.seq);
                assert!(
                    prev.is_none_or(|p| p < event.seq),
                    "node-{s}: {origin} seq {} after {prev:?} along {path:?}",
                    event.seq
                );
            }
        }
    }
    for (_, mut n) in nodes {
        n.sigterm();
    }
}
