//! The webhook's HTTP/1.1 client: one plain-HTTP connection per POST, bounded in time.
//!
//! Built on hyper's connection API (already in the tree through the embedded broker), with
//! no pool, redirects or TLS: the webhook is a relay on the site or a TLS-terminating proxy
//! in front of a gateway, and a fresh connection per notification costs nothing there while
//! sparing every stale-connection case of a pool.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

/// Where notifications are POSTed: a parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Path and query sent in the request line.
    path: String,
}

impl Endpoint {
    /// Parses `url`; the error says what is wrong (the caller adds the config key).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{url:?}: https is not supported; point it at a relay on the site or a TLS-terminating proxy (http://)"
                ))
            }
            _ => return Err(format!("{url:?}: must start with http://")),
        }
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL are not supported; use notifications.webhook.headers"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` in seconds, when given as a number.
    pub retry_after_s: Option<u64>,
    /// Start of the body of a non-2xx answer (for the error recorded with the delivery).
    pub body: String,
}

/// Why a POST got no answer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PostError {
    /// TCP connect failed (refused, unreachable, name not found).
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    /// TCP connect took too long.
    #[error("connect to {0} timed out after {1} ms")]
    ConnectTimeout(String, u64),
    /// No complete answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The exchange broke (connection reset, bad response).
    #[error("HTTP exchange failed: {0}")]
    Http(String),
}

/// Longest answer body kept for the error text.
const BODY_KEEP: usize = 200;

/// POSTs `body` as JSON to `ep` with `headers`. `connect_timeout` bounds the TCP connect,
/// `timeout` the whole exchange after it.
pub async fn post(
    ep: &Endpoint,
    headers: &[(HeaderName, HeaderValue)],
    body: Vec<u8>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<Answer, PostError> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let stream = match tokio::time::timeout(
        connect_timeout,
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    {
        Err(_) => {
            return Err(PostError::ConnectTimeout(
                ep.authority.clone(),
                ms(connect_timeout),
            ))
        }
        Ok(Err(e)) => return Err(PostError::Connect(ep.authority.clone(), e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(timeout, exchange(ep, headers, body, stream))
        .await
        .map_err(|_| PostError::Timeout(ms(timeout)))?
}

/// Aborts the connection task when the exchange ends or is dropped (timeout, shutdown).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange(
    ep: &Endpoint,
    headers: &[(HeaderName, HeaderValue)],
    body: Vec<u8>,
    stream: TcpStream,
) -> Result<Answer, PostError> {
    let http = |e: hyper::Error| PostError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(ep.path.as_str())
        .header(HOST, ep.authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("pickupd/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PostError::Http(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let retry_after_s = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    // A 2xx is the receiver's acknowledgement; its body does not matter and is not awaited.
    let body = if (200..300).contains(&status) {
        String::new()
    } else {
        match Limited::new(resp.into_body(), 64 * 1024).collect().await {
            Ok(b) => {
                let b = b.to_bytes();
                let mut s = String::from_utf8_lossy(&b[..b.len().min(BODY_KEEP)]).into_owned();
                s.retain(|c| !c.is_control());
                s
            }
            Err(_) => String::new(),
        }
    };
    Ok(Answer {
        status,
        retry_after_s,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_errors_say_why() {
        let e = Endpoint::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(e.port, 8080);
        assert_eq!(e.path, "/hook?x=1");
        assert_eq!(e.authority, "127.0.0.1:8080");
        let e = Endpoint::parse("http://relay.local").unwrap();
        assert_eq!((e.port, e.path.as_str()), (80, "/"));
        let e = Endpoint::parse("http://[::1]:81/n").unwrap();
        assert_eq!(e.host, "::1");
        assert!(Endpoint::parse("https://x/").unwrap_err().contains("https"));
        assert!(Endpoint::parse("ftp://x/").unwrap_err().contains("http://"));
        assert!(Endpoint::parse("http://u:p@x/")
            .unwrap_err()
            .contains("headers"));
        assert!(Endpoint::parse("not a url").is_err());
    }
}
