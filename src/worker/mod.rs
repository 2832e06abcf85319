//! The worker's gRPC service: `remote_prover.Api/Prove` (one proof at a time, proved on a blocking
//! thread so the runtime keeps answering), `WorkerStatusApi/Status`, standard health, server
//! reflection and gRPC-web, all on one listener.
//!
//! Errors reach the wire in exactly one place, [`WorkerError::into_status`].

pub mod daemon;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field, info, info_span, warn};

use crate::process::error_chain;
use crate::proto::api_server::{Api, ApiServer};
use crate::proto::worker_status_api_server::{WorkerStatusApi, WorkerStatusApiServer};
use crate::proto::{self, ProofType};
use crate::prover::{ProveError, Prover};
use crate::{ProofKind, systemd, telemetry};

/// Largest request or response accepted. A transaction payload is ≈ 109 KB and a batch up to a
/// few hundred KB; blocks of many batches are larger. Tonic's 4 MiB default would cut them off.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window for streams and connections.
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;

/// The answer to a `Prove` call that is not a proof.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `proof_type` is not a number the protocol defines.
    #[error("unknown proof_type {0}; expected 0 (TRANSACTION), 1 (BATCH) or 2 (BLOCK)")]
    UnknownProofType(i32),
    /// The request asks for a kind this worker does not prove.
    #[error(
        "this worker proves {served} requests only, not {requested}; send it to a {requested} worker"
    )]
    WrongProofType {
        /// What the request asked for.
        requested: ProofKind,
        /// What this worker serves.
        served: ProofKind,
    },
    /// Another proof is running (the text is upstream's, which clients and proxies match).
    #[error("Server is busy handling another request")]
    Busy,
    /// The worker received SIGTERM and takes no new work.
    #[error("the worker is shutting down; send the request to another worker")]
    ShuttingDown,
    /// Decoding or proving failed.
    #[error(transparent)]
    Prove(#[from] ProveError),
    /// The prover panicked; the worker keeps serving.
    #[error("the {0} prover panicked: {1}")]
    Panicked(ProofKind, String),
}

impl WorkerError {
    /// The gRPC status a client sees (DESIGN §2: upstream's codes, plus `INVALID_ARGUMENT` for an
    /// unknown proof type, which upstream silently proved as a transaction).
    pub fn into_status(self) -> Status {
        let message = error_chain(&self);
        match self {
            WorkerError::UnknownProofType(_) | WorkerError::Prove(ProveError::Decode { .. }) => {
                Status::invalid_argument(message)
            }
            WorkerError::WrongProofType { .. } => Status::unimplemented(message),
            WorkerError::Busy => Status::resource_exhausted(message),
            WorkerError::ShuttingDown => Status::unavailable(message),
            WorkerError::Prove(ProveError::Prove { .. }) | WorkerError::Panicked(..) => {
                Status::internal(message)
            }
        }
    }

    /// Short outcome name for logs and metrics.
    fn outcome(&self) -> &'static str {
        match self {
            WorkerError::UnknownProofType(_) => "unknown_proof_type",
            WorkerError::WrongProofType { .. } => "wrong_proof_type",
            WorkerError::Busy => "busy",
            WorkerError::ShuttingDown => "shutting_down",
            WorkerError::Prove(ProveError::Decode { .. }) => "invalid_payload",
            WorkerError::Prove(ProveError::Prove { .. }) => "prove_failed",
            WorkerError::Panicked(..) => "panicked",
        }
    }
}

/// A worker for one proof kind; clones share state.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    prover: Prover,
    /// One permit: held from admission until the proof has really ended, even if the client left.
    slot: Arc<Semaphore>,
    served: AtomicU64,
    accepting: AtomicBool,
    /// What `STATUS=` says now.
    status: std::sync::Mutex<String>,
}

impl Worker {
    /// A worker proving `kind`.
    pub fn new(kind: ProofKind) -> Self {
        Worker {
            inner: Arc::new(Inner {
                prover: Prover::new(kind),
                slot: Arc::new(Semaphore::new(1)),
                served: AtomicU64::new(0),
                accepting: AtomicBool::new(true),
                status: std::sync::Mutex::new("idle".to_owned()),
            }),
        }
    }

    /// The proof kind served.
    pub fn kind(&self) -> ProofKind {
        self.inner.prover.kind()
    }

    /// True while a proof runs.
    pub fn is_busy(&self) -> bool {
        self.inner.slot.available_permits() == 0
    }

