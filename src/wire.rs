//! The fixed numbers and texts of the wire, in one place: the gRPC path both daemons route on,
//! message bounds, HTTP/2 windows and limits, and the original service's texts that clients and
//! proxies read. Settings an operator may change live in `config`; these do not change.

use std::time::Duration;

// PATHS AND TEXTS
// ================================================================================================

/// The gRPC path of `Prove`: the call that takes a worker's proving slot and that the proxy
/// queues; every other path is a small status, health or reflection call.
pub const PROVE_PATH: &str = "/remote_prover.Api/Prove";

/// What a busy worker answers (the original service's text): the one `RESOURCE_EXHAUSTED` that
/// means "try another worker", as the proxy reads it.
pub const BUSY_MESSAGE: &str = "Server is busy handling another request";

/// How tonic begins a status for a channel that could not be made ready (the worker is
/// unreachable): the proxy reads it as "the request never left".
pub const NOT_READY: &str = "Service was not ready";

/// The HTTP/2 connection preface, which an h2c connection begins with.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// MESSAGE BOUNDS
// ================================================================================================

/// Largest message the proxy forwards and a worker answers with: a bound on a proof and on what
/// any worker may be configured to take (`max_request_size`).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Largest message of any call but `Prove` (status, health and reflection requests are a few
/// bytes).
pub const SMALL_MESSAGE: usize = 64 << 10;

/// Longest trace or request-id header the proxy logs and passes on; a longer one is dropped
/// (W3C: a `traceparent` is 55 characters, a `tracestate` at most 512), so a client cannot write
/// a megabyte into the journal with every request.
pub const MAX_META_HEADER: usize = 512;

// HTTP/2
// ================================================================================================

/// The proxy's HTTP/2 flow-control window, for streams and connections, towards clients and
/// towards workers: a whole request moves without waiting for `WINDOW_UPDATE` round trips (with
/// HTTP/2's 64 KiB default a 170 KB batch waits for several).
pub const PROXY_WINDOW: u32 = 16 << 20;

/// The largest HTTP/2 frame a worker takes, and the proxy takes from a worker: a peer sends a
/// message in frames of at most this size, and with HTTP/2's 16 KiB default a 109 KB request is
/// seven frames, each a read and a write on both sides; with 1 MiB it is one.
pub const MAX_FRAME_SIZE: u32 = 1 << 20;

/// A worker's HTTP/2 window of a stream: a whole batch (≈ 170 KB) or transaction arrives without
/// waiting for a `WINDOW_UPDATE` round trip.
pub const WORKER_STREAM_WINDOW: u32 = 2 << 20;

/// A worker's HTTP/2 window of a connection: what one connection can make the worker buffer.
pub const WORKER_CONNECTION_WINDOW: u32 = 4 << 20;

/// Streams one connection to a worker may have open: a proxy's `Prove`, its status polls and
/// health checks. A one-at-a-time service has no use for HTTP/2's unlimited default.
pub const WORKER_MAX_CONCURRENT_STREAMS: u32 = 8;

/// How often a worker pings an idle connection, and how long the answer may take, so a vanished
/// peer lets go of its connection.
pub const WORKER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`WORKER_KEEPALIVE_INTERVAL`].
pub const WORKER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
