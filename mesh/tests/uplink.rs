//! Uplink ingest over real QUIC with real certificates on 127.0.0.1: acks after commit, exact
//! dedupe of resent batches, poison pills refused on their own, and refusals (unknown
//! identity, wrong CA, origin mismatch, a hello that lies) with their codes.

use std::path::Path;

use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::log::Record;
use telemesh_mesh::node::Node;
use telemesh_proto::{ErrorCode, Frame, Role, PROTOCOL_VERSION};
use telemesh_quic::pki::{write_mesh, Authority, Kind};
use telemesh_quic::wire::{write_frame, FrameReader};
use telemesh_testkit::quic::{self, events};
use telemesh_testkit::NodeToml;

fn node_config(dir: &Path) -> NodeConfig {
    NodeToml::new("node-a", &dir.join("certs"), &dir.join("node"))
        .access("gw-1", "uplink", "publish = [\"site-a/#\"]")
        .access("gw-2", "uplink", "publish = [\"site-b/#\"]")
        .access("analytics", "consumer", "")
        .config()
}

async fn dial(dir: &Path, name: &str, ca: &Path, node: &Node) -> Result<quinn::Connection, String> {
    quic::dial(&dir.join("certs"), name, ca, node.local_addr(), "node-a").await
}

async fn hello(conn: &quinn::Connection, id: &str) -> (quinn::SendStream, FrameReader, Frame) {
    quic::hello(conn, id, Role::Uplink).await
}

