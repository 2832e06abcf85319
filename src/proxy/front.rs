//! The HTTP front end on Pingora: gRPC over HTTP/2 and gRPC-web (HTTP/1.1 or HTTP/2, with CORS
//! preflight) on the main port, in cleartext or over TLS (`tls_cert_file`, ALPN naming the
//! protocol; [`super::tls_stream`]), JSON `GET /status` on the status port and Prometheus
//! `GET /metrics` on the metrics port.
//!
//! Pingora parses HTTP; our code answers every request itself (it keeps the whole body so a
//! request can be retried on another worker) and writes gRPC trailers — or, for gRPC-web, the
//! trailer frame in the body. Listeners are bound by the daemon and handed in, so a taken port
//! is an error at start, not a silent wait.
//!
//! Before Pingora sees a connection, it takes a place among the open connections
//! ([`super::bounds::Connections`]), on the main port gives up its PROXY protocol header if it
//! comes from a trusted forwarder and `proxy_protocol` is on ([`super::proxy_protocol`]), and
//! must show its protocol within `handshake_timeout`: the
//! 24-byte HTTP/2 preface, or any other first bytes for HTTP/1 (so a short HTTP/1.0 request is
//! answered, not held waiting for 24 bytes). A `Prove` call is admitted from its headers (rate
//! limit, queue room), then from its gRPC prefix (size, compression, the bytes budget), and only
//! then is its body read, whole within `request_timeout`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use pingora_core::apps::{
    HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream,
};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::bounds::{Reservation, Slot};
use super::error::ProxyError;
use super::proxy_protocol;
use super::tls_stream::TlsConnection;
use super::{Proxy, RequestMeta};
use crate::config::ClientBounds;
use crate::daemon::{ACCEPT_ERRORS_LOGGED_EVERY, pause_accepting};
use crate::telemetry::LogEvery;
use crate::tls::{Refusals, ServerTls};
use crate::wire::{H2_PREFACE, MAX_META_HEADER, PROVE_PATH, PROXY_WINDOW, SMALL_MESSAGE};

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// gRPC and gRPC-web: `Api/Prove`, `ProxyStatusApi/Status`, `grpc.health.v1.Health/Check`.
    Grpc,
    /// `GET /status` (JSON).
    Status,
    /// `GET /metrics` (Prometheus text).
    Metrics,
}

/// One listener's HTTP application.
pub struct Front {
    proxy: Arc<Proxy>,
    role: Role,
    /// Cleared at shutdown: health turns `NOT_SERVING`, new calls get `UNAVAILABLE`.
    serving: Arc<AtomicBool>,
    /// Refused TLS handshakes, for their log lines.
    refusals: Refusals,
}

