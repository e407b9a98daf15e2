//! The mesh node's QUIC server: mutual TLS, the hello handshake with `[[access]]` checks, and
//! uplink ingest.
//!
//! An uplink connection carries its batches in order on one bidirectional stream. The
//! connection task validates each batch (origin = certificate identity; every event's topic
//! valid, within the uplink's `publish` filters and within the node's maximum size — an event
//! that is not is refused on its own, a poison pill, and the rest of the batch is stored),
//! queues it for the log writer in arrival order, and an acker task answers `Ack` in batch
//! order as each commit completes — so a window of batches is in flight while the node
//! acknowledges only what is durable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use telemesh_proto::frame::{Compression, Rejection};
use telemesh_proto::replication::{PeerRound, Replicated, ReplicatedItem};
use telemesh_proto::topic::{matches, validate_topic_name};
use telemesh_proto::{ErrorCode, Frame, Role, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Access, NodeConfig};
use crate::log::{wait_commit, NodeLog, Pending, Record};
use crate::replica::UpstreamState;
use telemesh_quic::tls::{self, Identity, TlsError};
use telemesh_quic::wire::{write_frame, FrameReader, WireError};

/// The node's counters and latency histograms.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Connections accepted (handshake done).
    pub connections: AtomicU64,
    /// Connections refused at the TLS handshake or the hello.
    pub refused: AtomicU64,
    /// Batches acknowledged.
    pub batches_acked: AtomicU64,
    /// Batches refused whole.
    pub batches_refused: AtomicU64,
    /// Events stored.
    pub events_stored: AtomicU64,
    /// Events dropped as duplicates.
    pub duplicates: AtomicU64,
    /// Events refused on their own (poison pills).
    pub events_rejected: AtomicU64,
    /// Connections closed for malformed or unexpected frames.
    pub protocol_errors: AtomicU64,
    /// Events delivered to consumers.
    pub delivered: AtomicU64,
    /// Events sent to replicating peers.
    pub replicated_out: AtomicU64,
    /// Durable consumers deleted after `consumer_ttl` away.
    /// (A watch, so that it can be waited on.)
    pub consumers_expired: tokio::sync::watch::Sender<u64>,
    /// Edge receive (the event's `ts_us`) to this node's commit, per event from an uplink.
    pub ingest_latency: telemesh_http::Latency,
    /// Edge receive to delivery to a consumer, per event.
    pub delivery_latency: telemesh_http::Latency,
    /// Errors sent (refusals, closes, refused batches and events) by code.
    pub errors: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl NodeMetrics {
    /// Counts `n` errors with `code`.
    pub fn count_error(&self, code: ErrorCode, n: u64) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code.0)
            .or_default() += n;
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The log.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// The socket.
    #[error("node.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

