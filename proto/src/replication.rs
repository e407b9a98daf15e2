//! Replication between nodes: both ends as sans-IO pieces.
//!
//! A node pulls chosen filters from an upstream node over a `peer` connection:
//!
//! ```text
//! downstream (Replicator)                          upstream (PeerRound per frame)
//! hello(role peer) ───────────────────────────────► welcome { incarnation }
//! on_welcome() ─► subscribe { filters, start } ───► subscribed { from } / truncated
//!                                                    read the committed log from `from`:
//! on_frame(replicate) ◄─────────────────────────── replicate { through, head, records, not_selected }
//!   └► Apply { records, cursor } ─► stored with the cursor in one transaction
//! on_applied() ─► credit ─────────────────────────► more rounds
//! ```
//!
//! Invariants:
//! - The downstream stores the upstream cursor (incarnation, node seq scanned through,
//!   filters) in the same transaction as the records it got, and after any reconnect or
//!   restart asks for the records right after it. The upstream keeps no state for a peer.
//! - An upstream whose incarnation changed (its log was wiped or restored), or a replicate
//!   entry whose filters changed, is read again from its earliest record; dedupe on the
//!   downstream absorbs the repeats.
//! - Every record carries its **path**: the nodes that stored it before the node serving it,
//!   oldest first. An upstream never sends a record whose path names the downstream (the
//!   downstream stored it before), and a node stores an event only once (exact dedupe on its
//!   held set), so only stored records are forwarded again: in any cycle of replicate
//!   entries an event crosses each link at most once per incarnation, and forwarding ends.
//! - Events that do not match the filters are sent as compact **not-selected** ranges, and
//!   every frame says how far the upstream scanned, so cursors move through sparse logs and
//!   the downstream's range sets stay a few ranges long.
//! - Gap records are always carried (they are per origin, not per topic).
//! - Records arrive in the upstream's log order, so each origin's events keep their seq
//!   order along every path.
//! - An idle upstream sends an empty round (nothing new scanned) every
//!   [`HEARTBEAT`]: the downstream learns how far behind it is without storing anything, and
//!   a link that carries nothing for [`SILENCE`] is given up and made anew (a path that drops
//!   everything is noticed in seconds, not after QUIC's backed-off retransmissions).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Gap};
use crate::frame::{Compression, Frame, Role, Start, PROTOCOL_VERSION};
use crate::topic::matches;

/// How often an idle upstream sends an empty round.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a downstream waits for any frame before it gives the connection up.
pub const SILENCE: std::time::Duration = std::time::Duration::from_secs(6);

/// One record of an upstream's log, as it travels to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicated {
    /// Its seq in the upstream's log.
    pub node_seq: u64,
    /// When the upstream stored it (µs since the Unix epoch).
    pub ingest_us: u64,
    /// The origin.
    pub origin: String,
    /// The origin's epoch.
    pub epoch: u64,
    /// The nodes (id and log incarnation) that stored it before the upstream, oldest first
    /// (empty: it came from an uplink of the upstream).
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_PATH }>")]
    pub path: Vec<Hop>,
    /// The event or gap record.
    pub item: ReplicatedItem,
}

/// A node a record passed through: its id and its log's incarnation then.
pub type Hop = (String, u64);

/// What a replicated record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicatedItem {
    /// An event (its `seq` completes its identity).
    Event(Event),
    /// A gap record.
    Gap(Gap),
}

/// Seqs of one origin's epoch that the upstream holds and the filters did not select.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotSelected {
    /// The origin.
    pub origin: String,
    /// The epoch.
    pub epoch: u64,
    /// First seq.
    pub first: u64,
    /// Last seq (inclusive).
    pub last: u64,
}

/// Builds one `replicate` frame on the upstream: offer the committed log's records in order
/// until it says the round is full.
#[derive(Debug)]
pub struct PeerRound<'a> {
    filters: &'a [String],
    downstream: (&'a str, u64),
    max_events: usize,
    max_bytes: usize,
    bytes: usize,
    through: u64,
    records: Vec<Replicated>,
    events: usize,
    not_selected: Vec<NotSelected>,
    /// (origin, epoch) → index of its newest range in `not_selected`.
    open: HashMap<(String, u64), usize>,
}

