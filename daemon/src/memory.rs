//! Handing the heap's free pages back to the system.
//!
//! glibc's allocator keeps what a burst freed (the start-up republishing, a fleet of
//! handhelds reconnecting, a busy hour) as free chunks inside its arenas, resident, and
//! gives back only what ends up at the top of the main heap. On a small box that is
//! megabytes held for nothing: with the embedded broker and 10k couriers online,
//! `malloc_trim` returned 2-3 MiB of a 34 MiB daemon (docs/performance.md, "Memory").
//! Allocators such as jemalloc and mimalloc return such pages on a timer by themselves;
//! this does the same for glibc: every [`TRIM_EVERY`], one `malloc_trim(0)` on a blocking
//! thread. It takes well under a millisecond at that size, and allocations in the arena it
//! is walking wait for it meanwhile.
//!
//! Elsewhere than on glibc nothing is trimmed, and the resident size is still reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often free pages are handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// What the trimmer did, for the metrics.
#[derive(Debug, Default)]
pub struct TrimStats {
    /// Trims run.
    pub trims: AtomicU64,
    /// Bytes by which the resident set shrank across the trims (a trim that found nothing
    /// to return counts zero).
    pub returned_bytes: AtomicU64,
}

/// The process's resident set in bytes (`/proc/self/statm`), or `None` where that file is
/// missing or unreadable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// Hands free heap pages back to the system once; returns by how many bytes the resident
/// set shrank meanwhile (other threads allocating at the same time can hide some of it).
pub fn trim_once(stats: &TrimStats) -> u64 {
    let before = resident_bytes();
    release_free_pages();
    let after = resident_bytes();
    let returned = match (before, after) {
        (Some(b), Some(a)) => b.saturating_sub(a),
        _ => 0,
    };
    stats.trims.fetch_add(1, Ordering::Relaxed);
    stats.returned_bytes.fetch_add(returned, Ordering::Relaxed);
    returned
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_pages() {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

/// Runs [`trim_once`] every `every` until `stop` turns true.
pub async fn run(
    stats: Arc<TrimStats>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; start counting from now instead.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let s = stats.clone();
        let returned = tokio::task::spawn_blocking(move || trim_once(&s)).await;
        if let Ok(bytes) = returned {
            if bytes >= 1 << 20 {
                tracing::debug!(mib = bytes as f64 / 1048576.0, "free heap pages returned");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task trims on its period and ends when told to stop.
    #[tokio::test]
    async fn trims_every_period_until_stopped() {
        let stats = Arc::new(TrimStats::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(stats.clone(), Duration::from_millis(10), stop_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.trims.load(Ordering::Relaxed) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "no trims");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends once stopped")
            .unwrap();
    }

    #[test]
    fn reads_its_own_resident_set() {
        let rss = resident_bytes().unwrap();
        // A test process maps at least its own code and a stack.
        assert!(rss > 1 << 20, "{rss}");
    }

    /// Memory freed by another thread stays resident until trimmed; a trim gives most of it
    /// back and counts what it gave.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_what_a_burst_on_another_thread_freed() {
        let stats = TrimStats::default();
        // Many small blocks (below the mmap threshold, so they come from an arena), every
        // other one kept so the freed ones cannot merge into the top of the heap and be
        // released on free.
        let kept = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 512]).collect();
            let kept: Vec<Vec<u8>> = blocks
                .into_iter()
                .enumerate()
                .filter_map(|(i, b)| (i % 64 == 0).then_some(b))
                .collect();
            kept
        })
        .join()
        .unwrap();
        let returned = trim_once(&stats);
        assert!(
            returned >= 32 << 20,
            "returned {returned} bytes of about 100 MiB freed"
        );
        assert_eq!(stats.trims.load(Ordering::Relaxed), 1);
        assert_eq!(stats.returned_bytes.load(Ordering::Relaxed), returned);
        drop(kept);
    }
}
