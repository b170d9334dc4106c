//! Settings of the embedded broker.
//!
//! Every rumqttd knob that matters is set here on purpose: rumqttd's own defaults are not
//! usable (`RouterConfig::default()` allows zero connections, its sample config keeps 1 GB of
//! log per filter). The struct is the daemon's `[broker]` section and the standalone
//! binary's config file, so unknown keys are refused and every error names its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::BrokerError;

/// Decides whether a client may connect: `(client_id, username, password) -> allowed`.
///
/// It runs on a blocking thread of the listener, once per CONNECT, so it may look things up
/// (a device registry, a file). The broker's own health probe does not go through it.
pub type AuthHook = Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// The username the broker's own health probe uses; refused for everyone else.
pub(crate) const PROBE_USER: &str = "$pickup-probe";

/// Log sizing for one subscription filter (see [`BrokerConfig::segment_size`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSizing {
    /// Bytes per log segment of this filter.
    pub segment_size: usize,
    /// Segments kept in memory for this filter.
    pub segment_count: usize,
}

/// Settings of the embedded broker; the daemon's `[broker]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener. Port 0 picks a free port (read it back with
    /// [`crate::Broker::v4_addr`]). Loopback by default: the embedded broker has no topic
    /// authorization, so exposing it is a decision.
    pub listen: SocketAddr,
    /// Opt-in MQTT 5 listener. Off by default because rumqttd lets MQTT 5 traffic crash
    /// MQTT 3.1.1 connections and lets a hostile MQTT 5 client kill this listener
    /// (docs/broker.md, "Traps").
    pub listen_v5: Option<SocketAddr>,
    /// Most client connections at once (all listeners together, health probes included).
    /// Beyond it rumqttd closes new connections without a CONNACK.
    pub max_connections: usize,
    /// Largest packet a client may send, in bytes of MQTT remaining length (topic +
    /// payload + a few header bytes). Bigger packets close the sender's connection.
    pub max_payload: usize,
    /// Packets read from one connection in one batch before the router gets them.
    /// (Outgoing QoS 1 in flight per client is fixed at 100 inside rumqttd.)
    pub max_inflight: u16,
    /// How long a new TCP connection may take to send CONNECT before it is closed;
    /// protects the connection slots from idle sockets.
    pub connection_timeout_ms: u16,
    /// Bytes per segment of each subscription filter's in-memory log. A QoS 1 subscriber
    /// that falls behind by more than the log silently loses messages; a filter holds up
    /// to `segment_size * segment_count` of messages some subscriber has not yet read
    /// (what all have read is freed).
    pub segment_size: usize,
    /// Segments kept per filter log (see `segment_size`).
    pub segment_count: usize,
    /// Larger (or smaller) logs for named filters, e.g. the daemon's own wildcard
    /// subscriptions, which must absorb bursts without loss.
    pub filter_segments: BTreeMap<String, SegmentSizing>,
    /// QoS 0 messages handed to a connection per router pass.
    pub max_outgoing_packets: u64,
    /// Static credentials, `username = "password"`. Empty (and no auth hook) means
    /// anonymous clients are allowed.
    pub users: BTreeMap<String, String>,
    /// Turn off Nagle on accepted connections (rumqttd does not; without it a QoS 1
    /// request/response stalls ~40 ms on delayed ACKs). Linux only; see docs/broker.md.
    pub tcp_nodelay: bool,
    /// Extra authentication, e.g. binding client ids to device identities. When both this
    /// and `users` are set, a client must pass both. Not part of the config file.
    #[serde(skip)]
    pub auth_hook: Option<AuthHook>,
    /// Optional TLS listener (`[broker.tls]`) in front of the MQTT 3.1.1 listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsSettings>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 1883)),
            listen_v5: None,
            max_connections: 1024,
            max_payload: 64 * 1024,
            max_inflight: 100,
            connection_timeout_ms: 5_000,
            segment_size: 512 * 1024,
            segment_count: 4,
            filter_segments: BTreeMap::new(),
            max_outgoing_packets: 200,
            users: BTreeMap::new(),
            tcp_nodelay: true,
            auth_hook: None,
            tls: None,
        }
    }
}

