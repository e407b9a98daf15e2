//! `telemesh demo`: the whole system in one process on loopback, with a temporary directory
//! and throwaway certificates — two sites, each with a mesh node and an edge agent whose
//! simulated devices publish QoS 1 through the durable port; the nodes replicate each other;
//! a consumer on node A reads both sites. Every second a line shows events in, forwarded,
//! delivered, end-to-end latency and the edge backlog. Midway site B's uplink is cut for a
//! few seconds (a UDP relay drops its packets), so its agent buffers and then catches up.
//! At the end (the duration, or Ctrl-C) the devices stop, the mesh drains, and a summary
//! compares what the edges stored with what the consumer got.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use telemesh_client::{Client, ClientConfig, Item, SubscribeOptions};
use telemesh_edge::buffer::now_us;
use telemesh_edge::{Agent, EdgeConfig};
use telemesh_mesh::config::NodeConfig;
use telemesh_mesh::node::Node;
use telemesh_proto::Start;
use telemesh_quic::relay::Relay;

use crate::sim::SimOptions;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the devices publish (until Ctrl-C when `None`).
    pub duration: Option<Duration>,
    /// Events per second, both sites together.
    pub rate: u64,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSummary {
    /// Events the edges stored (acknowledged to devices or about to be).
    pub stored: u64,
    /// Events the consumer received, each once.
    pub delivered: u64,
    /// Events the consumer received more than once.
    pub duplicates: u64,
    /// Events the edges dropped (overflow, overrun, storage).
    pub dropped: u64,
    /// End-to-end latency, device send → consumer receipt, µs: p50, p99, max.
    pub latency_us: (u64, u64, u64),
    /// The largest edge backlog seen (events stored and not yet acknowledged by a node).
    pub max_backlog: u64,
}

impl DemoSummary {
    /// Every stored event delivered exactly once, nothing dropped.
    pub fn zero_loss(&self) -> bool {
        self.delivered == self.stored && self.duplicates == 0 && self.dropped == 0
    }
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p50, p99, max) = self.latency_us;
        write!(
            f,
            "summary: stored {} delivered {} duplicates {} dropped {} lost {} | e2e p50 {} p99 {} max {} | max backlog {} | {}",
            self.stored,
            self.delivered,
            self.duplicates,
            self.dropped,
            self.stored.saturating_sub(self.delivered),
            ms(p50),
            ms(p99),
            ms(max),
            self.max_backlog,
            if self.zero_loss() { "zero loss" } else { "LOSS" }
        )
    }
}

fn ms(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[error("demo: {0}")]
pub struct DemoError(String);

fn err(what: &str) -> impl Fn(String) -> DemoError + '_ {
    move |e| DemoError(format!("{what}: {e}"))
}

#[derive(Default)]
struct Seen {
    ids: HashSet<(String, u64, u64)>,
    duplicates: u64,
    window: Option<Histogram<u64>>,
    total: Option<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("histogram bounds")
}

fn free_udp() -> Result<u16, DemoError> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| err("port")(e.to_string()))?;
    Ok(s.local_addr()
        .map_err(|e| err("port")(e.to_string()))?
        .port())
}

fn free_tcp() -> Result<u16, DemoError> {
    let s = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| err("port")(e.to_string()))?;
    Ok(s.local_addr()
        .map_err(|e| err("port")(e.to_string()))?
        .port())
}

fn node_config(dir: &Path, me: &str, other: &str, port: u16, upstream: u16) -> String {
    let c = dir.join("certs");
    format!(
        "[node]\nid = \"node-{me}\"\ndata_dir = \"{d}/node-{me}\"\nlisten = \"127.0.0.1:{port}\"\n\
         ca = \"{c}/ca.pem\"\ncert = \"{c}/node-{me}.pem\"\nkey = \"{c}/node-{me}.key\"\nmap_size = \"1GiB\"\n\
         [[access]]\nidentity = \"site-{me}-gw\"\nrole = \"uplink\"\npublish = [\"site-{me}/#\"]\n\
         [[access]]\nidentity = \"node-{other}\"\nrole = \"peer\"\n\
         [[access]]\nidentity = \"demo\"\nrole = \"consumer\"\n\
         [[replicate]]\nfrom = \"127.0.0.1:{upstream}\"\nserver_name = \"node-{other}\"\nfilters = [\"site-{other}/#\"]\nbackoff_max = \"200ms\"\n",
        d = dir.display(),
        c = c.display()
    )
}

