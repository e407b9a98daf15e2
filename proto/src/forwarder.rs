//! The forwarder: the edge side of the uplink protocol as a sans-IO state machine.
//!
//! The driver (the `gateway` crate) owns the connection and the buffer; the forwarder decides
//! what to send and what may be trimmed:
//!
//! ```text
//! on_connected() ─► wants_read() ─► driver reads the buffer ─► on_read(events, gaps) ─► batches to send
//! ack frame ─► on_ack(id) ─► poll_trim() ─► driver trims the buffer
//! connection lost ─► on_disconnected()          (in-flight batches are sent again later)
//! ```
//!
//! Invariants:
//! - Batches are numbered 1, 2, 3 … per connection and acknowledged in that order; an ack
//!   for anything but the oldest batch in flight is a protocol error.
//! - Trim points only ever cover acknowledged batches: the buffer is never trimmed beyond
//!   what the node has made durable.
//! - After a reconnect, sending resumes right after the last acknowledged event, so every
//!   unacknowledged event is sent again (the node's dedupe absorbs repeats).
//! - Gap records travel in the batch of their epoch whose last seq reaches their position
//!   (or a batch of their own), each until a batch holding it is acknowledged.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{Event, Gap};
use crate::frame::Frame;

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub struct ForwarderConfig {
    /// Most events in one batch.
    pub batch_max_events: usize,
    /// Most event bytes (topic + payload) in one batch.
    pub batch_max_bytes: usize,
    /// Most batches in flight.
    pub window: usize,
    /// How long a batch that is not full may wait for more events before it is sent (zero:
    /// send as soon as the window has room).
    pub linger: Duration,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            batch_max_events: 1_000,
            batch_max_bytes: 1 << 20,
            window: 8,
            linger: Duration::ZERO,
        }
    }
}

/// What the driver should read from the buffer next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Read events after this (epoch, seq); `None` from the oldest.
    pub after: Option<(u64, u64)>,
    /// At most this many events.
    pub max_events: usize,
}

/// What the buffer may now delete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trim {
    /// Events through this (epoch, seq), and every earlier epoch.
    pub through: Option<(u64, u64)>,
    /// Gap records by id.
    pub gap_ids: Vec<u64>,
}

/// A gap record as the buffer holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferedGap {
    /// The buffer's id of the record.
    pub id: u64,
    /// Its epoch.
    pub epoch: u64,
    /// The record.
    pub gap: Gap,
}

/// Protocol errors of the node's answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// An ack for a batch that is not the oldest in flight.
    #[error("ack for batch {got}, expected {expected:?}")]
    AckOutOfOrder {
        /// The batch acknowledged.
        got: u64,
        /// The oldest batch in flight.
        expected: Option<u64>,
    },
}

#[derive(Debug, Clone)]
struct InFlight {
    id: u64,
    last: Option<(u64, u64)>,
    gap_ids: Vec<u64>,
}

/// The forwarder's state.
#[derive(Debug)]
pub struct Forwarder {
    cfg: ForwarderConfig,
    origin: String,
    connected: bool,
    next_id: u64,
    inflight: VecDeque<InFlight>,
    /// The last (epoch, seq) put into a batch on this connection.
    read_pos: Option<(u64, u64)>,
    /// The last (epoch, seq) acknowledged.
    acked: Option<(u64, u64)>,
    /// Gap ids in batches in flight.
    gaps_in_flight: BTreeSet<u64>,
    trim: Trim,
    /// Since when a batch that is not full has been waiting (linger).
    partial_since: Option<Instant>,
    /// The bytes a batch holds at most on this connection ([`Forwarder::limit_frame`]).
    batch_bytes: usize,
}

impl Forwarder {
    /// A forwarder for `origin`, resuming after `acked` (the buffer's acked-through).
    pub fn new(origin: impl Into<String>, cfg: ForwarderConfig, acked: Option<(u64, u64)>) -> Self {
        Forwarder {
            origin: origin.into(),
            connected: false,
            next_id: 1,
            inflight: VecDeque::new(),
            read_pos: acked,
            acked,
            gaps_in_flight: BTreeSet::new(),
            trim: Trim::default(),
            partial_since: None,
            batch_bytes: cfg.batch_max_bytes,
            cfg,
        }
    }

