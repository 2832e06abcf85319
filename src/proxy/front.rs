//! The HTTP front end on Pingora: gRPC over cleartext HTTP/2 and gRPC-web (HTTP/1.1 or HTTP/2,
//! with CORS preflight) on the main port, JSON `GET /status` on the status port and Prometheus
//! `GET /metrics` on the metrics port.
//!
//! Pingora parses HTTP; our code answers every request itself (it keeps the whole body so a
//! request can be retried on another worker) and writes gRPC trailers — or, for gRPC-web, the
//! trailer frame in the body. Listeners are bound by the daemon and handed in, so a taken port
//! is an error at start, not a silent wait.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
use tokio::net::TcpListener;
use tonic::Status;
use tracing::debug;

use super::{Proxy, RequestMeta};
use crate::worker::MAX_MESSAGE_SIZE;

/// HTTP/2 flow-control window for streams and connections.
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;

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
    options: HttpServerOptions,
    /// Cleared at shutdown: health turns `NOT_SERVING`, new calls get `UNAVAILABLE`.
    serving: Arc<AtomicBool>,
}

/// Accepts connections on `listener` until `shutdown` turns true; HTTP/1.1 and h2c share it.
pub async fn serve(
    proxy: Arc<Proxy>,
    role: Role,
    listener: TcpListener,
    serving: Arc<AtomicBool>,
    shutdown: ShutdownWatch,
) {
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    let front = Arc::new(Front { proxy, role, options, serving });
    let mut stop = shutdown.clone();
    // Connections are tracked so that a stopping proxy returns only once every answer is out.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    debug!(%err, "accept failed");
                    continue;
                },
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let _ = tcp.set_nodelay(true);
        let connection = Arc::new(Connection { front: Arc::clone(&front), peer });
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let stream: pingora_core::protocols::Stream =
                Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
            pingora_core::apps::ServerApp::process_new(&connection, stream, &shutdown).await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// A connection: the app plus the client's address (the rate limit's key).
struct Connection {
    front: Arc<Front>,
    peer: SocketAddr,
}

#[async_trait]
impl HttpServerApp for Connection {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let completed = match self.front.role {
            Role::Grpc => self.grpc(&mut session).await,
            Role::Status => {
                let json = self.front.proxy.status_json().to_string();
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
        Some(&self.front.options)
    }

    /// Pingora's bounded defaults plus flow-control windows that fit a whole request: with
    /// HTTP/2's 64 KiB default a 170 KB batch waits for `WINDOW_UPDATE` round trips.
    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        let mut options = pingora_core::protocols::http::v2::server::default_h2_options();
        options.initial_window_size(WINDOW_SIZE).initial_connection_window_size(WINDOW_SIZE);
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
            let status = Status::unimplemented(
                "grpc-web-text is not supported; use application/grpc-web+proto",
            );
            return respond(session, true, Err(status)).await;
        }
        if !content_type.starts_with("application/grpc") {
            return plain_status(session, 415, "expected a gRPC or gRPC-web request\n").await;
        }
        let meta = RequestMeta {
            traceparent: text_header(session, "traceparent"),
            tracestate: text_header(session, "tracestate"),
            request_id: text_header(session, "x-request-id"),
        };
        let message = match read_message(session).await {
            Ok(message) => message,
            Err(status) => return respond(session, web, Err(status)).await,
        };
        let proxy = &self.front.proxy;
        let serving = self.front.serving.load(Ordering::SeqCst);
        let answer = match path.as_str() {
            "/remote_prover.Api/Prove" => {
                // Held until the answer is written: a stopping proxy waits for it.
                let admission = match proxy.pool().admit() {
                    Ok(admission) => admission,
                    Err(err) => {
                        return respond(session, web, Err(Status::unavailable(err.to_string())))
                            .await;
                    }
                };
                let ip = Some(self.peer.ip());
                let prove = proxy.prove(message, ip, meta);
                let answer = if let Some(closed) = session.watch_h2_stream_close() {
                    tokio::select! {
                        answer = prove => answer,
                        // The client reset the stream: dropping `prove` leaves the queue, or
                        // holds a proving worker's lease until it is idle; nobody is left to
                        // answer.
                        _ = closed => return false,
                    }
                } else {
                    prove.await
                };
                let written = respond(session, web, answer).await;
                drop(admission);
                return written;
            }
            "/remote_prover.ProxyStatusApi/Status" => Ok(proxy.status().encode_to_vec().into()),
            "/grpc.health.v1.Health/Check" => {
                use tonic_health::pb::health_check_response::ServingStatus;
                let status =
                    if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
                Ok(tonic_health::pb::HealthCheckResponse { status: status.into() }
                    .encode_to_vec()
                    .into())
            }
            _ => Err(Status::unimplemented(format!("unknown method {path}"))),
        };
        respond(session, web, answer).await
    }
}

fn text_header(session: &ServerSession, name: &str) -> Option<String> {
    session.get_header(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Reads the whole body and unwraps its single gRPC message (5-byte prefix: flag, length).
async fn read_message(session: &mut ServerSession) -> Result<Bytes, Status> {
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_MESSAGE_SIZE + 5 {
                    return Err(Status::resource_exhausted(format!(
                        "the request is larger than {MAX_MESSAGE_SIZE} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(err) => {
                return Err(Status::cancelled(format!("reading the request failed: {err}")));
            }
        }
    }
    if body.len() < 5 {
        return Err(Status::invalid_argument("the request has no gRPC message frame"));
    }
    if body[0] != 0 {
        return Err(Status::unimplemented("compressed requests are not supported"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + len {
        return Err(Status::invalid_argument(format!(
            "the gRPC frame announces {len} bytes but {} arrived",
            body.len() - 5
        )));
    }
    Ok(body.freeze().slice(5..))
}

/// The 5-byte gRPC message prefix: flag, big-endian length.
fn prefix(flag: u8, data: &[u8]) -> [u8; 5] {
    let len = u32::try_from(data.len()).expect("messages are bounded by MAX_MESSAGE_SIZE");
    let [a, b, c, d] = len.to_be_bytes();
    [flag, a, b, c, d]
}

/// Writes a gRPC answer: data frame and `grpc-status` trailers (HTTP/2), or for gRPC-web the data
/// frame and a trailer frame in the body.
async fn respond(session: &mut ServerSession, web: bool, answer: Result<Bytes, Status>) -> bool {
    let (code, message, data) = match answer {
        Ok(data) => (0, String::new(), Some(data)),
        Err(status) => (status.code() as i32, status.message().to_owned(), None),
    };
    let write = async {
        let mut header = ResponseHeader::build(200, None)?;
        if web {
            header.insert_header("content-type", "application/grpc-web+proto")?;
            header.insert_header("access-control-allow-origin", "*")?;
            header.insert_header("access-control-expose-headers", "grpc-status,grpc-message")?;
            let mut body = BytesMut::new();
            if let Some(data) = &data {
                body.extend_from_slice(&prefix(0, data));
                body.extend_from_slice(data);
            }
            let mut trailers = format!("grpc-status:{code}\r\n");
            if !message.is_empty() {
                let _ = write!(trailers, "grpc-message:{}\r\n", percent_encode(&message));
            }
            body.extend_from_slice(&prefix(0x80, trailers.as_bytes()));
            body.extend_from_slice(trailers.as_bytes());
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
