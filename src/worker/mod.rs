//! The worker's gRPC service: `remote_prover.Api/Prove` (one proof at a time, each in a prover
//! process of its own, [`job`]), `WorkerStatusApi/Status`, standard health, server reflection
//! and gRPC-web, all on one listener whose connections and requests are bounded ([`transport`]).
//!
//! Requests are keyed by their content ([`share`]), as in the proxy but in small: a request
//! identical to the running proof joins it instead of being answered busy, and the last proofs
//! are kept (`proof_cache_size`, `proof_cache_ttl`) to answer identical requests at once. A
//! proof everyone waiting for has left is still stopped: behind a proxy, the proxy decides
//! whether a proof is worth finishing by staying connected.
//!
//! Errors reach the wire in exactly one place, [`WorkerError::into_status`].

pub mod job;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field, info, info_span, warn};

use self::job::{JobError, ProverProcesses};
use self::transport::{Admission, Admitted};
use crate::config::{Bounds, Limits};
use crate::daemon::error_chain;
use crate::proto::api_server::{Api, ApiServer};
use crate::proto::worker_status_api_server::{WorkerStatusApi, WorkerStatusApiServer};
use crate::proto::{self, ProofType, UnknownProofType};
use crate::share::{self, Found, Outcome, Served};
use crate::tls::ServerTlsCell;
use crate::{ProofKind, systemd, telemetry};

use crate::wire::{
    BUSY_MESSAGE, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, SMALL_MESSAGE, WORKER_CONNECTION_WINDOW,
    WORKER_KEEPALIVE_INTERVAL, WORKER_KEEPALIVE_TIMEOUT, WORKER_MAX_CONCURRENT_STREAMS,
    WORKER_STREAM_WINDOW,
};

/// How long after the slot frees the next spare prover process starts: time for the answer to
/// leave first (started at once, the process took 0.5 ms from a batch's answer on 2 cores).
const SPARE_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// How often a spare that could not start is tried again.
const SPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The answer to a `Prove` call that is not a proof.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `proof_type` is not a number the protocol defines.
    #[error(transparent)]
    UnknownProofType(#[from] UnknownProofType),
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
    #[error("{}", BUSY_MESSAGE)]
    Busy,
    /// A request's body did not arrive whole in time.
    #[error(
        "the request body did not arrive whole within request_timeout ({})",
        humantime::format_duration(*.0)
    )]
    RequestTimeout(std::time::Duration),
    /// The worker received SIGTERM and takes no new work.
    #[error("the worker is shutting down; send the request to another worker")]
    ShuttingDown,
    /// The prover process answered without a proof, hit a limit or died; the worker goes on.
    #[error(transparent)]
    Job(#[from] JobError),
}

impl WorkerError {
    /// The gRPC status a client sees: upstream's codes, which clients and proxies match, plus
    /// `INVALID_ARGUMENT` for an unknown proof type, which upstream silently proved as a
    /// transaction.
    pub fn into_status(self) -> Status {
        let message = error_chain(&self);
        match self {
            WorkerError::UnknownProofType(_) | WorkerError::Job(JobError::Invalid(_)) => {
                Status::invalid_argument(message)
            }
            WorkerError::WrongProofType { .. } => Status::unimplemented(message),
            WorkerError::Busy
            | WorkerError::Job(
                JobError::TimeLimit(_) | JobError::MemoryLimit { .. } | JobError::StackLimit,
            ) => Status::resource_exhausted(message),
            WorkerError::RequestTimeout(_) => Status::deadline_exceeded(message),
            // The worker cannot prove at all: another worker should get the request.
            WorkerError::ShuttingDown | WorkerError::Job(JobError::Start(_)) => {
                Status::unavailable(message)
            }
            WorkerError::Job(JobError::Failed(_) | JobError::Died { .. }) => {
                Status::internal(message)
            }
        }
    }

    /// Short outcome name for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            WorkerError::UnknownProofType(_) => "unknown_proof_type",
            WorkerError::WrongProofType { .. } => "wrong_proof_type",
            WorkerError::Busy => "busy",
            WorkerError::ShuttingDown => "shutting_down",
            WorkerError::RequestTimeout(_) => "request_timeout",
            WorkerError::Job(err) => err.outcome(),
        }
    }
}

