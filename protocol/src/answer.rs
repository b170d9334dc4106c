//! Request decoding and the answer envelope.
//!
//! A request's reply path comes from the MQTT 5 Response Topic / Correlation Data
//! properties, or, for MQTT 3.1.1 clients, from the payload fields `reply_to` and
//! `correlation_id`. Decoding keeps the reply path even when the rest of the payload is
//! bad, so that the sender learns what was wrong.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::validate;
use crate::MAX_PAYLOAD;

/// Stable error codes of the contract; clients switch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or a field has the wrong type or is missing.
    Malformed,
    /// Well-formed but a value is out of range or of the wrong shape.
    Invalid,
    /// Payload larger than the limit.
    TooLarge,
    /// No such call (or no such job for this courier).
    NotFound,
    /// The call's status does not allow this (cancel after pickup, reply out of order).
    InvalidState,
    /// The pickup code did not match.
    WrongCode,
    /// Too many attempts (wrong pickup codes).
    TooManyAttempts,
    /// The daemon sheds load or is stopping; retry after `retry_after_ms`.
    Busy,
    /// The sender may not do this.
    Forbidden,
    /// The request id was used before for a different request.
    Conflict,
    /// Something failed inside the daemon; the request was not applied.
    Internal,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::NotFound => "not_found",
            Self::InvalidState => "invalid_state",
            Self::WrongCode => "wrong_code",
            Self::TooManyAttempts => "too_many_attempts",
            Self::Busy => "busy",
            Self::Forbidden => "forbidden",
            Self::Conflict => "conflict",
            Self::Internal => "internal",
        }
    }
}

/// The `error` member of a failed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human explanation naming the field or the state.
    pub message: String,
    /// For `busy`: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorBody {
    /// An error without retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    /// A `busy` answer.
    pub fn busy(retry_after_ms: u64, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Busy,
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

/// Why a request payload could not be decoded.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RequestError {
    /// Over [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    /// Not JSON / wrong types.
    #[error("{0}")]
    Malformed(String),
    /// A value failed validation.
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    /// The answer body for this error.
    pub fn to_body(&self) -> ErrorBody {
        let code = match self {
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::Malformed(_) => ErrorCode::Malformed,
            Self::Invalid(_) => ErrorCode::Invalid,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// Where and how to answer a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyPath {
    /// The response topic (MQTT 5 property, else payload `reply_to`).
    pub topic: Option<String>,
    /// MQTT 5 Correlation Data, echoed as a property.
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 3.1.1 `correlation_id` from the payload, echoed in the answer payload.
    pub correlation_id: Option<String>,
}

impl ReplyPath {
    /// The correlation to echo in the answer payload: the payload's `correlation_id`, or
    /// the MQTT 5 Correlation Data when it is UTF-8.
    pub fn payload_correlation(&self) -> Option<&str> {
        self.correlation_id.as_deref().or_else(|| {
            self.correlation_data
                .as_deref()
                .and_then(|d| std::str::from_utf8(d).ok())
        })
    }
}

/// Decodes a request payload into `T`, also returning the reply path found in the payload.
/// An empty payload counts as `{}` (a `get` needs no body).
pub fn decode_request<T: DeserializeOwned>(payload: &[u8]) -> (ReplyPath, Result<T, RequestError>) {
    let mut path = ReplyPath::default();
    if payload.len() > MAX_PAYLOAD {
        return (path, Err(RequestError::TooLarge(payload.len())));
    }
    let value: serde_json::Value = if payload.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Object(Default::default())
    } else {
        match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return (path, Err(RequestError::Malformed(format!("not JSON: {e}")))),
        }
    };
    let serde_json::Value::Object(map) = &value else {
        return (
            path,
            Err(RequestError::Malformed(
                "payload must be a JSON object".into(),
            )),
        );
    };
    match map.get("reply_to") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) if s.len() <= 256 => path.topic = Some(s.clone()),
        Some(_) => {
            return (
                path,
                Err(RequestError::Malformed(
                    "reply_to: must be a topic string of at most 256 bytes".into(),
                )),
            )
        }
    }
    match map.get("correlation_id") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) if s.len() <= 128 && validate::text("", s).is_ok() => {
            path.correlation_id = Some(s.clone())
        }
        Some(_) => {
            return (
                path,
                Err(RequestError::Malformed(
                    "correlation_id: must be a string of at most 128 bytes".into(),
                )),
            )
        }
    }
    let typed = serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let p = e.path().to_string();
        let inner = e.into_inner();
        if p == "." {
            RequestError::Malformed(inner.to_string())
        } else {
            RequestError::Malformed(format!("{p}: {inner}"))
        }
    });
    (path, typed)
}

