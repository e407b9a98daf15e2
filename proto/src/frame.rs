//! The frames of the telemesh QUIC protocol, ALPN `telemesh/1`.
//!
//! Every frame is one postcard-encoded [`Frame`] behind a 4-byte little-endian length (see
//! [`crate::codec`]). A connection opens with [`Frame::Hello`]; the node answers
//! [`Frame::Welcome`] or [`Frame::Reject`]. Then, by role:
//!
//! - **uplink**: the agent sends [`Frame::Batch`]es in order on one stream, a window of them in
//!   flight; the node answers each with [`Frame::Ack`] after the batch is durable in its log,
//!   or with [`Frame::BatchRefused`] when it cannot store it (for example a full disk).
//! - **consumer / peer**: the client sends [`Frame::Subscribe`], then [`Frame::Credit`] and
//!   [`Frame::ConsumerAck`]; the node answers [`Frame::Subscribed`] or [`Frame::Truncated`]
//!   and then streams [`Frame::Deliver`] and [`Frame::Scanned`] as credit allows.
//!
//! - **peer** (replication, see [`crate::replication`]): like a consumer, but the node
//!   answers with [`Frame::Replicate`] rounds that carry each record's path, the seqs the
//!   filters did not select and how far the log was scanned.
//!
//! Compatibility: postcard encodes an enum variant by its index, so variants (of frames,
//! roles, reasons) are only ever appended, never reordered or removed; a change to the
//! fields of a frame raises [`PROTOCOL_VERSION`], so the handshake refuses peers of another
//! layout with a clear code instead of misreading them. Error codes are numbers that are
//! never reused.

use serde::{Deserialize, Serialize};

use crate::event::{Event, Gap};
use crate::replication::{NotSelected, Replicated};

/// The protocol version a peer speaks; the handshake refuses any other.
pub const PROTOCOL_VERSION: u16 = 2;

/// The ALPN name of the protocol.
pub const ALPN: &[u8] = b"telemesh/1";

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An edge agent forwarding its events.
    Uplink,
    /// Another node replicating from this one.
    Peer,
    /// A cloud service subscribing and replaying.
    Consumer,
}

impl Role {
    /// A stable lowercase name, as in the `[[access]]` config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Peer => "peer",
            Role::Consumer => "consumer",
        }
    }
}

/// Batch compression, negotiated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Batches travel as plain postcard.
    None,
    /// Batches travel zstd-compressed.
    Zstd,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Start {
    /// The oldest event the node still holds.
    Earliest,
    /// Right after the last event committed when the subscription begins.
    Latest,
    /// At this node seq.
    Seq(u64),
    /// At the first event ingested at or after this time (µs since the Unix epoch).
    Time(u64),
}

/// A stable numeric error code, carried by rejects and errors. Codes are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:expr, $text:expr;)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($value);)*

            /// A stable lowercase name, or `"unknown"` for a code this build does not know.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => $text,)*
                    _ => "unknown",
                }
            }

            /// Every code this build knows.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode($value)),*];
        }
    };
}

