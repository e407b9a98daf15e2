//! The buffer's on-disk format: the databases, their keys, the bookkeeping record, and the
//! encoding of values (see the module header of [`super`] for the layout).

use std::sync::Arc;

use heed::types::Bytes;
use heed::{Database, Env, WithoutTls};
use serde::{Deserialize, Serialize};

use super::BufferError;
use crate::metrics::EdgeMetrics;

/// The on-disk format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// LMDB's own cost per entry (node header, key, page slack) added to each event's accounting.
pub(super) const ENTRY_OVERHEAD: u64 = 32;

/// Every database maps bytes to bytes; keys and values are encoded here.
type Db = Database<'static, Bytes, Bytes>;

/// Whether the last run closed the buffer cleanly (`Clean`) or may have crashed (`Running`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum RunMark {
    Running,
    Clean,
}

/// The buffer's bookkeeping, kept in one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format: u32,
    pub(super) origin: String,
    pub(super) epoch: u64,
    pub(super) next_seq: u64,
    pub(super) mark: RunMark,
    pub(super) acked: Option<(u64, u64)>,
    pub(super) events: u64,
    pub(super) bytes: u64,
    pub(super) next_gap_id: u64,
}

/// The environment and its databases, shared by the writer thread and every reader.
pub(super) struct Shared {
    pub(super) env: Env<WithoutTls>,
    pub(super) events: Db,
    pub(super) gaps: Db,
    pub(super) meta: Db,
    /// QoS 2 packet ids received and stored, per client: `client ‖ 0 ‖ pkid` → (epoch, seq).
    pub(super) qos2: Db,
    pub(super) metrics: Arc<EdgeMetrics>,
}

pub(super) fn event_key(epoch: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn gap_key(epoch: u64, position: u64, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..16].copy_from_slice(&position.to_be_bytes());
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

/// QoS 2 state key: the client id, a 0 byte (MQTT strings never hold U+0000), the packet id.
pub(super) fn qos2_key(client: &str, pkid: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(client.len() + 3);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

pub(super) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A new epoch: clock milliseconds × 2048 + 11 random bits, and always above `previous`.
pub fn new_epoch(previous: Option<u64>) -> u64 {
    let now_ms = now_us() / 1000;
    let floor_ms = previous.map_or(0, |p| (p >> 11) + 1);
    (now_ms.max(floor_ms) << 11) | rand::random_range(0..2048u64)
}

pub(super) fn decode<T: for<'a> Deserialize<'a>>(
    bytes: &[u8],
    what: &str,
) -> Result<T, BufferError> {
    postcard::from_bytes(bytes).map_err(|e| BufferError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("in-memory postcard encoding cannot fail")
}

pub(super) const META_KEY: &[u8] = b"meta";