/// Decodes a report payload (no reply path): size limit, JSON, types.
pub fn decode_report<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RequestError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(RequestError::TooLarge(payload.len()));
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let typed = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let p = e.path().to_string();
        RequestError::Malformed(format!("{p}: {}", e.into_inner()))
    })?;
    de.end()
        .map_err(|e| RequestError::Malformed(format!("trailing data: {e}")))?;
    Ok(typed)
}

/// The answer envelope: `{"ok":true, ...body}` or `{"ok":false,"error":{...}}`, with the
/// payload correlation id echoed for MQTT 3.1.1 clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    /// Success or not.
    pub ok: bool,
    /// Echo of the request's correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Present when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Present when `ok` is true.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub body: Option<T>,
}

impl<T: Serialize> Answer<T> {
    /// A successful answer.
    pub fn ok(correlation_id: Option<&str>, body: T) -> Self {
        Self {
            ok: true,
            correlation_id: correlation_id.map(str::to_string),
            error: None,
            body: Some(body),
        }
    }
    /// Serialized form.
    pub fn to_vec(&self) -> Vec<u8> {
        // Serializing plain data structs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Answer<serde_json::Value> {
    /// A failed answer.
    pub fn err(correlation_id: Option<&str>, error: ErrorBody) -> Self {
        Self {
            ok: false,
            correlation_id: correlation_id.map(str::to_string),
            error: Some(error),
            body: None,
        }
    }
}

/// Body of a successful `calls/create` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateAnswer {
    /// The call as accepted (or as it is now, for a repeated request id).
    pub call: crate::CallView,
    /// The code the customer gives the courier at pickup. Only ever sent here.
    pub pickup_code: String,
    /// True when this request id was seen before and this is the earlier call.
    pub duplicate: bool,
    /// Set when a scale reading overrode the declared parcel class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_corrected: Option<String>,
}

/// Body of a successful `get` or `cancel` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallAnswer {
    /// The call now.
    pub call: crate::CallView,
}

/// Body of a successful answer to a courier's job reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReplyAnswer {
    /// The call concerned.
    pub call_id: String,
    /// The action that was applied (or had been applied before).
    pub action: crate::JobAction,
    /// True when this was a repeat that changed nothing.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateCall, GetCall};

    #[test]
    fn reply_path_survives_bad_body() {
        let (path, res) = decode_request::<CreateCall>(
            br#"{"reply_to":"pickup/v1/s/kiosks/k/replies","correlation_id":"7","tel":5}"#,
        );
        assert_eq!(path.topic.as_deref(), Some("pickup/v1/s/kiosks/k/replies"));
        assert_eq!(path.correlation_id.as_deref(), Some("7"));
        assert!(matches!(res, Err(RequestError::Malformed(_))));
    }

    #[test]
    fn field_path_in_type_errors() {
        let (_, res) = decode_request::<CreateCall>(
            br#"{"request_id":"r","tel":"010-1234-5678","location":{"lat":"x","lon":1},"parcel":{"class":"light"}}"#,
        );
        let msg = res.unwrap_err().to_string();
        assert!(msg.contains("location.lat"), "{msg}");
    }

    #[test]
    fn empty_and_oversized() {
        let (_, res) = decode_request::<GetCall>(b"");
        assert!(res.is_ok());
        let big = vec![b' '; MAX_PAYLOAD + 1];
        let (_, res) = decode_request::<GetCall>(&big);
        assert_eq!(res.unwrap_err(), RequestError::TooLarge(MAX_PAYLOAD + 1));
        let (_, res) = decode_request::<GetCall>(b"[1]");
        assert!(matches!(res, Err(RequestError::Malformed(_))));
    }

    #[test]
    fn answers_serialize_flat() {
        let a = Answer::ok(
            Some("c1"),
            JobReplyAnswer {
                call_id: "x".into(),
                action: crate::JobAction::Accept,
                duplicate: false,
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&a.to_vec()).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["call_id"], "x");
        assert_eq!(v["correlation_id"], "c1");
        let e = Answer::err(None, ErrorBody::busy(250, "shedding"));
        let v: serde_json::Value = serde_json::from_slice(&e.to_vec()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "busy");
        assert_eq!(v["error"]["retry_after_ms"], 250);
        let back: Answer<JobReplyAnswer> = serde_json::from_slice(&e.to_vec()).unwrap();
        assert!(back.body.is_none());
    }
}
