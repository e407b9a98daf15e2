//! The edge buffer: every event the agent takes in, in LMDB, until a node acknowledges it.
//!
//! # Format (format version 1)
//!
//! One LMDB environment in `data_dir/buffer`, three databases:
//!
//! - `events`: key `epoch (u64 BE) ‖ seq (u64 BE)` → postcard [`Event`]. Keys only grow:
//!   seqs grow within an epoch and every new epoch is larger than the last, so appends use
//!   `MDB_APPEND` and iteration order is arrival order.
//! - `gaps`: key `epoch ‖ position ‖ gap id` (all u64 BE) → postcard [`Gap`]: events lost at
//!   the edge, ordered with the events by [`Gap::position`].
//! - `meta`: key `"meta"` → postcard [`Meta`]: origin, current epoch, next seq, the run mark,
//!   acked-through, the buffer's event and byte counts, the next gap id.
//!
//! # Invariants
//!
//! - One writer thread owns every write transaction; appends, trims and losses reach it
//!   through a bounded channel (a full channel blocks the sender: backpressure, not loss).
//! - Group commit: the writer takes everything queued into one transaction and commits as
//!   soon as its previous commit is done; a transaction is closed after `commit_interval` or
//!   [`MAX_GROUP`] commands, whichever comes first.
//! - The run mark is written (and synced) as `Running` before the first append of a run and
//!   as `Clean` by [`Buffer::close`]. Opening a buffer whose mark says `Running` (a crash)
//!   starts a new epoch, so a seq is never reused for other content.
//! - `bytes` never exceeds `max_bytes` after a commit: the overflow policy evicts or refuses,
//!   and every event dropped is covered by a gap record written in the same transaction.
//! - A failed commit poisons the writer: it stops writing, counts what it cannot store as
//!   lost (`storage_failed`) and says so in its log; reads keep working.

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use telemesh_proto::{Event, Gap, GapKind, GapReason, Headers};
use tracing::{error, info, warn};

use crate::metrics::EdgeMetrics;

/// The on-disk format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The most commands one write transaction takes.
pub const MAX_GROUP: usize = 16_384;

/// LMDB's own cost per entry (node header, key, page slack) added to each event's accounting.
const ENTRY_OVERHEAD: u64 = 32;

type Db = Database<'static, Bytes, Bytes>;

/// What to do when an append would take the buffer past `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Evict the oldest unacknowledged events.
    DropOldest,
    /// Refuse the new events.
    DropNewest,
    /// The durable port stops reading; the broker port (which cannot wait) drops newest.
    Block,
}

/// When commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Every commit is synced before it counts as done.
    Always,
    /// Commits are synced every `sync_interval`.
    Interval,
    /// The operating system decides.
    None,
}

/// How a buffer behaves.
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// The most bytes its events may account for.
    pub max_bytes: u64,
    /// LMDB's map size; `max_bytes` must be at most 80% of it.
    pub map_size: u64,
    /// What happens when full.
    pub overflow: Overflow,
    /// When commits reach the disk.
    pub sync: SyncMode,
    /// With `sync = interval`, how often.
    pub sync_interval: Duration,
    /// The longest one write transaction stays open while commands keep arriving.
    pub commit_interval: Duration,
    /// Commands that may wait for the writer before senders block.
    pub queue: usize,
}

impl Default for BufferOptions {
    fn default() -> Self {
        BufferOptions {
            max_bytes: 1 << 30,
            map_size: 2 << 30,
            overflow: Overflow::DropOldest,
            sync: SyncMode::Always,
            sync_interval: Duration::from_millis(100),
            commit_interval: Duration::from_millis(5),
            queue: 65_536,
        }
    }
}

/// An event on its way into the buffer; the buffer gives it its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The MQTT topic name.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Edge receive time, µs since the Unix epoch.
    pub ts_us: u64,
    /// The QoS as seen.
    pub qos: u8,
    /// Headers, if any.
    pub headers: Option<Box<Headers>>,
}

/// An event as stored: its epoch and the event with its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The epoch it belongs to.
    pub epoch: u64,
    /// The event.
    pub event: Event,
}

/// A gap record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGap {
    /// The gap's id, increasing in the order gaps were recorded.
    pub id: u64,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// The record.
    pub gap: Gap,
}

/// Errors of the buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// LMDB failed.
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
    /// The directory could not be prepared.
    #[error("buffer directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A stored record could not be decoded.
    #[error("corrupt buffer record: {0}")]
    Corrupt(String),
    /// The buffer was written by another agent or format.
    #[error("{0}")]
    Mismatch(String),
    /// Options that cannot work.
    #[error("invalid buffer options: {0}")]
    Options(String),
    /// The writer stopped after a failed commit.
    #[error("buffer writer failed: {0}")]
    WriterFailed(String),
    /// The buffer is closed.
    #[error("buffer is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum RunMark {
    Running,
    Clean,
}