/// Accepts connections on `listener` until `shutdown` turns true; HTTP/1.1 and h2c share it.
pub async fn serve(
    proxy: Arc<Proxy>,
    role: Role,
    listener: TcpListener,
    serving: Arc<AtomicBool>,
    shutdown: ShutdownWatch,
) {
    let front = Arc::new(Front { proxy, role, serving, refusals: Refusals::default() });
    let mut stop = shutdown.clone();
    // Connections are tracked so that a stopping proxy returns only once every answer is out.
    let mut connections = tokio::task::JoinSet::new();
    let accept_errors = LogEvery::new(ACCEPT_ERRORS_LOGGED_EVERY);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                pause_accepting(&err, &accept_errors).await;
                continue;
            }
        };
        let live = front.proxy.live();
        let bounds = live.client_bounds;
        let client = front.proxy.client_key(peer.ip());
        let exempt = front.proxy.is_forwarder(peer.ip());
        let proxy_protocol = exempt && live.proxy_protocol && front.role == Role::Grpc;
        let slot = match front.proxy.connections().open(client, exempt, &bounds) {
            Ok(slot) => slot,
            Err(refused) => {
                debug!(%peer, "closing a new connection at once: {refused}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = if front.role == Role::Grpc { live.tls } else { None };
        let accepted = Accepted { slot, tcp, peer, proxy_protocol, bounds, tls };
        connections.spawn(run_connection(Arc::clone(&front), accepted, shutdown.clone()));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// A connection that has its place among the open connections.
struct Accepted {
    slot: Slot,
    tcp: TcpStream,
    peer: SocketAddr,
    /// Whether it begins with a PROXY protocol header (a trusted forwarder, the option on).
    proxy_protocol: bool,
    bounds: ClientBounds,
    /// The TLS it is served with (the main port's certificate as of its accept), if any.
    tls: Option<ServerTls>,
}

/// Serves one connection: its PROXY protocol header, its handshake, then Pingora's HTTP.
async fn run_connection(front: Arc<Front>, accepted: Accepted, shutdown: ShutdownWatch) {
    let Accepted { mut slot, mut tcp, mut peer, proxy_protocol, bounds, tls } = accepted;
    if proxy_protocol {
        match proxy_protocol::read_header(&mut tcp, bounds.handshake_timeout).await {
            Ok(proxy_protocol::Header::Forwarded(client)) => peer = client,
            Ok(proxy_protocol::Header::Local) => {}
            Err(err) => {
                debug!(%peer, "closing a connection from a trusted forwarder: {err}");
                return;
            }
        }
    }
    let (stream, h2c): (pingora_core::protocols::Stream, bool) = match tls {
        None => {
            let Some(h2) = handshake(&tcp, &mut slot, bounds.handshake_timeout).await else {
                return;
            };
            (Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp)), h2)
        }
        // ALPN names the protocol (Pingora reads it from the stream).
        Some(tls) => {
            let handshake = tls_handshake(&tls, tcp, &mut slot, bounds.handshake_timeout);
            let stream = match handshake.await {
                Ok(Some(stream)) => stream,
                Ok(None) => return,
                Err(reason) => {
                    front.refusals.refused(peer, &reason);
                    return;
                }
            };
            (Box::new(TlsConnection(Box::new(stream))), false)
        }
    };
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    options.h2_idle_timeout = Some(bounds.idle_timeout);
    let connection = Arc::new(Connection { front, peer, options, _slot: slot });
    pingora_core::apps::ServerApp::process_new(&connection, stream, &shutdown).await;
}

/// Completes a TLS handshake within `timeout`; `None` when the connection was evicted for a
/// newer one meanwhile, the reason when the handshake failed or took too long.
async fn tls_handshake(
    tls: &ServerTls,
    tcp: TcpStream,
    slot: &mut Slot,
    timeout: Duration,
) -> Result<Option<tokio_rustls::server::TlsStream<TcpStream>>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let Some(evicted) = slot.evicted.take() else { return Ok(None) };
    let stream = tokio::select! {
        accepted = tls.accept(tcp, deadline) => accepted,
        _ = evicted => {
            debug!("closing a connection still in its TLS handshake to make room for a newer one");
            return Ok(None);
        }
    }?;
    slot.handshake_done();
    Ok(Some(stream))
}

/// Waits until a connection shows its protocol: `Some(true)` for the HTTP/2 preface,
/// `Some(false)` for other first bytes (HTTP/1); `None` when it closed, stayed silent past
/// `timeout`, or was evicted for a newer connection meanwhile.
async fn handshake(tcp: &TcpStream, slot: &mut Slot, timeout: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut evicted = slot.evicted.take()?;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    let h2 = loop {
        let peeked = tokio::select! {
            peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)) => peeked,
            _ = &mut evicted => {
                debug!("closing a connection still in its handshake to make room for a newer one");
                return None;
            }
        };
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            Ok(_) => return None,
            Err(_) => {
                debug!(
                    "closing a connection that did not show its protocol within handshake_timeout"
                );
                return None;
            }
        };
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
        // Part of the preface: the rest is on its way (peek returns at once while bytes wait).
        if tokio::time::Instant::now() + pause >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    };
    slot.handshake_done();
    Some(h2)
}

