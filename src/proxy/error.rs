//! Every answer of the proxy that is not a proof: [`ProxyError`], and the one place it becomes a
//! gRPC status ([`ProxyError::into_status`]). The codes are upstream's where upstream had one
//! (`RESOURCE_EXHAUSTED` for a full queue or a rate limit), so clients that match them keep
//! working; statuses a worker sent pass through as they came.

use std::time::Duration;

use tonic::{Code, Status};

use super::bounds::OverBudget;
use super::codes;
use super::pool::AcquireError;
use crate::ProofKind;
use crate::proto::UnknownProofType;
use crate::share::Outcome;

/// Why a call got no proof from the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// gRPC-web's base64 text form: only the binary form is served.
    #[error("grpc-web-text is not supported; use application/grpc-web+proto")]
    GrpcWebText,
    /// A path the proxy does not serve.
    #[error("unknown method {0}")]
    UnknownMethod(String),
    /// The client's requests this second passed `max_req_per_sec`.
    #[error("Too many requests from {client}: the limit is {limit} per second per client IP")]
    RateLimited {
        /// The client as it is counted: its address, or its IPv6 prefix.
        client: String,
        /// `max_req_per_sec`.
        limit: u32,
    },
    /// No room in the queue, no (healthy) worker, or a proxy shutting down.
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// Buffering the request would pass a bytes bound.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The prefix or `Content-Length` announces more than `max_request_size`.
    #[error("the request announces {len} bytes; this proxy takes at most {max} (max_request_size)")]
    TooLarge {
        /// Bytes announced.
        len: usize,
        /// `max_request_size`.
        max: usize,
    },
    /// Reading the body failed (the client reset the stream or the connection).
    #[error("reading the request failed: {0}")]
    ReadBody(#[source] Box<pingora_core::Error>),
    /// More bytes than the gRPC prefix announced.
    #[error("the request holds more than the {0} bytes its gRPC frame announces")]
    FrameOverrun(usize),
    /// Fewer bytes than the gRPC prefix announced.
    #[error("the gRPC frame announces {announced} bytes but {arrived} arrived")]
    FrameShort {
        /// Bytes announced.
        announced: usize,
        /// Bytes that came.
        arrived: usize,
    },
    /// The body ended before a whole 5-byte gRPC prefix.
    #[error("the request has no gRPC message frame")]
    NoFrame,
    /// The compressed flag was set: the proxy does not decompress.
    #[error("compressed requests are not supported")]
    Compressed,
    /// The body did not arrive whole within `request_timeout`.
    #[error(
        "the request's body did not arrive whole within {} (request_timeout)",
        humantime::format_duration(*.0)
    )]
    BodyTimeout(Duration),
    /// The message is not a `ProofRequest`.
    #[error("the request does not decode: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// `proof_type` is not a number the protocol defines (the worker's words too).
    #[error(transparent)]
    UnknownProofType(#[from] UnknownProofType),
    /// The request asks for a kind this proxy's workers do not prove.
    #[error("this proxy serves {served} requests only, not {requested}")]
    WrongProofType {
        /// What the request asked for.
        requested: ProofKind,
        /// What this proxy serves.
        served: ProofKind,
    },
    /// The content took down `deaths` workers lately: refused without reaching another.
    #[error(
        "this request's content took down {deaths} workers; it is refused for {} after the last \
         (poison_ttl) without reaching a worker. Check the input: the workers' logs name how \
         their prover processes ended",
        humantime::format_duration(*.ttl)
    )]
    Poisoned {
        /// Workers it took down.
        deaths: u32,
        /// `poison_ttl`.
        ttl: Duration,
    },
    /// No healthy worker became free within `max_queue_wait`.
    #[error("no healthy worker became free within {0:?} (max_queue_wait)")]
    QueueWait(Duration),
    /// After a failed attempt, no other worker became free within `max_queue_wait`.
    #[error("no other worker became free within {wait:?} to retry on after: {last}")]
    NoWorkerToRetryOn {
        /// `max_queue_wait`.
        wait: Duration,
        /// What the last attempt met.
        last: String,
    },
    /// Two workers died under this request: it is not sent to a third.
    #[error("{deaths} workers died under this request; it is not sent to a third: {last}")]
    WorkersDied {
        /// Workers that died.
        deaths: u32,
        /// What the last attempt met.
        last: String,
    },
    /// The worker did not answer within the proxy's per-attempt `timeout`.
    #[error(
        "the worker did not answer within {0:?} (the proxy's `timeout`; raise it if proofs take \
         longer)"
    )]
    Timeout(Duration),
    /// Every attempt failed.
    #[error("all {attempts} attempts failed; the last: {last}")]
    Exhausted {
        /// 1 + `max_retries_per_request`.
        attempts: u32,
        /// What the last attempt met.
        last: String,
    },
    /// The client's own deadline (`grpc-timeout`) passed first. `Some(ttl)`: the proof goes on
    /// and is kept that long.
    #[error("{}", client_deadline(*.0))]
    ClientDeadline(Option<Duration>),
    /// The worker's own verdict on the request (proving failed, bad payload), passed on as is.
    #[error("{}", .0.message())]
    Worker(Status),
    /// How the identical request this one joined ended, passed on as is.
    #[error("{}", .0.message())]
    Shared(Status),
}