impl<'a> PeerRound<'a> {
    /// A round for `downstream` (its id and log incarnation) reading from node seq `from`,
    /// holding at most `max_events` events (gap records and not-selected ranges do not
    /// count) and, past its first event, at most `max_bytes` of topics and payloads (so the
    /// frame stays within the peer's frame limit).
    pub fn new(
        filters: &'a [String],
        downstream: (&'a str, u64),
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Self {
        PeerRound {
            filters,
            downstream,
            max_events,
            max_bytes,
            bytes: 0,
            through: from.saturating_sub(1),
            records: Vec::new(),
            events: 0,
            not_selected: Vec::new(),
            open: HashMap::new(),
        }
    }

    /// Whether the round can take no more events.
    pub fn is_full(&self) -> bool {
        self.events >= self.max_events || (self.events > 0 && self.bytes >= self.max_bytes)
    }

    /// Offers the record at `node_seq` (called in log order); returns false, without taking
    /// it, when the round is full.
    pub fn offer(&mut self, node_seq: u64, record: Replicated) -> bool {
        let size = match &record.item {
            ReplicatedItem::Event(ev) => Some(ev.size()),
            ReplicatedItem::Gap(_) => None,
        };
        if let Some(size) = size {
            if self.is_full() || (self.events > 0 && self.bytes + size > self.max_bytes) {
                return false;
            }
        }
        self.through = node_seq;
        let (id, incarnation) = self.downstream;
        if record
            .path
            .iter()
            .any(|(n, i)| n == id && *i == incarnation)
        {
            return true;
        }
        match &record.item {
            ReplicatedItem::Event(ev) => {
                if self.filters.iter().any(|f| matches(f, &ev.topic)) {
                    self.events += 1;
                    self.bytes += ev.size();
                    self.records.push(record);
                } else {
                    self.not_selected(record.origin, record.epoch, ev.seq);
                }
            }
            ReplicatedItem::Gap(_) => self.records.push(record),
        }
        true
    }

    fn not_selected(&mut self, origin: String, epoch: u64, seq: u64) {
        let key = (origin, epoch);
        if let Some(&i) = self.open.get(&key) {
            let r = &mut self.not_selected[i];
            if r.last.checked_add(1) == Some(seq) {
                r.last = seq;
                return;
            }
        }
        self.open.insert(key.clone(), self.not_selected.len());
        self.not_selected.push(NotSelected {
            origin: key.0,
            epoch: key.1,
            first: seq,
            last: seq,
        });
    }

    /// The node seq the round scanned through.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// The events the round holds.
    pub fn events(&self) -> usize {
        self.events
    }

    /// The frame; `head` is the upstream's last committed node seq.
    pub fn into_frame(self, head: u64) -> Frame {
        Frame::Replicate {
            through: self.through,
            head,
            records: self.records,
            not_selected: self.not_selected,
        }
    }
}

/// What a replica stores about its upstream, in the transaction of the records it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamCursor {
    /// The upstream's node id.
    pub node_id: String,
    /// The upstream log's incarnation the cursor belongs to.
    pub incarnation: u64,
    /// The upstream node seq scanned through.
    pub through: u64,
    /// The filters replicated.
    pub filters: Vec<String>,
}

/// Records to store, with the cursor to store in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apply {
    /// The connection the records came on (see [`Replicator::on_applied`]).
    pub connection: u64,
    /// The cursor after these records.
    pub cursor: UpstreamCursor,
    /// Records in the upstream's log order.
    pub records: Vec<Replicated>,
    /// Seqs the filters did not select.
    pub not_selected: Vec<NotSelected>,
    /// Upstream node seqs that retention deleted before they were read (first, last): lost
    /// for this replica.
    pub truncated: Option<(u64, u64)>,
    /// Upstream records not yet scanned after this frame (upstream head − through).
    pub behind: u64,
}

impl Apply {
    /// Events among the records.
    pub fn events(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r.item, ReplicatedItem::Event(_)))
            .count()
    }

    /// What [`Replicator::on_applied`] needs once the apply is stored (the records may have
    /// moved into the store by then).
    pub fn receipt(&self) -> Receipt {
        Receipt {
            connection: self.connection,
            cursor: self.cursor.clone(),
            events: self.events() as u32,
        }
    }
}

