//! Deterministic simulation of the forwarder against a model node over a link that is cut,
//! with the node and the edge crashing and restarting (durable state kept), and the edge
//! evicting events (gap records). Invariants are checked after every step:
//! - the buffer is never trimmed beyond what the node made durable;
//! - the node's log holds every event at most once, each epoch's seqs in increasing order.
//!
//! At the end every event not evicted is in the node's log exactly once, and every gap
//! record arrived. `SIM_SEED=n cargo test --test forwarder_sim` replays one seed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use telemesh_testkit::Rng;

use telemesh_proto::forwarder::{BufferedGap, Forwarder, ForwarderConfig};
use telemesh_proto::{Event, Frame, Gap, GapKind, GapReason};

/// The edge's durable buffer.
#[derive(Default)]
struct Buffer {
    epoch: u64,
    next_seq: u64,
    events: VecDeque<(u64, Event)>,
    gaps: Vec<BufferedGap>,
    next_gap_id: u64,
    acked: Option<(u64, u64)>,
    appended: Vec<(u64, u64)>,
    evicted: BTreeSet<(u64, u64)>,
    all_gaps: Vec<(u64, Gap)>,
}

impl Buffer {
    fn append(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ev = Event {
            seq,
            topic: "t".into(),
            payload: vec![1],
            ts_us: seq,
            qos: 1,
            headers: None,
        };
        self.events.push_back((self.epoch, ev));
        self.appended.push((self.epoch, seq));
    }
    fn gap(&mut self, epoch: u64, gap: Gap) {
        self.gaps.push(BufferedGap {
            id: self.next_gap_id,
            epoch,
            gap: gap.clone(),
        });
        self.next_gap_id += 1;
        self.all_gaps.push((epoch, gap));
    }
    fn evict_oldest(&mut self) {
        if let Some((e, ev)) = self.events.pop_front() {
            self.evicted.insert((e, ev.seq));
            self.gap(
                e,
                Gap {
                    kind: GapKind::Range {
                        first: ev.seq,
                        last: ev.seq,
                    },
                    reason: GapReason::Evicted,
                    ts_us: self.next_gap_id,
                },
            );
        }
    }
    fn read(&self, after: Option<(u64, u64)>, max: usize) -> Vec<(u64, Event)> {
        self.events
            .iter()
            .filter(|(e, ev)| after.is_none_or(|a| (*e, ev.seq) > a))
            .take(max)
            .cloned()
            .collect()
    }
}

/// The node: durable log and dedupe state, and batches received but not yet committed.
#[derive(Default)]
struct Node {
    held: HashMap<u64, BTreeSet<u64>>,
    log: Vec<(u64, u64)>,
    gaps: BTreeSet<(u64, u64)>,
    /// Batches taken but not committed, with the connection they came on.
    uncommitted: VecDeque<(u64, Frame)>,
}

impl Node {
    /// Commits the oldest batch taken; returns its connection and id (for the ack).
    fn commit_one(&mut self) -> Option<(u64, u64)> {
        let (conn, frame) = self.uncommitted.pop_front()?;
        let Frame::Batch {
            id,
            epoch,
            events,
            gaps,
            ..
        } = frame
        else {
            unreachable!("only batches are queued")
        };
        for ev in events {
            let held = self.held.entry(epoch).or_default();
            if held.insert(ev.seq) {
                // Invariant: along the path, each epoch's seqs arrive in increasing order.
                assert_eq!(
                    held.last(),
                    Some(&ev.seq),
                    "epoch {epoch}: seq {} after a later one",
                    ev.seq
                );
                self.log.push((epoch, ev.seq));
            }
        }
        for g in gaps {
            self.gaps.insert((epoch, g.ts_us));
        }
        Some((conn, id))
    }
}

