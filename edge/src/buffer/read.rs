//! Reads of committed state: the [`Reader`] the uplink and the durable port use, and
//! [`inspect`], a read-only look at a buffer directory for tools and tests.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};
use telemesh_proto::Event;

use super::format::{be_u64, decode, event_key, qos2_key, Meta, RunMark, Shared, META_KEY};
use super::{BufferError, Stored, StoredGap};
use crate::metrics::EdgeMetrics;

/// Reads committed state; never blocks the writer (LMDB readers see a snapshot).
#[derive(Clone)]
pub struct Reader {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

/// The committed bookkeeping of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferState {
    /// The current epoch.
    pub epoch: u64,
    /// The seq the next event of the current epoch gets.
    pub next_seq: u64,
    /// What a node acknowledged last.
    pub acked: Option<(u64, u64)>,
    /// Events in the buffer.
    pub events: u64,
    /// Bytes they account for.
    pub bytes: u64,
}

pub(super) fn oldest_ts(shared: &Shared, txn: &heed::RoTxn) -> Result<u64, BufferError> {
    match shared.events.first(txn)? {
        Some((_, v)) => Ok(decode::<Event>(v, "event")?.ts_us),
        None => Ok(0),
    }
}

impl Reader {
    /// Up to `max` events after `after` (exclusive; `None`: from the oldest), in order.
    pub fn read(&self, after: Option<(u64, u64)>, max: usize) -> Result<Vec<Stored>, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        let start = match after {
            Some((e, s)) => {
                let (e, s) = if s == u64::MAX {
                    (e + 1, 0)
                } else {
                    (e, s + 1)
                };
                event_key(e, s)
            }
            None => event_key(0, 0),
        };
        let mut out = Vec::new();
        for item in self
            .shared
            .events
            .range(&rtxn, &(Bound::Included(&start[..]), Bound::Unbounded))?
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            out.push(Stored {
                epoch: be_u64(k),
                event: decode(v, "event")?,
            });
        }
        Ok(out)
    }

    /// Where a client's QoS 2 packet id was stored, if it was and is not yet released.
    pub fn qos2(&self, client: &str, pkid: u16) -> Result<Option<(u64, u64)>, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        Ok(self
            .shared
            .qos2
            .get(&rtxn, &qos2_key(client, pkid))?
            .filter(|v| v.len() == 16)
            .map(|v| (be_u64(&v[..8]), be_u64(&v[8..]))))
    }

    /// True when a client has QoS 2 packet ids stored and not released (session state).
    pub fn has_qos2_state(&self, client: &str) -> Result<bool, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        let lo = qos2_key(client, 0);
        let hi = qos2_key(client, u16::MAX);
        let mut range = self
            .shared
            .qos2
            .range(&rtxn, &(Bound::Included(&lo[..]), Bound::Included(&hi[..])))?;
        Ok(range.next().is_some())
    }

    /// How many QoS 2 packet ids a client has stored and not released, counting at most to
    /// `limit`.
    pub fn qos2_count(&self, client: &str, limit: usize) -> Result<usize, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        let lo = qos2_key(client, 0);
        let hi = qos2_key(client, u16::MAX);
        let range = self
            .shared
            .qos2
            .range(&rtxn, &(Bound::Included(&lo[..]), Bound::Included(&hi[..])))?;
        Ok(range.take(limit).count())
    }

    /// Every gap record, in (epoch, position, id) order.
    pub fn gaps(&self) -> Result<Vec<StoredGap>, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.shared.gaps.iter(&rtxn)? {
            let (k, v) = item?;
            out.push(StoredGap {
                epoch: be_u64(&k[..8]),
                id: be_u64(&k[16..]),
                gap: decode(v, "gap")?,
            });
        }
        Ok(out)
    }

    /// The committed bookkeeping.
    pub fn state(&self) -> Result<BufferState, BufferError> {
        let rtxn = self.shared.env.read_txn()?;
        let meta: Meta = match self.shared.meta.get(&rtxn, META_KEY)? {
            Some(b) => decode(b, "meta")?,
            None => return Err(BufferError::Corrupt("meta record missing".into())),
        };
        Ok(BufferState {
            epoch: meta.epoch,
            next_seq: meta.next_seq,
            acked: meta.acked,
            events: meta.events,
            bytes: meta.bytes,
        })
    }
}

/// What a buffer directory holds, read without a writer (another process may be running it).
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The committed bookkeeping.
    pub state: BufferState,
    /// True when the last run stopped cleanly.
    pub clean: bool,
    /// Every event, in order.
    pub events: Vec<Stored>,
    /// Every gap record.
    pub gaps: Vec<StoredGap>,
}

/// Reads a buffer directory read-only: for operators' tools and tests.
pub fn inspect(dir: &Path, map_size: u64) -> Result<Inspection, BufferError> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(map_size as usize).max_dbs(8);
    // SAFETY: READ_ONLY never writes; LMDB's lock file coordinates with a running writer.
    unsafe {
        options.flags(EnvFlags::READ_ONLY);
    }
    // SAFETY: as in `Buffer::open`.
    let env = unsafe { options.open(dir) }?;
    let rtxn = env.read_txn()?;
    let (events, gaps, meta, qos2) = env
        .open_databases_and_commit(rtxn, |dbo, rtxn| -> Result<_, BufferError> {
            let open = |name: &str| -> Result<Database<Bytes, Bytes>, BufferError> {
                dbo.open_database(rtxn, Some(name))?
                    .ok_or_else(|| BufferError::Corrupt(format!("database {name} missing")))
            };
            Ok(CommitOrAbort::<_, ()>::Commit((
                open("events")?,
                open("gaps")?,
                open("meta")?,
                open("qos2")?,
            )))
        })?
        .unwrap_commit();
    let shared = Arc::new(Shared {
        env,
        events,
        gaps,
        meta,
        qos2,
        metrics: Arc::new(EdgeMetrics::default()),
    });
    let reader = Reader {
        shared: shared.clone(),
    };
    let clean = {
        let rtxn = shared.env.read_txn()?;
        match shared.meta.get(&rtxn, META_KEY)? {
            Some(b) => decode::<Meta>(b, "meta")?.mark == RunMark::Clean,
            None => return Err(BufferError::Corrupt("meta record missing".into())),
        }
    };
    Ok(Inspection {
        state: reader.state()?,
        clean,
        events: reader.read(None, usize::MAX)?,
        gaps: reader.gaps()?,
    })
}