/// A stored [`Apply`], reported back to its [`Replicator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The connection the records came on.
    pub connection: u64,
    /// The cursor stored.
    pub cursor: UpstreamCursor,
    /// The events among the records.
    pub events: u32,
}

/// A violation of the protocol by the upstream; the driver closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// A frame the protocol does not allow here.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// The upstream refused.
    #[error("upstream refused: {0}")]
    Refused(String),
    /// Records out of order or beyond the scanned mark.
    #[error("records out of order: {0}")]
    Order(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disconnected,
    AwaitWelcome,
    AwaitSubscribed,
    Streaming,
}

/// The downstream side of one `[[replicate]]` entry.
#[derive(Debug)]
pub struct Replicator {
    /// This node's log incarnation.
    incarnation: u64,
    filters: Vec<String>,
    start: Start,
    window: u32,
    stored: Option<UpstreamCursor>,
    state: State,
    connection: u64,
    upstream: Option<(String, u64)>,
    /// Node seq received through on this connection.
    received: u64,
}

impl Replicator {
    /// A replicator of `filters` for a node whose log has `incarnation`, starting at `start`
    /// when there is no usable stored cursor, with at most `window` events received and not
    /// yet stored.
    pub fn new(
        incarnation: u64,
        filters: Vec<String>,
        start: Start,
        window: u32,
        stored: Option<UpstreamCursor>,
    ) -> Self {
        Replicator {
            incarnation,
            filters,
            start,
            window: window.max(1),
            stored,
            state: State::Disconnected,
            connection: 0,
            upstream: None,
            received: 0,
        }
    }

    /// The cursor stored last (as reported through [`Replicator::on_applied`]).
    pub fn cursor(&self) -> Option<&UpstreamCursor> {
        self.stored.as_ref()
    }

