//! The scale poller against a real Modbus TCP server (tokio-modbus's own server, in
//! process, on a loopback port): readings, formats and word orders over the wire, a scale
//! that hangs, one that disappears, and one that refuses the request.

mod scale_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use pickup_protocol::{Parcel, ParcelClass, WeightSource};
use pickupd::breaker::BreakerState;
use pickupd::scale::{
    parse_scales_toml, Fallback, ScaleBoard, ScaleErrorKind, ScalePoller, ScaleSpec, ScaleUpdate,
};
use scale_support::{scale_toml, unix_ms, wait_until, FakeScale};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(10);
const HEAVY_KG: f64 = 10.0;

fn declared(class: ParcelClass) -> Parcel {
    Parcel {
        class,
        weight_kg: None,
        weight_source: None,
    }
}

/// Pollers for `specs`, stopped when the returned sender is dropped.
struct Running {
    board: ScaleBoard,
    updates: mpsc::Receiver<ScaleUpdate>,
    _stop: Vec<oneshot::Sender<()>>,
}

fn run(specs: Vec<ScaleSpec>) -> Running {
    let board = ScaleBoard::new(&specs);
    let (tx, updates) = mpsc::channel(256);
    let mut stops = Vec::new();
    for spec in specs {
        let (stop, stopped) = oneshot::channel::<()>();
        ScalePoller::new(spec, board.clone(), Some(tx.clone())).spawn(async move {
            let _ = stopped.await;
        });
        stops.push(stop);
    }
    Running {
        board,
        updates,
        _stop: stops,
    }
}

/// i32 grams in holding 0-1 (high word first), status word in holding 2:
/// bit 0 stable, bit 1 overload, bit 2 zero.
const INDICATOR: &str = r#"
register = 0
format = "i32"
unit = "g"
[scales.status]
register = 2
stable_bit = 0
overload_bit = 1
zero_bit = 2
"#;

