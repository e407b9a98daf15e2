//! The log's on-disk format: the databases, their keys and values (see the module header
//! of [`super`] for the layout).

use heed::types::Bytes;
use heed::{Database, Env, WithoutTls};
use serde::{Deserialize, Serialize};
use telemesh_proto::replication::Hop;
use telemesh_proto::{Event, Gap};

/// Every database maps bytes to bytes; keys and values are encoded here.
pub(super) type Db = Database<'static, Bytes, Bytes>;

/// The format this code reads and writes.
pub const FORMAT_VERSION: u32 = 2;

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// An event.
    Event {
        /// Its origin.
        origin: String,
        /// Its epoch.
        epoch: u64,
        /// When this node stored it (µs since the Unix epoch).
        ingest_us: u64,
        /// The event with its seq.
        event: Event,
        /// The nodes that stored it before this one, oldest first.
        path: Vec<Hop>,
    },
    /// A gap record: events lost at the edge.
    Gap {
        /// Its origin.
        origin: String,
        /// Its epoch.
        epoch: u64,
        /// When this node stored it.
        ingest_us: u64,
        /// What was lost.
        gap: Gap,
        /// The nodes that stored it before this one, oldest first.
        path: Vec<Hop>,
    },
}

impl Record {
    /// The ingest time.
    pub fn ingest_us(&self) -> u64 {
        match self {
            Record::Event { ingest_us, .. } | Record::Gap { ingest_us, .. } => *ingest_us,
        }
    }
}

/// The log's bookkeeping, kept in one record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format: u32,
    pub(super) node_id: String,
    pub(super) incarnation: u64,
    pub(super) next_seq: u64,
    pub(super) last_ingest_us: u64,
    /// Bytes of the records in `log` (values), for retention by size.
    pub(super) bytes: u64,
    /// The next dead letter's number.
    pub(super) next_dead: u64,
}

/// The environment and its databases, shared by the writer thread and every reader.
pub(super) struct Shared {
    pub(super) env: Env<WithoutTls>,
    pub(super) log: Db,
    pub(super) held: Db,
    pub(super) lost: Db,
    pub(super) gapseen: Db,
    pub(super) meta: Db,
    pub(super) cursors: Db,
    /// Dead letters: counter (u64 BE) → postcard [`DeadLetter`]; at most [`MAX_DEAD_LETTERS`].
    pub(super) dead: Db,
    /// `origin ‖ 0 ‖ epoch` → [`RangeSet`] of seqs refused.
    pub(super) rejected: Db,
    /// Replication cursors by upstream address.
    pub(super) upstreams: Db,
    /// `origin ‖ 0 ‖ epoch` → [`RangeSet`] of seqs not selected by a filtered replication.
    pub(super) notsel: Db,
}

/// A durable consumer's state: its filters and what it acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The subscription's filters (a durable name keeps them).
    pub filters: Vec<String>,
    /// The last node seq acknowledged (0: nothing yet).
    pub acked: u64,
    /// When the consumer was last connected (µs since the Unix epoch): `consumer_ttl`
    /// counts from here.
    pub seen_us: u64,
}

/// The key of a durable consumer: its identity and name.
pub fn cursor_key(identity: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(identity.len() + name.len() + 1);
    k.extend_from_slice(identity.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

pub(super) fn origin_key(origin: &str, epoch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(origin.len() + 9);
    k.extend_from_slice(origin.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("in-memory postcard encoding cannot fail")
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(super) const META: &[u8] = b"meta";
