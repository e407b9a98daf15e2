//! A process's memory, as the kernel counts it.

/// `RssAnon` of process `pid` in KiB: its anonymous resident memory (heap and stacks; LMDB's
/// mapped file pages are page cache and not counted here).
pub fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"))
}
