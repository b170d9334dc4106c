//! SQLite storage: one writer thread owns the read-write connection and group-commits the
//! dispatch core's decisions; separate read-only connections serve status reads, so reads
//! never wait on writes.
//!
//! Durability: WAL with `synchronous = FULL`. In WAL mode `NORMAL` may lose the last
//! transactions on power loss; `FULL` syncs the WAL at every commit, so a call whose
//! "accepted" answer went out survives a power cut. Throughput comes from group commit:
//! every job waiting in the queue joins one transaction and one fsync.

pub mod deliveries;
pub mod requests;
mod schema;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pickup_protocol::Millis;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::dispatch::{Call, Change, Courier, OutMsg};

/// Errors of the store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite refused something.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file failed its integrity check; the daemon refuses to start on it.
    #[error("database {path} is damaged ({detail}); refusing to start. Restore it from a backup (pickupctl backup) or move it away to start empty")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// First lines of the check.
        detail: String,
    },
    /// The file is newer than this program.
    #[error("database {path} has schema version {found}, newer than this pickupd ({known}); upgrade pickupd")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Latest version known here.
        known: i64,
    },
    /// Creating the directory or file failed.
    #[error("database {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stored row could not be read back.
    #[error("database {path}: row {what} is unreadable: {detail}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// Which row.
        what: String,
        /// Why.
        detail: String,
    },
    /// The writer thread has stopped.
    #[error("the store writer has stopped")]
    WriterGone,
}

fn sq(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Wall-clock now in unix milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What the daemon needs to resume after a start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Calls not yet final, plus recently finished ones.
    pub calls: Vec<Call>,
    /// Every known courier.
    pub couriers: Vec<Courier>,
    /// Outbox rows not yet acknowledged by the broker, oldest first.
    pub unsent: Vec<(i64, OutMsg)>,
}

/// Process-wide SQLite settings, applied once before the first connection: SQLite's
/// allocation statistics are turned off. They take a global mutex around every
/// allocation and free (measured: a fifth of the store writer's CPU under load), and
/// nothing reads them (`sqlite3_memory_used` and friends are not used).
///
/// [`open`] and [`Reader::open`] call this; programs that use SQLite before opening the
/// store (the benchmark's own baseline) call it first. Once SQLite is initialised the
/// setting can no longer change, and the call is a no-op that leaves the statistics on.
pub fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int argument. sqlite3_config() refuses
        // (SQLITE_MISUSE) rather than changing anything once SQLite is initialised; it is
        // called once per process, before this process opens its first database.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as libc::c_int)
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite already initialised; allocation statistics stay on"
            );
        }
    });
}

/// Opens (creating if needed) the database at `path`: checks integrity, applies
/// migrations, and returns the connection for the writer.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    configure_sqlite();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let fresh = !path.exists();
    if fresh {
        // Created 0600: the file holds customers' phone numbers.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
    }
    // Decided before opening: opening does not touch the WAL file, but look first anyway.
    let full_check = if fresh {
        None
    } else {
        full_check_reason(path, ALWAYS_CHECK_BYTES)
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sq(path))?;
    let e = sq(path);
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&e)?;
    if !fresh {
        // The full check reads every page of the file (1.3 s for 1.7 GB from the page
        // cache, much longer from an SD card), so large files get it only after an
        // unclean stop. Otherwise reading the schema still refuses a file that is not a
        // database at all.
        let sql = match full_check {
            Some(why) => {
                tracing::info!(reason = why, "checking the database's integrity");
                "PRAGMA quick_check"
            }
            None => {
                tracing::info!(
                    "integrity check skipped: the last stop was clean and the file is large"
                );
                "SELECT 'ok' FROM (SELECT count(*) FROM sqlite_schema)"
            }
        };
        let check: Vec<String> = conn
            .prepare(sql)
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(f, msg)
                    if matches!(
                        f.code,
                        rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
                    ) =>
                {
                    StoreError::Damaged {
                        path: path.to_path_buf(),
                        detail: msg.unwrap_or_else(|| f.to_string()),
                    }
                }
                other => e(other),
            })?;
        if check != ["ok"] {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                detail: check.into_iter().take(3).collect::<Vec<_>>().join("; "),
            });
        }
    }
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 1000;
         PRAGMA cache_size = -{WRITER_CACHE_KIB};"
    ))
    .map_err(&e)?;
    migrate(&conn, path)?;
    Ok(conn)
}

