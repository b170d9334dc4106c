//! The scale poller against a Modbus server written by someone else: pymodbus, started as
//! a subprocess on a loopback port with registers holding known weights. Guards against
//! our client and our test server agreeing on a mistake.
//!
//! Needs pymodbus for some python3 (`apt-get install -y python3-pymodbus` or
//! `pip install pymodbus`); `PICKUP_TEST_PYTHON` may name the interpreter. Without it the
//! test fails and says so: skipping would hide that the check never ran.

mod scale_support;

use std::process::Stdio;
use std::time::Duration;

use pickup_protocol::{Parcel, ParcelClass, WeightSource};
use pickupd::scale::{parse_scales_toml, ScaleBoard, ScalePoller};
use scale_support::{scale_toml, unix_ms, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(15);

/// The first interpreter that can import pymodbus, with pymodbus's version.
async fn python_with_pymodbus() -> (String, String) {
    let candidates: Vec<String> = match std::env::var("PICKUP_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => vec![p],
        // A python3 first on PATH (pyenv, venv) may lack Debian's python3-pymodbus,
        // which lives with /usr/bin/python3.
        _ => vec!["python3".into(), "/usr/bin/python3".into()],
    };
    let mut tried = Vec::new();
    for python in candidates {
        let out = Command::new(&python)
            .args(["-c", "import pymodbus; print(pymodbus.__version__)"])
            .stdin(Stdio::null())
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {
                let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
                return (python, version);
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().last().unwrap_or("").to_string();
                tried.push(format!("{python}: {last}"));
            }
            Err(e) => tried.push(format!("{python}: {e}")),
        }
    }
    panic!(
        "pymodbus is not installed, so the scale cannot be tested against an independent \
         Modbus server. Install it with `apt-get install -y python3-pymodbus` (Debian) or \
         `pip install pymodbus`, or set PICKUP_TEST_PYTHON to a python that has it. Tried: {}",
        tried.join("; ")
    );
}

/// Starts the fixture server; returns the child (killed on drop) and its port.
async fn start_pymodbus(python: &str, registers: &[&str]) -> (Child, u16) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/modbus_scale_server.py"
    );
    let mut child = Command::new(python)
        .arg(script)
        .args(["--port", "0"])
        .args(registers)
        // Held open: the server exits when the test (and so this pipe) goes away.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {python} {script}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the pymodbus server did not report ready in time")
        .unwrap();
    let Some(line) = line else {
        let status = child.wait().await.unwrap();
        panic!("the pymodbus server exited before it was ready ({status}); see its stderr above");
    };
    let port = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse::<u16>().ok())
        .unwrap_or_else(|| panic!("unexpected first line from the pymodbus server: {line:?}"));
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_read_from_pymodbus_decide_the_class() {
    let (python, version) = python_with_pymodbus().await;
    eprintln!("using pymodbus {version} from {python}");

    let (_server, port) = start_pymodbus(
        &python,
        &[
            // 12345 g as i32, high word first, then a status word with bit 0 = stable.
            "--holding",
            "100=0x0000,0x3039,0x0001",
            // 2.75 kg as f32, low word first (0x40300000).
            "--input",
            "10=0x0000,0x4030",
        ],
    )
    .await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = [
        scale_toml(
            "py-heavy",
            addr,
            false,
            r#"
unit_id = 7
register = 100
format = "i32"
unit = "g"
[scales.status]
register = 102
stable_bit = 0
"#,
        ),
        scale_toml(
            "py-light",
            addr,
            false,
            r#"
register_type = "input"
register = 10
format = "f32"
word_order = "little"
unit = "kg"
stable_samples = 3
"#,
        ),
    ]
    .concat();
    let specs = parse_scales_toml(&text).unwrap();
    let board = ScaleBoard::new(&specs);
    let mut stops = Vec::new();
    for spec in specs {
        let (stop, stopped) = oneshot::channel::<()>();
        ScalePoller::new(spec, board.clone(), None).spawn(async move {
            let _ = stopped.await;
        });
        stops.push(stop);
    }

    wait_until("stable readings from both pymodbus scales", WAIT, || {
        ["py-heavy", "py-light"]
            .iter()
            .all(|id| board.latest(id).is_some_and(|r| r.stable))
    })
    .await;

    let heavy = board.resolve(
        &Parcel {
            class: ParcelClass::Light,
            weight_kg: None,
            weight_source: None,
        },
        Some("kiosk-py-heavy"),
        None,
        unix_ms(),
        10.0,
    );
    assert_eq!(heavy.parcel.class, ParcelClass::Heavy, "{heavy:?}");
    assert_eq!(heavy.parcel.weight_kg, Some(12.345));
    assert_eq!(heavy.parcel.weight_source, Some(WeightSource::Scale));
    assert!(heavy.corrected.is_some());

    let light = board.resolve(
        &Parcel {
            class: ParcelClass::Heavy,
            weight_kg: None,
            weight_source: None,
        },
        None,
        Some("py-light"),
        unix_ms(),
        10.0,
    );
    assert_eq!(light.parcel.class, ParcelClass::Light, "{light:?}");
    assert_eq!(light.parcel.weight_kg, Some(2.75));
    assert_eq!(light.parcel.weight_source, Some(WeightSource::Scale));
    assert!(light.corrected.is_some());
}
