//! Broker overruns are loss recorded as data, exactly: while the agent's writer is stalled
//! (this test holds the LMDB write lock from outside the process), devices keep publishing,
//! rumqttd's small in-memory log overflows and skips the tap ahead. Afterwards every
//! PUBACKed message is either in the buffer or counted in an `overrun` gap at exactly the
//! place it was lost.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use telemesh_proto::{GapKind, GapReason};

const PUBLISHED: u64 = 80_000;

#[test]
fn broker_overrun_becomes_exact_gap_records() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // A log of about 2 × 64 KiB: a few thousand small messages.
    let config = write_config(
        dir.path(),
        port,
        "segment_bytes = \"64KiB\"\nsegments = 2\nmax_payload = \"1KiB\"",
    );
    let mut agent = spawn_agent(&config);
    wait_listening(addr);
    wait_for("the buffer to exist", Duration::from_secs(20), || {
        inspect_opt(dir.path()).is_some()
    });

    // Stall the agent's writer: hold the buffer's LMDB write lock from this process.
    let env = {
        let mut o = heed::EnvOpenOptions::new();
        o.map_size(MAP_SIZE as usize).max_dbs(8);
        // SAFETY: a second process's handle on the agent's environment; LMDB's lock file
        // coordinates the two, and this one never writes.
        unsafe { o.open(buffer_dir(dir.path())) }.unwrap()
    };
    let lock = env.write_txn().unwrap();
    // More than the writer's queue (65,536) plus the broker's log can hold.
    let acked = publish(addr, "dev-overrun", QoS::AtLeastOnce, 0, PUBLISHED);
    assert_eq!(acked.len() as u64, PUBLISHED, "rumqttd acks from memory");
    lock.abort();
    // One process may hold one handle on an environment: let go before inspecting.
    drop(env);

    let seen = {
        let mut last = None;
        wait_for(
            "every message stored or counted lost",
            Duration::from_secs(60),
            || {
                let s = look(dir.path());
                let lost: u64 = s
                    .gaps
                    .iter()
                    .map(|g| match g.gap.kind {
                        GapKind::Unsequenced { count, .. } => count,
                        GapKind::Range { first, last } => last - first + 1,
                    })
                    .sum();
                let done = s.events.len() as u64 + lost == PUBLISHED;
                last = Some(s);
                done
            },
        );
        last.unwrap()
    };
    agent.sigterm();

    let stored = payloads(&seen.events, seen.state.epoch);
    assert!(
        !seen.gaps.is_empty(),
        "the stalled writer must have caused an overrun"
    );
    assert!(
        stored.len() as u64 > 65_536,
        "what the queue held was stored"
    );
    // Every gap sits exactly where the payload numbers jump, and says how far.
    let mut lost_after: std::collections::BTreeMap<u64, u64> = Default::default();
    for g in &seen.gaps {
        assert_eq!(g.gap.reason, GapReason::Overrun);
        let GapKind::Unsequenced { after, count } = g.gap.kind else {
            panic!("an overrun has no seqs: {:?}", g.gap)
        };
        *lost_after.entry(after).or_default() += count;
    }
    let mut expected_next = 0u64;
    for (i, &n) in stored.iter().enumerate() {
        let seq = i as u64 + 1;
        let jump = n - expected_next;
        let recorded = lost_after.remove(&(seq - 1)).unwrap_or(0);
        assert_eq!(
            jump, recorded,
            "before seq {seq} (message {n}): jump vs gap record"
        );
        expected_next = n + 1;
    }
    let tail = lost_after.remove(&(stored.len() as u64)).unwrap_or(0);
    assert_eq!(
        PUBLISHED - expected_next,
        tail,
        "losses after the last stored event"
    );
    assert!(
        lost_after.is_empty(),
        "gap records at no jump: {lost_after:?}"
    );
}

fn inspect_opt(dir: &std::path::Path) -> Option<()> {
    telemesh_edge::buffer::inspect(&buffer_dir(dir), MAP_SIZE)
        .ok()
        .map(|_| ())
}
