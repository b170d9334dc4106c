//! One MQTT client adapter for every part (daemon, courier-agent, pickupctl, tests), over
//! rumqttc's MQTT 3.1.1 and MQTT 5 clients.
//!
//! It exists to get the rumqttc traps right once (see docs/broker.md): TCP_NODELAY on,
//! a deliberate maximum packet size, persistent sessions where loss matters, backoff after
//! errors (rumqttc reconnects with no delay), and resubscription when the broker did not
//! keep the session. Messages and publishes look the same whatever the protocol version.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::answer::Answer;

/// Errors of the adapter.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The broker URL could not be understood.
    #[error("broker url {0:?}: {1}")]
    BadUrl(String, &'static str),
    /// The client's request channel is closed (event loop gone).
    #[error("mqtt client closed: {0}")]
    Closed(String),
    /// The connection failed; the next poll reconnects.
    #[error("mqtt connection: {0}")]
    Connection(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer was not JSON.
    #[error("answer is not JSON: {0}")]
    BadAnswer(String),
    /// TLS settings could not be used (CA file missing or not PEM).
    #[error("tls: {0}")]
    Tls(String),
}

/// MQTT protocol version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4): works with every listener, the embedded default.
    #[default]
    V4,
    /// MQTT 5.
    V5,
}