/// The buffer's bookkeeping, kept in one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    origin: String,
    epoch: u64,
    next_seq: u64,
    mark: RunMark,
    acked: Option<(u64, u64)>,
    events: u64,
    bytes: u64,
    next_gap_id: u64,
}

/// What `open` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// No buffer existed: a new one, with a new epoch.
    Fresh,
    /// The last run stopped cleanly: same epoch, seqs continue.
    Clean,
    /// The last run did not stop cleanly: a new epoch.
    Unclean,
}

/// The outcome of a durable append: its (epoch, seq), or why it was not stored.
pub type AppendResult = Result<(u64, u64), AppendError>;

/// Where a committed append is reported.
pub type CommitSender = tokio::sync::oneshot::Sender<AppendResult>;

/// Where a committed session change is reported.
pub type DoneSender = tokio::sync::oneshot::Sender<Result<(), AppendError>>;

/// Why an acknowledged append did not reach the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The buffer was full and the policy refused the event (recorded as a gap).
    #[error("buffer full: event refused")]
    Refused,
    /// The writer failed (disk full or failing); nothing more is stored.
    #[error("buffer writer failed: {0}")]
    Failed(String),
}

/// What the durable port attaches to an append.
#[derive(Debug, Default)]
pub struct Durable {
    /// Told once the event is committed (per `sync`).
    pub notify: Option<CommitSender>,
    /// For QoS 2: the (client id, packet id) to remember in the same transaction.
    pub qos2: Option<(String, u16)>,
}

enum Command {
    Append(Incoming, Option<Durable>),
    /// Forget a QoS 2 packet id (PUBREL), reporting once committed.
    Release {
        client: String,
        pkid: u16,
        notify: Option<DoneSender>,
    },
    /// Forget every QoS 2 packet id of a client (a clean session), reporting once committed.
    ClearSession {
        client: String,
        notify: Option<DoneSender>,
    },
    Lost {
        count: u64,
        reason: GapReason,
    },
    Trim {
        through: Option<(u64, u64)>,
        gap_ids: Vec<u64>,
    },
    Flush(SyncSender<Result<(), String>>),
    Close(SyncSender<Result<(), String>>),
    Abort,
}

struct Shared {
    env: Env<WithoutTls>,
    events: Db,
    gaps: Db,
    meta: Db,
    /// QoS 2 packet ids received and stored, per client: `client ‖ 0 ‖ pkid` → (epoch, seq).
    qos2: Db,
    metrics: Arc<EdgeMetrics>,
}

/// The durable edge buffer. Cheap to share through [`Buffer::handle`] and [`Buffer::reader`].
pub struct Buffer {
    shared: Arc<Shared>,
    tx: flume::Sender<Command>,
    writer: Option<JoinHandle<()>>,
    epoch: u64,
    start: StartKind,
    commits: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("epoch", &self.epoch)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// A sender of appends and losses to the writer, for the ingest paths.
#[derive(Clone)]
pub struct Handle {
    tx: flume::Sender<Command>,
    metrics: Arc<EdgeMetrics>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Queues an event; blocks while the writer's queue is full.
    pub fn append(&self, ev: Incoming) -> Result<(), BufferError> {
        self.metrics.events_in.fetch_add(1, Relaxed);
        self.metrics
            .bytes_in
            .fetch_add((ev.topic.len() + ev.payload.len()) as u64, Relaxed);
        self.tx
            .send(Command::Append(ev, None))
            .map_err(|_| BufferError::Closed)
    }

    /// Queues an event for the durable port; waits (asynchronously) while the writer's
    /// queue is full, which is what stops the port reading its sockets.
    pub async fn append_durable(&self, ev: Incoming, durable: Durable) -> Result<(), BufferError> {
        self.metrics.events_in.fetch_add(1, Relaxed);
        self.metrics
            .bytes_in
            .fetch_add((ev.topic.len() + ev.payload.len()) as u64, Relaxed);
        self.tx
            .send_async(Command::Append(ev, Some(durable)))
            .await
            .map_err(|_| BufferError::Closed)
    }

    /// Forgets a client's QoS 2 packet id (after PUBREL); `notify` hears of the commit.
    pub async fn release_qos2(
        &self,
        client: String,
        pkid: u16,
        notify: DoneSender,
    ) -> Result<(), BufferError> {
        self.tx
            .send_async(Command::Release {
                client,
                pkid,
                notify: Some(notify),
            })
            .await
            .map_err(|_| BufferError::Closed)
    }

