//! The Connect protocol's framing, in the JSON codec E2B's SDK uses: unary calls are plain
//! JSON bodies; a server-streaming call's request and response messages are enveloped (one
//! flags byte, a 4-byte big-endian length, the JSON), and the response ends with an
//! end-of-stream envelope (flags `0x02`) carrying `{}` or `{"error": {code, message}}`.

use axum::{
    body::{Body, Bytes},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{E2bError, Result};

/// Flags of an ordinary message.
const MESSAGE: u8 = 0;
/// Flags of the end-of-stream message.
const END_STREAM: u8 = 2;
/// Flags bit of a compressed message (never sent: the SDK turns compression off).
const COMPRESSED: u8 = 1;

/// The one request message of a server-streaming call.
pub fn unwrap_request<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let bad = |why: &str| E2bError::bad_request(format!("bad Connect request: {why}"));
    let (head, rest) = body
        .split_first_chunk::<5>()
        .ok_or_else(|| bad("shorter than an envelope"))?;
    if head[0] & COMPRESSED != 0 {
        return Err(bad("compressed messages are not supported"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let message = rest.get(..len).ok_or_else(|| bad("cut-off message"))?;
    serde_json::from_slice(message).map_err(|e| bad(&e.to_string()))
}

/// A unary request's message (an empty body is the empty message).
pub fn unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| E2bError::bad_request(format!("bad Connect request: {e}")))
}

/// One enveloped response message.
pub fn message(value: &Value) -> Bytes {
    envelope(MESSAGE, value)
}

/// The end-of-stream message: success, or the error that ended the stream.
pub fn end_stream(error: Option<(&str, &str)>) -> Bytes {
    let body = match error {
        None => json!({}),
        Some((code, message)) => json!({"error": {"code": code, "message": message}}),
    };
    envelope(END_STREAM, &body)
}

/// The Connect code for an error: its own, else the one Connect maps its status from.
fn code(e: &E2bError) -> &'static str {
    e.rpc_code.unwrap_or(match e.status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_argument",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::FORBIDDEN => "permission_denied",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "failed_precondition",
        StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE => "resource_exhausted",
        StatusCode::NOT_IMPLEMENTED => "unimplemented",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "deadline_exceeded",
        _ => "internal",
    })
}

/// `e` as a Connect call answers it: a unary call with its status and `{code, message}`; a
/// streaming call with 200 and only the end-of-stream message carrying them.
pub fn error_response(e: &E2bError, streaming: bool) -> Response {
    if !streaming {
        let body = json!({"code": code(e), "message": e.message});
        return (e.status, Json(body)).into_response();
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from(end_stream(Some((code(e), &e.message)))))
        .expect("valid response")
}

fn envelope(flags: u8, value: &Value) -> Bytes {
    let json = serde_json::to_vec(value).expect("JSON values serialise");
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_malformed_ones_are_refused() {
        let framed = message(&json!({"a": 1}));
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 7]);
        let back: Value = unwrap_request(&framed).unwrap();
        assert_eq!(back, json!({"a": 1}));
        assert_eq!(end_stream(None)[0], END_STREAM);
        for bad in [&b"\0\0\0"[..], b"\0\0\0\0\x09{}", b"\x01\0\0\0\x02{}"] {
            assert!(unwrap_request::<Value>(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn errors_carry_connect_codes_unary_or_at_the_end_of_the_stream() {
        let body = |r: Response| async move {
            axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap()
        };
        let missing = E2bError::new(StatusCode::NOT_FOUND, "no such file");
        let unary = error_response(&missing, false);
        assert_eq!(unary.status(), StatusCode::NOT_FOUND);
        let json: Value = serde_json::from_slice(&body(unary).await).unwrap();
        assert_eq!(
            json,
            json!({"code": "not_found", "message": "no such file"})
        );

        let exists = E2bError::exists("already exists: /x");
        let json: Value =
            serde_json::from_slice(&body(error_response(&exists, false)).await).unwrap();
        assert_eq!(json["code"], "already_exists");

        let streamed = error_response(&E2bError::unsupported("a PTY process"), true);
        assert_eq!(streamed.status(), StatusCode::OK);
        let framed = body(streamed).await;
        assert_eq!(framed[0], END_STREAM);
        let end: Value = serde_json::from_slice(&framed[5..]).unwrap();
        assert_eq!(end["error"]["code"], "unimplemented");
        assert!(end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"));
    }
}