/// A broker address from `mqtt://host:port` (or a bare `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host:port`, `tcp://host:port` or `host:port` (port defaults to 1883).
    pub fn parse(url: &str) -> Result<Self, LinkError> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        if rest.contains("://") {
            return Err(LinkError::BadUrl(
                url.into(),
                "only mqtt:// (plain TCP) here; mqtts:// goes through Endpoint::parse",
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| LinkError::BadUrl(url.into(), "port must be a number 1-65535"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (rest, 1883),
        };
        if host.is_empty() {
            return Err(LinkError::BadUrl(url.into(), "host is missing"));
        }
        if port == 0 {
            return Err(LinkError::BadUrl(url.into(), "port must be 1-65535"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// A broker address with its transport: `mqtt://` (plain TCP) or `mqtts://` (TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host and port.
    pub url: BrokerUrl,
    /// Whether to speak TLS.
    pub tls: bool,
}

impl Endpoint {
    /// Parses `mqtt://host:port`, `tcp://host:port`, `host:port` (plain; port 1883 by
    /// default) or `mqtts://host:port`, `ssl://host:port` (TLS; port 8883 by default).
    pub fn parse(url: &str) -> Result<Self, LinkError> {
        let tls_rest = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"));
        match tls_rest {
            Some(rest) => {
                let rest = rest.trim_end_matches('/');
                let has_port = match rest.rsplit_once(':') {
                    Some((h, _)) => !h.ends_with(']') || h.starts_with('['),
                    None => false,
                } && !(rest.starts_with('[') && rest.ends_with(']'));
                let with_port = if has_port {
                    rest.to_string()
                } else {
                    format!("{rest}:8883")
                };
                let parsed = BrokerUrl::parse(&with_port).map_err(|e| match e {
                    LinkError::BadUrl(_, why) => LinkError::BadUrl(url.into(), why),
                    other => other,
                })?;
                Ok(Self {
                    url: parsed,
                    tls: true,
                })
            }
            None => Ok(Self {
                url: BrokerUrl::parse(url)?,
                tls: false,
            }),
        }
    }
}

/// TLS settings of a client: the certificate authorities it trusts. rustls with the ring
/// provider; the server's name (or IP address) must be in its certificate.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

impl TlsClient {
    /// Trusts the PEM certificates in `pem` (one or more `CERTIFICATE` blocks).
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, LinkError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| LinkError::Tls(format!("CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| LinkError::Tls(format!("CA certificate refused: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(LinkError::Tls("CA file holds no PEM certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| LinkError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Trusts the PEM certificates in the file at `path`.
    pub fn from_ca_file(path: &std::path::Path) -> Result<Self, LinkError> {
        let pem = std::fs::read(path)
            .map_err(|e| LinkError::Tls(format!("CA file {}: {e}", path.display())))?;
        Self::from_ca_pem(&pem).map_err(|e| match e {
            LinkError::Tls(m) => LinkError::Tls(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    fn transport(&self) -> rumqttc::Transport {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(self.config.clone()))
    }
}

/// A last will.
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained or not.
    pub retain: bool,
    /// MQTT 5 will delay, seconds (ignored on 3.1.1).
    pub delay_s: Option<u32>,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Broker address.
    pub url: BrokerUrl,
    /// Client id (fixed for persistent sessions).
    pub client_id: String,
    /// Protocol version.
    pub version: Version,
    /// Start a fresh session (true) or keep the broker's session (false).
    pub clean_session: bool,
    /// MQTT 5 session expiry for persistent sessions, seconds.
    pub session_expiry_s: u32,
    /// Keep-alive, seconds (rumqttd refuses 0).
    pub keep_alive_s: u16,
    /// Username / password.
    pub credentials: Option<(String, String)>,
    /// Last will.
    pub will: Option<Will>,
    /// Largest packet in either direction.
    pub max_packet: usize,
    /// Outgoing QoS1 messages in flight.
    pub inflight: u16,
    /// Capacity of the request channel between client handles and the event loop.
    pub channel_capacity: usize,
    /// TLS (`mqtts://`): the authorities to trust. `None`: plain TCP.
    pub tls: Option<TlsClient>,
}

impl LinkOptions {
    /// Sensible options for `client_id` at `url`: 3.1.1, clean session, 30 s keep-alive.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>) -> Self {
        Self {
            url,
            client_id: client_id.into(),
            version: Version::V4,
            clean_session: true,
            session_expiry_s: 7 * 24 * 3600,
            keep_alive_s: 30,
            credentials: None,
            will: None,
            max_packet: 256 * 1024,
            inflight: 100,
            channel_capacity: 1024,
            tls: None,
        }
    }
}

/// MQTT 5 properties of an outgoing publish; dropped on 3.1.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    /// Response topic (for requests).
    pub response_topic: Option<String>,
    /// Correlation data (requests and answers).
    pub correlation_data: Option<Vec<u8>>,
    /// Message expiry, seconds.
    pub message_expiry_s: Option<u32>,
}

impl PublishProps {
    fn is_empty(&self) -> bool {
        self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.message_expiry_s.is_none()
    }
}

/// An incoming publish, version-independent.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Whether the broker delivered it as retained.
    pub retain: bool,
    /// MQTT 5 Response Topic.
    pub response_topic: Option<String>,
    /// MQTT 5 Correlation Data.
    pub correlation_data: Option<Vec<u8>>,
}

/// What the event loop reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// CONNACK received.
    Connected {
        /// Whether the broker kept the session.
        session_present: bool,
    },
    /// A message arrived.
    Message(Message),
    /// A QoS1 publish went out with this packet id (in the order `publish` was called).
    PublishSent(u16),
    /// The broker acknowledged the QoS1 publish with this packet id.
    PubAck(u16),
    /// The broker acknowledged a subscription.
    SubAck,
    /// Anything else (pings, acks of our acks).
    Other,
}

/// A boxed future, for the in-process transport's object-safe traits.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The sending side of an in-process connection to a broker in the same process (the
/// embedded broker's router, without TCP or MQTT encoding); see
/// `pickup_broker::Broker::connect_in_process`. It must behave like the network client
/// as seen through [`Link`]: QoS 1 publishes are numbered, and every publish is reported
/// by [`LocalEvents::poll`] as [`LinkEvent::PublishSent`] in the order of the calls
/// (packet id 0 for QoS 0).
pub trait LocalLink: Send + Sync + 'static {
    /// Hands a publish to the broker.
    fn publish(
        &self,
        topic: &str,
        qos1: bool,
        retain: bool,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), LinkError>>;
    /// Subscribes to every filter with QoS 1 (retained messages are sent on subscribe).
    fn subscribe(&self, filters: &[String]) -> BoxFuture<'_, Result<(), LinkError>>;
    /// Unsubscribes from `filter`.
    fn unsubscribe(&self, filter: &str) -> BoxFuture<'_, Result<(), LinkError>>;
    /// Ends the connection (no last will).
    fn disconnect(&self) -> BoxFuture<'_, Result<(), LinkError>>;
}

/// The event side of a [`LocalLink`].
pub trait LocalEvents: Send + 'static {
    /// Next event, as [`LinkEvents::poll`] reports them.
    fn poll(&mut self) -> BoxFuture<'_, Result<LinkEvent, LinkError>>;
}

/// A [`Link`] and its [`LinkEvents`] over an in-process transport.
pub fn local_link(link: Arc<dyn LocalLink>, events: Box<dyn LocalEvents>) -> (Link, LinkEvents) {
    (
        Link {
            inner: LinkClient::Local(link),
        },
        LinkEvents {
            inner: LinkLoop::Local(events),
        },
    )
}

/// A cloneable handle to publish and subscribe.
#[derive(Clone)]
pub struct Link {
    inner: LinkClient,
}

#[derive(Clone)]
enum LinkClient {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
    Local(Arc<dyn LocalLink>),
}

/// The event loop; must be polled continuously.
pub struct LinkEvents {
    inner: LinkLoop,
}

/// Each client's event loop, with the requests held across a reconnect (see
/// [`LinkEvents::poll`]).
enum LinkLoop {
    V4(Box<rumqttc::EventLoop>, VecDeque<rumqttc::Request>),
    V5(Box<rumqttc::v5::EventLoop>, VecDeque<rumqttc::v5::Request>),
    Local(Box<dyn LocalEvents>),
}

/// What rumqttc set aside when the connection broke, held until the next CONNACK.
///
/// On a connection error rumqttc moves the publishes in flight *and every request still
/// waiting in its channel* into its pending list, and empties that list when the broker
/// did not keep the session — silently dropping requests that never left, which no
/// event reports. A publish held in its collision slot is kept nowhere and blocks all
/// later requests forever once the session is gone. So: take everything on the error,
/// and on the CONNACK give back what the broker's answer calls for: everything when
/// the session was kept (rumqttc's own behaviour), else only what was never sent (a
/// fresh packet id each). Requests then either go out (and are reported as sent) or
/// were in flight (and were reported as sent before), which callers can rely on.
macro_rules! hold_on_error {
    ($ev:expr, $held:expr, $publish:path) => {{
        let mut inflight = Vec::new();
        let mut unsent = Vec::new();
        for r in $ev.pending.drain(..) {
            match r {
                $publish(p) if p.pkid != 0 => inflight.push($publish(p)),
                other => unsent.push(other),
            }
        }
        $held.extend(inflight);
        if let Some(mut p) = $ev.state.collision.take() {
            p.pkid = 0;
            $held.push_back($publish(p));
        }
        $held.extend(unsent);
    }};
}

macro_rules! give_back {
    ($ev:expr, $held:expr, $publish:path, $session_present:expr) => {{
        let keep_inflight = $session_present;
        let mut back: VecDeque<_> = $held
            .drain(..)
            .filter(|r| keep_inflight || !matches!(r, $publish(p) if p.pkid != 0))
            .collect();
        back.extend($ev.pending.drain(..));
        $ev.pending = back;
    }};
}

fn qos4(qos1: bool) -> rumqttc::QoS {
    if qos1 {
        rumqttc::QoS::AtLeastOnce
    } else {
        rumqttc::QoS::AtMostOnce
    }
}

fn qos5(qos1: bool) -> rumqttc::v5::mqttbytes::QoS {
    if qos1 {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    }
}

/// Creates a client handle and its event loop. Nothing connects until the loop is polled.
pub fn link(opts: &LinkOptions) -> (Link, LinkEvents) {
    match opts.version {
        Version::V4 => {
            let mut o = rumqttc::MqttOptions::new(&opts.client_id, &opts.url.host, opts.url.port);
            o.set_keep_alive(Duration::from_secs(u64::from(opts.keep_alive_s.max(1))));
            o.set_clean_session(opts.clean_session);
            o.set_max_packet_size(opts.max_packet, opts.max_packet);
            o.set_inflight(opts.inflight.max(1));
            o.set_request_channel_capacity(opts.channel_capacity);
            if let Some((u, p)) = &opts.credentials {
                o.set_credentials(u, p);
            }
            if let Some(w) = &opts.will {
                o.set_last_will(rumqttc::LastWill::new(
                    &w.topic,
                    w.payload.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    w.retain,
                ));
            }
            if let Some(t) = &opts.tls {
                o.set_transport(t.transport());
            }
            let (client, mut ev) = rumqttc::AsyncClient::new(o, opts.channel_capacity);
            let mut net = rumqttc::NetworkOptions::new();
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(5);
            ev.set_network_options(net);
            (
                Link {
                    inner: LinkClient::V4(client),
                },
                LinkEvents {
                    inner: LinkLoop::V4(Box::new(ev), VecDeque::new()),
                },
            )
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
            let mut o =
                rumqttc::v5::MqttOptions::new(&opts.client_id, &opts.url.host, opts.url.port);
            o.set_keep_alive(Duration::from_secs(u64::from(opts.keep_alive_s.max(1))));
            o.set_clean_start(opts.clean_session);
            if !opts.clean_session {
                o.set_session_expiry_interval(Some(opts.session_expiry_s));
            }
            let max = u32::try_from(opts.max_packet).unwrap_or(u32::MAX);
            o.set_max_packet_size(Some(max));
            o.set_outgoing_inflight_upper_limit(opts.inflight.max(1));
            o.set_request_channel_capacity(opts.channel_capacity);
            if let Some((u, p)) = &opts.credentials {
                o.set_credentials(u, p);
            }
            if let Some(w) = &opts.will {
                let props = w.delay_s.map(|d| LastWillProperties {
                    delay_interval: Some(d),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                });
                o.set_last_will(LastWill::new(
                    &w.topic,
                    w.payload.clone(),
                    qos5(true),
                    w.retain,
                    props,
                ));
            }
            let mut net = rumqttc::NetworkOptions::new();
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(5);
            o.set_network_options(net);
            if let Some(t) = &opts.tls {
                o.set_transport(t.transport());
            }
            let (client, ev) = rumqttc::v5::AsyncClient::new(o, opts.channel_capacity);
            (
                Link {
                    inner: LinkClient::V5(client),
                },
                LinkEvents {
                    inner: LinkLoop::V5(Box::new(ev), VecDeque::new()),
                },
            )
        }
    }
}

impl Link {
    /// Publishes `payload`; QoS 1 when `qos1`, else QoS 0. Properties only on MQTT 5.
    pub async fn publish(
        &self,
        topic: &str,
        qos1: bool,
        retain: bool,
        payload: Vec<u8>,
        props: Option<&PublishProps>,
    ) -> Result<(), LinkError> {
        match &self.inner {
            LinkClient::V4(c) => c
                .publish(topic, qos4(qos1), retain, payload)
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::V5(c) => match props.filter(|p| !p.is_empty()) {
                None => c.publish(topic, qos5(qos1), retain, payload).await,
                Some(p) => {
                    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                        response_topic: p.response_topic.clone(),
                        correlation_data: p.correlation_data.clone().map(Bytes::from),
                        message_expiry_interval: p.message_expiry_s,
                        ..Default::default()
                    };
                    c.publish_with_properties(topic, qos5(qos1), retain, payload, props)
                        .await
                }
            }
            .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::Local(l) => l.publish(topic, qos1, retain, payload).await,
        }
    }

    /// Subscribes to every filter with QoS 1.
    pub async fn subscribe_many(&self, filters: &[String]) -> Result<(), LinkError> {
        if filters.is_empty() {
            return Ok(());
        }
        match &self.inner {
            LinkClient::V4(c) => c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos4(true))),
                )
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::V5(c) => c
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos5(true))),
                )
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::Local(l) => l.subscribe(filters).await,
        }
    }

    /// Unsubscribes from `filter` (a persistent session may hold a subscription an
    /// earlier configuration made).
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        match &self.inner {
            LinkClient::V4(c) => c
                .unsubscribe(filter)
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::V5(c) => c
                .unsubscribe(filter)
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::Local(l) => l.unsubscribe(filter).await,
        }
    }

    /// Sends DISCONNECT (no last will is published).
    pub async fn disconnect(&self) -> Result<(), LinkError> {
        match &self.inner {
            LinkClient::V4(c) => c
                .disconnect()
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::V5(c) => c
                .disconnect()
                .await
                .map_err(|e| LinkError::Closed(e.to_string())),
            LinkClient::Local(l) => l.disconnect().await,
        }
    }

    /// Whether this link speaks MQTT 5.
    pub fn is_v5(&self) -> bool {
        matches!(self.inner, LinkClient::V5(_))
    }
}

