//! The worker's bounds on what clients can hold: connections, handshakes, request bodies and the
//! one proving slot, so that memory and descriptors depend on configuration, not on clients.
//!
//! - [`incoming`] accepts connections: a connection must send its first byte within
//!   `handshake_timeout`; at most `max_connections` wait for that (a new one pushes out the
//!   oldest waiting) and at most `max_connections` are served; past [`EVICTING`] pushed-out ones
//!   not closed yet, a new connection is closed at once, so descriptors stay within
//!   `2 × max_connections + EVICTING`; accept errors (out of descriptors) pause the loop instead
//!   of spinning.
//! - [`AdmissionLayer`] sits in front of every service: a `Prove` call that finds the slot free
//!   takes it with it ([`Admission`]); one that finds a proof running takes one of
//!   [`MAX_JOINERS`] places, whose body is read only to learn whether it is the same request
//!   (then it joins that proof); any other is answered `RESOURCE_EXHAUSTED` from its headers,
//!   before its body is read. Every request body must arrive whole within `request_timeout`.
//! - HTTP/2 itself is bounded in [`super::serve`]: streams per connection, windows, keepalive.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info};

use super::{Worker, WorkerError};
use crate::config::Bounds;
use crate::daemon::{ACCEPT_ERRORS_LOGGED_EVERY, pause_accepting};
use crate::telemetry::LogEvery;
use crate::tls::{MaybeTls, Refusals, ServerTlsCell};
use crate::wire::{H2_PREFACE, PROVE_PATH};

// CONNECTIONS
// ================================================================================================

/// Bytes a connection must send within `handshake_timeout` to be served on: the HTTP/2
/// connection preface, shorter than an HTTP/1.1 request line for gRPC-web.
const HANDSHAKE_BYTES: usize = H2_PREFACE.len();

/// Connections pushed out of the handshake queue and not closed yet, at most: beyond, a new
/// connection is closed at once.
pub const EVICTING: usize = 16;

