//! The operator HTTP surface of telemesh's long-running roles: `GET /metrics` (Prometheus /
//! OpenMetrics text, through prometheus-client) and `GET /healthz`, served with axum. The node
//! and the edge agent use it; the client library never links it.
//!
//! - [`serve_http`] serves a [`Collector`] and a [`Health`] check on an address.
//! - [`counter`], [`gauge`] and [`Latency`] are the building blocks collectors encode with.
//! - [`MetricsSection`] is the `[metrics]` section both roles' configs share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// TCP address for HTTP.
    pub listen: SocketAddr,
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
    let task = tokio::spawn(accept_loop(listener, app));
    Ok((addr, task))
}

/// HTTP connections served at once, at most; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a client may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection may last (a scrape is one short request).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head, in bytes (the routes take no body).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Serves `app` on each connection `listener` accepts, within the limits above: a slow or
/// idle client holds a slot for at most [`HEADER_TIMEOUT`], and never more than
/// [`MAX_CONNECTIONS`] slots are held.
async fn accept_loop(listener: tokio::net::TcpListener, app: axum::Router) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}
