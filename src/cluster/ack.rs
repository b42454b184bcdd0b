//! Emit-with-ack to a room across nodes, ending as soon as every answer is in.
//!
//! socketioxide-core 0.20's remote `AckStream::poll_remote` keeps polling the Redis
//! response channel after the last per-node `BroadcastAckCount` instead of checking
//! whether it is done, so it returns `Pending` with nothing left to wake it: the stream
//! then ends only at ack timeout + adapter request timeout (DESIGN.md, "Ack-stream
//! stall"). That is every emit to an agent connected nowhere, and often a same-node one.
//! The stream's own `FusedStream::is_terminated` is right, though: it turns true once the
//! local acks are drained and every node's count and every counted ack has arrived. So
//! [`Complete`] asks it whenever the inner stream says `Pending`, and ends there.
//!
//! An emit that reached nobody therefore ends after one Redis round trip per node, which
//! is how a caller tells "agent connected nowhere" (404) from "agent did not answer"
//! (504) without a second query: [`AckCollection::is_empty_room`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FusedStream, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use socketioxide::adapter::Adapter;
use socketioxide::operators::BroadcastOperators;
use socketioxide::socket::Sid;
use socketioxide::{AckError, EmitWithAckError};

/// Slack on top of the ack timeout for the remote nodes' answers to cross Redis: a remote
/// node reports its sockets' timeouts at the ack timeout, and they need a moment to arrive.
const REMOTE_SLACK: Duration = Duration::from_millis(500);

/// What an emit-with-ack collected.
#[derive(Debug)]
pub struct AckCollection<V> {
    /// One entry per socket the emit reached, on any node: its answer, or why none came.
    pub answers: Vec<(Sid, Result<V, AckError>)>,
    /// True when the stream ended because everything expected had arrived; false when the
    /// deadline cut it (a node died mid-way, or Redis lost a message).
    pub complete: bool,
}

impl<V> AckCollection<V> {
    /// No socket in the room on any node (every node said so): the agent is connected
    /// nowhere.
    pub fn is_empty_room(&self) -> bool {
        self.complete && self.answers.is_empty()
    }
}

/// `op.timeout(ack_timeout).emit_with_ack(event, data)`, collected by [`collect`].
/// `op` selects the sockets, e.g. `io.to("agent:42")`.
pub async fn emit_with_ack<A, T, V>(
    op: BroadcastOperators<A>,
    event: &str,
    data: &T,
    ack_timeout: Duration,
) -> Result<AckCollection<V>, EmitWithAckError>
where
    A: Adapter,
    T: ?Sized + Serialize,
    V: DeserializeOwned + Send + 'static,
{
    let stream = op
        .timeout(ack_timeout)
        .emit_with_ack::<T, V>(event, data)
        .await?;
    Ok(collect(stream, ack_timeout + REMOTE_SLACK).await)
}

/// Drains an ack stream until it is complete or `deadline` has passed.
pub async fn collect<S, V>(stream: S, deadline: Duration) -> AckCollection<V>
where
    S: Stream<Item = (Sid, Result<V, AckError>)> + FusedStream,
{
    let mut stream = Complete::new(stream);
    let mut answers = Vec::new();
    let drained = tokio::time::timeout(deadline, async {
        while let Some(item) = stream.next().await {
            answers.push(item);
        }
    })
    .await;
    AckCollection {
        answers,
        complete: drained.is_ok(),
    }
}

/// An ack stream that ends when its `is_terminated` says so, even if its `poll_next`
/// returned `Pending` (the stall described at the top of this file). Boxed because the
/// ack stream holds a timer and is not `Unpin`; one allocation per emit.
pub struct Complete<S> {
    inner: Pin<Box<S>>,
}

impl<S> Complete<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl<S: Stream + FusedStream> Stream for Complete<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.inner.is_terminated() {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            // The counts that finished it were consumed inside this very poll, so asking
            // now is enough: nothing is left that could wake us later.
            Poll::Pending if self.inner.is_terminated() => Poll::Ready(None),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    /// A stream that yields its items, then stays `Pending` forever while reporting
    /// itself terminated: the shape of the stalled remote ack stream.
    struct Stalls {
        items: Vec<(Sid, Result<u32, AckError>)>,
    }

    impl Stream for Stalls {
        type Item = (Sid, Result<u32, AckError>);
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.items.pop() {
                Some(item) => Poll::Ready(Some(item)),
                None => Poll::Pending,
            }
        }
    }

    impl FusedStream for Stalls {
        fn is_terminated(&self) -> bool {
            self.items.is_empty()
        }
    }

    #[tokio::test]
    async fn a_stalled_stream_ends_when_it_reports_termination() {
        let sid = Sid::new();
        let got = collect(
            Stalls {
                items: vec![(sid, Ok(7))],
            },
            Duration::from_secs(60),
        )
        .await;
        assert!(got.complete);
        assert_eq!(got.answers.len(), 1);
        assert!(matches!(got.answers[0], (s, Ok(7)) if s == sid));
    }

    #[tokio::test]
    async fn nothing_reached_is_an_empty_room() {
        let got = collect(Stalls { items: vec![] }, Duration::from_secs(60)).await;
        assert!(got.is_empty_room());
    }

    #[tokio::test]
    async fn a_stream_that_never_finishes_is_cut_at_the_deadline() {
        let pending = stream::pending::<(Sid, Result<u32, AckError>)>().fuse();
        let got = collect(pending, Duration::from_millis(20)).await;
        assert!(!got.complete);
        assert!(!got.is_empty_room());
    }
}
