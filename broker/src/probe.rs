//! Listener health: a real MQTT CONNECT answered by a CONNACK.
//!
//! A live process and an open port prove little with rumqttd: a listener whose connection
//! handling is broken (a poisoned lock, before vendor patch 15) still accepts TCP and then
//! drops every CONNECT. So the probe speaks
//! just enough MQTT (3.1.1 or 5, hand-written packets, no client library) to see a CONNACK
//! with return code 0, with a clean session and a client id not used by the previous
//! probes, then closes the connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::PROBE_USER;
use crate::Listener;

/// Client ids of the health probe start with this.
pub(crate) const PROBE_CLIENT_PREFIX: &str = "pickup-probe-";

/// Probes cycle through this many client ids per listener. rumqttd keeps ~600 bytes per
/// distinct client id forever (its "graveyard", even for clean sessions), so a new id
/// per probe would grow the broker by megabytes a day; consecutive probes still never
/// share an id.
const PROBE_ID_POOL: u64 = 16;

/// One listener that did not complete CONNECT/CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFailure {
    /// Which listener.
    pub listener: Listener,
    /// Its address.
    pub addr: SocketAddr,
    /// What went wrong (refused, timeout, no CONNACK, bad return code).
    pub reason: String,
}

impl fmt::Display for ListenerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} listener {}: {}",
            self.listener, self.addr, self.reason
        )
    }
}

/// At least one listener failed its probe; every failed listener is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    /// The failed listeners, MQTT 3.1.1 first.
    pub failures: Vec<ListenerFailure>,
}

impl ProbeError {
    /// The listeners that failed, to restart them with [`crate::Broker::restart_listener`].
    pub fn listeners(&self) -> Vec<Listener> {
        self.failures.iter().map(|f| f.listener).collect()
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("broker health probe failed: ")?;
        for (i, fail) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{fail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProbeError {}

/// Probes a broker's listeners; cheap to clone, independent of the [`crate::Broker`] value,
/// so a health task can hold one while the owner keeps the broker (and can shut it down).
#[derive(Clone)]
pub struct Prober {
    /// Every listener the broker started, with its concrete address.
    pub(crate) listeners: Vec<(Listener, SocketAddr)>,
    /// The probe's password; only this broker's auth policy knows it.
    pub(crate) secret: Arc<str>,
    /// Rotates the probe client ids.
    pub(crate) counter: Arc<AtomicU64>,
    /// Per-broker part of the probe client ids, so two brokers' probes never collide.
    pub(crate) nonce: Arc<str>,
}

impl fmt::Debug for Prober {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prober")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Prober {
    /// Each listener still completes an MQTT CONNECT/CONNACK within `timeout` (listeners
    /// are probed concurrently). Needs a tokio runtime with I/O and time enabled.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        // There are at most two listeners (3.1.1 and 5).
        let mut it = self.listeners.iter();
        let first = it.next().map(|&(l, a)| self.probe_one(l, a, timeout));
        let second = it.next().map(|&(l, a)| self.probe_one(l, a, timeout));
        let (r1, r2) = tokio::join!(optional(first), optional(second));
        let failures: Vec<_> = [r1, r2].into_iter().filter_map(Result::err).collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ProbeError { failures })
        }
    }

    /// Probes one listener.
    pub async fn probe_one(
        &self,
        listener: Listener,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(), ListenerFailure> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let client_id = format!(
            "{PROBE_CLIENT_PREFIX}{}-{}-{}",
            listener.short(),
            self.nonce,
            n % PROBE_ID_POOL
        );
        let fail = |reason: String| ListenerFailure {
            listener,
            addr,
            reason,
        };
        match tokio::time::timeout(
            timeout,
            connect_connack(reachable(addr), listener, &client_id, &self.secret),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(fail(reason)),
            Err(_) => Err(fail(format!("no CONNACK within {timeout:?}"))),
        }
    }
}

/// Where to connect to reach a listener bound to `addr` (0.0.0.0 / :: become loopback).
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

async fn optional<F>(f: Option<F>) -> Result<(), ListenerFailure>
where
    F: std::future::Future<Output = Result<(), ListenerFailure>>,
{
    match f {
        Some(f) => f.await,
        None => Ok(()),
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Callers pass short strings (ids, the probe user and secret): far below 64 KiB.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_remaining_len(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// A CONNECT packet: clean session, 10 s keep-alive, username and password.
pub(crate) fn connect_packet(listener: Listener, client_id: &str, secret: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    put_str(&mut body, "MQTT");
    body.push(match listener {
        Listener::V4 => 4,
        Listener::V5 => 5,
    });
    // username + password + clean session
    body.push(0x80 | 0x40 | 0x02);
    body.extend_from_slice(&10u16.to_be_bytes());
    if listener == Listener::V5 {
        body.push(0); // no properties
    }
    put_str(&mut body, client_id);
    put_str(&mut body, PROBE_USER);
    put_str(&mut body, secret);
    let mut packet = vec![0x10];
    put_remaining_len(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

async fn connect_connack(
    addr: SocketAddr,
    listener: Listener,
    client_id: &str,
    secret: &str,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    stream.set_nodelay(true).ok();
    stream
        .write_all(&connect_packet(listener, client_id, secret))
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut head = [0u8; 1];
    read_exact(&mut stream, &mut head, "CONNACK").await?;
    if head[0] != 0x20 {
        return Err(format!(
            "expected CONNACK, got packet type 0x{:02x}",
            head[0]
        ));
    }
    let mut len = 0usize;
    for shift in 0..4 {
        let mut b = [0u8; 1];
        read_exact(&mut stream, &mut b, "CONNACK length").await?;
        len |= usize::from(b[0] & 0x7f) << (7 * shift);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    if !(2..=256).contains(&len) {
        return Err(format!("CONNACK with implausible length {len}"));
    }
    let mut body = vec![0u8; len];
    read_exact(&mut stream, &mut body, "CONNACK body").await?;
    if body[1] != 0 {
        return Err(format!("CONNACK refused the probe with code {}", body[1]));
    }
    // Close without DISCONNECT: rumqttd handles a DISCONNECT packet and then the closed
    // socket as two disconnections and logs an error for the second. The probe has no will.
    drop(stream);
    Ok(())
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<(), String> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(format!("connection closed before {what}"))
        }
        Err(e) => Err(format!("reading {what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packets_have_the_right_shape() {
        let p = connect_packet(Listener::V4, "c", "s");
        // type, remaining length, "MQTT", level 4, flags, keep-alive 10
        assert_eq!(&p[..2], &[0x10, (p.len() - 2) as u8]);
        assert_eq!(&p[2..8], b"\x00\x04MQTT");
        assert_eq!(p[8], 4);
        assert_eq!(p[9], 0xc2);
        assert_eq!(&p[10..12], &[0, 10]);
        assert_eq!(&p[12..15], b"\x00\x01c");
        let p5 = connect_packet(Listener::V5, "c", "s");
        assert_eq!(p5[8], 5);
        assert_eq!(p5[12], 0, "empty v5 properties");
        assert_eq!(p5.len(), p.len() + 1);
    }

    #[test]
    fn remaining_length_encoding() {
        let mut b = Vec::new();
        put_remaining_len(&mut b, 321);
        assert_eq!(b, vec![0xc1, 0x02]);
        b.clear();
        put_remaining_len(&mut b, 0);
        assert_eq!(b, vec![0]);
    }
}