fn grams(g: i32) -> [u16; 2] {
    let v = g as u32;
    [(v >> 16) as u16, v as u16]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_unstable_and_overload_readings_decide_the_class() {
    let scale = FakeScale::start().await;
    scale.set_holding(0, &grams(12_345));
    scale.set_holding(2, &[0b001]);
    let specs = parse_scales_toml(&scale_toml("s1", scale.addr, false, INDICATOR)).unwrap();
    let mut r = run(specs);
    let board = r.board.clone();

    // Stable 12.345 kg: heavy, measured, and the declared "light" is corrected.
    wait_until("a stable reading", WAIT, || {
        board.latest("s1").is_some_and(|x| x.stable)
    })
    .await;
    let reading = board.latest("s1").unwrap();
    assert_eq!(reading.weight_kg, 12.345);
    assert!(!reading.overload && !reading.zero);
    let d = board.resolve(
        &declared(ParcelClass::Light),
        Some("kiosk-s1"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.parcel.class, ParcelClass::Heavy);
    assert_eq!(d.parcel.weight_kg, Some(12.345));
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
    assert!(d.corrected.is_some());
    assert_eq!(d.scale_id.as_deref(), Some("s1"));

    // The reading went out for publication too, as the documented payload.
    let update = tokio::time::timeout(WAIT, r.updates.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(update.scale_id, "s1");
    assert_eq!(update.report.value, 12.345);
    assert_eq!(update.report.unit, "kg");
    assert!(update.report.stable);

    // In motion: the declared class stands.
    scale.set_holding(0, &grams(3_000));
    scale.set_holding(2, &[0b000]);
    wait_until("an unstable reading", WAIT, || {
        board
            .latest("s1")
            .is_some_and(|x| !x.stable && x.weight_kg == 3.0)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Heavy),
        Some("kiosk-s1"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.fallback, Some(Fallback::Unstable));
    assert_eq!(d.parcel.class, ParcelClass::Heavy);
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Declared));

    // Overload (stable bit set too): the number means nothing, the declared class stands.
    scale.set_holding(2, &[0b011]);
    wait_until("an overload reading", WAIT, || {
        board.latest("s1").is_some_and(|x| x.overload)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Light),
        Some("kiosk-s1"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.fallback, Some(Fallback::Overload));
    assert_eq!(d.parcel.class, ParcelClass::Light);

    // Empty scale.
    scale.set_holding(0, &grams(0));
    scale.set_holding(2, &[0b101]);
    wait_until("a zero reading", WAIT, || {
        board.latest("s1").is_some_and(|x| x.zero)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Light),
        Some("kiosk-s1"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.fallback, Some(Fallback::Empty));

    // Stable and light again: a light parcel declared heavy is corrected to light.
    scale.set_holding(0, &grams(2_500));
    scale.set_holding(2, &[0b001]);
    wait_until("a stable light reading", WAIT, || {
        board
            .latest("s1")
            .is_some_and(|x| x.stable && x.weight_kg == 2.5)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Heavy),
        Some("kiosk-s1"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.parcel.class, ParcelClass::Light);
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
    let msg = d.corrected.unwrap();
    assert!(msg.contains("2.5 kg"), "{msg}");
    // Weight and status came in one request per poll (registers 0..=2 together).
    assert_eq!(scale.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_and_word_order_decodes_over_the_wire() {
    let scale = FakeScale::start().await;
    // Words written by hand (not by the daemon's encoder), as a scale manual would list them.
    scale.set_holding(10, &[12_345]); // u16 12345 g
    scale.set_holding(11, &[0xFFF6]); // i16 -10 × 0.01 kg
    scale.set_holding(20, &[0x0001, 0xE240]); // u32 big 123456 g
    scale.set_holding(22, &[0xE240, 0x0001]); // u32 little 123456 g
    scale.set_holding(24, &[0xFFFE, 0x1DC0]); // i32 big -123456 g
    scale.set_holding(26, &[0x1DC0, 0xFFFE]); // i32 little -123456 g
    scale.set_holding(28, &[0x4148, 0x0000]); // f32 big 12.5 kg
    scale.set_holding(30, &[0x0000, 0x4148]); // f32 little 12.5 kg
    scale.set_input(40, &[0x41DC, 0xCCCD]); // f32 big 27.6 lb in input registers
    let cases: &[(&str, &str, f64)] = &[
        (
            "u16",
            "register = 10\nformat = \"u16\"\nunit = \"g\"",
            12.345,
        ),
        (
            "i16",
            "register = 11\nformat = \"i16\"\nunit = \"kg\"\nscale_factor = 0.01",
            -0.1,
        ),
        (
            "u32big",
            "register = 20\nformat = \"u32\"\nword_order = \"big\"\nunit = \"g\"",
            123.456,
        ),
        (
            "u32little",
            "register = 22\nformat = \"u32\"\nword_order = \"little\"\nunit = \"g\"",
            123.456,
        ),
        (
            "i32big",
            "register = 24\nformat = \"i32\"\nunit = \"g\"",
            -123.456,
        ),
        (
            "i32little",
            "register = 26\nformat = \"i32\"\nword_order = \"little\"\nunit = \"g\"",
            -123.456,
        ),
        (
            "f32big",
            "register = 28\nformat = \"f32\"\nunit = \"kg\"",
            12.5,
        ),
        (
            "f32little",
            "register = 30\nformat = \"f32\"\nword_order = \"little\"\nunit = \"kg\"",
            12.5,
        ),
        (
            "f32input",
            "register_type = \"input\"\nregister = 40\nformat = \"f32\"\nunit = \"lb\"",
            12.519,
        ),
    ];
    let text: String = cases
        .iter()
        .map(|(id, body, _)| scale_toml(id, scale.addr, false, body))
        .collect();
    let specs = parse_scales_toml(&text).unwrap();
    let r = run(specs);
    let board = r.board.clone();
    wait_until("a reading from every scale", WAIT, || {
        cases.iter().all(|(id, _, _)| board.latest(id).is_some())
    })
    .await;
    for (id, _, want) in cases {
        let got = board.latest(id).unwrap().weight_kg;
        assert_eq!(got, *want, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_that_stops_answering_times_out_opens_the_breaker_and_recovers() {
    let scale = FakeScale::start().await;
    scale.set_holding(0, &grams(15_000));
    scale.set_holding(2, &[0b001]);
    let specs = parse_scales_toml(&scale_toml("hang", scale.addr, true, INDICATOR)).unwrap();
    let r = run(specs);
    let board = r.board.clone();
    wait_until("a first reading", WAIT, || board.latest("hang").is_some()).await;

    // The scale accepts requests and never answers them.
    scale.mute(true);
    wait_until("a timeout to be recorded", WAIT, || {
        board
            .health("hang")
            .is_some_and(|h| h.last_error_kind == Some(ScaleErrorKind::Timeout))
    })
    .await;
    wait_until("the breaker to open", WAIT, || {
        board
            .health("hang")
            .is_some_and(|h| h.breaker == BreakerState::Open)
    })
    .await;
    // The last reading stays on the board but goes stale; calls get the declared class
    // at once instead of waiting on the scale.
    wait_until("the reading to go stale", WAIT, || {
        board
            .resolve(
                &declared(ParcelClass::Light),
                Some("kiosk-hang"),
                None,
                unix_ms(),
                HEAVY_KG,
            )
            .fallback
            == Some(Fallback::Stale)
    })
    .await;
    assert!(board.latest("hang").is_some());
    let d = board.resolve(
        &declared(ParcelClass::Light),
        Some("kiosk-hang"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.parcel.class, ParcelClass::Light);
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Declared));
    // Each timed-out connection was dropped and a new one made.
    assert!(scale.connections.load(Ordering::SeqCst) >= 2);

    // The scale answers again, with a new weight: a fresh reading is used.
    scale.set_holding(0, &grams(4_000));
    let back_at = unix_ms();
    scale.mute(false);
    wait_until("a fresh reading after recovery", WAIT, || {
        board
            .latest("hang")
            .is_some_and(|x| x.at >= back_at && x.weight_kg == 4.0 && x.stable)
    })
    .await;
    wait_until("the breaker to close", WAIT, || {
        board
            .health("hang")
            .is_some_and(|h| h.breaker == BreakerState::Closed && h.connected)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Heavy),
        Some("kiosk-hang"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
    assert_eq!(d.parcel.class, ParcelClass::Light);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_switched_off_is_reconnected_when_it_comes_back() {
    let mut scale = FakeScale::start().await;
    scale.set_holding(0, &grams(8_000));
    scale.set_holding(2, &[0b001]);
    let specs = parse_scales_toml(&scale_toml("off", scale.addr, true, INDICATOR)).unwrap();
    let r = run(specs);
    let board = r.board.clone();
    wait_until("a first reading", WAIT, || board.latest("off").is_some()).await;

    scale.stop().await;
    wait_until("the breaker to open on a dead scale", WAIT, || {
        board.health("off").is_some_and(|h| {
            h.breaker == BreakerState::Open
                && !h.connected
                && matches!(
                    h.last_error_kind,
                    Some(ScaleErrorKind::Connect | ScaleErrorKind::Transport)
                )
        })
    })
    .await;

    scale.set_holding(0, &grams(11_000));
    let back_at = unix_ms();
    scale.restart().await;
    wait_until("a fresh reading from the restarted scale", WAIT, || {
        board
            .latest("off")
            .is_some_and(|x| x.at >= back_at && x.weight_kg == 11.0)
    })
    .await;
    let d = board.resolve(
        &declared(ParcelClass::Light),
        None,
        Some("off"),
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.parcel.class, ParcelClass::Heavy);
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Scale));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_exception_is_a_refusal_over_a_kept_connection() {
    let scale = FakeScale::start().await;
    // Register 900 does not exist on this device: it answers "illegal data address".
    let body = "register = 900\nformat = \"u16\"\nunit = \"kg\"";
    let specs = parse_scales_toml(&scale_toml("refuse", scale.addr, false, body)).unwrap();
    let r = run(specs);
    let board = r.board.clone();
    wait_until("several refusals, through the breaker", WAIT, || {
        board
            .health("refuse")
            .is_some_and(|h| h.failures >= 5 && h.last_error_kind == Some(ScaleErrorKind::Refused))
    })
    .await;
    let h = board.health("refuse").unwrap();
    assert!(h.connected, "a refusal does not break the connection");
    assert!(h.last_error.unwrap().contains("refused"));
    assert_eq!(board.latest("refuse"), None);
    assert_eq!(scale.connections.load(Ordering::SeqCst), 1);
    let d = board.resolve(
        &declared(ParcelClass::Heavy),
        Some("kiosk-refuse"),
        None,
        unix_ms(),
        HEAVY_KG,
    );
    assert_eq!(d.fallback, Some(Fallback::NoReading));
    assert_eq!(d.parcel.weight_source, Some(WeightSource::Declared));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_hung_request() {
    let scale = FakeScale::start().await;
    scale.set_holding(0, &[1]);
    // A request timeout far beyond the test's patience: only cancellation can end it.
    let text = format!(
        "[[scales]]\nid = \"stop\"\naddress = \"{}\"\nregister = 0\nformat = \"u16\"\nunit = \"kg\"\npoll_interval_ms = 20\nrequest_timeout_ms = 600000\nmax_age_ms = 600000\n",
        scale.addr
    );
    let spec = parse_scales_toml(&text).unwrap().remove(0);
    let board = ScaleBoard::new(std::slice::from_ref(&spec));
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = ScalePoller::new(spec, board.clone(), None).spawn(async move {
        let _ = stopped.await;
    });
    wait_until("a reading", WAIT, || board.latest("stop").is_some()).await;
    scale.mute(true);
    let before = scale.requests.load(Ordering::SeqCst);
    wait_until("a request to hang", WAIT, || {
        scale.requests.load(Ordering::SeqCst) > before
    })
    .await;
    drop(stop);
    tokio::time::timeout(WAIT, handle)
        .await
        .expect("the poller did not stop while its request hung")
        .unwrap();
}
