//! The agent's counters. Plain atomics, updated by the writer and the tap, read by anyone
//! (the metrics endpoint, tests, the demo).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use telemesh_http::{counter, gauge, Latency};
use telemesh_proto::GapReason;

/// Counters of one edge agent.
#[derive(Debug)]
pub struct EdgeMetrics {
    /// Time of each buffer commit (transaction and sync), in µs.
    pub commit_us: Mutex<Histogram<u64>>,
    /// The same, for `/metrics`.
    pub commit_latency: Latency,
    /// Events taken in from devices (stored or not).
    pub events_in: AtomicU64,
    /// Topic and payload bytes taken in from devices.
    pub bytes_in: AtomicU64,
    /// Events in the buffer now (committed).
    pub buffer_events: AtomicU64,
    /// Bytes the buffer's events account for now (committed).
    pub buffer_bytes: AtomicU64,
    /// The buffer's `max_bytes`.
    pub buffer_max_bytes: AtomicU64,
    /// LMDB write transactions committed.
    pub commits: AtomicU64,
    /// Syncs to disk: commits with `sync = always`, forced syncs otherwise.
    pub fsyncs: AtomicU64,
    /// Events dropped because drop-oldest evicted them.
    pub drops_evicted: AtomicU64,
    /// Events refused because the buffer was full.
    pub drops_refused: AtomicU64,
    /// Events the embedded broker skipped (reader overrun).
    pub drops_overrun: AtomicU64,
    /// Events lost because the disk failed or the map stayed full.
    pub drops_storage: AtomicU64,
    /// Edge receive time (µs) of the oldest event in the buffer; 0 when empty.
    pub oldest_event_us: AtomicU64,
    /// Write failures (commit errors); the writer stops writing after the first.
    pub write_errors: AtomicU64,
    /// Events refused as invalid (for example a wildcard in a PUBLISH topic).
    pub rejected_invalid: AtomicU64,
    /// Open connections on the durable port.
    pub durable_connections: AtomicU64,
    /// Connections the durable port refused (limit, login, client id).
    pub durable_refused: AtomicU64,
    /// Connections the durable port closed for malformed packets or protocol violations.
    pub durable_protocol_errors: AtomicU64,
    /// PUBACKs and PUBRECs sent after commit.
    pub durable_acks: AtomicU64,
    /// Resent publishes recognised and not stored again.
    pub durable_duplicates: AtomicU64,
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeSnapshot {
    /// See [`EdgeMetrics::events_in`].
    pub events_in: u64,
    /// See [`EdgeMetrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`EdgeMetrics::buffer_events`].
    pub buffer_events: u64,
    /// See [`EdgeMetrics::buffer_bytes`].
    pub buffer_bytes: u64,
    /// See [`EdgeMetrics::buffer_max_bytes`].
    pub buffer_max_bytes: u64,
    /// See [`EdgeMetrics::commits`].
    pub commits: u64,
    /// See [`EdgeMetrics::fsyncs`].
    pub fsyncs: u64,
    /// See [`EdgeMetrics::drops_evicted`].
    pub drops_evicted: u64,
    /// See [`EdgeMetrics::drops_refused`].
    pub drops_refused: u64,
    /// See [`EdgeMetrics::drops_overrun`].
    pub drops_overrun: u64,
    /// See [`EdgeMetrics::drops_storage`].
    pub drops_storage: u64,
    /// See [`EdgeMetrics::oldest_event_us`].
    pub oldest_event_us: u64,
    /// See [`EdgeMetrics::write_errors`].
    pub write_errors: u64,
    /// See [`EdgeMetrics::rejected_invalid`].
    pub rejected_invalid: u64,
    /// See [`EdgeMetrics::durable_connections`].
    pub durable_connections: u64,
    /// See [`EdgeMetrics::durable_refused`].
    pub durable_refused: u64,
    /// See [`EdgeMetrics::durable_protocol_errors`].
    pub durable_protocol_errors: u64,
    /// See [`EdgeMetrics::durable_acks`].
    pub durable_acks: u64,
    /// See [`EdgeMetrics::durable_duplicates`].
    pub durable_duplicates: u64,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        EdgeMetrics {
            commit_us: Mutex::new(Histogram::new(3).expect("histogram bounds")),
            commit_latency: Latency::default(),
            events_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            buffer_events: AtomicU64::new(0),
            buffer_bytes: AtomicU64::new(0),
            buffer_max_bytes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            drops_evicted: AtomicU64::new(0),
            drops_refused: AtomicU64::new(0),
            drops_overrun: AtomicU64::new(0),
            drops_storage: AtomicU64::new(0),
            oldest_event_us: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            rejected_invalid: AtomicU64::new(0),
            durable_connections: AtomicU64::new(0),
            durable_refused: AtomicU64::new(0),
            durable_protocol_errors: AtomicU64::new(0),
            durable_acks: AtomicU64::new(0),
            durable_duplicates: AtomicU64::new(0),
        }
    }
}

