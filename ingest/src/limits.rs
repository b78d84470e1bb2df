//! What keeps bad clients from wedging the edge: at most `max_connections`
//! connections at once ([`CappedListener`]: the next one waits in the
//! kernel's backlog until one closes), a connection that sends nothing for
//! twice the request timeout is closed (idle keep-alive), a request head
//! not received within the request timeout closes its connection ([`serve`]:
//! a head trickled a byte at a time), and every request is answered within
//! `request_timeout_ms` ([`request_timeout`]: a body sent slowly, or a
//! handler stuck on a dependency, ends in a `408` problem document), so a
//! graceful shutdown never waits on a client for long.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::problem::Problem;

/// Serves `app` on `listener` until `shutdown`, then waits for the open
/// connections to finish what they are doing (each bounded in time). Each
/// request head must arrive within `head_timeout`: hyper enforces that only
/// with a timer, which `axum::serve` does not give it, so there a client
/// sending its head a byte at a time (never idle for long) would hold its
/// connection, and a graceful shutdown, for ever.
pub async fn serve(
    mut listener: CappedListener,
    app: axum::Router,
    head_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(head_timeout);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// A TCP listener that holds at most `max` connections open at once.
pub struct CappedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl CappedListener {
    /// At most `max` connections; each closed after `idle` without a byte
    /// from its client.
    pub fn new(listener: TcpListener, max: usize, idle: Duration) -> Self {
        Self { listener, slots: Arc::new(Semaphore::new(max.max(1))), idle }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Not accepted before a slot is free: the client waits in the
        // backlog instead of costing a task and buffers here.
        let permit = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let quiet = Box::pin(tokio::time::sleep(self.idle));
        (CappedStream { stream, _slot: permit, idle: self.idle, quiet }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection holding its slot until it closes.
pub struct CappedStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    /// Fires when the client has sent nothing for `idle`.
    quiet: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for CappedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let deadline = tokio::time::Instant::now() + self.idle;
                    self.quiet.as_mut().reset(deadline);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.quiet.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Answers `408` when a request (its body included) is not handled within
/// the limit.
pub async fn request_timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request timeout",
            format!("the request was not received and handled within {} ms", limit.as_millis()),
        )
        .into_response(),
    }
}
