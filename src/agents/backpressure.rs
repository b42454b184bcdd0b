//! Backpressure on agent sessions: replies are never dropped because a session's send
//! buffer is full; the session stops being read until they are out.
//!
//! engineioxide gives every session a bounded channel of packets to send
//! (`max_buffer_size`, `limits.session_send_buffer`, default 128) and socketioxide's emits fail with
//! `SocketError::InternalChannelFull` when it is full. A handler runs on the session's
//! read loop and cannot wait, so before this module an agent that sent heartbeats faster
//! than the connection carried the answers lost them without a word (about 400
//! `heartbeat_ack`s out of 30,000 sent back to back, issue 11).
//!
//! Now a reply that finds the buffer full goes into the session's [`Outboxes`] queue with
//! every reply after it (order is kept), the session's connection stops being read
//! ([`ReadGate`], applied by [`Gated`] under the WebSocket), and a task moves the queue into
//! the buffer as room appears, then lets reading resume. What can still be read while
//! paused is what the WebSocket reader had already buffered, a few messages. engineioxide
//! says nothing when room appears, so the task looks every millisecond while a queue
//! exists.
//!
//! A long-polling session has no connection of its own to stop (each POST may come on
//! another one), and a POST carries up to `limits.max_packet_bytes` of packets at once:
//! its queue is bounded by `limits.session_reply_queue`; past that the session is closed with a log line
//! and `agentgate_socket_overflow_disconnects_total`, never shortened silently. Closing
//! it cannot wait for room in its buffer (socketioxide's `disconnect` needs room for its
//! packet): the session guard refuses its requests from then on ([`SessionBindings`]), and
//! a WebSocket's connection is cut.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use serde::Serialize;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::handler::{FromMessageParts, Value as ParserValue};
use socketioxide::socket::{Sid, Socket};
use socketioxide::{SendError, SocketError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::SessionBindings;
use super::ws_frames::{FrameSizes, Oversized};
use crate::metrics::Metrics;

/// How often a waiting queue looks for room in the session's send buffer.
const RETRY: Duration = Duration::from_millis(1);

/// Most replies a queue moves into the send buffer per [`RETRY`]: half of engineioxide's
/// buffer (`max_buffer_size`, `limits.session_send_buffer` packets). engineioxide's Engine.IO ping goes through the
/// same buffer and ends the session when it finds it full (`heartbeat_job`: `try_send` of
/// the ping), so a queue that refilled it to the brim whenever the writer took a packet
/// would keep it full while it drains. This lowers the odds, it cannot rule them out:
/// socketioxide shows no buffer level, and the handler fills the buffer before it knows
/// it is full. A ping due at such a moment ends the session (logged as a disconnect
/// with reason "client did not send a PONG packet in time"); see the README.
fn burst(send_buffer: usize) -> usize {
    (send_buffer / 2).max(1)
}

/// How often the disconnect of an overflowed polling session is tried again (it needs room
/// in the buffer the client does not poll; engineioxide ends the session itself at its
/// next ping, which finds the buffer full).
const DISCONNECT_RETRY: Duration = Duration::from_millis(100);

/// Whether a connection may be read. Cheap to clone; one per connection, shared by the
/// connection's IO ([`Gated`]) and the session that runs on it.
#[derive(Clone, Default, Debug)]
pub(crate) struct ReadGate(Arc<GateInner>);

#[derive(Default, Debug)]
struct GateInner {
    paused: AtomicBool,
    /// Set when the session must end: reads fail, so the WebSocket reader ends the session.
    cut: AtomicBool,
    waker: AtomicWaker,
    /// Set when the connection upgrades to a WebSocket: from then on [`Gated`] reads the
    /// frame headers for the message size limit.
    frames: OnceLock<FrameWatch>,
}

/// `limits.max_packet_bytes` on a WebSocket's incoming messages (see
/// [`ws_frames`](super::ws_frames)), and where a refusal is told.
pub(crate) struct FrameWatch {
    pub(crate) limit: u64,
    pub(crate) refusals: crate::limits::Refusals,
    pub(crate) source: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for FrameWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWatch")
            .field("limit", &self.limit)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ReadGate {
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.0.paused.store(false, Ordering::Release);
        self.0.waker.wake();
    }

    /// Checks the size of every WebSocket message read from now on (the connection is
    /// being upgraded); the first call wins.
    pub(crate) fn watch_frames(&self, watch: FrameWatch) {
        let _ = self.0.frames.set(watch);
    }

    /// Ends the connection at its next read (a transport error for the session).
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..2 {
            if self.0.cut.load(Ordering::Acquire) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "session closed: replies overflowed",
                )));
            }
            if !self.0.paused.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            // Registered before the second look, so a resume in between is not missed.
            self.0.waker.register(cx.waker());
        }
        Poll::Pending
    }
}

