//! Reads of the committed log: records from a node seq, cursors, positions by time, and
//! the completeness view (held, lost, rejected and not-selected seqs per origin and epoch).
//! Read transactions are short and never held across an `.await`.

use std::ops::Bound;
use std::path::Path;

use super::format::{origin_key, Cursor, Db, Record};
use super::{Completeness, LogError, NodeLog};
use heed::types::Bytes;
use heed::{CommitOrAbort, EnvFlags, EnvOpenOptions};
use telemesh_proto::replication::UpstreamCursor;
use telemesh_proto::RangeSet;

impl NodeLog {
    /// Up to `max` records from node seq `from` (inclusive), in order.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Record)>, LogError> {
        self.read_within(from, max, usize::MAX)
    }

    /// [`NodeLog::read`], stopping once the records read hold `max_bytes` (as stored; the
    /// first record is always read): what one subscription round holds in memory.
    pub fn read_within(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Record)>, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self
            .shared
            .log
            .range(&rtxn, &(Bound::Included(&start[..]), Bound::Unbounded))?
        {
            if out.len() >= max || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            let (k, v) = item?;
            let seq: [u8; 8] = k
                .try_into()
                .map_err(|_| LogError::Corrupt(format!("log key of {} bytes", k.len())))?;
            bytes = bytes.saturating_add(v.len());
            let rec: Record =
                postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?;
            out.push((u64::from_be_bytes(seq), rec));
        }
        Ok(out)
    }

    /// The stored cursor of the upstream at `from`.
    pub fn upstream_cursor(&self, from: &str) -> Result<Option<UpstreamCursor>, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        match self.shared.upstreams.get(&rtxn, from.as_bytes())? {
            Some(b) => Ok(Some(
                postcard::from_bytes(b).map_err(|e| LogError::Corrupt(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// A durable consumer's stored cursor.
    pub fn cursor(&self, key: &[u8]) -> Result<Option<Cursor>, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        match self.shared.cursors.get(&rtxn, key)? {
            Some(b) => Ok(Some(
                postcard::from_bytes(b).map_err(|e| LogError::Corrupt(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// The first node seq the log holds (1 until retention deletes anything).
    pub fn first_seq(&self) -> Result<u64, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        Ok(match self.shared.log.first(&rtxn)? {
            Some((k, _)) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(k);
                u64::from_be_bytes(b)
            }
            None => *self.committed.borrow() + 1,
        })
    }

    /// The first node seq ingested at or after `ts_us` (ingest time never goes backwards, so
    /// this is a binary search); one past the last when none is.
    pub fn seq_at_time(&self, ts_us: u64) -> Result<u64, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        let (mut lo, mut hi) = (self.first_seq()?, *self.committed.borrow() + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = match self.shared.log.get(&rtxn, &mid.to_be_bytes())? {
                Some(v) => postcard::from_bytes::<Record>(v)
                    .map_err(|e| LogError::Corrupt(e.to_string()))?
                    .ingest_us(),
                None => 0,
            };
            if t < ts_us {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The completeness view: per (origin, epoch), the seqs held and known lost; and the
    /// durable consumers with what they acknowledged.
    pub fn completeness(&self) -> Result<Completeness, LogError> {
        use telemesh_proto::frame::{ConsumerStatus, OriginStatus};
        let rtxn = self.shared.env.read_txn()?;
        let split = |k: &[u8]| -> Option<(String, u64)> {
            let at = k.iter().position(|&b| b == 0)?;
            let mut e = [0u8; 8];
            e.copy_from_slice(k.get(at + 1..at + 9)?);
            Some((
                String::from_utf8_lossy(&k[..at]).into_owned(),
                u64::from_be_bytes(e),
            ))
        };
        let mut map: std::collections::BTreeMap<(String, u64), OriginStatus> = Default::default();
        for (db, which) in [
            (self.shared.held, 0),
            (self.shared.lost, 1),
            (self.shared.rejected, 2),
            (self.shared.notsel, 3),
        ] {
            for item in db.iter(&rtxn)? {
                let (k, v) = item?;
                let Some((origin, epoch)) = split(k) else {
                    continue;
                };
                let set: RangeSet =
                    postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?;
                let entry = map
                    .entry((origin.clone(), epoch))
                    .or_insert_with(|| OriginStatus {
                        origin,
                        epoch,
                        held: Vec::new(),
                        lost: Vec::new(),
                        rejected: Vec::new(),
                        not_selected: Vec::new(),
                    });
                let ranges: Vec<(u64, u64)> =
                    set.ranges().map(|r| (*r.start(), *r.end())).collect();
                match which {
                    0 => entry.held = ranges,
                    1 => entry.lost = ranges,
                    2 => entry.rejected = ranges,
                    _ => entry.not_selected = ranges,
                }
            }
        }
        let mut consumers = Vec::new();
        for item in self.shared.cursors.iter(&rtxn)? {
            let (k, v) = item?;
            let Some(at) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let c: Cursor =
                postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?;
            consumers.push(ConsumerStatus {
                identity: String::from_utf8_lossy(&k[..at]).into_owned(),
                name: String::from_utf8_lossy(&k[at + 1..]).into_owned(),
                acked: c.acked,
            });
        }
        let mut dead_letters = Vec::new();
        for item in self.shared.dead.rev_iter(&rtxn)?.take(100) {
            let (_, v) = item?;
            dead_letters
                .push(postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?);
        }
        dead_letters.reverse();
        Ok(Completeness {
            origins: map.into_values().collect(),
            consumers,
            dead_letters,
        })
    }

    /// The seqs held for (origin, epoch).
    pub fn held(&self, origin: &str, epoch: u64) -> Result<RangeSet, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        Ok(
            match self.shared.held.get(&rtxn, &origin_key(origin, epoch))? {
                Some(b) => postcard::from_bytes(b).map_err(|e| LogError::Corrupt(e.to_string()))?,
                None => RangeSet::new(),
            },
        )
    }
}

/// Reads a log directory read-only (another process may be running the node): every record,
/// in node seq order. For operators' tools and tests.
pub fn inspect(dir: &Path, map_size: u64) -> Result<Vec<(u64, Record)>, LogError> {
    let mut o = EnvOpenOptions::new().read_txn_without_tls();
    o.map_size(map_size as usize).max_dbs(12);
    // SAFETY: READ_ONLY never writes; LMDB's lock file coordinates with a running writer.
    unsafe {
        o.flags(EnvFlags::READ_ONLY);
    }
    // SAFETY: as in `NodeLog::open`.
    let env = unsafe { o.open(dir) }?;
    let rtxn = env.read_txn()?;
    let log: Db = env
        .open_databases_and_commit(rtxn, |dbo, rtxn| -> Result<_, LogError> {
            let db = dbo
                .open_database::<Bytes, Bytes>(rtxn, Some("log"))?
                .ok_or_else(|| LogError::Corrupt("log database missing".into()))?;
            Ok(CommitOrAbort::<_, ()>::Commit(db))
        })?
        .unwrap_commit();
    let rtxn = env.read_txn()?;
    let mut out = Vec::new();
    for item in log.iter(&rtxn)? {
        let (k, v) = item?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(k);
        let rec: Record = postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?;
        out.push((u64::from_be_bytes(seq), rec));
    }
    Ok(out)
}