#[tokio::test]
async fn batches_are_acked_after_commit_deduped_and_poison_pills_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into(), "gw-2".into(), "stranger".into()],
        &[],
    )
    .unwrap();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let ca = dir.path().join("certs/ca.pem");
    let conn = dial(dir.path(), "gw-1", &ca, &node).await.unwrap();
    let (mut send, mut reader, welcome) = hello(&conn, "gw-1").await;
    let Frame::Welcome {
        node_id,
        incarnation,
        ..
    } = welcome
    else {
        panic!("expected welcome, got {welcome:?}")
    };
    assert_eq!(node_id, "node-a");
    assert_eq!(incarnation, node.log().incarnation());

    // Ten batches in flight at once, then batch 3 again (a resend after a lost ack).
    let epoch = 42;
    for b in 0..10u64 {
        let frame = Frame::Batch {
            id: b + 1,
            origin: "gw-1".into(),
            epoch,
            events: events(b * 100 + 1..=b * 100 + 100, "site-a/line/t"),
            gaps: vec![],
        };
        write_frame(&mut send, &frame).await.unwrap();
    }
    write_frame(
        &mut send,
        &Frame::Batch {
            id: 11,
            origin: "gw-1".into(),
            epoch,
            events: events(201..=300, "site-a/line/t"),
            gaps: vec![],
        },
    )
    .await
    .unwrap();
    // A poison pill among good events, and a batch under another origin.
    let mut mixed = events(1_001..=1_003, "site-a/line/t");
    mixed[1].topic = "site-b/not/mine".into();
    write_frame(
        &mut send,
        &Frame::Batch {
            id: 12,
            origin: "gw-1".into(),
            epoch,
            events: mixed,
            gaps: vec![],
        },
    )
    .await
    .unwrap();
    write_frame(
        &mut send,
        &Frame::Batch {
            id: 13,
            origin: "gw-2".into(),
            epoch,
            events: events(1..=1, "site-b/x"),
            gaps: vec![],
        },
    )
    .await
    .unwrap();
    let mut committed = node.log().committed();
    for want in 1..=13u64 {
        let f = reader.next().await.unwrap().unwrap();
        match f {
            Frame::Ack { id, rejected } => {
                assert_eq!(id, want, "acks come in batch order");
                // Every acknowledged batch is durable in the log by now.
                assert!(*committed.borrow_and_update() >= want.min(10) * 100);
                if id == 12 {
                    assert_eq!(rejected.len(), 1);
                    assert_eq!(rejected[0].seq, 1_002);
                    assert_eq!(rejected[0].code, ErrorCode::PUBLISH_DENIED);
                } else {
                    assert!(rejected.is_empty());
                }
            }
            Frame::BatchRefused { id, code, .. } => {
                assert_eq!((id, code), (13, ErrorCode::ORIGIN_MISMATCH));
                assert_eq!(want, 13);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let stored = node.log().read(1, usize::MAX).unwrap();
    let seqs: Vec<u64> = stored
        .iter()
        .map(|(_, r)| match r {
            Record::Event { origin, event, .. } => {
                assert_eq!(origin, "gw-1");
                event.seq
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let mut want: Vec<u64> = (1..=1_000).collect();
    want.extend([1_001, 1_003]);
    assert_eq!(
        seqs, want,
        "each event once, in order; the poison pill alone refused"
    );
    // The poison pill is in the dead-letter store and the completeness view.
    let c = node.log().completeness().unwrap();
    let origin = c.origins.iter().find(|o| o.origin == "gw-1").unwrap();
    assert_eq!(origin.rejected, vec![(1_002, 1_002)]);
    assert_eq!(origin.held, vec![(1, 1_001), (1_003, 1_003)]);
    assert_eq!(c.dead_letters.len(), 1);
    assert_eq!(c.dead_letters[0].topic, "site-b/not/mine");
    assert_eq!(c.dead_letters[0].code, ErrorCode::PUBLISH_DENIED);
    let m = node.metrics();
    assert_eq!(m.duplicates.load(std::sync::atomic::Ordering::Relaxed), 100);
    assert_eq!(
        m.events_rejected.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    conn.close(0u32.into(), b"done");
    node.shutdown().await;
}

#[tokio::test]
async fn refusals_carry_codes() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into(), "stranger".into()],
        &[],
    )
    .unwrap();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let ca = dir.path().join("certs/ca.pem");

    // A certificate with no access entry.
    let conn = dial(dir.path(), "stranger", &ca, &node).await.unwrap();
    let (_s, _r, answer) = hello(&conn, "stranger").await;
    assert!(
        matches!(
            answer,
            Frame::Reject {
                code: ErrorCode::UNKNOWN_IDENTITY,
                ..
            }
        ),
        "{answer:?}"
    );

    // A hello claiming another identity than the certificate's.
    let conn = dial(dir.path(), "gw-1", &ca, &node).await.unwrap();
    let (_s, _r, answer) = hello(&conn, "gw-2").await;
    assert!(
        matches!(
            answer,
            Frame::Reject {
                code: ErrorCode::IDENTITY_MISMATCH,
                ..
            }
        ),
        "{answer:?}"
    );

    // A certificate from another CA: the TLS handshake fails on the node's side.
    let other = Authority::new("other CA").unwrap();
    let issued = other.issue("gw-1", Kind::Edge).unwrap();
    let odir = dir.path().join("other");
    std::fs::create_dir_all(odir.join("certs")).unwrap();
    std::fs::write(odir.join("certs/gw-1.pem"), &issued.cert_pem).unwrap();
    std::fs::write(odir.join("certs/gw-1.key"), &issued.key_pem).unwrap();
    let refused = match dial(&odir, "gw-1", &ca, &node).await {
        Err(e) => e,
        Ok(conn) => {
            // With TLS 1.3 the client may finish before the server rejects its certificate:
            // the first stream then fails.
            match conn.open_bi().await {
                Ok((mut s, r)) => {
                    let _ = write_frame(&mut s, &Frame::Credit { events: 1 }).await;
                    let mut reader = FrameReader::new(r, 1 << 20);
                    format!("{:?}", reader.next().await)
                }
                Err(e) => e.to_string(),
            }
        }
    };
    assert!(
        !refused.contains("Ok(Some"),
        "a foreign certificate was served: {refused}"
    );
    let m = node.metrics();
    assert!(m.refused.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_close_that_connection_and_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into(), "gw-2".into()],
        &[],
    )
    .unwrap();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let ca = dir.path().join("certs/ca.pem");
    let good = dial(dir.path(), "gw-2", &ca, &node).await.unwrap();
    let (mut good_send, mut good_reader, welcome) = hello(&good, "gw-2").await;
    assert!(matches!(welcome, Frame::Welcome { .. }));

    let bad = dial(dir.path(), "gw-1", &ca, &node).await.unwrap();
    let (mut send, _reader, welcome) = hello(&bad, "gw-1").await;
    assert!(matches!(welcome, Frame::Welcome { .. }));
    // A length prefix announcing a huge frame, then garbage.
    send.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .await
        .unwrap();
    let reason = bad.closed().await;
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            // Refused at its length prefix, with the code that says why.
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(u32::from(ErrorCode::FRAME_TOO_LARGE.0))
            )
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    // The other uplink is unaffected.
    write_frame(
        &mut good_send,
        &Frame::Batch {
            id: 1,
            origin: "gw-2".into(),
            epoch: 1,
            events: events(1..=10, "site-b/x"),
            gaps: vec![],
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        good_reader.next().await.unwrap().unwrap(),
        Frame::Ack { id: 1, .. }
    ));
    assert!(
        node.metrics()
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uplinks_and_consumers_each_see_everything_once_in_order() {
    use telemesh_client::{Client, Item, SubscribeOptions};
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into(), "gw-2".into()],
        &["analytics".into()],
    )
    .unwrap();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let ca = dir.path().join("certs/ca.pem");
    let c = dir.path().join("certs");
    let client_cfg =
        telemesh_testkit::client_config(&c, &node.local_addr().to_string(), "node-a", "analytics");
    // Two consumers from the start, reading while the uplinks write.
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let cfg = client_cfg.clone();
        consumers.push(tokio::spawn(async move {
            let client = Client::connect(&cfg).await.unwrap();
            let mut sub = client
                .subscribe(
                    SubscribeOptions::new(vec!["#".into()]).start(telemesh_proto::Start::Earliest),
                )
                .await
                .unwrap();
            let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
            let mut n = 0;
            while n < 2_000 {
                if let Some(Item::Event(e)) = sub.next().await.unwrap() {
                    seen.entry(e.origin).or_default().push(e.event.seq);
                    n += 1;
                }
            }
            client.close().await;
            seen
        }));
    }
    let mut uplinks = Vec::new();
    for (gw, topic) in [("gw-1", "site-a/x"), ("gw-2", "site-b/y")] {
        let conn = dial(dir.path(), gw, &ca, &node).await.unwrap();
        uplinks.push(tokio::spawn(async move {
            let (mut send, mut reader, _) = hello(&conn, gw).await;
            for b in 0..20u64 {
                let frame = Frame::Batch {
                    id: b + 1,
                    origin: gw.into(),
                    epoch: 5,
                    events: events(b * 50 + 1..=b * 50 + 50, topic),
                    gaps: vec![],
                };
                write_frame(&mut send, &frame).await.unwrap();
            }
            for want in 1..=20u64 {
                assert!(matches!(reader.next().await.unwrap().unwrap(), Frame::Ack { id, .. } if id == want));
            }
        }));
    }
    for u in uplinks {
        u.await.unwrap();
    }
    for c in consumers {
        let seen = c.await.unwrap();
        for gw in ["gw-1", "gw-2"] {
            assert_eq!(
                seen[gw],
                (1..=1_000).collect::<Vec<_>>(),
                "{gw}: once each, in order"
            );
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_only_where_agreed_and_never_beyond_the_frame_limit() {
    use telemesh_proto::frame::Compression;
    use telemesh_quic::wire::deflate;
    let dir = tempfile::tempdir().unwrap();
    write_mesh(
        &dir.path().join("certs"),
        &["node-a".into()],
        &["gw-1".into()],
        &[],
    )
    .unwrap();
    let node = Node::start(node_config(dir.path())).await.unwrap();
    let ca = dir.path().join("certs/ca.pem");
    let batch = |id| Frame::Batch {
        id,
        origin: "gw-1".into(),
        epoch: 1,
        events: events(1..=50, "site-a/x"),
        gaps: vec![],
    };
    let closed_with = |reason: quinn::ConnectionError| match reason {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code,
        other => panic!("expected an application close, got {other:?}"),
    };
    let malformed = quinn::VarInt::from_u32(u32::from(ErrorCode::MALFORMED_FRAME.0));

    // Without offering zstd, a compressed frame is a protocol error.
    let conn = dial(dir.path(), "gw-1", &ca, &node).await.unwrap();
    let (mut send, _reader, welcome) = hello(&conn, "gw-1").await;
    assert!(matches!(
        welcome,
        Frame::Welcome {
            compression: Compression::None,
            ..
        }
    ));
    write_frame(&mut send, &deflate(&batch(1)).unwrap())
        .await
        .unwrap();
    assert_eq!(closed_with(conn.closed().await), malformed);

    let offer = |conn: quinn::Connection| async move {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        write_frame(
            &mut send,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Uplink,
                id: "gw-1".into(),
                max_event_bytes: 65_536,
                compression: vec![Compression::Zstd, Compression::None],
            },
        )
        .await
        .unwrap();
        let mut reader = FrameReader::new(recv, 1 << 24);
        let welcome = reader.next().await.unwrap().unwrap();
        assert!(matches!(
            welcome,
            Frame::Welcome {
                compression: Compression::Zstd,
                ..
            }
        ));
        (send, reader)
    };
    // Offered and agreed: a compressed batch is stored and acknowledged.
    let conn = dial(dir.path(), "gw-1", &ca, &node).await.unwrap();
    let (mut send, mut reader) = offer(conn.clone()).await;
    write_frame(&mut send, &deflate(&batch(1)).unwrap())
        .await
        .unwrap();
    assert!(matches!(
        reader.next().await.unwrap().unwrap(),
        Frame::Ack { id: 1, .. }
    ));
    assert_eq!(node.log().held("gw-1", 1).unwrap().len(), 50);
    // A bomb: more than the node's frame limit once decompressed.
    let bomb = Frame::Compressed {
        codec: Compression::Zstd,
        raw_len: 64 << 20,
        data: zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap(),
    };
    write_frame(&mut send, &bomb).await.unwrap();
    assert_eq!(closed_with(conn.closed().await), malformed);
    node.shutdown().await;
}