    /// Forgets all of a client's QoS 2 state (clean session); `notify` hears of the commit.
    pub async fn clear_session(
        &self,
        client: String,
        notify: DoneSender,
    ) -> Result<(), BufferError> {
        self.tx
            .send_async(Command::ClearSession {
                client,
                notify: Some(notify),
            })
            .await
            .map_err(|_| BufferError::Closed)
    }

    /// Counts an event refused before it reached the buffer (for example an invalid topic).
    pub fn reject_invalid(&self) {
        self.metrics.events_in.fetch_add(1, Relaxed);
        self.metrics.rejected_invalid.fetch_add(1, Relaxed);
    }

    /// Records `count` events lost before they got seqs (after the last seq so far).
    pub fn lost(&self, count: u64, reason: GapReason) -> Result<(), BufferError> {
        self.metrics.events_in.fetch_add(count, Relaxed);
        self.tx
            .send(Command::Lost { count, reason })
            .map_err(|_| BufferError::Closed)
    }

    /// Deletes events through `through` (and every earlier epoch) and the gap records
    /// `gap_ids`: what a node has acknowledged. Waits while the writer's queue is full.
    pub fn trim(&self, through: Option<(u64, u64)>, gap_ids: Vec<u64>) -> Result<(), BufferError> {
        self.tx
            .send(Command::Trim { through, gap_ids })
            .map_err(|_| BufferError::Closed)
    }

    /// [`Handle::trim`] for async callers.
    pub async fn trim_async(
        &self,
        through: Option<(u64, u64)>,
        gap_ids: Vec<u64>,
    ) -> Result<(), BufferError> {
        self.tx
            .send_async(Command::Trim { through, gap_ids })
            .await
            .map_err(|_| BufferError::Closed)
    }

    /// Waits until everything queued before this call is committed (and synced per `sync`).
    pub fn flush(&self) -> Result<(), BufferError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Command::Flush(tx))
            .map_err(|_| BufferError::Closed)?;
        rx.recv()
            .map_err(|_| BufferError::Closed)?
            .map_err(BufferError::WriterFailed)
    }
}

