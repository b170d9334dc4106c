//! The device's queue of courier replies not yet answered by the daemon.
//!
//! Every action (accept, decline, picked up, completed) is written here first, with its
//! `reply_id` and the time it happened, and leaves only when the daemon has answered it
//! (applied, a repeat, or refused for good). A courier who loses signal, or whose handheld
//! restarts, keeps what they did; on reconnect the replies go out in order with their
//! original `at`.
//!
//! The file holds one JSON [`JobReply`] per line. Appends are fsync'd; removals rewrite the
//! file through a temporary file and a rename, so a power cut leaves either the old or the
//! new content. A line that cannot be read (torn write, hand edit, disk fault) is reported,
//! copied to `<file>.corrupt` for inspection, and skipped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use pickup_protocol::JobReply;
use thiserror::Error;

/// Most replies kept; a courier cannot act on more jobs than this while out of coverage.
pub const MAX_QUEUED: usize = 256;

/// Why the queue could not take or give back a reply.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The file could not be read or written.
    #[error("queue file {path}: {source}")]
    Io {
        /// The queue file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// [`MAX_QUEUED`] replies are waiting already.
    #[error("{MAX_QUEUED} replies are already waiting for an answer")]
    Full,
}

/// A line of the queue file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub error: String,
}

/// Where queued replies live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueStore {
    /// A file on the device (the handheld).
    File(PathBuf),
    /// Memory only (simulated couriers: nothing to survive).
    Memory,
}

/// The queue: the replies in order, mirrored to the file when there is one.
#[derive(Debug)]
pub struct ReplyQueue {
    path: Option<PathBuf>,
    entries: Vec<JobReply>,
}