struct Ctx {
    cfg: NodeConfig,
    log: Arc<NodeLog>,
    metrics: Arc<NodeMetrics>,
    /// Durable consumers with a live connection (a name is exclusive).
    active_durables: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Replication upstreams.
    upstreams: Vec<Arc<UpstreamState>>,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    retention_task: tokio::task::JoinHandle<()>,
    metrics_http: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    log: Arc<NodeLog>,
    metrics: Arc<NodeMetrics>,
    upstreams: Vec<Arc<UpstreamState>>,
    replication: Vec<tokio::task::JoinHandle<()>>,
    stop_replication: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// Opens the log, binds the QUIC endpoint and starts serving (on the current runtime).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let n = &cfg.node;
        let roots = tls::load_roots(&n.ca)?;
        let server = tls::server_config(roots.clone(), Identity::load(&n.cert, &n.key)?)?;
        // Nodes dial out to their upstreams with the same certificate.
        let client = tls::client_config(roots, Identity::load(&n.cert, &n.key)?)?;
        let log = Arc::new(NodeLog::open(
            &n.data_dir.join("log"),
            &n.id,
            n.map_size.as_u64(),
            n.sync,
        )?);
        let socket = tls::udp_socket(n.listen).map_err(|source| NodeError::Bind {
            addr: n.listen,
            source,
        })?;
        // A stateless-reset key derived from the node's own key: after a crash or restart the
        // node can still reset the connections of its previous run, so uplinks notice at
        // once instead of after the idle timeout.
        let key_bytes = std::fs::read(&n.key).map_err(|source| NodeError::Bind {
            addr: n.listen,
            source,
        })?;
        let mut seed = ring::digest::Context::new(&ring::digest::SHA256);
        seed.update(b"telemesh stateless reset v1");
        seed.update(&key_bytes);
        let digest = seed.finish();
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref());
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&digest.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // Connection ids that the next run of this node still recognises as its own, so it
        // answers packets of the previous run's connections with a stateless reset.
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NodeError::Bind {
            addr: n.listen,
            source,
        })?;
        let metrics = Arc::new(NodeMetrics::default());
        let (stop_replication, stop_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(crate::replica::Shared {
            node_id: n.id.clone(),
            endpoint: endpoint.clone(),
            client,
            log: log.clone(),
            max_event_bytes: n.max_event_bytes.as_u64(),
            max_frame_bytes: n.max_frame_bytes.as_u64() as u32,
        });
        let (upstreams, replication) = crate::replica::start(shared, &cfg.replicate, stop_rx);
        let ctx = Arc::new(Ctx {
            cfg: cfg.clone(),
            log: log.clone(),
            metrics: metrics.clone(),
            active_durables: Default::default(),
            upstreams: upstreams.clone(),
        });
        // Retention in the background: chunks of at most 10,000 records per transaction.
        let retention = cfg.retention.clone();
        let retention_bytes = cfg.retention_max_bytes();
        let rlog = log.clone();
        let rctx = ctx.clone();
        let retention_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(retention.interval);
            loop {
                tick.tick().await;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0);
                let min = now.saturating_sub(retention.max_age.as_micros() as u64);
                match rlog.retain(min, retention_bytes, 10_000).await {
                    Ok(0) => {}
                    Ok(n) => debug!(deleted = n, "retention"),
                    Err(e) => warn!(error = %e, "retention failed"),
                }
                // Durable consumers away longer than consumer_ttl expire (connected ones stay).
                let keep = rctx
                    .active_durables
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let before = now.saturating_sub(retention.consumer_ttl.as_micros() as u64);
                match rlog.expire_cursors(before, keep).await {
                    Ok(gone) => {
                        for k in gone {
                            let name = String::from_utf8_lossy(&k).replace('\0', "/");
                            info!(consumer = %name, "durable consumer expired (consumer_ttl)");
                            rctx.metrics.consumers_expired.send_modify(|n| *n += 1);
                        }
                    }
                    Err(e) => warn!(error = %e, "consumer expiry failed"),
                }
            }
        });
        let metrics_http = match &cfg.metrics {
            Some(m) => Some(
                crate::metrics::serve(m.listen, log.clone(), metrics.clone(), upstreams.clone())
                    .await
                    .map_err(|source| NodeError::Bind {
                        addr: m.listen,
                        source,
                    })?,
            ),
            None => None,
        };
        let ep = endpoint.clone();
        let task = tokio::spawn(
            async move {
                while let Some(incoming) = ep.accept().await {
                    let ctx = ctx.clone();
                    let remote = incoming.remote_address();
                    tokio::spawn(
                        async move {
                            match incoming.await {
                                Ok(conn) => connection(conn, ctx).await,
                                Err(e) => {
                                    ctx.metrics.refused.fetch_add(1, Relaxed);
                                    warn!(error = %e, "handshake failed");
                                }
                            }
                        }
                        .instrument(tracing::info_span!("conn", %remote)),
                    );
                }
            }
            .instrument(tracing::info_span!("node", id = %cfg.node.id)),
        );
        info!(id = %cfg.node.id, listen = ?endpoint.local_addr().ok(), incarnation = log.incarnation(), "node running");
        Ok(Node {
            endpoint,
            task,
            retention_task,
            metrics_http,
            log,
            metrics,
            upstreams,
            replication,
            stop_replication,
        })
    }

    /// The replication upstreams, in `[[replicate]]` order.
    pub fn upstreams(&self) -> &[Arc<UpstreamState>] {
        &self.upstreams
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Where `/metrics` and `/healthz` are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_http.as_ref().map(|(a, _)| *a)
    }

    /// The node's log.
    pub fn log(&self) -> &Arc<NodeLog> {
        &self.log
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Closes every connection with "shutting down" and stops.
    pub async fn shutdown(self) {
        // Replication first: it finishes the commits in hand and closes its connections.
        let began = std::time::Instant::now();
        let _ = self.stop_replication.send(true);
        for t in self.replication {
            let _ = t.await;
        }
        debug!(took = ?began.elapsed(), "replication stopped");
        self.endpoint.close(
            quinn::VarInt::from_u32(u32::from(ErrorCode::SHUTTING_DOWN.0)),
            b"shutting down",
        );
        // The close frames go out at once; waiting for the draining period (three probe
        // timeouts) only covers their loss, so it is bounded.
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            self.endpoint.wait_idle(),
        )
        .await;
        debug!(took = ?began.elapsed(), "connections closed");
        self.task.abort();
        self.retention_task.abort();
        let _ = self.task.await;
        let _ = self.retention_task.await;
        if let Some((_, http)) = self.metrics_http {
            http.abort();
            let _ = http.await;
        }
        // Connection tasks end as their connections close; the log closes with the last
        // of them (a node restarted in the same process must find it closed).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.log) > 1 && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        debug!(took = ?began.elapsed(), holders = Arc::strong_count(&self.log) - 1, "stopped");
    }
}

fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(
        quinn::VarInt::from_u32(u32::from(code.0)),
        reason.as_bytes(),
    );
}

/// A malformed or unexpected frame: counted, logged, and the connection closed with `code`.
fn protocol_error(ctx: &Ctx, conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    ctx.metrics.protocol_errors.fetch_add(1, Relaxed);
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "protocol error: closing the connection");
    close(conn, code, reason);
}

async fn reject(
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    ctx: &Ctx,
    code: ErrorCode,
    reason: String,
) {
    ctx.metrics.refused.fetch_add(1, Relaxed);
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "connection refused");
    let _ = write_frame(
        send,
        &Frame::Reject {
            code,
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = send.stopped().await;
    close(conn, code, &reason);
}

async fn connection(conn: quinn::Connection, ctx: Arc<Ctx>) {
    let Some(identity) = tls::peer_identity(&conn) else {
        ctx.metrics.refused.fetch_add(1, Relaxed);
        ctx.metrics.count_error(ErrorCode::UNKNOWN_IDENTITY, 1);
        close(
            &conn,
            ErrorCode::UNKNOWN_IDENTITY,
            "no identity in the client certificate",
        );
        return;
    };
    let span = tracing::info_span!("peer", %identity);
    // Every stream of the connection opens with its own hello (a consumer may run several
    // subscriptions on one connection).
    async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(
                stream(conn.clone(), identity.clone(), send, recv, ctx.clone())
                    .instrument(tracing::Span::current()),
            );
        }
    }
    .instrument(span)
    .await
}

async fn stream(
    conn: quinn::Connection,
    identity: String,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: Arc<Ctx>,
) {
    {
        let max_frame = ctx.cfg.node.max_frame_bytes.as_u64() as u32;
        let mut reader = FrameReader::new(recv, max_frame);
        let hello = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                protocol_error(&ctx, &conn, ErrorCode::MALFORMED_FRAME, &e.to_string());
                return;
            }
        };
        let Frame::Hello {
            version,
            role,
            id,
            max_event_bytes,
            compression: offered,
        } = hello
        else {
            protocol_error(
                &ctx,
                &conn,
                ErrorCode::UNEXPECTED_FRAME,
                "the first frame must be a hello",
            );
            return;
        };
        if version != PROTOCOL_VERSION {
            let why = format!("protocol version {version} is not {PROTOCOL_VERSION}");
            return reject(&mut send, &conn, &ctx, ErrorCode::UNSUPPORTED_VERSION, why).await;
        }
        if id != identity {
            let why = format!("hello id {id:?} differs from the certificate's {identity:?}");
            return reject(&mut send, &conn, &ctx, ErrorCode::IDENTITY_MISMATCH, why).await;
        }
        let Some(access) = ctx.cfg.access_for(&identity, role).cloned() else {
            let known = ctx.cfg.access.iter().any(|a| a.identity == identity);
            let (code, why) = if known {
                (
                    ErrorCode::ROLE_DENIED,
                    format!("{identity} may not connect as {}", role.as_str()),
                )
            } else {
                (
                    ErrorCode::UNKNOWN_IDENTITY,
                    format!("{identity} has no access entry"),
                )
            };
            return reject(&mut send, &conn, &ctx, code, why).await;
        };
        let node_max = ctx.cfg.node.max_event_bytes.as_u64() as u32;
        if role == Role::Uplink && max_event_bytes > node_max {
            let why = format!("the edge's max payload {max_event_bytes} exceeds the node's maximum event size {node_max}");
            return reject(&mut send, &conn, &ctx, ErrorCode::LIMITS_MISMATCH, why).await;
        }
        // An uplink that offers zstd may send its batches compressed; a peer that offers it
        // gets its replication rounds compressed.
        let compression = if role != Role::Consumer && offered.contains(&Compression::Zstd) {
            if role == Role::Uplink {
                reader.accept_compressed();
            }
            Compression::Zstd
        } else {
            Compression::None
        };
        let welcome = Frame::Welcome {
            version: PROTOCOL_VERSION,
            node_id: ctx.cfg.node.id.clone(),
            incarnation: ctx.log.incarnation(),
            max_event_bytes: node_max,
            max_frame_bytes: max_frame,
            compression,
        };
        if write_frame(&mut send, &welcome).await.is_err() {
            return;
        }
        ctx.metrics.connections.fetch_add(1, Relaxed);
        debug!(role = role.as_str(), "welcomed");
        if role == Role::Consumer || role == Role::Peer {
            let zstd = compression == Compression::Zstd;
            consumer(conn, identity, role, zstd, access, reader, send, ctx).await;
        } else {
            uplink(conn, identity, access, reader, send, ctx).await;
        }
    }
}

