//! The durable port of a real `telemesh edge` process:
//! - kill -9 while 10 clients publish QoS 1 flat out: every PUBACKed message is in the
//!   buffer after the crash — a ledger of acks checked against the LMDB file, zero missing;
//! - acks wait for the commit: with the buffer's LMDB write lock held from outside (the
//!   writer stalled), no PUBACK comes; released, it comes and the event is on disk;
//! - QoS 2 across kill -9: a PUBLISH resent after the crash is answered, not stored again.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet};
use telemesh_testkit::mqtt as raw;

fn config_with_durable(dir: &std::path::Path, durable_port: u16) -> std::path::PathBuf {
    write_config(
        dir,
        free_port(),
        &format!("[durable]\nlisten = \"127.0.0.1:{durable_port}\"\nmax_inflight = 1000"),
    )
}

/// Publishes QoS 1 flat out until the connection breaks; records every PUBACKed payload.
async fn publish_until_cut(addr: SocketAddr, client: usize, ledger: Arc<Mutex<HashSet<String>>>) {
    let mut o = MqttOptions::new(format!("ledger-{client}"), "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(200);
    let (cli, mut ev) = AsyncClient::new(o, 400);
    tokio::spawn(async move {
        for n in 0u64.. {
            let payload = format!("{client}:{n}");
            if cli
                .publish("site/ledger", rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // PUBACKs come in publish order per connection; pkids map acks to payloads.
    let mut sent: std::collections::HashMap<u16, String> = Default::default();
    let mut next = 0u64;
    loop {
        match ev.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                sent.insert(pkid, format!("{client}:{next}"));
                next += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some(p) = sent.remove(&a.pkid) {
                    ledger.lock().unwrap().insert(p);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn kill_dash_nine_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = config_with_durable(dir.path(), port);
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let ledger = Arc::new(Mutex::new(HashSet::new()));
    let l2 = ledger.clone();
    let publishers = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..10)
                .map(|c| tokio::spawn(publish_until_cut(addr, c, l2.clone())))
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        });
    });
    wait_for("30k acknowledged", Duration::from_secs(120), || {
        ledger.lock().unwrap().len() >= 30_000
    });
    agent.kill9();
    publishers.join().unwrap();
    let acked = ledger.lock().unwrap().clone();
    let stored: HashSet<String> = look(dir.path())
        .events
        .iter()
        .map(|s| String::from_utf8(s.event.payload.clone()).unwrap())
        .collect();
    let missing: Vec<_> = acked.iter().filter(|p| !stored.contains(*p)).collect();
    println!(
        "durable kill -9: {} PUBACKed, {} stored, {} acked but missing",
        acked.len(),
        stored.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged events lost: {:?}",
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn acks_wait_for_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut agent = spawn_agent(&config_with_durable(dir.path(), port));
    wait_listening(addr);
    let (mut s, ack) = raw::open(addr, &raw::connect_packet(4, "stall", true, 30, None), 4);
    assert_eq!(ack, [0x20, 2, 0, 0]);
    // Warm up: one event through, so the buffer exists and the writer is idle.
    s.write_all(&raw::publish_qos(4, 1, false, 1, b"site/stall", b"warm"))
        .unwrap();
    assert_eq!(raw::read_n(&mut s, 4), [0x40, 2, 0, 1]);

    let env = {
        let mut o = heed::EnvOpenOptions::new();
        o.map_size(MAP_SIZE as usize).max_dbs(8);
        // SAFETY: another process's handle on the agent's environment; LMDB's lock file
        // coordinates the two, and this one never writes.
        unsafe { o.open(buffer_dir(dir.path())) }.unwrap()
    };
    let lock = env.write_txn().unwrap();
    s.write_all(&raw::publish_qos(4, 1, false, 2, b"site/stall", b"held"))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1_500)))
        .unwrap();
    let mut b = [0u8; 4];
    assert!(
        std::io::Read::read_exact(&mut s, &mut b).is_err(),
        "no PUBACK while the commit cannot happen"
    );
    lock.abort();
    drop(env);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        raw::read_n(&mut s, 4),
        [0x40, 2, 0, 2],
        "PUBACK once committed"
    );
    agent.kill9();
    let payloads: Vec<Vec<u8>> = look(dir.path())
        .events
        .into_iter()
        .map(|s| s.event.payload)
        .collect();
    assert_eq!(payloads, vec![b"warm".to_vec(), b"held".to_vec()]);
}

#[test]
fn qos2_resent_after_kill_dash_nine_is_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = config_with_durable(dir.path(), port);
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let connect = raw::connect_packet(4, "q2-crash", false, 30, None);
    let (mut s, _) = raw::open(addr, &connect, 4);
    s.write_all(&raw::publish_qos(4, 2, false, 42, b"site/q2", b"once"))
        .unwrap();
    assert_eq!(raw::read_n(&mut s, 4), [0x50, 2, 0, 42]);
    agent.kill9();
    drop(s);

    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    let (mut s, ack) = raw::open(addr, &connect, 4);
    assert_eq!(ack, [0x20, 2, 1, 0], "session present after the crash");
    s.write_all(&raw::publish_qos(4, 2, true, 42, b"site/q2", b"once"))
        .unwrap();
    assert_eq!(raw::read_n(&mut s, 4), [0x50, 2, 0, 42]);
    s.write_all(&[0x62, 2, 0, 42]).unwrap();
    assert_eq!(raw::read_n(&mut s, 4), [0x70, 2, 0, 42]);
    agent.sigterm();
    let stored: Vec<Vec<u8>> = look(dir.path())
        .events
        .into_iter()
        .map(|s| s.event.payload)
        .collect();
    assert_eq!(stored, vec![b"once".to_vec()], "exactly once");
}
