//! The node's durable event log (LMDB via heed).
//!
//! # Format (format version 2)
//!
//! One environment in `data_dir/log`:
//! - `log`: node seq (u64 BE) → postcard [`Record`] (an event with its identity and ingest
//!   time, or a gap record). Node seqs are ingest order and never reused; ingest time never
//!   goes backwards (max(previous, now)), so a start time is a binary search.
//! - `held`: `origin ‖ 0 ‖ epoch (BE)` → postcard [`RangeSet`] of the seqs this log holds.
//! - `lost`: same key → [`RangeSet`] of seqs known lost (gap records by range).
//! - `gapseen`: `origin ‖ 0 ‖ epoch ‖ after ‖ ts_us` → empty: unsequenced gaps already stored.
//! - `meta`: `"meta"` → postcard `Meta` (format, node id, incarnation, next node seq, last
//!   ingest time).
//! - `upstreams`: a `[[replicate]]` entry's `from` → postcard [`UpstreamCursor`], written in
//!   the transaction of the records it covers.
//! - `notsel`: same key as `held` → [`RangeSet`] of seqs a filtered replication skipped.
//!
//! Every record carries its path: the nodes (id, incarnation) that stored it before this one
//! (empty for events from an uplink), so replication never sends an event back to a node
//! that stored it.
//!
//! # Invariants
//! - One writer thread; ingests are grouped into one transaction and answered only after it
//!   commits (synced per `sync`): an acknowledged batch is durable.
//! - Dedupe is exact and has no window: an event is stored only if its seq is not in `held`
//!   for its (origin, epoch), and `held` is updated in the same transaction.
//! - A failed commit poisons the writer: later ingests are refused with the error.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use telemesh_proto::frame::DeadLetter;
use telemesh_proto::replication::{Hop, NotSelected, Replicated, ReplicatedItem, UpstreamCursor};
use telemesh_proto::{Event, Gap, GapKind, RangeSet};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

type Db = Database<'static, Bytes, Bytes>;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: u32,
    node_id: String,
    incarnation: u64,
    next_seq: u64,
    last_ingest_us: u64,
    /// Bytes of the records in `log` (values), for retention by size.
    bytes: u64,
    /// The next dead letter's number.
    next_dead: u64,
}

/// When commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sync {
    /// Every commit syncs.
    Always,
    /// The OS decides (NO_SYNC); used for `interval` with a periodic sync.
    Interval,
    /// The OS decides.
    None,
}

/// What one ingest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestOutcome {
    /// Events newly stored.
    pub stored: u64,
    /// Events already held (dropped as duplicates).
    pub duplicates: u64,
    /// Gap records newly stored.
    pub gaps: u64,
}

/// The writer's answer when the LMDB map is full (nothing of the group was written).
pub const STORAGE_FULL: &str = "log full";

/// A submitted batch's outcome, reported after its commit.
pub type Pending = oneshot::Receiver<Result<IngestOutcome, String>>;

/// Waits for a submitted batch's commit.
pub async fn wait_commit(rx: Pending) -> Result<IngestOutcome, LogError> {
    rx.await
        .map_err(|_| LogError::Writer("stopped".into()))?
        .map_err(LogError::Writer)
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// LMDB failed.
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
    /// A record could not be decoded.
    #[error("corrupt log record: {0}")]
    Corrupt(String),
    /// The directory belongs to another node or format.
    #[error("{0}")]
    Mismatch(String),
    /// The writer failed or stopped.
    #[error("log writer: {0}")]
    Writer(String),
    /// The directory could not be created.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    env: Env<WithoutTls>,
    log: Db,
    held: Db,
    lost: Db,
    gapseen: Db,
    meta: Db,
    cursors: Db,
    /// Dead letters: counter (u64 BE) → postcard [`DeadLetter`]; at most [`MAX_DEAD_LETTERS`].
    dead: Db,
    /// `origin ‖ 0 ‖ epoch` → [`RangeSet`] of seqs refused.
    rejected: Db,
    /// Replication cursors by upstream address.
    upstreams: Db,
    /// `origin ‖ 0 ‖ epoch` → [`RangeSet`] of seqs not selected by a filtered replication.
    notsel: Db,
}

