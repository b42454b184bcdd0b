//! The one accept loop that every listener of the gateway uses (TLS, plain-HTTP redirect,
//! metrics): bind with a deep backlog, a connection limit taken before each accept, accept
//! errors retried with a pause where retrying at once would spin, connections spawned on
//! the caller's `TaskTracker`, and a stop on a `CancellationToken` so that shutdown can
//! drain every listener the same way.
//!
//! Plain-HTTP listeners (redirect, metrics) serve their connections with
//! [`serve_plain_http`], which finishes the request in flight on shutdown.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The listen backlog. A connect storm (a gateway restart, a site's network coming back)
/// brings thousands of SYNs at once; with tokio's default of 1024 the kernel drops the
/// excess and those clients wait for their SYN retransmission, 1 s and then 3 s later
/// (measured in BENCHMARKS.md). Linux caps it at net.core.somaxconn, 4096 by default
/// since 5.4.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Pause after an accept error that is not about one connection (EMFILE, ENFILE, ENOMEM
/// ...): retrying at once would spin on the same error (axum `serve::listener`,
/// `handle_accept_error`, waits the same second).
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Binds a listener with [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as `TcpListener::bind` sets).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long to wait before the next accept after `e`: nothing when the error concerns
/// only the connection being accepted (it was reset or aborted before we took it), a
/// pause otherwise (the process or the system is out of descriptors or memory).
pub fn accept_backoff(e: &io::Error) -> Option<Duration> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset => None,
        _ => Some(ACCEPT_ERROR_PAUSE),
    }
}

/// Accepts connections from `listener` until `shutdown` is cancelled and spawns
/// `handle(tcp, peer, permit)` for each on `tracker`. At most `max_connections` are served
/// at once: the permit is taken before the accept, so excess clients wait in the backlog,
/// and is released when the task drops it; `at_limit` is called each time the loop finds
/// every permit taken and has to wait. The listener is closed when this returns, so that
/// new clients are refused at once rather than left in the backlog.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    at_limit: impl Fn(),
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                at_limit();
                tokio::select! {
                    permit = limit.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break, // the semaphore is never closed
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if let Some(pause) = accept_backoff(&e) {
                        tracing::error!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; retrying after a pause");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        tracker.spawn(handle(tcp, peer, permit));
    }
}

/// Serves one plain-HTTP/1.1 connection with `service` until it ends; on `shutdown`, the
/// request in flight is finished and the connection closed.
pub async fn serve_plain_http<S, B>(
    tcp: TcpStream,
    service: S,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_errors_retry_at_once_and_exhaustion_pauses() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            assert_eq!(accept_backoff(&io::Error::from(kind)), None, "{kind:?}");
        }
        // EMFILE (24) and ENFILE (23): out of descriptors; ENOBUFS (105), ENOMEM (12).
        for errno in [24, 23, 105, 12] {
            assert_eq!(
                accept_backoff(&io::Error::from_raw_os_error(errno)),
                Some(ACCEPT_ERROR_PAUSE),
                "errno {errno}"
            );
        }
    }

    #[tokio::test]
    async fn the_loop_stops_on_shutdown_and_closes_its_port() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(
            listener,
            1,
            shutdown.clone(),
            tracker.clone(),
            || {},
            move |_tcp, peer, _permit| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(peer);
                }
            },
        ));
        let client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(rx.recv().await, Some(client.local_addr().unwrap()));
        shutdown.cancel();
        task.await.unwrap();
        tracker.close();
        tracker.wait().await;
        assert!(TcpStream::connect(addr).await.is_err(), "port still open");
    }
}
