//! pickupd's embedded MQTT broker: rumqttd 0.20 behind a small interface, so the daemon
//! can start one with a config and get back a handle with its addresses, a health probe
//! and a shutdown — and so the engine can be swapped or replaced by an external broker
//! without touching the daemon.
//!
//! Layout:
//! - [`config`]: [`BrokerConfig`], every rumqttd knob set deliberately, validated with the
//!   key named in each error.
//! - this module: [`Broker`] — the rumqttd router on its own thread and one OS thread with
//!   its own tokio runtime per listener (rumqttd has no shutdown API; dropping a listener's
//!   runtime closes its port and its connections).
//! - [`probe`]: [`Prober`] — a real MQTT CONNECT/CONNACK per listener, because a rumqttd
//!   listener can be dead while the process and the port look fine.
//! - `auth`: static users + the [`AuthHook`] + the probe's own secret, in one callback.
//! - `nodelay`: TCP_NODELAY on rumqttd's listening socket (accepted sockets inherit it).
//!
//! The traps this works around are in docs/broker.md.

mod auth;
pub mod config;
pub mod local;
pub mod nodelay;
pub mod probe;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, Server, ServerSettings,
};
use thiserror::Error;
use tokio::sync::oneshot;

pub use config::{AuthHook, BrokerConfig, SegmentSizing};
pub use probe::{ListenerFailure, ProbeError, Prober};
pub use tls::TlsSettings;

/// One of the broker's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The MQTT 3.1.1 listener (always on).
    V4,
    /// The opt-in MQTT 5 listener.
    V5,
}

impl Listener {
    pub(crate) fn short(self) -> &'static str {
        match self {
            Listener::V4 => "v4",
            Listener::V5 => "v5",
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Listener::V4 => "MQTT 3.1.1",
            Listener::V5 => "MQTT 5",
        })
    }
}

/// Why the broker could not start (or a listener could not restart).
#[derive(Debug, Error)]
pub enum BrokerError {
    /// A setting is wrong; `key` is its name under `[broker]`.
    #[error("broker.{key}: {problem}")]
    Config {
        /// The setting, e.g. `max_payload`.
        key: String,
        /// What is wrong and what would be right.
        problem: String,
    },
    /// The listen address is taken or not available.
    #[error("{listener} listener cannot listen on {addr}: {reason}")]
    Bind {
        /// Which listener.
        listener: Listener,
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's answer.
        reason: String,
    },
    /// The listener is bound but did not complete an MQTT CONNECT in time.
    #[error("{listener} listener on {addr} did not become ready within {waited:?}: {reason}")]
    NotReady {
        /// Which listener.
        listener: Listener,
        /// Its address.
        addr: SocketAddr,
        /// How long start waited.
        waited: Duration,
        /// The last probe failure.
        reason: String,
    },
    /// A thread could not be created.
    #[error("cannot start the broker's {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// How long `start` waits for each listener to answer a CONNECT.
const START_DEADLINE: Duration = Duration::from_secs(5);
/// Attempts at a free port when the configured port is 0 and someone else took the one
/// picked between picking and binding.
const FREE_PORT_ATTEMPTS: usize = 5;

/// Starts a rumqttd server future for a listener; captures the router's sender, whose type
/// rumqttd does not export.
type Serve =
    Arc<dyn Fn(Listener, ServerSettings) -> Pin<Box<dyn Future<Output = String>>> + Send + Sync>;

/// A running listener: a thread with its own current-thread runtime.
struct RunningListener {
    /// Which listener, for logs and restarts.
    listener: Listener,
    /// The concrete address it is bound to.
    addr: SocketAddr,
    /// Ends the server future; the thread then drops the runtime and with it every socket.
    stop: Option<oneshot::Sender<()>>,
    /// Joined on stop, so the port is free when stop returns.
    thread: Option<JoinHandle<()>>,
    /// Whether TCP_NODELAY was set on its listening socket.
    nodelay: bool,
}

impl RunningListener {
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(listener = %self.listener, "listener thread panicked while stopping");
            }
        }
    }
}

