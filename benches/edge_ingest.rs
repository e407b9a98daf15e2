//! Sustained ingest into the committed edge buffer: `telemesh sim` (a separate process, pinned
//! to core 1 when `taskset` exists) publishes 100-byte QoS 1 messages from 10 devices into an
//! agent running in this process with `sync = always`; the clock stops when the last event
//! is committed, not when rumqttd acknowledged it.
//!
//! `cargo bench --bench edge_ingest` runs 1,000,000 events; under `cargo test` (no `--bench`
//! argument) it runs 2,000 as a smoke test. Prints events/s, events per commit, fsyncs/s, the
//! agent's CPU-µs per event, its RSS and RssAnon idle and after, and the overruns (which must
//! be zero).

use std::process::Command;
use std::time::{Duration, Instant};

use telemesh_edge::{Agent, EdgeConfig};

fn proc_status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let events: u64 = if full { 1_000_000 } else { 2_000 };
    let dir = tempfile::tempdir().unwrap();
    let port = telemesh_testkit::free_port();
    let cfg = EdgeConfig::from_toml(&format!(
        r#"
[agent]
id = "bench-gw"
data_dir = "{}"
[mqtt]
listen = "127.0.0.1:{port}"
segment_bytes = "64MiB"
segments = 8
[buffer]
max_bytes = "1GiB"
map_size = "2GiB"
sync = "always"
"#,
        dir.path().display()
    ))
    .unwrap();
    let agent = Agent::start(&cfg).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "agent never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (rss_idle, anon_idle) = (proc_status("VmRSS:"), proc_status("RssAnon:"));

    let pinned = full
        && Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let mut sim = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", env!("CARGO_BIN_EXE_telemesh")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_telemesh"))
    };
    sim.args([
        "sim",
        "--mqtt",
        &format!("127.0.0.1:{port}"),
        "--devices",
        "10",
    ])
    .args([
        "--count",
        &events.to_string(),
        "--payload-bytes",
        "100",
        "--qos",
        "1",
    ])
    .args(["--inflight", "1000", "--topic", "site/dev{device}/temp"]);
    let m = agent.metrics().clone();
    let before = m.snapshot();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut child = sim.spawn().expect("start telemesh sim");
    let deadline = t0 + Duration::from_secs(600);
    while m.snapshot().buffer_events < before.buffer_events + events {
        assert!(Instant::now() < deadline, "ingest did not finish");
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "sim failed: {status}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    let status = child.wait().unwrap();
    assert!(status.success(), "sim failed: {status}");
    let after = m.snapshot();
    let commits = after.commits - before.commits;
    let fsyncs = after.fsyncs - before.fsyncs;
    println!(
        "edge_ingest: {events} events in {:.3}s = {:.0} events/s committed (sync=always); \
         {:.0} events/commit, {:.0} fsyncs/s; agent CPU {:.2} us/event; \
         RSS idle {} KiB (RssAnon {} KiB), after {} KiB (RssAnon {} KiB); overruns {}; sim pinned: {}",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        events as f64 / commits.max(1) as f64,
        fsyncs as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / events as f64,
        rss_idle,
        anon_idle,
        proc_status("VmRSS:"),
        proc_status("RssAnon:"),
        after.drops_overrun,
        pinned,
    );
    assert_eq!(after.drops(), 0, "no event may be dropped during the run");
    agent.shutdown().unwrap();
}
