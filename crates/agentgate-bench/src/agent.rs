//! One simulated agent: TCP from a chosen source address, the mTLS handshake with its own
//! certificate, the WebSocket upgrade and namespace connect (`agentgate_testkit::sio`),
//! then the life of a python-socketio agent over WebSocket:
//!
//! - ping `2` from the server, pong `3` from us (Engine.IO 4: the server pings);
//! - events `42["heartbeat",{..}]` from us, `42["heartbeat_ack",{..}]` back;
//! - commands `42<id>["bench_command",{..}]` from the server, acked by `43<id>[{..}]`.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use agentgate_testkit::sio::{self, Frame, Namespace, OpenError};
use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::SERVER_NAME;
use crate::report::Samples;

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// The heartbeat the simulated agents send (the fields python agents send).
const HEARTBEAT: &str = r#"42["heartbeat",{"cpu_usage":0.5,"memory_usage":256,"disk_usage":1024}]"#;

/// Where the fleet's phases are: agents connect, then heartbeat, then stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Steady,
    Stop,
}

/// Opens a TCP connection from `source` (port chosen by the kernel). SO_REUSEADDR lets the
/// kernel hand out ports still in TIME_WAIT from an earlier run.
pub async fn tcp_connect(target: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(target).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The full mTLS handshake.
pub async fn tls_connect(
    tcp: TcpStream,
    tls: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| io_reason("tls", &e))
}

/// Connects one agent up to the accepted Socket.IO namespace connect.
pub async fn open(
    target: SocketAddr,
    source: IpAddr,
    tls: Arc<ClientConfig>,
) -> Result<Ws, String> {
    let tcp = tcp_connect(target, source)
        .await
        .map_err(|e| io_reason("tcp connect", &e))?;
    let tls = tls_connect(tcp, tls).await?;
    // Small buffers: twenty thousand agents live in one simulator process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    match sio::open(tls, target.port(), Some(config)).await {
        Ok((ws, Namespace::Accepted(_))) => Ok(ws),
        Ok((_, Namespace::Refused(_))) => Err("socket.io: connect refused".into()),
        Err(OpenError::WebSocket(e)) => Err(ws_reason(&e)),
        Err(OpenError::NoOpenPacket(_)) => Err("engine.io: no open packet".into()),
        Err(OpenError::Closed) => Err("websocket: closed".into()),
    }
}

/// What one agent measured after it connected.
#[derive(Debug, Default)]
pub struct SessionOutcome {
    pub heartbeats_sent: u64,
    pub heartbeat_latency: Samples,
    pub commands_acked: u64,
    /// Why the session ended before the fleet stopped it.
    pub failure: Option<String>,
}

/// Runs a connected agent: answers pings and commands; in the steady phase sends a
/// heartbeat every `interval` (the first after `offset`, to spread the fleet over the
/// interval) and times its `heartbeat_ack`; returns when the phase becomes `Stop`.
pub async fn run_session(
    mut ws: Ws,
    mut phase: watch::Receiver<Phase>,
    interval: Duration,
    offset: Duration,
) -> SessionOutcome {
    let mut out = SessionOutcome::default();
    let mut pending: VecDeque<Instant> = VecDeque::new();
    let mut ticks: Option<tokio::time::Interval> = None;
    let end = |ws: &mut Ws| {
        // Reset rather than FIN: the fleet's ports do not linger in TIME_WAIT.
        let _ = ws.get_ref().get_ref().0.set_zero_linger();
    };
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Stop => {
                drain(&mut ws, &mut pending, &mut out).await;
                end(&mut ws);
                return out;
            }
            Phase::Steady if ticks.is_none() => {
                let mut t = tokio::time::interval_at(Instant::now() + offset, interval);
                t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                ticks = Some(t);
            }
            _ => {}
        }
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    end(&mut ws);
                    return out;
                }
            }
            _ = async { ticks.as_mut().expect("guarded by the condition").tick().await }, if ticks.is_some() => {
                if let Err(e) = ws.send(Message::text(HEARTBEAT)).await {
                    out.failure = Some(ws_reason(&e));
                    return out;
                }
                out.heartbeats_sent += 1;
                pending.push_back(Instant::now());
            }
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => {
                        out.failure = Some("disconnected: connection closed by the server".into());
                        return out;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        out.failure = Some(format!("disconnected: {}", ws_reason(&e)));
                        return out;
                    }
                };
                let reply = match react(text.as_str(), &mut pending, &mut out) {
                    Ok(reply) => reply,
                    Err(()) => return out,
                };
                if let Some(reply) = reply
                    && let Err(e) = ws.send(Message::text(reply)).await
                {
                    out.failure = Some(ws_reason(&e));
                    return out;
                }
            }
        }
    }
}

/// What the agent does with a frame: the reply to send, if any; `Err` when the server
/// ended the session (the reason is in `out.failure`).
fn react(
    text: &str,
    pending: &mut VecDeque<Instant>,
    out: &mut SessionOutcome,
) -> Result<Option<String>, ()> {
    Ok(match sio::classify(text) {
        Frame::Ping => Some("3".to_owned()),
        Frame::Event(rest) if rest.starts_with(r#"["heartbeat_ack""#) => {
            if let Some(sent) = pending.pop_front() {
                out.heartbeat_latency.push(sent.elapsed());
            }
            None
        }
        Frame::EventWithAck(id) => {
            out.commands_acked += 1;
            Some(format!(r#"43{id}[{{"ok":true}}]"#))
        }
        Frame::Disconnect => {
            out.failure = Some("disconnected: socket.io disconnect from the server".into());
            return Err(());
        }
        Frame::Event(_) | Frame::Other => None,
    })
}

/// At the end of the run: waits (a bounded time) for the acks of heartbeats in flight, so
/// that a heartbeat sent just before the stop is not counted as lost.
async fn drain(ws: &mut Ws, pending: &mut VecDeque<Instant>, out: &mut SessionOutcome) {
    let deadline = Instant::now() + DRAIN;
    while !pending.is_empty() {
        let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout_at(deadline, ws.next()).await
        else {
            break;
        };
        match react(text.as_str(), pending, out) {
            Ok(Some(reply)) => {
                let _ = ws.send(Message::text(reply)).await;
            }
            Ok(None) => {}
            Err(()) => return,
        }
    }
    if !pending.is_empty() {
        out.failure = Some(format!(
            "heartbeat: {} without ack {} s after the end",
            pending.len(),
            DRAIN.as_secs()
        ));
    }
}

/// How long [`drain`] waits.
const DRAIN: Duration = Duration::from_secs(2);

/// A failure reason short and stable enough to count: the TLS alert or the IO error kind.
pub fn io_reason(stage: &str, e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{stage}: {}", short(&tls.to_string())),
        None => format!("{stage}: {:?}", e.kind()),
    }
}

fn ws_reason(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(io) => io_reason("websocket", io),
        other => format!("websocket: {}", short(&other.to_string())),
    }
}

/// The first 80 characters of a message.
pub fn short(s: &str) -> String {
    s.chars().take(80).collect()
}