impl fmt::Debug for BrokerConfig {
    /// Passwords are not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("listen", &self.listen)
            .field("listen_v5", &self.listen_v5)
            .field("max_connections", &self.max_connections)
            .field("max_payload", &self.max_payload)
            .field("max_inflight", &self.max_inflight)
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("segment_size", &self.segment_size)
            .field("segment_count", &self.segment_count)
            .field("filter_segments", &self.filter_segments)
            .field("max_outgoing_packets", &self.max_outgoing_packets)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("auth_hook", &self.auth_hook.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

/// Smallest log segment rumqttd accepts; below it the router thread panics.
const MIN_SEGMENT: usize = 1024;
/// Largest MQTT remaining length (the protocol's own limit).
const MAX_MQTT_PACKET: usize = 268_435_455;
/// A CONNECT with a long client id and credentials must still fit.
const MIN_PACKET: usize = 1024;

fn bad(key: impl Into<String>, problem: impl Into<String>) -> BrokerError {
    BrokerError::Config {
        key: key.into(),
        problem: problem.into(),
    }
}

impl BrokerConfig {
    /// Adds an authentication hook (builder style), see [`AuthHook`].
    pub fn with_auth_hook(mut self, hook: AuthHook) -> Self {
        self.auth_hook = Some(hook);
        self
    }

    /// Whether clients must authenticate.
    pub fn auth_required(&self) -> bool {
        !self.users.is_empty() || self.auth_hook.is_some()
    }

    /// Checks every value; the error names the key (as `broker.<key>`) and what is wrong.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if let Some(v5) = self.listen_v5 {
            if v5.port() != 0 && v5.port() == self.listen.port() {
                return Err(bad(
                    "listen_v5",
                    format!(
                        "{v5} uses the same port as listen ({}); give each listener its own port",
                        self.listen
                    ),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(bad(
                "max_connections",
                "must be at least 1 (0 refuses every client)",
            ));
        }
        if !(MIN_PACKET..=MAX_MQTT_PACKET).contains(&self.max_payload) {
            return Err(bad(
                "max_payload",
                format!(
                    "{} is out of range; use {MIN_PACKET}..={MAX_MQTT_PACKET} bytes",
                    self.max_payload
                ),
            ));
        }
        if self.max_inflight == 0 {
            return Err(bad("max_inflight", "must be at least 1"));
        }
        if self.connection_timeout_ms < 100 {
            return Err(bad(
                "connection_timeout_ms",
                format!(
                    "{} ms is too short for a client to send CONNECT; use at least 100",
                    self.connection_timeout_ms
                ),
            ));
        }
        check_sizing("", self.segment_size, self.segment_count)?;
        for (filter, s) in &self.filter_segments {
            if filter.is_empty() {
                return Err(bad("filter_segments", "a filter name is empty"));
            }
            check_sizing(
                &format!("filter_segments.\"{filter}\"."),
                s.segment_size,
                s.segment_count,
            )?;
        }
        if self.max_outgoing_packets == 0 {
            return Err(bad("max_outgoing_packets", "must be at least 1"));
        }
        if let Some(t) = &self.tls {
            t.validate()?;
        }
        for user in self.users.keys() {
            if user.is_empty() {
                return Err(bad("users", "a username is empty"));
            }
            if user == PROBE_USER {
                return Err(bad(
                    "users",
                    format!("username {PROBE_USER:?} is reserved for the broker's health probe"),
                ));
            }
        }
        Ok(())
    }
}

fn check_sizing(prefix: &str, size: usize, count: usize) -> Result<(), BrokerError> {
    if size < MIN_SEGMENT {
        return Err(bad(
            format!("{prefix}segment_size"),
            format!("{size} bytes is below rumqttd's minimum of {MIN_SEGMENT}"),
        ));
    }
    if count == 0 {
        return Err(bad(format!("{prefix}segment_count"), "must be at least 1"));
    }
    if size.checked_mul(count).is_none() {
        return Err(bad(
            format!("{prefix}segment_count"),
            "segment_size * segment_count overflows",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let c = BrokerConfig::default();
        c.validate().unwrap();
        assert!(c.listen.ip().is_loopback());
        assert!(c.listen_v5.is_none());
        assert!(!c.auth_required());
    }

    #[test]
    fn toml_section_round_trips_and_refuses_unknown_keys() {
        let c: BrokerConfig = toml::from_str(
            "listen = \"127.0.0.1:0\"\nmax_payload = 2048\n[users]\nkiosk-1 = \"s3cret\"\n\
             [filter_segments.\"pickup/v1/+/calls/#\"]\nsegment_size = 4096\nsegment_count = 8\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.max_payload, 2048);
        assert_eq!(c.users.get("kiosk-1").map(String::as_str), Some("s3cret"));
        assert_eq!(c.filter_segments.len(), 1);
        assert_eq!(c.segment_count, BrokerConfig::default().segment_count);
        let printed = toml::to_string(&c).unwrap();
        let again: BrokerConfig = toml::from_str(&printed).unwrap();
        assert_eq!(again.users, c.users);

        let err = toml::from_str::<BrokerConfig>("max_conections = 3").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn debug_hides_passwords() {
        let mut c = BrokerConfig::default();
        c.users.insert("u".into(), "hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    type Change = Box<dyn Fn(&mut BrokerConfig)>;

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(&str, Change)> = vec![
            (
                "broker.max_connections",
                Box::new(|c| c.max_connections = 0),
            ),
            ("broker.max_payload", Box::new(|c| c.max_payload = 10)),
            ("broker.max_inflight", Box::new(|c| c.max_inflight = 0)),
            (
                "broker.connection_timeout_ms",
                Box::new(|c| c.connection_timeout_ms = 0),
            ),
            ("broker.segment_size", Box::new(|c| c.segment_size = 100)),
            ("broker.segment_count", Box::new(|c| c.segment_count = 0)),
            (
                "broker.max_outgoing_packets",
                Box::new(|c| c.max_outgoing_packets = 0),
            ),
            (
                "broker.listen_v5",
                Box::new(|c| c.listen_v5 = Some(c.listen)),
            ),
            (
                "broker.users",
                Box::new(|c| {
                    c.users.insert(PROBE_USER.into(), "x".into());
                }),
            ),
            (
                "broker.filter_segments.\"a/#\".segment_size",
                Box::new(|c| {
                    c.filter_segments.insert(
                        "a/#".into(),
                        SegmentSizing {
                            segment_size: 1,
                            segment_count: 1,
                        },
                    );
                }),
            ),
        ];
        for (key, change) in cases {
            let mut c = BrokerConfig::default();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}:")), "{key}: got {err}");
        }
    }
}