    /// The node of this connection takes frames of at most `max_frame` bytes: batches stay
    /// within half of it (and within `batch_max_bytes`), leaving room for their framing.
    pub fn limit_frame(&mut self, max_frame: usize) {
        self.batch_bytes = self.cfg.batch_max_bytes.min(max_frame / 2).max(1);
    }

    /// A connection is up (after the handshake).
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.next_id = 1;
        self.inflight.clear();
        self.gaps_in_flight.clear();
        self.read_pos = self.acked;
    }

    /// The connection is gone: everything in flight will be sent again.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.inflight.clear();
        self.gaps_in_flight.clear();
        self.read_pos = self.acked;
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The last acknowledged (epoch, seq).
    pub fn acked(&self) -> Option<(u64, u64)> {
        self.acked
    }

    /// What to read next, when the window has room.
    pub fn wants_read(&self) -> Option<ReadRequest> {
        (self.connected && self.inflight.len() < self.cfg.window).then_some(ReadRequest {
            after: self.read_pos,
            max_events: self.cfg.batch_max_events * (self.cfg.window - self.inflight.len()),
        })
    }

    /// When the driver must call [`Forwarder::on_read`] again although nothing new arrived:
    /// the moment a lingering batch is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.partial_since.map(|t| t + self.cfg.linger)
    }

    /// Events read after [`ReadRequest::after`] (in buffer order), and the buffer's gap
    /// records, at `now`: returns the batches to send, in order. A batch that is not full
    /// waits up to `linger` for more events (see [`Forwarder::poll_timeout`]).
    pub fn on_read(
        &mut self,
        now: Instant,
        events: Vec<(u64, Event)>,
        gaps: &[BufferedGap],
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        if !self.connected {
            return frames;
        }
        if !self.cfg.linger.is_zero() && !events.is_empty() {
            let same_epoch = events.iter().all(|(e, _)| *e == events[0].0);
            let bytes: usize = events.iter().map(|(_, ev)| ev.size()).sum();
            let fills = events.len() >= self.cfg.batch_max_events
                || bytes >= self.batch_bytes
                || !same_epoch;
            if !fills {
                let since = *self.partial_since.get_or_insert(now);
                if now < since + self.cfg.linger {
                    return frames;
                }
            }
        }
        self.partial_since = None;
        let mut pending_gaps: Vec<&BufferedGap> = gaps
            .iter()
            .filter(|g| !self.gaps_in_flight.contains(&g.id) && !self.trim.gap_ids.contains(&g.id))
            .collect();
        let mut iter = events.into_iter().peekable();
        while self.inflight.len() < self.cfg.window {
            let next_epoch = iter.peek().map(|(e, _)| *e);
            // Gaps of earlier epochs go before the events of later ones; once no event is
            // left to send, every remaining gap goes.
            let older = pending_gaps
                .iter()
                .filter(|g| next_epoch.is_none_or(|ne| g.epoch < ne))
                .map(|g| g.epoch)
                .min();
            if let Some(epoch) = older {
                let (mine, rest): (Vec<&BufferedGap>, Vec<&BufferedGap>) =
                    pending_gaps.into_iter().partition(|g| g.epoch == epoch);
                pending_gaps = rest;
                frames.push(self.batch(epoch, Vec::new(), mine, None));
                continue;
            }
            let Some(epoch) = next_epoch else {
                break;
            };
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some((e, ev)) = iter.peek() {
                if *e != epoch
                    || batch.len() >= self.cfg.batch_max_events
                    || (!batch.is_empty() && bytes + ev.size() > self.batch_bytes)
                {
                    break;
                }
                bytes += ev.size();
                batch.push(iter.next().expect("peeked").1);
            }
            let last_seq = batch.last().expect("at least one event").seq;
            let (mine, rest): (Vec<&BufferedGap>, Vec<&BufferedGap>) = pending_gaps
                .into_iter()
                .partition(|g| g.epoch == epoch && g.gap.position() <= last_seq);
            pending_gaps = rest;
            frames.push(self.batch(epoch, batch, mine, Some((epoch, last_seq))));
        }
        frames
    }

    fn batch(
        &mut self,
        epoch: u64,
        events: Vec<Event>,
        gaps: Vec<&BufferedGap>,
        last: Option<(u64, u64)>,
    ) -> Frame {
        let id = self.next_id;
        self.next_id += 1;
        let gap_ids: Vec<u64> = gaps.iter().map(|g| g.id).collect();
        self.gaps_in_flight.extend(&gap_ids);
        if let Some(l) = last {
            self.read_pos = Some(l);
        }
        self.inflight.push_back(InFlight { id, last, gap_ids });
        Frame::Batch {
            id,
            origin: self.origin.clone(),
            epoch,
            events,
            gaps: gaps.into_iter().map(|g| g.gap.clone()).collect(),
        }
    }

    /// The node acknowledged batch `id` (it is durable there).
    pub fn on_ack(&mut self, id: u64) -> Result<(), ForwardError> {
        match self.inflight.front() {
            Some(f) if f.id == id => {}
            other => {
                return Err(ForwardError::AckOutOfOrder {
                    got: id,
                    expected: other.map(|f| f.id),
                })
            }
        }
        let done = self.inflight.pop_front().expect("checked above");
        if let Some(last) = done.last {
            self.acked = Some(last);
            self.trim.through = Some(last);
        }
        for g in &done.gap_ids {
            self.gaps_in_flight.remove(g);
        }
        self.trim.gap_ids.extend(done.gap_ids);
        Ok(())
    }

    /// What the buffer may delete now, if anything.
    pub fn poll_trim(&mut self) -> Option<Trim> {
        if self.trim.through.is_none() && self.trim.gap_ids.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.trim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> (u64, Event) {
        (
            1,
            Event {
                seq,
                topic: "t".into(),
                payload: vec![0; 10],
                ts_us: seq,
                qos: 1,
                headers: None,
            },
        )
    }

    #[test]
    fn linger_holds_a_partial_batch_until_due_and_sends_a_full_one_at_once() {
        let cfg = ForwarderConfig {
            batch_max_events: 10,
            batch_max_bytes: 1 << 20,
            window: 4,
            linger: Duration::from_millis(5),
        };
        let mut f = Forwarder::new("gw", cfg, None);
        f.on_connected();
        let t0 = Instant::now();
        assert!(
            f.on_read(t0, vec![ev(1), ev(2)], &[]).is_empty(),
            "partial: wait"
        );
        assert_eq!(f.poll_timeout(), Some(t0 + Duration::from_millis(5)));
        assert!(f
            .on_read(
                t0 + Duration::from_millis(4),
                vec![ev(1), ev(2), ev(3)],
                &[]
            )
            .is_empty());
        let due = f.on_read(
            t0 + Duration::from_millis(5),
            vec![ev(1), ev(2), ev(3)],
            &[],
        );
        assert_eq!(due.len(), 1, "due: sent");
        assert_eq!(f.poll_timeout(), None);
        // A full batch goes at once.
        let full: Vec<_> = (4..=13).map(ev).collect();
        assert_eq!(f.on_read(t0 + Duration::from_millis(5), full, &[]).len(), 1);
    }

    #[test]
    fn acks_must_come_in_order_and_trim_follows_them() {
        let mut f = Forwarder::new(
            "gw",
            ForwarderConfig {
                batch_max_events: 2,
                ..ForwarderConfig::default()
            },
            None,
        );
        f.on_connected();
        let frames = f.on_read(Instant::now(), (1..=4).map(ev).collect(), &[]);
        assert_eq!(frames.len(), 2);
        assert_eq!(f.poll_trim(), None);
        assert!(matches!(
            f.on_ack(2),
            Err(ForwardError::AckOutOfOrder {
                got: 2,
                expected: Some(1)
            })
        ));
        f.on_ack(1).unwrap();
        assert_eq!(f.poll_trim().unwrap().through, Some((1, 2)));
        f.on_disconnected();
        f.on_connected();
        assert_eq!(
            f.wants_read().unwrap().after,
            Some((1, 2)),
            "resend from the acked point"
        );
    }
}
