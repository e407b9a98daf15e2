//! Replication between nodes over real QUIC with real certificates, in one process:
//! multi-hop and cycles store every event exactly once and never send an event back along
//! its path; filtered replication records not-selected ranges; a replica resumes from its
//! stored cursor after a restart and starts again from earliest when its upstream's log was
//! wiped; a peer without access is refused.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use telemesh_client::Client;
use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::log::{NodeLog, Record};
use telemesh_mesh::node::Node;
use telemesh_mesh::replica::UpstreamState;
use telemesh_proto::{Event, Frame};
use telemesh_testkit::{free_udp_port as free_port, http_get, mesh_certs, NodeToml};

/// A node's config: `peers` may replicate from it; it pulls `replicate` = (port, node, filters).
fn config(
    dir: &Path,
    id: &str,
    port: u16,
    peers: &[&str],
    replicate: &[(u16, &str, &str)],
) -> NodeConfig {
    let mut t = NodeToml::new(id, &dir.join("certs"), &dir.join(id))
        .listen(&format!("127.0.0.1:{port}"))
        .access("analytics", "consumer", "");
    for p in peers {
        t = t.access(p, "peer", "");
    }
    for (port, node, filters) in replicate {
        t = t.section(&format!(
            "[[replicate]]\nfrom = \"127.0.0.1:{port}\"\nserver_name = \"{node}\"\nfilters = {filters}\nwindow = 500\n"
        ));
    }
    t.config()
}

/// Starts a node with [`config`].
async fn start(
    dir: &Path,
    id: &str,
    port: u16,
    peers: &[&str],
    replicate: &[(u16, &str, &str)],
) -> Node {
    Node::start(config(dir, id, port, peers, replicate))
        .await
        .unwrap()
}

fn setup(nodes: &[&str]) -> tempfile::TempDir {
    mesh_certs(nodes, &[], &["analytics"])
}

fn events(topic: &str, from: u64, to: u64) -> Vec<Event> {
    (from..to)
        .map(|seq| Event {
            seq,
            topic: format!("{topic}/{}", seq % 3),
            payload: seq.to_string().into_bytes(),
            ts_us: seq,
            qos: 1,
            headers: None,
        })
        .collect()
}

/// Every event of the log: (origin, epoch) → seqs in log order; panics on a duplicate.
fn stored(log: &NodeLog) -> BTreeMap<(String, u64), Vec<u64>> {
    let mut out: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (_, rec) in log.read(1, usize::MAX).unwrap() {
        if let Record::Event {
            origin,
            epoch,
            event,
            ..
        } = rec
        {
            assert!(
                seen.insert((origin.clone(), epoch, event.seq)),
                "{} stored {origin}/{epoch}/{} twice",
                log.node_id(),
                event.seq
            );
            out.entry((origin, epoch)).or_default().push(event.seq);
        }
    }
    out
}

/// Waits (on the log's commits, at most 30 s) until `done` holds for the log.
async fn until(log: &NodeLog, what: &str, done: impl Fn(&NodeLog) -> bool) {
    let mut committed = log.committed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(log) {
        tokio::select! {
            r = committed.changed() => r.unwrap(),
            _ = tokio::time::sleep_until(deadline) => panic!("{}: timed out waiting for {what}", log.node_id()),
        }
    }
}

/// Waits (on the upstream's status changes, at most 30 s) until `done` holds for it.
async fn until_upstream(u: &UpstreamState, what: &str, done: impl Fn(&UpstreamState) -> bool) {
    let mut changes = u.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(u) {
        tokio::select! {
            r = changes.changed() => r.unwrap(),
            _ = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}"),
        }
    }
}

