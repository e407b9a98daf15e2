//! A buffer of a few MiB filled well past `max_bytes`: it drops by policy, records the lost
//! seqs exactly as gap ranges, stays within its budget, and keeps serving.

use std::sync::Arc;

use telemesh_edge::buffer::{Buffer, BufferOptions, Incoming, Overflow, SyncMode};
use telemesh_edge::EdgeMetrics;
use telemesh_proto::{GapKind, GapReason};

const MAX_BYTES: u64 = 2 << 20;
const EVENTS: u64 = 60_000; // about 9 MiB of 100-byte events: 4.5 times the budget

fn fill(policy: Overflow) -> (tempfile::TempDir, Buffer) {
    let dir = tempfile::tempdir().unwrap();
    let opts = BufferOptions {
        max_bytes: MAX_BYTES,
        map_size: 4 << 20,
        overflow: policy,
        sync: SyncMode::Always,
        ..BufferOptions::default()
    };
    let buffer = Buffer::open(dir.path(), "gw", opts, Arc::new(EdgeMetrics::default())).unwrap();
    let h = buffer.handle();
    for n in 0..EVENTS {
        h.append(Incoming {
            topic: "site/line/temp".into(),
            payload: vec![b'x'; 100],
            ts_us: n + 1,
            qos: 1,
            headers: None,
        })
        .unwrap();
    }
    h.flush().unwrap();
    (dir, buffer)
}

fn ranges(buffer: &Buffer) -> Vec<(u64, u64, GapReason)> {
    buffer
        .reader()
        .gaps()
        .unwrap()
        .into_iter()
        .map(|g| match g.gap.kind {
            GapKind::Range { first, last } => (first, last, g.gap.reason),
            other => panic!("unexpected gap {other:?}"),
        })
        .collect()
}

#[test]
fn drop_oldest_evicts_the_oldest_and_records_one_range() {
    let (_dir, buffer) = fill(Overflow::DropOldest);
    let reader = buffer.reader();
    let state = reader.state().unwrap();
    assert!(state.bytes <= MAX_BYTES);
    let events = reader.read(None, usize::MAX).unwrap();
    let kept_from = events[0].event.seq;
    assert!(kept_from > 1);
    let seqs: Vec<u64> = events.iter().map(|s| s.event.seq).collect();
    assert_eq!(
        seqs,
        (kept_from..=EVENTS).collect::<Vec<_>>(),
        "the newest are kept"
    );
    assert_eq!(
        ranges(&buffer),
        vec![(1, kept_from - 1, GapReason::Evicted)]
    );
    let m = buffer.metrics().snapshot();
    assert_eq!(m.drops_evicted, kept_from - 1);
    assert_eq!(m.buffer_events, EVENTS - (kept_from - 1));
    assert!(m.utilization() > 0.9 && m.utilization() <= 1.0);

    // It keeps serving: a trim frees room, and new events are stored without more loss.
    let h = buffer.handle();
    let epoch = buffer.epoch();
    h.trim(Some((epoch, EVENTS - 100)), vec![]).unwrap();
    for n in 0..1_000 {
        h.append(Incoming {
            topic: "site/line/temp".into(),
            payload: n.to_string().into_bytes(),
            ts_us: 1,
            qos: 0,
            headers: None,
        })
        .unwrap();
    }
    h.flush().unwrap();
    let after = reader.read(None, usize::MAX).unwrap();
    assert_eq!(after.len(), 1_100);
    assert_eq!(after.last().unwrap().event.seq, EVENTS + 1_000);
    assert_eq!(buffer.metrics().snapshot().drops_evicted, kept_from - 1);
}

#[test]
fn drop_newest_refuses_the_newest_and_records_one_range() {
    let (_dir, buffer) = fill(Overflow::DropNewest);
    let reader = buffer.reader();
    let events = reader.read(None, usize::MAX).unwrap();
    let kept = events.len() as u64;
    let seqs: Vec<u64> = events.iter().map(|s| s.event.seq).collect();
    assert_eq!(seqs, (1..=kept).collect::<Vec<_>>(), "the oldest are kept");
    assert_eq!(
        ranges(&buffer),
        vec![(kept + 1, EVENTS, GapReason::Refused)]
    );
    assert!(reader.state().unwrap().bytes <= MAX_BYTES);
    assert_eq!(buffer.metrics().snapshot().drops_refused, EVENTS - kept);

    // Trimmed room is used again.
    buffer
        .handle()
        .trim(Some((buffer.epoch(), kept)), vec![])
        .unwrap();
    buffer
        .handle()
        .append(Incoming {
            topic: "t".into(),
            payload: vec![1],
            ts_us: 1,
            qos: 0,
            headers: None,
        })
        .unwrap();
    buffer.handle().flush().unwrap();
    let after = reader.read(None, usize::MAX).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].event.seq, EVENTS + 1);
}

/// `max_bytes` at the 80% limit of the map. Should LMDB's own overhead fill the map before
/// the budget does, the buffer splits its transactions and lowers its budget instead of
/// failing; either way the writer keeps working and every event is accounted for.
#[test]
fn max_bytes_at_the_map_limit_keeps_writing_and_loses_nothing_silently() {
    let dir = tempfile::tempdir().unwrap();
    let opts = BufferOptions {
        max_bytes: (4 << 20) / 10 * 8,
        map_size: 4 << 20,
        overflow: Overflow::DropOldest,
        sync: SyncMode::None,
        ..BufferOptions::default()
    };
    let buffer = Buffer::open(dir.path(), "gw", opts, Arc::new(EdgeMetrics::default())).unwrap();
    let h = buffer.handle();
    for n in 0..EVENTS {
        h.append(Incoming {
            topic: "site/line/temp".into(),
            payload: vec![b'y'; 100],
            ts_us: n + 1,
            qos: 1,
            headers: None,
        })
        .unwrap();
    }
    h.flush().expect("the writer keeps working");
    let reader = buffer.reader();
    let events = reader.read(None, usize::MAX).unwrap();
    let kept_from = events[0].event.seq;
    let seqs: Vec<u64> = events.iter().map(|s| s.event.seq).collect();
    assert_eq!(seqs, (kept_from..=EVENTS).collect::<Vec<_>>());
    assert_eq!(
        ranges(&buffer),
        vec![(1, kept_from - 1, GapReason::Evicted)]
    );
    let m = buffer.metrics().snapshot();
    assert_eq!(m.write_errors, 0);
    assert_eq!(m.drops_evicted + m.buffer_events, EVENTS);
}
