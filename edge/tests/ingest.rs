//! The agent with a real rumqttd and real LMDB files: concurrent MQTT clients publishing
//! QoS 1, every publish landing in the buffer, in per-client order, with gapless seqs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemesh_edge::{Agent, EdgeConfig};
use telemesh_testkit::{free_port, wait_for};

fn config(dir: &std::path::Path, port: u16) -> EdgeConfig {
    EdgeConfig::from_toml(&format!(
        r#"
[agent]
id = "gw-test"
data_dir = "{}"
[mqtt]
listen = "127.0.0.1:{port}"
segment_bytes = "8MiB"
segments = 8
[buffer]
max_bytes = "256MiB"
map_size = "512MiB"
"#,
        dir.display()
    ))
    .unwrap()
}

/// Publishes `count` QoS 1 messages `"<client>:<n>"` and returns when all are PUBACKed.
async fn publish_all(addr: SocketAddr, client: usize, count: usize) -> usize {
    let mut opts = MqttOptions::new(format!("dev-{client}"), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (cli, mut ev) = AsyncClient::new(opts, 1000);
    let producer = tokio::spawn(async move {
        for n in 0..count {
            cli.publish(
                format!("site/dev{client}/t"),
                QoS::AtLeastOnce,
                false,
                format!("{client}:{n}"),
            )
            .await
            .unwrap();
        }
        cli
    });
    let mut acked = 0;
    while acked < count {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("client {client}: {e}"),
        }
    }
    let _ = producer.await.unwrap();
    acked
}

#[test]
fn concurrent_qos1_publishes_all_land_in_order_with_gapless_seqs() {
    const CLIENTS: usize = 10;
    const EACH: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(dir.path(), port);
    let agent = Agent::start(&cfg).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The broker thread binds asynchronously: wait until it accepts.
        let until = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < until, "broker never listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| tokio::spawn(publish_all(addr, c, EACH)))
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), EACH);
        }
    });

    let total = (CLIENTS * EACH) as u64;
    let reader = agent.reader();
    wait_for(
        "every acked publish in the buffer",
        Duration::from_secs(60),
        || reader.state().unwrap().events >= total,
    );
    let stored = reader.read(None, usize::MAX).unwrap();
    assert_eq!(
        stored.len() as u64,
        total,
        "no event lost, none stored twice"
    );
    let epoch = agent.epoch();
    let mut next_per_client: HashMap<usize, usize> = HashMap::new();
    for (i, s) in stored.iter().enumerate() {
        assert_eq!(s.epoch, epoch);
        assert_eq!(s.event.seq, i as u64 + 1, "seqs are gapless from 1");
        let text = std::str::from_utf8(&s.event.payload).unwrap();
        let (c, n) = text.split_once(':').unwrap();
        let (c, n): (usize, usize) = (c.parse().unwrap(), n.parse().unwrap());
        assert_eq!(s.event.topic, format!("site/dev{c}/t"));
        let next = next_per_client.entry(c).or_default();
        assert_eq!(n, *next, "client {c}'s events are in its publish order");
        *next += 1;
    }
    let gaps = reader.gaps().unwrap();
    assert!(gaps.is_empty(), "no gap without a loss: {gaps:?}");
    let snap = agent.metrics().snapshot();
    assert_eq!(snap.events_in, total);
    assert_eq!(snap.buffer_events, total);
    assert_eq!(snap.drops(), 0);
    assert!(snap.commits > 0 && snap.commits <= total);
    assert!(snap.fsyncs >= snap.commits);
    assert!(snap.oldest_event_us > 0);
    agent.shutdown().unwrap();
}
