//! Benchmark: the cost of the worker's gRPC path over proving in-process. For a transaction and a
//! batch, proves the same input in-process and through a worker process on loopback, taking the
//! two in turn, and prints the medians side by side with their ratio. The worker proves each in a
//! prover process of its own, so this is contained against in-process proving. For the
//! transaction it also prints the geometric mean of the pairs' ratios with its 95 % interval, and
//! each side's CPU time (user and system): the benchmark's own while it proves, and the worker's
//! with its reaped prover processes.
//!
//! ```sh
//! cargo build --locked --bins --examples && target/debug/examples/bench_worker [TX_RUNS] [BATCH_RUNS]
//! ```
//!
//! Batches go a third way too: through an IN-PROCESS REFERENCE SERVER, a STAND-IN started by
//! this benchmark (`bench_worker --serve-in-process`, a process of its own like the worker) that
//! serves the same `Prove` over tonic with the worker's HTTP/2 settings and proves each request
//! on its runtime thread with one warm prover: the service as it was before prover processes,
//! minus its admission layer and bookkeeping. The worker against it is what containment costs;
//! it against in-process proving is what the gRPC hop costs any worker on this machine.
//!
//! `BENCH_PROOFS_PER_PROVER_PROCESS=N` sets the batch worker's `proofs_per_prover_process`;
//! `BENCH_CPU_LATENCY_US=0` holds the machine's CPU wake-up latency limit for the run
//! (`harness::machine`).

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::procfs::CpuTimes;
use harness::requests::{request, tx_request};
use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::batch::ProposedBatch;
use miden_objects::transaction::ProvenTransaction;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::ProofKind;
use miden_proving_service::proto::ProofType;
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::api_server::{Api, ApiServer};
use miden_proving_service::proto::worker_status_api_client::WorkerStatusApiClient;
use miden_proving_service::proto::{Proof, ProofRequest};
use miden_proving_service::prover::Prover;
use miden_proving_service::wire;
use miden_tx_batch_prover::LocalBatchProver;
use tonic::{Request, Response, Status};

/// The pause before each transaction proof, in-process and through the worker.
const SETTLE: Duration = Duration::from_secs(1);

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let n = samples.len();
    if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2 }
}

