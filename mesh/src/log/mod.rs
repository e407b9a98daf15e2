//! The node's durable event log (LMDB via heed).
//!
//! # Format (format version 2)
//!
//! One environment in `data_dir/log`:
//! - `log`: node seq (u64 BE) → postcard [`Record`] (an event with its identity and ingest
//!   time, or a gap record). Node seqs are ingest order and never reused; ingest time never
//!   goes backwards (max(previous, now)), so a start time is a binary search.
//! - `held`: `origin ‖ 0 ‖ epoch (BE)` → postcard [`RangeSet`](telemesh_proto::RangeSet) of the seqs this log holds.
//! - `lost`: same key → [`RangeSet`](telemesh_proto::RangeSet) of seqs known lost (gap records by range).
//! - `gapseen`: `origin ‖ 0 ‖ epoch ‖ after ‖ ts_us` → empty: unsequenced gaps already stored.
//! - `meta`: `"meta"` → postcard `Meta` (format, node id, incarnation, next node seq, last
//!   ingest time).
//! - `upstreams`: a `[[replicate]]` entry's `from` → postcard [`UpstreamCursor`], written in
//!   the transaction of the records it covers.
//! - `notsel`: same key as `held` → [`RangeSet`](telemesh_proto::RangeSet) of seqs a filtered replication skipped.
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

mod format;
mod read;
mod retention;
mod writer;

pub use format::{cursor_key, now_us, Cursor, Record, FORMAT_VERSION};
pub use read::inspect;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use format::{encode, Meta, Shared, META};
use heed::types::Bytes;
use heed::{CommitOrAbort, EnvFlags, EnvOpenOptions};
use serde::{Deserialize, Serialize};
use telemesh_proto::frame::DeadLetter;
use telemesh_proto::replication::{NotSelected, Replicated, ReplicatedItem, UpstreamCursor};
use telemesh_proto::{validate_name, ErrorCode, Event, Gap, MAX_SEQ};
use tokio::sync::{oneshot, watch};
use tracing::info;
use writer::{Cmd, Writer};

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
    /// The request holds something the log never stores (an invalid name, a seq or gap out
    /// of bounds, a key too long for LMDB); it was not queued.
    #[error("refused: {code} {reason}")]
    Refused {
        /// The stable code to answer with.
        code: ErrorCode,
        /// Why.
        reason: String,
    },
}

/// How many refused events the dead-letter store keeps (the oldest go first).
pub const MAX_DEAD_LETTERS: u64 = 10_000;

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

/// The node's log: ingest through [`NodeLog::ingest`], read through [`NodeLog::read`], follow
/// commits through [`NodeLog::committed`].
pub struct NodeLog {
    /// Why the writer stopped, if it did.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    shared: Arc<Shared>,
    tx: flume::Sender<Cmd>,
    /// Bytes of ingests and replica batches queued for the writer and not yet answered, at
    /// most [`MAX_QUEUED_BYTES`]: a sender waits for room (and stops reading its peer).
    queued: Arc<tokio::sync::Semaphore>,
    writer: Option<JoinHandle<()>>,
    committed: watch::Receiver<u64>,
    node_id: String,
    incarnation: u64,
    /// Epochs held per origin (see [`MAX_EPOCHS_PER_ORIGIN`]).
    epochs: std::sync::Mutex<HashMap<String, std::collections::HashSet<u64>>>,
}