error_codes! {
    /// The peer speaks another protocol version.
    UNSUPPORTED_VERSION = 1, "unsupported_version";
    /// A frame could not be decoded.
    MALFORMED_FRAME = 2, "malformed_frame";
    /// A frame's length exceeds the agreed maximum.
    FRAME_TOO_LARGE = 3, "frame_too_large";
    /// A well-formed frame arrived where the protocol does not allow it.
    UNEXPECTED_FRAME = 4, "unexpected_frame";
    /// The certificate's identity has no `[[access]]` entry.
    UNKNOWN_IDENTITY = 10, "unknown_identity";
    /// The identity may not take the role it asked for.
    ROLE_DENIED = 11, "role_denied";
    /// A batch names an origin other than the uplink's identity.
    ORIGIN_MISMATCH = 12, "origin_mismatch";
    /// An event's topic lies outside the uplink's `publish` filters.
    PUBLISH_DENIED = 13, "publish_denied";
    /// A subscription filter lies outside the consumer's `read` filters.
    READ_DENIED = 14, "read_denied";
    /// The hello's id differs from the certificate's identity.
    IDENTITY_MISMATCH = 15, "identity_mismatch";
    /// A topic name is not a valid MQTT topic name.
    INVALID_TOPIC = 20, "invalid_topic";
    /// A topic filter is not a valid MQTT topic filter.
    INVALID_FILTER = 21, "invalid_filter";
    /// An event is larger than the node's maximum event size.
    EVENT_TOO_LARGE = 22, "event_too_large";
    /// The edge's maximum payload exceeds the node's maximum event size.
    LIMITS_MISMATCH = 23, "limits_mismatch";
    /// A name that becomes a storage key (durable name, origin, node id, identity) is empty,
    /// longer than 128 bytes, or holds characters outside ASCII letters, digits, `.`, `_`, `-`.
    INVALID_NAME = 24, "invalid_name";
    /// A gap record's range is empty, reversed or beyond the largest seq.
    INVALID_GAP = 25, "invalid_gap";
    /// An event's seq is 0 or beyond the largest seq.
    INVALID_SEQ = 26, "invalid_seq";
    /// A limit was reached (connections, streams, filters); the reason names it.
    LIMIT_EXCEEDED = 27, "limit_exceeded";
    /// The peer did not send its hello in time.
    HELLO_TIMEOUT = 28, "hello_timeout";
    /// The node's storage is full; the batch was not stored.
    STORAGE_FULL = 30, "storage_full";
    /// The node's storage failed (for example EIO); the batch was not stored.
    STORAGE_FAILED = 31, "storage_failed";
    /// A durable consumer name is held by another connection.
    DURABLE_IN_USE = 40, "durable_in_use";
    /// A durable consumer exists with other filters.
    DURABLE_FILTERS_DIFFER = 41, "durable_filters_differ";
    /// The node is shutting down.
    SHUTTING_DOWN = 50, "shutting_down";
    /// An internal error; the node's log says more.
    INTERNAL = 51, "internal";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// One event refused on its own inside a batch (a poison pill): the rest of the batch is
/// stored and acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The refused event's seq.
    pub seq: u64,
    /// Why it was refused.
    pub code: ErrorCode,
    /// A human-readable reason.
    pub reason: String,
}

/// An event as a node delivers it: with its full identity and its place in that node's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The event's seq in the serving node's log.
    pub node_seq: u64,
    /// When the serving node ingested it (µs since the Unix epoch).
    pub ingest_us: u64,
    /// The origin that made it.
    pub origin: String,
    /// The origin's epoch.
    pub epoch: u64,
    /// The event, whose `seq` completes its [`crate::EventId`].
    pub event: Event,
}

/// A gap record as a node delivers it to subscribers that asked for gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredGap {
    /// The gap record's seq in the serving node's log.
    pub node_seq: u64,
    /// The origin that lost the events.
    pub origin: String,
    /// The origin's epoch.
    pub epoch: u64,
    /// What was lost, and why.
    pub gap: Gap,
}