fn count(log: &NodeLog, origin: &str, epoch: u64) -> u64 {
    log.held(origin, epoch).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_of_three_stores_every_event_once_and_sends_nothing_back() {
    let dir = setup(&["node-a", "node-b", "node-c"]);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    // A pulls from B, B from C, C from A: every event travels two hops to reach everyone,
    // and the third hop would bring it home.
    let mut a_cfg = config(
        dir.path(),
        "node-a",
        pa,
        &["node-c"],
        &[(pb, "node-b", "[\"#\"]")],
    );
    a_cfg.metrics = Some(telemesh_mesh::config::MetricsSection {
        listen: "127.0.0.1:0".parse().unwrap(),
    });
    // A takes B's rounds zstd-compressed.
    a_cfg.replicate[0].compression = telemesh_mesh::config::ReplicateCompression::Zstd;
    let a = Node::start(a_cfg).await.unwrap();
    let b = start(
        dir.path(),
        "node-b",
        pb,
        &["node-a"],
        &[(pc, "node-c", "[\"#\"]")],
    )
    .await;
    let c = start(
        dir.path(),
        "node-c",
        pc,
        &["node-b"],
        &[(pa, "node-a", "[\"#\"]")],
    )
    .await;
    let homes = [
        (&a, "gw-a", "site-a"),
        (&b, "gw-b", "site-b"),
        (&c, "gw-c", "site-c"),
    ];
    for (node, origin, topic) in homes {
        for chunk in 0..4u64 {
            node.log()
                .ingest(
                    origin.into(),
                    7,
                    events(topic, chunk * 500 + 1, chunk * 500 + 501),
                    vec![],
                )
                .await
                .unwrap();
        }
    }
    for node in [&a, &b, &c] {
        until(node.log(), "every origin", |log| {
            ["gw-a", "gw-b", "gw-c"]
                .iter()
                .all(|o| count(log, o, 7) == 2_000)
        })
        .await;
    }
    for node in [&a, &b, &c] {
        let s = stored(node.log());
        assert_eq!(s.len(), 3);
        for ((origin, _), seqs) in s {
            // One path per origin here, so seq order holds within each origin.
            assert_eq!(seqs, (1..=2_000).collect::<Vec<_>>(), "{origin} in order");
        }
        // Nothing came back along its path: the upstream never sent a held event.
        let u = &node.upstreams()[0];
        until_upstream(u, "the counters", |u| {
            u.events.load(Relaxed) >= 4_000 && u.status().behind == 0
        })
        .await;
        assert_eq!(u.duplicates.load(Relaxed), 0, "{}", node.log().node_id());
        assert_eq!(u.events.load(Relaxed), 4_000);
        let st = u.status();
        assert!(st.connected);
        assert_eq!(st.behind, 0);
    }
    // Multi-hop: A got C's events through B; the path says so.
    let via_b = a
        .log()
        .read(1, usize::MAX)
        .unwrap()
        .into_iter()
        .find_map(|(_, r)| match r {
            Record::Event { origin, path, .. } if origin == "gw-c" => Some(path),
            _ => None,
        })
        .unwrap();
    let ids: Vec<&str> = via_b.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(ids, ["node-c", "node-b"]);
    // The scrape names the upstream and its lag.
    let text = http_get(a.metrics_addr().unwrap(), "/metrics").await;
    let from = format!("127.0.0.1:{pb}");
    for line in [
        format!("telemesh_replication_connected{{upstream=\"{from}\"}} 1"),
        format!("telemesh_replication_lag_events{{upstream=\"{from}\"}} 0"),
        format!("telemesh_replication_events_total{{upstream=\"{from}\"}} 4000"),
        format!("telemesh_replication_latency_seconds_count{{upstream=\"{from}\"}} 4000"),
        format!("telemesh_replication_lag_seconds{{upstream=\"{from}\"}}"),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_replication_records_not_selected_ranges_both_ways() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let a = start(
        dir.path(),
        "node-a",
        pa,
        &["node-b"],
        &[(pb, "node-b", "[\"site-b/1\"]")],
    )
    .await;
    let b = start(
        dir.path(),
        "node-b",
        pb,
        &["node-a"],
        &[(pa, "node-a", "[\"#\"]")],
    )
    .await;
    a.log()
        .ingest("gw-a".into(), 1, events("site-a", 1, 301), vec![])
        .await
        .unwrap();
    b.log()
        .ingest("gw-b".into(), 1, events("site-b", 1, 301), vec![])
        .await
        .unwrap();
    until(b.log(), "all of gw-a", |log| count(log, "gw-a", 1) == 300).await;
    // A wants topic site-b/1 only: seqs 1, 4, 7 … (seq % 3 == 1).
    until(a.log(), "site-b/1 of gw-b", |log| {
        count(log, "gw-b", 1) == 100
    })
    .await;
    let want: Vec<u64> = (1..301).filter(|s| s % 3 == 1).collect();
    assert_eq!(stored(a.log())[&("gw-b".to_string(), 1)], want);
    until_upstream(&a.upstreams()[0], "the scan through B's log", |u| {
        u.status().through >= 300
    })
    .await;
    let c = a.log().completeness().unwrap();
    let gwb = c.origins.iter().find(|o| o.origin == "gw-b").unwrap();
    let not_selected: u64 = gwb.not_selected.iter().map(|(x, y)| y - x + 1).sum();
    assert_eq!(
        not_selected, 200,
        "every other seq is recorded as not selected"
    );
    assert!(gwb.held.iter().all(|(x, y)| x == y && x % 3 == 1));
    // B's events that came from A are not sent back to A.
    assert_eq!(a.upstreams()[0].duplicates.load(Relaxed), 0);
    assert_eq!(b.upstreams()[0].duplicates.load(Relaxed), 0);
    // What `telemesh status` shows: the upstream and the not-selected ranges.
    let c = dir.path().join("certs");
    let client = Client::connect(&telemesh_testkit::client_config(
        &c,
        &a.local_addr().to_string(),
        "node-a",
        "analytics",
    ))
    .await
    .unwrap();
    let Frame::Status {
        upstreams, origins, ..
    } = client.status().await.unwrap()
    else {
        panic!("not a status")
    };
    client.close().await;
    assert_eq!(upstreams.len(), 1);
    assert_eq!(upstreams[0].from, format!("127.0.0.1:{pb}"));
    assert_eq!(upstreams[0].node_id, "node-b");
    assert!(upstreams[0].connected);
    assert_eq!(upstreams[0].behind, 0);
    let gwb = origins.iter().find(|o| o.origin == "gw-b").unwrap();
    assert_eq!(
        gwb.not_selected.len(),
        100,
        "seqs 2-3, 5-6, …: one range each"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_resumes_after_restart_and_restarts_from_earliest_on_a_wiped_upstream() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let a_cfg = config(dir.path(), "node-a", pa, &["node-b"], &[]);
    let b_cfg = config(dir.path(), "node-b", pb, &[], &[(pa, "node-a", "[\"#\"]")]);
    let a = Node::start(a_cfg.clone()).await.unwrap();
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1, 1_001), vec![])
        .await
        .unwrap();
    let b = Node::start(b_cfg.clone()).await.unwrap();
    until(b.log(), "the first 1,000", |log| {
        count(log, "gw", 1) == 1_000
    })
    .await;
    b.shutdown().await;
    // B is down while A takes more.
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1_001, 2_001), vec![])
        .await
        .unwrap();
    let b = Node::start(b_cfg.clone()).await.unwrap();
    until(b.log(), "the second 1,000", |log| {
        count(log, "gw", 1) == 2_000
    })
    .await;
    // The counters follow the commit.
    until_upstream(&b.upstreams()[0], "the counters", |u| {
        u.events.load(Relaxed) >= 1_000
    })
    .await;
    assert_eq!(
        b.upstreams()[0].events.load(Relaxed),
        1_000,
        "resumed after the stored cursor: nothing sent twice"
    );
    assert_eq!(b.upstreams()[0].duplicates.load(Relaxed), 0);
    // A's log is wiped and refilled: a new incarnation whose node seqs start at 1 again.
    // Without starting again from earliest B would skip A's first 2,000 records.
    a.shutdown().await;
    std::fs::remove_dir_all(dir.path().join("node-a")).unwrap();
    let a = Node::start(a_cfg).await.unwrap();
    a.log()
        .ingest("gw".into(), 2, events("site-a", 1, 501), vec![])
        .await
        .unwrap();
    until(b.log(), "the new incarnation's events", |log| {
        count(log, "gw", 2) == 500
    })
    .await;
    let s = stored(b.log());
    assert_eq!(s[&("gw".to_string(), 1)], (1..=2_000).collect::<Vec<_>>());
    assert_eq!(s[&("gw".to_string(), 2)], (1..=500).collect::<Vec<_>>());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_peer_access_is_refused_and_gets_nothing() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    // A grants node-b no peer role.
    let a = start(dir.path(), "node-a", pa, &[], &[]).await;
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1, 11), vec![])
        .await
        .unwrap();
    let b = start(dir.path(), "node-b", pb, &[], &[(pa, "node-a", "[\"#\"]")]).await;
    let u = b.upstreams()[0].clone();
    // Each refused attempt is counted; wait for two (the second after a backoff).
    until_upstream(&u, "two refusals", |u| u.errors.load(Relaxed) >= 2).await;
    assert!(!u.status().connected);
    assert_eq!(count(b.log(), "gw", 1), 0);
    assert!(a.metrics().refused.load(Relaxed) >= 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_upstream_before_they_were_pulled_are_recorded_as_lost() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let a = start(dir.path(), "node-a", pa, &["node-b"], &[]).await;
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1, 101), vec![])
        .await
        .unwrap();
    let b_cfg = config(dir.path(), "node-b", pb, &[], &[(pa, "node-a", "[\"#\"]")]);
    let b = Node::start(b_cfg.clone()).await.unwrap();
    until(b.log(), "the first 100", |log| count(log, "gw", 1) == 100).await;
    until_upstream(&b.upstreams()[0], "the cursor", |u| {
        u.status().through >= 100
    })
    .await;
    b.shutdown().await;
    // While B is down, A takes 1,000 more and its retention deletes all but the newest 300.
    a.log()
        .ingest("gw".into(), 1, events("site-a", 101, 1_101), vec![])
        .await
        .unwrap();
    let per_record = {
        let recs = a.log().read(1, 2).unwrap();
        assert_eq!(recs.len(), 2);
        postcard_len(&recs[1].1)
    };
    a.log().retain(0, per_record * 300, 10_000).await.unwrap();
    let earliest = a.log().first_seq().unwrap();
    assert!(earliest > 101, "retention deleted what B had not pulled");
    let b = Node::start(b_cfg).await.unwrap();
    until(b.log(), "the newest events", |log| {
        log.held("gw", 1).unwrap().contains(1_100)
    })
    .await;
    // The skipped node seqs of A are a gap record under A's id; nothing else is invented.
    let c = b.log().completeness().unwrap();
    let lost = c
        .origins
        .iter()
        .find(|o| o.origin == "node-a")
        .map(|o| o.lost.clone())
        .unwrap();
    assert_eq!(lost, vec![(101, earliest - 1)]);
    let held = b.log().held("gw", 1).unwrap();
    assert_eq!(held.len(), 100 + (1_100 - earliest + 1));
    a.shutdown().await;
    b.shutdown().await;
}

