//! Model-based test of the edge buffer: random appends, losses, trims, clean restarts and
//! crashes, checked after every step against a plain in-memory model of what the buffer
//! must hold (events, gap records, epochs, the byte budget).

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use telemesh_edge::buffer::{Buffer, BufferOptions, Incoming, Overflow, SyncMode};
use telemesh_edge::EdgeMetrics;
use telemesh_proto::{Event, GapKind, GapReason};

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Lost(u64),
    Trim(usize),
    TrimGaps,
    Restart { clean: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..400).prop_map(Op::Append),
        1 => (1u64..5).prop_map(Op::Lost),
        2 => any::<usize>().prop_map(Op::Trim),
        1 => Just(Op::TrimGaps),
        1 => any::<bool>().prop_map(|clean| Op::Restart { clean }),
    ]
}

const MAX_BYTES: u64 = 4_000;

#[derive(Debug, Default)]
struct Model {
    epoch: u64,
    next_seq: u64,
    events: VecDeque<(u64, Event, u64)>,
    bytes: u64,
    /// (epoch, position, id, kind, reason)
    gaps: Vec<(u64, u64, u64, GapKind, GapReason)>,
    next_gap_id: u64,
    /// The highest (epoch, seq) trimmed: what a node acknowledged.
    acked: Option<(u64, u64)>,
}

impl Model {
    fn ack(&mut self, through: (u64, u64)) {
        if self.acked.is_none_or(|a| a < through) {
            self.acked = Some(through);
        }
    }
}

impl Model {
    fn cost(ev: &Event) -> u64 {
        postcard::to_allocvec(ev).unwrap().len() as u64 + 16 + 32
    }

    fn record_range(&mut self, epoch: u64, seq: u64, reason: GapReason) {
        let prev = self
            .gaps
            .iter_mut()
            .filter(|g| g.0 == epoch && g.1 < seq)
            .max_by_key(|g| (g.1, g.2));
        if let Some(g) = prev {
            if let GapKind::Range { last, .. } = &mut g.3 {
                if g.4 == reason && *last + 1 == seq {
                    *last = seq;
                    return;
                }
            }
        }
        let id = self.next_gap_id;
        self.next_gap_id += 1;
        self.gaps.push((
            epoch,
            seq - 1,
            id,
            GapKind::Range {
                first: seq,
                last: seq,
            },
            reason,
        ));
    }

    fn append(&mut self, ev: Event, policy: Overflow) {
        let cost = Self::cost(&ev);
        let seq = ev.seq;
        self.next_seq += 1;
        if self.bytes + cost > MAX_BYTES {
            if policy != Overflow::DropOldest || cost > MAX_BYTES {
                self.record_range(self.epoch, seq, GapReason::Refused);
                return;
            }
            while self.bytes + cost > MAX_BYTES {
                let Some((e, old, c)) = self.events.pop_front() else {
                    break;
                };
                self.bytes -= c;
                self.record_range(e, old.seq, GapReason::Evicted);
            }
        }
        self.bytes += cost;
        self.events.push_back((self.epoch, ev, cost));
    }
}

fn opts(policy: Overflow) -> BufferOptions {
    BufferOptions {
        max_bytes: MAX_BYTES,
        map_size: 1 << 20,
        overflow: policy,
        sync: SyncMode::None,
        ..BufferOptions::default()
    }
}

fn check(buffer: &Buffer, model: &Model) {
    let reader = buffer.reader();
    let got = reader.read(None, usize::MAX).unwrap();
    let want: Vec<(u64, &Event)> = model.events.iter().map(|(e, ev, _)| (*e, ev)).collect();
    assert_eq!(got.len(), want.len(), "event count");
    for (g, (e, ev)) in got.iter().zip(want) {
        assert_eq!((g.epoch, &g.event), (e, ev));
    }
    let gaps = reader.gaps().unwrap();
    let mut want_gaps = model.gaps.clone();
    want_gaps.sort_by_key(|g| (g.0, g.1, g.2));
    let got_gaps: Vec<_> = gaps
        .iter()
        .map(|g| (g.epoch, g.gap.position(), g.id, g.gap.kind, g.gap.reason))
        .collect();
    assert_eq!(got_gaps, want_gaps);
    let state = reader.state().unwrap();
    assert_eq!(state.epoch, model.epoch);
    assert_eq!(state.next_seq, model.next_seq);
    assert_eq!(state.acked, model.acked, "acked-through survives restarts");
    assert_eq!(state.bytes, model.bytes);
    assert!(state.bytes <= MAX_BYTES);
    assert_eq!(state.events, model.events.len() as u64);
}