/// Reads committed state; never blocks the writer (LMDB readers see a snapshot).
#[derive(Clone)]
pub struct Reader {
    shared: Arc<Shared>,
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

fn event_key(epoch: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn gap_key(epoch: u64, position: u64, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..16].copy_from_slice(&position.to_be_bytes());
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

/// QoS 2 state key: the client id, a 0 byte (MQTT strings never hold U+0000), the packet id.
fn qos2_key(client: &str, pkid: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(client.len() + 3);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> u64 {
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

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, BufferError> {
    postcard::from_bytes(bytes).map_err(|e| BufferError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("in-memory postcard encoding cannot fail")
}

const META_KEY: &[u8] = b"meta";

impl Buffer {
    /// Opens (or creates) the buffer in `dir` for agent `origin`, starts its writer, and
    /// marks the run as running before returning.
    pub fn open(
        dir: &Path,
        origin: &str,
        opts: BufferOptions,
        metrics: Arc<EdgeMetrics>,
    ) -> Result<Buffer, BufferError> {
        if opts.max_bytes == 0 || opts.max_bytes > opts.map_size / 10 * 8 {
            return Err(BufferError::Options(format!(
                "max_bytes ({}) must be above 0 and at most 80% of map_size ({})",
                opts.max_bytes, opts.map_size
            )));
        }
        std::fs::create_dir_all(dir).map_err(|source| BufferError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(opts.map_size as usize).max_dbs(8);
        if opts.sync != SyncMode::Always {
            // SAFETY: NO_SYNC only defers fsync to our explicit force_sync (or the OS); it
            // never trades consistency (unlike WRITEMAP or NO_META_SYNC, which we never use).
            unsafe {
                options.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: the directory is the agent's own, opened once per process, and not on NFS.
        let env = unsafe { options.open(dir) }?;
        let wtxn = env.write_txn()?;
        let (events, gaps, meta, qos2) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_, heed::Error> {
                let events: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("events"))?;
                let gaps: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("gaps"))?;
                let meta: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("meta"))?;
                let qos2: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("qos2"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((events, gaps, meta, qos2)))
            })?
            .unwrap_commit();
        let shared = Arc::new(Shared {
            env,
            events,
            gaps,
            meta,
            qos2,
            metrics,
        });

        let mut wtxn = shared.env.write_txn()?;
        let existing = match shared.meta.get(&wtxn, META_KEY)? {
            Some(b) => Some(decode::<Meta>(b, "meta")?),
            None => None,
        };
        let (mut meta, start) = match existing {
            None => (
                Meta {
                    format: FORMAT_VERSION,
                    origin: origin.to_owned(),
                    epoch: new_epoch(None),
                    next_seq: 1,
                    mark: RunMark::Running,
                    acked: None,
                    events: 0,
                    bytes: 0,
                    next_gap_id: 1,
                },
                StartKind::Fresh,
            ),
            Some(m) => {
                if m.format != FORMAT_VERSION {
                    return Err(BufferError::Mismatch(format!(
                        "buffer in {} has format {}, this agent reads format {FORMAT_VERSION}",
                        dir.display(),
                        m.format
                    )));
                }
                if m.origin != origin {
                    return Err(BufferError::Mismatch(format!(
                        "buffer in {} belongs to agent {:?}, not {origin:?}",
                        dir.display(),
                        m.origin
                    )));
                }
                let start = if m.mark == RunMark::Clean {
                    StartKind::Clean
                } else {
                    StartKind::Unclean
                };
                (m, start)
            }
        };
        if start == StartKind::Unclean {
            let old = meta.epoch;
            meta.epoch = new_epoch(Some(old));
            meta.next_seq = 1;
            warn!(
                old_epoch = old,
                new_epoch = meta.epoch,
                "buffer was not closed cleanly: starting a new epoch"
            );
        }
        meta.mark = RunMark::Running;
        shared.meta.put(&mut wtxn, META_KEY, &encode(&meta))?;
        wtxn.commit()?;
        // The running mark must be durable before the first append of this run.
        shared.env.force_sync()?;
        info!(
            epoch = meta.epoch,
            next_seq = meta.next_seq,
            ?start,
            "buffer open"
        );

        let m = &shared.metrics;
        m.buffer_max_bytes.store(opts.max_bytes, Relaxed);
        m.buffer_events.store(meta.events, Relaxed);
        m.buffer_bytes.store(meta.bytes, Relaxed);
        {
            let rtxn = shared.env.read_txn()?;
            m.oldest_event_us.store(oldest_ts(&shared, &rtxn)?, Relaxed);
        }

        let (tx, rx) = flume::bounded(opts.queue.max(1));
        let epoch = meta.epoch;
        let writer_shared = shared.clone();
        let (commits_tx, commits) = tokio::sync::watch::channel(0);
        let writer = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || Writer::new(writer_shared, opts, meta, commits_tx).run(rx))
            .map_err(|source| BufferError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        Ok(Buffer {
            shared,
            tx,
            writer: Some(writer),
            epoch,
            start,
            commits,
        })
    }

    /// The epoch of this run.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How this run started.
    pub fn start_kind(&self) -> StartKind {
        self.start
    }

    /// A sender for the ingest paths.
    pub fn handle(&self) -> Handle {
        Handle {
            tx: self.tx.clone(),
            metrics: self.shared.metrics.clone(),
        }
    }

    /// Changes after every commit (the value counts commits).
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.clone()
    }

    /// A reader of committed state.
    pub fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        &self.shared.metrics
    }

    /// Clean stop: commits everything queued, marks the buffer clean, syncs, and stops the
    /// writer. The next open keeps this epoch.
    pub fn close(mut self) -> Result<(), BufferError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Command::Close(tx))
            .map_err(|_| BufferError::Closed)?;
        let result = rx.recv().map_err(|_| BufferError::Closed)?;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        result.map_err(BufferError::WriterFailed)
    }
}

impl Drop for Buffer {
    /// Without [`Buffer::close`], the writer stops at once, leaving queued commands
    /// uncommitted and the run mark `Running`, exactly as a crash would.
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = self.tx.send(Command::Abort);
            let _ = w.join();
        }
    }
}

fn oldest_ts(shared: &Shared, txn: &heed::RoTxn) -> Result<u64, BufferError> {
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

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    opts: BufferOptions,
    meta: Meta,
    /// The budget in force: `max_bytes`, lowered if the LMDB map fills first.
    budget: u64,
    failed: Option<String>,
    /// The most event bytes one transaction takes: a quarter of the map's headroom over
    /// `max_bytes`, since pages freed by evictions are reusable only after the commit.
    group_byte_cap: u64,
    last_sync: Instant,
    dirty_since_sync: bool,
    /// Durable appends waiting for room under `overflow = "block"`, in arrival order.
    parked: VecDeque<Command>,
    /// Bumped after every commit, for readers that follow the buffer (the uplink).
    commits: tokio::sync::watch::Sender<u64>,
}

