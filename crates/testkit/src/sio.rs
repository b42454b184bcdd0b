//! Engine.IO v4 / Socket.IO v5 on the client side, written against the wire format (as
//! python-socketio and socket.io-client speak it), so a test or a simulated agent sees
//! exactly the frames the gateway sends:
//!
//! - Engine.IO open `0{"sid":..}` from the server, then Socket.IO connect `40` from the
//!   client, answered by `40{"sid":..}` (accepted) or `44{..}` (refused);
//! - ping `2` from the server, pong `3` from the client (Engine.IO 4: the server pings);
//! - events `42["name",data]`, events with an ack id `42<id>["name",data]`, acks
//!   `43<id>[reply]`; disconnect `41` (Socket.IO) or close `1` (Engine.IO).
//!
//! [`open`] is the one namespace connect over a WebSocket, lean enough for a fleet of
//! twenty thousand simulated agents in one process; [`SioWs`] is the test client built on
//! it, and [`Polling`] drives long-polling by hand to exercise sid handling.

use std::future::Future;
use std::io;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::http::{HttpConn, HttpResponse};
use crate::pki::AgentCert;

/// The Socket.IO WebSocket URL of a gateway on `port` (Host `localhost`).
pub fn ws_url(port: u16) -> String {
    format!("wss://localhost:{port}/socket.io/?EIO=4&transport=websocket")
}

/// What the namespace connect answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Namespace {
    /// `40{"sid":..}`: the Socket.IO session id, when the server sent one.
    Accepted(Option<String>),
    /// `44{..}`: the server's reason.
    Refused(Value),
}

/// Why [`open`] did not reach a namespace answer.
#[derive(Debug)]
pub enum OpenError {
    /// The WebSocket handshake or the transport failed.
    WebSocket(tungstenite::Error),
    /// The first frame was not an Engine.IO open packet.
    NoOpenPacket(String),
    /// The server closed before answering.
    Closed,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::WebSocket(e) => write!(f, "websocket: {e}"),
            OpenError::NoOpenPacket(got) => write!(f, "engine.io: no open packet, got {got:?}"),
            OpenError::Closed => f.write_str("websocket: closed before the namespace connect"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Upgrades `stream` (an established TLS connection to the gateway on `port`) to a
/// WebSocket and connects to the namespace `/`.
pub async fn open<S>(
    stream: S,
    port: u16,
    config: Option<WebSocketConfig>,
) -> Result<(WebSocketStream<S>, Namespace), OpenError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(ws_url(port), stream, config)
        .await
        .map_err(OpenError::WebSocket)?;
    let first = next_text(&mut ws).await?;
    if !first.starts_with('0') {
        return Err(OpenError::NoOpenPacket(first));
    }
    ws.send(Message::text("40"))
        .await
        .map_err(OpenError::WebSocket)?;
    loop {
        let msg = next_text(&mut ws).await?;
        if let Some(rest) = msg.strip_prefix("40") {
            let v: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
            let sid = v.get("sid").and_then(Value::as_str).map(str::to_owned);
            return Ok((ws, Namespace::Accepted(sid)));
        }
        if let Some(rest) = msg.strip_prefix("44") {
            let reason = serde_json::from_str(rest).unwrap_or(Value::Null);
            return Ok((ws, Namespace::Refused(reason)));
        }
    }
}

/// The next text frame, answering Engine.IO pings on the way.
pub async fn next_text<S>(ws: &mut WebSocketStream<S>) -> Result<String, OpenError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                ws.send(Message::text("3"))
                    .await
                    .map_err(OpenError::WebSocket)?;
            }
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(_))) | None => return Err(OpenError::Closed),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(OpenError::WebSocket(e)),
        }
    }
}