impl ReplyQueue {
    /// Opens (or creates) the queue, returning the lines it had to skip.
    pub fn open(store: &QueueStore) -> Result<(Self, Vec<CorruptLine>), QueueError> {
        let path = match store {
            QueueStore::Memory => {
                return Ok((
                    Self {
                        path: None,
                        entries: Vec::new(),
                    },
                    Vec::new(),
                ))
            }
            QueueStore::File(p) => p.clone(),
        };
        let io_err = |source| QueueError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err)?;
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        let (entries, corrupt, bad_lines) = parse(&bytes);
        let queue = Self {
            path: Some(path.clone()),
            entries,
        };
        if !bad_lines.is_empty() {
            let mut aside = path.clone().into_os_string();
            aside.push(".corrupt");
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(PathBuf::from(aside))
                .map_err(io_err)?;
            for l in &bad_lines {
                f.write_all(l).map_err(io_err)?;
                f.write_all(b"\n").map_err(io_err)?;
            }
            f.sync_all().map_err(io_err)?;
        }
        let clean = bytes.is_empty() || (bad_lines.is_empty() && bytes.ends_with(b"\n"));
        if !clean || !path.exists() {
            queue.rewrite()?;
        }
        Ok((queue, corrupt))
    }

    /// Replies waiting, oldest first.
    pub fn entries(&self) -> &[JobReply] {
        &self.entries
    }

    /// Number of replies waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends a reply and makes it durable before returning.
    pub fn push(&mut self, reply: JobReply) -> Result<(), QueueError> {
        if self.entries.len() >= MAX_QUEUED {
            return Err(QueueError::Full);
        }
        if let Some(path) = &self.path {
            let io_err = |source| QueueError::Io {
                path: path.clone(),
                source,
            };
            let mut line = serde_json::to_vec(&reply).map_err(|e| io_err(io::Error::other(e)))?;
            line.push(b'\n');
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err)?;
            f.write_all(&line).map_err(io_err)?;
            f.sync_data().map_err(io_err)?;
        }
        self.entries.push(reply);
        Ok(())
    }

    /// Removes the reply with this id (answered by the daemon). Returns whether it was
    /// there.
    pub fn remove(&mut self, reply_id: &str) -> Result<bool, QueueError> {
        let before = self.entries.len();
        self.entries
            .retain(|r| r.reply_id.as_deref() != Some(reply_id));
        if self.entries.len() == before {
            return Ok(false);
        }
        self.rewrite()?;
        Ok(true)
    }

    /// Writes the whole queue through a temporary file and a rename.
    fn rewrite(&self) -> Result<(), QueueError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let io_err = |source| QueueError::Io {
            path: path.clone(),
            source,
        };
        let mut body = Vec::new();
        for r in &self.entries {
            let line = serde_json::to_vec(r).map_err(|e| io_err(io::Error::other(e)))?;
            body.extend_from_slice(&line);
            body.push(b'\n');
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            f.write_all(&body).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Makes the rename itself durable; not every file system allows syncing a
            // directory, and the data is already safe in either name.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Splits the file into good replies, reports of bad lines, and the bad lines themselves.
fn parse(bytes: &[u8]) -> (Vec<JobReply>, Vec<CorruptLine>, Vec<Vec<u8>>) {
    let mut entries = Vec::new();
    let mut corrupt = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let res = serde_json::from_slice::<JobReply>(raw)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                r.validate()?;
                match (&r.reply_id, r.at) {
                    (Some(_), Some(_)) => Ok(r),
                    _ => Err("reply_id and at are required".to_string()),
                }
            });
        match res {
            Ok(r) => entries.push(r),
            Err(error) => {
                corrupt.push(CorruptLine { line: i + 1, error });
                bad.push(raw.to_vec());
            }
        }
    }
    (entries, corrupt, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pickup_protocol::JobAction;

    fn reply(id: &str, at: i64) -> JobReply {
        JobReply {
            call_id: "c1".into(),
            action: JobAction::Accept,
            reply_id: Some(id.into()),
            reason: None,
            pickup_code: None,
            at: Some(at),
        }
    }

    #[test]
    fn survives_reopen_and_removes_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::File(dir.path().join("sub/q.queue"));
        let (mut q, bad) = ReplyQueue::open(&store).unwrap();
        assert!(bad.is_empty());
        q.push(reply("a", 1)).unwrap();
        q.push(reply("b", 2)).unwrap();
        drop(q);
        let (mut q, _) = ReplyQueue::open(&store).unwrap();
        assert_eq!(q.len(), 2);
        assert!(q.remove("a").unwrap());
        assert!(!q.remove("a").unwrap());
        let (q2, _) = ReplyQueue::open(&store).unwrap();
        assert_eq!(q2.entries(), &[reply("b", 2)]);
        let mut q = q2;
        q.remove("b").unwrap();
        let QueueStore::File(p) = &store else {
            unreachable!()
        };
        assert_eq!(fs::metadata(p).unwrap().len(), 0);
    }

    #[test]
    fn corrupt_lines_are_reported_set_aside_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.queue");
        let good = serde_json::to_string(&reply("ok", 5)).unwrap();
        let text = format!(
            "{{not json\n{good}\n{{\"call_id\":\"bad id\",\"action\":\"accept\",\"reply_id\":\"x\",\"at\":1}}\n\n{{\"call_id\":\"c\",\"action\":\"accept\"}}\n{{\"call_id\":\"c\",\"act"
        );
        fs::write(&path, text).unwrap();
        let (q, bad) = ReplyQueue::open(&QueueStore::File(path.clone())).unwrap();
        assert_eq!(q.entries(), &[reply("ok", 5)]);
        assert_eq!(
            bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![1, 3, 5, 6]
        );
        // The file now holds only the good line; the bad ones were kept aside.
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{good}\n"));
        let aside = fs::read_to_string(dir.path().join("q.queue.corrupt")).unwrap();
        assert_eq!(aside.lines().count(), 4);
    }

    #[test]
    fn a_full_queue_refuses() {
        let (mut q, _) = ReplyQueue::open(&QueueStore::Memory).unwrap();
        for i in 0..MAX_QUEUED {
            q.push(reply(&format!("r{i}"), 1)).unwrap();
        }
        assert!(matches!(q.push(reply("x", 1)), Err(QueueError::Full)));
    }
}
