//! The gateway uplink: drives [`telemesh_proto::forwarder::Forwarder`] over QUIC with mutual
//! TLS, reading from and trimming a [`Source`] (the edge buffer).
//!
//! One connection at a time, to the first node of `nodes` that answers (tried in order),
//! with exponential backoff and jitter between rounds. On each connection: hello → welcome,
//! then batches on one stream with a window in flight; each ack moves the trim point, and
//! the source is trimmed only through what the node acknowledged — which it does only
//! after its commit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use telemesh_proto::forwarder::{BufferedGap, ForwardError, Forwarder, ForwarderConfig, Trim};
use telemesh_proto::frame::Compression;
use telemesh_proto::{Event, Frame, Role, PROTOCOL_VERSION};
use telemesh_quic::tls::{self, Identity};
use telemesh_quic::wire::{deflate, write_frame, FrameReader, WireError};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

/// Where the uplink reads events from and what it trims.
pub trait Source: Send + Sync + 'static {
    /// Up to `max` events after `after`, in order.
    fn read(&self, after: Option<(u64, u64)>, max: usize) -> Result<Vec<(u64, Event)>, String>;
    /// Every gap record not yet trimmed.
    fn gaps(&self) -> Result<Vec<BufferedGap>, String>;
    /// What the node acknowledged before (where to resume).
    fn acked(&self) -> Option<(u64, u64)>;
    /// Deletes what the node acknowledged.
    fn trim(&self, trim: Trim) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// Changes whenever new data may be readable.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// How the uplink connects.
#[derive(Debug)]
pub struct UplinkOptions {
    /// `host:port` of nodes, tried in order.
    pub nodes: Vec<String>,
    /// The name to verify on the node's certificate (default: each entry's host).
    pub server_name: Option<String>,
    /// The mesh CA.
    pub roots: Arc<rustls_roots::RootCertStore>,
    /// Batching and window.
    pub forwarder: ForwarderConfig,
    /// The largest event the agent sends (its max payload plus topic).
    pub max_event_bytes: u32,
    /// The longest wait between connection rounds.
    pub backoff_max: Duration,
    /// The longest a connection attempt (QUIC and TLS handshake) may take; a node that is
    /// down does not answer at all, so this is how long it takes to move on.
    pub connect_timeout: Duration,
    /// While connected to another node than the first, how often to check whether the first
    /// answers again (and go back to it when it does).
    pub failback_interval: Duration,
    /// With batches in flight, the longest wait for the next acknowledgement before the
    /// connection is given up and made anew (a path that drops everything is noticed this
    /// fast, instead of after QUIC's backed-off retransmissions or its idle timeout).
    pub ack_timeout: Duration,
    /// `Zstd` to send batches compressed when the node agrees.
    pub compression: Compression,
    /// At most this many frame bytes per second on average (after compression).
    pub max_bandwidth: Option<u64>,
}

/// A token bucket for the bandwidth cap: bytes are spent as frames are written, at most one
/// second's worth saved up, and a frame that overdraws is paid for by waiting.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl Pace {
    /// A bucket of `rate` bytes per second, full at `now`.
    pub fn new(rate: u64, now: std::time::Instant) -> Self {
        let rate = rate.max(1) as f64;
        Pace {
            rate,
            tokens: rate,
            at: now,
        }
    }

    /// Spends `bytes` at `now`; how long to wait before the next write.
    pub fn spend(&mut self, now: std::time::Instant, bytes: usize) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Re-exported so callers name the same rustls as the mesh.
pub mod rustls_roots {
    pub use telemesh_quic::tls::RootCertStore;
}