/// Databases up to this size get `PRAGMA quick_check` at every start (tens of
/// milliseconds); larger ones only when [`full_check_reason`] finds a reason.
pub const ALWAYS_CHECK_BYTES: u64 = 32 * 1024 * 1024;

/// Why the database at `path` needs a full integrity check before use, if it does: it is
/// small (at most `always_below` bytes), or its write-ahead log still holds frames. The
/// writer ends every clean stop with a truncating checkpoint, so a non-empty log means the
/// last run crashed, lost power or was killed.
pub fn full_check_reason(path: &Path, always_below: u64) -> Option<&'static str> {
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    if size <= always_below {
        return Some("small file");
    }
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    match std::fs::metadata(PathBuf::from(wal)) {
        Ok(m) if m.len() > 0 => Some("the last stop was not clean"),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => Some("the write-ahead log cannot be inspected"),
    }
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let e = sq(path);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&e)?;
    let known = schema::MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction().map_err(&e)?;
        tx.execute_batch(sql).map_err(&e)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        tracing::info!(version = i + 1, "database migrated");
    }
    Ok(())
}

/// Schema version of an open connection.
pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Reads what the daemon resumes from. Only live calls and those finished within
/// `keep_terminal_ms` are loaded (an index, no full-table scan).
pub fn load(
    conn: &Connection,
    path: &Path,
    now: Millis,
    keep_terminal_ms: Millis,
) -> Result<Loaded, StoreError> {
    let e = sq(path);
    let bad = |what: String, detail: String| StoreError::BadRow {
        path: path.to_path_buf(),
        what,
        detail,
    };
    let mut loaded = Loaded::default();
    let mut stmt = conn
        .prepare(
            "SELECT id, body FROM calls WHERE status NOT IN ('completed', 'cancelled', 'failed')
             UNION
             SELECT id, body FROM calls WHERE updated_at >= ?1",
        )
        .map_err(&e)?;
    let rows = stmt
        .query_map([now.saturating_sub(keep_terminal_ms)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(&e)?;
    for row in rows {
        let (id, body) = row.map_err(&e)?;
        let call: Call = serde_json::from_str(&body)
            .map_err(|err| bad(format!("calls/{id}"), err.to_string()))?;
        loaded.calls.push(call);
    }
    let mut stmt = conn.prepare("SELECT id, body FROM couriers").map_err(&e)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(&e)?;
    for row in rows {
        let (id, body) = row.map_err(&e)?;
        let c: Courier = serde_json::from_str(&body)
            .map_err(|err| bad(format!("couriers/{id}"), err.to_string()))?;
        loaded.couriers.push(c);
    }
    let mut stmt = conn
        .prepare(
            "SELECT id, topic, payload, retain, expiry_s FROM outbox WHERE sent_at IS NULL ORDER BY id",
        )
        .map_err(&e)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                OutMsg {
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    retain: r.get::<_, i64>(3)? != 0,
                    expiry_s: r.get::<_, Option<u32>>(4)?,
                },
            ))
        })
        .map_err(&e)?;
    for row in rows {
        loaded.unsent.push(row.map_err(&e)?);
    }
    Ok(loaded)
}

/// One unit of work for the writer.
#[derive(Debug)]
pub enum Op {
    /// Apply a decision's changes.
    Apply(Vec<Change>),
    /// The broker acknowledged these outbox rows.
    MarkSent(Vec<i64>),
    /// Liveness check: proves the writer is taking work.
    Ping,
    /// Retention: delete finished calls (and their rows) last changed before `before`,
    /// at most `limit` of them, queueing an empty retained message for each call's state
    /// topic; also drop sent outbox rows older than `before`.
    Prune {
        /// Cut-off, unix ms.
        before: Millis,
        /// Most calls per transaction (keeps commits short).
        limit: usize,
        /// Topics of the site.
        topics: pickup_protocol::Topics,
    },
    /// A notification sink's decision about one delivery (delivered, retry later, dead).
    Delivery(deliveries::Update),
}

/// A job in the writer's queue: work, and what to hand on once it is committed.
#[derive(Debug)]
pub struct WriteJob<R> {
    /// The work.
    pub op: Op,
    /// Passed on (e.g. the answer to send) after the commit that holds `op`.
    pub after: Option<R>,
}

