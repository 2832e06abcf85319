//! STAND-IN workers: they speak the worker's gRPC (`Api`, `WorkerStatusApi`, `grpc.health.v1`),
//! answer every request after a fixed delay with a dummy proof, and refuse a second request while
//! busy, as a real worker does. Used only to load the proxy beyond what real proving allows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use miden_proving_service::proto::api_server::{Api, ApiServer};
use miden_proving_service::proto::worker_status_api_server::{
    WorkerStatusApi, WorkerStatusApiServer,
};
use miden_proving_service::proto::{Proof, ProofRequest, ProofType, WorkerStatus};
use tonic::{Request, Response, Status};

/// A stand-in worker's shared state.
#[derive(Clone)]
pub struct StandIn {
    busy: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    version: &'static str,
    delay: Duration,
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
}

#[tonic::async_trait]
impl Api for StandIn {
    async fn prove(&self, _request: Request<ProofRequest>) -> Result<Response<Proof>, Status> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Status::resource_exhausted("Server is busy handling another request"));
        }
        // A thread's sleep keeps the delay to within ~0.1 ms; the runtime's timer wheel rounds
        // up to its 1 ms ticks, which alone would cost a 50 ms stand-in 1–2 % of its throughput.
        let delay = self.delay;
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
        self.busy.store(false, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(Proof { payload: vec![7; 84_000] }))
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
/// only accepts workers of its own version) and answering after `delay`.
pub async fn start(version: &'static str, delay: Duration) -> (SocketAddr, StandIn) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let worker = StandIn { busy: Arc::default(), served: Arc::default(), version, delay };
    tokio::spawn(
        tonic::transport::Server::builder()
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
