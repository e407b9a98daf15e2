//! The writer thread: the one owner of write transactions. Commands arrive through a
//! bounded channel from [`Handle`]s; each group is one transaction (group commit), with the
//! overflow policy, parked durable appends under `block`, trims, QoS 2 state and the sync
//! policy applied here.

use std::collections::VecDeque;
use std::ops::Bound;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use heed::{PutFlags, RwTxn};
use telemesh_proto::{Event, Gap, GapKind, GapReason};
use tracing::{error, info, warn};

use super::format::{
    be_u64, encode, event_key, gap_key, now_us, qos2_key, Meta, RunMark, Shared, ENTRY_OVERHEAD,
    META_KEY,
};
use super::{
    AppendError, AppendResult, BufferError, BufferOptions, DoneSender, Durable, Incoming, Overflow,
    SyncMode, MAX_GROUP,
};
use crate::metrics::EdgeMetrics;

pub(super) enum Command {
    /// An event, what the durable port attaches, and its room in the queue (given back
    /// when the command is done: committed, refused or failed).
    Append(
        Incoming,
        Option<Durable>,
        // Held for its drop: the room goes back when the command is done.
        #[allow(dead_code)] Room,
    ),
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

/// A sender of appends and losses to the writer, for the ingest paths.
#[derive(Clone)]
pub struct Handle {
    pub(super) tx: flume::Sender<Command>,
    /// Bytes of appends queued or parked, at most `queue_bytes` (its permits).
    pub(super) room: Arc<tokio::sync::Semaphore>,
    /// `queue_bytes`: an append larger than that takes all of it.
    pub(super) room_cap: u32,
    pub(super) metrics: Arc<EdgeMetrics>,
}

/// An append's room in the writer's queue.
pub(super) type Room = tokio::sync::OwnedSemaphorePermit;

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
        let bytes = incoming_bytes(&ev);
        let room = match self.try_room(bytes) {
            Some(room) => room,
            None => {
                // A plain thread waits here (the broker's tap). `unconstrained`: tokio's
                // cooperative budget must not apply outside a task, or a caller on a runtime
                // thread would spin.
                let wait = tokio::task::unconstrained(self.room(bytes));
                futures_executor::block_on(wait)?
            }
        };
        self.tx
            .send(Command::Append(ev, None, room))
            .map_err(|_| BufferError::Closed)
    }

    /// Room for `bytes` in the queue if there is some now.
    fn try_room(&self, bytes: u64) -> Option<Room> {
        let n = bytes.clamp(1, u64::from(self.room_cap.max(1))) as u32;
        self.room.clone().try_acquire_many_owned(n).ok()
    }

    /// Room for `bytes` in the queue; waits while the queue holds its `queue_bytes`.
    async fn room(&self, bytes: u64) -> Result<Room, BufferError> {
        let n = bytes.clamp(1, u64::from(self.room_cap.max(1))) as u32;
        self.room
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| BufferError::Closed)
    }

    /// Queues an event for the durable port; waits (asynchronously) while the writer's
    /// queue is full, which is what stops the port reading its sockets.
    pub async fn append_durable(&self, ev: Incoming, durable: Durable) -> Result<(), BufferError> {
        self.metrics.events_in.fetch_add(1, Relaxed);
        self.metrics
            .bytes_in
            .fetch_add((ev.topic.len() + ev.payload.len()) as u64, Relaxed);
        let room = self.room(incoming_bytes(&ev)).await?;
        self.tx
            .send_async(Command::Append(ev, Some(durable), room))
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

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) opts: BufferOptions,
    pub(super) meta: Meta,
    /// The budget in force: `max_bytes`, lowered if the LMDB map fills first.
    pub(super) budget: u64,
    pub(super) failed: Option<String>,
    /// The most event bytes one transaction takes: a quarter of the map's headroom over
    /// `max_bytes`, since pages freed by evictions are reusable only after the commit.
    pub(super) group_byte_cap: u64,
    pub(super) last_sync: Instant,
    pub(super) dirty_since_sync: bool,
    /// Durable appends waiting for room under `overflow = "block"`, in arrival order.
    pub(super) parked: VecDeque<Command>,
    /// Bumped after every commit, for readers that follow the buffer (the uplink).
    pub(super) commits: tokio::sync::watch::Sender<u64>,
}

/// An upper bound of what an append costs in the budget (the exact cost is computed when
/// it is stored): its encoded event, key and LMDB overhead.
fn command_bytes(c: &Command) -> u64 {
    match c {
        Command::Append(inc, _, _) => incoming_bytes(inc),
        _ => 0,
    }
}

/// What an append costs at most: its encoded event, key and LMDB overhead.
fn incoming_bytes(inc: &Incoming) -> u64 {
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
    pub(super) fn new(
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

    pub(super) fn run(mut self, rx: flume::Receiver<Command>) {
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
                Command::Append(_, Some(_), _) => {
                    let cost = command_bytes(&c);
                    if !self.parked.is_empty() || cost > room {
                        self.parked.push_back(c);
                    } else {
                        room -= cost;
                        admitted.push(c);
                    }
                }
                Command::Append(_, None, _) => {
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
                            Command::Append(_, Some(d), _) => {
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
                Err(e) if refused_by_request(&e) && group.len() > 1 => {
                    // One command holds what LMDB refuses: split until it stands alone.
                    self.meta = snapshot;
                    let (left, right) = group.split_at_mut(group.len() / 2);
                    self.commit_group(left)?;
                    return self.commit_group(right);
                }
                Err(e) if refused_by_request(&e) => {
                    // It fails alone; the writer goes on.
                    self.meta = snapshot;
                    let why = format!("refused by storage: {e}");
                    warn!(error = %why, "one command refused; the writer goes on");
                    self.count_unstorable(group, &why);
                    return Ok(());
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
                Command::Append(_, durable, _) => {
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
            Command::Append(inc, durable, _) => {
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
                        after: self.meta.next_seq.saturating_sub(1),
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

/// True when LMDB refused what a command holds (a key over its maximum size, a value it
/// cannot store): the command's fault, not the disk's.
fn refused_by_request(e: &heed::Error) -> bool {
    matches!(
        e,
        heed::Error::Mdb(heed::MdbError::BadValSize)
            | heed::Error::Encoding(_)
            | heed::Error::Decoding(_)
    )
}
