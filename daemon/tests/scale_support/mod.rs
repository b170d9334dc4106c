//! Shared pieces of the scale tests: an in-process Modbus TCP scale whose registers and
//! behaviour the test controls, and waiting for conditions with a deadline.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response};

/// The register tables of the fake scale.
#[derive(Debug, Default)]
pub struct Registers {
    pub holding: HashMap<u16, u16>,
    pub input: HashMap<u16, u16>,
}

fn read(table: &HashMap<u16, u16>, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
    (0..count)
        .map(|i| {
            addr.checked_add(i)
                .and_then(|a| table.get(&a).copied())
                .ok_or(ExceptionCode::IllegalDataAddress)
        })
        .collect()
}

/// The Modbus service: answers register reads from the shared tables, or — while muted —
/// accepts requests and never answers them (until unmuted), like a hung device.
#[derive(Clone)]
struct ScaleService {
    regs: Arc<Mutex<Registers>>,
    mute: watch::Receiver<bool>,
    requests: Arc<AtomicUsize>,
}

impl tokio_modbus::server::Service for ScaleService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if *self.mute.borrow() {
            let mut mute = self.mute.clone();
            return Box::pin(async move {
                let _ = mute.wait_for(|m| !*m).await;
                Err(ExceptionCode::ServerDeviceBusy)
            });
        }
        let regs = self.regs.lock().unwrap();
        let res = match req {
            Request::ReadHoldingRegisters(a, n) => {
                read(&regs.holding, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => {
                read(&regs.input, a, n).map(Response::ReadInputRegisters)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(res))
    }
}

/// A Modbus TCP scale on a loopback port chosen by the OS.
pub struct FakeScale {
    pub addr: SocketAddr,
    regs: Arc<Mutex<Registers>>,
    mute_tx: watch::Sender<bool>,
    mute_rx: watch::Receiver<bool>,
    /// Connections accepted since start.
    pub connections: Arc<AtomicUsize>,
    /// Requests received since start.
    pub requests: Arc<AtomicUsize>,
    server: Option<JoinHandle<()>>,
}

impl FakeScale {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mute_tx, mute_rx) = watch::channel(false);
        let mut s = Self {
            addr,
            regs: Arc::default(),
            mute_tx,
            mute_rx,
            connections: Arc::default(),
            requests: Arc::default(),
            server: None,
        };
        s.serve(listener);
        s
    }

    fn serve(&mut self, listener: TcpListener) {
        let service = ScaleService {
            regs: Arc::clone(&self.regs),
            mute: self.mute_rx.clone(),
            requests: Arc::clone(&self.requests),
        };
        let connections = Arc::clone(&self.connections);
        self.server = Some(tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = move |stream, _peer| {
                connections.fetch_add(1, Ordering::SeqCst);
                let service = service.clone();
                async move { Ok(Some((service, stream))) }
            };
            let _ = server.serve(&on_connected, |_err| {}).await;
        }));
    }

    /// Sets holding registers from `addr` on.
    pub fn set_holding(&self, addr: u16, words: &[u16]) {
        let mut regs = self.regs.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            regs.holding.insert(addr + i as u16, *w);
        }
    }

    /// Sets input registers from `addr` on.
    pub fn set_input(&self, addr: u16, words: &[u16]) {
        let mut regs = self.regs.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            regs.input.insert(addr + i as u16, *w);
        }
    }

    /// Stops (true) or resumes (false) answering; connections stay open.
    pub fn mute(&self, mute: bool) {
        self.mute_tx.send_replace(mute);
    }

    /// Closes the listener and every connection, like a scale switched off.
    pub async fn stop(&mut self) {
        if let Some(h) = self.server.take() {
            h.abort();
            let _ = h.await;
        }
    }

    /// Listens again on the same port, like the scale switched back on.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for FakeScale {
    fn drop(&mut self) {
        if let Some(h) = self.server.take() {
            h.abort();
        }
    }
}

/// Wall clock, unix ms: the `now` the daemon passes to `resolve_parcel`.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Polls `cond` until it holds or `within` passes; panics naming `what` on timeout.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A scale config for tests, polling every 20 ms. `quick_to_give_up` shortens the request
/// timeout and reading age for tests about failures; the others get generous ones so that a
/// loaded machine cannot turn a slow answer into a spurious failure.
pub fn scale_toml(id: &str, addr: SocketAddr, quick_to_give_up: bool, body: &str) -> String {
    let (timeout, max_age) = if quick_to_give_up {
        (200, 400)
    } else {
        (2_000, 5_000)
    };
    format!(
        r#"
[[scales]]
id = "{id}"
kiosks = ["kiosk-{id}"]
address = "{addr}"
poll_interval_ms = 20
request_timeout_ms = {timeout}
max_age_ms = {max_age}
reconnect_min_ms = 20
reconnect_max_ms = 100
report_every_ms = 1000
{body}
[scales.breaker]
consecutive_failures = 3
open_ms = 150
max_open_ms = 300
"#
    )
}
