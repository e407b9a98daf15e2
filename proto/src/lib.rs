//! The telemesh protocol core.
//!
//! Everything in this crate is pure data and pure logic: wire types and their framing, MQTT
//! topic names and filters, the range sets that track which seqs of an origin a node holds,
//! and (as they arrive) the sans-IO state machines that drive forwarding, replication and
//! consumer cursors. It depends on no I/O crate — no tokio, no heed, no quinn, no rumqtt —
//! so every piece can be tested deterministically, without sockets or clocks.
//!
//! Map of the crate:
//! - [`event`]: [`EventId`], [`Event`], [`Headers`], gap records.
//! - [`frame`]: the frames of the QUIC protocol (`telemesh/1`) and their stable error codes.
//! - [`bounded`]: collections decoded with a bound on their length.
//! - [`codec`]: length-prefixed postcard framing and the streaming, size-bounded decoder.
//! - [`topic`]: MQTT topic-name validation and topic-filter matching.
//! - [`ranges`]: compact sets of seq ranges.
//! - [`name`]: the rule for names that become storage keys (origins, node ids, durable names).
//! - [`forwarder`]: the edge side of the uplink protocol.
//! - [`replication`]: both ends of replication between nodes.

pub mod bounded;
pub mod codec;
pub mod event;
pub mod forwarder;
pub mod frame;
pub mod name;
pub mod ranges;
pub mod replication;
pub mod topic;

pub use codec::{encode_frame, DecodeError, FrameDecoder};
pub use event::{check_event_size, Event, EventId, Gap, GapKind, GapReason, Headers, MAX_SEQ};
pub use frame::{ErrorCode, Frame, Role, Start, PROTOCOL_VERSION};
pub use name::{validate_name, MAX_NAME_BYTES};
pub use ranges::RangeSet;