fn run(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let cfg = ForwarderConfig {
        batch_max_events: 1 + rng.below(7) as usize,
        batch_max_bytes: 64,
        window: 1 + rng.below(4) as usize,
        linger: std::time::Duration::ZERO,
    };
    let mut buf = Buffer {
        epoch: 1,
        next_seq: 1,
        next_gap_id: 1,
        ..Buffer::default()
    };
    let mut node = Node::default();
    let mut fwd = Forwarder::new("gw", cfg, None);
    let mut to_node: VecDeque<Frame> = VecDeque::new();
    let mut to_edge: VecDeque<u64> = VecDeque::new();
    let mut connected = false;
    let mut conn = 0u64;
    let steps = 2_000;
    for step in 0..steps + 3_000 {
        let faults = step < steps;
        match rng.below(100) {
            0..=19 if faults => buf.append(),
            20..=21 if faults => buf.evict_oldest(),
            22 if faults => {
                let after = buf.next_seq - 1;
                let ts = 1_000_000 + step;
                buf.gap(
                    buf.epoch,
                    Gap {
                        kind: GapKind::Unsequenced { after, count: 3 },
                        reason: GapReason::Overrun,
                        ts_us: ts,
                    },
                );
            }
            23..=24 if faults => {
                // Link cut: frames in flight are lost; batches the node already took commit.
                to_node.clear();
                to_edge.clear();
                connected = false;
                fwd.on_disconnected();
            }
            25 if faults => {
                // Node crash: uncommitted batches and the link are lost.
                node.uncommitted.clear();
                to_node.clear();
                to_edge.clear();
                connected = false;
                fwd.on_disconnected();
            }
            26 if faults => {
                // Edge crash: a new epoch; the forwarder restarts from the durable ack.
                buf.epoch += 1;
                buf.next_seq = 1;
                to_node.clear();
                to_edge.clear();
                connected = false;
                fwd = Forwarder::new("gw", cfg, buf.acked);
            }
            _ => {}
        }
        if !connected && rng.chance(30) {
            connected = true;
            conn += 1;
            fwd.on_connected();
        }
        if connected {
            if let Some(req) = fwd.wants_read() {
                let events = buf.read(req.after, req.max_events);
                to_node.extend(fwd.on_read(std::time::Instant::now(), events, &buf.gaps));
            }
            if rng.chance(60) {
                if let Some(f) = to_node.pop_front() {
                    node.uncommitted.push_back((conn, f));
                }
            }
            if rng.chance(50) {
                // Batches commit even after their connection is gone; their acks are lost.
                if let Some((c, id)) = node.commit_one() {
                    if c == conn {
                        to_edge.push_back(id);
                    }
                }
            }
            if rng.chance(60) {
                if let Some(id) = to_edge.pop_front() {
                    fwd.on_ack(id)
                        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                    if let Some(t) = fwd.poll_trim() {
                        if let Some(through) = t.through {
                            // Invariant: never trim beyond what the node made durable.
                            for (e, ev) in
                                buf.events.iter().filter(|(e, ev)| (*e, ev.seq) <= through)
                            {
                                assert!(
                                    node.held.get(e).is_some_and(|h| h.contains(&ev.seq)),
                                    "seed {seed}: trimming ({e}, {}) that the node does not hold",
                                    ev.seq
                                );
                            }
                            buf.events.retain(|(e, ev)| (*e, ev.seq) > through);
                            buf.acked = Some(through);
                        }
                        buf.gaps.retain(|g| !t.gap_ids.contains(&g.id));
                    }
                }
            }
        }
        if !faults
            && buf.events.is_empty()
            && buf.gaps.is_empty()
            && to_node.is_empty()
            && node.uncommitted.is_empty()
        {
            break;
        }
    }
    assert!(
        buf.events.is_empty(),
        "seed {seed}: {} events never acknowledged",
        buf.events.len()
    );
    // Every event not evicted arrived; an evicted one may have arrived too if it was already
    // on its way when evicted (its gap record then says "lost" for an event the node holds).
    let got: BTreeSet<(u64, u64)> = node.log.iter().copied().collect();
    assert_eq!(
        got.len(),
        node.log.len(),
        "seed {seed}: no event stored twice"
    );
    for k in &buf.appended {
        if !buf.evicted.contains(k) {
            assert!(got.contains(k), "seed {seed}: event {k:?} never arrived");
        }
    }
    let appended: BTreeSet<(u64, u64)> = buf.appended.iter().copied().collect();
    assert!(
        got.is_subset(&appended),
        "seed {seed}: the node holds events never appended"
    );
    let want_gaps: BTreeSet<(u64, u64)> = buf.all_gaps.iter().map(|(e, g)| (*e, g.ts_us)).collect();
    assert_eq!(
        node.gaps, want_gaps,
        "seed {seed}: every gap record arrived"
    );
}

#[test]
fn forwarding_is_exact_under_cuts_crashes_and_evictions() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        run(seed.parse().expect("SIM_SEED is a number"));
        return;
    }
    for seed in 0..300 {
        let result = std::panic::catch_unwind(|| run(seed));
        if result.is_err() {
            panic!(
                "simulation failed: replay with SIM_SEED={seed} cargo test --test forwarder_sim"
            );
        }
    }
}