/// A frame of the protocol. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Opens a connection.
    Hello {
        /// The client's protocol version.
        version: u16,
        /// What the connection is for.
        role: Role,
        /// The client's id; must equal its certificate's identity.
        id: String,
        /// An uplink: the largest event (topic, payload and headers) it will send. A consumer
        /// or a peer: the largest frame it accepts (0: 64 MiB, what earlier releases accept);
        /// the node sizes every frame to it.
        max_event_bytes: u32,
        /// Compressions the client can send, in order of preference.
        #[serde(deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_OFFERS }>")]
        compression: Vec<Compression>,
    },
    /// The node accepts the connection.
    Welcome {
        /// The node's protocol version.
        version: u16,
        /// The node's id.
        node_id: String,
        /// The incarnation of the node's log: changes when the log is wiped or restored.
        incarnation: u64,
        /// The largest event the node stores.
        max_event_bytes: u32,
        /// The largest frame the node accepts.
        max_frame_bytes: u32,
        /// The compression the client shall use.
        compression: Compression,
    },
    /// The node refuses the connection.
    Reject {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Events (and gap records) of one origin and epoch, in seq order.
    Batch {
        /// The batch's number on this connection, increasing by one.
        id: u64,
        /// The origin of every event in the batch.
        origin: String,
        /// The epoch of every event in the batch.
        epoch: u64,
        /// The events, in seq order.
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_BATCH_EVENTS }>"
        )]
        events: Vec<Event>,
        /// Gap records of this epoch, ordered by [`Gap::position`].
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_FRAME_GAPS }>"
        )]
        gaps: Vec<Gap>,
    },
    /// The batch is durable in the node's log (stored by it or by an earlier batch).
    Ack {
        /// The batch acknowledged.
        id: u64,
        /// Events of the batch refused on their own, and recorded as rejected.
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_BATCH_EVENTS }>"
        )]
        rejected: Vec<Rejection>,
    },
    /// The node could not store the batch; nothing of it is acknowledged.
    BatchRefused {
        /// The batch refused.
        id: u64,
        /// Why, as a stable code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Starts a subscription.
    Subscribe {
        /// MQTT topic filters; an event matching any of them is delivered.
        #[serde(deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_FILTERS }>")]
        filters: Vec<String>,
        /// Where to start; ignored once the durable consumer exists.
        start: Start,
        /// The durable consumer's name, if any.
        durable: Option<String>,
        /// Events the node may send before it waits for more credit.
        credit: u32,
        /// Whether to deliver gap records too.
        gaps: bool,
        /// For a replicating peer: its own log's incarnation. Records whose path names the
        /// peer in this incarnation are not sent (it stored them before).
        incarnation: Option<u64>,
    },
    /// The subscription runs, starting at this node seq.
    Subscribed {
        /// The first node seq the subscription may deliver.
        from: u64,
    },
    /// Events for a subscription, in node seq order.
    Deliver {
        /// The events.
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_BATCH_EVENTS }>"
        )]
        events: Vec<Delivered>,
        /// Gap records, when the subscription asked for them.
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_FRAME_GAPS }>"
        )]
        gaps: Vec<DeliveredGap>,
    },
    /// More credit for a subscription, in events.
    Credit {
        /// Events added to the credit.
        events: u32,
    },
    /// The consumer has processed everything through this node seq (cumulative).
    ConsumerAck {
        /// The last node seq processed.
        through: u64,
    },
    /// The node scanned its log through this node seq and nothing else matched.
    Scanned {
        /// The last node seq scanned.
        through: u64,
    },
    /// The requested start (or a durable cursor) lies before what retention kept.
    Truncated {
        /// The node seq asked for.
        requested: u64,
        /// The earliest node seq still held; delivery continues from there.
        earliest: u64,
    },
    /// An error that ends the stream or connection.
    Error {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Asks for the completeness view (instead of subscribing).
    StatusRequest,
    /// The completeness view: per origin and epoch, what this node holds and knows lost.
    Status {
        /// The node's id.
        node_id: String,
        /// The last committed node seq.
        committed: u64,
        /// One entry per (origin, epoch).
        origins: Vec<OriginStatus>,
        /// Durable consumers and what they acknowledged.
        consumers: Vec<ConsumerStatus>,
        /// The most recent refused events (the dead-letter store's newest entries).
        dead_letters: Vec<DeadLetter>,
        /// The node's replication upstreams and how far behind each is.
        upstreams: Vec<UpstreamStatus>,
    },
    /// A replication round for a peer: records of the log in node seq order.
    Replicate {
        /// The node seq scanned through (every record up to it was sent or skipped).
        through: u64,
        /// The node's last committed node seq.
        head: u64,
        /// The records selected (events matching the filters, and gap records).
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_ROUND_RECORDS }>"
        )]
        records: Vec<Replicated>,
        /// Seqs held and not selected by the filters, as ranges.
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::bounded::MAX_ROUND_RECORDS }>"
        )]
        not_selected: Vec<NotSelected>,
    },
    /// Another frame, compressed: sent only where the handshake chose a compression (an
    /// uplink's batches). `data` decompresses to exactly `raw_len` bytes of a postcard-encoded
    /// frame, which is never itself compressed.
    Compressed {
        /// The compression.
        codec: Compression,
        /// The frame's size before compression (checked against the frame limit first).
        raw_len: u32,
        /// The compressed frame.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// A replication upstream of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The `from` address of the `[[replicate]]` entry.
    pub from: String,
    /// The upstream's node id, once known.
    pub node_id: String,
    /// Whether a connection to it runs.
    pub connected: bool,
    /// The upstream node seq stored through.
    pub through: u64,
    /// Upstream records not yet scanned, as of the last round.
    pub behind: u64,
    /// Caught up: milliseconds from the upstream's ingest of the newest event stored from it
    /// to its commit here. Disconnected or behind: that event's age, which keeps growing.
    pub lag_ms: u64,
}

