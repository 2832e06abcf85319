//! Forwards a `Prove` call to a worker as the client sent it: the request message and the proof
//! travel as opaque bytes, never decoded into a `ProofRequest` and encoded again. The proxy only
//! reads the request's `proof_type` (skipping the payload without copying it).
//!
//! The call goes over an HTTP/2 connection of the worker's own ([`Upstream`]), driven by the
//! `h2` crate directly: the request's task writes its frames into the connection and reads the
//! answer from it, with no task between them (a tonic channel puts its buffer task and hyper's
//! dispatch in the way: BENCHMARKS.md, "The worker connection without tonic"), and the message
//! is sent as the bytes it arrived in, not copied into an encoder's buffer. Health checks and
//! status polls keep their tonic channel; this connection carries `Prove` calls only.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::{Code, Status};

use super::pool::ChannelSettings;
use crate::config::WorkerAddress;
use crate::wire::{MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, NOT_READY, PROVE_PATH, PROXY_WINDOW};

/// The fields of a `ProofRequest` the proxy looks at; prost skips the payload field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestHead {
    /// `remote_prover.ProofType`, as on the wire.
    #[prost(int32, tag = "1")]
    pub proof_type: i32,
}

/// The largest header list the proxy takes from a worker.
const MAX_HEADER_LIST: u32 = 64 << 10;

/// A worker's HTTP/2 connection for `Prove` calls: made on first use, and made again when the
/// last one broke. One per worker entry; a reload that changes the connection settings makes
/// the entry a new one (the old connection ends with its last call).
pub struct Upstream {
    /// Where it dials: `host:port`, with the scheme that says whether TLS is spoken.
    address: WorkerAddress,
    /// The name the worker's TLS certificate must carry: the DNS name the worker was found
    /// under, or its own host.
    server_name: String,
    settings: ChannelSettings,
    /// The connection, once made. Calls to one worker come one at a time, so a lock held
    /// across the connect only ever makes a status poll's rare twin wait.
    connection: tokio::sync::Mutex<Option<SendRequest<Bytes>>>,
}

impl Upstream {
    /// A connection to `address` (found under the DNS `name`, if any) made with `settings`,
    /// not dialled yet.
    pub fn new(
        address: &WorkerAddress,
        name: Option<&WorkerAddress>,
        settings: &ChannelSettings,
    ) -> Self {
        Upstream {
            address: address.clone(),
            server_name: name.unwrap_or(address).host().to_owned(),
            settings: settings.clone(),
            connection: tokio::sync::Mutex::default(),
        }
    }

    /// A connection ready for a new stream: the one there is, or a new one when there is none
    /// or it broke. Errors say why none could be made; the request was not sent.
    async fn ready(&self) -> Result<SendRequest<Bytes>, String> {
        let mut connection = self.connection.lock().await;
        if let Some(open) = connection.take()
            && let Ok(ready) = open.ready().await
        {
            *connection = Some(ready.clone());
            return Ok(ready);
        }
        let made = self.connect().await?;
        let ready = made.ready().await.map_err(|err| err.to_string())?;
        *connection = Some(ready.clone());
        Ok(ready)
    }

    /// Dials the worker: TCP within `connect_timeout`, TLS for `https://` workers (within the
    /// same time again), then the HTTP/2 handshake.
    async fn connect(&self) -> Result<SendRequest<Bytes>, String> {
        let timeout = self.settings.connect_timeout;
        let tcp = within(timeout, "connecting", TcpStream::connect(self.address.authority()))
            .await?
            .map_err(|err| format!("cannot connect: {err}"))?;
        tcp.set_nodelay(true).map_err(|err| err.to_string())?;
        if !self.address.is_tls() {
            return handshake(tcp, &self.settings).await;
        }
        let connector = self.settings.tls.connector()?;
        let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|err| format!("{}: not a TLS server name: {err}", self.server_name))?;
        let tls = within(timeout, "the TLS handshake", connector.connect(name, tcp))
            .await?
            .map_err(|err| format!("TLS handshake failed: {err}"))?;
        handshake(tls, &self.settings).await
    }
}

/// `future`, or an error naming `what` when it takes longer than `timeout`.
async fn within<T>(
    timeout: Duration,
    what: &str,
    future: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| format!("{what} timed out after {}", humantime::format_duration(timeout)))
}

/// The HTTP/2 handshake over `io`; the connection is then driven by a task of its own, which
/// pings the worker every `keepalive_interval` and drops the connection when a ping goes
/// unanswered for `keepalive_timeout` (a worker host gone silent mid-proof), failing the call on
/// it so the request is retried elsewhere.
async fn handshake<T>(io: T, settings: &ChannelSettings) -> Result<SendRequest<Bytes>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(PROXY_WINDOW)
        .initial_connection_window_size(PROXY_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(|err| format!("HTTP/2 handshake failed: {err}"))?;
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    let mut pings = connection.ping_pong().expect("a new connection's pings are not taken");
    tokio::spawn(async move {
        let keepalive = async {
            loop {
                tokio::time::sleep(interval).await;
                match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_pong)) => {}
                    // Unanswered or refused: dropping the connection fails its streams.
                    _ => return,
                }
            }
        };
        tokio::select! {
            _ = &mut connection => {}
            () = keepalive => {}
        }
    });
    Ok(send)
}

