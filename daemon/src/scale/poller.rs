//! One task per scale: read the weight registers every `poll_interval`, keep the latest
//! reading on the [`ScaleBoard`], and send changed readings for publication.
//!
//! tokio-modbus waits forever for an answer that never comes, so every connection attempt
//! and every request runs under `request_timeout`. A timed-out or broken connection is
//! dropped and rebuilt after a backoff (a late answer on the old stream could otherwise be
//! taken for the next request's). A Modbus exception means the device is there and refuses
//! the request — a config mistake more often than a fault — and is logged as such, keeping
//! the connection. Every failure feeds the scale's breaker; while it is open the scale is not
//! asked at all, readings age on the board and calls fall back to the declared class.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pickup_protocol::Millis;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use super::config::{RegisterType, ScaleSpec, Transport};
use super::decode::{Block, DecodeError, ReadingDecoder};
use super::{Reading, ScaleBoard, ScaleErrorKind, ScaleUpdate};
use crate::breaker::Breaker;

/// Why one poll produced no reading.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// Could not open a connection.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed under the request.
    #[error("transport: {0}")]
    Transport(String),
    /// The device answered with a Modbus exception.
    #[error("the scale refused the request: Modbus exception {0}")]
    Refused(ExceptionCode),
    /// The answer does not match the request.
    #[error("unexpected answer: {0}")]
    BadResponse(String),
    /// The registers do not decode into a weight.
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl PollError {
    /// The error's kind, as shown in [`super::ScaleHealth`].
    pub fn kind(&self) -> ScaleErrorKind {
        match self {
            Self::Connect(_) => ScaleErrorKind::Connect,
            Self::Timeout(_) => ScaleErrorKind::Timeout,
            Self::Transport(_) => ScaleErrorKind::Transport,
            Self::Refused(_) => ScaleErrorKind::Refused,
            Self::BadResponse(_) => ScaleErrorKind::BadResponse,
            Self::Decode(_) => ScaleErrorKind::Decode,
        }
    }

    /// Whether the connection is unusable afterwards. A refusal or a bad value came over a
    /// healthy connection; a timeout leaves an answer possibly still in flight.
    fn drops_connection(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Timeout(_) | Self::Transport(_) | Self::BadResponse(_)
        )
    }
}

/// Exponential reconnect delay with jitter, so several scales behind one gateway do not
/// reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter_ms = u64::try_from(base.as_millis() / 5).unwrap_or(0);
        let extra = if jitter_ms > 0 {
            rand::rng().random_range(0..=jitter_ms)
        } else {
            0
        };
        (base + Duration::from_millis(extra)).min(self.max.max(self.min))
    }
}