/// A worker for one proof kind; clones share state.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ProofKind,
    /// Where proofs run.
    processes: ProverProcesses,
    /// Limits on connections and request bodies.
    bounds: Bounds,
    /// One permit: taken when a `Prove` call's headers arrive (so a busy worker answers before
    /// reading the body) and held until its prover process is gone.
    slot: Arc<Semaphore>,
    /// Places for calls that arrive while a proof runs ([`transport::MAX_JOINERS`]).
    joiners: Arc<Semaphore>,
    /// The running proof and the kept ones, by content.
    proofs: share::Proofs,
    served: AtomicU64,
    accepting: AtomicBool,
    /// A task is trying again to start the spare ([`Worker::start_spare`]).
    spare_retrying: AtomicBool,
    /// What `STATUS=` says now, and whether a later send may follow.
    status: std::sync::Mutex<StatusLine>,
}

/// How often `STATUS=` is sent, at most. A batch or block worker turns "proving …" and "idle"
/// every few milliseconds, and each line is a message for the service manager to read; the
/// answer's own path should not carry one either.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The worker's `STATUS=` line: a change after [`STATUS_EVERY`] of quiet is sent at once, one
/// sooner is sent [`STATUS_EVERY`] after the last, with the latest line by then. The task that
/// sends those later lines is started with the line sent at once, so a change that follows soon
/// (the "idle" on an answer's path, a few milliseconds after "proving …") only records itself.
struct StatusLine {
    line: String,
    /// A task will look again [`STATUS_EVERY`] after the last line sent.
    watched: bool,
    /// The line changed since it was last sent.
    changed: bool,
}

impl Worker {
    /// A worker proving `kind` in prover processes under `limits`, serving within `bounds`,
    /// keeping finished proofs within `cache`.
    pub fn new(
        kind: ProofKind,
        limits: Limits,
        bounds: Bounds,
        cache: share::Limits,
    ) -> std::io::Result<Self> {
        Ok(Worker {
            inner: Arc::new(Inner {
                kind,
                processes: ProverProcesses::new(kind, limits)?,
                bounds,
                slot: Arc::new(Semaphore::new(1)),
                joiners: Arc::new(Semaphore::new(transport::MAX_JOINERS)),
                proofs: share::Proofs::new(cache, share::Gauges::detached()),
                served: AtomicU64::new(0),
                accepting: AtomicBool::new(true),
                spare_retrying: AtomicBool::new(false),
                status: std::sync::Mutex::new(StatusLine {
                    line: "idle".to_owned(),
                    watched: false,
                    changed: false,
                }),
            }),
        })
    }

    /// The proof kind served.
    pub fn kind(&self) -> ProofKind {
        self.inner.kind
    }

    /// The prover processes' limits in force.
    pub fn limits(&self) -> Limits {
        self.inner.processes.limits()
    }

    /// New limits for the proofs that start from now on (reload).
    pub fn set_limits(&self, limits: Limits) {
        self.inner.processes.set_limits(limits);
        self.prepare();
    }

    /// New proof cache limits (reload); what no longer fits is dropped.
    pub fn set_proof_cache(&self, limits: share::Limits) {
        self.inner.proofs.set_limits(limits);
    }

