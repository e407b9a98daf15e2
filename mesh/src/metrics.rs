//! `GET /metrics` (Prometheus text, through prometheus-client) and `GET /healthz` for a node.
//!
//! The collector reads the node's counters and the log's completeness view at scrape time:
//! per origin and epoch the events held, known lost and refused, and each durable consumer's
//! lag in node seqs.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::log::NodeLog;
use crate::node::NodeMetrics;
use crate::replica::UpstreamState;

#[derive(Debug)]
struct NodeCollector {
    log: Arc<NodeLog>,
    metrics: Arc<NodeMetrics>,
    upstreams: Vec<Arc<UpstreamState>>,
}

/// Encodes one counter without labels.
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// Encodes one gauge without labels.
pub fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// A latency histogram in seconds, 50 µs to about 100 s in powers of two.
#[derive(Debug)]
pub struct Latency(pub Histogram);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new(exponential_buckets(0.000_05, 2.0, 22)))
    }
}

impl Latency {
    /// Records `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        self.0.observe(us as f64 / 1_000_000.0);
    }

    /// Encodes the histogram without labels.
    pub fn encode(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
    ) -> Result<(), std::fmt::Error> {
        let m = enc.encode_descriptor(name, help, None, self.0.metric_type())?;
        self.0.encode(m)
    }
}

fn count(ranges: &[(u64, u64)]) -> i64 {
    ranges.iter().map(|(a, b)| (b - a + 1) as i64).sum()
}