/// A connection: the app, the client's address (the rate limit's key), the protocol it showed,
/// and its place among the open connections.
struct Connection {
    front: Arc<Front>,
    peer: SocketAddr,
    options: HttpServerOptions,
    _slot: Slot,
}

#[async_trait]
impl HttpServerApp for Connection {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Every HTTP/1 request's headers within handshake_timeout (Pingora's own timeout is per
        // read, so a byte a minute would hold the connection forever).
        let timeout = self.front.proxy.live().client_bounds.handshake_timeout;
        if !matches!(tokio::time::timeout(timeout, session.read_request()).await, Ok(Ok(true))) {
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let completed = match self.front.role {
            Role::Grpc => self.grpc(&mut session).await,
            Role::Status => {
                let json = self.front.proxy.status_json();
                plain(&mut session, "/status", "application/json", json).await
            }
            Role::Metrics => {
                self.front.proxy.update_gauges();
                let proxy = &self.front.proxy;
                let mut text = proxy.metrics.render();
                // Upstream's names as well, for the dashboards built on them.
                if session.req_header().uri.query() == Some("names=upstream") {
                    text.push_str(&proxy.metrics.render_upstream(&proxy.pool().snapshot()));
                }
                plain(&mut session, "/metrics", "text/plain; version=0.0.4", text).await
            }
        };
        if !completed {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    /// Pingora's bounded defaults plus flow-control windows that fit a whole request: with
    /// HTTP/2's 64 KiB default a 170 KB batch waits for `WINDOW_UPDATE` round trips.
    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        let mut options = pingora_core::protocols::http::v2::server::default_h2_options();
        options.initial_window_size(PROXY_WINDOW).initial_connection_window_size(PROXY_WINDOW);
        Some(options)
    }
}

impl Connection {
    /// Answers one gRPC or gRPC-web call; false when the connection cannot be reused.
    async fn grpc(&self, session: &mut ServerSession) -> bool {
        let header = session.req_header();
        let path = header.uri.path().to_owned();
        let content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if header.method == http::Method::OPTIONS {
            return cors_preflight(session).await;
        }
        let web = content_type.starts_with("application/grpc-web");
        if content_type.starts_with("application/grpc-web-text") {
            return respond(session, true, Err(ProxyError::GrpcWebText)).await;
        }
        if !content_type.starts_with("application/grpc") {
            return plain_status(session, 415, "expected a gRPC or gRPC-web request\n").await;
        }
        if path == PROVE_PATH {
            self.prove_call(session, web).await
        } else {
            self.small_call(session, web, &path).await
        }
    }

    /// Answers a `Prove` call: admitted from its headers, then from its gRPC prefix, then
    /// proved; the answer is written unless the client reset the stream meanwhile.
    async fn prove_call(&self, session: &mut ServerSession, web: bool) -> bool {
        let proxy = &self.front.proxy;
        let bounds = proxy.live().client_bounds;
        let meta = request_meta(session);
        let forwarded_for = session
            .get_header("x-forwarded-for")
            .filter(|v| v.len() <= MAX_META_HEADER)
            .and_then(|v| v.to_str().ok());
        let client = proxy.client_address(self.peer.ip(), forwarded_for);
        // From the headers alone: rate limit and queue room, then whether the proxy takes
        // requests at all. The admission is held until the answer is written: a stopping proxy
        // waits for it.
        if let Err(err) = proxy.admit_call(client) {
            return refuse_unread(session, web, err).await;
        }
        let admission = match proxy.pool().admit() {
            Ok(admission) => admission,
            Err(err) => return refuse_unread(session, web, err.into()).await,
        };
        let key = proxy.client_key(client);
        let budget = Arc::clone(proxy.budget());
        let reserve =
            |bytes| -> Result<_, ProxyError> { Ok(Some(budget.reserve(key, bytes, &bounds)?)) };
        let (message, reservation) =
            match read_message(session, bounds.max_request_size, bounds.request_timeout, reserve)
                .await
            {
                Ok(read) => read,
                Err(err) => return refuse_unread(session, web, err).await,
            };
        let prove = proxy.prove(message, Some(client), meta);
        let answer = if let Some(closed) = session.watch_h2_stream_close() {
            tokio::select! {
                answer = prove => answer,
                // The client reset the stream: dropping `prove` leaves the queue, or holds a
                // proving worker's lease until it is idle; nobody is left to answer.
                _ = closed => return false,
            }
        } else {
            prove.await
        };
        let written = respond(session, web, answer).await;
        drop((admission, reservation));
        written
    }