/// The uplink's counters.
#[derive(Debug, Default)]
pub struct UplinkMetrics {
    /// True while a node has welcomed this uplink.
    pub connected: AtomicBool,
    /// Connection attempts that failed or ended.
    pub reconnects: AtomicU64,
    /// Batches sent (including resends).
    pub batches_sent: AtomicU64,
    /// Batches acknowledged.
    pub batches_acked: AtomicU64,
    /// Batches sent and not yet acknowledged, now.
    pub in_flight: AtomicU64,
    /// Frame bytes written (batches and hellos).
    pub frame_bytes: AtomicU64,
    /// UDP bytes sent by finished connections (QUIC and TLS overhead included).
    pub udp_bytes: AtomicU64,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting failed.
    #[error("connect {node}: {why}")]
    Connect {
        /// The node.
        node: String,
        /// Why.
        why: String,
    },
    /// The node refused the hello.
    #[error("refused by {node}: {code} {reason}")]
    Rejected {
        /// The node.
        node: String,
        /// The code.
        code: telemesh_proto::ErrorCode,
        /// Why.
        reason: String,
    },
    /// The node refused a batch (for example its disk is full).
    #[error("batch {id} refused: {code} {reason}")]
    BatchRefused {
        /// The batch.
        id: u64,
        /// The code.
        code: telemesh_proto::ErrorCode,
        /// Why.
        reason: String,
    },
    /// The stream failed or carried nonsense.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The node answered out of order.
    #[error(transparent)]
    Protocol(#[from] ForwardError),
    /// The source failed.
    #[error("source: {0}")]
    Source(String),
    /// The connection ended.
    #[error("connection closed")]
    Closed,
    /// The first node answers again: going back to it.
    #[error("the first node answers again")]
    FailBack,
    /// Batches were in flight and no acknowledgement came within the ack timeout.
    #[error("no acknowledgement within {0:?}")]
    AckTimeout(Duration),
}

async fn resolve(node: &str) -> Result<(SocketAddr, String), SessionError> {
    let err = |why: String| SessionError::Connect {
        node: node.to_owned(),
        why,
    };
    let host = node
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| err("expected host:port".into()))?;
    let addr = tokio::net::lookup_host(node)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    Ok((addr, host.to_owned()))
}

/// Runs the uplink, presenting `identity` (whose name must be `origin`), until `shutdown`
/// turns true.
pub async fn run<S: Source>(
    origin: String,
    opts: UplinkOptions,
    identity: Identity,
    source: S,
    metrics: Arc<UplinkMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tls::TlsError> {
    let client = tls::client_config(opts.roots.clone(), identity)?;
    let socket = tls::udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(|e| tls::TlsError::Verifier(format!("uplink socket: {e}")))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| tls::TlsError::Verifier(format!("uplink endpoint: {e}")))?;
    endpoint.set_default_client_config(client);
    let mut fwd = Forwarder::new(origin.clone(), opts.forwarder, source.acked());
    let mut backoff = Duration::from_millis(50);
    loop {
        for (index, node) in opts.nodes.iter().enumerate() {
            if *shutdown.borrow() {
                endpoint.close(0u32.into(), b"shutting down");
                return Ok(());
            }
            let span = tracing::info_span!("uplink", %node);
            let preferred = (index > 0).then(|| opts.nodes[0].as_str());
            let result = session(
                &endpoint,
                node,
                preferred,
                &opts,
                &origin,
                &source,
                &mut fwd,
                &metrics,
                &mut shutdown,
            )
            .instrument(span)
            .await;
            metrics.connected.store(false, Relaxed);
            metrics.in_flight.store(0, Relaxed);
            fwd.on_disconnected();
            match result {
                Ok(()) => {
                    endpoint.close(0u32.into(), b"shutting down");
                    return Ok(());
                }
                Err(e) => {
                    metrics.reconnects.fetch_add(1, Relaxed);
                    warn!(%node, error = %e, "uplink session ended");
                    if matches!(
                        e,
                        SessionError::Connect { .. } | SessionError::Rejected { .. }
                    ) {
                        continue;
                    }
                    // The session had been up: start the next round quickly.
                    backoff = Duration::from_millis(50);
                    break;
                }
            }
        }
        // Full jitter in the upper half: never more than the cap.
        let jitter = rand::random_range(0.5..=1.0);
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(opts.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// True when `node` completes a handshake within the connect timeout.
async fn answers(
    endpoint: quinn::Endpoint,
    node: String,
    server_name: Option<String>,
    timeout: Duration,
) -> bool {
    let Ok((addr, host)) = resolve(&node).await else {
        return false;
    };
    let Ok(connecting) = endpoint.connect(addr, &server_name.unwrap_or(host)) else {
        return false;
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"probe");
            true
        }
        _ => false,
    }
}

/// Dials `node` (resolved now, verified as `server_name` or the node's host) within the
/// connect timeout.
async fn connect(
    endpoint: &quinn::Endpoint,
    node: &str,
    opts: &UplinkOptions,
) -> Result<quinn::Connection, SessionError> {
    let (addr, host) = resolve(node).await?;
    let name = opts.server_name.clone().unwrap_or(host);
    let connect_err = |why: String| SessionError::Connect {
        node: node.to_owned(),
        why,
    };
    let connecting = endpoint
        .connect(addr, &name)
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::time::timeout(opts.connect_timeout, connecting)
        .await
        .map_err(|_| connect_err("no answer within the connect timeout".into()))?
        .map_err(|e| connect_err(e.to_string()))
}

/// The uplink's stream after a welcome: where batches go, where acks come from, whether
/// the node agreed to zstd, and the largest frame it takes.
struct Welcomed {
    send: quinn::SendStream,
    reader: FrameReader,
    zstd: bool,
    max_frame: u32,
}

/// Opens the uplink stream and says hello; a reject ends the session with its code.
async fn handshake(
    conn: &quinn::Connection,
    node: &str,
    opts: &UplinkOptions,
    origin: &str,
) -> Result<Welcomed, SessionError> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| SessionError::Connect {
        node: node.to_owned(),
        why: e.to_string(),
    })?;
    write_frame(
        &mut send,
        &Frame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Uplink,
            id: origin.to_owned(),
            max_event_bytes: opts.max_event_bytes,
            compression: match opts.compression {
                Compression::Zstd => vec![Compression::Zstd, Compression::None],
                Compression::None => vec![Compression::None],
            },
        },
    )
    .await?;
    let mut reader = FrameReader::new(recv, 16 << 20);
    match reader.next().await? {
        Some(Frame::Welcome {
            node_id,
            incarnation,
            compression,
            max_frame_bytes,
            ..
        }) => {
            info!(%node_id, incarnation, ?compression, max_frame_bytes, "uplink connected");
            Ok(Welcomed {
                send,
                reader,
                zstd: compression == Compression::Zstd,
                max_frame: max_frame_bytes,
            })
        }
        Some(Frame::Reject { code, reason }) => Err(SessionError::Rejected {
            node: node.to_owned(),
            code,
            reason,
        }),
        _ => Err(SessionError::Closed),
    }
}

