//! SQLite's process-wide settings, in a process of their own (they can only be set before
//! SQLite initialises, so no other test may have opened a database first).

/// Opening the store turns SQLite's allocation statistics off: with them on, every
/// allocation takes a global mutex, and `sqlite3_memory_used` would count the page
/// cache of the connection below.
#[test]
fn opening_the_store_turns_allocation_statistics_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pickupd.db");
    let conn = pickupd::store::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    // SAFETY: a plain read of SQLite's global counters.
    let used = unsafe { rusqlite::ffi::sqlite3_memory_used() };
    assert_eq!(used, 0, "allocation statistics are still counted");
}
