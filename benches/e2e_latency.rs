//! End-to-end latency, device publish → consumer: `telemesh sim` (a separate process, pinned
//! to core 1 when `taskset` exists) publishes at a steady rate to an agent's durable port, the
//! agent's uplink forwards to a node, and a consumer subscribed through the client library
//! measures each event's age from the send time in its payload. Run with `sync = interval`
//! on edge and node (as NATS and mosquitto do not fsync per message) and with
//! `sync = always` beside it. `cargo bench --bench e2e_latency` sends 20,000 events at
//! 2,000/s per case; under `cargo test`, 200 at 1,000/s.

use std::process::Command;
use std::time::Duration;

use hdrhistogram::Histogram;
use telemesh_client::{Client, Item, SubscribeOptions};
use telemesh_edge::{Agent, EdgeConfig};
use telemesh_mesh::node::Node;
use telemesh_quic::pki::write_mesh;
use telemesh_testkit::NodeToml;

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (count, rate) = if full {
        (20_000u64, 2_000u64)
    } else {
        (200, 1_000)
    };
    let pinned = full
        && Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    for sync in ["interval", "always"] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("certs");
        write_mesh(&c, &["node-a".into()], &["gw-lat".into()], &["lat".into()]).unwrap();
        let node_cfg = NodeToml::new("node-a", &c, &dir.path().join("node"))
            .map_size("1GiB")
            .sync(sync)
            .access("gw-lat", "uplink", "publish = [\"sim/#\"]")
            .access("lat", "consumer", "read = [\"sim/#\"]")
            .config();
        let node = rt.block_on(Node::start(node_cfg)).unwrap();
        let mqtt = telemesh_testkit::free_port();
        let edge_cfg = EdgeConfig::from_toml(&format!(
            "[agent]\nid = \"gw-lat\"\ndata_dir = \"{d}/edge\"\n[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
             [durable]\nlisten = \"127.0.0.1:0\"\n\
             [buffer]\nmax_bytes = \"256MiB\"\nmap_size = \"512MiB\"\nsync = \"{sync}\"\n\
             [uplink]\nnodes = [\"{node}\"]\nserver_name = \"node-a\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/gw-lat.pem\"\nkey = \"{c}/gw-lat.key\"\n",
            d = dir.path().display(),
            c = c.display(),
            node = node.local_addr()
        ))
        .unwrap();
        let agent = Agent::start(&edge_cfg).unwrap();
        let durable = agent.durable_addr().unwrap();
        let client_cfg =
            telemesh_testkit::client_config(&c, &node.local_addr().to_string(), "node-a", "lat");
        let hist = rt.block_on(async {
            let client = Client::connect(&client_cfg).await.unwrap();
            let mut sub = client
                .subscribe(SubscribeOptions::new(vec!["sim/#".into()]))
                .await
                .unwrap();
            let mut sim = if pinned {
                let mut c = Command::new("taskset");
                c.args(["-c", "1", env!("CARGO_BIN_EXE_telemesh")]);
                c
            } else {
                Command::new(env!("CARGO_BIN_EXE_telemesh"))
            };
            let mut child = sim
                .args(["sim", "--mqtt", &durable.to_string(), "--devices", "10"])
                .args(["--rate", &rate.to_string(), "--count", &count.to_string()])
                .args([
                    "--payload-bytes",
                    "100",
                    "--qos",
                    "1",
                    "--topic",
                    "sim/dev{device}/t",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut got = 0;
            while got < count {
                match tokio::time::timeout(Duration::from_secs(60), sub.next()).await {
                    Ok(Ok(Some(Item::Event(e)))) => {
                        let sent = u64::from_le_bytes(e.event.payload[..8].try_into().unwrap());
                        let _ = hist.record(now_us().saturating_sub(sent));
                        got += 1;
                    }
                    Ok(Ok(_)) => {}
                    other => panic!("subscription ended early: {other:?}"),
                }
            }
            assert!(child.wait().unwrap().success());
            client.close().await;
            hist
        });
        println!(
            "e2e_latency (sync={sync}, {count} events at {rate}/s, device → consumer): p50 {} us, p99 {} us, max {} us; sim pinned: {pinned}",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.max()
        );
        agent.shutdown().unwrap();
        rt.block_on(node.shutdown());
    }
}