// A benchmark script: one linear run, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(SERVE_IN_PROCESS) {
        return serve_in_process().await;
    }
    let mut args = std::env::args().skip(1);
    let tx_runs: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let batch_runs: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let _latency = harness::machine::hold_cpu_latency_from_env();

    // Each side proves the same request every run: the worker must not answer from a kept proof.
    let tx_worker = harness::Launch::worker_proving_every_request("transaction").start().await;
    let mut batch_launch = harness::Launch::worker_proving_every_request("batch");
    // `BENCH_PROOFS_PER_PROVER_PROCESS=1` gives the batch worker a new prover process per proof.
    if let Ok(proofs) = std::env::var("BENCH_PROOFS_PER_PROVER_PROCESS") {
        batch_launch.command.env("MPS_WORKER_PROOFS_PER_PROVER_PROCESS", proofs);
    }
    let batch_worker = batch_launch.start().await;
    let sample = harness::fixtures::sample_transactions(2).await?;
    let mut tx_api = tx_worker.api().await;
    let mut batch_api = batch_worker.api().await;

    // Transaction: in-process and through gRPC, in turn.
    let inputs = sample.inputs[0].clone();
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    // CPU seconds of each side: this process's while it proves, and the worker's with its reaped
    // prover processes (each one's start-up ahead of its request included) over the whole loop.
    let mut local_cpu = Cpu::default();
    let worker_cpu_before = cpu_seconds(Some(tx_worker.pid), true);
    for run in 1..=tx_runs {
        // Each side starts on a quiet machine: the worker's previous prover process has been
        // torn down and its next one is ready (both happen after an answer, off the request's
        // path).
        tokio::time::sleep(SETTLE).await;
        let (started, cpu) = (Instant::now(), cpu_seconds(None, false));
        harness::fixtures::prove_here(ProofKind::Transaction, &inputs)?;
        local.push(started.elapsed());
        local_cpu = local_cpu + (cpu_seconds(None, false) - cpu);
        let request = tx_request(&inputs);
        tokio::time::sleep(SETTLE).await;
        let started = Instant::now();
        tx_api.prove(request).await?;
        remote.push(started.elapsed());
        eprintln!(
            "tx run {run}/{tx_runs}: in-process {:.3?}, gRPC {:.3?}",
            local[run - 1],
            remote[run - 1]
        );
    }
    // The last prover process is reaped after its answer, off the request's path.
    tokio::time::sleep(SETTLE).await;
    let worker_cpu = cpu_seconds(Some(tx_worker.pid), true) - worker_cpu_before;
    let pairs = paired_ratio(&local, &remote);
    let (tx_local, tx_remote) = (median(local), median(remote));

    // How fast a busy worker says so: a second, different request while a proof runs.
    let mut busy = Vec::new();
    for _ in 0..3 {
        let mut first_api = tx_worker.api().await;
        let request = tx_request(&inputs);
        let first = tokio::spawn(async move { first_api.prove(request).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Another request: an identical one would join the running proof.
        let request = tx_request(&sample.inputs[1]);
        let started = Instant::now();
        let answer = tx_api.prove(request).await;
        busy.push(started.elapsed());
        let code = answer.map_or_else(|status| status.code(), |_| tonic::Code::Ok);
        assert_eq!(code, tonic::Code::ResourceExhausted, "the second request must be refused");
        first.await??;
    }

    // Batch: needs real transaction proofs, which the worker makes.
    let mut proven = Vec::new();
    for inputs in &sample.inputs {
        let proof = tx_api.prove(tx_request(inputs)).await?.into_inner();
        proven.push(ProvenTransaction::read_from_bytes(&proof.payload)?);
    }
    let batch = sample.chain.propose_transaction_batch(proven)?;
    let payload = batch.to_bytes();
    let mut reference = Reference::start().await?;
    let back_to_back =
        batch_medians(&payload, &mut batch_api, &mut reference.api, batch_runs, Duration::ZERO)
            .await?;
    // The same, 50 ms apart: what one batch sees after the machine's threads have gone idle.
    let spaced = batch_medians(
        &payload,
        &mut batch_api,
        &mut reference.api,
        batch_runs,
        Duration::from_millis(50),
    )
    .await?;
    // Context for the batch figure: what decoding and encoding alone cost, and a bare gRPC call.
    let mut codec = Vec::new();
    for _ in 0..batch_runs {
        let started = Instant::now();
        let decoded = ProposedBatch::read_from_bytes(&payload)?;
        let proven = LocalBatchProver::new(MIN_PROOF_SECURITY_LEVEL).prove(decoded)?;
        let bytes = proven.to_bytes();
        codec.push(started.elapsed());
        std::hint::black_box(bytes);
    }
    let mut status = WorkerStatusApiClient::new(batch_worker.channel().await);
    let mut rtt = Vec::new();
    for _ in 0..batch_runs {
        let started = Instant::now();
        status.status(()).await?;
        rtt.push(started.elapsed());
    }
    // The gRPC hop alone with the batch's bytes: the same payload sent as a transaction request,
    // which the batch worker refuses once the message has arrived and decoded, proving nothing.
    let mut hop = Vec::new();
    for _ in 0..batch_runs {
        let request = request(ProofType::Transaction, payload.clone());
        let started = Instant::now();
        let refused = batch_api.prove(request).await;
        hop.push(started.elapsed());
        let code = refused.map_or_else(|status| status.code(), |_| tonic::Code::Ok);
        assert_eq!(code, tonic::Code::Unimplemented, "a batch worker refuses a transaction");
    }
    println!(
        "batch payload {} bytes; in-process decode+prove+encode median {:.3} ms; \
         WorkerStatus round trip median {:.3} ms; the payload refused by the handler (the gRPC \
         hop with its bytes, no proving) median {:.3} ms",
        payload.len(),
        median(codec).as_secs_f64() * 1e3,
        median(rtt).as_secs_f64() * 1e3,
        median(hop).as_secs_f64() * 1e3
    );

    println!(
        "busy answer while a transaction proof runs: median {:.3} ms of 3",
        median(busy).as_secs_f64() * 1e3
    );
    println!("| proof | runs | in-process median | worker gRPC median | ratio | added |");
    println!("|---|---|---|---|---|---|");
    for (name, runs, local, remote) in [
        ("transaction", tx_runs, tx_local, tx_remote),
        ("batch (2 txs), back to back", batch_runs, back_to_back.local, back_to_back.worker),
        ("batch (2 txs), 50 ms apart", batch_runs, spaced.local, spaced.worker),
    ] {
        println!(
            "| {name} | {runs} | {:.3} ms | {:.3} ms | {:.4} | {:.3} ms |",
            ms(local),
            ms(remote),
            remote.as_secs_f64() / local.as_secs_f64(),
            ms(remote) - ms(local),
        );
    }
    println!(
        "transaction, {tx_runs} pairs: worker/in-process ratio of each pair, geometric mean \
         {:.4} (95 % interval {:.4}–{:.4}); the worker slower in {} pairs, faster in {}; CPU \
         seconds in-process {:.2} (user {:.2}, system {:.2}), worker with its prover processes \
         {:.2} (user {:.2}, system {:.2}): ratio {:.4}",
        pairs.mean,
        pairs.low,
        pairs.high,
        pairs.slower,
        pairs.faster,
        local_cpu.total(),
        local_cpu.user,
        local_cpu.system,
        worker_cpu.total(),
        worker_cpu.user,
        worker_cpu.system,
        worker_cpu.total() / local_cpu.total(),
    );
    println!();
    println!(
        "| batch (2 txs) | in-process | in-process reference server (stand-in) | worker | \
         added by the gRPC hop (reference − in-process) | added by containment (worker − \
         reference) |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, sides) in [("back to back", back_to_back), ("50 ms apart", spaced)] {
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            ms(sides.local),
            ms(sides.reference),
            ms(sides.worker),
            ms(sides.reference) - ms(sides.local),
            ms(sides.worker) - ms(sides.reference),
        );
    }
    reference.child.kill()?;
    Ok(())
}

