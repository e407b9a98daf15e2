//! `telemesh sim` against a running `telemesh edge`: every simulated publish is acknowledged
//! and lands in the buffer with its send-time payload.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn sim_publishes_into_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut agent = spawn_agent(&write_config(dir.path(), port, ""));
    wait_listening(addr);
    let out = Command::new(env!("CARGO_BIN_EXE_telemesh"))
        .args([
            "sim",
            "--mqtt",
            &addr.to_string(),
            "--devices",
            "4",
            "--count",
            "2000",
        ])
        .args([
            "--payload-bytes",
            "100",
            "--qos",
            "1",
            "--topic",
            "site/sim{device}/t",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sim failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("published 2000 acked 2000"), "{stdout}");
    wait_for("2000 events committed", Duration::from_secs(30), || {
        look(dir.path()).state.events >= 2000
    });
    agent.sigterm();
    let seen = look(dir.path());
    assert_eq!(seen.events.len(), 2000);
    let start_us = telemesh_edge::buffer::now_us() - 120_000_000;
    for s in &seen.events {
        assert_eq!(s.event.payload.len(), 100);
        assert!(s.event.topic.starts_with("site/sim"));
        let sent = u64::from_le_bytes(s.event.payload[..8].try_into().unwrap());
        assert!(
            sent > start_us && sent <= s.event.ts_us,
            "send time precedes receive time"
        );
    }
}