    /// Answers a status or health call (or an unknown method): small messages, no budget.
    async fn small_call(&self, session: &mut ServerSession, web: bool, path: &str) -> bool {
        let timeout = self.front.proxy.live().client_bounds.request_timeout;
        let message = read_message(session, SMALL_MESSAGE, timeout, |_| Ok(None)).await;
        let answer = message.and_then(|_| self.small_answer(path));
        respond(session, web, answer).await
    }

    /// The answer to a status or health call (or to an unknown method).
    fn small_answer(&self, path: &str) -> Result<Bytes, ProxyError> {
        let proxy = &self.front.proxy;
        match path {
            "/remote_prover.ProxyStatusApi/Status" => Ok(proxy.status().encode_to_vec().into()),
            "/grpc.health.v1.Health/Check" => {
                use tonic_health::pb::health_check_response::ServingStatus;
                let serving = self.front.serving.load(Ordering::SeqCst);
                let status =
                    if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
                Ok(tonic_health::pb::HealthCheckResponse { status: status.into() }
                    .encode_to_vec()
                    .into())
            }
            _ => Err(ProxyError::UnknownMethod(path.to_owned())),
        }
    }
}

/// The trace headers and deadline a `Prove` call brings.
fn request_meta(session: &ServerSession) -> RequestMeta {
    RequestMeta {
        traceparent: text_header(session, "traceparent"),
        tracestate: text_header(session, "tracestate"),
        request_id: text_header(session, "x-request-id"),
        deadline: text_header(session, "grpc-timeout")
            .and_then(|value| grpc_timeout(&value))
            .and_then(|timeout| std::time::Instant::now().checked_add(answer_within(timeout))),
    }
}

/// Answers a call whose body was not (wholly) read; an HTTP/1 connection is then closed, as
/// what is left of the body would read as the next request.
async fn refuse_unread(session: &mut ServerSession, web: bool, err: ProxyError) -> bool {
    session.set_keepalive(None);
    respond(session, web, Err(err)).await;
    false
}

fn text_header(session: &ServerSession, name: &str) -> Option<String> {
    let value = session.get_header(name)?;
    if value.len() > MAX_META_HEADER {
        debug!(header = name, bytes = value.len(), "dropped an overlong header");
        return None;
    }
    value.to_str().ok().map(str::to_owned)
}

/// A `grpc-timeout` header's duration: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`);
/// `None` for anything else (the call then has no deadline of its own).
fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long the proxy waits for a proof of a call with this `grpc-timeout`: a little less (a
/// tenth, at most 250 ms), so that its `DEADLINE_EXCEEDED`, which tells the client to ask again,
/// arrives before the client's own timer ends the call with a bare "Timeout expired".
fn answer_within(timeout: std::time::Duration) -> std::time::Duration {
    timeout.saturating_sub((timeout / 10).min(std::time::Duration::from_millis(250)))
}

/// Reads a call's single gRPC message (5-byte prefix: flag, big-endian length). What the prefix
/// (or an HTTP/1 `Content-Length`) announces is checked as soon as it arrives: more than `max`
/// bytes or a compressed message is refused before the rest is read, and `reserve` is asked for
/// room for the whole message first. The body must arrive whole within `timeout`.
async fn read_message(
    session: &mut ServerSession,
    max: usize,
    timeout: Duration,
    reserve: impl FnMut(usize) -> Result<Option<Reservation>, ProxyError>,
) -> Result<(Bytes, Option<Reservation>), ProxyError> {
    let content_length = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = content_length
        && length > max + 5
    {
        return Err(ProxyError::TooLarge { len: length.saturating_sub(5), max });
    }
    tokio::time::timeout(timeout, read_body(session, max, reserve))
        .await
        .unwrap_or_else(|_| Err(ProxyError::BodyTimeout(timeout)))
}

/// The reading of [`read_message`], without its time limit.
async fn read_body(
    session: &mut ServerSession,
    max: usize,
    mut reserve: impl FnMut(usize) -> Result<Option<Reservation>, ProxyError>,
) -> Result<(Bytes, Option<Reservation>), ProxyError> {
    let mut body = BytesMut::new();
    let mut announced = None;
    let mut reservation = None;
    while let Some(chunk) = session.read_request_body().await.map_err(ProxyError::ReadBody)? {
        if body.len() + chunk.len() > 5 + announced.unwrap_or(max) {
            return Err(match announced {
                Some(len) => ProxyError::FrameOverrun(len),
                None => ProxyError::TooLarge { len: body.len() + chunk.len() - 5, max },
            });
        }
        body.extend_from_slice(&chunk);
        if announced.is_none() && body.len() >= 5 {
            if body[0] != 0 {
                return Err(ProxyError::Compressed);
            }
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            if len > max {
                return Err(ProxyError::TooLarge { len, max });
            }
            reservation = reserve(len)?;
            body.reserve(5 + len - body.len());
            announced = Some(len);
            if body.len() > 5 + len {
                return Err(ProxyError::FrameOverrun(len));
            }
        }
    }
    let Some(len) = announced else {
        return Err(ProxyError::NoFrame);
    };
    if body.len() != 5 + len {
        return Err(ProxyError::FrameShort { announced: len, arrived: body.len() - 5 });
    }
    Ok((body.freeze().slice(5..), reservation))
}

/// The 5-byte gRPC message prefix: flag, big-endian length.
fn prefix(flag: u8, data: &[u8]) -> [u8; 5] {
    let len = u32::try_from(data.len()).expect("messages are bounded by MAX_MESSAGE_SIZE");
    let [a, b, c, d] = len.to_be_bytes();
    [flag, a, b, c, d]
}

/// Writes a gRPC answer: data frame and `grpc-status` trailers (HTTP/2), or for gRPC-web the data
/// frame and a trailer frame in the body.
async fn respond(
    session: &mut ServerSession,
    web: bool,
    answer: Result<Bytes, ProxyError>,
) -> bool {
    let (code, message, data) = match answer {
        Ok(data) => (0, String::new(), Some(data)),
        Err(err) => {
            let status = err.into_status();
            (status.code() as i32, status.message().to_owned(), None)
        }
    };
    let write = async {
        let mut header = ResponseHeader::build(200, None)?;
        if web {
            header.insert_header("content-type", "application/grpc-web+proto")?;
            header.insert_header("access-control-allow-origin", "*")?;
            header.insert_header("access-control-expose-headers", "grpc-status,grpc-message")?;
            let body = web_body(data.as_ref(), code, &message);
            header.insert_header("content-length", body.len().to_string())?;
            session.write_response_header(Box::new(header)).await?;
            session.write_response_body(body.freeze(), true).await?;
        } else {
            header.insert_header("content-type", "application/grpc")?;
            session.write_response_header(Box::new(header)).await?;
            if let Some(data) = data {
                // Prefix and message as two writes: the proof is not copied again.
                let head = Bytes::copy_from_slice(&prefix(0, &data));
                session.write_response_body(head, false).await?;
                session.write_response_body(data, false).await?;
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.into());
            if !message.is_empty()
                && let Ok(value) = percent_encode(&message).parse()
            {
                trailers.insert("grpc-message", value);
            }
            session.write_response_trailers(trailers).await?;
        }
        session.finish_body().await?;
        Ok::<(), Box<pingora_core::Error>>(())
    };
    match write.await {
        Ok(()) => true,
        Err(err) => {
            debug!(%err, "writing the answer failed (client gone?)");
            false
        }
    }
}

/// A gRPC-web answer's body: the data frame, if any, then the trailers as a frame of their own.
fn web_body(data: Option<&Bytes>, code: i32, message: &str) -> BytesMut {
    let mut body = BytesMut::new();
    if let Some(data) = data {
        body.extend_from_slice(&prefix(0, data));
        body.extend_from_slice(data);
    }
    let mut trailers = format!("grpc-status:{code}\r\n");
    if !message.is_empty() {
        let _ = write!(trailers, "grpc-message:{}\r\n", percent_encode(message));
    }
    body.extend_from_slice(&prefix(0x80, trailers.as_bytes()));
    body.extend_from_slice(trailers.as_bytes());
    body
}

/// Percent-encodes a `grpc-message` (the gRPC spec: everything outside printable ASCII and `%`).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

async fn cors_preflight(session: &mut ServerSession) -> bool {
    let write = async {
        let mut header = ResponseHeader::build(204, None)?;
        header.insert_header("access-control-allow-origin", "*")?;
        header.insert_header("access-control-allow-methods", "POST, OPTIONS")?;
        header.insert_header(
            "access-control-allow-headers",
            "content-type, x-grpc-web, x-user-agent, grpc-timeout, traceparent, tracestate, x-request-id",
        )?;
        header.insert_header("access-control-max-age", "86400")?;
        header.insert_header("content-length", "0")?;
        session.write_response_header(Box::new(header)).await?;
        session.write_response_body(Bytes::new(), true).await?;
        session.finish_body().await?;
        Ok::<(), Box<pingora_core::Error>>(())
    };
    write.await.is_ok()
}

/// Serves `body` at `path` for GET; 404 elsewhere.
async fn plain(session: &mut ServerSession, path: &str, content_type: &str, body: String) -> bool {
    let header = session.req_header();
    if header.method != http::Method::GET || header.uri.path() != path {
        return plain_status(session, 404, "not found\n").await;
    }
    let write = async {
        let mut header = ResponseHeader::build(200, None)?;
        header.insert_header("content-type", content_type)?;
        header.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(header)).await?;
        session.write_response_body(Bytes::from(body), true).await?;
        session.finish_body().await?;
        Ok::<(), Box<pingora_core::Error>>(())
    };
    write.await.is_ok()
}

async fn plain_status(session: &mut ServerSession, code: u16, text: &'static str) -> bool {
    let write = async {
        let mut header = ResponseHeader::build(code, None)?;
        header.insert_header("content-type", "text/plain")?;
        header.insert_header("content-length", text.len().to_string())?;
        session.write_response_header(Box::new(header)).await?;
        session.write_response_body(Bytes::from_static(text.as_bytes()), true).await?;
        session.finish_body().await?;
        Ok::<(), Box<pingora_core::Error>>(())
    };
    write.await.is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::grpc_timeout;

    #[test]
    fn grpc_timeout_headers_parse_as_the_grpc_spec_says() {
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        for bad in ["", "S", "123456789S", "10s", "-1S", "1.5S", "10", "1é"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(super::answer_within(Duration::from_secs(10)), Duration::from_millis(9750));
        assert_eq!(super::answer_within(Duration::from_secs(1)), Duration::from_millis(900));
    }
}