/// Calls `remote_prover.Api/Prove` on the worker of `upstream` with an already encoded
/// `ProofRequest` and the request's trace headers; the answer is the encoded `Proof`. A call
/// that could not be sent fails with a message that starts with [`NOT_READY`] ([`never_sent`]).
pub async fn prove(
    upstream: &Upstream,
    message: &Bytes,
    headers: HeaderMap,
) -> Result<Bytes, Status> {
    let not_ready = |err: String| Status::unknown(format!("{NOT_READY}: {err}"));
    let mut send = upstream.ready().await.map_err(not_ready)?;
    let scheme = if upstream.address.is_tls() { "https" } else { "http" };
    let mut request =
        http::Request::post(format!("{scheme}://{}{PROVE_PATH}", upstream.address.authority()))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|err| Status::internal(format!("the request to the worker: {err}")))?;
    request.headers_mut().extend(headers);
    let (answer, mut body) =
        send.send_request(request, false).map_err(|err| lost(&err, "sending the request"))?;
    let prefix = grpc_prefix(message.len());
    body.send_data(Bytes::copy_from_slice(&prefix), false)
        .and_then(|()| body.send_data(message.clone(), true))
        .map_err(|err| lost(&err, "sending the request"))?;
    let answer = answer.await.map_err(|err| lost(&err, "waiting for the answer"))?;
    let (head, mut body) = answer.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(http_status(head.status));
    }
    // A trailers-only answer: the status is in the headers, with no message.
    if let Some(status) = Status::from_header_map(&head.headers) {
        return Err(if status.code() == Code::Ok { no_message() } else { status });
    }
    let data = read_answer(&mut body).await?;
    let trailers = body.trailers().await.map_err(|err| lost(&err, "reading the answer"))?;
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) if status.code() == Code::Ok => unwrap_message(&data),
        Some(status) => Err(status),
        None => Err(Status::unknown("the worker's answer ended without a grpc-status")),
    }
}

/// The answer's body, whole, giving its flow-control window back as it arrives; a body longer
/// than a message may be is refused before it is all read.
async fn read_answer(body: &mut h2::RecvStream) -> Result<Bytes, Status> {
    let mut chunks = Vec::new();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|err| lost(&err, "reading the answer"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        len += chunk.len();
        if len > 5 + MAX_MESSAGE_SIZE {
            return Err(Status::out_of_range(format!(
                "the worker's answer is larger than a message may be ({MAX_MESSAGE_SIZE} bytes)"
            )));
        }
        chunks.push(chunk);
    }
    // Sent in one frame (the proxy takes frames of up to MAX_FRAME_SIZE), the answer is not
    // copied.
    if chunks.len() == 1 {
        return Ok(chunks.swap_remove(0));
    }
    let mut data = BytesMut::with_capacity(len);
    for chunk in chunks {
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// The one message of a gRPC answer's body: its 5-byte prefix checked and taken off.
fn unwrap_message(data: &Bytes) -> Result<Bytes, Status> {
    let Some(prefix) = data.get(..5) else {
        return Err(no_message());
    };
    if prefix[0] != 0 {
        return Err(Status::internal(
            "the worker's answer is compressed; the proxy asked for none",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if data.len() != 5 + len {
        return Err(Status::internal(format!(
            "the worker's answer announced {len} bytes and carried {}",
            data.len() - 5
        )));
    }
    Ok(data.slice(5..))
}

fn no_message() -> Status {
    Status::internal("the worker answered OK without a proof")
}

/// The 5-byte gRPC message prefix: uncompressed, big-endian length.
fn grpc_prefix(len: usize) -> [u8; 5] {
    let len = u32::try_from(len).expect("messages are bounded by MAX_MESSAGE_SIZE");
    let [a, b, c, d] = len.to_be_bytes();
    [0, a, b, c, d]
}

/// An answer that is not gRPC's (a proxy or another server at the worker's address), read as
/// gRPC's HTTP mapping says.
fn http_status(status: http::StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("the worker's address answered HTTP {status}, not gRPC"))
}

/// The connection or the stream failed while `doing`: the worker may have had the request. A
/// stream the worker refused (`REFUSED_STREAM`: it took no part of it) was never sent.
fn lost(err: &h2::Error, doing: &str) -> Status {
    if err.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Status::unknown(format!("{NOT_READY}: the worker refused the stream: {err}"));
    }
    Status::unavailable(format!("the worker's connection failed {doing}: {err}"))
}

/// Whether a failed call never reached the worker (it could not be connected to, or refused
/// the stream): the worker cannot have died of this request.
pub fn never_sent(status: &Status) -> bool {
    status.message().starts_with(NOT_READY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_one_uncompressed_message_of_the_length_its_prefix_says() {
        let mut data = grpc_prefix(3).to_vec();
        data.extend_from_slice(b"abc");
        assert_eq!(unwrap_message(&Bytes::from(data.clone())).expect("one message"), "abc");
        let short = Bytes::from(data[..6].to_vec());
        assert!(unwrap_message(&short).expect_err("short").message().contains("announced 3"));
        data[0] = 1;
        assert!(
            unwrap_message(&Bytes::from(data))
                .expect_err("compressed")
                .message()
                .contains("compressed")
        );
        assert_eq!(
            unwrap_message(&Bytes::from_static(b"\0\0")).expect_err("no prefix").code(),
            Code::Internal
        );
    }

    #[test]
    fn an_answer_that_is_not_grpc_is_read_as_the_http_mapping_says() {
        assert_eq!(http_status(http::StatusCode::NOT_FOUND).code(), Code::Unimplemented);
        assert_eq!(http_status(http::StatusCode::BAD_GATEWAY).code(), Code::Unavailable);
        assert_eq!(http_status(http::StatusCode::IM_A_TEAPOT).code(), Code::Unknown);
    }
}