/// The running embedded broker. Dropping it is the same as [`Broker::shutdown`].
pub struct Broker {
    /// The running listeners, MQTT 3.1.1 first.
    listeners: Vec<RunningListener>,
    /// Each listener's rumqttd settings (with the concrete address), to restart it as it was.
    settings: HashMap<Listener, ServerSettings>,
    /// Starts a listener's server against the one router; the router outlives restarts.
    serve: Serve,
    /// Probes every listener; also the authority on listener addresses.
    prober: Prober,
    /// Whether to set TCP_NODELAY on (re)started listeners.
    tcp_nodelay: bool,
    /// The TLS listener, when configured.
    tls: Option<tls::TlsFront>,
    /// Opens in-process connections to the router ([`Broker::connect_in_process`]).
    connect: local::Connect,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l: Vec<_> = self
            .listeners
            .iter()
            .map(|l| (l.listener, l.addr))
            .collect();
        f.debug_struct("Broker")
            .field("listeners", &l)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the router and the listeners; returns once each listener answers an MQTT
    /// CONNECT. A port 0 is resolved to a free port first. A plain function, callable from
    /// inside or outside a tokio runtime (it blocks for at most a few seconds).
    pub fn start(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        cfg.validate()?;
        let secret: String = {
            let bytes: [u8; 16] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        let nonce: String = {
            let bytes: [u8; 4] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        let secret: Arc<str> = Arc::from(secret);

        let router_tx = Router::new(0, router_config(&cfg)).spawn();
        let connect_tx = router_tx.clone();
        let connect: local::Connect = Arc::new(move |id: &str, clean: bool| {
            rumqttd::local::LinkBuilder::new(id, connect_tx.clone())
                .clean_session(clean)
                .build()
                .map_err(|e| e.to_string())
        });
        let serve: Serve = Arc::new(move |listener, settings| {
            let tx = router_tx.clone();
            Box::pin(async move {
                let result = match listener {
                    Listener::V4 => Server::new(settings, tx, V4).start(LinkType::Remote).await,
                    Listener::V5 => Server::new(settings, tx, V5).start(LinkType::Remote).await,
                };
                match result {
                    Ok(()) => "server stopped".to_string(),
                    Err(e) => e.to_string(),
                }
            })
        });

        let connections = connection_settings(&cfg, &secret);
        let mut wanted = vec![(Listener::V4, cfg.listen)];
        if let Some(v5) = cfg.listen_v5 {
            wanted.push((Listener::V5, v5));
        }

        let mut broker = Broker {
            listeners: Vec::new(),
            settings: HashMap::new(),
            serve,
            prober: Prober {
                listeners: Vec::new(),
                secret,
                counter: Arc::new(AtomicU64::new(0)),
                nonce: Arc::from(nonce),
            },
            tcp_nodelay: cfg.tcp_nodelay,
            tls: None,
            connect,
        };
        for (listener, addr) in wanted {
            // On error `broker` drops here and stops the listeners already running.
            let running = broker.start_listener(listener, addr, &connections)?;
            broker.prober.listeners.push((listener, running.addr));
            broker.listeners.push(running);
        }
        if let Some(t) = &cfg.tls {
            let upstream = probe::reachable(broker.v4_addr());
            broker.tls = Some(tls::TlsFront::start(t, upstream, cfg.max_connections)?);
        }
        tracing::info!(
            v4 = %broker.v4_addr(),
            v5 = ?broker.v5_addr(),
            auth = cfg.auth_required(),
            tcp_nodelay = broker.listeners.iter().all(|l| l.nodelay),
            "embedded MQTT broker ready"
        );
        Ok(broker)
    }

    /// An MQTT connection to this broker from inside the process, without TCP (see
    /// [`local`]): the same events as a network connection, for a fraction of the cost;
    /// `inflight` QoS 1 publishes at most wait for the router's acknowledgement.
    /// Not authenticated: only for code running in this process.
    pub fn connect_in_process(
        &self,
        client_id: &str,
        clean_session: bool,
        inflight: u16,
    ) -> Result<
        (
            pickup_protocol::client::Link,
            pickup_protocol::client::LinkEvents,
        ),
        pickup_protocol::client::LinkError,
    > {
        local::open(self.connect.clone(), client_id, clean_session, inflight)
    }

    /// The MQTT 3.1.1 listener's address (port 0 already resolved).
    pub fn v4_addr(&self) -> SocketAddr {
        // start() always creates the MQTT 3.1.1 listener first; its address never changes.
        self.addr_of(Listener::V4)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The MQTT 5 listener's address, when it was configured.
    pub fn v5_addr(&self) -> Option<SocketAddr> {
        self.addr_of(Listener::V5)
    }

    fn addr_of(&self, which: Listener) -> Option<SocketAddr> {
        // The prober keeps every started listener's address, even while one is restarting.
        self.prober
            .listeners
            .iter()
            .find(|(l, _)| *l == which)
            .map(|(_, a)| *a)
    }

    /// The TLS listener's address, when configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.addr)
    }

    /// `mqtt://host:port` of the MQTT 3.1.1 listener for a client in this process or on this
    /// machine (an unspecified listen address like 0.0.0.0 becomes loopback).
    pub fn v4_url(&self) -> String {
        format!("mqtt://{}", probe::reachable(self.v4_addr()))
    }

    /// `mqtt://host:port` of the MQTT 5 listener, when configured (see [`Broker::v4_url`]).
    pub fn v5_url(&self) -> Option<String> {
        self.v5_addr()
            .map(|a| format!("mqtt://{}", probe::reachable(a)))
    }

    /// Whether TCP_NODELAY was applied to every listener (see [`BrokerConfig::tcp_nodelay`]).
    pub fn nodelay_applied(&self) -> bool {
        self.listeners.iter().all(|l| l.nodelay)
    }

    /// Health: each listener still completes a real MQTT CONNECT/CONNACK (clean session, a
    /// client id the previous probes did not use). The error names every listener that
    /// failed.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        self.prober.probe(timeout).await
    }

    /// A probe handle that outlives borrows of the broker (for a health/watchdog task).
    pub fn prober(&self) -> Prober {
        self.prober.clone()
    }

    /// Replaces a listener that stopped answering with a fresh one on the same address.
    /// Its current connections are dropped (clients reconnect); sessions and retained
    /// messages live in the router and survive. This was the cure for rumqttd's poisoned
    /// listener (fixed since, see docs/broker.md); it stays for whatever else could stop a
    /// listener.
    pub fn restart_listener(&mut self, which: Listener) -> Result<(), BrokerError> {
        // Settings and address stay known even if an earlier restart failed half-way.
        let (Some(settings), Some(addr)) = (self.settings.get(&which), self.addr_of(which)) else {
            return Err(BrokerError::Config {
                key: match which {
                    Listener::V4 => "listen".into(),
                    Listener::V5 => "listen_v5".into(),
                },
                problem: format!("no {which} listener is configured"),
            });
        };
        let connections = settings.connections.clone();
        if let Some(pos) = self.listeners.iter().position(|l| l.listener == which) {
            self.listeners.remove(pos).stop();
        }
        let running = self.start_listener(which, addr, &connections)?;
        tracing::warn!(listener = %which, %addr, "listener restarted");
        self.listeners.push(running);
        self.listeners.sort_by_key(|l| l.listener != Listener::V4);
        Ok(())
    }

    /// Stops accepting and drops every connection; the ports are free when this returns.
    /// rumqttd's router thread cannot be stopped and idles until the process exits.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        if let Some(mut t) = self.tls.take() {
            t.stop();
        }
        for l in self.listeners.iter_mut() {
            l.stop();
        }
        if !self.listeners.is_empty() {
            tracing::info!("embedded MQTT broker stopped");
        }
        self.listeners.clear();
    }

    fn start_listener(
        &mut self,
        listener: Listener,
        addr: SocketAddr,
        connections: &ConnectionSettings,
    ) -> Result<RunningListener, BrokerError> {
        let attempts = if addr.port() == 0 {
            FREE_PORT_ATTEMPTS
        } else {
            1
        };
        let mut last_err = None;
        for _ in 0..attempts {
            let concrete = resolve_port(listener, addr)?;
            let settings = ServerSettings {
                name: format!("pickup-{}", listener.short()),
                listen: concrete,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections.clone(),
            };
            match self.spawn_listener(listener, settings.clone()) {
                Ok(running) => {
                    self.settings.insert(listener, settings);
                    return Ok(running);
                }
                Err(e @ BrokerError::Bind { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| BrokerError::Bind {
            listener,
            addr,
            reason: "no attempt made".into(),
        }))
    }

    fn spawn_listener(
        &self,
        listener: Listener,
        settings: ServerSettings,
    ) -> Result<RunningListener, BrokerError> {
        let addr = settings.listen;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel::<String>();
        let serve = self.serve.clone();
        let what = format!("{} listener", listener.short());
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-{}", listener.short()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    tokio::select! {
                        why = serve(listener, settings) => {
                            let _ = exit_tx.send(why);
                        }
                        _ = stop_rx => {}
                    }
                });
                // Drops every connection task (closing its socket) and the listening socket.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|source| BrokerError::Thread {
                what: what.clone(),
                source,
            })?;
        let mut running = RunningListener {
            listener,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
            nodelay: false,
        };
        let handle = match handle_rx.recv() {
            Ok(Ok(h)) => h,
            Ok(Err(source)) => {
                running.stop();
                return Err(BrokerError::Thread { what, source });
            }
            Err(_) => {
                running.stop();
                return Err(BrokerError::Thread {
                    what,
                    source: std::io::Error::other("listener thread ended early"),
                });
            }
        };

        // Wait until the listener answers a real CONNECT, or reports it could not bind.
        let started = Instant::now();
        let mut last = String::from("not probed yet");
        loop {
            if let Ok(why) = exit_rx.try_recv() {
                running.stop();
                return Err(BrokerError::Bind {
                    listener,
                    addr,
                    reason: why,
                });
            }
            let left = START_DEADLINE.saturating_sub(started.elapsed());
            if left.is_zero() {
                running.stop();
                return Err(BrokerError::NotReady {
                    listener,
                    addr,
                    waited: START_DEADLINE,
                    reason: last,
                });
            }
            let prober = self.prober.clone();
            let (tx, rx) = mpsc::channel();
            let attempt = left.min(Duration::from_secs(1));
            handle.spawn(async move {
                let _ = tx.send(prober.probe_one(listener, addr, attempt).await);
            });
            match rx.recv_timeout(attempt + Duration::from_millis(200)) {
                Ok(Ok(())) => break,
                Ok(Err(f)) => last = f.reason,
                Err(_) => last = "probe did not finish".into(),
            }
            // Not bound yet (connection refused): try again shortly.
            std::thread::sleep(Duration::from_millis(5));
        }

        if self.tcp_nodelay {
            match nodelay::set_on_listener(addr) {
                Ok(true) => running.nodelay = true,
                Ok(false) => tracing::warn!(
                    listener = %listener, %addr,
                    "could not find the listening socket; Nagle stays on (~40 ms per request/response)"
                ),
                Err(e) => tracing::warn!(
                    listener = %listener, %addr, error = %e,
                    "could not set TCP_NODELAY; Nagle stays on (~40 ms per request/response)"
                ),
            }
        }
        Ok(running)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Turns port 0 into a concrete free port (rumqttd binds internally and cannot report the
/// port it got). For a fixed port, checks that it is free so a foreign listener on it is
/// reported instead of being mistaken for ours.
fn resolve_port(listener: Listener, addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = StdListener::bind(addr).map_err(|e| BrokerError::Bind {
        listener,
        addr,
        reason: e.to_string(),
    })?;
    let bound = probe.local_addr().map_err(|e| BrokerError::Bind {
        listener,
        addr,
        reason: e.to_string(),
    })?;
    drop(probe);
    Ok(bound)
}

fn router_config(cfg: &BrokerConfig) -> RouterConfig {
    let custom: HashMap<String, SegmentConfig> = cfg
        .filter_segments
        .iter()
        .map(|(filter, s)| {
            (
                filter.clone(),
                SegmentConfig {
                    max_segment_size: s.segment_size,
                    max_segment_count: s.segment_count,
                },
            )
        })
        .collect();
    RouterConfig {
        max_connections: cfg.max_connections,
        max_outgoing_packet_count: cfg.max_outgoing_packets,
        max_segment_size: cfg.segment_size,
        max_segment_count: cfg.segment_count,
        custom_segment: (!custom.is_empty()).then_some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn connection_settings(cfg: &BrokerConfig, secret: &Arc<str>) -> ConnectionSettings {
    let mut s = ConnectionSettings {
        connection_timeout_ms: cfg.connection_timeout_ms,
        max_payload_size: cfg.max_payload,
        max_inflight_count: usize::from(cfg.max_inflight),
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    if cfg.auth_required() {
        let policy = auth::Policy {
            users: Arc::new(cfg.users.clone()),
            hook: cfg.auth_hook.clone(),
            probe_secret: secret.clone(),
        };
        s.set_auth_handler(move |client_id, user, pass| {
            policy.clone().check(client_id, user, pass)
        });
    }
    s
}