enum AckItem {
    /// A batch queued for the writer, with its events' edge receive times.
    Pending(u64, Vec<Rejection>, Pending, Vec<u64>),
    Refused(u64, ErrorCode, String),
}

async fn uplink(
    conn: quinn::Connection,
    identity: String,
    access: Access,
    mut reader: FrameReader,
    send: quinn::SendStream,
    ctx: Arc<Ctx>,
) {
    let (tx, rx) = mpsc::channel::<AckItem>(64);
    let acker = tokio::spawn(acker(send, rx, ctx.metrics.clone()));
    let max_event = ctx.cfg.node.max_event_bytes.as_u64() as usize;
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(WireError::Read(_)) => break,
            Err(e) => {
                protocol_error(&ctx, &conn, ErrorCode::MALFORMED_FRAME, &e.to_string());
                break;
            }
        };
        let Frame::Batch {
            id,
            origin,
            epoch,
            events,
            gaps,
        } = frame
        else {
            protocol_error(
                &ctx,
                &conn,
                ErrorCode::UNEXPECTED_FRAME,
                "an uplink sends batches only",
            );
            break;
        };
        if origin != identity {
            let why = format!("batch origin {origin:?} is not the uplink's identity {identity:?}");
            if tx
                .send(AckItem::Refused(id, ErrorCode::ORIGIN_MISMATCH, why))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let mut rejected = Vec::new();
        let mut refused_topics = std::collections::HashMap::new();
        let mut accepted = Vec::with_capacity(events.len());
        for ev in events {
            let refusal = if let Err(e) = validate_topic_name(&ev.topic) {
                Some((ErrorCode::INVALID_TOPIC, e.to_string()))
            } else if !access.publish.iter().any(|f| matches(f, &ev.topic)) {
                Some((
                    ErrorCode::PUBLISH_DENIED,
                    format!(
                        "topic {:?} is outside this uplink's publish filters",
                        ev.topic
                    ),
                ))
            } else if ev.size() > max_event {
                Some((
                    ErrorCode::EVENT_TOO_LARGE,
                    format!("event of {} bytes exceeds {max_event}", ev.size()),
                ))
            } else {
                None
            };
            match refusal {
                Some((code, reason)) => {
                    warn!(seq = ev.seq, %code, %reason, "event refused");
                    refused_topics.insert(ev.seq, ev.topic.clone());
                    rejected.push(Rejection {
                        seq: ev.seq,
                        code,
                        reason,
                    });
                }
                None => accepted.push(ev),
            }
        }
        ctx.metrics
            .events_rejected
            .fetch_add(rejected.len() as u64, Relaxed);
        for r in &rejected {
            ctx.metrics.count_error(r.code, 1);
        }
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let dead: Vec<telemesh_proto::frame::DeadLetter> = rejected
            .iter()
            .map(|r| telemesh_proto::frame::DeadLetter {
                origin: origin.clone(),
                epoch,
                seq: r.seq,
                topic: refused_topics.get(&r.seq).cloned().unwrap_or_default(),
                code: r.code,
                reason: r.reason.clone(),
                ts_us: now_us,
            })
            .collect();
        let received: Vec<u64> = accepted.iter().map(|e| e.ts_us).collect();
        match ctx.log.submit(origin, epoch, accepted, gaps, dead).await {
            Ok(pending) => {
                if tx
                    .send(AckItem::Pending(id, rejected, pending, received))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(AckItem::Refused(
                        id,
                        ErrorCode::STORAGE_FAILED,
                        e.to_string(),
                    ))
                    .await;
            }
        }
    }
    drop(tx);
    let _ = acker.await;
}

