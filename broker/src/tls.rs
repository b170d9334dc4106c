//! The TLS listener: terminates TLS (rustls, ring provider) and hands each connection's
//! plain MQTT bytes to the MQTT 3.1.1 listener over loopback.
//!
//! rumqttd can listen with TLS itself, but it performs each TLS handshake inside its
//! accept loop, without a timeout: one client that opens a TCP connection and sends
//! nothing stops every later connection on that listener. Here each handshake runs in its
//! own task with a deadline, and the number of connections is bounded, so a silent or
//! slow client costs one slot for at most `handshake_timeout_ms`.
//!
//! Optional client certificates: with `client_ca`, only clients presenting a certificate
//! signed by that authority get through the handshake (devices still authenticate with
//! their MQTT username and secret).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};

use crate::BrokerError;

/// `[broker.tls]`: a TLS listener in front of the MQTT 3.1.1 listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Where TLS clients connect (MQTT over TLS, conventionally port 8883). Port 0 picks
    /// a free port ([`crate::Broker::tls_addr`]).
    pub listen: SocketAddr,
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificate authority for client certificates; unset: no client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Time a client has to complete the TLS handshake, milliseconds.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
}

fn default_handshake_ms() -> u64 {
    10_000
}

fn bad(key: &str, problem: impl Into<String>) -> BrokerError {
    BrokerError::Config {
        key: format!("tls.{key}"),
        problem: problem.into(),
    }
}

impl TlsSettings {
    /// Loads the certificate, key and client CA; errors name the key.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
        let certs = read_certs(&self.cert).map_err(|e| bad("cert", e))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| bad("key", format!("{}: {e}", self.key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("cert", e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca).map_err(|e| bad("client_ca", e))? {
                    roots
                        .add(c)
                        .map_err(|e| bad("client_ca", format!("{}: {e}", ca.display())))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("client_ca", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("key", format!("does not fit the certificate: {e}")))?;
        Ok(Arc::new(cfg))
    }

    /// Checks values and files.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.handshake_timeout_ms < 100 {
            return Err(bad("handshake_timeout_ms", "must be at least 100"));
        }
        self.server_config().map(|_| ())
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// A running TLS listener; stopped on drop.
pub(crate) struct TlsFront {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsFront {
    /// Binds `settings.listen` and serves on its own thread, forwarding to `upstream`.
    pub fn start(
        settings: &TlsSettings,
        upstream: SocketAddr,
        max_connections: usize,
    ) -> Result<TlsFront, BrokerError> {
        let config = settings.server_config()?;
        let bind_err = |e: std::io::Error| {
            bad(
                "listen",
                format!("cannot listen on {}: {e}", settings.listen),
            )
        };
        let std_listener = std::net::TcpListener::bind(settings.listen).map_err(bind_err)?;
        let addr = std_listener.local_addr().map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let handshake = Duration::from_millis(settings.handshake_timeout_ms);
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("mqtt-tls".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "TLS listener cannot start its runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "TLS listener cannot use its socket");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = serve(listener, config, upstream, handshake, max_connections) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|source| BrokerError::Thread {
                what: "TLS listener".into(),
                source,
            })?;
        tracing::info!(%addr, %upstream, client_certs = settings.client_ca.is_some(), "TLS listener ready");
        Ok(TlsFront {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops accepting and drops every TLS connection; the port is free afterwards.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    upstream: SocketAddr,
    handshake: Duration,
    max_connections: usize,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "TLS listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "TLS listener: too many connections; closed");
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let mut tls = match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let mut plain = match TcpStream::connect(upstream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "TLS listener cannot reach the MQTT listener");
                    return;
                }
            };
            let _ = plain.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let mut s = TlsSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert: dir.path().join("missing.pem"),
            key: junk.clone(),
            client_ca: None,
            handshake_timeout_ms: 10_000,
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("broker.tls.cert:"), "{e}");
        s.cert = junk.clone();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("broker.tls.cert:"), "{e}");
        s.handshake_timeout_ms = 5;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("broker.tls.handshake_timeout_ms:"), "{e}");
        let parsed: crate::BrokerConfig = toml::from_str(
            "[tls]\nlisten = \"127.0.0.1:8883\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n",
        )
        .unwrap();
        let t = parsed.tls.unwrap();
        assert_eq!(t.handshake_timeout_ms, 10_000);
        assert!(t.client_ca.is_none());
    }
}
