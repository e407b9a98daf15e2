//! Waiting on a condition with a deadline: a test never sleeps to wait for something, it
//! polls the condition and fails, naming what it waited for, when the deadline passes.

use std::time::{Duration, Instant};

/// Polls `done` every 10 ms until it holds; panics naming `what` after `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`wait_for`] on the current tokio runtime (the runtime keeps working meanwhile).
pub async fn wait_for_async(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