/// What the writer hands on after each commit.
#[derive(Debug)]
pub struct Committed<R> {
    /// Outbox rows written by this commit, with their ids, in order.
    pub outbox: Vec<(i64, OutMsg)>,
    /// The `after` values of the jobs in this commit, in order.
    pub after: Vec<R>,
}

/// Counters the writer keeps for status lines, metrics and the breaker.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Of those, the ones that did not wait for the disk (courier updates, sent marks).
    pub unsynced: AtomicU64,
    /// Jobs applied.
    pub jobs: AtomicU64,
    /// Duration of the last commit, microseconds.
    pub last_commit_us: AtomicU64,
    /// Jobs waiting in the queue (approximate).
    pub queued: AtomicU64,
    /// Commit durations, when metrics are on.
    pub commit_hist: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
}

/// Handle to the writer thread.
pub struct Writer<R> {
    tx: mpsc::Sender<WriteJob<R>>,
    /// Shared counters.
    pub stats: Arc<WriterStats>,
}

impl<R> Clone for Writer<R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<R: Send + 'static> Writer<R> {
    /// Starts the writer thread on `conn`. `committed` receives each commit's results;
    /// `fatal` receives the error if a commit fails (the daemon must then stop, since the
    /// core's memory is ahead of the file).
    pub fn spawn(
        conn: Connection,
        path: PathBuf,
        queue: usize,
        max_batch: usize,
        committed: mpsc::UnboundedSender<Committed<R>>,
        fatal: mpsc::UnboundedSender<StoreError>,
        beat: Option<crate::systemd::Heartbeat>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<WriteJob<R>>(queue.max(1));
        let stats = Arc::new(WriterStats::default());
        let st = stats.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer_loop(conn, path, rx, max_batch.max(1), committed, fatal, st, beat)
            })?;
        Ok((Self { tx, stats }, handle))
    }

    /// Queues a job; waits while the queue is full (backpressure).
    pub async fn send(&self, job: WriteJob<R>) -> Result<(), StoreError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(job).await.map_err(|_| StoreError::WriterGone)
    }

    /// Queues a job if there is room now.
    pub fn try_send(&self, job: WriteJob<R>) -> Result<(), StoreError> {
        self.tx
            .try_send(job)
            .map(|()| {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            })
            .map_err(|_| StoreError::WriterGone)
    }

    /// Free places in the queue.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The queue's size.
    pub fn max_capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

// The thread's whole context, passed once.
#[allow(clippy::too_many_arguments)]
fn writer_loop<R>(
    mut conn: Connection,
    path: PathBuf,
    mut rx: mpsc::Receiver<WriteJob<R>>,
    max_batch: usize,
    committed: mpsc::UnboundedSender<Committed<R>>,
    fatal: mpsc::UnboundedSender<StoreError>,
    stats: Arc<WriterStats>,
    beat: Option<crate::systemd::Heartbeat>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let started = Instant::now();
        let unsynced = may_skip_sync(&batch);
        match commit(&mut conn, &batch, unsynced) {
            Ok(outbox) => {
                // Every commit counts here, synced or not, as before: the admission
                // breaker refuses calls while the last commit was slow and only a later
                // commit clears that; on a quiet site that is often a courier update.
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.last_commit_us.store(us, Ordering::Relaxed);
                if let Some(h) = stats.commit_hist.get() {
                    h.observe(us as f64 / 1e6);
                }
                if unsynced {
                    stats.unsynced.fetch_add(1, Ordering::Relaxed);
                }
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.jobs.fetch_add(n, Ordering::Relaxed);
                stats.queued.fetch_sub(
                    n.min(stats.queued.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                if let Some(b) = &beat {
                    b.beat();
                }
                let after: Vec<R> = batch.drain(..).filter_map(|j| j.after).collect();
                if !outbox.is_empty() || !after.is_empty() {
                    let _ = committed.send(Committed { outbox, after });
                }
            }
            Err(source) => {
                tracing::error!(error = %source, "commit failed; stopping so that a restart resumes from the file");
                let _ = fatal.send(StoreError::Sqlite {
                    path: path.clone(),
                    source,
                });
                return;
            }
        }
    }
    // Queue closed: every sender is gone. Leave the file tidy.
    // Truncating last leaves an empty log: the mark of a clean stop (see full_check_reason).
    let _ = conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the database");
    }
}