/// A connection's IO whose reads wait while its [`ReadGate`] is paused, and, once it is a
/// WebSocket, fail on a message over the size limit; writes pass.
pub(crate) struct Gated<IO> {
    io: IO,
    gate: ReadGate,
    /// Created at the first read after [`ReadGate::watch_frames`].
    frames: Option<FrameSizes>,
}

impl<IO> Gated<IO> {
    pub fn new(io: IO, gate: ReadGate) -> Self {
        Self {
            io,
            gate,
            frames: None,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gated<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.gate.poll_open(cx))?;
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let Some(watch) = this.gate.0.frames.get() else {
            return Poll::Ready(Ok(()));
        };
        let frames = this
            .frames
            .get_or_insert_with(|| FrameSizes::new(watch.limit));
        if let Err(Oversized(size)) = frames.feed(&buf.filled()[before..]) {
            let text = format!(
                "WebSocket message of {size} bytes or more exceeds the limit of {} bytes (limits.max_packet_bytes); closing the session",
                watch.limit
            );
            watch
                .refusals
                .refused("max_packet_bytes", watch.source, &text);
            this.gate.cut();
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, text)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gated<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// One reply to an agent, kept until the session has room for it.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Event {
        event: &'static str,
        data: serde_json::Value,
    },
    /// The acknowledgement of the agent's event `id`.
    Ack { id: i64, data: serde_json::Value },
}

/// The replies waiting for room, per session. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outboxes(Arc<Shared>);

struct Shared {
    /// Where an overflowed session is marked closed, so the guard refuses its requests.
    bindings: SessionBindings,
    /// Most replies one session may have waiting for room (`limits.session_reply_queue`);
    /// a WebSocket session stops being read long before (it holds a few), so only a
    /// long-polling client that posts far more than it polls gets near it.
    max_queued: usize,
    /// Replies moved into the send buffer per [`RETRY`]: see [`burst`].
    burst: usize,
    /// How many sessions have a queue: zero on the common path, which then takes no lock.
    active: AtomicUsize,
    /// A std Mutex: no `.await` while it is held.
    queues: Mutex<HashMap<Sid, Queue>>,
}

struct Queue {
    replies: VecDeque<Reply>,
    gate: Option<ReadGate>,
    /// Overflowed: the session is being closed, and what it is sent goes nowhere.
    closing: bool,
}

/// What a failed attempt means for the reply.
enum Attempt {
    Sent,
    Full,
    Gone,
}

impl Outboxes {
    /// Queues of at most `max_queued` replies each, for sessions whose send buffer holds
    /// `send_buffer` packets.
    pub fn new(bindings: SessionBindings, max_queued: usize, send_buffer: usize) -> Self {
        Self(Arc::new(Shared {
            bindings,
            max_queued,
            burst: burst(send_buffer),
            active: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
        }))
    }

