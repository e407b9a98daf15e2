//! Subscriptions over real QUIC with real certificates: replay equals what was ingested, the
//! switch from catch-up to live tail has no gap and no duplicate, a durable consumer resumes
//! after its last ack across a node restart, and reads outside the access rules are refused.

use std::path::Path;

use telemesh_client::{Client, ClientConfig, ClientError, Item, SubscribeOptions};
use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::node::Node;
use telemesh_proto::{ErrorCode, Event, Start};
use telemesh_testkit::{http_get, mesh_certs, NodeToml};

fn node_config(dir: &Path) -> NodeConfig {
    NodeToml::new("node-a", &dir.join("certs"), &dir.join("node"))
        .access("analytics", "consumer", "read = [\"site-a/#\"]")
        .config()
}

fn client_config(dir: &Path, node: &Node) -> ClientConfig {
    telemesh_testkit::client_config(
        &dir.join("certs"),
        &node.local_addr().to_string(),
        "node-a",
        "analytics",
    )
}

fn events(from: u64, to: u64) -> Vec<Event> {
    (from..to)
        .map(|seq| Event {
            seq,
            topic: if seq % 3 == 0 {
                "site-b/x".into()
            } else {
                format!("site-a/line{}", seq % 4)
            },
            payload: seq.to_string().into_bytes(),
            ts_us: seq,
            qos: 1,
            headers: None,
        })
        .collect()
}