/// Wall-clock now, unix ms (reading timestamps are compared with the call's `now`).
fn unix_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens a Modbus connection to the scale (without a timeout: the caller adds it).
async fn connect(spec: &ScaleSpec) -> Result<Context, PollError> {
    let slave = Slave(spec.unit_id);
    match &spec.transport {
        Transport::Tcp { address } => {
            let addrs = tokio::net::lookup_host(address.as_str())
                .await
                .map_err(|e| PollError::Connect(format!("{address}: {e}")))?;
            let mut last = None;
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(stream) => {
                        // One small request, one small answer: never wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        return Ok(tokio_modbus::client::tcp::attach_slave(stream, slave));
                    }
                    Err(e) => last = Some(format!("{addr}: {e}")),
                }
            }
            Err(PollError::Connect(
                last.unwrap_or_else(|| format!("{address}: no address found")),
            ))
        }
        #[cfg(feature = "rtu")]
        Transport::Rtu {
            device,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            use tokio_serial::SerialPortBuilderExt;
            let port = tokio_serial::new(device.as_str(), *baud)
                .parity(match parity {
                    super::config::Parity::None => tokio_serial::Parity::None,
                    super::config::Parity::Even => tokio_serial::Parity::Even,
                    super::config::Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(if *data_bits == 7 {
                    tokio_serial::DataBits::Seven
                } else {
                    tokio_serial::DataBits::Eight
                })
                .stop_bits(if *stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .open_native_async()
                .map_err(|e| PollError::Connect(format!("{device}: {e}")))?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
        }
    }
}

/// One register read with its timeout; checks that the answer fits the request (a device
/// sending too few registers must not reach an index).
async fn read_block(
    ctx: &mut Context,
    kind: RegisterType,
    address: u16,
    count: u16,
    timeout: Duration,
) -> Result<Block, PollError> {
    let request = match kind {
        RegisterType::Holding => Request::ReadHoldingRegisters(address, count),
        RegisterType::Input => Request::ReadInputRegisters(address, count),
    };
    let answer = tokio::time::timeout(timeout, ctx.call(request))
        .await
        .map_err(|_| PollError::Timeout(timeout))?;
    // tokio-modbus: Result<Result<Response, ExceptionCode>, Error>.
    let response = answer
        .map_err(|e| match e {
            tokio_modbus::Error::Transport(io) => PollError::Transport(io.to_string()),
            tokio_modbus::Error::Protocol(p) => PollError::BadResponse(p.to_string()),
        })?
        .map_err(PollError::Refused)?;
    let words = match (kind, response) {
        (RegisterType::Holding, Response::ReadHoldingRegisters(w))
        | (RegisterType::Input, Response::ReadInputRegisters(w)) => w,
        (_, other) => {
            return Err(PollError::BadResponse(format!(
                "{:?} to a {kind:?} register read",
                other.function_code()
            )))
        }
    };
    if words.len() < usize::from(count) {
        return Err(PollError::BadResponse(format!(
            "{} registers where {count} were asked for",
            words.len()
        )));
    }
    Ok((kind, address, words))
}

/// Reads one scale until shut down. See the module docs.
#[derive(Debug)]
pub struct ScalePoller {
    spec: ScaleSpec,
    board: ScaleBoard,
    updates: Option<mpsc::Sender<ScaleUpdate>>,
}

impl ScalePoller {
    /// A poller writing to `board` and, if given, sending changed readings on `updates`
    /// (a full channel drops the update, never stalls the poller; the board keeps it).
    pub fn new(
        spec: ScaleSpec,
        board: ScaleBoard,
        updates: Option<mpsc::Sender<ScaleUpdate>>,
    ) -> Self {
        Self {
            spec,
            board,
            updates,
        }
    }

    /// Runs the poller on its own task until `shutdown` completes.
    pub fn spawn(self, shutdown: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    /// Polls until `shutdown` completes. Returns nothing: every error is handled here
    /// (logged, counted, retried), since a scale must never take the daemon down.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            spec,
            board,
            mut updates,
        } = self;
        let id = spec.id.clone();
        let log_id = id.clone();
        let mut breaker = Breaker::new(spec.breaker.clone()).with_observer(move |t| {
            tracing::warn!(scale = %log_id, from = %t.from, to = %t.to, "scale breaker {t}");
        });
        let mut decoder = ReadingDecoder::new(&spec);
        let mut backoff = Backoff::new(spec.reconnect_min, spec.reconnect_max);
        let reads = spec.reads();
        let timeout = spec.request_timeout;
        let start = Instant::now();
        let mono = || i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX);

        let mut ctx: Option<Context> = None;
        let mut next_connect = start;
        let mut last_sent: Option<Reading> = None;
        let mut failing = false;

        let mut tick = tokio::time::interval(spec.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        tracing::info!(scale = %id, transport = ?spec.transport, "scale poller started");

        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            if ctx.is_none() && Instant::now() < next_connect {
                continue;
            }
            if !breaker.allow(mono()) {
                board.update_health(&id, |h| h.breaker = breaker.state());
                continue;
            }

            let poll = async {
                if ctx.is_none() {
                    let c = tokio::time::timeout(timeout, connect(&spec))
                        .await
                        .map_err(|_| {
                            PollError::Connect(format!("no connection within {timeout:?}"))
                        })??;
                    tracing::info!(scale = %id, "connected to scale");
                    ctx = Some(c);
                }
                let Some(c) = ctx.as_mut() else {
                    return Err(PollError::Connect("not connected".into()));
                };
                let mut blocks = Vec::with_capacity(reads.len());
                for &(kind, address, count) in &reads {
                    blocks.push(read_block(c, kind, address, count, timeout).await?);
                }
                Ok(decoder.decode(&blocks, unix_ms())?)
            };
            // Shutdown must not wait for a request that may hang up to the timeout.
            let result: Result<Reading, PollError> = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = poll => r,
            };

            match result {
                Ok(reading) => {
                    breaker.on_success(mono());
                    backoff.reset();
                    if failing {
                        tracing::info!(scale = %id, weight_kg = reading.weight_kg, "scale answers again");
                        failing = false;
                    }
                    board.record(&id, reading);
                    board.update_health(&id, |h| {
                        h.breaker = breaker.state();
                        h.connected = true;
                    });
                    if should_report(last_sent.as_ref(), &reading, spec.report_every_ms) {
                        if let Some(tx) = &updates {
                            let update = ScaleUpdate {
                                scale_id: id.clone(),
                                report: reading.report(),
                            };
                            match tx.try_send(update) {
                                Ok(()) => last_sent = Some(reading),
                                Err(mpsc::error::TrySendError::Full(_)) => {
                                    tracing::debug!(scale = %id, "update channel full; will resend");
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => updates = None,
                            }
                        }
                    }
                }
                Err(err) => {
                    breaker.on_failure(mono());
                    if err.drops_connection() {
                        ctx = None;
                        decoder.reset();
                        next_connect = Instant::now() + backoff.next_delay();
                    }
                    let kind = err.kind();
                    let message = err.to_string();
                    if !failing {
                        match &err {
                            PollError::Refused(code) => tracing::warn!(
                                scale = %id, exception = %code,
                                "the scale refused the read (check register, register_type and unit_id): {message}"
                            ),
                            _ => {
                                tracing::warn!(scale = %id, kind = ?kind, "scale read failed: {message}")
                            }
                        }
                        failing = true;
                    } else {
                        tracing::debug!(scale = %id, kind = ?kind, "scale read failed: {message}");
                    }
                    let connected = ctx.is_some();
                    board.update_health(&id, |h| {
                        h.breaker = breaker.state();
                        h.connected = connected;
                        h.failures = h.failures.saturating_add(1);
                        h.last_error_kind = Some(kind);
                        h.last_error = Some(message);
                    });
                }
            }
        }
        tracing::info!(scale = %id, "scale poller stopped");
    }
}

