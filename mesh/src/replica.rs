//! The replication driver: runs proto's [`Replicator`] for each `[[replicate]]` entry over
//! QUIC (the node's own endpoint and certificate, role `peer`).
//!
//! One task per upstream: connect, hello, subscribe from the stored cursor, then a loop that
//! reads `replicate` rounds and queues each for the log writer (records and cursor in one
//! transaction), a bounded number in flight; as each commit completes, credit goes back
//! upstream. On any error the task waits for the commits in flight, then reconnects with
//! exponential backoff; what was received and not stored is asked for again.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use telemesh_proto::frame::Compression;
use telemesh_proto::frame::{DeadLetter, UpstreamStatus};
use telemesh_proto::replication::{Receipt, ReplicatedItem, Replicator, Step, SILENCE};
use telemesh_proto::topic::validate_topic_name;
use telemesh_proto::{validate_name, ErrorCode, Frame, Start, MAX_SEQ};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn, Instrument};

use crate::config::{Replicate, ReplicateCompression, ReplicateStart};
use crate::log::{IngestOutcome, NodeLog, Pending, ReplicaBatch};
use telemesh_quic::wire::{write_frame, FrameReader};

/// Replication commits in flight per upstream, at most.
const MAX_PENDING: usize = 32;
/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a node knows about one of its upstreams (for status and metrics).
#[derive(Debug)]
pub struct UpstreamState {
    status: Mutex<UpstreamStatus>,
    /// Upstream ingest time (µs) of the newest event stored from it; 0 before the first.
    newest_ingest_us: AtomicU64,
    /// Events stored from it (duplicates not counted).
    pub events: AtomicU64,
    /// Events it sent that were already held.
    pub duplicates: AtomicU64,
    /// Connections that ended in an error.
    pub errors: AtomicU64,
    /// Records refused because they can never be stored (an invalid origin or node id, a
    /// seq or gap range out of bounds).
    pub refused: AtomicU64,
    /// Seconds from the upstream's ingest of an event to its commit here.
    pub latency: Histogram,
    /// Bumped on every change of the status or the error count.
    version: watch::Sender<u64>,
}

impl UpstreamState {
    fn new(from: &str) -> Self {
        UpstreamState {
            status: Mutex::new(UpstreamStatus {
                from: from.to_owned(),
                node_id: String::new(),
                connected: false,
                through: 0,
                behind: 0,
                lag_ms: 0,
            }),
            newest_ingest_us: AtomicU64::new(0),
            events: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            // 50 µs … ~100 s.
            latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 22)),
            version: watch::Sender::new(0),
        }
    }

    /// Changes whenever the status or the error count changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// A snapshot of the status. While the replica is disconnected or behind, `lag_ms` is
    /// the age of the newest event stored from the upstream, so it keeps growing through a
    /// partition; once caught up it is that event's upstream-ingest-to-commit latency.
    pub fn status(&self) -> UpstreamStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let newest = self.newest_ingest_us.load(Relaxed);
        if (!s.connected || s.behind > 0) && newest > 0 {
            s.lag_ms = now_us().saturating_sub(newest) / 1000;
        }
        s
    }

    fn update(&self, f: impl FnOnce(&mut UpstreamStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.version.send_modify(|v| *v += 1);
    }
}

/// What every replication task of a node shares.
pub(crate) struct Shared {
    pub node_id: String,
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    pub log: Arc<NodeLog>,
    pub max_event_bytes: u64,
    pub max_frame_bytes: u32,
}

/// Starts one task per `[[replicate]]` entry; they stop when `shutdown` turns true.
pub(crate) fn start(
    shared: Arc<Shared>,
    entries: &[Replicate],
    shutdown: watch::Receiver<bool>,
) -> (Vec<Arc<UpstreamState>>, Vec<tokio::task::JoinHandle<()>>) {
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for entry in entries {
        let state = Arc::new(UpstreamState::new(&entry.from));
        states.push(state.clone());
        let span = tracing::info_span!("replicate", node = %shared.node_id, from = %entry.from);
        tasks.push(tokio::spawn(
            run(shared.clone(), entry.clone(), state, shutdown.clone()).instrument(span),
        ));
    }
    (states, tasks)
}