fn setup() -> tempfile::TempDir {
    mesh_certs(&["node-a"], &[], &["analytics"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_tail_without_gap_or_duplicate() {
    let dir = setup();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    node.log()
        .ingest("gw".into(), 9, events(1, 3_001), vec![])
        .await
        .unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    let mut opts = SubscribeOptions::new(vec!["site-a/#".into()]).start(Start::Earliest);
    opts.credit_window = 100;
    let mut sub = client.subscribe(opts).await.unwrap();
    let want: Vec<u64> = (1..6_001).filter(|s| s % 3 != 0).collect();
    let mut got = Vec::new();
    let mut last_node_seq = 0;
    while got.len() < want.len() {
        if got.len() == 1_000 {
            // Live events arrive while the consumer is still catching up.
            node.log()
                .ingest("gw".into(), 9, events(3_001, 6_001), vec![])
                .await
                .unwrap();
        }
        match sub.next().await.unwrap().unwrap() {
            Item::Event(e) => {
                assert!(e.node_seq > last_node_seq, "node seqs increase");
                last_node_seq = e.node_seq;
                assert_eq!((e.origin.as_str(), e.epoch), ("gw", 9));
                got.push(e.event.seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got, want,
        "replay and live tail: every matching event once, in order"
    );
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_its_last_ack_across_a_restart() {
    let dir = setup();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    node.log()
        .ingest("gw".into(), 1, events(1, 301), vec![])
        .await
        .unwrap();
    let cfg = client_config(dir.path(), &node);
    let client = Client::connect(&cfg).await.unwrap();
    let opts = SubscribeOptions::new(vec!["site-a/#".into()])
        .start(Start::Earliest)
        .durable("svc");
    let mut sub = client.subscribe(opts.clone()).await.unwrap();
    let mut acked = 0;
    for _ in 0..50 {
        if let Item::Event(e) = sub.next().await.unwrap().unwrap() {
            acked = e.node_seq;
        }
    }
    sub.ack(acked).await.unwrap();
    // A second connection under the same name is refused while the first lives.
    let other = Client::connect(&cfg).await.unwrap();
    match other.subscribe(opts.clone()).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::DURABLE_IN_USE),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Other filters under the same name are refused too.
    let mut changed = opts.clone();
    changed.filters = vec!["site-a/line1".into()];
    drop(sub);
    client.close().await;
    let node_dir_cfg = node_config(dir.path());
    // Wait until the ack is durable: the node answers nothing for acks, so read the cursor.
    let key = telemesh_mesh::log::cursor_key("analytics", "svc");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.log().cursor(&key).unwrap().map(|c| c.acked) != Some(acked) {
        assert!(
            std::time::Instant::now() < until,
            "the ack never reached the cursor"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    node.shutdown().await;

    let mut cfg2 = node_dir_cfg;
    cfg2.node.listen = "127.0.0.1:0".parse().unwrap();
    let node = Node::start(cfg2).await.unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    match client.subscribe(changed).await {
        Err(ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::DURABLE_FILTERS_DIFFER)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // `start` is ignored once the durable consumer exists: it resumes right after its ack.
    let mut sub = client.subscribe(opts.start(Start::Latest)).await.unwrap();
    assert_eq!(sub.from, acked + 1);
    match sub.next().await.unwrap().unwrap() {
        Item::Event(e) => assert!(e.node_seq > acked),
        other => panic!("unexpected {other:?}"),
    }
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_outside_the_access_rules_are_refused() {
    let dir = setup();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    for filter in ["site-b/#", "#", "+/line1"] {
        match client
            .subscribe(SubscribeOptions::new(vec![filter.into()]))
            .await
        {
            Err(ClientError::Refused { code, .. }) => {
                assert_eq!(code, ErrorCode::READ_DENIED, "{filter}")
            }
            other => panic!("{filter}: expected a refusal, got {other:?}"),
        }
    }
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_before_retention_is_told_truncated_and_continues_at_the_earliest() {
    let dir = setup();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    node.log()
        .ingest("gw".into(), 1, events(1, 101), vec![])
        .await
        .unwrap();
    node.log().retain(0, 0, 50).await.unwrap(); // keep nothing…
    node.log()
        .ingest("gw".into(), 1, events(101, 111), vec![])
        .await
        .unwrap(); // …then 10 more
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    let mut sub = client
        .subscribe(SubscribeOptions::new(vec!["site-a/#".into()]).start(Start::Seq(1)))
        .await
        .unwrap();
    match sub.next().await.unwrap().unwrap() {
        Item::Truncated {
            requested,
            earliest,
        } => assert_eq!((requested, earliest), (1, 101)),
        other => panic!("expected truncated, got {other:?}"),
    }
    match sub.next().await.unwrap().unwrap() {
        Item::Event(e) => assert!(e.node_seq >= 101),
        other => panic!("unexpected {other:?}"),
    }
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_grants_no_more_credit_gets_nothing_more() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = setup();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    node.log()
        .ingest("gw".into(), 1, events(1, 1_001), vec![])
        .await
        .unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    let mut slow = SubscribeOptions::new(vec!["site-a/#".into()]).start(Start::Earliest);
    slow.credit_window = 10;
    // Taking fewer than half the window grants nothing back.
    let mut slow_sub = client.subscribe(slow).await.unwrap();
    for _ in 0..4 {
        assert!(matches!(
            slow_sub.next().await.unwrap(),
            Some(Item::Event(_))
        ));
    }
    // More data arrives; a second consumer reads all of it, so the node has surely had
    // every chance to push more to the first.
    node.log()
        .ingest("gw".into(), 1, events(1_001, 2_001), vec![])
        .await
        .unwrap();
    let want = (1..2_001).filter(|s| s % 3 != 0).count();
    let mut fast = client
        .subscribe(SubscribeOptions::new(vec!["site-a/#".into()]).start(Start::Earliest))
        .await
        .unwrap();
    let mut n = 0;
    while n < want {
        if let Some(Item::Event(_)) = fast.next().await.unwrap() {
            n += 1;
        }
    }
    assert_eq!(
        node.metrics().delivered.load(Relaxed),
        10 + want as u64,
        "the slow consumer got exactly its credit, no more"
    );
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_completeness_and_consumer_lag_and_healthz_answers() {
    let dir = setup();
    let mut cfg = node_config(dir.path());
    cfg.metrics = Some(telemesh_mesh::config::MetricsSection {
        listen: "127.0.0.1:0".parse().unwrap(),
    });
    let node = Node::start(cfg).await.unwrap();
    let gap = telemesh_proto::Gap {
        kind: telemesh_proto::GapKind::Range {
            first: 31,
            last: 40,
        },
        reason: telemesh_proto::GapReason::Overrun,
        ts_us: 1,
    };
    node.log()
        .ingest("gw".into(), 4, events(1, 31), vec![gap])
        .await
        .unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    let mut sub = client
        .subscribe(
            SubscribeOptions::new(vec!["site-a/#".into()])
                .start(Start::Earliest)
                .durable("m"),
        )
        .await
        .unwrap();
    if let Some(Item::Event(e)) = sub.next().await.unwrap() {
        sub.ack(e.node_seq).await.unwrap();
    }
    sub.finish().await.unwrap();
    // A refused subscription is counted by its code.
    assert!(client
        .subscribe(SubscribeOptions::new(vec!["site-b/#".into()]))
        .await
        .is_err());
    let addr = node.metrics_addr().unwrap();
    let text = http_get(addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for line in [
        "telemesh_node_committed_seq 31",
        "telemesh_origin_held_events{origin=\"gw\",epoch=\"4\"} 30",
        "telemesh_origin_lost_events{origin=\"gw\",epoch=\"4\"} 10",
        "telemesh_consumer_lag_events{identity=\"analytics\",name=\"m\"} 30",
        "# TYPE telemesh_node_delivered counter",
        "telemesh_node_errors_total{code=\"read_denied\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // Every sample line parses as `name{labels} value`.
    for l in text.lines().skip_while(|l| !l.is_empty()).skip(1) {
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let value = l.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {l:?}");
    }
    let health = http_get(addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
    client.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_away_longer_than_consumer_ttl_expires_and_a_connected_one_stays() {
    let dir = setup();
    let mut cfg = node_config(dir.path());
    cfg.retention.consumer_ttl = std::time::Duration::from_millis(200);
    cfg.retention.interval = std::time::Duration::from_millis(20);
    let node = Node::start(cfg).await.unwrap();
    node.log()
        .ingest("gw".into(), 1, events(1, 31), vec![])
        .await
        .unwrap();
    let client = Client::connect(&client_config(dir.path(), &node))
        .await
        .unwrap();
    let durable = |name: &str| {
        SubscribeOptions::new(vec!["site-a/#".into()])
            .start(Start::Earliest)
            .durable(name)
    };
    // "stays" remains connected; "goes" acknowledges and leaves.
    let stays = client.subscribe(durable("stays")).await.unwrap();
    let mut goes = client.subscribe(durable("goes")).await.unwrap();
    let Some(Item::Event(e)) = goes.next().await.unwrap() else {
        panic!("an event")
    };
    goes.ack(e.node_seq).await.unwrap();
    goes.finish().await.unwrap();
    let names = || -> Vec<String> {
        node.log()
            .completeness()
            .unwrap()
            .consumers
            .into_iter()
            .map(|c| c.name)
            .collect()
    };
    // The retention task reports each expiry; wait (bounded) for the first.
    let mut expired = node.metrics().consumers_expired.subscribe();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        expired.wait_for(|n| *n >= 1),
    )
    .await
    .expect("goes never expired")
    .unwrap();
    // Older than the expired one, but connected: kept.
    assert_eq!(names(), vec!["stays".to_string()]);
    assert_eq!(*node.metrics().consumers_expired.borrow(), 1);
    // The expired name starts afresh: from its start, not after its old ack.
    let mut again = client.subscribe(durable("goes")).await.unwrap();
    let Some(Item::Event(first)) = again.next().await.unwrap() else {
        panic!("an event")
    };
    assert_eq!(first.node_seq, 1, "a new cursor from earliest");
    drop(stays);
    client.close().await;
    node.shutdown().await;
}