/// Whether a reading is worth publishing: the first one, a change, or a heartbeat.
fn should_report(last: Option<&Reading>, r: &Reading, every_ms: u64) -> bool {
    let Some(last) = last else {
        return true;
    };
    (last.weight_kg - r.weight_kg).abs() >= 0.0005
        || last.stable != r.stable
        || last.overload != r.overload
        || last.zero != r.zero
        || u64::try_from(r.at.saturating_sub(last.at)).unwrap_or(0) >= every_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d1 = b.next_delay();
        assert!((100..=120).contains(&d1.as_millis()), "{d1:?}");
        let d2 = b.next_delay();
        assert!((200..=240).contains(&d2.as_millis()), "{d2:?}");
        let d3 = b.next_delay();
        assert_eq!(d3.as_millis(), 350);
        assert_eq!(b.next_delay().as_millis(), 350);
        b.reset();
        assert!(b.next_delay().as_millis() <= 120);
    }

    #[test]
    fn reports_go_out_on_change_or_heartbeat() {
        let r = Reading {
            weight_kg: 1.0,
            stable: true,
            overload: false,
            zero: false,
            at: 1_000,
        };
        assert!(should_report(None, &r, 5_000));
        assert!(!should_report(Some(&r), &Reading { at: 2_000, ..r }, 5_000));
        assert!(should_report(Some(&r), &Reading { at: 6_000, ..r }, 5_000));
        assert!(should_report(
            Some(&r),
            &Reading {
                weight_kg: 1.001,
                ..r
            },
            5_000
        ));
        assert!(should_report(
            Some(&r),
            &Reading { stable: false, ..r },
            5_000
        ));
    }

    #[test]
    fn error_kinds_and_connection_policy() {
        let refused = PollError::Refused(ExceptionCode::IllegalDataAddress);
        assert_eq!(refused.kind(), ScaleErrorKind::Refused);
        assert!(!refused.drops_connection());
        assert!(refused.to_string().contains("refused"));
        assert!(PollError::Timeout(Duration::from_millis(5)).drops_connection());
        assert!(!PollError::Decode(DecodeError::NotFinite(f32::NAN)).drops_connection());
    }
}