impl LinkEvents {
    /// Next event. After an error the following call reconnects at once: callers wait
    /// with a [`Backoff`] first.
    pub async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        match &mut self.inner {
            LinkLoop::V4(ev, held) => {
                use rumqttc::{Event, Outgoing, Packet, Request};
                let e = match ev.poll().await {
                    Ok(e) => e,
                    Err(e) => {
                        hold_on_error!(ev, held, Request::Publish);
                        return Err(LinkError::Connection(e.to_string()));
                    }
                };
                Ok(match e {
                    Event::Incoming(Packet::ConnAck(a)) => {
                        give_back!(ev, held, Request::Publish, a.session_present);
                        LinkEvent::Connected {
                            session_present: a.session_present,
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => LinkEvent::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                        response_topic: None,
                        correlation_data: None,
                    }),
                    Event::Incoming(Packet::PubAck(a)) => LinkEvent::PubAck(a.pkid),
                    Event::Incoming(Packet::SubAck(_)) => LinkEvent::SubAck,
                    Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::PublishSent(pkid),
                    _ => LinkEvent::Other,
                })
            }
            LinkLoop::V5(ev, held) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::{Event, Request};
                use rumqttc::Outgoing;
                let e = match ev.poll().await {
                    Ok(e) => e,
                    Err(e) => {
                        hold_on_error!(ev, held, Request::Publish);
                        return Err(LinkError::Connection(e.to_string()));
                    }
                };
                Ok(match e {
                    Event::Incoming(Packet::ConnAck(a)) => {
                        give_back!(ev, held, Request::Publish, a.session_present);
                        LinkEvent::Connected {
                            session_present: a.session_present,
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let (response_topic, correlation_data) = match p.properties {
                            Some(pr) => {
                                (pr.response_topic, pr.correlation_data.map(|b| b.to_vec()))
                            }
                            None => (None, None),
                        };
                        LinkEvent::Message(Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            retain: p.retain,
                            response_topic,
                            correlation_data,
                        })
                    }
                    Event::Incoming(Packet::PubAck(a)) => LinkEvent::PubAck(a.pkid),
                    Event::Incoming(Packet::SubAck(_)) => LinkEvent::SubAck,
                    Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::PublishSent(pkid),
                    _ => LinkEvent::Other,
                })
            }
            LinkLoop::Local(ev) => ev.poll().await,
        }
    }
}