impl EdgeMetrics {
    /// Records one commit's duration.
    pub fn record_commit(&self, took: std::time::Duration) {
        if let Ok(mut h) = self.commit_us.lock() {
            let _ = h.record(took.as_micros() as u64);
        }
        self.commit_latency.observe_us(took.as_micros() as u64);
    }

    /// Commit time (µs) at quantile `q`.
    pub fn commit_quantile(&self, q: f64) -> u64 {
        self.commit_us
            .lock()
            .map(|h| h.value_at_quantile(q))
            .unwrap_or(0)
    }

    /// Forgets the commit times recorded so far.
    pub fn reset_commit_times(&self) {
        if let Ok(mut h) = self.commit_us.lock() {
            h.reset();
        }
    }

    /// Counts `n` events lost for `reason`.
    pub fn count_drop(&self, reason: GapReason, n: u64) {
        let counter = match reason {
            GapReason::Evicted => &self.drops_evicted,
            GapReason::Refused => &self.drops_refused,
            GapReason::Overrun => &self.drops_overrun,
            GapReason::StorageFailed | GapReason::Retention => &self.drops_storage,
        };
        counter.fetch_add(n, Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> EdgeSnapshot {
        EdgeSnapshot {
            events_in: self.events_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            buffer_events: self.buffer_events.load(Relaxed),
            buffer_bytes: self.buffer_bytes.load(Relaxed),
            buffer_max_bytes: self.buffer_max_bytes.load(Relaxed),
            commits: self.commits.load(Relaxed),
            fsyncs: self.fsyncs.load(Relaxed),
            drops_evicted: self.drops_evicted.load(Relaxed),
            drops_refused: self.drops_refused.load(Relaxed),
            drops_overrun: self.drops_overrun.load(Relaxed),
            drops_storage: self.drops_storage.load(Relaxed),
            oldest_event_us: self.oldest_event_us.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            rejected_invalid: self.rejected_invalid.load(Relaxed),
            durable_connections: self.durable_connections.load(Relaxed),
            durable_refused: self.durable_refused.load(Relaxed),
            durable_protocol_errors: self.durable_protocol_errors.load(Relaxed),
            durable_acks: self.durable_acks.load(Relaxed),
            durable_duplicates: self.durable_duplicates.load(Relaxed),
        }
    }
}

impl EdgeSnapshot {
    /// All events dropped, for any reason.
    pub fn drops(&self) -> u64 {
        self.drops_evicted + self.drops_refused + self.drops_overrun + self.drops_storage
    }

    /// Buffer utilization, 0.0 to 1.0.
    pub fn utilization(&self) -> f64 {
        if self.buffer_max_bytes == 0 {
            0.0
        } else {
            self.buffer_bytes as f64 / self.buffer_max_bytes as f64
        }
    }

    /// Age of the oldest unacknowledged event at `now_us`, in microseconds (0 when empty).
    pub fn oldest_age_us(&self, now_us: u64) -> u64 {
        if self.oldest_event_us == 0 {
            0
        } else {
            now_us.saturating_sub(self.oldest_event_us)
        }
    }
}

/// `/metrics` of an agent: the buffer, the durable port, the broker and the uplink, read at
/// scrape time.
#[derive(Debug)]
pub struct EdgeCollector {
    /// The agent's counters.
    pub edge: std::sync::Arc<EdgeMetrics>,
    /// The uplink's counters.
    pub uplink: std::sync::Arc<telemesh_gateway::UplinkMetrics>,
}

impl prometheus_client::collector::Collector for EdgeCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let m = self.edge.snapshot();
        let u = &self.uplink;
        let now = crate::buffer::now_us();
        let counters: [(&str, &str, u64); 16] = [
            (
                "telemesh_edge_events_in",
                "Events taken in from devices",
                m.events_in,
            ),
            (
                "telemesh_edge_bytes_in",
                "Topic and payload bytes taken in",
                m.bytes_in,
            ),
            (
                "telemesh_edge_commits",
                "Buffer transactions committed",
                m.commits,
            ),
            ("telemesh_edge_fsyncs", "Buffer syncs to disk", m.fsyncs),
            (
                "telemesh_edge_dropped_evicted",
                "Events evicted by drop-oldest (gap records)",
                m.drops_evicted,
            ),
            (
                "telemesh_edge_dropped_refused",
                "Events refused on a full buffer (gap records)",
                m.drops_refused,
            ),
            (
                "telemesh_edge_dropped_overrun",
                "Events the embedded broker skipped (gap records)",
                m.drops_overrun,
            ),
            (
                "telemesh_edge_dropped_storage",
                "Events lost to a failed or full disk (gap records)",
                m.drops_storage,
            ),
            (
                "telemesh_edge_rejected_invalid",
                "Publishes refused for an invalid topic",
                m.rejected_invalid,
            ),
            (
                "telemesh_edge_write_errors",
                "Buffer commits that failed (the writer stops)",
                m.write_errors,
            ),
            (
                "telemesh_edge_durable_refused",
                "Durable-port connections refused",
                m.durable_refused,
            ),
            (
                "telemesh_edge_durable_protocol_errors",
                "Durable-port connections closed for protocol errors",
                m.durable_protocol_errors,
            ),
            (
                "telemesh_edge_durable_acks",
                "PUBACKs and PUBRECs sent after commit",
                m.durable_acks,
            ),
            (
                "telemesh_edge_durable_duplicates",
                "Resent publishes recognised and not stored again",
                m.durable_duplicates,
            ),
            (
                "telemesh_edge_broker_connection_errors",
                "Connection errors of the embedded broker",
                crate::agent::broker_connection_errors(),
            ),
            (
                "telemesh_uplink_reconnects",
                "Uplink connections that failed or ended",
                u.reconnects.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            counter(&mut enc, name, help, v)?;
        }
        for (name, help, v) in [
            (
                "telemesh_uplink_batches_sent",
                "Batches sent, resends included",
                u.batches_sent.load(Relaxed),
            ),
            (
                "telemesh_uplink_batches_acked",
                "Batches acknowledged by a node",
                u.batches_acked.load(Relaxed),
            ),
            (
                "telemesh_uplink_frame_bytes",
                "Frame bytes written",
                u.frame_bytes.load(Relaxed),
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        let gauges: [(&str, &str, i64); 6] = [
            (
                "telemesh_edge_backlog_events",
                "Events in the buffer not yet acknowledged by a node",
                m.buffer_events as i64,
            ),
            (
                "telemesh_edge_backlog_bytes",
                "Bytes of those events",
                m.buffer_bytes as i64,
            ),
            (
                "telemesh_edge_buffer_max_bytes",
                "The buffer's max_bytes",
                m.buffer_max_bytes as i64,
            ),
            (
                "telemesh_edge_durable_connections",
                "Open durable-port connections",
                m.durable_connections as i64,
            ),
            (
                "telemesh_uplink_connected",
                "1 while a node has welcomed the uplink",
                i64::from(u.connected.load(Relaxed)),
            ),
            (
                "telemesh_uplink_in_flight_batches",
                "Batches sent and not yet acknowledged",
                u.in_flight.load(Relaxed) as i64,
            ),
        ];
        for (name, help, v) in gauges {
            gauge(&mut enc, name, help, v)?;
        }
        gauge(
            &mut enc,
            "telemesh_edge_buffer_utilization",
            "Buffer bytes used over max_bytes (0 to 1)",
            m.utilization(),
        )?;
        let oldest = if m.oldest_event_us == 0 {
            0.0
        } else {
            now.saturating_sub(m.oldest_event_us) as f64 / 1_000_000.0
        };
        gauge(
            &mut enc,
            "telemesh_edge_backlog_age_seconds",
            "Age of the oldest event not yet acknowledged by a node",
            oldest,
        )?;
        self.edge.commit_latency.encode(
            &mut enc,
            "telemesh_edge_commit_latency_seconds",
            "Buffer commit time (transaction and sync)",
        )
    }
}
