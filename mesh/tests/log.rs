//! The node log: exact dedupe across batches and restarts, gap records stored once, node seq
//! order, and the committed mark.

use telemesh_mesh::log::{NodeLog, Record, Sync};
use telemesh_proto::{Event, Gap, GapKind, GapReason};

fn ev(seq: u64) -> Event {
    Event {
        seq,
        topic: "site-a/t".into(),
        payload: seq.to_string().into_bytes(),
        ts_us: seq,
        qos: 1,
        headers: None,
    }
}

#[tokio::test]
async fn dedupe_is_exact_across_batches_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let inc = {
        let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::Always).unwrap();
        let o = log
            .ingest("gw".into(), 7, (1..=100).map(ev).collect(), vec![])
            .await
            .unwrap();
        assert_eq!((o.stored, o.duplicates), (100, 0));
        // A resend overlapping the first batch, out of order.
        let mut again: Vec<Event> = (50..=150).map(ev).collect();
        again.reverse();
        let o = log.ingest("gw".into(), 7, again, vec![]).await.unwrap();
        assert_eq!((o.stored, o.duplicates), (50, 51));
        // The same seqs in another epoch are other events.
        let o = log
            .ingest("gw".into(), 8, (1..=10).map(ev).collect(), vec![])
            .await
            .unwrap();
        assert_eq!(o.stored, 10);
        assert_eq!(*log.committed().borrow(), 160);
        log.incarnation()
    };
    let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::Always).unwrap();
    assert_eq!(log.incarnation(), inc, "the incarnation survives restarts");
    let o = log
        .ingest("gw".into(), 7, (1..=151).map(ev).collect(), vec![])
        .await
        .unwrap();
    assert_eq!(
        (o.stored, o.duplicates),
        (1, 150),
        "dedupe state survives restarts"
    );
    assert_eq!(
        log.held("gw", 7).unwrap().ranges().collect::<Vec<_>>(),
        vec![1..=151]
    );
    let all = log.read(1, usize::MAX).unwrap();
    assert_eq!(all.len(), 161);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=161).collect::<Vec<_>>(),
        "node seqs are gapless ingest order"
    );
    let mut last = 0;
    for (_, r) in &all {
        assert!(r.ingest_us() >= last, "ingest time never goes backwards");
        last = r.ingest_us();
    }
    // Reading from the middle.
    let tail = log.read(160, 10).unwrap();
    assert_eq!(tail.len(), 2);
    assert!(matches!(&tail[1].1, Record::Event { epoch: 7, event, .. } if event.seq == 151));
    drop(log);
    let err = NodeLog::open(dir.path(), "node-b", 64 << 20, Sync::Always).unwrap_err();
    assert!(err.to_string().contains("belongs to node"), "{err}");
}

#[tokio::test]
async fn gap_records_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::None).unwrap();
    let gaps = vec![
        Gap {
            kind: GapKind::Range { first: 3, last: 5 },
            reason: GapReason::Evicted,
            ts_us: 10,
        },
        Gap {
            kind: GapKind::Unsequenced { after: 9, count: 4 },
            reason: GapReason::Overrun,
            ts_us: 11,
        },
    ];
    let o = log
        .ingest("gw".into(), 1, vec![ev(1), ev(2)], gaps.clone())
        .await
        .unwrap();
    assert_eq!((o.stored, o.gaps), (2, 2));
    let o = log
        .ingest("gw".into(), 1, vec![ev(1), ev(2)], gaps)
        .await
        .unwrap();
    assert_eq!(
        (o.stored, o.duplicates, o.gaps),
        (0, 2, 0),
        "a resent batch adds nothing"
    );
    assert_eq!(log.read(1, usize::MAX).unwrap().len(), 4);
}

#[tokio::test]
async fn retention_deletes_the_oldest_in_chunks_and_dedupe_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::None).unwrap();
    log.ingest("gw".into(), 1, (1..=1_000).map(ev).collect(), vec![])
        .await
        .unwrap();
    // Within both limits nothing goes.
    assert_eq!(log.retain(0, u64::MAX, 64).await.unwrap(), 0);
    // By size: with a budget of about half the log, the oldest go first, in chunks of 64.
    let deleted = log.retain(0, 15_000, 64).await.unwrap();
    assert!(
        deleted > 400 && deleted < 600,
        "about half deleted: {deleted}"
    );
    assert_eq!(
        log.first_seq().unwrap(),
        deleted + 1,
        "the oldest went first"
    );
    // By age: everything ingested before now.
    let rest = log.retain(u64::MAX, u64::MAX, 1_000).await.unwrap();
    assert_eq!(deleted + rest, 1_000);
    assert!(log.read(1, usize::MAX).unwrap().is_empty());
    // The held set survives retention: a resend of deleted events is still a duplicate.
    let o = log
        .ingest("gw".into(), 1, (1..=1_000).map(ev).collect(), vec![])
        .await
        .unwrap();
    assert_eq!((o.stored, o.duplicates), (0, 1_000));
    assert_eq!(
        log.first_seq().unwrap(),
        1_001,
        "nothing left: the next seq"
    );
}

#[tokio::test]
async fn a_full_map_refuses_batches_cleanly_and_retention_makes_room_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = NodeLog::open(dir.path(), "node-a", 1 << 20, Sync::None).unwrap();
    let mut seq = 1u64;
    let err = loop {
        let batch: Vec<Event> = (seq..seq + 100)
            .map(|s| Event {
                payload: vec![b'x'; 200],
                ..ev(s)
            })
            .collect();
        match log.ingest("gw".into(), 1, batch, vec![]).await {
            Ok(_) => seq += 100,
            Err(e) => break e,
        }
        assert!(seq < 1_000_000, "the map never filled");
    };
    assert!(
        err.to_string().contains(telemesh_mesh::log::STORAGE_FULL),
        "{err}"
    );
    let stored = log.read(1, usize::MAX).unwrap().len() as u64;
    assert_eq!(stored, seq - 1, "the refused batch left nothing behind");
    // Reads keep working, retention frees room, and ingest works again.
    assert!(log.retain(u64::MAX, u64::MAX, 1_000).await.unwrap() > 0);
    let o = log
        .ingest("gw".into(), 1, (seq..seq + 10).map(ev).collect(), vec![])
        .await
        .unwrap();
    assert_eq!(o.stored, 10);
}
