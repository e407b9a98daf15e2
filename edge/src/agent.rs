//! The running agent: the embedded rumqttd broker, the tap that copies every publish into
//! the buffer, and the buffer itself.
//!
//! The tap subscribes to `#` through rumqttd's in-process link and hands every publish to
//! the buffer's writer through its bounded queue (a full queue blocks the tap).
//!
//! Overruns: rumqttd appends every publish to one in-memory log per subscription filter —
//! for the tap, the log of `#`, created by the tap's subscription before any device can
//! connect, so its offsets start at 0 — and keeps at most `segment_bytes × segments` of it.
//! A reader that falls further behind is moved ahead silently. Every forwarded message
//! carries its absolute offset in that log, so the tap detects a skip exactly: an offset
//! beyond the next one expected means the broker dropped the messages in between. They are
//! recorded as an `overrun` gap of exactly that many events and counted — never silent.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkError, LinkRx};
use rumqttd::{Broker, Notification};
use telemesh_proto::topic::validate_topic_name;
use telemesh_proto::{check_event_size, GapReason, Headers};
use tracing::{error, info, warn};

use crate::buffer::{now_us, Buffer, BufferError, Handle, Incoming, Reader};
use crate::config::EdgeConfig;
use crate::durable::{DurableOptions, DurableServer};
use crate::metrics::EdgeMetrics;

/// Errors starting or stopping the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The buffer failed.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The MQTT port cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded broker refused its set-up.
    #[error("embedded broker: {0}")]
    Broker(String),
    /// A TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
}

