//! The HTTP/1 server loop: what `axum::serve` does, plus read deadlines. `axum::serve`
//! gives hyper no timer, so hyper's header-read timeout never fires there: a client that
//! opens a connection and sends half a request head (or nothing after its last request)
//! holds it forever (helper-53's audit: a connection held for over 10 minutes). Here a
//! request head must arrive within [`Deadlines::head`] of the connection waiting for it,
//! which also closes a keep-alive connection idle that long; and a body within
//! [`Deadlines::body`] of its head ([`super::extract`] answers `408` otherwise).

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    response::Response,
};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long a request may take to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From the connection waiting for a request head (its first, or the next after an
    /// answer) to the head's last byte; then the connection closes.
    pub head: Duration,
    /// From the head to the body's last byte; then the request is answered `408`.
    pub body: Duration,
}

impl Default for Deadlines {
    /// 120 s for the head: hyper's deadline runs while a keep-alive connection waits for
    /// its next request too, so it is an idle timeout as well, and it must outlast the
    /// idle timeouts of clients' connection pools (Go's 90 s, Node's 4-5 s, httpx's 5 s):
    /// a pool that reuses a connection just as the server closes it loses that request
    /// (a `POST` is not retried). 10 s for a body of at most 64 KiB.
    fn default() -> Self {
        Self {
            head: Duration::from_secs(120),
            body: Duration::from_secs(10),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes: then it stops accepting, lets
/// every connection finish the request it is in (an idle one closes at once), and returns
/// when all have closed.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    deadlines: Deadlines,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (closing, closed) = tokio::sync::watch::channel(());
    let connections = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let body_deadline = deadlines.body;
        let service = TowerToHyperService::new(service.clone().map_request(move |req: Request<Incoming>| {
            req.map(|body| Body::new(DeadlineBody::new(body, body_deadline)))
        }));
        let mut closed = closed.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(deadlines.head);
            let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    return;
                }
                _ = closed.changed() => connection.as_mut().graceful_shutdown(),
            }
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error while closing");
            }
        });
    }
    drop(listener);
    drop(closing); // every connection's `closed.changed()` completes
    connections.close();
    connections.wait().await;
    Ok(())
}

/// As `axum::serve`: a connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors, say) is logged and the loop waits a second.
async fn accept_failed(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A request body that must have arrived by a deadline: past it, reading fails with
/// [`BodyDeadlineElapsed`]. The timer starts only when a read has to wait (a small body
/// usually comes with its head), so the usual request registers none.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, within: Duration) -> Self {
        Self {
            inner,
            deadline: Instant::now() + within,
            sleep: None,
        }
    }
}

/// A request body that had not arrived by its deadline ([`Deadlines::body`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyDeadlineElapsed;

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyDeadlineElapsed.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
