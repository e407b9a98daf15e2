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
use telemesh_http::{counter, serve_http};

use crate::log::{Completeness, NodeLog};
use crate::node::NodeMetrics;
use crate::replica::UpstreamState;

#[derive(Debug)]
struct NodeCollector {
    log: Arc<NodeLog>,
    metrics: Arc<NodeMetrics>,
    upstreams: Vec<Arc<UpstreamState>>,
    /// The completeness view of the last scrape, reused for [`COMPLETENESS_MAX_AGE`]: a
    /// flood of scrapes costs one read of the range sets per interval, not one each.
    cache: std::sync::Mutex<Option<(std::time::Instant, Arc<Completeness>)>>,
}

/// How long a scrape reuses the completeness view read by an earlier one.
const COMPLETENESS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl NodeCollector {
    fn completeness(&self) -> Option<Arc<Completeness>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, c)) = cache.as_ref() {
            if at.elapsed() < COMPLETENESS_MAX_AGE {
                return Some(c.clone());
            }
        }
        let c = Arc::new(self.log.completeness().ok()?);
        *cache = Some((std::time::Instant::now(), c.clone()));
        Some(c)
    }
}

fn count(ranges: &[(u64, u64)]) -> i64 {
    ranges
        .iter()
        .map(|(a, b)| b.saturating_sub(*a).saturating_add(1))
        .fold(0u64, u64::saturating_add)
        .min(i64::MAX as u64) as i64
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
        let counters: [(&str, &str, Count); 4] = [
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
            (
                "telemesh_replication_refused",
                "Records from the upstream refused because they can never be stored (invalid origin or node id, seq or gap out of bounds)",
                |u| u.refused.load(Relaxed),
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
        let Some(c) = self.completeness() else {
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
        cache: Default::default(),
    };
    serve_http(
        listen,
        Box::new(collector),
        Arc::new(move || log.failure().map(|why| format!("log writer failed: {why}"))),
    )
    .await
}