/// Whether `batch` holds only work that a power cut may take back without breaking a
/// promise, so that its commit need not wait for the disk: courier updates (position,
/// presence; stale after a restart anyway, and sent again by the handhelds), marks that
/// outbox rows were sent (a lost mark means the row is published once more, which
/// receivers drop by id) and liveness pings, none of them with anything to hand on after
/// the commit. Anything else (a call, an answer to send, a notification's delivery, a
/// prune) waits for the disk as always. On a quiet site every position report was an
/// fsync of the SD card.
fn may_skip_sync<R>(batch: &[WriteJob<R>]) -> bool {
    batch.iter().all(|j| {
        j.after.is_none()
            && match &j.op {
                Op::Ping | Op::MarkSent(_) => true,
                Op::Apply(changes) => changes.iter().all(|c| matches!(c, Change::Courier(_))),
                Op::Prune { .. } | Op::Delivery(_) => false,
            }
    })
}

/// Commits `batch`; with `unsynced`, without waiting for the disk (`synchronous =
/// NORMAL` for that one transaction). In WAL mode that keeps the file consistent: the
/// commit is in the log, written but not yet flushed, and the next commit that waits for
/// the disk (or a checkpoint) flushes it together with everything before it, so a power
/// cut can only take back the newest unsynced commits, never a synced one after them.
fn commit<R>(
    conn: &mut Connection,
    batch: &[WriteJob<R>],
    unsynced: bool,
) -> rusqlite::Result<Vec<(i64, OutMsg)>> {
    if !unsynced {
        return apply_batch(conn, batch);
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let applied = apply_batch(conn, batch);
    // Back to full durability before anything else, whatever the batch did.
    conn.pragma_update(None, "synchronous", "FULL")?;
    applied
}

/// The changes in `batch` (job index, change index) that a later snapshot of the same
/// call or courier in the same batch replaces. The batch is one transaction, so nobody
/// can see the earlier snapshot: writing only the last one (and serializing it once)
/// gives the same file. A call is typically written at creation and again when it enters
/// dispatching, in the same group commit. Batches that prune keep every write.
fn superseded<R>(batch: &[WriteJob<R>]) -> HashSet<(usize, usize)> {
    let mut skip = HashSet::new();
    if batch.iter().any(|j| matches!(j.op, Op::Prune { .. })) {
        return skip;
    }
    let mut calls: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut couriers: HashMap<&str, (usize, usize)> = HashMap::new();
    for (j, job) in batch.iter().enumerate() {
        let Op::Apply(changes) = &job.op else {
            continue;
        };
        for (k, ch) in changes.iter().enumerate() {
            let prev = match ch {
                Change::Call(c) => calls.insert(c.id.as_str(), (j, k)),
                Change::Courier(c) => couriers.insert(&*c.id, (j, k)),
                _ => None,
            };
            if let Some(p) = prev {
                skip.insert(p);
            }
        }
    }
    skip
}

fn apply_batch<R>(
    conn: &mut Connection,
    batch: &[WriteJob<R>],
) -> rusqlite::Result<Vec<(i64, OutMsg)>> {
    let now = now_ms();
    let skip = superseded(batch);
    let tx = conn.transaction()?;
    let mut outbox = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        match &job.op {
            Op::Ping => {}
            Op::Prune {
                before,
                limit,
                topics,
            } => prune(&tx, *before, *limit, topics, now, &mut outbox)?,
            Op::Delivery(u) => deliveries::update(&tx, u, now)?,
            Op::MarkSent(ids) => {
                let mut st = tx.prepare_cached("UPDATE outbox SET sent_at = ?2 WHERE id = ?1")?;
                for id in ids {
                    st.execute(params![id, now])?;
                }
            }
            Op::Apply(changes) => {
                for (k, ch) in changes.iter().enumerate() {
                    if !skip.contains(&(j, k)) {
                        apply_change(&tx, ch, now, &mut outbox)?;
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok(outbox)
}

/// The calls whose state is retained (see [`Reader::window_ids`]). The sort is outside
/// the union on purpose: with `ORDER BY` on the union itself SQLite merges two walks of
/// the whole primary-key index, reading every call ever stored at each start.
const WINDOW_IDS: &str = "SELECT id FROM (
         SELECT id FROM calls WHERE status NOT IN ('completed', 'cancelled', 'failed')
         UNION SELECT id FROM calls WHERE updated_at >= ?1)
     ORDER BY id";

/// Finds the finished calls to prune: the oldest `limit` finished before `before`.
const PRUNE_SELECT: &str = "SELECT id FROM calls
     WHERE status IN ('completed', 'cancelled', 'failed') AND updated_at < ?1
     ORDER BY updated_at LIMIT ?2";

/// What the prune deletes for each call (`?1`: its id), children first. Each finds its
/// rows through an index, so a prune costs the rows it deletes, not the size of the
/// tables (see `store::tests::every_prune_statement_uses_an_index`).
const PRUNE_DELETES: [&str; 5] = [
    "DELETE FROM events WHERE call_id = ?1",
    "DELETE FROM courier_replies WHERE call_id = ?1",
    "DELETE FROM deliveries WHERE call_id = ?1",
    "DELETE FROM assignments WHERE call_id = ?1",
    "DELETE FROM calls WHERE id = ?1",
];

/// Sent outbox rows pruned per round at most: the outbox holds several rows per call.
const PRUNE_OUTBOX_FACTOR: usize = 20;

/// Deletes up to `limit` calls finished before `before` with every row that belongs to
/// them, clears their retained state topics (through the outbox), and deletes outbox rows
/// sent before `before`.
fn prune(
    tx: &rusqlite::Transaction<'_>,
    before: Millis,
    limit: usize,
    topics: &pickup_protocol::Topics,
    now: Millis,
    outbox: &mut Vec<(i64, OutMsg)>,
) -> rusqlite::Result<()> {
    let calls: Vec<String> = tx
        .prepare_cached(PRUNE_SELECT)?
        .query_map(params![before, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &calls {
        for sql in PRUNE_DELETES {
            tx.prepare_cached(sql)?.execute([id])?;
        }
        // An empty retained message clears the call's state topic.
        let m = OutMsg {
            topic: topics.call_state(id),
            payload: Vec::new(),
            retain: true,
            expiry_s: None,
        };
        apply_change(tx, &Change::Outbox(m), now, outbox)?;
    }
    let sent = prune_outbox(tx, before, limit.saturating_mul(PRUNE_OUTBOX_FACTOR))?;
    if !calls.is_empty() || sent > 0 {
        tracing::info!(
            calls = calls.len(),
            outbox_rows = sent,
            "retention: pruned finished calls"
        );
    }
    Ok(())
}

/// Deletes up to `max` outbox rows sent before `before`, returning how many. Rows are
/// published in id order (commit order) and marked sent as the broker acknowledges them,
/// so the rows old enough to go are the first ones: the walk starts at the smallest id and
/// stops at the first row still unsent or sent since `before`. A round reads the rows it
/// deletes and one more, however long the outbox; a row not yet sent holds back the sent
/// rows after it until it is sent. (The former `DELETE … WHERE sent_at < ?` read the
/// whole table, payloads included, at every round.)
fn prune_outbox(
    tx: &rusqlite::Transaction<'_>,
    before: Millis,
    max: usize,
) -> rusqlite::Result<usize> {
    let mut last = None;
    let mut n = 0;
    {
        let mut st = tx.prepare_cached("SELECT id, sent_at FROM outbox ORDER BY id LIMIT ?1")?;
        let mut rows = st.query([i64::try_from(max).unwrap_or(i64::MAX)])?;
        while let Some(r) = rows.next()? {
            match r.get::<_, Option<Millis>>(1)? {
                Some(sent) if sent < before => {
                    last = Some(r.get::<_, i64>(0)?);
                    n += 1;
                }
                _ => break,
            }
        }
    }
    if let Some(last) = last {
        tx.prepare_cached("DELETE FROM outbox WHERE id <= ?1")?
            .execute([last])?;
    }
    Ok(n)
}

fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn apply_change(
    tx: &rusqlite::Transaction<'_>,
    ch: &Change,
    now: Millis,
    outbox: &mut Vec<(i64, OutMsg)>,
) -> rusqlite::Result<()> {
    match ch {
        Change::Call(c) => {
            tx.prepare_cached(
                "INSERT INTO calls (id, request_id, status, tel, kiosk_id, created_at, updated_at, view, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at,
                     view = excluded.view, body = excluded.body",
            )?
            .execute(params![
                c.id,
                c.request_id,
                c.status.as_str(),
                c.tel,
                c.kiosk_id,
                c.created_at,
                c.updated_at,
                to_json(&c.view())?,
                to_json(c)?,
            ])?;
            let state = match c.status {
                pickup_protocol::CallStatus::Requested
                | pickup_protocol::CallStatus::Dispatching => {
                    if c.offer.is_some() {
                        "offered"
                    } else {
                        "pending"
                    }
                }
                pickup_protocol::CallStatus::Assigned => "assigned",
                pickup_protocol::CallStatus::PickedUp => "picked_up",
                pickup_protocol::CallStatus::Completed => "done",
                pickup_protocol::CallStatus::Cancelled => "cancelled",
                pickup_protocol::CallStatus::Failed => "failed",
            };
            let courier = c
                .courier
                .as_ref()
                .map(|b| b.courier_id.as_str())
                .or_else(|| c.offer.as_ref().map(|o| o.courier_id.as_str()));
            tx.prepare_cached(
                "INSERT OR REPLACE INTO assignments
                 (call_id, state, courier_id, offer_expires_at, grace_until, deadline_at, declined, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                c.id,
                state,
                courier,
                c.offer.as_ref().map(|o| o.expires_at),
                c.grace_until,
                c.deadline_at,
                to_json(&c.declined)?,
                c.updated_at,
            ])?;
        }
        Change::Courier(c) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO couriers (id, online, updated_at, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![c.id, c.online, now, to_json(c)?])?;
        }
        Change::Event(e) => {
            tx.prepare_cached(
                "INSERT INTO events (call_id, courier_id, kind, at, recorded_at, correlation, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                e.call_id,
                e.courier_id,
                e.kind,
                e.at,
                e.recorded_at,
                e.correlation,
                to_json(&e.data)?,
            ])?;
        }
        Change::CourierReply {
            reply_id,
            courier_id,
            call_id,
            action,
        } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO courier_replies (courier_id, reply_id, call_id, action, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![courier_id, reply_id, call_id, action.as_str(), now])?;
        }
        Change::Outbox(m) => {
            tx.prepare_cached(
                "INSERT INTO outbox (topic, payload, retain, expiry_s, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![m.topic, m.payload, m.retain, m.expiry_s, now])?;
            outbox.push((tx.last_insert_rowid(), m.clone()));
        }
        Change::Delivery(d) => deliveries::insert(tx, d, now)?,
    }
    Ok(())
}

/// Copies the live database at `from` into a new file `to` with SQLite's online backup,
/// while the daemon keeps running (WAL readers do not block the writer). The copy is
/// checked with `quick_check` before this returns.
pub fn backup(from: &Path, to: &Path) -> Result<(), StoreError> {
    if to.exists() {
        return Err(StoreError::Io {
            path: to.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "refusing to overwrite"),
        });
    }
    let src =
        Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq(from))?;
    src.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sq(from))?;
    {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|source| StoreError::Io {
                path: to.to_path_buf(),
                source,
            })?;
    }
    let mut dst = Connection::open(to).map_err(sq(to))?;
    {
        let b = rusqlite::backup::Backup::new(&src, &mut dst).map_err(sq(to))?;
        b.run_to_completion(256, std::time::Duration::from_millis(5), None)
            .map_err(sq(to))?;
    }
    let check: String = dst
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(sq(to))?;
    if check != "ok" {
        return Err(StoreError::Damaged {
            path: to.to_path_buf(),
            detail: check,
        });
    }
    Ok(())
}

