//! STAND-IN workers: they speak the worker's gRPC (`Api`, `WorkerStatusApi`, `grpc.health.v1`),
//! answer every request after a fixed delay with a dummy proof, and refuse a second request while
//! busy, as a real worker does. Used only to load the proxy beyond what real proving allows, and
//! (a MORTAL stand-in, [`start_mortal`]) to die on a marked payload, as no real worker does any
//! more since its prover processes contain what an input does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miden_proving_service::proto::api_server::{Api, ApiServer};
use miden_proving_service::proto::worker_status_api_server::{
    WorkerStatusApi, WorkerStatusApiServer,
};
use miden_proving_service::proto::{Proof, ProofRequest, ProofType, WorkerStatus};
use miden_proving_service::wire;
use tonic::{Request, Response, Status};

/// A stand-in worker's shared state.
#[derive(Clone)]
pub struct StandIn {
    busy: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    version: &'static str,
    delay: Duration,
    /// Requests it received.
    received: Arc<AtomicU64>,
    /// A mortal stand-in: the payload prefix it dies of, and how it dies.
    mortal: Option<(&'static [u8], Arc<Death>)>,
    answer: Answer,
    /// How long its busy answer takes, in milliseconds ([`StandIn::answer_busy_after`]).
    busy_after_ms: Arc<AtomicU64>,
    /// Nanoseconds its handler spent on the requests it answered with a proof.
    handler_nanos: Arc<AtomicU64>,
}

/// How a stand-in waits out its delay and what it answers.
#[derive(Clone, Copy)]
pub enum Answer {
    /// Sleeps on a thread, within ~0.1 ms of the delay, and answers 84 KB, the size of a
    /// transaction proof.
    Proof,
    /// Sleeps on Tokio's timer, which rounds up to its 1 ms ticks, and answers 1 KB: the
    /// smallest answer, so that what the proxy adds shows on its own.
    Small,
}

/// How a mortal stand-in dies: every connection it accepted is shut down, it stops listening.
#[derive(Default)]
struct Death {
    connections: Mutex<Vec<std::net::TcpStream>>,
    died: tokio::sync::Notify,
    dead: AtomicBool,
}

impl Death {
    fn die(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().expect("connections").drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
        self.died.notify_one();
    }
}

impl StandIn {
    /// True while it works on a request.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Requests it answered with a proof.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    fn new(
        version: &'static str,
        delay: Duration,
        mortal: Option<(&'static [u8], Arc<Death>)>,
        answer: Answer,
    ) -> Self {
        StandIn {
            busy: Arc::default(),
            served: Arc::default(),
            version,
            delay,
            received: Arc::default(),
            mortal,
            answer,
            busy_after_ms: Arc::default(),
            handler_nanos: Arc::default(),
        }
    }

    /// Time its handler spent on the requests it answered with a proof, from taking the request
    /// to giving the answer back to tonic: the delay, and how far the sleep overshot it.
    pub fn handler_time(&self) -> Duration {
        Duration::from_nanos(self.handler_nanos.load(Ordering::SeqCst))
    }

    /// Makes its busy answer (to a request that comes while it works on another) take `delay`,
    /// as one from a worker across a slow link does: what the proxy does meanwhile shows.
    pub fn answer_busy_after(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.busy_after_ms.store(ms, Ordering::SeqCst);
    }