async fn run(
    shared: Arc<Shared>,
    entry: Replicate,
    state: Arc<UpstreamState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stored = match shared.log.upstream_cursor(&entry.from) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read the replication cursor; starting without it");
            None
        }
    };
    if let Some(c) = &stored {
        state.update(|s| {
            s.node_id = c.node_id.clone();
            s.through = c.through;
        });
    }
    let start = match entry.start {
        ReplicateStart::Earliest => Start::Earliest,
        ReplicateStart::Latest => Start::Latest,
    };
    let mut rep = Replicator::new(
        shared.log.incarnation(),
        entry.filters.clone(),
        start,
        entry.window,
        stored,
    );
    let mut backoff = Duration::from_millis(50);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut pending = VecDeque::new();
        let result = session(
            &shared,
            &entry,
            &state,
            &mut rep,
            &mut pending,
            &mut shutdown,
        )
        .await;
        rep.on_disconnected();
        state.update(|s| s.connected = false);
        // What is queued for the writer is stored before the next connection starts.
        while let Some(mut p) = pending.pop_front() {
            let outcome = (&mut p.rx).await;
            if finish(&state, &mut rep, p, outcome).is_err() {
                break;
            }
        }
        match result {
            Ok(()) => return,
            Err(why) => {
                state.errors.fetch_add(1, Relaxed);
                state.version.send_modify(|v| *v += 1);
                warn!(%why, "replication connection ended; reconnecting");
            }
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 50);
        tokio::select! {
            _ = tokio::time::sleep(backoff.min(entry.backoff_max) + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(entry.backoff_max);
    }
}

struct InFlight {
    receipt: Receipt,
    ingest_us: Vec<u64>,
    behind: u64,
    rx: Pending,
}

