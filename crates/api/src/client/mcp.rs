//! The daemon's MCP endpoint (`/mcp`, Streamable HTTP, stateless) as raw JSON-RPC messages:
//! what `hutch mcp` bridges to stdio and what the benchmark times. The MCP implementation is
//! the daemon's; this side only carries messages.

use base64::Engine as _;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyDataStream, BodyExt, Full};
use hyper::{body::Bytes, Method};
use serde_json::Value;

use super::{check_status, Client, ClientError};

/// The daemon's MCP endpoint.
pub const MCP_PATH: &str = "/mcp";

/// The messages the daemon answered one MCP message with: none (a notification), one (a JSON
/// answer), or several (an event stream: progress notifications, then the response).
pub struct McpReply {
    body: Option<BodyDataStream<hyper::body::Incoming>>,
    /// Event-stream bytes not yet split into events.
    pending: Vec<u8>,
    /// Whether the body is an event stream (else it is one JSON message).
    events: bool,
}

/// Where a request's `_meta` names the protocol version it speaks (MCP 2026-07-28).
const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

impl Client {
    /// Posts one JSON-RPC `message` to `/mcp` with the headers Streamable HTTP asks of it: the
    /// protocol version (the request's own, else the `negotiated` one of `initialize`), the
    /// method and the name it acts on. A refused request (e.g. a bad token) is
    /// [`ClientError::Api`].
    pub async fn mcp(
        &self,
        message: &Value,
        negotiated: Option<&str>,
    ) -> Result<McpReply, ClientError> {
        let headers = headers(message, negotiated);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = serde_json::to_vec(message).expect("serializable");
        let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
        let resp = self
            .send_body(
                Method::POST,
                MCP_PATH,
                "application/json",
                &headers,
                BoxBody::new(body),
            )
            .await?;
        let resp = check_status(resp).await?;
        let events = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let empty = resp.status() == hyper::StatusCode::ACCEPTED;
        Ok(McpReply {
            body: (!empty).then(|| BodyDataStream::new(resp.into_body())),
            pending: Vec::new(),
            events,
        })
    }
}

/// The Streamable HTTP headers for `message`.
fn headers(message: &Value, negotiated: Option<&str>) -> Vec<(&'static str, String)> {
    let mut out = vec![("accept", "application/json, text/event-stream".to_string())];
    let params = &message["params"];
    let version = params["_meta"][META_PROTOCOL_VERSION]
        .as_str()
        .or(negotiated);
    if let Some(v) = version {
        out.push(("mcp-protocol-version", v.to_string()));
    }
    let Some(method) = message["method"].as_str() else {
        return out;
    };
    out.push(("mcp-method", method.to_string()));
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        "tasks/get" | "tasks/update" | "tasks/cancel" => "taskId",
        _ => return out,
    };
    if let Some(name) = params[key].as_str() {
        out.push(("mcp-name", header_value(name)));
    }
    out
}

/// `value` as a header value: as it is when it is plain printable ASCII, else wrapped as
/// `=?base64?…?=` (the MCP header encoding).
fn header_value(value: &str) -> String {
    let plain = !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
        && value.chars().all(|c| (' '..='~').contains(&c))
        && !value.starts_with("=?base64?");
    if plain {
        value.to_string()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value)
        )
    }
}

impl McpReply {
    /// The next JSON-RPC message of the answer, or `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Bytes, ClientError>> {
        if !self.events {
            let body = self.body.take()?;
            return Some(collect(body).await);
        }
        loop {
            if let Some(message) = self.next_event() {
                return Some(Ok(message));
            }
            match self.body.as_mut()?.next().await {
                Some(Ok(chunk)) => self.pending.extend_from_slice(&chunk),
                Some(Err(e)) => return Some(Err(ClientError::Http(e))),
                None => {
                    self.body = None;
                    // A last event without its blank line still counts.
                    self.pending.extend_from_slice(b"\n\n");
                    return self.next_event().map(Ok);
                }
            }
        }
    }

    /// Takes complete events off the buffer until one carries data (priming events and
    /// keep-alive comments carry none): that data.
    fn next_event(&mut self) -> Option<Bytes> {
        loop {
            let text = &self.pending;
            let end = text.windows(2).position(|w| w == b"\n\n")?;
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let data: Vec<&[u8]> = event
                .split(|b| *b == b'\n')
                .filter_map(|line| line.strip_suffix(b"\r").or(Some(line)))
                .filter_map(|line| line.strip_prefix(b"data:"))
                .map(|d| d.strip_prefix(b" ").unwrap_or(d))
                .collect();
            if !data.is_empty() && data.iter().any(|d| !d.is_empty()) {
                return Some(Bytes::from(data.join(&b'\n')));
            }
        }
    }
}

/// A whole JSON body.
async fn collect(body: BodyDataStream<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    let chunks: Vec<Bytes> = body
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(ClientError::Http)?;
    Ok(Bytes::from(chunks.concat()))
}