/// Sends every batch the forwarder can make now (within its window), compressed where
/// agreed and paced by the bandwidth cap.
async fn send_batches<S: Source>(
    up: &mut Welcomed,
    fwd: &mut Forwarder,
    source: &S,
    pace: &mut Option<Pace>,
    metrics: &UplinkMetrics,
) -> Result<(), SessionError> {
    while let Some(req) = fwd.wants_read() {
        let events = source
            .read(req.after, req.max_events)
            .map_err(SessionError::Source)?;
        let gaps = source.gaps().map_err(SessionError::Source)?;
        let frames = fwd.on_read(std::time::Instant::now(), events, &gaps);
        if frames.is_empty() {
            break;
        }
        for f in &frames {
            let n = if up.zstd {
                write_frame(&mut up.send, &deflate(f)?).await?
            } else {
                write_frame(&mut up.send, f).await?
            };
            metrics.frame_bytes.fetch_add(n as u64, Relaxed);
            metrics.batches_sent.fetch_add(1, Relaxed);
            if let Some(p) = pace.as_mut() {
                let wait = p.spend(std::time::Instant::now(), n);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        metrics.in_flight.store(fwd.in_flight() as u64, Relaxed);
    }
    Ok(())
}

/// An acknowledgement moves the forwarder and trims the source through what the node
/// committed; a refused batch ends the session (it is resent on the next).
async fn on_node_frame<S: Source>(
    frame: Option<Frame>,
    fwd: &mut Forwarder,
    source: &S,
    metrics: &UplinkMetrics,
) -> Result<(), SessionError> {
    match frame {
        Some(Frame::Ack { id, rejected }) => {
            for r in &rejected {
                warn!(seq = r.seq, code = %r.code, reason = %r.reason, "event refused by the node");
            }
            fwd.on_ack(id)?;
            metrics.batches_acked.fetch_add(1, Relaxed);
            metrics.in_flight.store(fwd.in_flight() as u64, Relaxed);
            if let Some(t) = fwd.poll_trim() {
                source.trim(t).await.map_err(SessionError::Source)?;
            }
            Ok(())
        }
        Some(Frame::BatchRefused { id, code, reason }) => {
            Err(SessionError::BatchRefused { id, code, reason })
        }
        _ => Err(SessionError::Closed),
    }
}

/// One connection to `node`: connect, hello, then batches out and acks in until the
/// connection ends, the ack timeout passes, the first node answers again (`preferred`), or
/// `shutdown` turns true (`Ok`).
#[allow(clippy::too_many_arguments)]
async fn session<S: Source>(
    endpoint: &quinn::Endpoint,
    node: &str,
    preferred: Option<&str>,
    opts: &UplinkOptions,
    origin: &str,
    source: &S,
    fwd: &mut Forwarder,
    metrics: &UplinkMetrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let conn = connect(endpoint, node, opts).await?;
    let _stats = CountUdpBytes(&conn, metrics);
    let mut up = handshake(&conn, node, opts, origin).await?;
    let mut pace = opts
        .max_bandwidth
        .map(|rate| Pace::new(rate, std::time::Instant::now()));
    metrics.connected.store(true, Relaxed);
    // Batches stay within the frame limit this node announced.
    fwd.limit_frame(up.max_frame as usize);
    fwd.on_connected();
    let mut changes = source.changes();
    let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
    let mut next_probe = tokio::time::Instant::now() + opts.failback_interval;
    // When the oldest unacknowledged batch started waiting (reset by every ack).
    let mut waiting_since: Option<tokio::time::Instant> = None;
    loop {
        send_batches(&mut up, fwd, source, &mut pace, metrics).await?;
        if fwd.in_flight() == 0 {
            waiting_since = None;
        } else if waiting_since.is_none() {
            waiting_since = Some(tokio::time::Instant::now());
        }
        let ack_deadline = waiting_since.map(|t| t + opts.ack_timeout);
        tokio::select! {
            frame = up.reader.next() => {
                on_node_frame(frame?, fwd, source, metrics).await?;
                waiting_since = None;
            }
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(fwd.poll_timeout().map_or(next_probe, tokio::time::Instant::from_std)),
                if fwd.poll_timeout().is_some() => {}
            _ = tokio::time::sleep_until(next_probe), if preferred.is_some() && probe.is_none() => {
                let first = preferred.unwrap_or_default().to_owned();
                probe = Some(tokio::spawn(answers(endpoint.clone(), first, opts.server_name.clone(), opts.connect_timeout)));
            }
            back = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                probe = None;
                if back.unwrap_or(false) {
                    info!("the first node answers again: going back to it");
                    conn.close(0u32.into(), b"failing back");
                    return Err(SessionError::FailBack);
                }
                next_probe = tokio::time::Instant::now() + opts.failback_interval;
            }
            _ = tokio::time::sleep_until(ack_deadline.unwrap_or(next_probe)), if ack_deadline.is_some() => {
                conn.close(0u32.into(), b"no acknowledgement");
                return Err(SessionError::AckTimeout(opts.ack_timeout));
            }
            _ = shutdown.changed() => {
                conn.close(0u32.into(), b"agent stopping");
                return Ok(());
            }
        }
    }
}

/// Adds a connection's UDP bytes sent to the metrics when its session ends.
struct CountUdpBytes<'a>(&'a quinn::Connection, &'a UplinkMetrics);

impl Drop for CountUdpBytes<'_> {
    fn drop(&mut self) {
        self.1
            .udp_bytes
            .fetch_add(self.0.stats().udp_tx.bytes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_bandwidth_cap_allows_a_second_of_burst_then_paces() {
        let t0 = Instant::now();
        let mut p = Pace::new(1_000, t0);
        // A full bucket takes 1,000 bytes at once.
        assert_eq!(p.spend(t0, 600), Duration::ZERO);
        assert_eq!(p.spend(t0, 400), Duration::ZERO);
        // The next 500 must wait half a second.
        let wait = p.spend(t0, 500);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // After that wait the debt is paid; a second later 1,000 more are free, never more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(p.spend(t1, 0), Duration::ZERO);
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(p.spend(t2, 1_000), Duration::ZERO);
        assert!(p.spend(t2, 1) > Duration::ZERO);
        // On average: 10 frames of 1,000 bytes at 1,000 B/s take about 9 s of waiting.
        let mut p = Pace::new(1_000, t0);
        let mut now = t0;
        for _ in 0..10 {
            now += p.spend(now, 1_000);
        }
        assert_eq!((now - t0).as_secs(), 9);
    }
}