/// A running edge agent.
#[derive(Debug)]
pub struct Agent {
    buffer: Buffer,
    stop: Arc<AtomicBool>,
    tap: Option<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    durable: Option<DurableServer>,
    uplink: Option<UplinkTask>,
    uplink_metrics: Arc<telemesh_gateway::UplinkMetrics>,
    metrics_http: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

/// Loads a PEM certificate chain and key into a rustls server config (ring provider).
pub fn server_tls(tls: &crate::config::TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("{}: {e}", tls.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn broker_config(cfg: &EdgeConfig) -> rumqttd::Config {
    let m = &cfg.mqtt;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: m.connect_timeout.as_millis() as u16,
        max_payload_size: m.max_payload.as_u64() as usize,
        max_inflight_count: m.max_inflight,
        auth: m.users.clone(),
        external_auth: None,
        dynamic_filters: true,
    };
    let tls = m.tls.as_ref().map(|t| rumqttd::TlsConfig::Rustls {
        capath: t.ca.as_ref().map(|p| p.display().to_string()),
        certpath: t.cert.display().to_string(),
        keypath: t.key.display().to_string(),
    });
    let server = |name: &str, listen: SocketAddr| rumqttd::ServerSettings {
        name: name.to_owned(),
        listen,
        tls: tls.clone(),
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let mut v4 = HashMap::new();
    v4.insert("v4".to_owned(), server("v4", m.listen));
    let v5 = m.listen_v5.map(|addr| {
        let mut v5 = HashMap::new();
        v5.insert("v5".to_owned(), server("v5", addr));
        v5
    });
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: m.max_connections + 1,
            max_outgoing_packet_count: 4096,
            max_segment_size: m.segment_bytes.as_u64() as usize,
            max_segment_count: m.segments,
            ..Default::default()
        },
        v4: Some(v4),
        v5,
        ..Default::default()
    }
}

/// Binds every configured TCP port once, so that a taken port is a clear error (rumqttd
/// only logs it).
fn check_ports(cfg: &EdgeConfig) -> Result<(), AgentError> {
    for addr in std::iter::once(cfg.mqtt.listen)
        .chain(cfg.mqtt.listen_v5)
        .chain(cfg.durable.as_ref().map(|d| d.listen))
    {
        TcpListener::bind(addr).map_err(|source| AgentError::Bind { addr, source })?;
    }
    Ok(())
}

/// Starts the embedded broker on its own thread and the tap that copies every publish into
/// the buffer (subscribed to `#` before any device can connect, so offsets start at 0).
fn start_broker_and_tap(
    cfg: &EdgeConfig,
    buffer: &Buffer,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    let mut broker = Broker::new(broker_config(cfg));
    let tap_id = format!("telemesh-tap-{:016x}", rand::random::<u64>());
    let (mut link_tx, link_rx) = broker
        .link(&tap_id)
        .map_err(|e| AgentError::Broker(e.to_string()))?;
    link_tx
        .subscribe("#")
        .map_err(|e| AgentError::Broker(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| AgentError::Broker(e.to_string()))?;
    let tap = Tap {
        handle: buffer.handle(),
        next_offset: 0,
        max_event: cfg.max_event_bytes(),
        too_large: 0,
    };
    std::thread::Builder::new()
        .name("mqtt-tap".into())
        .spawn(move || {
            // Keep the link's sender alive as long as the tap runs.
            let _link_tx = link_tx;
            tap.run(link_rx, &stop)
        })
        .map_err(|e| AgentError::Broker(e.to_string()))
}

/// The runtime of the durable port, the uplink and the HTTP surface (none if none is set).
fn io_runtime(cfg: &EdgeConfig) -> Result<Option<tokio::runtime::Runtime>, AgentError> {
    if cfg.durable.is_none() && cfg.uplink.is_none() && cfg.metrics.is_none() {
        return Ok(None);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent-io")
        .enable_all()
        .build()
        .map(Some)
        .map_err(|e| AgentError::Broker(e.to_string()))
}

/// Starts the durable-ack MQTT port.
fn start_durable(
    cfg: &EdgeConfig,
    d: &crate::config::DurableSection,
    rt: &tokio::runtime::Runtime,
    buffer: &Buffer,
) -> Result<DurableServer, AgentError> {
    let tls = d
        .tls
        .as_ref()
        .map(server_tls)
        .transpose()
        .map_err(AgentError::Tls)?;
    let opts = DurableOptions {
        listen: d.listen,
        tls,
        users: d.users.clone(),
        max_connections: d.max_connections,
        max_inflight: d.max_inflight,
        max_packet: d.max_packet.as_u64() as usize,
        connect_timeout: d.connect_timeout,
        idle_timeout: d.idle_timeout,
        max_event: cfg.max_event_bytes(),
    };
    rt.block_on(DurableServer::start(
        opts,
        buffer.handle(),
        buffer.reader(),
        buffer.metrics().clone(),
    ))
    .map_err(|source| AgentError::Bind {
        addr: d.listen,
        source,
    })
}

/// The uplink's settings from `[uplink]`, and its certificate, which must name the agent
/// (the node accepts events only under the origin its certificate names).
fn uplink_options(
    cfg: &EdgeConfig,
    u: &crate::config::UplinkSection,
) -> Result<
    (
        telemesh_gateway::UplinkOptions,
        telemesh_quic::tls::Identity,
    ),
    AgentError,
> {
    let roots =
        telemesh_quic::tls::load_roots(&u.ca).map_err(|e| AgentError::Tls(e.to_string()))?;
    let identity = telemesh_quic::tls::Identity::load(&u.cert, &u.key)
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    let named = identity.name();
    if named.as_deref() != Some(cfg.agent.id.as_str()) {
        return Err(AgentError::Tls(format!(
            "uplink.cert names {:?}, but agent.id is {:?}: they must be the same",
            named.unwrap_or_default(),
            cfg.agent.id
        )));
    }
    let opts = telemesh_gateway::UplinkOptions {
        nodes: u.nodes.clone(),
        server_name: u.server_name.clone(),
        roots,
        forwarder: telemesh_proto::forwarder::ForwarderConfig {
            batch_max_events: u.batch_max_events,
            batch_max_bytes: u.batch_max_bytes.as_u64() as usize,
            window: u.window,
            linger: u.linger,
        },
        max_event_bytes: cfg.max_event_bytes() as u32,
        backoff_max: u.backoff_max,
        connect_timeout: u.connect_timeout,
        failback_interval: u.failback_interval,
        ack_timeout: u.ack_timeout,
        compression: match u.compression {
            crate::config::UplinkCompression::None => telemesh_proto::frame::Compression::None,
            crate::config::UplinkCompression::Zstd => telemesh_proto::frame::Compression::Zstd,
        },
        max_bandwidth: u.max_bandwidth.map(|b| b.as_u64()),
    };
    Ok((opts, identity))
}

/// A running uplink: the sender that stops it, and its task.
type UplinkTask = (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
);

/// Starts the gateway uplink draining the buffer.
fn start_uplink(
    cfg: &EdgeConfig,
    u: &crate::config::UplinkSection,
    rt: &tokio::runtime::Runtime,
    buffer: &Buffer,
    metrics: &Arc<telemesh_gateway::UplinkMetrics>,
) -> Result<UplinkTask, AgentError> {
    let (opts, identity) = uplink_options(cfg, u)?;
    let source =
        crate::uplink::BufferSource::new(buffer.reader(), buffer.handle(), buffer.commits());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let origin = cfg.agent.id.clone();
    let m = metrics.clone();
    let task = rt.spawn(async move {
        if let Err(e) = telemesh_gateway::run(origin, opts, identity, source, m, stop_rx).await {
            error!(error = %e, "uplink stopped");
        }
    });
    Ok((stop_tx, task))
}

/// Serves `/metrics` and `/healthz` (503 once the buffer writer failed).
fn serve_metrics(
    m: &telemesh_http::MetricsSection,
    rt: &tokio::runtime::Runtime,
    buffer: &Buffer,
    uplink: &Arc<telemesh_gateway::UplinkMetrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AgentError> {
    let collector = crate::metrics::EdgeCollector {
        edge: buffer.metrics().clone(),
        uplink: uplink.clone(),
    };
    let edge = buffer.metrics().clone();
    let health: telemesh_http::Health = Arc::new(move || {
        let failed = edge.write_errors.load(Ordering::Relaxed);
        (failed > 0).then(|| format!("buffer writer failed ({failed} write errors)"))
    });
    rt.block_on(telemesh_http::serve_http(
        m.listen,
        Box::new(collector),
        health,
    ))
    .map_err(|source| AgentError::Bind {
        addr: m.listen,
        source,
    })
}

impl Agent {
    /// Opens the buffer, starts the broker and the tap, and — where configured — the durable
    /// port, the uplink and the HTTP surface.
    pub fn start(cfg: &EdgeConfig) -> Result<Agent, AgentError> {
        check_ports(cfg)?;
        let buffer = Buffer::open(
            &cfg.agent.data_dir.join("buffer"),
            &cfg.agent.id,
            cfg.buffer_options(),
            Arc::new(EdgeMetrics::default()),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let tap = start_broker_and_tap(cfg, &buffer, stop.clone())?;
        let runtime = io_runtime(cfg)?;
        let uplink_metrics = Arc::new(telemesh_gateway::UplinkMetrics::default());
        let (mut durable, mut uplink, mut metrics_http) = (None, None, None);
        if let Some(rt) = &runtime {
            if let Some(d) = &cfg.durable {
                durable = Some(start_durable(cfg, d, rt, &buffer)?);
            }
            if let Some(u) = &cfg.uplink {
                uplink = Some(start_uplink(cfg, u, rt, &buffer, &uplink_metrics)?);
            }
            if let Some(m) = &cfg.metrics {
                metrics_http = Some(serve_metrics(m, rt, &buffer, &uplink_metrics)?);
            }
        }
        info!(
            id = %cfg.agent.id,
            listen = %cfg.mqtt.listen,
            durable = ?cfg.durable.as_ref().map(|d| d.listen),
            epoch = buffer.epoch(),
            "edge agent running"
        );
        Ok(Agent {
            buffer,
            stop,
            tap: Some(tap),
            runtime,
            durable,
            uplink,
            uplink_metrics,
            metrics_http,
        })
    }

    /// The durable port's bound address, if it runs.
    pub fn durable_addr(&self) -> Option<SocketAddr> {
        self.durable.as_ref().map(DurableServer::local_addr)
    }

    /// Where `/metrics` and `/healthz` are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_http.as_ref().map(|(a, _)| *a)
    }

    /// The uplink's counters.
    pub fn uplink_metrics(&self) -> &Arc<telemesh_gateway::UplinkMetrics> {
        &self.uplink_metrics
    }

    /// The buffer's epoch for this run.
    pub fn epoch(&self) -> u64 {
        self.buffer.epoch()
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<EdgeMetrics> {
        self.buffer.metrics()
    }

    /// A reader of the committed buffer.
    pub fn reader(&self) -> Reader {
        self.buffer.reader()
    }

    /// A sender into the buffer.
    pub fn handle(&self) -> Handle {
        self.buffer.handle()
    }

    /// Clean stop: stops tapping, commits what was taken, marks the buffer clean. The
    /// broker's port stays bound until the process exits (rumqttd cannot be stopped).
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        if let Some(rt) = &self.runtime {
            if let Some(server) = self.durable.take() {
                rt.block_on(server.shutdown());
            }
            if let Some((stop, task)) = self.uplink.take() {
                let _ = stop.send(true);
                let _ = rt.block_on(task);
            }
            if let Some((_, http)) = self.metrics_http.take() {
                http.abort();
                let _ = rt.block_on(http);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(tap) = self.tap.take() {
            let _ = tap.join();
        }
        self.buffer.close()?;
        Ok(())
    }
}

struct Tap {
    handle: Handle,
    /// The offset in the broker's `#` log that the next forwarded message should have.
    next_offset: u64,
    /// The largest event the mesh takes from this agent ([`EdgeConfig::max_event_bytes`]).
    max_event: usize,
    /// Events refused for their size or header count (logged at the first and every
    /// 1,000th).
    too_large: u64,
}

impl Tap {
    fn run(mut self, mut rx: LinkRx, stop: &AtomicBool) {
        let _span = tracing::info_span!("mqtt_tap").entered();
        while !stop.load(Ordering::SeqCst) {
            let deadline = Instant::now() + Duration::from_millis(100);
            match rx.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(f))) => {
                    if self.forward(f).is_err() {
                        return;
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = rx.ready() {
                        error!(error = %e, "broker link closed");
                        return;
                    }
                }
                Ok(_) => {}
                Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {}
                Err(e) => {
                    error!(error = %e, "broker link closed");
                    return;
                }
            }
        }
    }

    fn forward(&mut self, f: rumqttd::Forward) -> Result<(), BufferError> {
        let publish = f.publish;
        if let Some((_, offset)) = f.cursor {
            if offset > self.next_offset {
                let lost = offset - self.next_offset;
                warn!(
                    lost,
                    "broker overrun: the tap fell behind and the broker skipped events"
                );
                self.handle.lost(lost, GapReason::Overrun)?;
            }
            self.next_offset = self.next_offset.max(offset + 1);
        }
        // rumqttd does not check topic names (it accepts wildcards in a PUBLISH, which MQTT
        // forbids): refuse invalid ones here, counted and logged, before they get a seq.
        let topic = match String::from_utf8(publish.topic.to_vec()) {
            Ok(t) if validate_topic_name(&t).is_ok() => t,
            other => {
                let why = match &other {
                    Ok(t) => validate_topic_name(t).err().map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                warn!(
                    topic = %String::from_utf8_lossy(&publish.topic),
                    error = why.as_deref().unwrap_or("invalid"),
                    "publish with an invalid topic name refused"
                );
                self.handle.reject_invalid();
                return Ok(());
            }
        };
        let headers = f.properties.and_then(|p| {
            let traceparent = p
                .user_properties
                .iter()
                .find(|(k, _)| k == "traceparent")
                .map(|(_, v)| v.clone());
            let h = Headers {
                user_properties: p.user_properties,
                content_type: p.content_type,
                traceparent,
            };
            (!h.is_empty()).then(|| Box::new(h))
        });
        // An event the mesh would refuse for its size is refused here, when it arrives, so
        // that no stored event can stall the uplink.
        if let Err(why) =
            check_event_size(&topic, &publish.payload, headers.as_deref(), self.max_event)
        {
            if self.too_large % 1_000 == 0 {
                warn!(topic, reason = %why, refused = self.too_large + 1, "publish refused: it could never be forwarded");
            }
            self.too_large += 1;
            self.handle.reject_invalid();
            return Ok(());
        }
        self.handle.append(Incoming {
            topic,
            payload: publish.payload.to_vec(),
            ts_us: now_us(),
            qos: 0,
            headers,
        })
    }
}

/// Connections the embedded broker closed on an error (malformed or oversized packets, a bad
/// CONNECT, a failed TLS handshake) in this process.
static BROKER_CONNECTION_ERRORS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// How many connections the embedded broker closed on an error, as counted by
/// [`BrokerErrorCounter`] (0 unless that layer is installed).
pub fn broker_connection_errors() -> u64 {
    BROKER_CONNECTION_ERRORS.load(Ordering::Relaxed)
}

/// A tracing layer that counts the embedded broker's connection errors. rumqttd reports them
/// only as log events, so the agent counts those events; `main` installs this layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrokerErrorCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BrokerErrorCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("rumqttd::server") {
            BROKER_CONNECTION_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}
