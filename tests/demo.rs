//! `telemesh demo` end to end: two federated sites, simulated devices, site B's uplink cut
//! midway; at the end every event the edges stored was delivered to the consumer exactly
//! once and nothing was dropped.

use std::process::Command;

fn field(summary: &str, name: &str) -> u64 {
    let rest = summary
        .split(&format!("{name} "))
        .nth(1)
        .unwrap_or_else(|| panic!("no {name} in {summary:?}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_demo_delivers_every_event_once_through_a_cut_uplink() {
    let out = Command::new(env!("CARGO_BIN_EXE_telemesh"))
        .args(["demo", "--duration", "8s", "--rate", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cutting site B's uplink"), "{stdout}");
    assert!(stdout.contains("healing site B's uplink"), "{stdout}");
    let live = stdout.lines().filter(|l| l.starts_with("t=")).count();
    assert!(live >= 7, "a live line every second: {stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    let stored = field(summary, "stored");
    assert!(stored >= 4_000, "devices published: {summary}");
    assert_eq!(field(summary, "delivered"), stored, "{summary}");
    assert_eq!(field(summary, "duplicates"), 0, "{summary}");
    assert_eq!(field(summary, "dropped"), 0, "{summary}");
    assert_eq!(field(summary, "lost"), 0, "{summary}");
    assert!(
        field(summary, "backlog") > 0,
        "the cut made site B buffer: {summary}"
    );
    assert!(summary.ends_with("zero loss"), "{summary}");
}