/// A read-only connection for status reads and lookups; never blocks the writer (WAL).
pub struct Reader {
    conn: Connection,
}

/// Just enough of a call to answer a request about it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRow {
    /// Call id.
    pub id: String,
    /// Status.
    pub status: String,
    /// Public view JSON.
    pub view: String,
}

/// Page cache of the writer's connection, KiB (SQLite's default: 2000). Call ids grow with
/// time, so its inserts touch the right edges of the tables and the request-id index's
/// leaves; the file itself stays in the kernel's page cache either way. 512 against 1024:
/// no difference in throughput measured, and the process-wide bound (see
/// [`READER_CACHE_KIB`]) half a MiB lower.
pub const WRITER_CACHE_KIB: u32 = 512;

/// Page cache of each read-only connection, KiB. They look rows up by key (a call, a
/// delivery, a page of a sweep): the B-trees' upper levels fit, and a leaf comes from the
/// kernel's page cache in microseconds.
///
/// The bundled SQLite (built with `SQLITE_ENABLE_MEMORY_MANAGEMENT`) pools the page caches
/// of all connections in one group whose limit is the sum of their sizes, and any
/// connection may fill it: each open connection adds its size to a process-wide bound. At
/// SQLite's default that is 2 MB for the writer and for each long-lived reader (status
/// reads, the dispatch loop's lookups, the webhook relay), filled as a site's history
/// passes through them; with these sizes, 1.25 MiB in all.
pub const READER_CACHE_KIB: u32 = 256;