/// Completeness of one origin's epoch on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginStatus {
    /// The origin.
    pub origin: String,
    /// The epoch.
    pub epoch: u64,
    /// Seqs held, as inclusive ranges.
    pub held: Vec<(u64, u64)>,
    /// Seqs known lost at the edge (gap records), as inclusive ranges.
    pub lost: Vec<(u64, u64)>,
    /// Seqs this node refused (poison pills), as inclusive ranges.
    pub rejected: Vec<(u64, u64)>,
    /// Seqs a filtered replication skipped, as inclusive ranges.
    pub not_selected: Vec<(u64, u64)>,
}

/// An event a node refused on its own, kept in its bounded dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The origin.
    pub origin: String,
    /// The epoch.
    pub epoch: u64,
    /// The seq.
    pub seq: u64,
    /// The event's topic.
    pub topic: String,
    /// Why, as a stable code.
    pub code: ErrorCode,
    /// Why, in words.
    pub reason: String,
    /// When the node refused it (µs since the Unix epoch).
    pub ts_us: u64,
}

/// A durable consumer on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// Its identity.
    pub identity: String,
    /// Its name.
    pub name: String,
    /// The last node seq it acknowledged.
    pub acked: u64,
}

impl Frame {
    /// A short name of the variant for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Reject { .. } => "reject",
            Frame::Batch { .. } => "batch",
            Frame::Ack { .. } => "ack",
            Frame::BatchRefused { .. } => "batch_refused",
            Frame::Subscribe { .. } => "subscribe",
            Frame::Subscribed { .. } => "subscribed",
            Frame::Deliver { .. } => "deliver",
            Frame::Credit { .. } => "credit",
            Frame::ConsumerAck { .. } => "consumer_ack",
            Frame::Scanned { .. } => "scanned",
            Frame::Truncated { .. } => "truncated",
            Frame::Error { .. } => "error",
            Frame::StatusRequest => "status_request",
            Frame::Status { .. } => "status",
            Frame::Replicate { .. } => "replicate",
            Frame::Compressed { .. } => "compressed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn error_codes_are_unique_and_named() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.0), "code {} used twice", code.0);
            assert_ne!(code.name(), "unknown");
        }
        assert_eq!(ErrorCode(9999).name(), "unknown");
        assert_eq!(ErrorCode::STORAGE_FULL.to_string(), "storage_full (30)");
    }

    /// The wire numbers of codes are a contract with deployed peers.
    #[test]
    fn error_code_numbers_are_stable() {
        assert_eq!(ErrorCode::UNSUPPORTED_VERSION.0, 1);
        assert_eq!(ErrorCode::MALFORMED_FRAME.0, 2);
        assert_eq!(ErrorCode::PUBLISH_DENIED.0, 13);
        assert_eq!(ErrorCode::STORAGE_FULL.0, 30);
        assert_eq!(ErrorCode::DURABLE_IN_USE.0, 40);
    }

    /// Postcard encodes variants by index: appending is fine, reordering breaks peers.
    #[test]
    fn frame_variant_indexes_are_stable() {
        let credit = postcard::to_allocvec(&Frame::Credit { events: 7 }).unwrap();
        assert_eq!(credit, vec![9, 7]);
        let error = postcard::to_allocvec(&Frame::Error {
            code: ErrorCode::INTERNAL,
            reason: String::new(),
        })
        .unwrap();
        assert_eq!(error, vec![13, 51, 0]);
    }
}
