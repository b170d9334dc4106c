//! Handing the heap's free pages back to the system.
//!
//! glibc's allocator keeps what a burst freed (the start-up republishing, a fleet of
//! handhelds reconnecting, a busy hour) as free chunks inside its arenas, resident, and
//! gives back only what ends up at the top of the main heap. On a small box that is
//! megabytes held for nothing: with the embedded broker and 10k couriers online,
//! `malloc_trim` returned 2-3 MiB of a 34 MiB daemon (docs/performance.md, "Memory").
//! Allocators such as jemalloc and mimalloc return such pages on a timer by themselves;
//! this does the same for glibc.
//!
//! A trim is not free: it walks every free chunk with the arena locked, so allocations on
//! other threads wait for it. That is 0.1-2 ms for this daemon's usual 20-30 MiB, but
//! about 15 ms for 100 MB of heap left full of holes and 130 ms for 1 GB (measured).
//! So the resident size is looked at every [`CHECK_EVERY`] (one read of
//! `/proc/self/statm`, no lock), and a trim runs only when it has grown by
//! [`GROWN_BYTES`] since the last trim (a burst has come and gone, or is still on), or
//! at the latest every [`TRIM_AT_LEAST_EVERY`]. A quiet or steady daemon is not trimmed
//! over and over.
//!
//! Elsewhere than on glibc nothing is trimmed, and the resident size is still reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the resident size is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Growth of the resident size since the last trim that calls for another.
pub const GROWN_BYTES: u64 = 1 << 20;

/// The longest time between two trims.
pub const TRIM_AT_LEAST_EVERY: Duration = Duration::from_secs(600);

/// When the trimmer trims.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How often the resident size is looked at.
    pub check_every: Duration,
    /// Growth since the last trim that calls for another.
    pub grown_bytes: u64,
    /// The longest time between two trims.
    pub at_least_every: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            check_every: CHECK_EVERY,
            grown_bytes: GROWN_BYTES,
            at_least_every: TRIM_AT_LEAST_EVERY,
        }
    }
}

impl Policy {
    /// Whether to trim now: the resident size is `rss`, it was `floor` after the last trim
    /// (or the lowest seen since; `None`: never trimmed), and that trim was `since` ago.
    pub fn due(&self, rss: u64, floor: Option<u64>, since: Duration) -> bool {
        match floor {
            None => true,
            Some(f) => rss >= f.saturating_add(self.grown_bytes) || since >= self.at_least_every,
        }
    }
}

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

/// Allocations at least this large get a mapping of their own, returned to the system
/// the moment they are freed (glibc's `M_MMAP_THRESHOLD`, fixed by [`configure`]).
pub const OWN_MAPPING_BYTES: usize = 4 << 20;

/// Sets up the allocator for a long-running daemon (`app::start` calls it first; calling
/// it again changes nothing).
///
/// glibc raises its mmap threshold to the size of any mapped block that is freed (up to
/// 32 MiB), after which blocks of that size come from the heap. The first argon2id check
/// of a device secret (`security::registry`) raised it, and later checks then took their
/// working memory from the heap: 60 checks in a row held 138 MB resident at 19 MiB per
/// check, and 52 MB at 7 MiB, where one check needs 21 and 9 MB (measured, release
/// build). A fixed threshold keeps such blocks in mappings of their own, unmapped when
/// freed. Only rare allocations are that large here, so mapping them each time costs
/// little (a 7 MiB check: 23 ms median against 18 ms, one thread, same sitting).
pub fn configure() {
    set_own_mapping_threshold(OWN_MAPPING_BYTES);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_own_mapping_threshold(bytes: usize) {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a tuning parameter of the allocator, under its lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_own_mapping_threshold(_bytes: usize) {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_pages() {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

/// Trims as `policy` says until `stop` turns true.
pub async fn run(
    stats: Arc<TrimStats>,
    policy: Policy,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(policy.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; start counting from now instead.
    tick.tick().await;
    // Nothing trimmed yet: the first check after start trims (the start-up republishing
    // has been through the heap by then).
    let mut floor: Option<u64> = None;
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(rss) = resident_bytes() else {
            continue;
        };
        floor = floor.map(|f| f.min(rss));
        if !policy.due(rss, floor, last.elapsed()) {
            continue;
        }
        let s = stats.clone();
        let started = std::time::Instant::now();
        let returned = tokio::task::spawn_blocking(move || trim_once(&s)).await;
        last = tokio::time::Instant::now();
        floor = Some(resident_bytes().unwrap_or(rss));
        if let Ok(bytes) = returned {
            tracing::debug!(
                mib = bytes as f64 / 1048576.0,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "free heap pages returned"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tells the trimmer to stop and waits for it to end.
    async fn stopped(stop: tokio::sync::watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends once stopped")
            .unwrap();
    }

    #[test]
    fn trims_when_grown_since_the_last_trim_or_when_it_is_long_ago() {
        let p = Policy::default();
        let mib = 1 << 20;
        let floor = Some(30 * mib);
        assert!(!p.due(30 * mib, floor, Duration::from_secs(10)));
        assert!(!p.due(30 * mib + mib / 2, floor, Duration::from_secs(10)));
        assert!(p.due(31 * mib, floor, Duration::from_secs(10)));
        assert!(p.due(30 * mib, floor, TRIM_AT_LEAST_EVERY));
        // Never trimmed: due.
        assert!(p.due(30 * mib, None, Duration::ZERO));
    }

    /// A steady process is not trimmed over and over: with no growth called for and the
    /// longest interval far away, nothing after the first check.
    #[tokio::test]
    async fn a_steady_process_is_not_trimmed_again() {
        let stats = Arc::new(TrimStats::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let never_grown = Policy {
            check_every: Duration::from_millis(5),
            grown_bytes: u64::MAX / 2,
            at_least_every: Duration::from_secs(3600),
        };
        let task = tokio::spawn(run(stats.clone(), never_grown, stop_rx));
        // The first check trims (nothing trimmed yet).
        trims_reach(&stats, 1, "no first trim").await;
        // Twenty more checks go by without a trim.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stats.trims.load(Ordering::Relaxed), 1);
        stopped(stop_tx, task).await;
    }

    /// The task trims on its period and ends when told to stop.
    #[tokio::test]
    async fn trims_every_period_until_stopped() {
        let stats = Arc::new(TrimStats::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let every_check = Policy {
            check_every: Duration::from_millis(10),
            grown_bytes: 0,
            at_least_every: Duration::from_secs(3600),
        };
        let task = tokio::spawn(run(stats.clone(), every_check, stop_rx));
        trims_reach(&stats, 3, "no trims").await;
        stopped(stop_tx, task).await;
    }

    /// Waits (10 s at most, else panics with `what`) until `stats` counts `n` trims.
    async fn trims_reach(stats: &TrimStats, n: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.trims.load(Ordering::Relaxed) < n {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
