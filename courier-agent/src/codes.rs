//! Pickup codes handed to simulated couriers by whoever knows them.
//!
//! The daemon gives a call's pickup code to the kiosk only (the customer tells the courier
//! at the door); it is never on the job topic. A simulated courier therefore cannot send
//! `picked_up` on its own. For demos and load tests, the driver that creates the calls
//! knows the codes from the create answers and hands them over: in-process through
//! [`Fleet::codes`](crate::fleet::Fleet::codes), or to the `courier-agent --simulate`
//! process as lines on stdin or in a file (`--pickup-codes`).
//!
//! A line is either `<call_id> <code>` or a JSON object with `pickup_code` and `call_id`
//! (top level or in `call`), such as a create answer printed by a kiosk tool. Anything
//! else is skipped with a warning.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use pickup_protocol::validate;
use tokio::sync::mpsc;

/// The pickup code of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickupCode {
    /// The call.
    pub call_id: String,
    /// Its code, as the customer would say it.
    pub code: String,
}

/// Where a fleet reads pickup codes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeSource {
    /// Standard input, until it ends (`--pickup-codes -`).
    Stdin,
    /// A file, followed like `tail -f` (a driver appends to it; a FIFO works too).
    File(PathBuf),
}

impl CodeSource {
    /// `-` is stdin, anything else a file path.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Self::Stdin
        } else {
            Self::File(PathBuf::from(s))
        }
    }
}

/// Reads one line; `None` when it holds no usable code.
pub fn parse_line(line: &str) -> Option<PickupCode> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (call_id, code) = if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let code = v.get("pickup_code")?.as_str()?.to_string();
        let call_id = v
            .get("call_id")
            .or_else(|| v.get("call").and_then(|c| c.get("call_id")))?
            .as_str()?
            .to_string();
        (call_id, code)
    } else {
        let mut parts = line.split_whitespace();
        let call_id = parts.next()?.to_string();
        let code = parts.next()?.to_string();
        if parts.next().is_some() {
            return None;
        }
        (call_id, code)
    };
    (validate::is_valid_id(&call_id) && validate::is_valid_id(&code))
        .then_some(PickupCode { call_id, code })
}

/// How often a followed file is looked at again after its end.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Reads `source` on its own thread and sends every code to `tx`. Stops at the end of
/// stdin, when the receiver is gone, or when the file cannot be read.
pub fn spawn_reader(source: CodeSource, tx: mpsc::Sender<PickupCode>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pickup-codes".into())
        .spawn(move || match source {
            CodeSource::Stdin => forward(std::io::stdin().lock(), &tx, false),
            CodeSource::File(path) => match std::fs::File::open(&path) {
                Ok(f) => forward(f, &tx, true),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read pickup codes");
                }
            },
        })?;
    Ok(())
}

fn forward(r: impl Read, tx: &mpsc::Sender<PickupCode>, follow: bool) {
    let mut r = BufReader::new(r);
    let mut buf = String::new();
    loop {
        match r.read_line(&mut buf) {
            Ok(0) => {
                if !follow || tx.is_closed() {
                    return;
                }
                std::thread::sleep(FOLLOW_EVERY);
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "reading pickup codes failed");
                return;
            }
        }
        // A followed file may end in the middle of a line the driver is still writing.
        if follow && !buf.ends_with('\n') {
            continue;
        }
        let parsed = parse_line(&buf);
        if parsed.is_none() && !buf.trim().is_empty() {
            tracing::warn!(line = %buf.trim(), "skipped a line without a usable pickup code");
        }
        if let Some(c) = parsed {
            if tx.blocking_send(c).is_err() {
                return;
            }
        }
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_plain_and_json() {
        let want = Some(PickupCode {
            call_id: "c1".into(),
            code: "123456".into(),
        });
        assert_eq!(parse_line("c1 123456\n"), want);
        assert_eq!(parse_line("  c1\t123456  "), want);
        assert_eq!(
            parse_line(
                r#"{"ok":true,"call":{"call_id":"c1","status":"requested"},"pickup_code":"123456"}"#
            ),
            want
        );
        assert_eq!(
            parse_line(r#"{"call_id":"c1","pickup_code":"123456"}"#),
            want
        );
        for bad in [
            "",
            "c1",
            "c1 12 34",
            "c/1 123",
            r#"{"call_id":"c1"}"#,
            r#"{"pickup_code":"1"}"#,
            "{not json",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_followed_file_delivers_lines_appended_later() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes");
        std::fs::write(&path, "c1 111111\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        spawn_reader(CodeSource::File(path.clone()), tx).unwrap();
        let first = rx.blocking_recv().unwrap();
        assert_eq!(first.call_id, "c1");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"junk\nc2 ").unwrap();
        f.flush().unwrap();
        f.write_all(b"222222\n").unwrap();
        let second = rx.blocking_recv().unwrap();
        assert_eq!(
            second,
            PickupCode {
                call_id: "c2".into(),
                code: "222222".into()
            }
        );
        drop(rx);
    }
}