    /// `Prove` calls that reached it.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// True once a mortal stand-in died of a marked payload.
    pub fn dead(&self) -> bool {
        self.mortal.as_ref().is_some_and(|(_, death)| death.dead.load(Ordering::SeqCst))
    }
}

#[tonic::async_trait]
impl Api for StandIn {
    async fn prove(&self, request: Request<ProofRequest>) -> Result<Response<Proof>, Status> {
        self.received.fetch_add(1, Ordering::SeqCst);
        if let Some((marker, death)) = &self.mortal
            && request.get_ref().payload.starts_with(marker)
        {
            death.die();
            // The connection is gone: no answer goes out.
            std::future::pending::<()>().await;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            let after = Duration::from_millis(self.busy_after_ms.load(Ordering::SeqCst));
            tokio::time::sleep(after).await;
            return Err(Status::resource_exhausted("Server is busy handling another request"));
        }
        let taken = std::time::Instant::now();
        let delay = self.delay;
        let size = match self.answer {
            // A thread's sleep keeps the delay to within ~0.1 ms; the runtime's timer wheel
            // rounds up to its 1 ms ticks, which alone would cost a 50 ms stand-in 1–2 % of its
            // throughput. The thread sleeps until `delay` after the request was taken, so the
            // hand-over to the blocking thread is inside the delay, not added to it.
            Answer::Proof => {
                let due = taken + delay;
                let _ = tokio::task::spawn_blocking(move || {
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                })
                .await;
                84_000
            }
            Answer::Small => {
                tokio::time::sleep(delay).await;
                1_000
            }
        };
        let nanos = u64::try_from(taken.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.handler_nanos.fetch_add(nanos, Ordering::SeqCst);
        self.busy.store(false, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Proof { payload: vec![7; size] }))
    }
}

#[tonic::async_trait]
impl WorkerStatusApi for StandIn {
    async fn status(&self, _request: Request<()>) -> Result<Response<WorkerStatus>, Status> {
        Ok(Response::new(WorkerStatus {
            version: self.version.to_owned(),
            supported_proof_type: ProofType::Transaction.into(),
            busy: self.busy.load(Ordering::SeqCst),
            requests_served: self.served(),
        }))
    }
}

/// Starts a stand-in transaction worker on 127.0.0.1 reporting `version` (the upstream proxy
/// only accepts workers of its own version) and answering an 84 KB proof after `delay`.
pub async fn start(version: &'static str, delay: Duration) -> (SocketAddr, StandIn) {
    start_answering(version, delay, Answer::Proof).await
}

/// Starts a stand-in transaction worker as [`start`] does, answering as `answer` says.
pub async fn start_answering(
    version: &'static str,
    delay: Duration,
    answer: Answer,
) -> (SocketAddr, StandIn) {
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    start_at(bind, version, delay, answer, None).await
}

/// A tonic server with a worker's HTTP/2 flow-control windows and frame size, so that a request
/// reaches a stand-in in the frames it would reach a worker in (one 1 MiB frame, not seven of
/// HTTP/2's default 16 KiB for 109 KB).
fn server_like_a_worker() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(wire::WORKER_STREAM_WINDOW))
        .initial_connection_window_size(Some(wire::WORKER_CONNECTION_WINDOW))
        .max_frame_size(Some(wire::MAX_FRAME_SIZE))
}

/// Starts a stand-in transaction worker as [`start_answering`] does, listening on `bind` (a rig
/// host's address) and, with `tls` (PEM certificate chain and key), serving TLS.
pub async fn start_at(
    bind: SocketAddr,
    version: &'static str,
    delay: Duration,
    answer: Answer,
    tls: Option<(Vec<u8>, Vec<u8>)>,
) -> (SocketAddr, StandIn) {
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let worker = StandIn::new(version, delay, None, answer);
    let mut server = server_like_a_worker();
    if let Some((cert, key)) = tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("the stand-in's TLS settings");
    }
    tokio::spawn(
        server
            .add_service(ApiServer::new(worker.clone()).max_decoding_message_size(1 << 26))
            .add_service(WorkerStatusApiServer::new(worker.clone()))
            .add_service(health_service)
            // Without TCP_NODELAY an 84 KB answer's last segment can wait for a delayed ACK
            // (40 ms on Linux), as a real worker's never does.
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    (addr, worker)
}

/// Starts a MORTAL stand-in transaction worker: it answers like [`start`], except that a payload
/// starting with `marker` kills it as a crash would kill a worker — its connections drop
/// mid-request and its port refuses connections from then on.
pub async fn start_mortal(
    version: &'static str,
    delay: Duration,
    marker: &'static [u8],
) -> (SocketAddr, StandIn) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let death = Arc::new(Death::default());
    let worker = StandIn::new(version, delay, Some((marker, Arc::clone(&death))), Answer::Proof);
    let (accepted, incoming) =
        tokio::sync::mpsc::channel::<std::io::Result<tokio::net::TcpStream>>(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                stream = listener.accept() => stream,
                () = death.died.notified() => break,
            };
            let Ok((stream, _)) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let stream = stream.into_std().expect("a tokio stream converts");
            death.connections.lock().expect("connections").push(stream.try_clone().expect("dup"));
            let stream = tokio::net::TcpStream::from_std(stream).expect("back to tokio");
            if accepted.send(Ok(stream)).await.is_err() {
                break;
            }
        }
        // The listener is dropped here: connecting is refused from now on.
    });
    tokio::spawn(
        server_like_a_worker()
            .add_service(ApiServer::new(worker.clone()).max_decoding_message_size(1 << 26))
            .add_service(WorkerStatusApiServer::new(worker.clone()))
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(incoming)),
    );
    (addr, worker)
}
