//! The README's first command, `cargo run -p pickupd -- demo`, as a real process: the
//! daemon with its embedded broker and a SQLite file, simulated couriers and a kiosk, each
//! call's path printed to its end. (Here on a free port and in a temporary directory; the
//! command itself uses port 1883 and ./data.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_takes_calls_through_to_their_end_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pickupd.toml");
    std::fs::write(
        &cfg,
        "[store]\npath = \"./demo.db\"\n\n[broker]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pickupd"))
        .arg("--config")
        .arg(&cfg)
        .args([
            "demo",
            "--calls",
            "4",
            "--interval-ms",
            "200",
            "--cancel-every",
            "4",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        // Files, not pipes: nothing can block on a full pipe while the test waits.
        .stdout(Stdio::from(
            std::fs::File::create(dir.path().join("out")).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );

    assert!(
        out.contains("pickupd demo: broker mqtt://127.0.0.1:"),
        "{out}"
    );
    // Every call ends, and its path is printed: three completed, the fourth cancelled.
    let ended: Vec<&str> = out.lines().filter(|l| l.starts_with('✔')).collect();
    assert_eq!(ended.len(), 4, "{out}");
    let completed = ended
        .iter()
        .filter(|l| l.contains("→ picked_up → completed"))
        .count();
    assert_eq!(completed, 3, "{out}");
    assert!(ended.iter().any(|l| l.contains("→ cancelled")), "{out}");
    // The calls are in the SQLite file the configuration names.
    assert!(dir.path().join("demo.db").exists());
}