impl std::fmt::Debug for NodeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLog")
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

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
        let (committed_tx, committed) = watch::channel(meta.next_seq.saturating_sub(1));
        let incarnation = meta.incarnation;
        info!(node_id, incarnation, next_seq = meta.next_seq, "log open");
        // The epochs held per origin, for the cap on new ones.
        let mut epochs: HashMap<String, std::collections::HashSet<u64>> = HashMap::new();
        {
            let rtxn = shared.env.read_txn()?;
            for item in shared.held.iter(&rtxn)? {
                let (k, _) = item?;
                let Some(at) = k.iter().position(|&b| b == 0) else {
                    continue;
                };
                let Ok(e) = <[u8; 8]>::try_from(&k[at + 1..]) else {
                    continue;
                };
                epochs
                    .entry(String::from_utf8_lossy(&k[..at]).into_owned())
                    .or_default()
                    .insert(u64::from_be_bytes(e));
            }
        }
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
            queued: Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_BYTES)),
            writer: Some(writer),
            committed,
            node_id: node_id.to_owned(),
            incarnation,
            epochs: std::sync::Mutex::new(epochs),
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
        check_origin(&origin, &events, &gaps)?;
        self.admit_epoch(&origin, epoch)?;
        let cost = events.iter().map(|e| e.size() + 64).sum::<usize>() + gaps.len() * 64;
        let room = self.room(cost).await?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Ingest {
                _room: room,
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

    /// Queues replicated records with their upstream cursor (one transaction); see
    /// [`wait_commit`].
    pub async fn submit_replica(&self, batch: ReplicaBatch) -> Result<Pending, LogError> {
        check_key("upstream", batch.from.as_bytes())?;
        for r in &batch.records {
            for (node, _) in &r.path {
                refuse_name("node id", node)?;
            }
            match &r.item {
                ReplicatedItem::Event(e) => check_origin(&r.origin, std::slice::from_ref(e), &[])?,
                ReplicatedItem::Gap(g) => check_origin(&r.origin, &[], std::slice::from_ref(g))?,
            }
        }
        for d in &batch.rejected {
            refuse_name("origin", &d.origin)?;
        }
        if let Some((first, last)) = batch.truncated {
            refuse_name("node id", &batch.cursor.node_id)?;
            if first == 0 || first > last {
                return Err(LogError::Refused {
                    code: ErrorCode::INVALID_GAP,
                    reason: format!("truncated range {first}..={last} is empty or reversed"),
                });
            }
        }
        let cost = batch
            .records
            .iter()
            .map(|r| match &r.item {
                ReplicatedItem::Event(e) => e.size() + 64,
                ReplicatedItem::Gap(_) => 64,
            })
            .sum::<usize>();
        let room = self.room(cost).await?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Replica {
                batch: Box::new(batch),
                reply,
                _room: room,
            })
            .await
            .map_err(|_| LogError::Writer("stopped".into()))?;
        Ok(rx)
    }

    /// Stores a durable consumer's cursor; returns once committed.
    pub async fn put_cursor(&self, key: Vec<u8>, cursor: Cursor) -> Result<(), LogError> {
        check_key("durable consumer", &key)?;
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

    /// Refuses a new epoch of an origin that has [`MAX_EPOCHS_PER_ORIGIN`] already: every
    /// epoch costs range sets in LMDB, a completeness entry and metric series, and an agent
    /// takes a new one only after an unclean stop.
    fn admit_epoch(&self, origin: &str, epoch: u64) -> Result<(), LogError> {
        let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        let held = epochs.entry(origin.to_owned()).or_default();
        if held.contains(&epoch) {
            return Ok(());
        }
        if held.len() >= MAX_EPOCHS_PER_ORIGIN {
            return Err(LogError::Refused {
                code: ErrorCode::LIMIT_EXCEEDED,
                reason: format!(
                    "origin {origin} has {MAX_EPOCHS_PER_ORIGIN} epochs already (a new one comes with each unclean start of its agent)"
                ),
            });
        }
        held.insert(epoch);
        Ok(())
    }

    /// Waits for `bytes` of room in the writer's queue (a batch larger than the whole queue
    /// takes all of it); the room is given back when the writer has answered.
    async fn room(&self, bytes: usize) -> Result<tokio::sync::OwnedSemaphorePermit, LogError> {
        let n = bytes.clamp(1, MAX_QUEUED_BYTES) as u32;
        self.queued
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| LogError::Writer("stopped".into()))
    }

    /// Marks a durable consumer as seen now, without waiting (for a connection's end).
    pub fn touch_cursor(&self, key: Vec<u8>) {
        if check_key("durable consumer", &key).is_err() {
            return;
        }
        let _ = self.tx.try_send(Cmd::Touch { key });
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

/// Epochs of one origin a node takes from uplinks, at most.
pub const MAX_EPOCHS_PER_ORIGIN: usize = 10_000;

/// Bytes of ingests and replica batches the writer's queue holds at most.
pub const MAX_QUEUED_BYTES: usize = 256 << 20;

/// The longest key LMDB stores (MDB_MAXKEYSIZE, as lmdb-master-sys is built).
pub const MAX_KEY_BYTES: usize = 511;

fn check_key(what: &str, key: &[u8]) -> Result<(), LogError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(LogError::Refused {
            code: ErrorCode::INVALID_NAME,
            reason: format!(
                "{what} key of {} bytes is outside 1..={MAX_KEY_BYTES}",
                key.len()
            ),
        });
    }
    Ok(())
}

fn refuse_name(what: &str, name: &str) -> Result<(), LogError> {
    validate_name(what, name).map_err(|reason| LogError::Refused {
        code: ErrorCode::INVALID_NAME,
        reason,
    })
}