/// Reports one queued apply's commit; the credit frame to send, if any.
fn finish(
    state: &UpstreamState,
    rep: &mut Replicator,
    p: InFlight,
    outcome: Result<Result<IngestOutcome, String>, oneshot::error::RecvError>,
) -> Result<Option<Frame>, String> {
    let outcome = outcome
        .map_err(|_| "log writer stopped".to_owned())?
        .map_err(|e| format!("log: {e}"))?;
    let now = now_us();
    for t in &p.ingest_us {
        state
            .latency
            .observe(now.saturating_sub(*t) as f64 / 1_000_000.0);
    }
    state.events.fetch_add(outcome.stored, Relaxed);
    state.duplicates.fetch_add(outcome.duplicates, Relaxed);
    let through = p.receipt.cursor.through;
    tracing::debug!(
        through,
        behind = p.behind,
        stored = outcome.stored,
        "stored a round"
    );
    if let Some(t) = p.ingest_us.iter().max() {
        state.newest_ingest_us.fetch_max(*t, Relaxed);
    }
    state.update(|s| {
        s.through = through;
        s.behind = p.behind;
        if let Some(t) = p.ingest_us.last() {
            s.lag_ms = now.saturating_sub(*t) / 1000;
        } else if p.behind == 0 {
            s.lag_ms = 0;
        }
    });
    Ok(rep.on_applied(p.receipt))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn resolve(from: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(from)
        .await
        .map_err(|e| format!("resolve {from}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {from}: no address"))
}

/// One connection: returns `Ok` on shutdown, `Err` when the connection ends otherwise.
async fn session(
    shared: &Shared,
    entry: &Replicate,
    state: &UpstreamState,
    rep: &mut Replicator,
    pending: &mut VecDeque<InFlight>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let addr = resolve(&entry.from).await?;
    let connecting = shared
        .endpoint
        .connect_with(shared.client.clone(), addr, &entry.server_name())
        .map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| "connect: timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv, shared.max_frame_bytes);
    let mut hello = rep.on_connected(&shared.node_id);
    if entry.compression == ReplicateCompression::Zstd {
        if let Frame::Hello { compression, .. } = &mut hello {
            *compression = vec![Compression::Zstd, Compression::None];
        }
    }
    // The largest frame this replica accepts: the upstream sizes its rounds to it.
    if let Frame::Hello {
        max_event_bytes, ..
    } = &mut hello
    {
        *max_event_bytes = shared.max_frame_bytes;
    }
    write_frame(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    // Anything from the upstream (a round or a heartbeat) or a commit of ours shows the link
    // alive; silence beyond SILENCE ends the connection.
    let mut heard = tokio::time::Instant::now();
    let result = async {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep_until(heard + SILENCE) => {
                    return Err(format!("nothing from the upstream for {SILENCE:?}"));
                }
                r = async { (&mut pending.front_mut().expect("guarded").rx).await }, if !pending.is_empty() => {
                    let p = pending.pop_front().expect("guarded");
                    heard = tokio::time::Instant::now();
                    if let Some(credit) = finish(state, rep, p, r)? {
                        write_frame(&mut send, &credit).await.map_err(|e| e.to_string())?;
                    }
                }
                f = reader.next(), if pending.len() < MAX_PENDING => {
                    let frame = match f {
                        Ok(Some(f)) => f,
                        Ok(None) => return Err("upstream closed the stream".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    };
                    heard = tokio::time::Instant::now();
                    if let Frame::Welcome { node_id, incarnation, compression, .. } = &frame {
                        validate_name("upstream node id", node_id)?;
                        info!(upstream = %node_id, incarnation, ?compression, "connected");
                        if *compression == Compression::Zstd {
                            reader.accept_compressed();
                        }
                        let id = node_id.clone();
                        state.update(|s| {
                            s.node_id = id;
                            s.connected = true;
                        });
                    }
                    match rep.on_frame(frame).map_err(|e| e.to_string())? {
                        Step::Send(f) => {
                            write_frame(&mut send, &f).await.map_err(|e| e.to_string())?;
                        }
                        Step::Idle { behind } => {
                            if pending.is_empty() {
                                state.update(|s| s.behind = behind);
                            }
                        }
                        Step::Apply(apply) => {
                            let receipt = apply.receipt();
                            let behind = apply.behind;
                            let mut batch = ReplicaBatch {
                                from: entry.from.clone(),
                                cursor: apply.cursor,
                                records: Vec::with_capacity(apply.records.len()),
                                not_selected: apply.not_selected,
                                rejected: Vec::new(),
                                truncated: apply.truncated,
                            };
                            if let Some((first, last)) = batch.truncated {
                                warn!(first, last, "upstream retention deleted records before they were replicated");
                            }
                            let mut ingest_us = Vec::new();
                            let mut unstorable = 0u64;
                            for r in apply.records {
                                // Names and ranges that would become storage keys or range-set
                                // entries are checked here: a record that fails is not stored.
                                if let Some(why) = unstorable_record(&r) {
                                    if unstorable == 0 {
                                        warn!(origin = %r.origin.escape_debug(), reason = %why, "replicated record refused");
                                    }
                                    unstorable += 1;
                                    continue;
                                }
                                if let ReplicatedItem::Event(ev) = &r.item {
                                    if let Some((code, reason)) = refuse(ev, shared.max_event_bytes) {
                                        batch.rejected.push(DeadLetter {
                                            origin: r.origin.clone(),
                                            epoch: r.epoch,
                                            seq: ev.seq,
                                            topic: ev.topic.clone(),
                                            code,
                                            reason,
                                            ts_us: now_us(),
                                        });
                                        continue;
                                    }
                                    ingest_us.push(r.ingest_us);
                                }
                                batch.records.push(r);
                            }
                            if unstorable > 0 {
                                state.refused.fetch_add(unstorable, Relaxed);
                            }
                            if batch.truncated.is_some_and(|(first, last)| first > last) {
                                batch.truncated = None;
                            }
                            let rx = shared.log.submit_replica(batch).await.map_err(|e| e.to_string())?;
                            pending.push_back(InFlight { receipt, ingest_us, behind, rx });
                        }
                    }
                }
            }
        }
    }
    .await;
    let code = match &result {
        Ok(()) => ErrorCode::SHUTTING_DOWN,
        Err(_) => ErrorCode::INTERNAL,
    };
    conn.close(
        quinn::VarInt::from_u32(u32::from(code.0)),
        b"replication ends",
    );
    result
}

/// Why a replicated record can never be stored (by any node): an origin or a node id on its
/// path that is not a valid name, an event seq or a gap range outside what seqs may be.
fn unstorable_record(r: &telemesh_proto::replication::Replicated) -> Option<String> {
    if let Err(why) = validate_name("origin", &r.origin) {
        return Some(why);
    }
    if let Some(why) = r
        .path
        .iter()
        .find_map(|(node, _)| validate_name("node id on the path", node).err())
    {
        return Some(why);
    }
    match &r.item {
        ReplicatedItem::Event(ev) if ev.seq == 0 || ev.seq > MAX_SEQ => {
            Some(format!("seq {} is outside 1..={MAX_SEQ}", ev.seq))
        }
        ReplicatedItem::Event(_) => None,
        ReplicatedItem::Gap(g) => g.validate().err(),
    }
}

/// Why a replicated event cannot be stored here, if it cannot.
fn refuse(ev: &telemesh_proto::Event, max_event_bytes: u64) -> Option<(ErrorCode, String)> {
    if let Err(e) = validate_topic_name(&ev.topic) {
        return Some((ErrorCode::INVALID_TOPIC, e.to_string()));
    }
    if ev.size() as u64 > max_event_bytes {
        return Some((
            ErrorCode::EVENT_TOO_LARGE,
            format!("{} bytes exceed {max_event_bytes}", ev.size()),
        ));
    }
    None
}