/// Exponential backoff with full jitter, bounded.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, cur: min }
    }
    /// The next wait: a random time in [cur/2, cur], then doubles `cur`.
    pub fn next_delay(&mut self) -> Duration {
        let cur = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = cur / 2;
        let ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=ms))
    }
    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Request/response over MQTT from a client's side: one stable reply topic, correlation ids
/// tell the answers apart. Used by `pickupctl`, kiosk simulations and tests.
#[derive(Clone)]
pub struct Requester {
    link: Link,
    reply_topic: String,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<serde_json::Value>>>>,
    next: Arc<AtomicU64>,
    nonce: u64,
}

impl Requester {
    /// Connects (clean session), subscribes to `reply_topic` and to `extra_filters`, and
    /// waits for the subscription. Messages on the extra filters go to the returned channel.
    pub async fn connect(
        opts: LinkOptions,
        reply_topic: String,
        extra_filters: Vec<String>,
        timeout: Duration,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Message>), LinkError> {
        let (link, mut events) = self::link(&opts);
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<serde_json::Value>>>> =
            Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut filters = vec![reply_topic.clone()];
        filters.extend(extra_filters);
        let task_link = link.clone();
        let task_pending = pending.clone();
        let task_reply = reply_topic.clone();
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            loop {
                match events.poll().await {
                    Ok(LinkEvent::Connected { .. }) => {
                        backoff.reset();
                        let _ = task_link.subscribe_many(&filters).await;
                    }
                    Ok(LinkEvent::SubAck) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(LinkEvent::Message(m)) => {
                        if m.topic == task_reply {
                            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload)
                            else {
                                continue;
                            };
                            let key = v
                                .get("correlation_id")
                                .and_then(|c| c.as_str())
                                .map(str::to_string)
                                .or_else(|| {
                                    m.correlation_data
                                        .as_deref()
                                        .and_then(|d| std::str::from_utf8(d).ok())
                                        .map(str::to_string)
                                });
                            if let Some(k) = key {
                                if let Some(w) = task_pending.lock().await.remove(&k) {
                                    let _ = w.send(v);
                                }
                            }
                        } else if tx.send(m).is_err() && tx.is_closed() {
                            // Nobody listens to the extra filters any more; keep serving replies.
                        }
                    }
                    Ok(_) => {}
                    Err(LinkError::Connection(e)) if e.contains("Requests done") => break,
                    Err(_) => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
        });
        tokio::time::timeout(timeout, ready_rx)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
            .map_err(|_| LinkError::Closed("event loop ended".into()))?;
        Ok((
            Self {
                link,
                reply_topic,
                pending,
                next: Arc::new(AtomicU64::new(1)),
                nonce: rand::rng().random(),
            },
            rx,
        ))
    }

    /// The underlying link, for plain publishes.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Sends `body` (a JSON object) to `topic` as a request and waits for its answer.
    /// On MQTT 5 the reply path travels as properties, on 3.1.1 in the payload.
    pub async fn request(
        &self,
        topic: &str,
        mut body: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, LinkError> {
        let corr = self.next_correlation();
        if !self.link.is_v5() {
            if let Some(obj) = body.as_object_mut() {
                obj.insert("reply_to".into(), self.reply_topic.clone().into());
                obj.insert("correlation_id".into(), corr.clone().into());
            }
        }
        let payload = serde_json::to_vec(&body).map_err(|e| LinkError::BadAnswer(e.to_string()))?;
        self.send_and_wait(topic, payload, corr, timeout).await
    }

    /// Sends raw bytes as a request with the reply path as MQTT 5 properties only (the
    /// payload is not touched), and waits for the answer. On MQTT 3.1.1 there is no way to
    /// attach a reply path to a payload that is not a JSON object: this times out.
    pub async fn request_bytes(
        &self,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<serde_json::Value, LinkError> {
        let corr = self.next_correlation();
        self.send_and_wait(topic, payload, corr, timeout).await
    }

    fn next_correlation(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", self.nonce)
    }

    async fn send_and_wait(
        &self,
        topic: &str,
        payload: Vec<u8>,
        corr: String,
        timeout: Duration,
    ) -> Result<serde_json::Value, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(corr.clone(), tx);
        let props = self.link.is_v5().then(|| PublishProps {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(corr.clone().into_bytes()),
            message_expiry_s: None,
        });
        if let Err(e) = self
            .link
            .publish(topic, true, false, payload, props.as_ref())
            .await
        {
            self.pending.lock().await.remove(&corr);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(LinkError::Closed("event loop ended".into())),
            Err(_) => {
                self.pending.lock().await.remove(&corr);
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    /// Like [`Requester::request`], decoding the answer envelope into `T`.
    pub async fn request_typed<T: serde::de::DeserializeOwned>(
        &self,
        topic: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<Answer<T>, LinkError> {
        let v = self.request(topic, body, timeout).await?;
        serde_json::from_value(v).map_err(|e| LinkError::BadAnswer(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap(),
            BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(BrokerUrl::parse("localhost").unwrap().port, 1883);
        assert_eq!(BrokerUrl::parse("[::1]:1885").unwrap().host, "::1");
        assert!(BrokerUrl::parse("mqtt://h:x").is_err());
        assert!(BrokerUrl::parse("mqtts://h:1").is_err());
        assert!(BrokerUrl::parse("mqtt://:1").is_err());
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("mqtts://broker.example:9883").unwrap();
        assert!(e.tls);
        assert_eq!(e.url.port, 9883);
        assert_eq!(Endpoint::parse("mqtts://h").unwrap().url.port, 8883);
        assert_eq!(Endpoint::parse("ssl://[::1]").unwrap().url.host, "::1");
        assert_eq!(Endpoint::parse("mqtts://[::1]:1").unwrap().url.port, 1);
        let p = Endpoint::parse("mqtt://127.0.0.1:1884").unwrap();
        assert!(!p.tls);
        assert_eq!(p.url.port, 1884);
        assert!(Endpoint::parse("mqtts://h:x").is_err());
        assert!(Endpoint::parse("http://h:1").is_err());
        assert!(TlsClient::from_ca_pem(b"no pem here").is_err());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(800));
        }
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
