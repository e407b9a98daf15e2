//! Edge agent and mesh node as separate processes on 127.0.0.1, with real certificates:
//! events acknowledged by the agent's durable port reach the node's log exactly once, in
//! per-epoch seq order, also when the node is killed with kill -9 mid-stream and restarted;
//! the agent's buffer is trimmed only by the node's acknowledgements and ends empty.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use telemesh_mesh::log::{inspect as inspect_log, Record};

const NODE_MAP: u64 = 256 << 20;

fn node_config(dir: &Path, port: u16) -> std::path::PathBuf {
    NodeToml::new("node-a", &dir.join("certs"), &dir.join("node"))
        .listen(&format!("127.0.0.1:{port}"))
        .map_size("256MiB")
        .access("gw-crash", "uplink", "publish = [\"site/#\"]")
        .write(&dir.join("node.toml"))
}

/// (epoch, seq, payload number) of every event in the node's log.
fn node_events(dir: &Path) -> Vec<(u64, u64, u64)> {
    match inspect_log(&dir.join("node/log"), NODE_MAP) {
        Ok(records) => records
            .into_iter()
            .filter_map(|(_, r)| match r {
                Record::Event { epoch, event, .. } => Some((
                    epoch,
                    event.seq,
                    std::str::from_utf8(&event.payload)
                        .unwrap()
                        .parse()
                        .unwrap(),
                )),
                Record::Gap { .. } => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn events_reach_the_node_exactly_once_across_a_node_kill() {
    let dir = tempfile::tempdir().unwrap();
    telemesh_quic::pki::write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-crash".into()],
        &[],
    )
    .unwrap();
    let node_port = free_udp_port();
    let node_cfg = node_config(dir.path(), node_port);
    let mut node = spawn_role("node", &node_cfg);

    let durable_port = free_port();
    let c = dir.path().join("certs");
    let edge_cfg = write_config(
        dir.path(),
        free_port(),
        &format!(
            "[durable]\nlisten = \"127.0.0.1:{durable_port}\"\n\
             [uplink]\nnodes = [\"127.0.0.1:{node_port}\"]\nca = \"{c}/ca.pem\"\n\
             cert = \"{c}/gw-crash.pem\"\nkey = \"{c}/gw-crash.key\"\nbatch_max_events = 200\nbackoff_max = \"200ms\"",
            c = c.display()
        ),
    );
    let _agent = spawn_agent(&edge_cfg);
    let durable: SocketAddr = ([127, 0, 0, 1], durable_port).into();
    wait_listening(durable);

    // First 3,000: acknowledged on disk at the edge, then forwarded.
    assert_eq!(
        publish(durable, "dev-e2e", QoS::AtLeastOnce, 0, 3_000).len(),
        3_000
    );
    wait_for("3,000 events at the node", Duration::from_secs(60), || {
        node_events(dir.path()).len() >= 3_000
    });

    // Kill the node while more arrive; the agent buffers and resends after the restart.
    let publisher =
        std::thread::spawn(move || publish(durable, "dev-e2e-2", QoS::AtLeastOnce, 3_000, 5_000));
    wait_for("the second wave to start", Duration::from_secs(60), || {
        node_events(dir.path()).len() >= 3_200
    });
    node.kill9();
    assert_eq!(publisher.join().unwrap().len(), 5_000);
    let mut node = spawn_role("node", &node_cfg);
    wait_for(
        "all 8,000 events at the node",
        Duration::from_secs(60),
        || node_events(dir.path()).len() >= 8_000,
    );

    let events = node_events(dir.path());
    let numbers: BTreeSet<u64> = events.iter().map(|e| e.2).collect();
    assert_eq!(events.len(), 8_000, "no event stored twice");
    assert_eq!(
        numbers,
        (0..8_000).collect::<BTreeSet<_>>(),
        "every event arrived"
    );
    let mut last: std::collections::HashMap<u64, u64> = Default::default();
    for (epoch, seq, _) in &events {
        let prev = last.insert(*epoch, *seq);
        assert!(
            prev.is_none_or(|p| p < *seq),
            "epoch {epoch}: seq {seq} after {prev:?}"
        );
    }
    // The agent's buffer is trimmed as acknowledgements come back.
    wait_for("the edge buffer to drain", Duration::from_secs(30), || {
        look(dir.path()).state.events == 0
    });
    node.sigterm();
}
