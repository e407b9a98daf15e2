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
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            batch_max_events: 1_000,
            batch_max_bytes: 1 << 20,
            window: 8,
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
}

impl Forwarder {
    /// A forwarder for `origin`, resuming after `acked` (the buffer's acked-through).
    pub fn new(origin: impl Into<String>, cfg: ForwarderConfig, acked: Option<(u64, u64)>) -> Self {
        Forwarder {
            cfg,
            origin: origin.into(),
            connected: false,
            next_id: 1,
            inflight: VecDeque::new(),
            read_pos: acked,
            acked,
            gaps_in_flight: BTreeSet::new(),
            trim: Trim::default(),
        }
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

    /// Events read after [`ReadRequest::after`] (in buffer order), and the buffer's gap
    /// records: returns the batches to send, in order.
    pub fn on_read(&mut self, events: Vec<(u64, Event)>, gaps: &[BufferedGap]) -> Vec<Frame> {
        let mut frames = Vec::new();
        if !self.connected {
            return frames;
        }
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
                    || (!batch.is_empty() && bytes + ev.size() > self.cfg.batch_max_bytes)
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
