//! The `telemesh edge` process under kill -9 and SIGTERM, with a real rumqttd port, a real
//! MQTT client and the real LMDB files, inspected from outside the process.
//!
//! - kill -9 mid-stream: every event that was committed before the kill is still there, in
//!   gapless seq order, and the next run starts a new epoch (no seq reused for other content).
//! - SIGTERM: a clean stop; the next run keeps the epoch and continues its seqs.
//! - The uncommitted window (events rumqttd PUBACKed that the buffer never stored) is measured
//!   and printed: rumqttd acknowledges from memory, so this port does not promise durability.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemesh_edge::buffer::{inspect, Inspection};

const MAP_SIZE: u64 = 256 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16) -> PathBuf {
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

fn spawn_agent(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_telemesh"))
        .args(["edge", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_listening(addr: SocketAddr) {
    wait_for("the agent's MQTT port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
}

fn buffer_dir(dir: &Path) -> PathBuf {
    dir.join("data").join("buffer")
}

fn look(dir: &Path) -> Inspection {
    inspect(&buffer_dir(dir), MAP_SIZE).unwrap()
}

fn payloads(events: &[telemesh_edge::buffer::Stored], epoch: u64) -> Vec<u64> {
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

/// Publishes QoS 1 messages numbered from `first` until `stop` says so or `count` are acked;
/// returns the numbers PUBACKed.
fn publish(addr: SocketAddr, client: &str, first: u64, count: u64) -> Vec<u64> {
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
                    .publish("site/crash/t", QoS::AtLeastOnce, false, n.to_string())
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

fn sigterm(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean stop exits 0, got {status}");
            return;
        }
        assert!(Instant::now() < until, "agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_dash_nine_keeps_committed_events_and_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port);

    // Run 1: publish flat out from a thread; kill -9 once enough is committed.
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let publisher = std::thread::spawn(move || publish(addr, "dev-crash", 0, 2_000_000));
    let mut committed_before_kill = Vec::new();
    wait_for("20k committed events", Duration::from_secs(60), || {
        let seen = look(dir.path());
        committed_before_kill = payloads(&seen.events, seen.state.epoch);
        committed_before_kill.len() >= 20_000
    });
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    let acked = publisher.join().unwrap();

    let after = look(dir.path());
    assert!(!after.clean, "a killed run is not marked clean");
    let epoch1 = after.state.epoch;
    let stored = payloads(&after.events, epoch1);
    for (i, s) in after.events.iter().enumerate() {
        assert_eq!(
            s.event.seq,
            i as u64 + 1,
            "seqs stay gapless across the kill"
        );
    }
    let stored_set: HashSet<u64> = stored.iter().copied().collect();
    for n in &committed_before_kill {
        assert!(
            stored_set.contains(n),
            "event {n} was committed before the kill and is gone"
        );
    }
    assert_eq!(stored_set.len(), stored.len(), "no event stored twice");
    let window = acked.iter().filter(|n| !stored_set.contains(n)).count();
    println!(
        "kill -9: {} PUBACKed, {} committed, uncommitted window {} events (rumqttd acks from memory)",
        acked.len(),
        stored.len(),
        window
    );
    assert!(acked.len() >= committed_before_kill.len());

    // Run 2: an unclean start gets a later epoch; seqs restart at 1; old events are kept.
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let acked2 = publish(addr, "dev-crash-2", 10_000_000, 100);
    assert_eq!(acked2.len(), 100);
    wait_for("run 2's events committed", Duration::from_secs(30), || {
        look(dir.path()).state.events >= stored.len() as u64 + 100
    });
    sigterm(&mut agent);
    let run2 = look(dir.path());
    assert!(run2.clean, "SIGTERM marks the buffer clean");
    let epoch2 = run2.state.epoch;
    assert!(epoch2 > epoch1, "an unclean stop starts a later epoch");
    assert_eq!(
        payloads(&run2.events, epoch1),
        stored,
        "run 1's events are untouched"
    );
    let new: Vec<_> = run2.events.iter().filter(|s| s.epoch == epoch2).collect();
    assert_eq!(new.len(), 100);
    assert!(new
        .iter()
        .enumerate()
        .all(|(i, s)| s.event.seq == i as u64 + 1));

    // Run 3: after a clean stop the epoch is kept and seqs continue.
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    assert_eq!(publish(addr, "dev-crash-3", 20_000_000, 10).len(), 10);
    wait_for("run 3's events committed", Duration::from_secs(30), || {
        look(dir.path()).state.events >= stored.len() as u64 + 110
    });
    sigterm(&mut agent);
    let run3 = look(dir.path());
    assert_eq!(run3.state.epoch, epoch2, "a clean stop keeps the epoch");
    let seqs: Vec<u64> = run3
        .events
        .iter()
        .filter(|s| s.epoch == epoch2)
        .map(|s| s.event.seq)
        .collect();
    assert_eq!(seqs, (1..=110).collect::<Vec<_>>());
}
