//! The mesh node's QUIC server: mutual TLS, the hello handshake with `[[access]]` checks,
//! uplink ingest, subscriptions of consumers and peers, and status.
//!
//! - [`Node`]: opens the log, binds the endpoint (stable reset and connection-id keys derived
//!   from the node key), starts replication, retention and the HTTP surface; shuts down in
//!   order.
//! - `handshake`: a connection's identity from its certificate; every stream's hello checked
//!   and answered with a welcome or a reject, then handed to its role.
//! - `ingest`: an uplink connection carries its batches in order on one bidirectional
//!   stream. Each batch is validated (origin = certificate identity; every event's topic
//!   valid, within the uplink's `publish` filters and within the node's maximum size — an
//!   event that is not is refused on its own, a poison pill, and the rest of the batch is
//!   stored), queued for the log writer in arrival order, and an acker task answers `Ack` in
//!   batch order as each commit completes — so a window of batches is in flight while the
//!   node acknowledges only what is durable.
//! - `subscribe`: consumers and peers read the committed log from their cursor and follow
//!   the committed mark, bounded by their credit.
//! - `status`: the completeness view, consumers and upstreams for `telemesh status`.

mod handshake;
mod ingest;
mod status;
mod subscribe;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use telemesh_proto::ErrorCode;
use tracing::{debug, info, warn, Instrument};

use crate::config::NodeConfig;
use crate::log::NodeLog;
use crate::replica::UpstreamState;
use telemesh_quic::tls::{self, Identity, TlsError};

use handshake::connection;

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
    /// Connections accepted and not yet ended, all identities together.
    live: std::sync::atomic::AtomicUsize,
    /// Live connections per identity.
    per_identity: std::sync::Mutex<std::collections::HashMap<String, usize>>,
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
            live: Default::default(),
            per_identity: Default::default(),
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
                    // Address validation: a new address is sent a Retry first, so a
                    // spoofed source costs one packet, never a TLS handshake.
                    if !incoming.remote_address_validated() {
                        let _ = incoming.retry();
                        continue;
                    }
                    // The connection cap applies before the handshake.
                    if ctx.live.load(Relaxed) >= ctx.cfg.node.max_connections {
                        ctx.metrics.refused.fetch_add(1, Relaxed);
                        ctx.metrics.count_error(ErrorCode::LIMIT_EXCEEDED, 1);
                        incoming.refuse();
                        continue;
                    }
                    ctx.live.fetch_add(1, Relaxed);
                    let ctx = ctx.clone();
                    let remote = incoming.remote_address();
                    tokio::spawn(
                        async move {
                            match incoming.await {
                                Ok(conn) => connection(conn, ctx.clone()).await,
                                Err(e) => {
                                    ctx.metrics.refused.fetch_add(1, Relaxed);
                                    debug!(error = %e, "handshake failed");
                                }
                            }
                            ctx.live.fetch_sub(1, Relaxed);
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