/// The ratio of each pair (`remote[i] / local[i]`, taken one after the other), summed up.
struct PairedRatio {
    /// Geometric mean of the pairs' ratios.
    mean: f64,
    /// The mean's 95 % interval, from the spread of the pairs' log ratios (Student's t).
    low: f64,
    high: f64,
    /// Pairs in which the worker took longer, and shorter, than in-process.
    slower: usize,
    faster: usize,
}

fn paired_ratio(local: &[Duration], remote: &[Duration]) -> PairedRatio {
    let logs: Vec<f64> =
        local.iter().zip(remote).map(|(l, r)| (r.as_secs_f64() / l.as_secs_f64()).ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let variance = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    // Student's t at 97.5 % for n − 1 degrees of freedom, near enough for 5 or more pairs.
    let t = match logs.len() {
        ..=5 => 2.78,
        6..=10 => 2.26,
        11..=20 => 2.09,
        21..=40 => 2.02,
        _ => 1.98,
    };
    let half = t * (variance / n).sqrt();
    PairedRatio {
        mean: mean.exp(),
        low: (mean - half).exp(),
        high: (mean + half).exp(),
        slower: logs.iter().filter(|&&x| x > 0.0).count(),
        faster: logs.iter().filter(|&&x| x < 0.0).count(),
    }
}

/// The CPU seconds of `pid`, or of this process, user and system, with those of its reaped
/// children when `children`.
fn cpu_seconds(pid: Option<i32>, children: bool) -> Cpu {
    let times = pid.map_or_else(CpuTimes::own, CpuTimes::of);
    let own = Cpu { user: times.user, system: times.system };
    if children {
        own + Cpu { user: times.children_user, system: times.children_system }
    } else {
        own
    }
}

/// CPU seconds, user and system.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, other: Cpu) -> Cpu {
        Cpu { user: self.user + other.user, system: self.system + other.system }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, other: Cpu) -> Cpu {
        Cpu { user: self.user - other.user, system: self.system - other.system }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The medians of one batch series, one per side.
#[derive(Clone, Copy)]
struct Sides {
    local: Duration,
    reference: Duration,
    worker: Duration,
}

/// Proves the batch `payload` in-process, through the reference server and through the worker in
/// turn, `runs` times each with `gap` before every proof; the medians.
async fn batch_medians(
    payload: &[u8],
    api: &mut ApiClient<tonic::transport::Channel>,
    reference_api: &mut ApiClient<tonic::transport::Channel>,
    runs: usize,
    gap: Duration,
) -> anyhow::Result<Sides> {
    let (mut local, mut reference, mut remote) = (Vec::new(), Vec::new(), Vec::new());
    // In-process proving as a worker without prover processes would do it: one warm prover
    // decodes each request's payload, proves it and encodes the proof.
    let mut prover = Prover::new(ProofKind::Batch);
    for _ in 0..runs {
        tokio::time::sleep(gap).await;
        let started = Instant::now();
        let job = prover.decode(payload)?;
        std::hint::black_box(prover.prove(job)?);
        local.push(started.elapsed());
        tokio::time::sleep(gap).await;
        let started = Instant::now();
        reference_api.prove(request(ProofType::Batch, payload.to_vec())).await?;
        reference.push(started.elapsed());
        tokio::time::sleep(gap).await;
        let request = request(ProofType::Batch, payload.to_vec());
        let started = Instant::now();
        api.prove(request).await?;
        remote.push(started.elapsed());
    }
    Ok(Sides { local: median(local), reference: median(reference), worker: median(remote) })
}

/// The argument that makes this binary the in-process reference server.
const SERVE_IN_PROCESS: &str = "--serve-in-process";

/// The in-process reference server (a STAND-IN), run by this benchmark as a child process.
struct Reference {
    child: std::process::Child,
    api: ApiClient<tonic::transport::Channel>,
}

impl Reference {
    /// Starts `bench_worker --serve-in-process` and connects to the port it prints.
    async fn start() -> anyhow::Result<Reference> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg(SERVE_IN_PROCESS)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line.trim().parse()?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let api = ApiClient::new(channel).max_decoding_message_size(wire::MAX_MESSAGE_SIZE);
        Ok(Reference { child, api })
    }
}

/// The reference server's one service: proves batches on the runtime thread that decoded the
/// request, with one warm prover.
struct InProcess {
    prover: Mutex<Prover>,
}

#[tonic::async_trait]
impl Api for InProcess {
    async fn prove(&self, request: Request<ProofRequest>) -> Result<Response<Proof>, Status> {
        let mut prover = self.prover.lock().expect("one request at a time");
        let job = prover
            .decode(&request.get_ref().payload)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let payload = prover.prove(job).map_err(|err| Status::internal(err.to_string()))?;
        Ok(Response::new(Proof { payload }))
    }
}

/// `bench_worker --serve-in-process`: serves [`InProcess`] on a loopback port, which it prints,
/// with the worker's HTTP/2 settings, until killed.
async fn serve_in_process() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let service = InProcess { prover: Mutex::new(Prover::new(ProofKind::Batch)) };
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(wire::WORKER_STREAM_WINDOW))
        .initial_connection_window_size(Some(wire::WORKER_CONNECTION_WINDOW))
        .max_frame_size(Some(wire::MAX_FRAME_SIZE))
        .add_service(
            ApiServer::new(service)
                .max_decoding_message_size(wire::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(wire::MAX_MESSAGE_SIZE),
        )
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}
