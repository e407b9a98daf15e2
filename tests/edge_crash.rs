//! The `telemesh edge` process under kill -9 and SIGTERM, with a real rumqttd port, a real
//! MQTT client and the real LMDB files, inspected from outside the process.
//!
//! - kill -9 mid-stream: every event that was committed before the kill is still there, in
//!   gapless seq order, and the next run starts a new epoch (no seq reused for other content).
//! - SIGTERM: a clean stop; the next run keeps the epoch and continues its seqs.
//! - The uncommitted window (events rumqttd PUBACKed that the buffer never stored) is measured
//!   and printed: rumqttd acknowledges from memory, so this port does not promise durability.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

#[test]
fn kill_dash_nine_keeps_committed_events_and_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port, "");

    // Run 1: publish flat out from a thread; kill -9 once enough is committed.
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let publisher =
        std::thread::spawn(move || publish(addr, "dev-crash", QoS::AtLeastOnce, 0, 2_000_000));
    let mut committed_before_kill = Vec::new();
    wait_for("20k committed events", Duration::from_secs(60), || {
        let seen = look(dir.path());
        committed_before_kill = payloads(&seen.events, seen.state.epoch);
        committed_before_kill.len() >= 20_000
    });
    agent.kill9();
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
    let acked2 = publish(addr, "dev-crash-2", QoS::AtLeastOnce, 10_000_000, 100);
    assert_eq!(acked2.len(), 100);
    wait_for("run 2's events committed", Duration::from_secs(30), || {
        look(dir.path()).state.events >= stored.len() as u64 + 100
    });
    agent.sigterm();
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
    assert_eq!(
        publish(addr, "dev-crash-3", QoS::AtLeastOnce, 20_000_000, 10).len(),
        10
    );
    wait_for("run 3's events committed", Duration::from_secs(30), || {
        look(dir.path()).state.events >= stored.len() as u64 + 110
    });
    agent.sigterm();
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
