//! Real `telemesh` processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::wait_for;

/// A child process running one role, killed when dropped so no test leaves one behind.
#[derive(Debug)]
pub struct Process(Child);

impl Process {
    /// Starts `BIN ROLE --config CONFIG` (`BIN`: the suite's `env!("CARGO_BIN_EXE_telemesh")`),
    /// its standard output discarded and its log on the test's standard error.
    pub fn spawn(bin: &str, role: &str, config: &Path) -> Process {
        Process(
            Command::new(bin)
                .args([role, "--config"])
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// kill -9, and wait for it.
    pub fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM, and wait (at most 20 s) for a clean exit with status 0.
    pub fn sigterm(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut exited = None;
        wait_for("a clean stop on SIGTERM", Duration::from_secs(20), || {
            exited = self.0.try_wait().unwrap();
            exited.is_some()
        });
        let status = exited.expect("waited for");
        assert!(status.success(), "clean stop exits 0, got {status}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