    /// Forgets the queue of a session that ended.
    pub fn forget(&self, sid: Sid) {
        if self.0.active.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.lock().remove(&sid).is_some() {
            self.0.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Emits `event` to `socket` now, or after the replies already waiting for it.
    /// `gate` finds the connection to pause when the session's buffer is full.
    pub fn emit<A: Adapter, T: Serialize>(
        &self,
        socket: &Arc<Socket<A>>,
        event: &'static str,
        data: &T,
        gate: impl FnOnce() -> Option<ReadGate>,
        metrics: &Metrics,
    ) {
        let reply = || Reply::Event {
            event,
            data: to_value(data),
        };
        if self.queued(socket, reply, metrics) {
            return;
        }
        match outcome(socket.emit(event, data)) {
            Attempt::Sent | Attempt::Gone => {}
            Attempt::Full => self.start_queue(socket, reply(), gate(), metrics),
        }
    }

    /// Sends the acknowledgement of the agent's event `ack_id` (nothing if it asked none).
    pub fn ack<A: Adapter, T: Serialize>(
        &self,
        socket: &Arc<Socket<A>>,
        ack_id: Option<i64>,
        data: &T,
        gate: impl FnOnce() -> Option<ReadGate>,
        metrics: &Metrics,
    ) {
        let Some(id) = ack_id else { return };
        let reply = || Reply::Ack {
            id,
            data: to_value(data),
        };
        if self.queued(socket, reply, metrics) {
            return;
        }
        match outcome(ack_sender(socket, id).send(data)) {
            Attempt::Sent | Attempt::Gone => {}
            Attempt::Full => self.start_queue(socket, reply(), gate(), metrics),
        }
    }

    /// Queues the reply behind those already waiting, if any are; true if it did.
    fn queued<A: Adapter>(
        &self,
        socket: &Arc<Socket<A>>,
        reply: impl FnOnce() -> Reply,
        metrics: &Metrics,
    ) -> bool {
        if self.0.active.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(&socket.id) else {
            return false;
        };
        if queue.closing {
            return true;
        }
        if queue.replies.len() < self.0.max_queued {
            queue.replies.push_back(reply());
            return true;
        }
        queue.closing = true;
        let dropped = std::mem::take(&mut queue.replies).len();
        let gate = queue.gate.clone();
        drop(queues);
        self.overflow(socket, dropped, gate, metrics);
        true
    }

    /// Closes a session whose queue overflowed: the one case where replies are given up,
    /// said in the log and the metrics.
    fn overflow<A: Adapter>(
        &self,
        socket: &Arc<Socket<A>>,
        dropped: usize,
        gate: Option<ReadGate>,
        metrics: &Metrics,
    ) {
        metrics.socket_overflow_disconnect();
        tracing::warn!(
            sid = %socket.id, queued = dropped, limit = "session_reply_queue",
            max = self.0.max_queued,
            "agent sends faster than it reads its replies; closing the session"
        );
        self.0.bindings.close(&socket.id.to_string());
        match gate {
            // Cutting the connection ends the session whatever the state of its buffer.
            Some(gate) => gate.cut(),
            None => {
                disconnect(SocketRef::from(socket.clone()));
            }
        }
    }

    fn start_queue<A: Adapter>(
        &self,
        socket: &Arc<Socket<A>>,
        reply: Reply,
        gate: Option<ReadGate>,
        metrics: &Metrics,
    ) {
        if let Some(gate) = &gate {
            gate.pause();
        }
        metrics.socket_backpressure();
        tracing::debug!(sid = %socket.id, paused = gate.is_some(), "session send buffer full; replies queued");
        self.lock().insert(
            socket.id,
            Queue {
                replies: VecDeque::from([reply]),
                gate,
                closing: false,
            },
        );
        self.0.active.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(self.clone().drain(socket.clone()));
    }

    /// Moves the session's queue into its send buffer as room appears, then lets the
    /// connection be read again.
    async fn drain<A: Adapter>(self, socket: Arc<Socket<A>>) {
        let mut burst = 0;
        loop {
            if burst == self.0.burst {
                burst = 0;
                tokio::time::sleep(RETRY).await;
            }
            let next = {
                let queues = self.lock();
                match queues.get(&socket.id) {
                    // The session ended, or is being closed after an overflow.
                    None => return,
                    Some(q) if q.closing => return,
                    Some(q) => q.replies.front().cloned(),
                }
            };
            let attempt = match &next {
                None => Attempt::Sent,
                Some(reply) => send(&socket, reply),
            };
            match attempt {
                Attempt::Full => {
                    burst = 0;
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Attempt::Sent | Attempt::Gone => burst += 1,
            }
            let mut queues = self.lock();
            let Some(queue) = queues.get_mut(&socket.id).filter(|q| !q.closing) else {
                return;
            };
            queue.replies.pop_front();
            if queue.replies.is_empty() || matches!(attempt, Attempt::Gone) {
                if let Some(queue) = queues.remove(&socket.id)
                    && let Some(gate) = queue.gate
                {
                    gate.resume();
                }
                self.0.active.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Sid, Queue>> {
        self.0.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Disconnects `socket`; false if it was already gone. socketioxide's disconnect needs room
/// for its packet in the session's send buffer and does nothing when it is full, so then
/// it is tried again until it goes or the session ends (engineioxide's next ping, which
/// finds the buffer full, ends it at the latest): a revoked agent that floods is not left
/// connected.
pub(crate) fn disconnect<A: Adapter>(socket: SocketRef<A>) -> bool {
    match socket.clone().disconnect() {
        Ok(()) => true,
        Err(SocketError::Closed) => false,
        Err(SocketError::InternalChannelFull) => {
            tracing::debug!(sid = %socket.id, "send buffer full; the disconnect is retried");
            tokio::spawn(async move {
                while let Err(SocketError::InternalChannelFull) = socket.clone().disconnect() {
                    tokio::time::sleep(DISCONNECT_RETRY).await;
                }
            });
            true
        }
    }
}

/// Emits `event` to each of `sockets`, trying again those whose send buffer is full until
/// `within` has passed; returns how many did not get it (their buffer stayed full). A
/// socket that is gone does not count: there is nobody left to tell.
pub(crate) async fn emit_each<A: Adapter, T: Serialize>(
    sockets: Vec<SocketRef<A>>,
    event: &'static str,
    data: &T,
    within: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut pending = sockets;
    loop {
        pending.retain(|s| matches!(outcome(s.emit(event, data)), Attempt::Full));
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            return pending.len();
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn send<A: Adapter>(socket: &Arc<Socket<A>>, reply: &Reply) -> Attempt {
    match reply {
        Reply::Event { event, data } => outcome(socket.emit(*event, data)),
        Reply::Ack { id, data } => outcome(ack_sender(socket, *id).send(data)),
    }
}

/// An acknowledgement sender for the agent's event `id`; socketioxide makes them only
/// through its extractor, which reads nothing but the socket and the id.
fn ack_sender<A: Adapter>(socket: &Arc<Socket<A>>, id: i64) -> AckSender<A> {
    let mut unused = ParserValue::Bytes(bytes::Bytes::new());
    match AckSender::from_message_parts(socket, &mut unused, &Some(id)) {
        Ok(sender) => sender,
        Err(never) => match never {},
    }
}

fn outcome(result: Result<(), SendError>) -> Attempt {
    match result {
        Ok(()) => Attempt::Sent,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Attempt::Full,
        Err(SendError::Socket(SocketError::Closed)) => Attempt::Gone,
        Err(SendError::Serialize(e)) => {
            // Our replies are plain JSON values; should one not encode, it is said here.
            tracing::error!(error = %e, "reply to an agent could not be encoded; not sent");
            Attempt::Gone
        }
    }
}

fn to_value<T: Serialize>(data: &T) -> serde_json::Value {
    serde_json::to_value(data).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_paused_gate_holds_reads_until_resumed_and_a_cut_ends_them() {
        let (a, mut b) = tokio::io::duplex(64);
        let gate = ReadGate::default();
        let mut gated = Gated::new(a, gate.clone());
        b.write_all(b"hi").await.unwrap();
        gate.pause();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 2];
            gated.read_exact(&mut buf).await.map(|_| (buf, gated))
        });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "read while paused");
        gate.resume();
        let (buf, mut gated) = reader.await.unwrap().unwrap();
        assert_eq!(&buf, b"hi");
        gate.cut();
        let err = gated.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