    /// Starts a spare prover process in the background, [`SPARE_DELAY`] from now, so the next
    /// request does not wait for one. It is called when the slot frees, not while a proof runs:
    /// a starting process (exec, then Miden's kernel and library decoded: about 8.5 ms of CPU)
    /// takes CPU from the proof, and from the answer on its way out, on a small machine. A request
    /// that comes before the spare does starts a process of its own. After a batch or block
    /// proof the process that made it is usually kept as the spare: then there is nothing to
    /// start, and no task is spawned on the answer's path.
    fn prepare(&self) {
        if self.inner.processes.has_spare() {
            return;
        }
        let worker = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(SPARE_DELAY).await;
                worker.start_spare().await;
            });
        }
    }

    /// Starts the spare. While it cannot start (out of descriptors or processes), one task
    /// tries again every [`SPARE_RETRY`] while the worker is idle (a proof keeps its CPU), with
    /// one warning for the whole shortage, so the first request after it finds a spare waiting.
    async fn start_spare(&self) {
        let Err(err) = self.inner.processes.prepare() else { return };
        if self.inner.spare_retrying.swap(true, Ordering::SeqCst) {
            return;
        }
        let every = humantime::format_duration(SPARE_RETRY);
        warn!(error = %err, "cannot start a spare prover process; trying again every {every}");
        loop {
            tokio::time::sleep(SPARE_RETRY).await;
            if self.inner.slot.available_permits() == 0 {
                continue;
            }
            match self.inner.processes.prepare() {
                Ok(true) => {
                    info!("prover processes start again");
                    break;
                }
                // Stopping, or a process out proving will come back as the spare.
                Ok(false) => break,
                Err(_) => {}
            }
        }
        self.inner.spare_retrying.store(false, Ordering::SeqCst);
    }

    /// The worker's slot if it is free: one proof at a time.
    fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inner.slot).try_acquire_owned().ok()
    }

    /// A joiner's place, while a proof runs: the call may be the same request.
    fn try_join(&self) -> Option<OwnedSemaphorePermit> {
        if !self.inner.proofs.is_running() {
            return None;
        }
        Arc::clone(&self.inner.joiners).try_acquire_owned().ok()
    }

    /// True while a proof runs.
    pub fn is_busy(&self) -> bool {
        self.inner.slot.available_permits() == 0
    }

    /// The server has stopped: no spare prover process is left behind, and those killed after
    /// their answer are reaped (at most 5 s), so the unit's cgroup empties with the worker.
    pub async fn shutdown(&self) {
        self.inner.processes.shutdown(std::time::Duration::from_secs(5)).await;
    }

    /// Refuse new work from now on (SIGTERM); the proof in flight continues.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// The one-line state for `STATUS=`: "idle" or "proving transaction for account 0x…".
    pub fn status_line(&self) -> String {
        self.lock_status().line.clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, StatusLine> {
        self.inner.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `line` the status; sends it now or, within [`STATUS_EVERY`] of the last line sent,
    /// leaves it to the task that sends the latest line then (see [`StatusLine`]).
    fn set_status(&self, line: String) {
        let mut status = self.lock_status();
        status.line = line;
        if status.watched {
            status.changed = true;
            return;
        }
        systemd::status(&status.line);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        status.watched = true;
        let worker = self.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(STATUS_EVERY).await;
                let mut status = worker.lock_status();
                if !std::mem::take(&mut status.changed) {
                    status.watched = false;
                    return;
                }
                systemd::status(&status.line);
            }
        });
    }

    /// Refuses a request of a proof type this worker does not serve, and any request once it is
    /// shutting down.
    fn check(&self, proof_type: i32) -> Result<(), WorkerError> {
        let requested = ProofKind::from_wire(proof_type)?;
        Span::current().record("proof_type", requested.as_str());
        if requested != self.kind() {
            return Err(WorkerError::WrongProofType { requested, served: self.kind() });
        }
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        Ok(())
    }

    /// Answers one request: with a kept proof, by joining the identical running proof, or by
    /// proving it in a prover process. `admitted` is what the call took when its headers arrived,
    /// if they were seen.
    async fn prove_request(
        &self,
        request: proto::ProofRequest,
        admitted: Option<Admitted>,
    ) -> Result<(Bytes, Served), Refusal> {
        self.check(request.proof_type)?;
        let key = share::digest(request.proof_type, &request.payload);
        let (mut slot, _joiner) = match admitted {
            Some(Admitted::Slot(slot)) => (Some(slot), None),
            Some(Admitted::Joiner(place)) => (None, Some(place)),
            None => (self.try_admit(), None),
        };
        let found = match (&slot, self.inner.proofs.join(&key)) {
            (_, Some(found)) => found,
            (Some(_), None) => self.inner.proofs.find(&key),
            (None, None) => {
                // Not the running proof; but that may have ended while this body arrived.
                slot = Some(self.try_admit().ok_or(WorkerError::Busy)?);
                self.inner.proofs.find(&key)
            }
        };
        match found {
            Found::Cached(proof) => Ok((proof, Served::Cached)),
            Found::Running(waiter) => {
                drop(slot);
                info!("an identical request is being proved: waiting for its proof");
                match waiter.outcome().await {
                    Outcome::Proof(proof) => Ok((proof, Served::Joined)),
                    Outcome::Final(status) | Outcome::Retry(status) => Err(Refusal::Shared(status)),
                }
            }
            Found::New(waiter) => {
                let slot = slot.unwrap_or_else(|| unreachable!("only a slot holder leads"));
                let landing = share::Landing::new(self.clone(), key, &waiter);
                let attempt = async move {
                    let worker = landing.holder().clone();
                    let outcome = match worker.prove_in_process(&request.payload, slot).await {
                        Ok(proof) => Outcome::Proof(Bytes::from(proof)),
                        Err(err) => Outcome::of(err.into_status()),
                    };
                    landing.land(outcome);
                }
                .instrument(Span::current());
                // The attempt runs in this future; if this client leaves while another waits, it
                // moves to a task of its own, otherwise it is dropped (the process killed).
                match share::Leader::new(waiter, attempt).outcome().await {
                    Outcome::Proof(proof) => Ok((proof, Served::Proved)),
                    Outcome::Final(status) | Outcome::Retry(status) => Err(Refusal::Proof(status)),
                }
            }
        }
    }

    /// Proves `payload` in a prover process, holding the slot until that process is gone (also
    /// when this future is dropped, which kills the process: then the worker is idle at once).
    async fn prove_in_process(
        &self,
        payload: &[u8],
        slot: OwnedSemaphorePermit,
    ) -> Result<Vec<u8>, WorkerError> {
        let idle = Idle { worker: self.clone(), _permit: slot };
        let span = Span::current();
        let started = Instant::now();
        let result = self
            .inner
            .processes
            .prove(
                payload,
                |subject| {
                    span.record("subject", subject);
                    self.set_status(format!("proving {subject}"));
                },
                idle,
            )
            .await
            .map_err(WorkerError::from);
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
    }
}

