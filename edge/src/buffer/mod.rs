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
//! - `meta`: key `"meta"` → postcard `Meta`: origin, current epoch, next seq, the run mark,
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

mod format;
mod read;
mod writer;

pub use format::{new_epoch, now_us, FORMAT_VERSION};
pub use read::{inspect, BufferState, Inspection, Reader};
pub use writer::Handle;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};
use serde::{Deserialize, Serialize};
use telemesh_proto::{Event, Gap, Headers};
use tracing::{info, warn};

use crate::metrics::EdgeMetrics;
use format::{decode, encode, Meta, RunMark, Shared, META_KEY};
use read::oldest_ts;
use writer::{Command, Writer};

/// The most commands one write transaction takes.
pub const MAX_GROUP: usize = 16_384;

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
    /// Bytes of appends that may wait for the writer — queued, or parked under
    /// `overflow = "block"` — before senders block (the durable port then stops reading
    /// its sockets; the broker's tap stops taking messages and an overrun is recorded).
    pub queue_bytes: u64,
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
            queue_bytes: 64 << 20,
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

/// The durable edge buffer. Cheap to share through [`Buffer::handle`] and [`Buffer::reader`].
pub struct Buffer {
    shared: Arc<Shared>,
    tx: flume::Sender<Command>,
    room: Arc<tokio::sync::Semaphore>,
    room_cap: u32,
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

        let room_cap = opts.queue_bytes.clamp(1, u64::from(u32::MAX)) as u32;
        let room = Arc::new(tokio::sync::Semaphore::new(room_cap as usize));
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
            room,
            room_cap,
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
            room: self.room.clone(),
            room_cap: self.room_cap,
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