/// An upper bound of what an append costs in the budget (the exact cost is computed when
/// it is stored): its encoded event, key and LMDB overhead.
fn command_bytes(c: &Command) -> u64 {
    match c {
        Command::Append(inc, _) => {
            let headers = inc.headers.as_ref().map_or(0, |h| {
                h.user_properties
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 6)
                    .sum::<usize>()
                    + h.content_type.as_ref().map_or(0, |c| c.len() + 3)
                    + h.traceparent.as_ref().map_or(0, |t| t.len() + 3)
                    + 3
            });
            (inc.topic.len() + inc.payload.len() + headers) as u64 + 40 + 16 + ENTRY_OVERHEAD
        }
        _ => 0,
    }
}

/// Changes of one transaction, applied to metrics and reported only once it commits.
#[derive(Default)]
struct TxnEffects {
    drops: Vec<(GapReason, u64)>,
    oldest_changed: bool,
    /// Per group index: the outcome of a durable append.
    appended: Vec<(usize, AppendResult)>,
}

enum Applied {
    Ok,
    MapFull,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        opts: BufferOptions,
        meta: Meta,
        commits: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        let budget = opts.max_bytes;
        let group_byte_cap = ((opts.map_size - opts.max_bytes) / 4).max(64 * 1024);
        Writer {
            group_byte_cap,
            shared,
            opts,
            meta,
            budget,
            failed: None,
            last_sync: Instant::now(),
            dirty_since_sync: false,
            parked: VecDeque::new(),
            commits,
        }
    }

    fn run(mut self, rx: flume::Receiver<Command>) {
        let _span = tracing::info_span!("buffer_writer", origin = %self.meta.origin).entered();
        loop {
            let first = match self.opts.sync {
                SyncMode::Interval => match rx.recv_timeout(self.opts.sync_interval) {
                    Ok(c) => c,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        self.maybe_sync(true);
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                },
                _ => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            let opened = Instant::now();
            let mut group_bytes = command_bytes(&first);
            let mut group = vec![first];
            while group.len() < MAX_GROUP
                && group_bytes < self.group_byte_cap
                && opened.elapsed() < self.opts.commit_interval
            {
                match rx.try_recv() {
                    Ok(c) => {
                        group_bytes += command_bytes(&c);
                        let stop = matches!(c, Command::Close(_) | Command::Abort);
                        group.push(c);
                        if stop {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if self.process(group) {
                return;
            }
        }
    }

    /// Under `overflow = "block"`, moves durable appends that do not fit (or that arrive
    /// while others wait) to the back of the parked queue, and brings parked ones back, in
    /// order, as room frees. Nothing is refused and order is kept.
    fn admit(&mut self, group: Vec<Command>) -> Vec<Command> {
        if self.opts.overflow != Overflow::Block || self.failed.is_some() {
            return group;
        }
        let mut room = self.budget.saturating_sub(self.meta.bytes);
        let mut admitted = Vec::with_capacity(group.len());
        while let Some(front) = self.parked.front() {
            let cost = command_bytes(front);
            if cost > room {
                break;
            }
            room -= cost;
            admitted.extend(self.parked.pop_front());
        }
        for c in group {
            match &c {
                Command::Append(_, Some(_)) => {
                    let cost = command_bytes(&c);
                    if !self.parked.is_empty() || cost > room {
                        self.parked.push_back(c);
                    } else {
                        room -= cost;
                        admitted.push(c);
                    }
                }
                Command::Append(_, None) => {
                    room = room.saturating_sub(command_bytes(&c));
                    admitted.push(c);
                }
                _ => admitted.push(c),
            }
        }
        admitted
    }

    /// Applies and commits one group; returns true when the writer must stop.
    fn process(&mut self, group: Vec<Command>) -> bool {
        let mut group = self.admit(group);
        // Commands after an Abort are dropped uncommitted, as in a crash.
        if let Some(i) = group.iter().position(|c| matches!(c, Command::Abort)) {
            group.truncate(i);
            let _ = self.commit_group(&mut group);
            return true;
        }
        let close = group
            .iter()
            .position(|c| matches!(c, Command::Close(_)))
            .map(|i| group.remove(i));
        let result = self.commit_group(&mut group);
        for c in &group {
            if let Command::Flush(tx) = c {
                let _ = tx.send(result.clone());
            }
        }
        if let Some(Command::Close(tx)) = close {
            let r = result.and_then(|()| self.mark_clean());
            let _ = tx.send(r);
            return true;
        }
        // Trims may have made room for parked appends: take them in at once.
        if !self.parked.is_empty() && self.meta.bytes < self.budget {
            let mut more = self.admit(Vec::new());
            if !more.is_empty() {
                let _ = self.commit_group(&mut more);
            }
        }
        false
    }

    fn mark_clean(&mut self) -> Result<(), String> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let mut meta = self.meta.clone();
        meta.mark = RunMark::Clean;
        let r = (|| -> Result<(), heed::Error> {
            let mut wtxn = self.shared.env.write_txn()?;
            self.shared.meta.put(&mut wtxn, META_KEY, &encode(&meta))?;
            wtxn.commit()?;
            self.shared.env.force_sync()
        })();
        r.map_err(|e| e.to_string())?;
        self.meta = meta;
        info!(
            epoch = self.meta.epoch,
            next_seq = self.meta.next_seq,
            "buffer closed cleanly"
        );
        Ok(())
    }

    fn commit_group(&mut self, group: &mut [Command]) -> Result<(), String> {
        if group.is_empty() {
            return Ok(());
        }
        if let Some(f) = self.failed.clone() {
            self.count_unstorable(group, &f);
            return Err(f);
        }
        for attempt in 0..4 {
            let began = Instant::now();
            let snapshot = self.meta.clone();
            let mut effects = TxnEffects::default();
            let shared = self.shared.clone();
            let outcome = (|| -> Result<Applied, heed::Error> {
                let mut wtxn = shared.env.write_txn()?;
                for (i, c) in group.iter().enumerate() {
                    match self.apply(&mut wtxn, i, c, &mut effects) {
                        Ok(()) => {}
                        Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                            return Ok(Applied::MapFull)
                        }
                        Err(e) => return Err(e),
                    }
                }
                match self
                    .shared
                    .meta
                    .put(&mut wtxn, META_KEY, &encode(&self.meta))
                {
                    Err(heed::Error::Mdb(heed::MdbError::MapFull)) => return Ok(Applied::MapFull),
                    r => r?,
                }
                let oldest = if effects.oldest_changed {
                    Some(match self.shared.events.first(&wtxn)? {
                        Some((_, v)) => postcard::from_bytes::<Event>(v).map_or(0, |e| e.ts_us),
                        None => 0,
                    })
                } else {
                    None
                };
                match wtxn.commit() {
                    Err(heed::Error::Mdb(heed::MdbError::MapFull)) => return Ok(Applied::MapFull),
                    r => r?,
                }
                if let Some(ts) = oldest {
                    self.shared.metrics.oldest_event_us.store(ts, Relaxed);
                }
                Ok(Applied::Ok)
            })();
            match outcome {
                Ok(Applied::Ok) => {
                    let m = &self.shared.metrics;
                    m.record_commit(began.elapsed());
                    let n = m.commits.fetch_add(1, Relaxed) + 1;
                    self.commits.send_replace(n);
                    m.buffer_events.store(self.meta.events, Relaxed);
                    m.buffer_bytes.store(self.meta.bytes, Relaxed);
                    for (reason, n) in effects.drops {
                        m.count_drop(reason, n);
                    }
                    self.dirty_since_sync = true;
                    if self.opts.sync == SyncMode::Always {
                        m.fsyncs.fetch_add(1, Relaxed);
                        self.dirty_since_sync = false;
                    } else {
                        self.maybe_sync(false);
                    }
                    // Only now, committed (and synced per `sync`), are appends reported.
                    let mut outcomes = effects.appended.into_iter().peekable();
                    for (i, c) in group.iter_mut().enumerate() {
                        match c {
                            Command::Append(_, Some(d)) => {
                                if let Some((_, r)) = outcomes.next_if(|(j, _)| *j == i) {
                                    if let Some(n) = d.notify.take() {
                                        let _ = n.send(r);
                                    }
                                }
                            }
                            Command::Release { notify, .. }
                            | Command::ClearSession { notify, .. } => {
                                if let Some(n) = notify.take() {
                                    let _ = n.send(Ok(()));
                                }
                            }
                            _ => {}
                        }
                    }
                    return Ok(());
                }
                Ok(Applied::MapFull) if group.len() > 1 => {
                    // Pages freed inside a transaction are reusable only after it commits:
                    // commit the group in halves.
                    self.meta = snapshot;
                    let (left, right) = group.split_at_mut(group.len() / 2);
                    self.commit_group(left)?;
                    return self.commit_group(right);
                }
                Ok(Applied::MapFull) => {
                    self.meta = snapshot;
                    let lowered = (self.meta.bytes / 10 * 9).min(self.budget);
                    warn!(
                        attempt,
                        budget = self.budget,
                        lowered,
                        "lmdb map full before max_bytes: lowering the buffer budget"
                    );
                    self.budget = lowered;
                }
                Err(e) => {
                    self.meta = snapshot;
                    return Err(self.fail(e.to_string(), group));
                }
            }
        }
        Err(self.fail("lmdb map stays full".into(), group))
    }

    fn fail(&mut self, why: String, group: &mut [Command]) -> String {
        error!(error = %why, "buffer commit failed: the writer stops writing");
        self.shared.metrics.write_errors.fetch_add(1, Relaxed);
        self.failed = Some(why.clone());
        self.count_unstorable(group, &why);
        let mut parked: Vec<Command> = self.parked.drain(..).collect();
        self.count_unstorable(&mut parked, &why);
        why
    }

    /// Counts what a failed writer cannot store as lost, and tells durable senders.
    fn count_unstorable(&self, group: &mut [Command], why: &str) {
        let mut lost = 0;
        for c in group.iter_mut() {
            match c {
                Command::Append(_, durable) => {
                    lost += 1;
                    if let Some(n) = durable.as_mut().and_then(|d| d.notify.take()) {
                        let _ = n.send(Err(AppendError::Failed(why.to_owned())));
                    }
                }
                Command::Lost { count, .. } => lost += *count,
                Command::Release { notify, .. } | Command::ClearSession { notify, .. } => {
                    if let Some(n) = notify.take() {
                        let _ = n.send(Err(AppendError::Failed(why.to_owned())));
                    }
                }
                _ => {}
            }
        }
        self.shared
            .metrics
            .count_drop(GapReason::StorageFailed, lost);
    }

    fn maybe_sync(&mut self, idle: bool) {
        if !self.dirty_since_sync || self.opts.sync != SyncMode::Interval {
            return;
        }
        if idle || self.last_sync.elapsed() >= self.opts.sync_interval {
            match self.shared.env.force_sync() {
                Ok(()) => {
                    self.shared.metrics.fsyncs.fetch_add(1, Relaxed);
                    self.dirty_since_sync = false;
                    self.last_sync = Instant::now();
                }
                Err(e) => {
                    let why = format!("sync failed: {e}");
                    let _ = self.fail(why, &mut []);
                }
            }
        }
    }

    fn apply(
        &mut self,
        wtxn: &mut RwTxn,
        index: usize,
        c: &Command,
        fx: &mut TxnEffects,
    ) -> Result<(), heed::Error> {
        match c {
            Command::Append(inc, durable) => {
                let stored = self.append(wtxn, inc, fx)?;
                if let Some(d) = durable {
                    if let (Ok(at), Some((client, pkid))) = (&stored, &d.qos2) {
                        let value = [at.0.to_be_bytes(), at.1.to_be_bytes()].concat();
                        self.shared
                            .qos2
                            .put(wtxn, &qos2_key(client, *pkid), &value)?;
                    }
                    fx.appended.push((index, stored));
                }
                Ok(())
            }
            Command::Release { client, pkid, .. } => {
                self.shared.qos2.delete(wtxn, &qos2_key(client, *pkid))?;
                Ok(())
            }
            Command::ClearSession { client, .. } => {
                let lo = qos2_key(client, 0);
                let hi = qos2_key(client, u16::MAX);
                self.shared
                    .qos2
                    .delete_range(wtxn, &(Bound::Included(&lo[..]), Bound::Included(&hi[..])))?;
                Ok(())
            }
            Command::Lost { count: 0, .. } => Ok(()),
            Command::Lost { count, reason } => {
                let gap = Gap {
                    kind: GapKind::Unsequenced {
                        after: self.meta.next_seq - 1,
                        count: *count,
                    },
                    reason: *reason,
                    ts_us: now_us(),
                };
                fx.drops.push((*reason, *count));
                self.put_gap(wtxn, self.meta.epoch, gap)
            }
            Command::Trim { through, gap_ids } => self.trim(wtxn, *through, gap_ids, fx),
            Command::Flush(_) | Command::Close(_) | Command::Abort => Ok(()),
        }
    }

    /// Stores one event; `Err(Refused)` when the overflow policy refused it (a gap record
    /// covers its seq).
    fn append(
        &mut self,
        wtxn: &mut RwTxn,
        inc: &Incoming,
        fx: &mut TxnEffects,
    ) -> Result<AppendResult, heed::Error> {
        let seq = self.meta.next_seq;
        self.meta.next_seq += 1;
        let event = Event {
            seq,
            topic: inc.topic.clone(),
            payload: inc.payload.clone(),
            ts_us: inc.ts_us,
            qos: inc.qos,
            headers: inc.headers.clone(),
        };
        let value = encode(&event);
        let cost = value.len() as u64 + 16 + ENTRY_OVERHEAD;
        if self.meta.bytes + cost > self.budget {
            let evict = self.opts.overflow == Overflow::DropOldest && cost <= self.budget;
            if !evict {
                fx.drops.push((GapReason::Refused, 1));
                self.record_range(wtxn, self.meta.epoch, seq, GapReason::Refused)?;
                return Ok(Err(AppendError::Refused));
            }
            while self.meta.bytes + cost > self.budget {
                let Some((k, v)) = self.shared.events.first(wtxn)? else {
                    break;
                };
                let (e, s, len) = (be_u64(&k[..8]), be_u64(&k[8..]), k.len() + v.len());
                let key = event_key(e, s);
                self.shared.events.delete(wtxn, &key)?;
                self.meta.events -= 1;
                self.meta.bytes = self.meta.bytes.saturating_sub(len as u64 + ENTRY_OVERHEAD);
                fx.drops.push((GapReason::Evicted, 1));
                fx.oldest_changed = true;
                self.record_range(wtxn, e, s, GapReason::Evicted)?;
            }
        }
        let key = event_key(self.meta.epoch, seq);
        self.shared
            .events
            .put_with_flags(wtxn, PutFlags::APPEND, &key, &value)?;
        if self.meta.events == 0 {
            fx.oldest_changed = true;
        }
        self.meta.events += 1;
        self.meta.bytes += cost;
        Ok(Ok((self.meta.epoch, seq)))
    }

    /// Records `seq` of `epoch` as lost, extending the gap record that ends right before it
    /// when there is one with the same reason.
    fn record_range(
        &mut self,
        wtxn: &mut RwTxn,
        epoch: u64,
        seq: u64,
        reason: GapReason,
    ) -> Result<(), heed::Error> {
        // The newest gap record of this epoch that ends right before `seq`.
        let lo = gap_key(epoch, 0, 0);
        let hi = gap_key(epoch, seq, 0);
        let mut extend: Option<(Vec<u8>, Gap)> = None;
        if let Some(item) = self
            .shared
            .gaps
            .rev_range(wtxn, &(Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))?
            .next()
        {
            let (k, v) = item?;
            if let Ok(g) = postcard::from_bytes::<Gap>(v) {
                if let GapKind::Range { last, .. } = g.kind {
                    if g.reason == reason && last + 1 == seq {
                        extend = Some((k.to_vec(), g));
                    }
                }
            }
        }
        match extend {
            Some((k, mut g)) => {
                if let GapKind::Range { last, .. } = &mut g.kind {
                    *last = seq;
                }
                self.shared.gaps.put(wtxn, &k, &encode(&g))
            }
            None => {
                let gap = Gap {
                    kind: GapKind::Range {
                        first: seq,
                        last: seq,
                    },
                    reason,
                    ts_us: now_us(),
                };
                self.put_gap(wtxn, epoch, gap)
            }
        }
    }

    fn put_gap(&mut self, wtxn: &mut RwTxn, epoch: u64, gap: Gap) -> Result<(), heed::Error> {
        let id = self.meta.next_gap_id;
        self.meta.next_gap_id += 1;
        let key = gap_key(epoch, gap.position(), id);
        self.shared.gaps.put(wtxn, &key, &encode(&gap))
    }

    fn trim(
        &mut self,
        wtxn: &mut RwTxn,
        through: Option<(u64, u64)>,
        gap_ids: &[u64],
        fx: &mut TxnEffects,
    ) -> Result<(), heed::Error> {
        if !gap_ids.is_empty() {
            let doomed: Vec<Vec<u8>> = self
                .shared
                .gaps
                .iter(wtxn)?
                .filter_map(|item| item.ok())
                .filter(|(k, _)| gap_ids.contains(&be_u64(&k[16..])))
                .map(|(k, _)| k.to_vec())
                .collect();
            for k in doomed {
                self.shared.gaps.delete(wtxn, &k)?;
            }
        }
        let Some((epoch, seq)) = through else {
            return Ok(());
        };
        loop {
            let Some((k, v)) = self.shared.events.first(wtxn)? else {
                break;
            };
            let (e, s, len) = (be_u64(&k[..8]), be_u64(&k[8..]), k.len() + v.len());
            if (e, s) > (epoch, seq) {
                break;
            }
            let key = event_key(e, s);
            self.shared.events.delete(wtxn, &key)?;
            self.meta.events -= 1;
            self.meta.bytes = self.meta.bytes.saturating_sub(len as u64 + ENTRY_OVERHEAD);
            fx.oldest_changed = true;
        }
        if self.meta.acked.is_none_or(|a| a < (epoch, seq)) {
            self.meta.acked = Some((epoch, seq));
        }
        Ok(())
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