impl ProxyError {
    /// The gRPC code a client sees.
    pub fn code(&self) -> Code {
        match self {
            ProxyError::GrpcWebText
            | ProxyError::UnknownMethod(_)
            | ProxyError::Compressed
            | ProxyError::WrongProofType { .. } => Code::Unimplemented,
            ProxyError::RateLimited { .. }
            | ProxyError::OverBudget(_)
            | ProxyError::Acquire(AcquireError::QueueFull) => Code::ResourceExhausted,
            ProxyError::Acquire(_)
            | ProxyError::QueueWait(_)
            | ProxyError::NoWorkerToRetryOn { .. }
            | ProxyError::WorkersDied { .. }
            | ProxyError::Exhausted { .. } => Code::Unavailable,
            ProxyError::TooLarge { .. } => Code::OutOfRange,
            ProxyError::ReadBody(_) => Code::Cancelled,
            ProxyError::FrameOverrun(_)
            | ProxyError::FrameShort { .. }
            | ProxyError::NoFrame
            | ProxyError::Undecodable(_)
            | ProxyError::UnknownProofType(_) => Code::InvalidArgument,
            ProxyError::BodyTimeout(_) | ProxyError::Timeout(_) | ProxyError::ClientDeadline(_) => {
                Code::DeadlineExceeded
            }
            ProxyError::Poisoned { .. } => Code::Internal,
            ProxyError::Worker(status) | ProxyError::Shared(status) => status.code(),
        }
    }

    /// The status the client receives.
    pub fn into_status(self) -> Status {
        match self {
            ProxyError::Worker(status) | ProxyError::Shared(status) => status,
            err => Status::new(err.code(), err.to_string()),
        }
    }

    /// Short outcome name for logs and metrics: the code's name, as dashboards count it.
    pub fn outcome(&self) -> &'static str {
        codes::name(self.code())
    }

    /// How the attempts at a shared proof ended, for everyone waiting on it: `Retry` when
    /// workers failed (another try may find a better one), `Final` when the answer is about the
    /// request itself.
    pub fn into_outcome(self) -> Outcome {
        let retry = matches!(
            self,
            ProxyError::Acquire(
                AcquireError::NoWorkers
                    | AcquireError::NoHealthyWorkers(_)
                    | AcquireError::ShuttingDown
            ) | ProxyError::QueueWait(_)
                | ProxyError::NoWorkerToRetryOn { .. }
                | ProxyError::Exhausted { .. }
        );
        let status = self.into_status();
        if retry { Outcome::Retry(status) } else { Outcome::Final(status) }
    }
}

/// What a client whose deadline passed is told: whether asking again will find the proof.
fn client_deadline(kept_for: Option<Duration>) -> String {
    match kept_for {
        Some(ttl) => format!(
            "the client's deadline (grpc-timeout) passed before the proof was ready; a proof a \
             worker started runs on and is kept for {}: send the same request again to receive \
             it (or allow more time)",
            humantime::format_duration(ttl)
        ),
        None => "the client's deadline (grpc-timeout) passed before the proof was ready; allow \
                 more time"
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::ProxyError;
    use crate::proxy::pool::AcquireError;
    use crate::share::Outcome;

    #[test]
    fn a_full_queue_and_a_rate_limit_are_resource_exhausted_as_upstream_answers_them() {
        let full = ProxyError::Acquire(AcquireError::QueueFull).into_status();
        assert_eq!(
            (full.code(), full.message()),
            (Code::ResourceExhausted, "Too many requests in the queue")
        );
        let limited = ProxyError::RateLimited { client: "10.0.0.1".into(), limit: 5 }.into_status();
        assert_eq!(limited.code(), Code::ResourceExhausted);
        assert_eq!(
            limited.message(),
            "Too many requests from 10.0.0.1: the limit is 5 per second per client IP"
        );
    }

    #[test]
    fn a_workers_status_passes_through_unchanged() {
        let status = tonic::Status::internal("proving failed: boom");
        let passed = ProxyError::Worker(status).into_status();
        assert_eq!((passed.code(), passed.message()), (Code::Internal, "proving failed: boom"));
        assert_eq!(ProxyError::Worker(tonic::Status::internal("x")).outcome(), "internal");
    }

    #[test]
    fn only_worker_failures_let_a_waiter_try_again() {
        let retry = ProxyError::Exhausted { attempts: 2, last: "worker a is busy".into() };
        assert!(matches!(retry.into_outcome(), Outcome::Retry(s) if s.code() == Code::Unavailable));
        let died = ProxyError::WorkersDied { deaths: 2, last: "worker b failed".into() };
        assert!(matches!(died.into_outcome(), Outcome::Final(s) if s.code() == Code::Unavailable));
        let full = ProxyError::Acquire(AcquireError::QueueFull);
        assert!(matches!(full.into_outcome(), Outcome::Final(_)));
        let timeout = ProxyError::Timeout(Duration::from_secs(100)).into_status();
        assert_eq!(
            timeout.message(),
            "the worker did not answer within 100s (the proxy's `timeout`; raise it if proofs \
             take longer)"
        );
    }
}