impl Reader {
    /// Opens a read-only connection to an existing database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        configure_sqlite();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sq(path))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(sq(path))?;
        conn.pragma_update(None, "cache_size", -i64::from(READER_CACHE_KIB))
            .map_err(sq(path))?;
        Ok(Self { conn })
    }

    /// A call's public view.
    pub fn call(&self, id: &str) -> rusqlite::Result<Option<CallRow>> {
        self.conn
            .prepare_cached("SELECT id, status, view FROM calls WHERE id = ?1")?
            .query_row([id], |r| {
                Ok(CallRow {
                    id: r.get(0)?,
                    status: r.get(1)?,
                    view: r.get(2)?,
                })
            })
            .optional()
    }

    /// The full stored call (for the create answer of a repeated request).
    pub fn call_body(&self, id: &str) -> rusqlite::Result<Option<Call>> {
        let body: Option<String> = self
            .conn
            .prepare_cached("SELECT body FROM calls WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
    }

    /// The call a kiosk request id created.
    pub fn call_for_request(&self, request_id: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT id FROM calls WHERE request_id = ?1")?
            .query_row([request_id], |r| r.get(0))
            .optional()
    }

    /// Whether a courier reply id was applied before, and to what.
    pub fn courier_reply(
        &self,
        courier_id: &str,
        reply_id: &str,
    ) -> rusqlite::Result<Option<(String, String)>> {
        self.conn
            .prepare_cached(
                "SELECT call_id, action FROM courier_replies WHERE courier_id = ?1 AND reply_id = ?2",
            )?
            .query_row([courier_id, reply_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    /// Outbox rows not yet acknowledged.
    pub fn outbox_backlog(&self) -> rusqlite::Result<i64> {
        self.conn
            .prepare_cached("SELECT count(*) FROM outbox WHERE sent_at IS NULL")?
            .query_row([], |r| r.get(0))
    }

    /// Public views of calls that still have a retained state topic: live ones and those
    /// finished since `since`, in pages of `limit` after `after_id` (for republishing).
    pub fn views_page(
        &self,
        since: Millis,
        after_id: &str,
        limit: usize,
    ) -> rusqlite::Result<Vec<(String, String)>> {
        self.conn
            .prepare_cached(
                "SELECT id, view FROM calls WHERE id > ?1
                   AND (status NOT IN ('completed', 'cancelled', 'failed') OR updated_at >= ?2)
                 ORDER BY id LIMIT ?3",
            )?
            .query_map(params![after_id, since, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect()
    }

    /// Ids of the calls whose state is retained: live ones and those changed since
    /// `since`, in id order. Uses the `calls_live` and `calls_updated` indexes, so the
    /// cost follows the number of such calls, not the size of the table (see
    /// [`WINDOW_IDS`]).
    pub fn window_ids(&self, since: Millis) -> rusqlite::Result<Vec<String>> {
        self.conn
            .prepare_cached(WINDOW_IDS)?
            .query_map([since], |r| r.get(0))?
            .collect()
    }

    /// The stored view of call `id`.
    pub fn view(&self, id: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT view FROM calls WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()
    }

    /// Finished calls last changed in `[cursor.0, before)`, after `cursor` in
    /// `(updated_at, id)` order, at most `limit`: the calls whose retained state leaves
    /// the window, page by page.
    pub fn finished_before(
        &self,
        cursor: (Millis, &str),
        before: Millis,
        limit: usize,
    ) -> rusqlite::Result<Vec<(Millis, String)>> {
        self.conn
            .prepare_cached(
                "SELECT updated_at, id FROM calls
                 WHERE updated_at >= ?1 AND updated_at < ?3 AND (updated_at, id) > (?1, ?2)
                   AND status IN ('completed', 'cancelled', 'failed')
                 ORDER BY updated_at, id LIMIT ?4",
            )?
            .query_map(params![cursor.0, cursor.1, before, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect()
    }

    /// The underlying connection (operator queries).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests;
