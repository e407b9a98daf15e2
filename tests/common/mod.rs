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