/// A frame as an agent reacts to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Engine.IO ping `2`: answer with pong `3`.
    Ping,
    /// An event without an ack id: `42["name",..]`, with its name's JSON text start.
    Event(&'a str),
    /// An event with an ack id (a command from the API): `42<id>[..]`, with the id.
    EventWithAck(&'a str),
    /// Socket.IO disconnect `41` or Engine.IO close `1`.
    Disconnect,
    Other,
}

/// Classifies a text frame without parsing its JSON (a simulated agent does this for
/// every frame; [`Frame::Event`] carries the rest after `42`, e.g. `["heartbeat_ack",..]`).
pub fn classify(text: &str) -> Frame<'_> {
    if text == "2" {
        return Frame::Ping;
    }
    if text == "1" || text.starts_with("41") {
        return Frame::Disconnect;
    }
    let Some(rest) = text.strip_prefix("42") else {
        return Frame::Other;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && rest[digits..].starts_with('[') {
        return Frame::EventWithAck(&rest[..digits]);
    }
    Frame::Event(rest)
}

/// Whatever a [`SioWs`] connects to: a TLS connection (with an agent certificate or
/// none) to a gateway on `port`.
pub trait Target {
    fn tls(
        &self,
        agent: Option<&AgentCert>,
    ) -> impl Future<Output = io::Result<TlsStream<TcpStream>>> + Send;
    fn port(&self) -> u16;
}

/// A Socket.IO v5 test client over a WebSocket (no polling).
pub struct SioWs {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    pub sid: Option<String>,
}

/// What the namespace connect answered.
pub enum SioConnect {
    Ok(Box<SioWs>),
    Refused(Value),
}

impl SioWs {
    pub async fn connect(
        target: &impl Target,
        agent: Option<&AgentCert>,
    ) -> io::Result<SioConnect> {
        let tls = target.tls(agent).await?;
        let (ws, answer) = open(tls, target.port(), None)
            .await
            .map_err(io::Error::other)?;
        Ok(match answer {
            Namespace::Accepted(sid) => SioConnect::Ok(Box::new(SioWs { ws, sid })),
            Namespace::Refused(reason) => SioConnect::Refused(reason),
        })
    }

    pub async fn emit(&mut self, event: &str, data: Value) {
        let packet = format!("42{}", json!([event, data]));
        self.ws.send(Message::text(packet)).await.unwrap();
    }

    /// The next event `(name, data)`, answering pings; `None` once the socket is closed
    /// (by a Socket.IO disconnect packet or the transport).
    pub async fn next_event(&mut self) -> Option<(String, Value)> {
        self.next_event_with_ack()
            .await
            .map(|(name, data, _)| (name, data))
    }

    /// Like `next_event`, with the ack id when the server asked for an acknowledgement.
    pub async fn next_event_with_ack(&mut self) -> Option<(String, Value, Option<u64>)> {
        loop {
            let msg = next_text(&mut self.ws).await.ok()?;
            if let Some(rest) = msg.strip_prefix("42") {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                let ack = digits.parse().ok();
                let v: Value = serde_json::from_str(&rest[digits.len()..]).ok()?;
                let name = v.get(0)?.as_str()?.to_owned();
                return Some((name, v.get(1).cloned().unwrap_or(Value::Null), ack));
            }
            if classify(&msg) == Frame::Disconnect {
                return None;
            }
        }
    }

    /// Answers the event that carried ack id `id` with `reply` as its one argument.
    pub async fn ack(&mut self, id: u64, reply: Value) {
        let packet = format!("43{id}{}", json!([reply]));
        self.ws.send(Message::text(packet)).await.unwrap();
    }

    /// Waits up to `secs` for the next event, with its ack id.
    pub async fn next_event_with_ack_within(
        &mut self,
        secs: u64,
    ) -> Option<(String, Value, Option<u64>)> {
        tokio::time::timeout(Duration::from_secs(secs), self.next_event_with_ack())
            .await
            .expect("timed out waiting for an event")
    }

    /// Waits up to `secs` for the next event.
    pub async fn next_event_within(&mut self, secs: u64) -> Option<(String, Value)> {
        tokio::time::timeout(Duration::from_secs(secs), self.next_event())
            .await
            .expect("timed out waiting for an event")
    }
}

/// Engine.IO long-polling by hand, to exercise sid handling directly.
pub struct Polling {
    pub sid: String,
}

impl Polling {
    /// The polling handshake; returns the engine sid.
    pub async fn handshake(conn: &mut HttpConn) -> Polling {
        let r = conn
            .send("GET", "/socket.io/?EIO=4&transport=polling", &[], "")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let open: Value = serde_json::from_str(text.strip_prefix('0').unwrap()).unwrap();
        Polling {
            sid: open["sid"].as_str().unwrap().to_owned(),
        }
    }

    pub fn path(&self) -> String {
        format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid)
    }

    pub async fn post(&self, conn: &mut HttpConn, payload: &str) -> HttpResponse {
        conn.send(
            "POST",
            &self.path(),
            &[("content-type", "text/plain;charset=UTF-8")],
            payload,
        )
        .await
        .unwrap()
    }

    pub async fn get(&self, conn: &mut HttpConn) -> HttpResponse {
        conn.send("GET", &self.path(), &[], "").await.unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_frames_an_agent_reacts_to() {
        assert_eq!(classify("2"), Frame::Ping);
        assert_eq!(
            classify(r#"42["heartbeat_ack",{"status":"ok"}]"#),
            Frame::Event(r#"["heartbeat_ack",{"status":"ok"}]"#)
        );
        assert_eq!(
            classify(r#"4217["bench_command",{"seq":1}]"#),
            Frame::EventWithAck("17")
        );
        assert_eq!(classify("41"), Frame::Disconnect);
        assert_eq!(classify("1"), Frame::Disconnect);
        assert_eq!(classify(r#"0{"sid":"x"}"#), Frame::Other);
    }
}
