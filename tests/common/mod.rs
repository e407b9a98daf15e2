//! What the process-level tests share: the test kit, and the `telemesh` binary this package
//! builds (only a test of this package knows its path).
#![allow(dead_code)]

use std::path::Path;

pub use telemesh_testkit::*;

/// Starts `telemesh edge --config <config>`.
pub fn spawn_agent(config: &Path) -> Process {
    spawn_role("edge", config)
}

/// Starts `telemesh <role> --config <config>`.
pub fn spawn_role(role: &str, config: &Path) -> Process {
    Process::spawn(env!("CARGO_BIN_EXE_telemesh"), role, config)
}

/// Runs `telemesh sub --config <client_toml> ARGS…` to its end: whether it exited 0, the JSON
/// lines it printed, and its standard error.
pub fn sub(client_toml: &Path, args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_telemesh"))
        .args(["sub", "--config"])
        .arg(client_toml)
        .args(args)
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