fn edge_config(
    dir: &Path,
    me: &str,
    uplink: SocketAddr,
) -> Result<(EdgeConfig, SocketAddr), DemoError> {
    let c = dir.join("certs");
    let durable = SocketAddr::from(([127, 0, 0, 1], free_tcp()?));
    let text = format!(
        "[agent]\nid = \"site-{me}-gw\"\ndata_dir = \"{d}/edge-{me}\"\n\
         [mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\n\
         [durable]\nlisten = \"{durable}\"\n\
         [buffer]\nmax_bytes = \"256MiB\"\nmap_size = \"512MiB\"\n\
         [uplink]\nnodes = [\"{uplink}\"]\nserver_name = \"node-{me}\"\nca = \"{c}/ca.pem\"\n\
         cert = \"{c}/site-{me}-gw.pem\"\nkey = \"{c}/site-{me}-gw.key\"\nbackoff_max = \"250ms\"\nack_timeout = \"1s\"\n",
        d = dir.display(),
        c = c.display(),
        mqtt = free_tcp()?,
    );
    Ok((
        EdgeConfig::from_toml(&text).map_err(|e| err("edge config")(e.to_string()))?,
        durable,
    ))
}

/// Runs the demo and returns its summary.
pub fn run(opts: DemoOptions) -> Result<DemoSummary, DemoError> {
    let tmp = tempfile::tempdir().map_err(|e| err("temporary directory")(e.to_string()))?;
    let dir = tmp.path();
    telemesh_quic::pki::write_mesh(
        &dir.join("certs"),
        &["node-a".into(), "node-b".into()],
        &["site-a-gw".into(), "site-b-gw".into()],
        &["demo".into()],
    )
    .map_err(|e| err("certificates")(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err("runtime")(e.to_string()))?;
    let (pa, pb) = (free_udp()?, free_udp()?);
    let a_cfg = NodeConfig::from_toml(&node_config(dir, "a", "b", pa, pb))
        .map_err(|e| err("node config")(e.to_string()))?;
    let b_cfg = NodeConfig::from_toml(&node_config(dir, "b", "a", pb, pa))
        .map_err(|e| err("node config")(e.to_string()))?;
    let (node_a, node_b, relay) = rt.block_on(async {
        let a = Node::start(a_cfg)
            .await
            .map_err(|e| err("node-a")(e.to_string()))?;
        let b = Node::start(b_cfg)
            .await
            .map_err(|e| err("node-b")(e.to_string()))?;
        // Site B's uplink goes through a relay the demo can cut.
        let relay = Relay::start(b.local_addr())
            .await
            .map_err(|e| err("relay")(e.to_string()))?;
        Ok::<_, DemoError>((a, b, relay))
    })?;
    let (edge_a, durable_a) = edge_config(dir, "a", node_a.local_addr())?;
    let (edge_b, durable_b) = edge_config(dir, "b", relay.addr())?;
    let agent_a = Agent::start(&edge_a).map_err(|e| err("edge agent a")(e.to_string()))?;
    let agent_b = Agent::start(&edge_b).map_err(|e| err("edge agent b")(e.to_string()))?;
    println!(
        "demo: site A (node-a {}, devices → {durable_a}) and site B (node-b {}, devices → {durable_b}, uplink via relay {}); node-a and node-b replicate each other; a consumer reads everything on node-a; data in {}",
        node_a.local_addr(),
        node_b.local_addr(),
        relay.addr(),
        dir.display()
    );
    let agents = [&agent_a, &agent_b];
    let client_cfg = ClientConfig {
        node: node_a.local_addr().to_string(),
        server_name: Some("node-a".into()),
        ca: dir.join("certs/ca.pem"),
        cert: dir.join("certs/demo.pem"),
        key: dir.join("certs/demo.key"),
    };
    let result = rt.block_on(drive(
        opts,
        client_cfg,
        [durable_a, durable_b],
        &agents,
        &relay,
    ));
    let shut = |a: Agent| {
        a.shutdown()
            .map_err(|e| err("edge agent stop")(e.to_string()))
    };
    shut(agent_a)?;
    shut(agent_b)?;
    rt.block_on(async {
        node_a.shutdown().await;
        node_b.shutdown().await;
    });
    result
}

/// Stored, dropped and backlog over both agents.
fn edge_counts(agents: &[&Agent]) -> (u64, u64, u64) {
    let (mut stored, mut dropped, mut backlog) = (0, 0, 0);
    for a in agents {
        let m = a.metrics().snapshot();
        let drops = m.drops();
        dropped += drops;
        stored += m.events_in.saturating_sub(drops);
        backlog += m.buffer_events;
    }
    (stored, dropped, backlog)
}

async fn drive(
    opts: DemoOptions,
    client_cfg: ClientConfig,
    durable: [SocketAddr; 2],
    agents: &[&Agent],
    relay: &Relay,
) -> Result<DemoSummary, DemoError> {
    let client = Client::connect(&client_cfg)
        .await
        .map_err(|e| err("consumer")(e.to_string()))?;
    let mut sub = client
        .subscribe(SubscribeOptions::new(vec!["#".into()]).start(Start::Earliest))
        .await
        .map_err(|e| err("subscribe")(e.to_string()))?;
    let seen = Arc::new(Mutex::new(Seen {
        window: Some(histogram()),
        total: Some(histogram()),
        ..Seen::default()
    }));
    let s2 = seen.clone();
    // Signalled at every delivery, so the drain below waits on progress, not on a clock.
    let progress = Arc::new(tokio::sync::Notify::new());
    let p2 = progress.clone();
    let consumer = tokio::spawn(async move {
        while let Ok(Some(item)) = sub.next().await {
            let Item::Event(e) = item else { continue };
            let sent = e
                .event
                .payload
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let lat = now_us().saturating_sub(sent);
            let mut s = s2.lock().unwrap_or_else(|p| p.into_inner());
            if !s.ids.insert((e.origin, e.epoch, e.event.seq)) {
                s.duplicates += 1;
                continue;
            }
            if let Some(h) = s.window.as_mut() {
                let _ = h.record(lat);
            }
            if let Some(h) = s.total.as_mut() {
                let _ = h.record(lat);
            }
            p2.notify_one();
        }
    });
    // Devices: half the rate per site, QoS 1 through the durable port.
    let per_site = (opts.rate / 2).max(1);
    let count = opts
        .duration
        .map_or(u64::MAX / 4, |d| (per_site as f64 * d.as_secs_f64()) as u64);
    let sims: Vec<_> = durable
        .iter()
        .zip(["a", "b"])
        .map(|(addr, site)| {
            tokio::spawn(crate::sim::run(SimOptions {
                mqtt: *addr,
                devices: 5,
                rate: per_site,
                count,
                payload_bytes: 100,
                qos: 1,
                topic: format!("site-{site}/dev{{device}}/telemetry"),
                inflight: 100,
                drain_timeout: Duration::from_secs(30),
            }))
        })
        .collect();
    let started = Instant::now();
    let planned = opts.duration.unwrap_or(Duration::from_secs(30));
    let cut_at = planned / 3;
    let cut_for = (planned / 5).min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut max_backlog = 0;
    let mut last_stored = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                println!("Ctrl-C: stopping the devices and draining");
                break;
            }
        }
        let t = started.elapsed();
        let cut = t >= cut_at && t < cut_at + cut_for;
        if cut != relay.is_cut() {
            relay.set_cut(cut);
            println!(
                "{} site B's uplink",
                if cut { "cutting" } else { "healing" }
            );
        }
        let (stored, _, backlog) = edge_counts(agents);
        max_backlog = max_backlog.max(backlog);
        let (delivered, p50, p99) = {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            let w = s.window.replace(histogram()).unwrap_or_else(histogram);
            (
                s.ids.len() as u64,
                w.value_at_quantile(0.5),
                w.value_at_quantile(0.99),
            )
        };
        println!(
            "t={:>3}s in {:>6}/s (total {stored}) forwarded {} delivered {delivered} e2e p50 {} p99 {} backlog {backlog}{}",
            t.as_secs(),
            stored - last_stored,
            stored - backlog,
            ms(p50),
            ms(p99),
            if cut { "  [site B uplink cut]" } else { "" }
        );
        last_stored = stored;
        if opts.duration.is_some_and(|d| t >= d) || sims.iter().all(|s| s.is_finished()) {
            break;
        }
    }
    relay.set_cut(false);
    for s in &sims {
        s.abort();
    }
    for s in sims {
        let _ = s.await;
    }
    // Drain: everything the edges stored reaches the consumer (at most a minute).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (stored, _, _) = edge_counts(agents);
        let delivered = seen.lock().unwrap_or_else(|p| p.into_inner()).ids.len() as u64;
        if delivered >= stored
            || tokio::time::timeout_at(deadline, progress.notified())
                .await
                .is_err()
        {
            break;
        }
    }
    consumer.abort();
    let _ = consumer.await;
    client.close().await;
    let (stored, dropped, _) = edge_counts(agents);
    let s = seen.lock().unwrap_or_else(|p| p.into_inner());
    let total = s.total.as_ref().cloned().unwrap_or_else(histogram);
    Ok(DemoSummary {
        stored,
        delivered: s.ids.len() as u64,
        duplicates: s.duplicates,
        dropped,
        latency_us: (
            total.value_at_quantile(0.5),
            total.value_at_quantile(0.99),
            total.max(),
        ),
        max_backlog,
    })
}