/// How many refused events the dead-letter store keeps (the oldest go first).
pub const MAX_DEAD_LETTERS: u64 = 10_000;

enum Cmd {
    Ingest {
        origin: String,
        epoch: u64,
        events: Vec<Event>,
        gaps: Vec<Gap>,
        rejected: Vec<DeadLetter>,
        reply: oneshot::Sender<Result<IngestOutcome, String>>,
    },
    /// Store records replicated from an upstream with its cursor.
    Replica(
        Box<ReplicaBatch>,
        oneshot::Sender<Result<IngestOutcome, String>>,
    ),
    /// Store a durable consumer's cursor (batched into the next commit).
    Cursor {
        key: Vec<u8>,
        cursor: Cursor,
        reply: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Mark a durable consumer as seen now (when its connection ends).
    Touch {
        key: Vec<u8>,
    },
    /// Delete durable consumers last seen before `before_us`, except those in `keep`.
    Expire {
        before_us: u64,
        keep: HashSet<Vec<u8>>,
        reply: oneshot::Sender<Result<Vec<Vec<u8>>, String>>,
    },
    /// Delete the oldest records: those ingested before `min_ingest_us`, and as many more as
    /// needed to bring the log to `max_bytes`; at most `chunk` records per transaction.
    Retain {
        min_ingest_us: u64,
        max_bytes: u64,
        chunk: usize,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Stop,
}

/// Records replicated from an upstream, stored in one transaction with its cursor.
#[derive(Debug)]
pub struct ReplicaBatch {
    /// The `[[replicate]]` entry's `from`: the key of the cursor.
    pub from: String,
    /// The cursor after these records.
    pub cursor: UpstreamCursor,
    /// The records, in the upstream's order; each is stored with the upstream appended to
    /// its path.
    pub records: Vec<Replicated>,
    /// Seqs the filters did not select.
    pub not_selected: Vec<NotSelected>,
    /// Records refused here (too large, invalid topic): kept as dead letters.
    pub rejected: Vec<DeadLetter>,
    /// Upstream node seqs deleted by its retention before they were read.
    pub truncated: Option<(u64, u64)>,
}

/// The completeness view of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completeness {
    /// Per (origin, epoch): held, lost and rejected seqs.
    pub origins: Vec<telemesh_proto::frame::OriginStatus>,
    /// Durable consumers.
    pub consumers: Vec<telemesh_proto::frame::ConsumerStatus>,
    /// The newest dead letters (at most 100).
    pub dead_letters: Vec<DeadLetter>,
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

/// The node's log: ingest through [`NodeLog::ingest`], read through [`NodeLog::read`], follow
/// commits through [`NodeLog::committed`].
pub struct NodeLog {
    /// Why the writer stopped, if it did.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    shared: Arc<Shared>,
    tx: flume::Sender<Cmd>,
    writer: Option<JoinHandle<()>>,
    committed: watch::Receiver<u64>,
    node_id: String,
    incarnation: u64,
}

impl std::fmt::Debug for NodeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLog")
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

fn origin_key(origin: &str, epoch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(origin.len() + 9);
    k.extend_from_slice(origin.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("in-memory postcard encoding cannot fail")
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

const META: &[u8] = b"meta";

impl NodeLog {
    /// Opens (or creates) the log of node `node_id` in `dir`.
    pub fn open(dir: &Path, node_id: &str, map_size: u64, sync: Sync) -> Result<NodeLog, LogError> {
        std::fs::create_dir_all(dir)?;
        let mut o = EnvOpenOptions::new().read_txn_without_tls();
        o.map_size(map_size as usize).max_dbs(12);
        if sync != Sync::Always {
            // SAFETY: NO_SYNC defers fsync to the OS or our force_sync; never WRITEMAP or
            // NO_META_SYNC.
            unsafe {
                o.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: the node's own directory, opened once per process.
        let env = unsafe { o.open(dir) }?;
        let wtxn = env.write_txn()?;
        let (log, held, lost, gapseen, meta, cursors, dead, rejected, upstreams, notsel) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_, heed::Error> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("log"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("held"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("lost"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("gapseen"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("meta"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("cursors"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("dead"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("rejected"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("upstreams"))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some("notsel"))?,
                )))
            })?
            .unwrap_commit();
        let shared = Arc::new(Shared {
            env,
            log,
            held,
            lost,
            gapseen,
            meta,
            cursors,
            dead,
            rejected,
            upstreams,
            notsel,
        });
        let mut wtxn = shared.env.write_txn()?;
        let meta = match shared.meta.get(&wtxn, META)? {
            Some(b) => {
                let m: Meta =
                    postcard::from_bytes(b).map_err(|e| LogError::Corrupt(e.to_string()))?;
                if m.format != FORMAT_VERSION {
                    return Err(LogError::Mismatch(format!(
                        "log format {} is not {FORMAT_VERSION}",
                        m.format
                    )));
                }
                if m.node_id != node_id {
                    return Err(LogError::Mismatch(format!(
                        "log in {} belongs to node {:?}, not {node_id:?}",
                        dir.display(),
                        m.node_id
                    )));
                }
                m
            }
            None => {
                let m = Meta {
                    format: FORMAT_VERSION,
                    node_id: node_id.to_owned(),
                    incarnation: rand::random::<u64>() >> 11,
                    next_seq: 1,
                    last_ingest_us: 0,
                    bytes: 0,
                    next_dead: 1,
                };
                shared.meta.put(&mut wtxn, META, &encode(&m))?;
                m
            }
        };
        wtxn.commit()?;
        shared.env.force_sync()?;
        let (committed_tx, committed) = watch::channel(meta.next_seq - 1);
        let incarnation = meta.incarnation;
        info!(node_id, incarnation, next_seq = meta.next_seq, "log open");
        let (tx, rx) = flume::bounded(4096);
        let ws = shared.clone();
        let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let wf = failure.clone();
        let writer = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                Writer {
                    shared: ws,
                    meta,
                    held: HashMap::new(),
                    lost: HashMap::new(),
                    failed: None,
                    failure: wf,
                    committed: committed_tx,
                    sync,
                    last_sync: Instant::now(),
                }
                .run(rx)
            })?;
        Ok(NodeLog {
            failure,
            shared,
            tx,
            writer: Some(writer),
            committed,
            node_id: node_id.to_owned(),
            incarnation,
        })
    }

    /// Why the writer stopped writing, if it did (for `/healthz`).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The log's incarnation: new whenever the log is created anew.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Stores a batch's events (deduplicated) and gaps; returns once committed.
    pub async fn ingest(
        &self,
        origin: String,
        epoch: u64,
        events: Vec<Event>,
        gaps: Vec<Gap>,
    ) -> Result<IngestOutcome, LogError> {
        let rx = self.submit(origin, epoch, events, gaps, Vec::new()).await?;
        wait_commit(rx).await
    }

    /// Queues a batch for the writer (in call order) and returns where its outcome will be
    /// reported once committed; see [`wait_commit`]. `rejected` are the batch's events the
    /// node refused on their own: they go to the dead-letter store in the same transaction.
    pub async fn submit(
        &self,
        origin: String,
        epoch: u64,
        events: Vec<Event>,
        gaps: Vec<Gap>,
        rejected: Vec<DeadLetter>,
    ) -> Result<Pending, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Ingest {
                origin,
                epoch,
                events,
                gaps,
                rejected,
                reply,
            })
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        Ok(rx)
    }

    /// The last committed node seq, as it changes.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Up to `max` records from node seq `from` (inclusive), in order.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Record)>, LogError> {
        let rtxn = self.shared.env.read_txn()?;
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .shared
            .log
            .range(&rtxn, &(Bound::Included(&start[..]), Bound::Unbounded))?
        {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            let mut seq = [0u8; 8];
            seq.copy_from_slice(k);
            let rec: Record =
                postcard::from_bytes(v).map_err(|e| LogError::Corrupt(e.to_string()))?;
            out.push((u64::from_be_bytes(seq), rec));
        }
        Ok(out)
    }

    /// Queues replicated records with their upstream cursor (one transaction); see
    /// [`wait_commit`].
    pub async fn submit_replica(&self, batch: ReplicaBatch) -> Result<Pending, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Replica(Box::new(batch), reply))
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        Ok(rx)
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

    /// Stores a durable consumer's cursor; returns once committed.
    pub async fn put_cursor(&self, key: Vec<u8>, cursor: Cursor) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Cursor {
                key,
                cursor,
                reply: Some(reply),
            })
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        rx.await
            .map_err(|_| LogError::Writer("stopped".into()))?
            .map_err(LogError::Writer)
    }

    /// Marks a durable consumer as seen now, without waiting (for a connection's end).
    pub fn touch_cursor(&self, key: Vec<u8>) {
        let _ = self.tx.try_send(Cmd::Touch { key });
    }

    /// Deletes the durable consumers last seen before `before_us`, except those in `keep`
    /// (connected now); returns the keys deleted.
    pub async fn expire_cursors(
        &self,
        before_us: u64,
        keep: HashSet<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Expire {
                before_us,
                keep,
                reply,
            })
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        rx.await
            .map_err(|_| LogError::Writer("stopped".into()))?
            .map_err(LogError::Writer)
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

    /// Applies retention: deletes records ingested before `min_ingest_us` and, oldest first,
    /// as many as needed to bring the log to `max_bytes`, in transactions of at most `chunk`
    /// records (ingest keeps going between them). Returns how many records it deleted. The
    /// held sets stay, so an event resent after its deletion is still recognised.
    pub async fn retain(
        &self,
        min_ingest_us: u64,
        max_bytes: u64,
        chunk: usize,
    ) -> Result<u64, LogError> {
        let mut total = 0;
        loop {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send_async(Cmd::Retain {
                    min_ingest_us,
                    max_bytes,
                    chunk,
                    reply,
                })
                .await
                .map_err(|_| LogError::Writer("stopped".into()))?;
            let n = rx
                .await
                .map_err(|_| LogError::Writer("stopped".into()))?
                .map_err(LogError::Writer)?;
            total += n;
            if (n as usize) < chunk {
                return Ok(total);
            }
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

impl Drop for NodeLog {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    meta: Meta,
    held: HashMap<Vec<u8>, RangeSet>,
    lost: HashMap<Vec<u8>, RangeSet>,
    failed: Option<String>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    committed: watch::Sender<u64>,
    sync: Sync,
    last_sync: Instant,
}

impl Writer {
    fn run(mut self, rx: flume::Receiver<Cmd>) {
        let _span = tracing::info_span!("log_writer", node = %self.meta.node_id).entered();
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < 1024 {
                match rx.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            let stop = group.iter().any(|c| matches!(c, Cmd::Stop));
            self.commit(group);
            if stop {
                return;
            }
        }
    }

    fn commit(&mut self, group: Vec<Cmd>) {
        let mut replies = Vec::new();
        let mut batches = Vec::new();
        let mut cursors = Vec::new();
        let mut replicas = Vec::new();
        let mut replica_replies = Vec::new();
        let mut touches: Vec<Vec<u8>> = Vec::new();
        for c in group {
            match c {
                Cmd::Ingest {
                    origin,
                    epoch,
                    events,
                    gaps,
                    rejected,
                    reply,
                } => {
                    batches.push((origin, epoch, events, gaps, rejected));
                    replies.push(reply);
                }
                Cmd::Cursor { key, cursor, reply } => cursors.push((key, cursor, reply)),
                Cmd::Touch { key } => touches.push(key),
                Cmd::Expire {
                    before_us,
                    keep,
                    reply,
                } => {
                    let r = self.expire(before_us, &keep);
                    let _ = reply.send(r);
                }
                Cmd::Replica(batch, reply) => {
                    replicas.push(batch);
                    replica_replies.push(reply);
                }
                Cmd::Retain {
                    min_ingest_us,
                    max_bytes,
                    chunk,
                    reply,
                } => {
                    let r = self.retain(min_ingest_us, max_bytes, chunk);
                    let _ = reply.send(r);
                }
                Cmd::Stop => {}
            }
        }
        if batches.is_empty() && cursors.is_empty() && replicas.is_empty() && touches.is_empty() {
            return;
        }
        if let Some(f) = &self.failed {
            for r in replies.into_iter().chain(replica_replies) {
                let _ = r.send(Err(f.clone()));
            }
            for (_, _, r) in cursors {
                if let Some(r) = r {
                    let _ = r.send(Err(f.clone()));
                }
            }
            return;
        }
        let snapshot = self.meta.clone();
        let mut dirty: HashSet<Vec<u8>> = HashSet::new();
        let shared = self.shared.clone();
        let result = (|| -> Result<(Vec<IngestOutcome>, Vec<IngestOutcome>), heed::Error> {
            let mut wtxn = shared.env.write_txn()?;
            let mut outcomes = Vec::new();
            for (origin, epoch, events, gaps, rejected) in &batches {
                outcomes.push(self.apply(&mut wtxn, origin, *epoch, events, gaps, &mut dirty)?);
                self.dead_letters(&mut wtxn, origin, *epoch, rejected)?;
            }
            let mut replica_outcomes = Vec::new();
            for batch in &replicas {
                replica_outcomes.push(self.apply_replica(&mut wtxn, batch, &mut dirty)?);
            }
            for (key, cursor, _) in &cursors {
                shared.cursors.put(&mut wtxn, key, &encode(cursor))?;
            }
            let now = now_us();
            for key in &touches {
                let cursor: Option<Cursor> = shared
                    .cursors
                    .get(&wtxn, key)?
                    .and_then(|b| postcard::from_bytes(b).ok());
                if let Some(mut c) = cursor {
                    c.seen_us = now;
                    shared.cursors.put(&mut wtxn, key, &encode(&c))?;
                }
            }
            for key in &dirty {
                if let Some(set) = self.held.get(key) {
                    shared.held.put(&mut wtxn, key, &encode(set))?;
                }
                if let Some(set) = self.lost.get(key) {
                    shared.lost.put(&mut wtxn, key, &encode(set))?;
                }
            }
            shared.meta.put(&mut wtxn, META, &encode(&self.meta))?;
            wtxn.commit()?;
            if self.sync == Sync::Interval && self.last_sync.elapsed().as_millis() >= 100 {
                shared.env.force_sync()?;
                self.last_sync = Instant::now();
            }
            Ok((outcomes, replica_outcomes))
        })();
        match result {
            Ok((outcomes, replica_outcomes)) => {
                let _ = self.committed.send(self.meta.next_seq - 1);
                for (r, o) in replies.into_iter().zip(outcomes) {
                    let _ = r.send(Ok(o));
                }
                for (r, o) in replica_replies.into_iter().zip(replica_outcomes) {
                    let _ = r.send(Ok(o));
                }
                for (_, _, r) in cursors {
                    if let Some(r) = r {
                        let _ = r.send(Ok(()));
                    }
                }
            }
            Err(e) => {
                // Forget cached sets this transaction touched: they will be reloaded.
                for k in &dirty {
                    self.held.remove(k);
                    self.lost.remove(k);
                }
                self.meta = snapshot;
                let full = matches!(e, heed::Error::Mdb(heed::MdbError::MapFull));
                let why = if full {
                    // Nothing was written; retention (or a larger map) makes room again.
                    warn!("log full: batches are refused until retention frees room");
                    STORAGE_FULL.to_owned()
                } else {
                    let why = e.to_string();
                    error!(error = %why, "log commit failed: the writer stops writing");
                    self.failed = Some(why.clone());
                    if let Ok(mut f) = self.failure.lock() {
                        *f = Some(why.clone());
                    }
                    why
                };
                for r in replies.into_iter().chain(replica_replies) {
                    let _ = r.send(Err(why.clone()));
                }
                for (_, _, r) in cursors {
                    if let Some(r) = r {
                        let _ = r.send(Err(why.clone()));
                    }
                }
            }
        }
    }

    /// Deletes durable consumers last seen before `before_us`, except `keep`.
    fn expire(&mut self, before_us: u64, keep: &HashSet<Vec<u8>>) -> Result<Vec<Vec<u8>>, String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let shared = self.shared.clone();
        (|| -> Result<Vec<Vec<u8>>, heed::Error> {
            let mut wtxn = shared.env.write_txn()?;
            let mut old = Vec::new();
            for item in shared.cursors.iter(&wtxn)? {
                let (k, v) = item?;
                let seen = postcard::from_bytes::<Cursor>(v).map_or(0, |c| c.seen_us);
                if seen < before_us && !keep.contains(k) {
                    old.push(k.to_vec());
                }
            }
            for k in &old {
                shared.cursors.delete(&mut wtxn, k)?;
            }
            if !old.is_empty() {
                wtxn.commit()?;
            }
            Ok(old)
        })()
        .map_err(|e| e.to_string())
    }

    /// One retention transaction (see [`NodeLog::retain`]).
    fn retain(&mut self, min_ingest_us: u64, max_bytes: u64, chunk: usize) -> Result<u64, String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let shared = self.shared.clone();
        let snapshot = self.meta.clone();
        let r = (|| -> Result<u64, heed::Error> {
            let mut wtxn = shared.env.write_txn()?;
            let mut deleted = 0u64;
            while (deleted as usize) < chunk {
                let Some((k, v)) = shared.log.first(&wtxn)? else {
                    break;
                };
                let rec: Option<Record> = postcard::from_bytes(v).ok();
                let old = rec.as_ref().is_some_and(|r| r.ingest_us() < min_ingest_us);
                if !old && self.meta.bytes <= max_bytes {
                    break;
                }
                let key = k.to_vec();
                let len = v.len() as u64;
                shared.log.delete(&mut wtxn, &key)?;
                self.meta.bytes = self.meta.bytes.saturating_sub(len);
                deleted += 1;
            }
            if deleted > 0 {
                shared.meta.put(&mut wtxn, META, &encode(&self.meta))?;
                wtxn.commit()?;
            }
            Ok(deleted)
        })();
        r.map_err(|e| {
            self.meta = snapshot;
            e.to_string()
        })
    }

    /// Appends one record at the next node seq.
    fn append_record(&mut self, wtxn: &mut RwTxn, rec: &Record) -> Result<(), heed::Error> {
        let seq = self.meta.next_seq;
        self.meta.next_seq += 1;
        let value = encode(rec);
        self.meta.bytes += value.len() as u64;
        self.shared
            .log
            .put_with_flags(wtxn, PutFlags::APPEND, &seq.to_be_bytes(), &value)
    }

    /// Stores refused events in the bounded dead-letter store and the rejected range sets.
    fn dead_letters(
        &mut self,
        wtxn: &mut RwTxn,
        origin: &str,
        epoch: u64,
        rejected: &[DeadLetter],
    ) -> Result<(), heed::Error> {
        if rejected.is_empty() {
            return Ok(());
        }
        let key = origin_key(origin, epoch);
        let mut set: RangeSet = match self.shared.rejected.get(wtxn, &key)? {
            Some(b) => postcard::from_bytes(b).unwrap_or_default(),
            None => RangeSet::new(),
        };
        for d in rejected {
            set.insert(d.seq);
            let n = self.meta.next_dead;
            self.meta.next_dead += 1;
            self.shared.dead.put(wtxn, &n.to_be_bytes(), &encode(d))?;
            if n > MAX_DEAD_LETTERS {
                self.shared
                    .dead
                    .delete(wtxn, &(n - MAX_DEAD_LETTERS).to_be_bytes())?;
            }
        }
        self.shared.rejected.put(wtxn, &key, &encode(&set))
    }

    fn set<'a>(
        cache: &'a mut HashMap<Vec<u8>, RangeSet>,
        db: Db,
        wtxn: &RwTxn,
        key: &[u8],
    ) -> Result<&'a mut RangeSet, heed::Error> {
        if !cache.contains_key(key) {
            let set = match db.get(wtxn, key)? {
                Some(b) => postcard::from_bytes(b).unwrap_or_default(),
                None => RangeSet::new(),
            };
            cache.insert(key.to_vec(), set);
        }
        Ok(cache.get_mut(key).expect("inserted above"))
    }

    fn apply(
        &mut self,
        wtxn: &mut RwTxn,
        origin: &str,
        epoch: u64,
        events: &[Event],
        gaps: &[Gap],
        dirty: &mut HashSet<Vec<u8>>,
    ) -> Result<IngestOutcome, heed::Error> {
        let key = origin_key(origin, epoch);
        let ingest_us = self.ingest_time();
        let mut out = IngestOutcome::default();
        let at = Place {
            key: &key,
            origin,
            epoch,
            ingest_us,
            path: &[],
        };
        for ev in events {
            self.store_event(wtxn, &at, ev, dirty, &mut out)?;
        }
        for gap in gaps {
            self.store_gap(wtxn, &at, gap, dirty, &mut out)?;
        }
        Ok(out)
    }

    fn ingest_time(&mut self) -> u64 {
        let ingest_us = now_us().max(self.meta.last_ingest_us);
        self.meta.last_ingest_us = ingest_us;
        ingest_us
    }

    /// Stores replicated records (deduplicated, each with the upstream appended to its path),
    /// the not-selected ranges, a truncation as a gap record, and the cursor.
    fn apply_replica(
        &mut self,
        wtxn: &mut RwTxn,
        batch: &ReplicaBatch,
        dirty: &mut HashSet<Vec<u8>>,
    ) -> Result<IngestOutcome, heed::Error> {
        let ingest_us = self.ingest_time();
        let hop: Hop = (batch.cursor.node_id.clone(), batch.cursor.incarnation);
        let mut out = IngestOutcome::default();
        let mut path = Vec::new();
        for r in &batch.records {
            let key = origin_key(&r.origin, r.epoch);
            path.clear();
            path.extend(r.path.iter().cloned());
            path.push(hop.clone());
            let at = Place {
                key: &key,
                origin: &r.origin,
                epoch: r.epoch,
                ingest_us,
                path: &path,
            };
            match &r.item {
                ReplicatedItem::Event(ev) => self.store_event(wtxn, &at, ev, dirty, &mut out)?,
                ReplicatedItem::Gap(gap) => self.store_gap(wtxn, &at, gap, dirty, &mut out)?,
            }
        }
        for d in &batch.rejected {
            self.dead_letters(wtxn, &d.origin, d.epoch, std::slice::from_ref(d))?;
        }
        for n in &batch.not_selected {
            let key = origin_key(&n.origin, n.epoch);
            let mut set: RangeSet = match self.shared.notsel.get(wtxn, &key)? {
                Some(b) => postcard::from_bytes(b).unwrap_or_default(),
                None => RangeSet::new(),
            };
            if !set.contains_range(n.first, n.last) {
                set.insert_range(n.first, n.last);
                self.shared.notsel.put(wtxn, &key, &encode(&set))?;
            }
        }
        if let Some((first, last)) = batch.truncated {
            // Lost for this replica: a gap record under the upstream's id, in its node seqs.
            let gap = Gap {
                kind: GapKind::Range { first, last },
                reason: telemesh_proto::GapReason::Retention,
                ts_us: ingest_us,
            };
            let (origin, epoch) = (&batch.cursor.node_id, batch.cursor.incarnation);
            let key = origin_key(origin, epoch);
            let at = Place {
                key: &key,
                origin,
                epoch,
                ingest_us,
                path: &[],
            };
            self.store_gap(wtxn, &at, &gap, dirty, &mut out)?;
        }
        self.shared
            .upstreams
            .put(wtxn, batch.from.as_bytes(), &encode(&batch.cursor))?;
        Ok(out)
    }

    fn store_event(
        &mut self,
        wtxn: &mut RwTxn,
        at: &Place,
        ev: &Event,
        dirty: &mut HashSet<Vec<u8>>,
        out: &mut IngestOutcome,
    ) -> Result<(), heed::Error> {
        let held = Self::set(&mut self.held, self.shared.held, wtxn, at.key)?;
        if !held.insert(ev.seq) {
            out.duplicates += 1;
            return Ok(());
        }
        mark_dirty(dirty, at.key);
        let rec = Record::Event {
            origin: at.origin.to_owned(),
            epoch: at.epoch,
            ingest_us: at.ingest_us,
            event: ev.clone(),
            path: at.path.to_vec(),
        };
        self.append_record(wtxn, &rec)?;
        out.stored += 1;
        Ok(())
    }

    fn store_gap(
        &mut self,
        wtxn: &mut RwTxn,
        at: &Place,
        gap: &Gap,
        dirty: &mut HashSet<Vec<u8>>,
        out: &mut IngestOutcome,
    ) -> Result<(), heed::Error> {
        let key = at.key;
        let fresh = match gap.kind {
            GapKind::Range { first, last } => {
                let lost = Self::set(&mut self.lost, self.shared.lost, wtxn, key)?;
                let new = !lost.contains_range(first, last);
                lost.insert_range(first, last);
                new
            }
            GapKind::Unsequenced { after, .. } => {
                let mut k = key.to_vec();
                k.extend_from_slice(&after.to_be_bytes());
                k.extend_from_slice(&gap.ts_us.to_be_bytes());
                let seen = self.shared.gapseen.get(wtxn, &k)?.is_some();
                if !seen {
                    self.shared.gapseen.put(wtxn, &k, &[])?;
                }
                !seen
            }
        };
        if !fresh {
            return Ok(());
        }
        mark_dirty(dirty, key);
        let rec = Record::Gap {
            origin: at.origin.to_owned(),
            epoch: at.epoch,
            ingest_us: at.ingest_us,
            gap: gap.clone(),
            path: at.path.to_vec(),
        };
        self.append_record(wtxn, &rec)?;
        out.gaps += 1;
        Ok(())
    }
}

/// Where a record goes: its origin and epoch (and their key), ingest time and path.
struct Place<'a> {
    key: &'a [u8],
    origin: &'a str,
    epoch: u64,
    ingest_us: u64,
    path: &'a [Hop],
}

/// Marks a range-set key as written in this transaction (allocating only the first time).
fn mark_dirty(dirty: &mut HashSet<Vec<u8>>, key: &[u8]) {
    if !dirty.contains(key) {
        dirty.insert(key.to_vec());
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
