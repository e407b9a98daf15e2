//! The edge side of tests: an agent's config, its buffer read from outside, publishers, and
//! a buffer with an uplink draining it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rumqttc::QoS;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use telemesh_edge::buffer::{inspect, Inspection};

/// The buffer map size every test config uses.
pub const MAP_SIZE: u64 = 256 << 20;

/// Writes an edge.toml for agent `gw-crash` on `port`; `extra_mqtt` is appended to `[mqtt]`
/// (and may open further sections).
pub fn write_config(dir: &Path, port: u16, extra_mqtt: &str) -> PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
id = "gw-crash"
data_dir = "{}"
[mqtt]
listen = "127.0.0.1:{port}"
{extra_mqtt}
[buffer]
max_bytes = "128MiB"
map_size = "256MiB"
sync = "always"
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

/// Where an agent configured by [`write_config`] keeps its buffer.
pub fn buffer_dir(dir: &Path) -> PathBuf {
    dir.join("data").join("buffer")
}

/// Everything in the buffer of an agent configured by [`write_config`], read-only.
pub fn look(dir: &Path) -> Inspection {
    inspect(&buffer_dir(dir), MAP_SIZE).unwrap()
}

/// The payloads of `epoch`'s events, read as the numbers [`publish`] sends.
pub fn payloads(events: &[telemesh_edge::buffer::Stored], epoch: u64) -> Vec<u64> {
    events
        .iter()
        .filter(|s| s.epoch == epoch)
        .map(|s| {
            std::str::from_utf8(&s.event.payload)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// Publishes `count` messages numbered from `first` (QoS 1: until all are acked or the
/// connection drops) and returns the numbers PUBACKed.
pub fn publish(addr: SocketAddr, client: &str, qos: QoS, first: u64, count: u64) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new(client, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (cli, mut ev) = AsyncClient::new(opts, 100);
        tokio::spawn(async move {
            for n in first..first + count {
                if cli
                    .publish("site/crash/t", qos, false, n.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        // PUBACKs come in publish order on one connection: ack k is for message first + k.
        let mut acked = Vec::new();
        while (acked.len() as u64) < count {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked.push(first + acked.len() as u64),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        acked
    })
}

/// An edge buffer for tests: no fsync (durability is not what these tests are about),
/// `max_bytes` as given and a map twice that.
pub fn test_buffer(dir: &Path, origin: &str, max_bytes: u64) -> telemesh_edge::buffer::Buffer {
    use telemesh_edge::buffer::{Buffer, BufferOptions, SyncMode};
    Buffer::open(
        dir,
        origin,
        BufferOptions {
            max_bytes,
            map_size: 2 * max_bytes,
            sync: SyncMode::None,
            ..BufferOptions::default()
        },
        std::sync::Arc::new(telemesh_edge::EdgeMetrics::default()),
    )
    .unwrap()
}

/// A gateway uplink running on the current runtime, draining `buffer`.
#[derive(Debug)]
pub struct RunningUplink {
    /// Its counters.
    pub metrics: std::sync::Arc<telemesh_gateway::UplinkMetrics>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), telemesh_quic::tls::TlsError>>,
}

impl RunningUplink {
    /// Starts the uplink of `origin` with the certificate `certs/<cert>.pem`.
    pub fn start(
        origin: &str,
        opts: telemesh_gateway::UplinkOptions,
        certs: &Path,
        cert: &str,
        buffer: &telemesh_edge::buffer::Buffer,
    ) -> RunningUplink {
        let identity = telemesh_quic::tls::Identity::load(
            &certs.join(format!("{cert}.pem")),
            &certs.join(format!("{cert}.key")),
        )
        .unwrap();
        let source = telemesh_edge::uplink::BufferSource::new(
            buffer.reader(),
            buffer.handle(),
            buffer.commits(),
        );
        let metrics = std::sync::Arc::new(telemesh_gateway::UplinkMetrics::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(telemesh_gateway::run(
            origin.to_owned(),
            opts,
            identity,
            source,
            metrics.clone(),
            stop_rx,
        ));
        RunningUplink {
            metrics,
            stop,
            task,
        }
    }

    /// Stops it and waits until it has.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Appends `from..to` to `buffer` as events on `site/relay` whose payload is the number.
pub fn append(buffer: &telemesh_edge::buffer::Buffer, from: u64, to: u64) {
    let h = buffer.handle();
    for n in from..to {
        h.append(telemesh_edge::buffer::Incoming {
            topic: "site/relay".into(),
            payload: n.to_string().into_bytes(),
            ts_us: n,
            qos: 1,
            headers: None,
        })
        .unwrap();
    }
}

/// Uplink settings for tests: the mesh CA in `certs/`, nodes verified as `node-a`, batches
/// of 100 events, a window of 4, quick reconnects and a 1 s ack timeout.
pub fn uplink_options(certs: &Path, nodes: Vec<String>) -> telemesh_gateway::UplinkOptions {
    telemesh_gateway::UplinkOptions {
        nodes,
        server_name: Some("node-a".into()),
        roots: telemesh_quic::tls::load_roots(&certs.join("ca.pem")).unwrap(),
        forwarder: telemesh_proto::forwarder::ForwarderConfig {
            batch_max_events: 100,
            batch_max_bytes: 1 << 20,
            window: 4,
            linger: Duration::ZERO,
        },
        max_event_bytes: 65_536,
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        failback_interval: Duration::from_millis(200),
        ack_timeout: Duration::from_secs(1),
        compression: telemesh_proto::frame::Compression::None,
        max_bandwidth: None,
    }
}
