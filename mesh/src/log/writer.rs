//! The writer thread: the one owner of write transactions. Ingests, replica batches, cursor
//! stores and retention steps arrive through a bounded channel; a group of them is one
//! transaction, answered only after it commits (synced per `sync`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use heed::{PutFlags, RwTxn};
use telemesh_proto::frame::DeadLetter;
use telemesh_proto::replication::{Hop, ReplicatedItem};
use telemesh_proto::{Event, Gap, GapKind, RangeSet};
use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use super::format::{encode, now_us, origin_key, Cursor, Db, Meta, Record, Shared, META};
use super::{IngestOutcome, ReplicaBatch, Sync, MAX_DEAD_LETTERS, STORAGE_FULL};

pub(super) enum Cmd {
    Ingest {
        /// Its room in the writer's queue, given back when the command is answered.
        _room: tokio::sync::OwnedSemaphorePermit,
        origin: String,
        epoch: u64,
        events: Vec<Event>,
        gaps: Vec<Gap>,
        rejected: Vec<DeadLetter>,
        reply: oneshot::Sender<Result<IngestOutcome, String>>,
    },
    /// Store records replicated from an upstream with its cursor.
    Replica {
        batch: Box<ReplicaBatch>,
        reply: oneshot::Sender<Result<IngestOutcome, String>>,
        /// Its room in the writer's queue, given back when the command is answered.
        _room: tokio::sync::OwnedSemaphorePermit,
    },
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

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) meta: Meta,
    pub(super) held: HashMap<Vec<u8>, RangeSet>,
    pub(super) lost: HashMap<Vec<u8>, RangeSet>,
    pub(super) failed: Option<String>,
    pub(super) failure: Arc<std::sync::Mutex<Option<String>>>,
    pub(super) committed: watch::Sender<u64>,
    pub(super) sync: Sync,
    pub(super) last_sync: Instant,
}

impl Writer {
    pub(super) fn run(mut self, rx: flume::Receiver<Cmd>) {
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
        let mut work = Vec::with_capacity(group.len());
        for c in group {
            match c {
                Cmd::Expire {
                    before_us,
                    keep,
                    reply,
                } => {
                    let r = self.expire(before_us, &keep);
                    let _ = reply.send(r);
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
                c => work.push(c),
            }
        }
        self.commit_work(work);
    }

    /// Commits ingests, replica batches and cursor changes in one transaction and answers
    /// each. A command that LMDB refuses for what it holds (a key or value it cannot store)
    /// fails alone: the group is split and retried until that command stands by itself, and
    /// it is answered with the error while the writer goes on. Only trouble of the disk
    /// itself (an I/O error, a failed sync) stops the writer; a full map refuses the group
    /// until retention makes room.
    fn commit_work(&mut self, mut work: Vec<Cmd>) {
        if work.is_empty() {
            return;
        }
        if let Some(f) = self.failed.clone() {
            for c in work {
                reply(c, Err(f.clone()));
            }
            return;
        }
        let snapshot = self.meta.clone();
        let mut dirty: HashSet<Vec<u8>> = HashSet::new();
        let result = self.try_commit(&work, &mut dirty);
        let e = match result {
            Ok(outcomes) => {
                let _ = self.committed.send(self.meta.next_seq.saturating_sub(1));
                for (c, o) in work.into_iter().zip(outcomes) {
                    reply(c, Ok(o));
                }
                return;
            }
            Err(e) => e,
        };
        // Forget cached sets this transaction touched: they will be reloaded.
        for k in &dirty {
            self.held.remove(k);
            self.lost.remove(k);
        }
        self.meta = snapshot;
        if refused_by_request(&e) {
            if work.len() > 1 {
                let rest = work.split_off(work.len() / 2);
                self.commit_work(work);
                self.commit_work(rest);
            } else {
                let why = format!("refused by storage: {e}");
                warn!(error = %why, "one command refused; the writer goes on");
                for c in work {
                    reply(c, Err(why.clone()));
                }
            }
            return;
        }
        let why = if matches!(e, heed::Error::Mdb(heed::MdbError::MapFull)) {
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
        for c in work {
            reply(c, Err(why.clone()));
        }
    }

    /// One transaction over `work`, in order; the outcome of each command.
    fn try_commit(
        &mut self,
        work: &[Cmd],
        dirty: &mut HashSet<Vec<u8>>,
    ) -> Result<Vec<IngestOutcome>, heed::Error> {
        let shared = self.shared.clone();
        let mut wtxn = shared.env.write_txn()?;
        let mut outcomes = Vec::with_capacity(work.len());
        let now = now_us();
        for c in work {
            let outcome = match c {
                Cmd::Ingest {
                    origin,
                    epoch,
                    events,
                    gaps,
                    rejected,
                    ..
                } => {
                    let o = self.apply(&mut wtxn, origin, *epoch, events, gaps, dirty)?;
                    self.dead_letters(&mut wtxn, origin, *epoch, rejected)?;
                    o
                }
                Cmd::Replica { batch, .. } => self.apply_replica(&mut wtxn, batch, dirty)?,
                Cmd::Cursor { key, cursor, .. } => {
                    shared.cursors.put(&mut wtxn, key, &encode(cursor))?;
                    IngestOutcome::default()
                }
                Cmd::Touch { key } => {
                    let cursor: Option<Cursor> = shared
                        .cursors
                        .get(&wtxn, key)?
                        .and_then(|b| postcard::from_bytes(b).ok());
                    if let Some(mut c) = cursor {
                        c.seen_us = now;
                        shared.cursors.put(&mut wtxn, key, &encode(&c))?;
                    }
                    IngestOutcome::default()
                }
                Cmd::Expire { .. } | Cmd::Retain { .. } | Cmd::Stop => IngestOutcome::default(),
            };
            outcomes.push(outcome);
        }
        for key in dirty.iter() {
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
        Ok(outcomes)
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
    pub(super) key: &'a [u8],
    pub(super) origin: &'a str,
    pub(super) epoch: u64,
    pub(super) ingest_us: u64,
    pub(super) path: &'a [Hop],
}

/// Marks a range-set key as written in this transaction (allocating only the first time).
fn mark_dirty(dirty: &mut HashSet<Vec<u8>>, key: &[u8]) {
    if !dirty.contains(key) {
        dirty.insert(key.to_vec());
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

/// Answers a command with its outcome.
fn reply(c: Cmd, r: Result<IngestOutcome, String>) {
    match c {
        Cmd::Ingest { reply, .. } | Cmd::Replica { reply, .. } => {
            let _ = reply.send(r);
        }
        Cmd::Cursor {
            reply: Some(reply), ..
        } => {
            let _ = reply.send(r.map(|_| ()));
        }
        _ => {}
    }
}