impl share::HoldsProofs for Worker {
    fn proofs(&self) -> &share::Proofs {
        &self.inner.proofs
    }
}

/// A `Prove` call answered without a proof.
enum Refusal {
    /// Refused before any proving (logged by the handler).
    Early(WorkerError),
    /// Its own proof failed (logged where it ran).
    Proof(Status),
    /// The identical request's proof it joined failed.
    Shared(Status),
}

impl From<WorkerError> for Refusal {
    fn from(err: WorkerError) -> Self {
        Refusal::Early(err)
    }
}

/// Held while a prover process lives; returns the worker to idle when dropped.
struct Idle {
    worker: Worker,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.worker.inner.served.fetch_add(1, Ordering::Relaxed);
        self.worker.set_status("idle".to_owned());
        self.worker.prepare();
    }
}

#[tonic::async_trait]
impl Api for Worker {
    async fn prove(
        &self,
        mut request: Request<proto::ProofRequest>,
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
        let admitted = request.extensions_mut().remove::<Admission>().and_then(Admission::take);
        let result =
            self.prove_request(request.into_inner(), admitted).instrument(span.clone()).await;
        let duration_ms = started.elapsed().as_millis();
        match result {
            Ok((proof, served)) => {
                // A proof made here was logged where it was made.
                if served != Served::Proved {
                    span.in_scope(|| {
                        info!(
                            outcome = served.as_str(),
                            duration_ms,
                            proof_bytes = proof.len(),
                            "answered with an identical request's proof"
                        );
                    });
                }
                Ok(Response::new(proto::Proof { payload: Vec::from(proof) }))
            }
            Err(Refusal::Early(err)) => {
                span.in_scope(|| {
                    info!(outcome = err.outcome(), duration_ms, error = %err, "request refused");
                });
                Err(err.into_status())
            }
            Err(Refusal::Proof(status)) => Err(status),
            Err(Refusal::Shared(status)) => {
                span.in_scope(|| {
                    info!(
                        outcome = "joined",
                        duration_ms,
                        error = status.message(),
                        "the identical request's proof failed"
                    );
                });
                Err(status)
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

/// Serves `worker` on `listener` (over the TLS `tls` holds, if any) until `shutdown` resolves,
/// then stops taking connections and returns once the requests in flight have been answered.
pub async fn serve(
    worker: Worker,
    listener: TcpListener,
    tls: ServerTlsCell,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ApiServer<Worker>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid: they were produced by the build script")
        .max_decoding_message_size(SMALL_MESSAGE);

    let bounds = worker.inner.bounds;
    let incoming = transport::incoming(listener, bounds, tls);
    let shutdown = async move {
        shutdown.await;
        health.set_not_serving::<ApiServer<Worker>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    worker.prepare();
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(WORKER_STREAM_WINDOW))
        .initial_connection_window_size(Some(WORKER_CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME_SIZE))
        .max_concurrent_streams(Some(WORKER_MAX_CONCURRENT_STREAMS))
        .http2_max_header_list_size(Some(16 << 10))
        .http2_keepalive_interval(Some(WORKER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(WORKER_KEEPALIVE_TIMEOUT))
        .accept_http1(true)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(transport::AdmissionLayer::new(worker.clone()))
        .add_service(
            ApiServer::new(worker.clone())
                .max_decoding_message_size(bounds.max_request_size)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(WorkerStatusApiServer::new(worker).max_decoding_message_size(SMALL_MESSAGE))
        .add_service(health_service.max_decoding_message_size(SMALL_MESSAGE))
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
