//! The `telemesh` command line: one binary for every role. Argument parsing and process
//! set-up live here, and the two tools that use every role at once: `telemesh demo` and
//! `telemesh sim`. Each role's work lives in its crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use telemesh_edge::{Agent, BrokerErrorCounter, EdgeConfig};

mod demo;
mod sim;

/// IoT edge-to-cloud event mesh.
#[derive(Debug, Parser)]
#[command(name = "telemesh", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a mesh node: the durable event log and its QUIC server.
    Node {
        /// The node's config file (node.toml).
        #[arg(long, required_unless_present = "print_default_config")]
        config: Option<PathBuf>,
        /// Print a commented default config and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Run an edge agent: the site's MQTT broker and durable buffer.
    Edge {
        /// The agent's config file (edge.toml).
        #[arg(long, required_unless_present = "print_default_config")]
        config: Option<PathBuf>,
        /// Print a commented default config and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Subscribe to a node and print events (replay and live).
    Sub {
        /// The client config (client.toml).
        #[arg(long)]
        config: PathBuf,
        /// MQTT filter; repeat for several.
        #[arg(long = "filter", required = true)]
        filters: Vec<String>,
        /// earliest, latest, seq:N (node seq) or time:RFC3339 (ingest time).
        #[arg(long, default_value = "latest")]
        from: String,
        /// A durable consumer name: resumes after its last ack and ignores --from once it exists.
        #[arg(long)]
        durable: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (for example 30s); non-zero exit if --count was not reached.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
        /// Also print gap and truncation records.
        #[arg(long)]
        gaps: bool,
    },
    /// Completeness per origin (held and known lost seqs) and durable consumers of a node.
    Status {
        /// The client config (client.toml).
        #[arg(long)]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Simulate devices publishing MQTT telemetry (a load generator for any broker).
    Sim {
        /// The broker to publish to.
        #[arg(long)]
        mqtt: SocketAddr,
        /// Devices, each its own connection.
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Messages per second in total (0: as fast as the broker acknowledges).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Messages in total.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Payload size in bytes (at least 16: send time and number).
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Topic; `{device}` becomes the device number.
        #[arg(long, default_value = "sim/dev{device}/telemetry")]
        topic: String,
        /// Publishes in flight per device.
        #[arg(long, default_value_t = 100)]
        inflight: u16,
    },
    /// Run the whole system on loopback in this process: two federated sites with edge
    /// agents, simulated devices and a consumer; cuts one uplink midway; prints a summary.
    Demo {
        /// How long the devices publish (for example 30s); until Ctrl-C when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Events per second, both sites together.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
    },
    /// Make a CA and certificates for nodes, edge agents and clients.
    Certs {
        /// Directory to write ca.pem, ca.key, NAME.pem and NAME.key into.
        #[arg(long)]
        out: PathBuf,
        /// A node certificate (server and client; also names localhost, 127.0.0.1, ::1).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// An edge agent certificate (its name is the agent id).
        #[arg(long = "edge")]
        edges: Vec<String>,
        /// A client certificate (for `sub`, `status` and services).
        #[arg(long = "client")]
        clients: Vec<String>,
    },
    /// Print the wire protocol's version and error codes.
    Protocol,
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() -> Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("cannot watch SIGINT"),
    }
}

/// Waits for SIGTERM or SIGINT outside a runtime.
fn wait_for_stop_signal() -> Result<&'static str> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    rt.block_on(wait_for_signal())
}