/// The stored size of a record, as retention counts it.
fn postcard_len(rec: &Record) -> u64 {
    postcard::to_allocvec(rec).unwrap().len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_seconds_keeps_growing_while_the_upstream_is_unreachable() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let a = start(dir.path(), "node-a", pa, &["node-b"], &[]).await;
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1, 11), vec![])
        .await
        .unwrap();
    let newest_ingest_us = match &a.log().read(10, 1).unwrap()[0].1 {
        Record::Event { ingest_us, .. } => *ingest_us,
        other => panic!("{other:?}"),
    };
    let b = start(dir.path(), "node-b", pb, &[], &[(pa, "node-a", "[\"#\"]")]).await;
    let u = b.upstreams()[0].clone();
    until_upstream(&u, "the events", |u| u.events.load(Relaxed) == 10).await;
    a.shutdown().await;
    until_upstream(&u, "the disconnect", |u| !u.status().connected).await;
    // Disconnected: the lag is the age of the newest event replicated, measured now.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let lag = u.status().lag_ms;
    assert!(
        lag >= (before - newest_ingest_us) / 1000,
        "lag {lag} ms is the age of the newest event"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_of_large_events_stay_within_the_frame_limit() {
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let mut a_cfg = config(dir.path(), "node-a", pa, &["node-b"], &[]);
    let mut b_cfg = config(dir.path(), "node-b", pb, &[], &[(pa, "node-a", "[\"#\"]")]);
    for c in [&mut a_cfg, &mut b_cfg] {
        c.node.max_frame_bytes = bytesize::ByteSize::mib(2);
    }
    let a = Node::start(a_cfg).await.unwrap();
    // Ten events of 900 KB: together far beyond a 2 MiB frame.
    let big: Vec<Event> = (1..=10)
        .map(|seq| Event {
            seq,
            topic: "site-a/blob".into(),
            payload: vec![seq as u8; 900_000],
            ts_us: seq,
            qos: 1,
            headers: None,
        })
        .collect();
    a.log().ingest("gw".into(), 1, big, vec![]).await.unwrap();
    let b = Node::start(b_cfg).await.unwrap();
    until(b.log(), "the ten large events", |log| {
        count(log, "gw", 1) == 10
    })
    .await;
    assert_eq!(
        b.upstreams()[0].errors.load(Relaxed),
        0,
        "no frame was too large"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_is_given_up_within_seconds_and_replication_resumes_after_the_cut() {
    use telemesh_quic::relay::Relay;
    let dir = setup(&["node-a", "node-b"]);
    let (pa, pb) = (free_port(), free_port());
    let a = start(dir.path(), "node-a", pa, &["node-b"], &[]).await;
    let relay = Relay::start(a.local_addr()).await.unwrap();
    let mut b_cfg = config(dir.path(), "node-b", pb, &[], &[]);
    b_cfg.replicate = config(
        dir.path(),
        "node-b",
        pb,
        &[],
        &[(relay.addr().port(), "node-a", "[\"#\"]")],
    )
    .replicate;
    let b = Node::start(b_cfg).await.unwrap();
    a.log()
        .ingest("gw".into(), 1, events("site-a", 1, 101), vec![])
        .await
        .unwrap();
    until(b.log(), "the first 100", |log| count(log, "gw", 1) == 100).await;
    let u = b.upstreams()[0].clone();
    // Idle and caught up: heartbeats keep the link; cut it and the silence ends it (QUIC
    // alone would wait for its 30 s idle timeout).
    relay.set_cut(true);
    let cut_at = std::time::Instant::now();
    until_upstream(&u, "the silent link to be given up", |u| {
        u.errors.load(Relaxed) >= 1
    })
    .await;
    let noticed = cut_at.elapsed();
    assert!(
        noticed < std::time::Duration::from_secs(20),
        "noticed after {noticed:?}"
    );
    a.log()
        .ingest("gw".into(), 1, events("site-a", 101, 201), vec![])
        .await
        .unwrap();
    relay.set_cut(false);
    until(b.log(), "the next 100 after the cut", |log| {
        count(log, "gw", 1) == 200
    })
    .await;
    assert_eq!(
        stored(b.log())[&("gw".to_string(), 1)],
        (1..=200).collect::<Vec<_>>()
    );
    a.shutdown().await;
    b.shutdown().await;
}