async fn acker(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<AckItem>,
    metrics: Arc<NodeMetrics>,
) {
    while let Some(item) = rx.recv().await {
        let frame = match item {
            AckItem::Pending(id, rejected, pending, received) => match wait_commit(pending).await {
                Ok(outcome) => {
                    // Resent batches would count their first journey twice: left out.
                    if outcome.duplicates == 0 {
                        let now = crate::log::now_us();
                        for t in received {
                            metrics.ingest_latency.observe_us(now.saturating_sub(t));
                        }
                    }
                    metrics.batches_acked.fetch_add(1, Relaxed);
                    metrics.events_stored.fetch_add(outcome.stored, Relaxed);
                    metrics.duplicates.fetch_add(outcome.duplicates, Relaxed);
                    Frame::Ack { id, rejected }
                }
                Err(e) => {
                    metrics.batches_refused.fetch_add(1, Relaxed);
                    let full = matches!(&e, crate::log::LogError::Writer(w) if w == crate::log::STORAGE_FULL);
                    let code = if full {
                        ErrorCode::STORAGE_FULL
                    } else {
                        ErrorCode::STORAGE_FAILED
                    };
                    metrics.count_error(code, 1);
                    Frame::BatchRefused {
                        id,
                        code,
                        reason: e.to_string(),
                    }
                }
            },
            AckItem::Refused(id, code, reason) => {
                metrics.batches_refused.fetch_add(1, Relaxed);
                metrics.count_error(code, 1);
                Frame::BatchRefused { id, code, reason }
            }
        };
        if write_frame(&mut send, &frame).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Releases a durable consumer's name when its connection ends.
struct DurableGuard<'a>(&'a Ctx, Option<Vec<u8>>);

impl Drop for DurableGuard<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.1.take() {
            self.0
                .active_durables
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
            // consumer_ttl counts from the end of the last connection.
            self.0.log.touch_cursor(k);
        }
    }
}

/// Refuses a subscription: the error ends its stream; the connection stays for others.
async fn send_error(send: &mut quinn::SendStream, ctx: &Ctx, code: ErrorCode, reason: String) {
    ctx.metrics.count_error(code, 1);
    warn!(%code, %reason, "subscription refused");
    let _ = write_frame(send, &Frame::Error { code, reason }).await;
    let _ = send.finish();
}

/// A log record as it travels to a replica.
fn replicated(node_seq: u64, rec: Record) -> Replicated {
    match rec {
        Record::Event {
            origin,
            epoch,
            ingest_us,
            event,
            path,
        } => Replicated {
            node_seq,
            ingest_us,
            origin,
            epoch,
            path,
            item: ReplicatedItem::Event(event),
        },
        Record::Gap {
            origin,
            epoch,
            ingest_us,
            gap,
            path,
        } => Replicated {
            node_seq,
            ingest_us,
            origin,
            epoch,
            path,
            item: ReplicatedItem::Gap(gap),
        },
    }
}