    /// Refuse new work from now on (SIGTERM); the proof in flight continues.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// The one-line state for `STATUS=`: "idle" or "proving transaction for account 0x…".
    pub fn status_line(&self) -> String {
        self.inner.status.lock().map_or_else(|p| p.into_inner().clone(), |s| s.clone())
    }

    fn set_status(&self, line: String) {
        systemd::status(&line);
        match self.inner.status.lock() {
            Ok(mut status) => *status = line,
            Err(poisoned) => *poisoned.into_inner() = line,
        }
    }

    /// Admits, decodes and proves one request.
    async fn prove_request(&self, request: proto::ProofRequest) -> Result<Vec<u8>, WorkerError> {
        let requested: ProofKind = ProofType::try_from(request.proof_type)
            .map_err(|_| WorkerError::UnknownProofType(request.proof_type))?
            .into();
        Span::current().record("proof_type", requested.as_str());
        if requested != self.kind() {
            return Err(WorkerError::WrongProofType { requested, served: self.kind() });
        }
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        let permit =
            Arc::clone(&self.inner.slot).try_acquire_owned().map_err(|_| WorkerError::Busy)?;

        // The blocking thread owns the permit: the worker stays busy until the proof has ended,
        // even when this future is dropped because the client went away.
        let worker = self.clone();
        let span = Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _entered = span.enter();
            let started = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                worker.decode_and_prove(&request.payload)
            }))
            .unwrap_or_else(|panic| {
                Err(WorkerError::Panicked(worker.kind(), panic_message(&panic)))
            });
            worker.inner.served.fetch_add(1, Ordering::Relaxed);
            worker.set_status("idle".to_owned());
            let duration_ms = started.elapsed().as_millis();
            match &result {
                Ok(proof) => {
                    info!(outcome = "proved", duration_ms, proof_bytes = proof.len(), "proof done");
                }
                Err(err) => {
                    warn!(outcome = err.outcome(), duration_ms, error = %error_chain(err), "proof failed");
                }
            }
            result
        });
        task.await.unwrap_or_else(|join| Err(WorkerError::Panicked(self.kind(), join.to_string())))
    }

    fn decode_and_prove(&self, payload: &[u8]) -> Result<Vec<u8>, WorkerError> {
        let job = self.inner.prover.decode(payload)?;
        Span::current().record("subject", job.subject.as_str());
        self.set_status(format!("proving {}", job.subject));
        Ok(self.inner.prover.prove(job)?)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

#[tonic::async_trait]
impl Api for Worker {
    async fn prove(
        &self,
        request: Request<proto::ProofRequest>,
    ) -> Result<Response<proto::Proof>, Status> {
        let span = info_span!(
            "prove",
            proof_type = field::Empty,
            subject = field::Empty,
            request_id = field::Empty
        );
        if let Some(id) = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()) {
            span.record("request_id", id);
        }
        telemetry::continue_trace(&span, request.metadata());
        let started = Instant::now();
        let result = self.prove_request(request.into_inner()).instrument(span.clone()).await;
        match result {
            Ok(payload) => Ok(Response::new(proto::Proof { payload })),
            Err(err) => {
                // Proving outcomes are logged by the proving thread; log only early refusals here.
                if !matches!(err, WorkerError::Prove(_) | WorkerError::Panicked(..)) {
                    span.in_scope(|| {
                        info!(outcome = err.outcome(), duration_ms = started.elapsed().as_millis(), error = %err, "request refused");
                    });
                }
                Err(err.into_status())
            }
        }
    }
}

#[tonic::async_trait]
impl WorkerStatusApi for Worker {
    async fn status(&self, _request: Request<()>) -> Result<Response<proto::WorkerStatus>, Status> {
        Ok(Response::new(proto::WorkerStatus {
            version: crate::cpu::version(),
            supported_proof_type: ProofType::from(self.kind()).into(),
            busy: self.is_busy(),
            requests_served: self.inner.served.load(Ordering::Relaxed),
        }))
    }
}

/// Serves `worker` on `listener` until `shutdown` resolves, then stops taking connections and
/// returns once the requests in flight have been answered.
pub async fn serve(
    worker: Worker,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ApiServer<Worker>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid: they were produced by the build script");

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<ApiServer<Worker>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    tonic::transport::Server::builder()
        // Windows that fit a whole request: with HTTP/2's 64 KiB default a 170 KB batch waits
        // for several WINDOW_UPDATE round trips before the worker has all of it.
        .initial_stream_window_size(Some(WINDOW_SIZE))
        .initial_connection_window_size(Some(WINDOW_SIZE))
        .max_frame_size(Some(1 << 20))
        .accept_http1(true)
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(
            ApiServer::new(worker.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(WorkerStatusApiServer::new(worker))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
