//! `telemesh sub` against a node: JSON lines with the documented fields, `--count` and
//! `--timeout`, and a durable name that resumes after what it printed.

mod common;

use std::process::Command;

use common::sub;
use telemesh_mesh::node::Node;
use telemesh_proto::Event;
use telemesh_quic::pki::write_mesh;
use telemesh_testkit::NodeToml;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_prints_json_lines_counts_times_out_and_resumes_a_durable_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("certs");
    write_mesh(&c, &["node-a".into()], &[], &["analytics".into()]).unwrap();
    let cfg = NodeToml::new("node-a", &c, &dir.path().join("node"))
        .access("analytics", "consumer", "read = [\"site-a/#\"]")
        .config();
    let node = Node::start(cfg).await.unwrap();
    let events: Vec<Event> = (1..=20)
        .map(|seq| Event {
            seq,
            topic: "site-a/t".into(),
            payload: if seq == 20 {
                vec![0xff, 0x00]
            } else {
                format!("v{seq}").into_bytes()
            },
            ts_us: 1_000 + seq,
            qos: 1,
            headers: None,
        })
        .collect();
    node.log()
        .ingest("gw-1".into(), 77, events, vec![])
        .await
        .unwrap();
    let client_toml = dir.path().join("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            "node = \"{}\"\nserver_name = \"node-a\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/analytics.pem\"\nkey = \"{c}/analytics.key\"\n",
            node.local_addr(),
            c = c.display()
        ),
    )
    .unwrap();
    let toml = client_toml.clone();
    let (ok, lines, err) = tokio::task::spawn_blocking(move || {
        sub(
            &toml,
            &[
                "--filter",
                "site-a/#",
                "--from",
                "earliest",
                "--count",
                "5",
                "--json",
                "--durable",
                "cli",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 5);
    let first = &lines[0];
    assert_eq!(first["origin"], "gw-1");
    assert_eq!(first["epoch"], 77);
    assert_eq!(first["seq"], 1);
    assert_eq!(first["topic"], "site-a/t");
    assert_eq!(first["payload"], "v1");
    assert_eq!(first["ts_us"], 1_001);
    assert_eq!(first["node"], "node-a");
    assert_eq!(first["node_seq"], 1);

    // The durable name resumes after the five it printed; binary payloads come as base64.
    let toml = client_toml.clone();
    let (ok, lines, err) = tokio::task::spawn_blocking(move || {
        sub(
            &toml,
            &[
                "--filter",
                "site-a/#",
                "--count",
                "15",
                "--json",
                "--durable",
                "cli",
                "--timeout",
                "20s",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (6..=20).collect::<Vec<_>>());
    assert_eq!(lines[14]["encoding"], "base64");
    assert_eq!(lines[14]["payload"], "/wA=");

    // Fewer events than --count before --timeout: a non-zero exit.
    let toml = client_toml.clone();
    let (ok, lines, err) = tokio::task::spawn_blocking(move || {
        sub(
            &toml,
            &[
                "--filter",
                "site-a/#",
                "--from",
                "seq:18",
                "--count",
                "10",
                "--json",
                "--timeout",
                "1s",
            ],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "must fail when --count is not reached");
    assert_eq!(lines.len(), 3);
    assert!(err.contains("only 3 of 10"), "{err}");

    // Completeness: what the node holds per origin and epoch, what is known lost, and the
    // durable consumer's position.
    let gap = telemesh_proto::Gap {
        kind: telemesh_proto::GapKind::Range {
            first: 21,
            last: 25,
        },
        reason: telemesh_proto::GapReason::Evicted,
        ts_us: 1,
    };
    node.log()
        .ingest("gw-1".into(), 77, vec![], vec![gap])
        .await
        .unwrap();
    let toml = client_toml.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_telemesh"))
            .args(["status", "--json", "--config"])
            .arg(&toml)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "node-a");
    assert_eq!(v["committed"], 21);
    assert_eq!(v["origins"][0]["origin"], "gw-1");
    assert_eq!(v["origins"][0]["held"], serde_json::json!([[1, 20]]));
    assert_eq!(v["origins"][0]["lost"], serde_json::json!([[21, 25]]));
    assert_eq!(v["consumers"][0]["name"], "cli");
    assert_eq!(v["consumers"][0]["acked"], 20);
    node.shutdown().await;
}