    /// A connection is up: the hello to send, as node `id`.
    pub fn on_connected(&mut self, id: &str) -> Frame {
        self.connection += 1;
        self.state = State::AwaitWelcome;
        self.upstream = None;
        Frame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
            id: id.to_owned(),
            max_event_bytes: 0,
            compression: vec![Compression::None],
        }
    }

    /// The connection is gone; records received on it and not yet stored are asked for again.
    pub fn on_disconnected(&mut self) {
        self.state = State::Disconnected;
    }

    /// Where the next subscription starts, given the upstream's welcome.
    fn start_for(&self, node_id: &str, incarnation: u64) -> Start {
        match &self.stored {
            Some(c)
                if c.node_id == node_id
                    && c.incarnation == incarnation
                    && c.filters == self.filters =>
            {
                Start::Seq(c.through + 1)
            }
            // A wiped or restored upstream, another node at the address, or other filters.
            Some(_) => Start::Earliest,
            None => self.start,
        }
    }

    /// Handles a frame from the upstream: the subscribe to send after the welcome, records
    /// to store, or nothing.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Step, ReplicaError> {
        match (self.state, frame) {
            (
                State::AwaitWelcome,
                Frame::Welcome {
                    node_id,
                    incarnation,
                    ..
                },
            ) => {
                let start = self.start_for(&node_id, incarnation);
                self.upstream = Some((node_id, incarnation));
                self.state = State::AwaitSubscribed;
                // What this subscription asks for: `truncated` and `subscribed` must not
                // answer with anything before it.
                self.received = match start {
                    Start::Seq(n) => n.saturating_sub(1),
                    _ => 0,
                };
                Ok(Step::Send(Frame::Subscribe {
                    filters: self.filters.clone(),
                    start,
                    durable: None,
                    credit: self.window,
                    gaps: true,
                    incarnation: Some(self.incarnation),
                }))
            }
            (State::AwaitWelcome | State::AwaitSubscribed, Frame::Reject { code, reason })
            | (_, Frame::Error { code, reason }) => {
                Err(ReplicaError::Refused(format!("{code}: {reason}")))
            }
            (
                State::AwaitSubscribed,
                Frame::Truncated {
                    requested,
                    earliest,
                },
            ) => {
                // Retention only deletes: what is truncated lies ahead of what this replica
                // has, never behind it (a cursor never moves back).
                if earliest <= requested || earliest - 1 <= self.received {
                    return Err(ReplicaError::Order(format!(
                        "truncated at {earliest}, not after {requested} and {}",
                        self.received
                    )));
                }
                self.received = earliest - 1;
                Ok(Step::Apply(self.apply(
                    Vec::new(),
                    Vec::new(),
                    Some((requested, earliest - 1)),
                    0,
                )))
            }
            (State::AwaitSubscribed, Frame::Subscribed { from }) => {
                if from.saturating_sub(1) < self.received {
                    return Err(ReplicaError::Order(format!(
                        "subscribed from {from}, before {} already stored",
                        self.received + 1
                    )));
                }
                self.state = State::Streaming;
                self.received = from.saturating_sub(1);
                // Store where this subscription starts (for `latest` and `time` starts).
                Ok(Step::Apply(self.apply(Vec::new(), Vec::new(), None, 0)))
            }
            (
                State::Streaming,
                Frame::Replicate {
                    through,
                    head,
                    records,
                    not_selected,
                },
            ) => {
                let mut last = self.received;
                for r in &records {
                    if r.node_seq <= last || r.node_seq > through {
                        return Err(ReplicaError::Order(format!(
                            "record {} after {last}, scanned through {through}",
                            r.node_seq
                        )));
                    }
                    last = r.node_seq;
                }
                if through < self.received {
                    return Err(ReplicaError::Order(format!(
                        "scanned through {through} after {}",
                        self.received
                    )));
                }
                if through == self.received && records.is_empty() && not_selected.is_empty() {
                    // A heartbeat: nothing to store.
                    return Ok(Step::Idle {
                        behind: head.saturating_sub(through),
                    });
                }
                let events = records
                    .iter()
                    .filter(|r| matches!(r.item, ReplicatedItem::Event(_)))
                    .count();
                if events > self.window as usize {
                    return Err(ReplicaError::Order(format!(
                        "{events} events beyond the credit"
                    )));
                }
                self.received = through;
                Ok(Step::Apply(self.apply(
                    records,
                    not_selected,
                    None,
                    head.saturating_sub(through),
                )))
            }
            (_, f) => Err(ReplicaError::Unexpected(f.kind())),
        }
    }

    fn apply(
        &self,
        records: Vec<Replicated>,
        not_selected: Vec<NotSelected>,
        truncated: Option<(u64, u64)>,
        behind: u64,
    ) -> Apply {
        let (node_id, incarnation) = self.upstream.clone().unwrap_or_default();
        Apply {
            connection: self.connection,
            cursor: UpstreamCursor {
                node_id,
                incarnation,
                through: self.received,
                filters: self.filters.clone(),
            },
            records,
            not_selected,
            truncated,
            behind,
        }
    }

    /// An [`Apply`] is stored (in the order they were produced): the credit to send, if the
    /// connection it came on still runs.
    pub fn on_applied(&mut self, receipt: Receipt) -> Option<Frame> {
        let events = receipt.events;
        let live = receipt.connection == self.connection && self.state == State::Streaming;
        self.stored = Some(receipt.cursor);
        (live && events > 0).then_some(Frame::Credit { events })
    }
}