/// What the writer will put in keys and range sets, checked before the command is queued.
fn check_origin(origin: &str, events: &[Event], gaps: &[Gap]) -> Result<(), LogError> {
    refuse_name("origin", origin)?;
    if let Some(e) = events.iter().find(|e| e.seq == 0 || e.seq > MAX_SEQ) {
        return Err(LogError::Refused {
            code: ErrorCode::INVALID_SEQ,
            reason: format!("seq {} is outside 1..={MAX_SEQ}", e.seq),
        });
    }
    if let Some(reason) = gaps.iter().find_map(|g| g.validate().err()) {
        return Err(LogError::Refused {
            code: ErrorCode::INVALID_GAP,
            reason,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            topic: "site/t".into(),
            payload: b"x".to_vec(),
            ts_us: seq,
            qos: 1,
            headers: None,
        }
    }

    /// A command LMDB refuses (here a cursor key past MDB_MAXKEYSIZE, sent to the writer
    /// without the API's check) fails alone: the writer answers it with the error, keeps
    /// no failure, and stores the next batch.
    #[tokio::test]
    async fn a_command_lmdb_refuses_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::None).unwrap();
        let (reply, rx) = oneshot::channel();
        log.tx
            .send_async(Cmd::Cursor {
                key: vec![b'x'; 600],
                cursor: Cursor {
                    filters: vec!["#".into()],
                    acked: 0,
                    seen_us: 0,
                },
                reply: Some(reply),
            })
            .await
            .unwrap();
        let why = rx.await.unwrap().unwrap_err();
        assert!(why.contains("refused by storage"), "{why}");
        assert_eq!(log.failure(), None, "the writer keeps writing");
        let stored = log
            .ingest("gw-1".into(), 7, (1..=10).map(event).collect(), vec![])
            .await
            .unwrap();
        assert_eq!(stored.stored, 10);
        // Through the API the same key is refused before it is queued.
        let err = log
            .put_cursor(
                vec![b'x'; 600],
                Cursor {
                    filters: vec![],
                    acked: 0,
                    seen_us: 0,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, LogError::Refused { code, .. } if code == ErrorCode::INVALID_NAME));
    }

    #[tokio::test]
    async fn origins_seqs_and_gaps_that_cannot_be_stored_are_refused_before_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(dir.path(), "node-a", 64 << 20, Sync::None).unwrap();
        let long = "o".repeat(600);
        let cases: Vec<(String, Vec<Event>, Vec<Gap>, ErrorCode)> = vec![
            (long, vec![event(1)], vec![], ErrorCode::INVALID_NAME),
            (
                "gw-1".into(),
                vec![event(0)],
                vec![],
                ErrorCode::INVALID_SEQ,
            ),
            (
                "gw-1".into(),
                vec![event(u64::MAX)],
                vec![],
                ErrorCode::INVALID_SEQ,
            ),
            (
                "gw-1".into(),
                vec![],
                vec![Gap {
                    kind: telemesh_proto::GapKind::Range {
                        first: 0,
                        last: u64::MAX,
                    },
                    reason: telemesh_proto::GapReason::Evicted,
                    ts_us: 0,
                }],
                ErrorCode::INVALID_GAP,
            ),
        ];
        for (origin, events, gaps, want) in cases {
            let err = log
                .submit(origin, 1, events, gaps, vec![])
                .await
                .unwrap_err();
            assert!(
                matches!(&err, LogError::Refused { code, .. } if *code == want),
                "{err}"
            );
        }
        assert_eq!(log.failure(), None);
        assert_eq!(
            log.ingest("gw-1".into(), 1, vec![event(1)], vec![])
                .await
                .unwrap()
                .stored,
            1
        );
    }

    #[tokio::test]
    async fn an_origin_gets_at_most_max_epochs_per_origin_and_keeps_them_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = NodeLog::open(dir.path(), "node-a", 256 << 20, Sync::None).unwrap();
            let mut pending = Vec::new();
            for epoch in 1..=MAX_EPOCHS_PER_ORIGIN as u64 {
                pending.push(
                    log.submit("gw-1".into(), epoch, vec![event(1)], vec![], vec![])
                        .await
                        .unwrap(),
                );
            }
            for p in pending {
                wait_commit(p).await.unwrap();
            }
            let err = log
                .submit("gw-1".into(), 999_999, vec![event(1)], vec![], vec![])
                .await
                .unwrap_err();
            assert!(
                matches!(&err, LogError::Refused { code, .. } if *code == ErrorCode::LIMIT_EXCEEDED),
                "{err}"
            );
            // Known epochs and other origins go on.
            log.ingest("gw-1".into(), 7, vec![event(2)], vec![])
                .await
                .unwrap();
            log.ingest("gw-2".into(), 999_999, vec![event(1)], vec![])
                .await
                .unwrap();
        }
        let log = NodeLog::open(dir.path(), "node-a", 256 << 20, Sync::None).unwrap();
        assert!(log
            .submit("gw-1".into(), 1_000_001, vec![event(1)], vec![], vec![])
            .await
            .is_err());
    }
}
