//! CPU time per thread and memory of a process, from `/proc` (Linux).
//!
//! The daemon runs in the benchmark's process on its own tokio runtime, so its CPU is the
//! sum over its threads; threads are told apart by name (`/proc/<pid>/task/<tid>/comm`).
//! Thread run time comes from `schedstat` (nanoseconds) where the kernel has it, else from
//! `stat` (clock ticks).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

/// Thread name prefixes and the part of the system they belong to.
const GROUPS: &[(&str, &str)] = &[
    ("pickupd-rt", "daemon"),
    ("store-writer", "daemon"),
    ("status-reader", "daemon"),
    ("mqtt-v4", "broker"),
    ("mqtt-v5", "broker"),
    ("router-", "broker"),
    ("bench-client", "clients"),
];

/// Which group a thread name belongs to ("other" for anything unknown).
pub fn group_of(name: &str) -> &'static str {
    GROUPS
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .map_or("other", |(_, g)| g)
}

/// CPU nanoseconds per thread, keyed by (tid, name).
#[derive(Debug, Clone, Default)]
pub struct ThreadTimes(pub BTreeMap<(u32, String), u64>);

fn task_dir(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}/task")),
        None => PathBuf::from("/proc/self/task"),
    }
}

fn clock_tick_ns() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1_000_000_000 / hz as u64
    } else {
        10_000_000
    }
}

/// Thread run time from `stat`: utime + stime (fields 14 and 15), after the `(comm)`.
fn stat_ns(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * clock_tick_ns())
}

impl ThreadTimes {
    /// Reads every thread of `pid` (this process when `None`).
    pub fn read(pid: Option<u32>) -> Self {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(task_dir(pid)) else {
            return Self(out);
        };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let p = e.path();
            let name = std::fs::read_to_string(p.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let ns = std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .or_else(|| {
                    std::fs::read_to_string(p.join("stat"))
                        .ok()
                        .and_then(|s| stat_ns(&s))
                });
            if let Some(ns) = ns {
                out.insert((tid, name), ns);
            }
        }
        Self(out)
    }

    /// CPU seconds per group spent between `before` and `self` (threads that appeared in
    /// between count from zero; threads that ended are lost, which the daemon's long-lived
    /// threads are not).
    pub fn since(&self, before: &ThreadTimes) -> BTreeMap<String, f64> {
        let mut g: BTreeMap<String, f64> = BTreeMap::new();
        for ((tid, name), ns) in &self.0 {
            let was = before.0.get(&(*tid, name.clone())).copied().unwrap_or(0);
            *g.entry(group_of(name).to_string()).or_default() +=
                ns.saturating_sub(was) as f64 / 1e9;
        }
        g
    }

    /// CPU seconds per thread name (summed over threads of the same name) in `group`.
    pub fn threads_since(&self, before: &ThreadTimes, group: &str) -> BTreeMap<String, f64> {
        let mut g: BTreeMap<String, f64> = BTreeMap::new();
        for ((tid, name), ns) in &self.0 {
            if group_of(name) != group {
                continue;
            }
            let was = before.0.get(&(*tid, name.clone())).copied().unwrap_or(0);
            *g.entry(name.clone()).or_default() += ns.saturating_sub(was) as f64 / 1e9;
        }
        g
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// Resident set now, MiB.
    pub rss_mib: f64,
    /// Peak resident set since the process started, MiB.
    pub peak_rss_mib: f64,
    /// Of the resident set: anonymous memory (heap, stacks), MiB.
    pub anon_mib: f64,
    /// Of the resident set: file pages (the program's code, mapped files), MiB.
    pub file_mib: f64,
}

impl Memory {
    /// Reads `pid` (this process when `None`); zeros where `/proc` is unavailable.
    pub fn read(pid: Option<u32>) -> Self {
        let path = match pid {
            Some(p) => format!("/proc/{p}/status"),
            None => "/proc/self/status".into(),
        };
        let s = std::fs::read_to_string(path).unwrap_or_default();
        let kb = |key: &str| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            rss_mib: kb("VmRSS:") / 1024.0,
            peak_rss_mib: kb("VmHWM:") / 1024.0,
            anon_mib: kb("RssAnon:") / 1024.0,
            file_mib: kb("RssFile:") / 1024.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let line = "123 (a b) S 1 2 3 4 5 6 7 8 9 10 200 100 0 0 20 0 1 0";
        assert_eq!(stat_ns(line), Some(300 * clock_tick_ns()));
    }

    #[test]
    fn reads_own_threads_and_memory() {
        let t = ThreadTimes::read(None);
        assert!(!t.0.is_empty());
        let m = Memory::read(None);
        assert!(m.rss_mib > 0.0);
        assert_eq!(group_of("store-writer"), "daemon");
        assert_eq!(group_of("router-0"), "broker");
        assert_eq!(group_of("x"), "other");
    }
}