/// What the driver does after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this frame upstream.
    Send(Frame),
    /// Store these records with their cursor, then call [`Replicator::on_applied`].
    Apply(Apply),
    /// Nothing to store (a heartbeat); the upstream holds this many records beyond the cursor.
    Idle {
        /// Upstream records not yet scanned.
        behind: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{GapKind, GapReason};

    fn ev(seq: u64, topic: &str) -> Event {
        Event {
            seq,
            topic: topic.into(),
            payload: vec![0],
            ts_us: 0,
            qos: 1,
            headers: None,
        }
    }

    fn rec(node_seq: u64, origin: &str, seq: u64, topic: &str, path: &[(&str, u64)]) -> Replicated {
        Replicated {
            node_seq,
            ingest_us: node_seq,
            origin: origin.into(),
            epoch: 1,
            path: path.iter().map(|(s, i)| (s.to_string(), *i)).collect(),
            item: ReplicatedItem::Event(ev(seq, topic)),
        }
    }

    #[test]
    fn round_selects_skips_and_coalesces() {
        let filters = vec!["a/#".to_string()];
        let mut round = PeerRound::new(&filters, ("down", 3), 10, 2, 1 << 20);
        assert!(round.offer(10, rec(10, "o", 1, "a/x", &[])));
        assert!(round.offer(11, rec(11, "o", 2, "b/x", &[])));
        assert!(round.offer(12, rec(12, "o", 3, "b/x", &[])));
        assert!(round.offer(13, rec(13, "p", 7, "b/x", &[])));
        // Stored by the downstream before: not sent back, not reported.
        assert!(round.offer(14, rec(14, "o", 4, "a/x", &[("down", 3)])));
        assert!(round.offer(15, rec(15, "o", 5, "b/x", &[])));
        let gap = Replicated {
            node_seq: 16,
            ingest_us: 16,
            origin: "o".into(),
            epoch: 1,
            path: vec![],
            item: ReplicatedItem::Gap(Gap {
                kind: GapKind::Range { first: 6, last: 6 },
                reason: GapReason::Evicted,
                ts_us: 0,
            }),
        };
        assert!(round.offer(16, gap));
        // Stored by an earlier incarnation of the downstream, which lost it: sent.
        assert!(round.offer(17, rec(17, "o", 7, "a/y", &[("down", 2)])));
        assert!(round.is_full());
        assert!(!round.offer(18, rec(18, "o", 8, "a/x", &[])));
        // Gap records are taken even when the round is full.
        assert_eq!(round.through(), 17);
        let Frame::Replicate {
            through,
            head,
            records,
            not_selected,
        } = round.into_frame(40)
        else {
            panic!("not a replicate frame");
        };
        assert_eq!((through, head), (17, 40));
        let seqs: Vec<u64> = records.iter().map(|r| r.node_seq).collect();
        assert_eq!(seqs, vec![10, 16, 17]);
        let ns: Vec<(&str, u64, u64)> = not_selected
            .iter()
            .map(|n| (n.origin.as_str(), n.first, n.last))
            .collect();
        assert_eq!(ns, vec![("o", 2, 3), ("p", 7, 7), ("o", 5, 5)]);
    }

    #[test]
    fn a_round_stays_within_its_byte_budget_but_takes_one_large_event() {
        let filters = vec!["#".to_string()];
        let big = |n: u64| {
            let mut r = rec(n, "o", n, "t", &[]);
            if let ReplicatedItem::Event(e) = &mut r.item {
                e.payload = vec![0; 600];
            }
            r
        };
        let mut round = PeerRound::new(&filters, ("down", 1), 1, 100, 1_000);
        assert!(round.offer(1, big(1)));
        assert!(!round.offer(2, big(2)), "600 + 600 bytes exceed 1,000");
        assert_eq!(round.events(), 1);
        // A single event larger than the budget still goes (alone).
        let mut round = PeerRound::new(&filters, ("down", 1), 1, 100, 100);
        assert!(round.offer(1, big(1)));
        assert!(round.is_full());
    }

    /// Found by fuzzing (replication_apply): a second `truncated` behind the first moved
    /// the cursor back. A cursor never moves back: such a frame is an order error.
    #[test]
    fn truncated_or_subscribed_behind_the_cursor_is_refused() {
        let mut r = Replicator::new(1, vec!["#".into()], Start::Earliest, 100, None);
        r.on_connected("down");
        r.on_frame(welcome("up", 9)).unwrap();
        let first = Frame::Truncated {
            requested: 0,
            earliest: 761,
        };
        assert!(matches!(r.on_frame(first), Ok(Step::Apply(_))));
        let back = Frame::Truncated {
            requested: 0,
            earliest: 121,
        };
        assert!(matches!(r.on_frame(back), Err(ReplicaError::Order(_))));
        let mut r = Replicator::new(1, vec!["#".into()], Start::Earliest, 100, None);
        r.on_connected("down");
        r.on_frame(welcome("up", 9)).unwrap();
        r.on_frame(Frame::Truncated {
            requested: 1,
            earliest: 50,
        })
        .unwrap();
        assert!(matches!(
            r.on_frame(Frame::Subscribed { from: 10 }),
            Err(ReplicaError::Order(_))
        ));
    }

    fn welcome(node: &str, incarnation: u64) -> Frame {
        Frame::Welcome {
            version: PROTOCOL_VERSION,
            node_id: node.into(),
            incarnation,
            max_event_bytes: 1000,
            max_frame_bytes: 1 << 20,
            compression: Compression::None,
        }
    }

    fn subscribe_start(step: Step) -> Start {
        match step {
            Step::Send(Frame::Subscribe { start, .. }) => start,
            other => panic!("expected a subscribe, got {other:?}"),
        }
    }

    #[test]
    fn resumes_after_the_stored_cursor_and_restarts_on_a_new_incarnation() {
        let filters = vec!["#".to_string()];
        let stored = UpstreamCursor {
            node_id: "up".into(),
            incarnation: 5,
            through: 41,
            filters: filters.clone(),
        };
        let mut r = Replicator::new(1, filters.clone(), Start::Latest, 100, Some(stored.clone()));
        r.on_connected("down");
        assert_eq!(
            subscribe_start(r.on_frame(welcome("up", 5)).unwrap()),
            Start::Seq(42)
        );
        r.on_disconnected();
        r.on_connected("down");
        assert_eq!(
            subscribe_start(r.on_frame(welcome("up", 6)).unwrap()),
            Start::Earliest
        );
        // Other filters: from earliest too.
        let mut r = Replicator::new(1, vec!["a/#".into()], Start::Latest, 100, Some(stored));
        r.on_connected("down");
        assert_eq!(
            subscribe_start(r.on_frame(welcome("up", 5)).unwrap()),
            Start::Earliest
        );
        // No cursor: the configured start.
        let mut r = Replicator::new(1, filters, Start::Latest, 100, None);
        r.on_connected("down");
        assert_eq!(
            subscribe_start(r.on_frame(welcome("up", 5)).unwrap()),
            Start::Latest
        );
    }

    #[test]
    fn applies_carry_the_cursor_and_credit_returns_after_storing() {
        let mut r = Replicator::new(1, vec!["#".into()], Start::Earliest, 10, None);
        r.on_connected("down");
        r.on_frame(welcome("up", 9)).unwrap();
        let Step::Apply(a) = r.on_frame(Frame::Subscribed { from: 1 }).unwrap() else {
            panic!()
        };
        assert_eq!(a.cursor.through, 0);
        assert_eq!(r.on_applied(a.receipt()), None);
        let frame = Frame::Replicate {
            through: 5,
            head: 9,
            records: vec![rec(2, "o", 1, "t", &[]), rec(4, "o", 2, "t", &[])],
            not_selected: vec![],
        };
        let Step::Apply(a) = r.on_frame(frame).unwrap() else {
            panic!()
        };
        assert_eq!(a.cursor.through, 5);
        assert_eq!(a.cursor.incarnation, 9);
        assert_eq!(a.behind, 4);
        assert_eq!(r.on_applied(a.receipt()), Some(Frame::Credit { events: 2 }));
        assert_eq!(r.cursor().unwrap().through, 5);
        // Out of order, or before what was received: a protocol error.
        let bad = Frame::Replicate {
            through: 8,
            head: 9,
            records: vec![rec(5, "o", 3, "t", &[])],
            not_selected: vec![],
        };
        assert!(matches!(r.on_frame(bad), Err(ReplicaError::Order(_))));
        // A heartbeat: nothing new, nothing to store.
        let beat = Frame::Replicate {
            through: 5,
            head: 12,
            records: vec![],
            not_selected: vec![],
        };
        assert_eq!(r.on_frame(beat).unwrap(), Step::Idle { behind: 7 });
        // An apply of a connection that is gone updates the cursor but sends no credit.
        r.on_disconnected();
        assert_eq!(r.on_applied(a.receipt()), None);
    }

    #[test]
    fn truncation_is_reported_as_a_lost_range() {
        let mut r = Replicator::new(1, vec!["#".into()], Start::Earliest, 10, None);
        r.on_connected("down");
        r.on_frame(welcome("up", 9)).unwrap();
        let Step::Apply(a) = r
            .on_frame(Frame::Truncated {
                requested: 1,
                earliest: 50,
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(a.truncated, Some((1, 49)));
        assert_eq!(a.cursor.through, 49);
        assert!(matches!(
            r.on_frame(Frame::Subscribed { from: 50 }),
            Ok(Step::Apply(_))
        ));
    }
}