fn run(ops: Vec<Op>, policy: Overflow) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(EdgeMetrics::default());
    let mut buffer = Buffer::open(dir.path(), "gw-1", opts(policy), metrics.clone()).unwrap();
    let mut model = Model {
        epoch: buffer.epoch(),
        next_seq: 1,
        next_gap_id: 1,
        ..Model::default()
    };
    let mut ts = 1u64;
    for op in ops {
        let h = buffer.handle();
        match op {
            Op::Append(len) => {
                ts += 1;
                let inc = Incoming {
                    topic: format!("t/{}", len % 7),
                    payload: vec![(len % 251) as u8; len],
                    ts_us: ts,
                    qos: 1,
                    headers: None,
                };
                let ev = Event {
                    seq: model.next_seq,
                    topic: inc.topic.clone(),
                    payload: inc.payload.clone(),
                    ts_us: inc.ts_us,
                    qos: inc.qos,
                    headers: None,
                };
                h.append(inc).unwrap();
                model.append(ev, policy);
            }
            Op::Lost(count) => {
                h.lost(count, GapReason::Overrun).unwrap();
                let id = model.next_gap_id;
                model.next_gap_id += 1;
                let after = model.next_seq - 1;
                model.gaps.push((
                    model.epoch,
                    after,
                    id,
                    GapKind::Unsequenced { after, count },
                    GapReason::Overrun,
                ));
            }
            Op::Trim(i) => {
                if model.events.is_empty() {
                    continue;
                }
                let (e, ev, _) = &model.events[i % model.events.len()];
                let (e, s) = (*e, ev.seq);
                h.trim(Some((e, s)), vec![]).unwrap();
                model.ack((e, s));
                while model
                    .events
                    .front()
                    .is_some_and(|(fe, fev, _)| (*fe, fev.seq) <= (e, s))
                {
                    let (_, _, c) = model.events.pop_front().unwrap();
                    model.bytes -= c;
                }
            }
            Op::TrimGaps => {
                let through = model.next_gap_id - 1;
                let (e, s) = (model.epoch, 0);
                h.trim(Some((e, s)), (1..=through).collect()).unwrap();
                model.ack((e, s));
                model.gaps.clear();
                while model
                    .events
                    .front()
                    .is_some_and(|(fe, fev, _)| (*fe, fev.seq) <= (e, s))
                {
                    let (_, _, c) = model.events.pop_front().unwrap();
                    model.bytes -= c;
                }
            }
            Op::Restart { clean } => {
                h.flush().unwrap();
                drop(h);
                let old_epoch = buffer.epoch();
                if clean {
                    buffer.close().unwrap();
                } else {
                    drop(buffer);
                }
                buffer = Buffer::open(dir.path(), "gw-1", opts(policy), metrics.clone()).unwrap();
                if clean {
                    assert_eq!(buffer.epoch(), old_epoch, "a clean stop keeps the epoch");
                } else {
                    assert!(buffer.epoch() > old_epoch, "a crash starts a later epoch");
                    model.epoch = buffer.epoch();
                    model.next_seq = 1;
                }
                check(&buffer, &model);
                continue;
            }
        }
        buffer.handle().flush().unwrap();
        check(&buffer, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn drop_oldest_buffer_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, Overflow::DropOldest);
    }

    #[test]
    fn drop_newest_buffer_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, Overflow::DropNewest);
    }
}

#[test]
fn another_agents_buffer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(EdgeMetrics::default());
    Buffer::open(dir.path(), "gw-1", opts(Overflow::DropOldest), m.clone())
        .unwrap()
        .close()
        .unwrap();
    let err = Buffer::open(dir.path(), "gw-2", opts(Overflow::DropOldest), m).unwrap_err();
    assert!(
        err.to_string().contains("belongs to agent \"gw-1\""),
        "{err}"
    );
}

#[test]
fn max_bytes_above_80_percent_of_map_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = BufferOptions {
        max_bytes: 900_000,
        map_size: 1 << 20,
        ..BufferOptions::default()
    };
    let err = Buffer::open(dir.path(), "gw", o, Arc::new(EdgeMetrics::default())).unwrap_err();
    assert!(err.to_string().contains("80% of map_size"), "{err}");
}