/// Serves one subscription: catch-up and live tail are one loop — read the committed log
/// from the cursor, and when it is reached, wait for the committed mark to move. Credit
/// bounds what is sent ahead of the consumer, so a slow consumer costs no memory.
#[allow(clippy::too_many_arguments)]
async fn consumer(
    conn: quinn::Connection,
    identity: String,
    role: Role,
    zstd: bool,
    access: Access,
    mut reader: FrameReader,
    mut send: quinn::SendStream,
    ctx: Arc<Ctx>,
) {
    use telemesh_proto::frame::{Delivered, DeliveredGap};
    use telemesh_proto::topic::{filter_within, validate_filter};
    use telemesh_proto::Start;

    let first = reader.next().await;
    if let Ok(Some(Frame::StatusRequest)) = first {
        let frame = match ctx.log.completeness() {
            Ok(c) => Frame::Status {
                node_id: ctx.cfg.node.id.clone(),
                committed: *ctx.log.committed().borrow(),
                origins: c.origins,
                consumers: c.consumers,
                dead_letters: c.dead_letters,
                upstreams: ctx.upstreams.iter().map(|u| u.status()).collect(),
            },
            Err(e) => Frame::Error {
                code: ErrorCode::INTERNAL,
                reason: e.to_string(),
            },
        };
        let _ = write_frame(&mut send, &frame).await;
        let _ = send.finish();
        return;
    }
    let Ok(Some(Frame::Subscribe {
        filters,
        start,
        durable,
        credit,
        gaps: want_gaps,
        incarnation: peer_incarnation,
    })) = first
    else {
        protocol_error(
            &ctx,
            &conn,
            ErrorCode::UNEXPECTED_FRAME,
            "a consumer starts with subscribe",
        );
        return;
    };
    if filters.is_empty() {
        return send_error(
            &mut send,
            &ctx,
            ErrorCode::INVALID_FILTER,
            "no filter".into(),
        )
        .await;
    }
    for f in &filters {
        if let Err(e) = validate_filter(f) {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::INVALID_FILTER,
                format!("{f:?}: {e}"),
            )
            .await;
        }
        let allowed = access
            .read
            .as_ref()
            .is_none_or(|read| read.iter().any(|r| filter_within(f, r)));
        if !allowed {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::READ_DENIED,
                format!("{f:?} is outside what {identity} may read"),
            )
            .await;
        }
    }
    // A peer keeps its cursor in its own log: the node keeps no state for it.
    let peer = (role == Role::Peer).then(|| peer_incarnation.unwrap_or(0));
    let durable = if peer.is_some() { None } else { durable };
    let key = durable
        .as_ref()
        .map(|name| crate::log::cursor_key(&identity, name));
    let stored = match &key {
        Some(k) => ctx.log.cursor(k).ok().flatten(),
        None => None,
    };
    if stored.as_ref().is_some_and(|c| c.filters != filters) {
        return send_error(
            &mut send,
            &ctx,
            ErrorCode::DURABLE_FILTERS_DIFFER,
            "the durable name has other filters".into(),
        )
        .await;
    }
    let mut guard = DurableGuard(&ctx, None);
    if let Some(k) = &key {
        let fresh = ctx
            .active_durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone());
        if !fresh {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::DURABLE_IN_USE,
                "the durable name is in use".into(),
            )
            .await;
        }
        guard.1 = Some(k.clone());
    }
    let committed_now = *ctx.log.committed().borrow();
    let mut from = match &stored {
        Some(c) => c.acked + 1,
        None => match start {
            Start::Earliest => ctx.log.first_seq().unwrap_or(1),
            Start::Latest => committed_now + 1,
            Start::Seq(n) => n.max(1),
            Start::Time(t) => ctx.log.seq_at_time(t).unwrap_or(committed_now + 1),
        },
    };
    if let (Some(k), None) = (&key, &stored) {
        let cursor = crate::log::Cursor {
            filters: filters.clone(),
            acked: from - 1,
            seen_us: crate::log::now_us(),
        };
        if ctx.log.put_cursor(k.clone(), cursor).await.is_err() {
            return send_error(
                &mut send,
                &ctx,
                ErrorCode::STORAGE_FAILED,
                "cannot store the cursor".into(),
            )
            .await;
        }
    }
    let earliest = ctx.log.first_seq().unwrap_or(1);
    if from < earliest {
        if write_frame(
            &mut send,
            &Frame::Truncated {
                requested: from,
                earliest,
            },
        )
        .await
        .is_err()
        {
            return;
        }
        from = earliest;
    }
    if write_frame(&mut send, &Frame::Subscribed { from })
        .await
        .is_err()
    {
        return;
    }
    let mut credit = u64::from(credit);
    let mut committed = ctx.log.committed();
    loop {
        let head = *committed.borrow_and_update();
        let deliverable = credit > 0 && from <= head;
        if deliverable {
            let want = credit.min(1_000) as usize;
            // Read about what the credit can take: records read past it would be decoded
            // only to be read again next round.
            let records = match ctx.log.read(from, want.max(256)) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "log read failed");
                    break;
                }
            };
            // Retention may have deleted what this subscription had not read yet.
            if let Some((first, _)) = records.first() {
                if *first > from {
                    let t = Frame::Truncated {
                        requested: from,
                        earliest: *first,
                    };
                    if write_frame(&mut send, &t).await.is_err() {
                        break;
                    }
                    from = *first;
                }
            }
            let frame = if let Some(incarnation) = peer {
                // A quarter of the frame limit leaves room for the framing of the records.
                let budget = ctx.cfg.node.max_frame_bytes.as_u64() as usize / 4;
                let mut round =
                    PeerRound::new(&filters, (&identity, incarnation), from, want, budget);
                for (seq, rec) in records {
                    if seq > head || !round.offer(seq, replicated(seq, rec)) {
                        break;
                    }
                }
                from = round.through() + 1;
                credit -= round.events() as u64;
                ctx.metrics
                    .replicated_out
                    .fetch_add(round.events() as u64, Relaxed);
                let frame = round.into_frame(head);
                if zstd {
                    match telemesh_quic::wire::deflate(&frame) {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(error = %e, "compression failed");
                            break;
                        }
                    }
                } else {
                    frame
                }
            } else {
                let mut events = Vec::new();
                let mut gap_items = Vec::new();
                let mut through = from - 1;
                for (seq, rec) in records {
                    if seq > head || events.len() >= want {
                        break;
                    }
                    through = seq;
                    match rec {
                        Record::Event {
                            origin,
                            epoch,
                            ingest_us,
                            event,
                            ..
                        } => {
                            if filters.iter().any(|f| matches(f, &event.topic)) {
                                events.push(Delivered {
                                    node_seq: seq,
                                    ingest_us,
                                    origin,
                                    epoch,
                                    event,
                                });
                            }
                        }
                        Record::Gap {
                            origin, epoch, gap, ..
                        } => {
                            if want_gaps {
                                gap_items.push(DeliveredGap {
                                    node_seq: seq,
                                    origin,
                                    epoch,
                                    gap,
                                });
                            }
                        }
                    }
                }
                from = through + 1;
                if events.is_empty() && gap_items.is_empty() {
                    Frame::Scanned { through }
                } else {
                    credit -= events.len() as u64;
                    ctx.metrics
                        .delivered
                        .fetch_add(events.len() as u64, Relaxed);
                    let now = crate::log::now_us();
                    for e in &events {
                        ctx.metrics
                            .delivery_latency
                            .observe_us(now.saturating_sub(e.event.ts_us));
                    }
                    Frame::Deliver {
                        events,
                        gaps: gap_items,
                    }
                }
            };
            if write_frame(&mut send, &frame).await.is_err() {
                break;
            }
        }
        let deliverable = credit > 0 && from <= *committed.borrow();
        tokio::select! {
            biased;
            f = reader.next() => match f {
                Ok(Some(Frame::Credit { events })) => credit = credit.saturating_add(u64::from(events)),
                Ok(Some(Frame::ConsumerAck { through })) => {
                    if let Some(k) = &key {
                        let cursor = crate::log::Cursor { filters: filters.clone(), acked: through.min(from - 1), seen_us: crate::log::now_us() };
                        if ctx.log.put_cursor(k.clone(), cursor).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Some(f)) => {
                    let why = format!("a subscriber sends credit and acks only, not {}", f.kind());
                    protocol_error(&ctx, &conn, ErrorCode::UNEXPECTED_FRAME, &why);
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    if !matches!(e, WireError::Read(_)) {
                        protocol_error(&ctx, &conn, ErrorCode::MALFORMED_FRAME, &e.to_string());
                    }
                    break;
                }
            },
            r = committed.changed(), if !deliverable => if r.is_err() { break },
            _ = std::future::ready(()), if deliverable => {}
            // An idle peer link carries a heartbeat: how far the log goes, and that the
            // path works.
            _ = tokio::time::sleep(telemesh_proto::replication::HEARTBEAT), if peer.is_some() && !deliverable => {
                let beat = Frame::Replicate {
                    through: from - 1,
                    head: *committed.borrow(),
                    records: Vec::new(),
                    not_selected: Vec::new(),
                };
                if write_frame(&mut send, &beat).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(guard);
}