fn parse_start(from: &str) -> Result<telemesh_proto::Start> {
    use telemesh_proto::Start;
    Ok(match from {
        "earliest" => Start::Earliest,
        "latest" => Start::Latest,
        _ => {
            if let Some(n) = from.strip_prefix("seq:") {
                Start::Seq(
                    n.parse()
                        .with_context(|| format!("--from {from}: not a node seq"))?,
                )
            } else if let Some(t) = from.strip_prefix("time:") {
                let at = humantime::parse_rfc3339_weak(t)
                    .with_context(|| format!("--from {from}: not an RFC 3339 time"))?;
                let us = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("--from: a time before 1970")?
                    .as_micros() as u64;
                Start::Time(us)
            } else {
                anyhow::bail!("--from {from}: use earliest, latest, seq:N or time:RFC3339")
            }
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn run_sub(
    config: &std::path::Path,
    filters: Vec<String>,
    from: &str,
    durable: Option<String>,
    count: Option<u64>,
    timeout: Option<std::time::Duration>,
    json: bool,
    gaps: bool,
) -> Result<()> {
    use telemesh_client::{Client, ClientConfig, Item, SubscribeOptions};
    let cfg = ClientConfig::load(config).with_context(|| format!("config {}", config.display()))?;
    let start = parse_start(from)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async move {
        let client = Client::connect(&cfg).await.context("cannot connect")?;
        let mut opts = SubscribeOptions::new(filters).start(start).gaps(gaps);
        opts.durable = durable.clone();
        let mut sub = client.subscribe(opts).await.context("subscription refused")?;
        let node = sub.node_id.clone();
        let mut printed = 0u64;
        let mut last_seq = None;
        let run = async {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            while count.is_none_or(|c| printed < c) {
                let Some(item) = sub.next().await? else { break };
                if !gaps && !matches!(item, Item::Event(_)) {
                    continue;
                }
                if json {
                    writeln!(out, "{}", item.to_json(&node))?;
                } else {
                    match &item {
                        Item::Event(d) => writeln!(
                            out,
                            "{} {}/{}/{} {} {}",
                            d.node_seq,
                            d.origin,
                            d.epoch,
                            d.event.seq,
                            d.event.topic,
                            String::from_utf8_lossy(&d.event.payload)
                        )?,
                        other => writeln!(out, "{}", other.to_json(&node))?,
                    }
                }
                if let Item::Event(d) = &item {
                    printed += 1;
                    last_seq = Some(d.node_seq);
                }
            }
            out.flush()?;
            anyhow::Ok(())
        };
        let finished = tokio::select! {
            r = async { match timeout { Some(t) => tokio::time::timeout(t, run).await.ok(), None => Some(run.await) } } => r,
            _ = wait_for_signal() => None,
        };
        if let Some(result) = finished {
            result?;
        }
        // Acknowledge everything printed before leaving.
        if let (Some(_), Some(seq)) = (&durable, last_seq) {
            sub.ack(seq).await.context("cannot acknowledge")?;
        }
        sub.finish().await.context("cannot end the subscription")?;
        client.close().await;
        if let Some(c) = count {
            if printed < c {
                anyhow::bail!("only {printed} of {c} events arrived");
            }
        }
        Ok(())
    })
}

fn run_status(config: &std::path::Path, json: bool) -> Result<()> {
    use telemesh_client::{Client, ClientConfig};
    let cfg = ClientConfig::load(config).with_context(|| format!("config {}", config.display()))?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async move {
        let client = Client::connect(&cfg).await.context("cannot connect")?;
        let status = client.status().await.context("status refused")?;
        client.close().await;
        let telemesh_proto::Frame::Status {
            node_id,
            committed,
            origins,
            consumers,
            dead_letters,
            upstreams,
        } = status
        else {
            anyhow::bail!("unexpected answer")
        };
        let ranges = |r: &[(u64, u64)]| -> String {
            if r.is_empty() {
                return "-".into();
            }
            r.iter()
                .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                .collect::<Vec<_>>()
                .join(",")
        };
        if json {
            let v = serde_json::json!({
                "node": node_id,
                "committed": committed,
                "origins": origins.iter().map(|o| serde_json::json!({
                    "origin": o.origin, "epoch": o.epoch, "held": o.held, "lost": o.lost,
                    "rejected": o.rejected, "not_selected": o.not_selected,
                })).collect::<Vec<_>>(),
                "upstreams": upstreams.iter().map(|u| serde_json::json!({
                    "from": u.from, "node": u.node_id, "connected": u.connected,
                    "through": u.through, "behind": u.behind, "lag_ms": u.lag_ms,
                })).collect::<Vec<_>>(),
                "dead_letters": dead_letters.iter().map(|d| serde_json::json!({
                    "origin": d.origin, "epoch": d.epoch, "seq": d.seq, "topic": d.topic,
                    "code": d.code.0, "error": d.code.name(), "reason": d.reason, "ts_us": d.ts_us,
                })).collect::<Vec<_>>(),
                "consumers": consumers.iter().map(|c| serde_json::json!({
                    "identity": c.identity, "name": c.name, "acked": c.acked, "lag": committed.saturating_sub(c.acked),
                })).collect::<Vec<_>>(),
            });
            println!("{v}");
        } else {
            println!("node {node_id}: committed through node seq {committed}");
            for o in &origins {
                println!(
                    "origin {} epoch {}: held {} lost {} rejected {} not selected {}",
                    o.origin,
                    o.epoch,
                    ranges(&o.held),
                    ranges(&o.lost),
                    ranges(&o.rejected),
                    ranges(&o.not_selected)
                );
            }
            for u in &upstreams {
                println!(
                    "upstream {} ({}): {}, stored through node seq {}, {} behind, lag {} ms",
                    u.from,
                    if u.node_id.is_empty() { "?" } else { &u.node_id },
                    if u.connected { "connected" } else { "disconnected" },
                    u.through,
                    u.behind,
                    u.lag_ms
                );
            }
            for d in &dead_letters {
                println!(
                    "dead letter {}/{}/{} {:?}: {} ({})",
                    d.origin, d.epoch, d.seq, d.topic, d.code, d.reason
                );
            }
            for c in &consumers {
                println!(
                    "consumer {}/{}: acked {} (lag {})",
                    c.identity,
                    c.name,
                    c.acked,
                    committed.saturating_sub(c.acked)
                );
            }
        }
        Ok(())
    })
}

fn run_node(config: &std::path::Path) -> Result<()> {
    let cfg = telemesh_mesh::config::NodeConfig::load(config)
        .with_context(|| format!("config {}", config.display()))?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    rt.block_on(async {
        let node = telemesh_mesh::node::Node::start(cfg)
            .await
            .context("cannot start the node")?;
        let signal = wait_for_signal().await?;
        tracing::info!(signal, "stopping: closing connections");
        node.shutdown().await;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

fn run_edge(config: &std::path::Path) -> Result<()> {
    let cfg = EdgeConfig::load(config).with_context(|| format!("config {}", config.display()))?;
    let agent = Agent::start(&cfg).context("cannot start the edge agent")?;
    let signal = wait_for_stop_signal()?;
    tracing::info!(signal, "stopping: committing what was taken in");
    agent.shutdown().context("clean stop failed")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The counter sees every event; the filter applies to the log output only.
    let registry = tracing_subscriber::registry().with(BrokerErrorCounter);
    match format {
        LogFormat::Text => registry.with(fmt.with_filter(filter)).init(),
        LogFormat::Json => registry.with(fmt.json().with_filter(filter)).init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Node {
            print_default_config: true,
            ..
        } => print!("{}", telemesh_mesh::config::NodeConfig::default_toml()),
        Command::Node {
            config: Some(config),
            ..
        } => run_node(&config)?,
        Command::Node { config: None, .. } => anyhow::bail!("--config is required"),
        Command::Edge {
            print_default_config: true,
            ..
        } => print!("{}", EdgeConfig::default_toml()),
        Command::Edge {
            config: Some(config),
            ..
        } => run_edge(&config)?,
        Command::Edge { config: None, .. } => anyhow::bail!("--config is required"),
        Command::Sub {
            config,
            filters,
            from,
            durable,
            count,
            timeout,
            json,
            gaps,
        } => run_sub(&config, filters, &from, durable, count, timeout, json, gaps)?,
        Command::Status { config, json } => run_status(&config, json)?,
        Command::Demo { duration, rate } => {
            let summary = demo::run(demo::DemoOptions { duration, rate })?;
            println!("{summary}");
            if !summary.zero_loss() {
                anyhow::bail!("events were lost or duplicated");
            }
        }
        Command::Sim {
            mqtt,
            devices,
            rate,
            count,
            payload_bytes,
            qos,
            topic,
            inflight,
        } => {
            let opts = sim::SimOptions {
                mqtt,
                devices,
                rate,
                count,
                payload_bytes,
                qos,
                topic,
                inflight,
                ..Default::default()
            };
            let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            let report = rt.block_on(sim::run(opts));
            println!("{report}");
            for e in &report.errors {
                tracing::error!(error = %e, "device failed");
            }
            if report.acked < count {
                anyhow::bail!(
                    "only {} of {count} messages were acknowledged",
                    report.acked
                );
            }
        }
        Command::Certs {
            out,
            nodes,
            edges,
            clients,
        } => {
            let files = telemesh_quic::pki::write_mesh(&out, &nodes, &edges, &clients)
                .context("cannot write certificates")?;
            for f in files {
                println!("{}", f.display());
            }
        }
        Command::Protocol => {
            println!(
                "telemesh/{} (ALPN {})",
                telemesh_proto::PROTOCOL_VERSION,
                String::from_utf8_lossy(telemesh_proto::frame::ALPN)
            );
            for code in telemesh_proto::ErrorCode::ALL {
                println!("{:>5}  {}", code.0, code.name());
            }
        }
    }
    Ok(())
}