impl NodeCollector {
    fn encode_upstreams(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.upstreams.is_empty() {
            return Ok(());
        }
        let statuses: Vec<_> = self.upstreams.iter().map(|u| u.status()).collect();
        let gauge = ConstGauge::new(0i64).metric_type();
        let counter_type = ConstCounter::new(0u64).metric_type();
        type Pick = fn(&UpstreamState, &telemesh_proto::frame::UpstreamStatus) -> i64;
        let gauges: [(&str, &str, Pick); 3] = [
            (
                "telemesh_replication_connected",
                "1 while a connection to the upstream runs",
                |_, s| i64::from(s.connected),
            ),
            (
                "telemesh_replication_lag_events",
                "Upstream log records not yet replicated, as of the last round",
                |_, s| s.behind as i64,
            ),
            (
                "telemesh_replication_stored_through",
                "Upstream node seq stored through",
                |_, s| s.through as i64,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut fam = enc.encode_descriptor(name, help, None, gauge)?;
            for (u, s) in self.upstreams.iter().zip(&statuses) {
                let labels = vec![("upstream", s.from.clone())];
                ConstGauge::new(pick(u, s)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let mut fam = enc.encode_descriptor(
            "telemesh_replication_lag_seconds",
            "Caught up: upstream ingest to local commit of the newest replicated event; disconnected or behind: its age",
            None,
            ConstGauge::new(0f64).metric_type(),
        )?;
        for s in &statuses {
            let labels = vec![("upstream", s.from.clone())];
            ConstGauge::new(s.lag_ms as f64 / 1000.0).encode(fam.encode_family(&labels)?)?;
        }
        type Count = fn(&UpstreamState) -> u64;
        let counters: [(&str, &str, Count); 3] = [
            (
                "telemesh_replication_events",
                "Events stored from the upstream",
                |u| u.events.load(Relaxed),
            ),
            (
                "telemesh_replication_duplicates",
                "Events from the upstream that were already held",
                |u| u.duplicates.load(Relaxed),
            ),
            (
                "telemesh_replication_errors",
                "Replication connections that ended in an error",
                |u| u.errors.load(Relaxed),
            ),
        ];
        for (name, help, pick) in counters {
            let mut fam = enc.encode_descriptor(name, help, None, counter_type)?;
            for (u, s) in self.upstreams.iter().zip(&statuses) {
                let labels = vec![("upstream", s.from.clone())];
                ConstCounter::new(pick(u)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let mut fam = enc.encode_descriptor(
            "telemesh_replication_latency_seconds",
            "Upstream ingest to local commit, per replicated event",
            None,
            self.upstreams[0].latency.metric_type(),
        )?;
        for (u, s) in self.upstreams.iter().zip(&statuses) {
            let labels = vec![("upstream", s.from.clone())];
            u.latency.encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        counter(
            &mut enc,
            "telemesh_node_connections",
            "Connections accepted",
            m.connections.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_refused",
            "Connections refused (TLS or hello)",
            m.refused.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_batches_acked",
            "Uplink batches acknowledged",
            m.batches_acked.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_batches_refused",
            "Uplink batches refused",
            m.batches_refused.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_events_stored",
            "Events stored",
            m.events_stored.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_duplicates",
            "Events dropped as duplicates",
            m.duplicates.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_events_rejected",
            "Events refused on their own",
            m.events_rejected.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_protocol_errors",
            "Connections closed for protocol errors",
            m.protocol_errors.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_delivered",
            "Events delivered to consumers",
            m.delivered.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "telemesh_node_replicated_out",
            "Events sent to replicating peers",
            m.replicated_out.load(Relaxed),
        )?;
        m.ingest_latency.encode(
            &mut enc,
            "telemesh_node_ingest_latency_seconds",
            "Edge receive to node commit, per event from an uplink",
        )?;
        m.delivery_latency.encode(
            &mut enc,
            "telemesh_node_delivery_latency_seconds",
            "Edge receive to delivery to a consumer, per event",
        )?;
        counter(
            &mut enc,
            "telemesh_node_consumers_expired",
            "Durable consumers deleted after consumer_ttl away",
            *m.consumers_expired.borrow(),
        )?;
        self.encode_upstreams(&mut enc)?;
        let errors = m.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let mut fam = enc.encode_descriptor(
            "telemesh_node_errors",
            "Errors sent (refusals, closes, refused batches and events), by code",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (code, n) in errors {
            let code = telemesh_proto::ErrorCode(code);
            let labels = vec![("code", code.name().to_owned())];
            ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
        }
        let committed = *self.log.committed().borrow();
        let g = ConstGauge::new(committed as i64);
        g.encode(enc.encode_descriptor(
            "telemesh_node_committed_seq",
            "Last committed node seq",
            None,
            g.metric_type(),
        )?)?;
        let Ok(c) = self.log.completeness() else {
            return Ok(());
        };
        for (name, help, pick) in [
            (
                "telemesh_origin_held_events",
                "Events held per origin and epoch",
                0,
            ),
            (
                "telemesh_origin_lost_events",
                "Events known lost at the edge per origin and epoch",
                1,
            ),
            (
                "telemesh_origin_rejected_events",
                "Events refused per origin and epoch",
                2,
            ),
        ] {
            let mut fam =
                enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for o in &c.origins {
                let ranges = match pick {
                    0 => &o.held,
                    1 => &o.lost,
                    _ => &o.rejected,
                };
                let labels = vec![("origin", o.origin.clone()), ("epoch", o.epoch.to_string())];
                ConstGauge::new(count(ranges)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let mut fam = enc.encode_descriptor(
            "telemesh_consumer_lag_events",
            "Node seqs between the log's head and a durable consumer's ack",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for d in &c.consumers {
            let labels = vec![("identity", d.identity.clone()), ("name", d.name.clone())];
            ConstGauge::new(committed.saturating_sub(d.acked) as i64)
                .encode(fam.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` for a node on `listen`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    log: Arc<NodeLog>,
    metrics: Arc<NodeMetrics>,
    upstreams: Vec<Arc<UpstreamState>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let collector = NodeCollector {
        log: log.clone(),
        metrics,
        upstreams,
    };
    serve_http(
        listen,
        Box::new(collector),
        Arc::new(move || log.failure().map(|why| format!("log writer failed: {why}"))),
    )
    .await
}

/// Why a process is unhealthy, if it is (`/healthz` answers 503 with it).
pub type Health = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Serves `GET /metrics` (OpenMetrics text from `collector`) and `GET /healthz` (200 `ok`, or
/// 503 with the reason `health` gives) on `listen`; returns the bound address.
pub async fn serve_http(
    listen: SocketAddr,
    collector: Box<dyn Collector>,
    health: Health,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut registry = Registry::default();
    registry.register_collector(collector);
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            axum::http::StatusCode::OK,
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        ),
                        Err(_) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [("content-type", "text/plain")],
                            "encoding failed".to_owned(),
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let health = health.clone();
                async move {
                    match health() {
                        None => (axum::http::StatusCode::OK, "ok".to_owned()),
                        Some(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}
