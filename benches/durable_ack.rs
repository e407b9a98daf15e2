//! The durable port: 100-byte QoS 1 publishes from `telemesh sim` (a separate process, pinned
//! to core 1 when `taskset` exists) with `sync = always`, for 1 and 10 clients with 100 and
//! 1,000 publishes in flight each. Reports acknowledged events/s and acknowledgement latency
//! (p50/p99, from `sim`), and the buffer's commit time (p50/p99) over the same run.
//!
//! `cargo bench --bench durable_ack` measures; under `cargo test` it runs a few hundred
//! events per case as a smoke test.

use std::process::Command;

use telemesh_edge::{Agent, EdgeConfig};

fn field<'a>(line: &'a str, after: &str) -> &'a str {
    line.split(after)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let pinned = full
        && Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    for (devices, inflight) in [(1, 100), (1, 1000), (10, 100), (10, 1000)] {
        let count: u64 = match (full, devices) {
            (false, _) => 400,
            (true, 1) => 100_000,
            (true, _) => 500_000,
        };
        let dir = tempfile::tempdir().unwrap();
        let mqtt_port = telemesh_testkit::free_port();
        let cfg = EdgeConfig::from_toml(&format!(
            "[agent]\nid = \"bench-durable\"\ndata_dir = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
             [durable]\nlisten = \"127.0.0.1:0\"\nmax_inflight = 1000\n\
             [buffer]\nmax_bytes = \"1GiB\"\nmap_size = \"2GiB\"\nsync = \"always\"\n",
            dir.path().display()
        ))
        .unwrap();
        let agent = Agent::start(&cfg).unwrap();
        let addr = agent.durable_addr().unwrap();
        agent.metrics().reset_commit_times();
        let commits0 = agent.metrics().snapshot().commits;
        let mut sim = if pinned {
            let mut c = Command::new("taskset");
            c.args(["-c", "1", env!("CARGO_BIN_EXE_telemesh")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_telemesh"))
        };
        let out = sim
            .args([
                "sim",
                "--mqtt",
                &addr.to_string(),
                "--devices",
                &devices.to_string(),
            ])
            .args([
                "--count",
                &count.to_string(),
                "--payload-bytes",
                "100",
                "--qos",
                "1",
            ])
            .args(["--inflight", &inflight.to_string()])
            .output()
            .expect("run telemesh sim");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "sim failed: {line} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = agent.metrics();
        let commits = m.snapshot().commits - commits0;
        println!(
            "durable_ack: {devices} clients x window {inflight}: {} acked/s, ack p50 {} p99 {}, \
             commit p50 {}us p99 {}us, {:.0} events/commit, sim pinned: {pinned}",
            field(&line, "s: "),
            field(&line, "p50 "),
            field(&line, "p99 "),
            m.commit_quantile(0.5),
            m.commit_quantile(0.99),
            count as f64 / commits.max(1) as f64,
        );
        assert_eq!(
            m.snapshot().buffer_events,
            count,
            "every acked event is stored"
        );
        agent.shutdown().unwrap();
    }
}