/// A served connection; its permit counts it against `max_connections` until it closes. Until
/// it has sent [`HANDSHAKE_BYTES`] (after TLS's own handshake, when the port serves TLS), reads
/// fail once `handshake_timeout` has passed, so one byte and silence do not hold a served
/// connection.
pub struct Conn {
    stream: MaybeTls,
    _permit: OwnedSemaphorePermit,
    /// Its place among every connection the worker holds ([`EVICTING`]).
    _live: OwnedSemaphorePermit,
    handshake: Option<(usize, Pin<Box<Sleep>>)>,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.tcp().connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((seen, deadline)) = &mut this.handshake {
            *seen += buf.filled().len() - before;
            if *seen >= HANDSHAKE_BYTES {
                this.handshake = None;
            } else if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection did not complete its handshake within handshake_timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
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

/// The connections of `listener` that sent their first byte in time, within `bounds`, with the
/// TLS that `tls` holds when each is accepted. The accept loop ends when the returned stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    bounds: Bounds,
    tls: ServerTlsCell,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(bounds.max_connections.max(1));
    tokio::spawn(accept_loop(listener, bounds, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    bounds: Bounds,
    tls: ServerTlsCell,
    served: mpsc::Sender<std::io::Result<Conn>>,
) {
    let open = Arc::new(Semaphore::new(bounds.max_connections));
    // Served, waiting, and pushed out but not closed yet: a pushed-out connection holds its
    // descriptor until its task runs, and on a starved machine those tasks lag this loop.
    let live = Arc::new(Semaphore::new(2 * bounds.max_connections + EVICTING));
    // Connections still waiting for their first byte, oldest first, each with its eviction.
    let mut waiting: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    let refusals = Arc::new(Refusals::default());
    let accept_errors = LogEvery::new(ACCEPT_ERRORS_LOGGED_EVERY);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = served.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                pause_accepting(&err, &accept_errors).await;
                continue;
            }
        };
        let Ok(place) = Arc::clone(&live).try_acquire_owned() else {
            debug!("closing a new connection: {EVICTING} pushed-out ones are still closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        waiting.retain(|evict| !evict.is_closed());
        if waiting.len() >= bounds.max_connections
            && let Some(oldest) = waiting.pop_front()
        {
            let _ = oldest.send(());
        }
        let (evict, evicted) = oneshot::channel();
        waiting.push_back(evict);
        let open = Arc::clone(&open);
        let admission = Admit { peer, evicted, open, place, refusals: Arc::clone(&refusals) };
        tokio::spawn(admit(stream, admission, bounds, tls.current(), served.clone()));
    }
}

/// Serves `stream` once it has sent a byte (and, over TLS, completed its handshake) within
/// `handshake_timeout` and a place among `max_connections` is free; drops it otherwise, or when
/// `evicted` for a newer connection while silent.
async fn admit(
    stream: tokio::net::TcpStream,
    Admit { peer, evicted, open, place, refusals }: Admit,
    bounds: Bounds,
    tls: Option<crate::tls::ServerTls>,
    served: mpsc::Sender<std::io::Result<Conn>>,
) {
    let deadline = tokio::time::Instant::now() + bounds.handshake_timeout;
    let mut first = [0u8; 1];
    tokio::select! {
        first = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => {
            if !matches!(first, Ok(Ok(1..))) {
                debug!("closing a connection that sent nothing within handshake_timeout");
                return;
            }
        }
        _ = evicted => {
            debug!("closing a silent connection to make room for a newer one");
            return;
        }
    }
    let Ok(permit) = open.try_acquire_owned() else {
        debug!(
            max_connections = bounds.max_connections,
            "refusing a connection: max_connections are open"
        );
        return;
    };
    let stream = match tls {
        None => MaybeTls::Plain(stream),
        Some(tls) => match tls.accept(stream, deadline).await {
            Ok(stream) => MaybeTls::Tls(Box::new(stream)),
            Err(err) => {
                refusals.refused(peer, &err);
                return;
            }
        },
    };
    let handshake = Some((0, Box::pin(tokio::time::sleep_until(deadline))));
    let _ = served.send(Ok(Conn { stream, _permit: permit, _live: place, handshake })).await;
}

/// What a new connection holds while it is admitted.
struct Admit {
    /// Who connected.
    peer: std::net::SocketAddr,
    /// Fires when a newer connection pushes this one out.
    evicted: oneshot::Receiver<()>,
    /// The places among `max_connections` served.
    open: Arc<Semaphore>,
    /// Its place among all the connections held.
    place: OwnedSemaphorePermit,
    /// The listener's refused TLS handshakes, for their log lines.
    refusals: Arc<Refusals>,
}

// REQUESTS
// ================================================================================================

/// `Prove` calls admitted while a proof runs, to learn whether they ask for that same proof (or a
/// kept one): each may hold a body of up to `max_request_size` for up to `request_timeout`, so
/// this bounds what a busy worker buffers. Beyond it a busy worker answers from the headers.
pub const MAX_JOINERS: usize = 4;

/// What a `Prove` call was admitted with when its headers arrived.
pub enum Admitted {
    /// The proving slot: this call proves (or finds its proof kept).
    Slot(OwnedSemaphorePermit),
    /// A joiner's place: this call may only join the running proof or find a kept one.
    Joiner(OwnedSemaphorePermit),
}

/// The admission of a `Prove` call, handed to the handler in the request's extensions.
/// (Extensions must be `Clone`, hence the shared cell.)
#[derive(Clone)]
pub struct Admission(Arc<Mutex<Option<Admitted>>>);

impl Admission {
    /// The admission, once.
    pub fn take(self) -> Option<Admitted> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Applies [`Bounds`] to every request before a service reads it.
#[derive(Clone)]
pub struct AdmissionLayer {
    worker: Worker,
}

impl AdmissionLayer {
    /// Admission to `worker`.
    pub fn new(worker: Worker) -> Self {
        AdmissionLayer { worker }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService { inner, worker: self.worker.clone() }
    }
}

/// See [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    worker: Worker,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for AdmissionService<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let bounds = self.worker.inner.bounds;
        let (mut parts, body) = request.into_parts();
        if parts.uri.path() == PROVE_PATH {
            let admitted = if let Some(slot) = self.worker.try_admit() {
                Admitted::Slot(slot)
            } else if let Some(place) = self.worker.try_join() {
                Admitted::Joiner(place)
            } else {
                // Debug only: a flood of these must not become a flood of log lines.
                debug!(outcome = "busy", "request refused before its body was read");
                let status = WorkerError::Busy.into_status();
                return Box::pin(async move { Ok(status.into_http()) });
            };
            parts.extensions.insert(Admission(Arc::new(Mutex::new(Some(admitted)))));
        }
        let body = tonic::body::Body::new(Deadline::new(body, bounds.request_timeout));
        let request = http::Request::from_parts(parts, body);
        // The inner service was polled ready; the clone takes its place (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await })
    }
}

/// A request body that fails when it has not ended by its deadline.
struct Deadline {
    inner: tonic::body::Body,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(inner: tonic::body::Body, timeout: Duration) -> Self {
        Deadline { inner, timeout, sleep: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let err = WorkerError::RequestTimeout(self.timeout);
                info!(outcome = err.outcome(), "request refused: {err}");
                Poll::Ready(Some(Err(err.into_status())))
            }
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
