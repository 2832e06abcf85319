//! Benchmarks of the proxy, each side by side with its baseline in one run.
//!
//! ```sh
//! cargo build --locked --bins --examples && target/debug/examples/bench_proxy [fake|real|batch|cache|fleet|all]
//! unshare --net sh -c 'ip link set lo up && UPSTREAM_BIN=… target/debug/examples/bench_proxy upstream'
//! ```
//!
//! `BENCH_CPU_LATENCY_US=0` holds the machine's CPU wake-up latency limit for the run
//! (`harness::machine`), so that the figures show the proxy rather than the VM's wake-ups.
//!
//! - `fake`: STAND-IN workers (in this process; they speak the worker's gRPC with its HTTP/2
//!   windows and frame size, answer after a fixed 50 ms and refuse a second request while busy,
//!   like a worker) — 8 of them, 109 KB payloads. Added latency: 8 clients through the proxy
//!   against 8 clients calling the workers directly (one each, no queueing either way), in five
//!   rounds of 40 requests a client taken in turn. Throughput: 64 clients through the proxy, ≥ 2,000
//!   requests, against the ideal 8 / 50 ms = 160 requests/s, and a stand-in's cycle split in
//!   two: its handler's own time (the 50 ms and the sleep's overshoot), and the rest, from its
//!   answer to its next request, with clients calling it directly and through the proxy. Then
//!   the added latency again with stand-ins that sleep on Tokio's timer and answer 1 KB, with
//!   109 KB requests and with 1 KB ones (what storing and forwarding a request costs).
//! - `real`: real proofs. 4 concurrent transaction requests through the proxy and one worker
//!   against the same 4 proofs in-process one after another (wall ratio, and the proxy's CPU
//!   seconds from /proc); then batch proofs through the proxy against in-process (medians). The
//!   proof cache is off there: proving is what is measured.
//! - `fleet`: the `fake` load on hosts made of network namespaces (root; `harness::rig`): two
//!   stand-ins on each of four worker hosts, the clients on a client host, through one proxy and
//!   through two, in plaintext and with TLS on both hops; throughput against the ideal, the
//!   added latency of 8 clients, and TLS's cost as the proxies' CPU per request.
//! - `cache`: real transaction proofs and the proof cache. A request answered from the cache
//!   against proving it (medians); then a retry storm — 8 clients over 2 distinct inputs and two
//!   workers, each client with a deadline of half the proof time, retrying until it has its proof
//!   — with the cache on, and with it off (each client then gives up after 3 tries): proofs
//!   started and delivered, and the workers' CPU time, against the number of distinct inputs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::requests::{request, tx_request};
use harness::rig::Rig;
use harness::standin::{Answer, StandIn, start_at};
use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::transaction::ProvenTransaction;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::ProofKind;
use miden_proving_service::proto::ProofType;
use miden_proving_service::proto::api_client::ApiClient;
use miden_tx_batch_prover::LocalBatchProver;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const FAKE_DELAY: Duration = Duration::from_millis(50);
const PAYLOAD_BYTES: usize = 109_000;

async fn start_fake_workers(n: usize, version: &'static str) -> Vec<SocketAddr> {
    start_fake_workers_answering(n, version, Answer::Proof).await
}

async fn start_fake_workers_answering(
    n: usize,
    version: &'static str,
    answer: Answer,
) -> Vec<SocketAddr> {
    start_standins(n, version, answer).await.0
}

/// `n` stand-ins, their addresses and their handles.
async fn start_standins(
    n: usize,
    version: &'static str,
    answer: Answer,
) -> (Vec<SocketAddr>, Vec<StandIn>) {
    let mut started = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (addr, standin) = harness::standin::start_answering(version, FAKE_DELAY, answer).await;
        started.0.push(addr);
        started.1.push(standin);
    }
    started
}

/// The stand-ins' handler time so far.
fn handler_time(standins: &[StandIn]) -> Duration {
    standins.iter().map(StandIn::handler_time).sum()
}

/// Where a stand-in's time went in `load`, which began when their handler time was `before`:
/// its handler's mean time per answer (the 50 ms and the sleep's overshoot) and the rest of its
/// cycle, from an answer to its next request (tonic's work on both ends, and every hop between).
fn cycle(standins: &[StandIn], before: Duration, load: &Load) -> (f64, f64) {
    let answered = load.latencies.len() as f64;
    let handler = ms(handler_time(standins).saturating_sub(before)) / answered;
    let cycle = ms(load.wall) * standins.len() as f64 / answered;
    (handler, cycle - handler)
}

async fn client(addr: SocketAddr) -> ApiClient<Channel> {
    client_over(addr, None).await
}

/// A client of `addr`: cleartext, or TLS trusting the PEM CA `ca`.
async fn client_over(addr: SocketAddr, ca: Option<Vec<u8>>) -> ApiClient<Channel> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}")).expect("uri");
    if let Some(ca) = ca {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).expect("TLS settings");
    }
    let channel = endpoint.connect().await.expect("connect");
    ApiClient::new(channel).max_decoding_message_size(1 << 26)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0 ≤ index < len
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Result of one load run.
#[derive(Default)]
struct Load {
    /// Latencies of the answered requests, sorted.
    latencies: Vec<Duration>,
    /// Requests sent in all.
    sent: usize,
    /// Wall time of the run.
    wall: Duration,
}

impl Load {
    /// `other`'s requests and time added to these (the latencies sorted again by the caller).
    fn add(&mut self, other: Load) {
        self.latencies.extend(other.latencies);
        self.sent += other.sent;
        self.wall += other.wall;
    }
}

/// How many rounds [`in_turn`] takes of each side.
const ROUNDS: usize = 5;

/// [`ROUNDS`] rounds of 40 requests a client on each of `sides`, taken in turn (A B A B …) so
/// that the machine's drift over the run reaches every side alike; each side's rounds pooled.
async fn in_turn<const N: usize>(
    sides: [Vec<SocketAddr>; N],
    payload_bytes: usize,
    deadline: Duration,
) -> [Load; N] {
    let mut loads = std::array::from_fn(|_| Load::default());
    for _ in 0..ROUNDS {
        for (side, load) in sides.iter().zip(&mut loads) {
            load.add(run_load_sized(side.clone(), 40, deadline, None, payload_bytes).await);
        }
    }
    for load in &mut loads {
        load.latencies.sort();
    }
    loads
}

/// Numbers the requests of every load run, so that no two are the same.
static DISTINCT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One client loop per target, each sending `per_client` requests one after another, until
/// `deadline`; a request unanswered by then counts as sent, not answered.
async fn run_load(targets: Vec<SocketAddr>, per_client: usize, deadline: Duration) -> Load {
    run_load_over(targets, per_client, deadline, None).await
}

/// [`run_load`] over TLS when `ca` is given.
async fn run_load_over(
    targets: Vec<SocketAddr>,
    per_client: usize,
    deadline: Duration,
    ca: Option<Vec<u8>>,
) -> Load {
    run_load_sized(targets, per_client, deadline, ca, PAYLOAD_BYTES).await
}

/// [`run_load_over`] with payloads of `payload_bytes` (at least 8: each carries its number).
async fn run_load_sized(
    targets: Vec<SocketAddr>,
    per_client: usize,
    deadline: Duration,
    ca: Option<Vec<u8>>,
    payload_bytes: usize,
) -> Load {
    let request = request(ProofType::Transaction, vec![1; payload_bytes]);
    let started = Instant::now();
    let end = tokio::time::Instant::now() + deadline;
    let mut tasks = Vec::new();
    for target in targets {
        let request = request.clone();
        let mut api = client_over(target, ca.clone()).await;
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut sent) = (Vec::with_capacity(per_client), 0);
            for _ in 0..per_client {
                sent += 1;
                // Every request different: the proxy would answer identical ones from one proof.
                let mut request = request.clone();
                let n = DISTINCT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                request.payload[..8].copy_from_slice(&n.to_le_bytes());
                let asked = Instant::now();
                match tokio::time::timeout_at(end, api.prove(request)).await {
                    Ok(Ok(_)) => latencies.push(asked.elapsed()),
                    Ok(Err(status)) => eprintln!("request failed: {status:?}"),
                    Err(_) => break,
                }
            }
            (latencies, sent)
        }));
    }
    let mut load = Load { latencies: Vec::new(), sent: 0, wall: Duration::ZERO };
    for task in tasks {
        let (latencies, sent) = task.await.expect("join");
        load.latencies.extend(latencies);
        load.sent += sent;
    }
    load.wall = started.elapsed();
    load.latencies.sort();
    load
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, load: &Load) {
    if load.latencies.is_empty() {
        println!(
            "| {name} | 0 of {} answered in {:.1} s | – | – | – |",
            load.sent,
            load.wall.as_secs_f64()
        );
        return;
    }
    println!(
        "| {name} | {} of {} | {:.1} req/s | {:.2} ms | {:.2} ms |",
        load.latencies.len(),
        load.sent,
        load.latencies.len() as f64 / load.wall.as_secs_f64(),
        ms(percentile(&load.latencies, 0.5)),
        ms(percentile(&load.latencies, 0.99))
    );
}

async fn fake() {
    let (workers, standins) = start_standins(8, env!("CARGO_PKG_VERSION"), Answer::Proof).await;
    let mut launch = harness::Launch::proxy_for("transaction", &workers);
    launch.command.env("MPS_MAX_QUEUE_ITEMS", "128");
    // The benchmark's requests are all distinct; `BENCH_PROOF_CACHE_SIZE=0` shows what keeping
    // their proofs costs.
    if let Ok(size) = std::env::var("BENCH_PROOF_CACHE_SIZE") {
        launch.command.env("MPS_PROOF_CACHE_SIZE", size);
    }
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(8, 8).await;

    let deadline = Duration::from_secs(120);
    let before = handler_time(&standins);
    let direct = run_load(workers.clone(), 40, deadline).await;
    let direct_cycle = cycle(&standins, before, &direct);
    let [direct, through] =
        in_turn([workers.clone(), vec![proxy.daemon.addr; 8]], PAYLOAD_BYTES, deadline).await;
    let cpu_before = cpu_seconds(proxy.daemon.pid);
    let before = handler_time(&standins);
    let loaded = run_load(vec![proxy.daemon.addr; 64], 2_048 / 64, deadline).await;
    let loaded_cycle = cycle(&standins, before, &loaded);
    let cpu = cpu_seconds(proxy.daemon.pid) - cpu_before;
    println!("## fake workers (stand-ins: 8 × {FAKE_DELAY:?}, {PAYLOAD_BYTES} B payloads)");
    println!("| rig | answered | throughput | p50 | p99 |");
    println!("|---|---|---|---|---|");
    report("8 clients → workers directly", &direct);
    report("8 clients → proxy", &through);
    report("64 clients → proxy", &loaded);
    println!(
        "added by the proxy (8 clients): p50 {:.2} ms, p99 {:.2} ms; 64 clients: {:.1} % of the ideal 160 req/s; proxy CPU {:.2} s in {:.2} s",
        ms(percentile(&through.latencies, 0.5)) - ms(percentile(&direct.latencies, 0.5)),
        ms(percentile(&through.latencies, 0.99)) - ms(percentile(&direct.latencies, 0.99)),
        loaded.latencies.len() as f64 / loaded.wall.as_secs_f64() / 160.0 * 100.0,
        cpu,
        loaded.wall.as_secs_f64(),
    );
    println!(
        "a stand-in's cycle: its handler {:.3} ms, then {:.3} ms to its next request, with 8 \
         clients calling it directly; {:.3} ms, then {:.3} ms, with 64 clients through the proxy \
         ({:.1} % of the throughput the handlers' own time allows)",
        direct_cycle.0,
        direct_cycle.1,
        loaded_cycle.0,
        loaded_cycle.1,
        loaded_cycle.0 / (loaded_cycle.0 + loaded_cycle.1) * 100.0,
    );
    drop(proxy);
    small_answers(deadline).await;
}

/// The added latency of [`fake`] again, with stand-ins that sleep on Tokio's timer and answer
/// 1 KB: the proxy's hop with the least answer to carry, and a bare TCP relay's beside it; first
/// with the benchmark's 109 KB requests, then with 1 KB requests, which the proxy takes whole
/// before it forwards them (it hashes and admits a request before any worker sees it), so the
/// difference is what storing and forwarding the larger request costs.
async fn small_answers(deadline: Duration) {
    let workers = start_fake_workers_answering(8, env!("CARGO_PKG_VERSION"), Answer::Small).await;
    let mut proxy = harness::Launch::proxy_for("transaction", &workers).start_proxy().await;
    proxy.wait_healthy(8, 8).await;
    let relays = start_relays(&workers);
    for request_bytes in [PAYLOAD_BYTES, 1_000] {
        let sides = [workers.clone(), vec![proxy.daemon.addr; 8], relays.clone()];
        let [direct, through, relayed] = in_turn(sides, request_bytes, deadline).await;
        println!(
            "## fake workers on Tokio's timer (8 × {FAKE_DELAY:?}, {request_bytes} B requests, 1 KB answers)"
        );
        println!("| rig | answered | throughput | p50 | p99 |");
        println!("|---|---|---|---|---|");
        report("8 clients → workers directly", &direct);
        report("8 clients → proxy", &through);
        report("8 clients → bare TCP relays → workers", &relayed);
        let added = |load: &Load| {
            (
                ms(percentile(&load.latencies, 0.5)) - ms(percentile(&direct.latencies, 0.5)),
                ms(percentile(&load.latencies, 0.99)) - ms(percentile(&direct.latencies, 0.99)),
            )
        };
        let ((proxy_p50, proxy_p99), (relay_p50, relay_p99)) = (added(&through), added(&relayed));
        println!(
            "added by the proxy (8 clients, {request_bytes} B requests, 1 KB answers): p50 \
             {proxy_p50:.2} ms, p99 {proxy_p99:.2} ms; by a bare TCP relay: p50 {relay_p50:.2} ms, \
             p99 {relay_p99:.2} ms"
        );
    }
}

/// A bare TCP relay in front of each of `workers`, on a runtime of its own with two threads like
/// the proxy's on this machine: the cost of one more hop on the path, without HTTP/2, gRPC or
/// any of the proxy's work. Runs until the process exits.
fn start_relays(workers: &[SocketAddr]) -> Vec<SocketAddr> {
    let listeners: Vec<_> = workers
        .iter()
        .map(|&worker| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a relay");
            listener.set_nonblocking(true).expect("nonblocking");
            (listener, worker)
        })
        .collect();
    let addrs = listeners.iter().map(|(l, _)| l.local_addr().expect("relay address")).collect();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the relays' runtime");
        runtime.block_on(async move {
            for (listener, worker) in listeners {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::spawn(async move {
                    while let Ok((mut client, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let mut upstream =
                                tokio::net::TcpStream::connect(worker).await.expect("connect");
                            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        });
                    }
                });
            }
            std::future::pending::<()>().await;
        });
    });
    addrs
}

/// The same rig against upstream's proxy (`miden-remote-prover` 0.12.8, path in `UPSTREAM_BIN`).
/// It binds 0.0.0.0 on fixed ports, so run this inside a network namespace with only loopback:
/// `unshare --net sh -c 'ip link set lo up && target/debug/examples/bench_proxy upstream'`.
async fn upstream() {
    let bin = std::env::var("UPSTREAM_BIN").expect("UPSTREAM_BIN: path of miden-remote-prover");
    let workers = start_fake_workers(8, "0.12.8").await;
    let mut command = std::process::Command::new(bin);
    let list = workers.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    command
        .args(["start-proxy", "--proof-type", "transaction", "--workers", &list])
        .args(["--port", "8082", "--control-port", "8083", "--max-req-per-sec", "100000"])
        .args(["--max-queue-items", "128", "--health-check-interval", "1s"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("start the upstream proxy");
    let proxy: SocketAddr = "127.0.0.1:8082".parse().expect("addr");
    // Ready once a request is answered (it has no readiness signal).
    let request = request(ProofType::Transaction, vec![1; 16]);
    let started = Instant::now();
    loop {
        if let Ok(channel) = Channel::from_static("http://127.0.0.1:8082").connect().await
            && ApiClient::new(channel).prove(request.clone()).await.is_ok()
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "upstream proxy not answering");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Duration::from_secs(120);
    let direct = run_load(workers.clone(), 40, deadline).await;
    let through = run_load(vec![proxy; 8], 40, deadline).await;
    let cpu_before = cpu_seconds(i32::try_from(child.id()).expect("pid"));
    let loaded = run_load(vec![proxy; 64], 2_048 / 64, deadline).await;
    let cpu = cpu_seconds(i32::try_from(child.id()).expect("pid")) - cpu_before;
    println!("## upstream proxy 0.12.8, same rig");
    println!("| rig | answered | throughput | p50 | p99 |");
    println!("|---|---|---|---|---|");
    report("8 clients → workers directly", &direct);
    report("8 clients → upstream proxy", &through);
    report("64 clients → upstream proxy", &loaded);
    println!("upstream proxy CPU {:.2} s in {:.2} s", cpu, loaded.wall.as_secs_f64());
    let _ = child.kill();
    let _ = child.wait();
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    harness::procfs::CpuTimes::of(pid).total()
}

async fn real() {
    let sample = harness::fixtures::sample_transactions(4).await.expect("sample");
    let worker = harness::Launch::worker_proving_every_request("transaction").start().await;
    // Proving is what is measured: the second round's identical requests must not be answered
    // from the first round's kept proofs.
    let mut launch = harness::Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_PROOF_CACHE_SIZE", "0");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;

    // In-process one after another, and 4 concurrent clients through proxy + 1 worker, in the
    // order A B B A so that drift (temperature, other load) falls on both alike.
    let (mut local, mut remote, mut proxy_cpu) = (Duration::ZERO, Duration::ZERO, 0.0);
    let mut proven = Vec::new();
    for round in ["local", "proxy", "proxy", "local"] {
        if round == "local" {
            let started = Instant::now();
            for inputs in &sample.inputs {
                harness::fixtures::prove_here(ProofKind::Transaction, inputs).expect("prove");
            }
            local += started.elapsed();
            continue;
        }
        let cpu_before = cpu_seconds(proxy.daemon.pid);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for inputs in &sample.inputs {
            let mut api = client(proxy.daemon.addr).await;
            let request = tx_request(inputs);
            tasks.push(tokio::spawn(async move { api.prove(request).await }));
        }
        proven.clear();
        for task in tasks {
            let proof = task.await.expect("join").expect("proof").into_inner();
            proven.push(ProvenTransaction::read_from_bytes(&proof.payload).expect("decodes"));
        }
        remote += started.elapsed();
        proxy_cpu += cpu_seconds(proxy.daemon.pid) - cpu_before;
    }
    println!("## real proofs");
    println!(
        "4 transactions × 2 rounds: in-process sequential {:.2} s, 4 concurrent via proxy + 1 worker {:.2} s, ratio {:.4}; proxy CPU {:.2} s ({:.3} % of its wall time)",
        local.as_secs_f64(),
        remote.as_secs_f64(),
        remote.as_secs_f64() / local.as_secs_f64(),
        proxy_cpu,
        proxy_cpu / remote.as_secs_f64() * 100.0
    );

    batches(&sample.chain, proven[..2].to_vec()).await;
}

/// Real batch proofs, median of 50 each, taken in turn: in-process, straight to a batch worker,
/// and through a batch proxy in front of that worker — so the proxy's own hop shows apart from
/// the worker's.
async fn batches(chain: &miden_testing::MockChain, proven: Vec<ProvenTransaction>) {
    let batch_worker = harness::Launch::worker_proving_every_request("batch").start().await;
    let mut launch = harness::Launch::proxy("batch", &[&batch_worker]);
    launch.command.env("MPS_PROOF_CACHE_SIZE", "0");
    let mut batch_proxy = launch.start_proxy().await;
    batch_proxy.wait_healthy(1, 1).await;
    let batch = chain.propose_transaction_batch(proven).expect("batch");
    let payload = batch.to_bytes();
    let mut direct = client(batch_worker.addr).await;
    let mut via_proxy = client(batch_proxy.daemon.addr).await;
    let (mut local, mut worker, mut proxied) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..50 {
        let started = Instant::now();
        LocalBatchProver::new(MIN_PROOF_SECURITY_LEVEL).prove(batch.clone()).expect("batch");
        local.push(started.elapsed());
        for (api, times) in [(&mut direct, &mut worker), (&mut via_proxy, &mut proxied)] {
            let request = request(ProofType::Batch, payload.clone());
            let started = Instant::now();
            api.prove(request).await.expect("batch proof");
            times.push(started.elapsed());
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        percentile(times, 0.5).as_secs_f64() * 1e3
    };
    let (l, w, p) = (median(&mut local), median(&mut worker), median(&mut proxied));
    println!(
        "batch (2 txs, {} B), medians of 50: in-process {l:.3} ms, worker directly {w:.3} ms, via proxy + worker {p:.3} ms; added: by the worker {:.3} ms, by the proxy {:.3} ms, in all {:.3} ms",
        payload.len(),
        w - l,
        p - w,
        p - l,
    );
}

/// Only the batch comparison (two transactions are proved first to make the batch).
async fn batch_only() {
    let sample = harness::fixtures::sample_transactions(2).await.expect("sample");
    let proven = sample.inputs.iter().map(harness::fixtures::prove_transaction_here).collect();
    batches(&sample.chain, proven).await;
}

/// utime + stime of a process and of its waited-for children (a worker's prover processes),
/// in seconds.
fn cpu_seconds_with_children(pid: i32) -> f64 {
    harness::procfs::CpuTimes::of(pid).with_children()
}

// One benchmark's story, printed as it goes.
#[allow(clippy::too_many_lines)]
async fn cache() {
    let sample = harness::fixtures::sample_transactions(3).await.expect("sample");
    let request = |n: usize| tx_request(&sample.inputs[n]);
    println!("## proof cache (real transaction proofs)");

    // Proving once, then the same request answered from the cache.
    let worker = harness::Launch::worker("transaction").start().await;
    let mut launch = harness::Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_MAX_REQ_PER_SEC", "100000");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let mut api = client(proxy.daemon.addr).await;
    let started = Instant::now();
    let proof = api.prove(request(0)).await.expect("proof").into_inner();
    let proving = started.elapsed();
    let mut hits = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let again = api.prove(request(0)).await.expect("cached").into_inner();
        hits.push(started.elapsed());
        assert_eq!(again.payload, proof.payload);
    }
    hits.sort();
    println!(
        "transaction ({} B request, {} B proof): proved via proxy + worker {:.2} s; the same request again, answered from the cache: median {:.3} ms, p99 {:.3} ms (200 requests); ratio {:.5}",
        request(0).payload.len(),
        proof.payload.len(),
        proving.as_secs_f64(),
        ms(percentile(&hits, 0.5)),
        ms(percentile(&hits, 0.99)),
        percentile(&hits, 0.5).as_secs_f64() / proving.as_secs_f64(),
    );
    drop(proxy);
    drop(worker);

    // The retry storm, with the cache on and off.
    let deadline = proving / 2;
    println!(
        "retry storm: 8 clients, 2 distinct inputs, 2 workers, each client's deadline {:.2} s (half a proof)",
        deadline.as_secs_f64()
    );
    println!(
        "| cache | proofs delivered to clients | tries | attempts sent to workers | prover runs ended (workers' `requests_served`) | workers' CPU | wall |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, size) in [("on (proxy 64 MiB, workers 16 MiB)", "64MiB"), ("off", "0")] {
        // The workers keep proofs when the proxy does (their defaults), and none when it does not.
        let worker = || {
            let launch = if size == "0" {
                harness::Launch::worker_proving_every_request("transaction")
            } else {
                harness::Launch::worker("transaction")
            };
            launch.start()
        };
        let (w1, w2) = (worker().await, worker().await);
        let mut launch = harness::Launch::proxy("transaction", &[&w1, &w2]);
        launch.command.env("MPS_MAX_REQ_PER_SEC", "100000");
        launch.command.env("MPS_PROOF_CACHE_SIZE", size);
        let mut proxy = launch.start_proxy().await;
        proxy.wait_healthy(2, 2).await;
        let cpu_before = cpu_seconds_with_children(w1.pid) + cpu_seconds_with_children(w2.pid);
        let started = Instant::now();
        let max_tries = if size == "0" { 3 } else { 100 };
        let mut clients = Vec::new();
        for n in 0..8 {
            let mut api = client(proxy.daemon.addr).await;
            let request = request(1 + n % 2);
            clients.push(tokio::spawn(async move {
                for tries in 1..=max_tries {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(deadline);
                    match api.prove(call).await {
                        Ok(proof) => return (Some(proof.into_inner().payload), tries),
                        Err(status)
                            if matches!(
                                status.code(),
                                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                            ) => {}
                        Err(status) => panic!("{status:?}"),
                    }
                }
                (None, max_tries)
            }));
        }
        let (mut delivered, mut tries) = (0, 0);
        for client in clients {
            let (proof, n) = client.await.expect("join");
            if let Some(proof) = proof {
                ProvenTransaction::read_from_bytes(&proof).expect("a proof");
                delivered += 1;
            }
            tries += n;
        }
        let wall = started.elapsed();
        // Let abandoned proofs end before reading the workers' figures.
        for worker in [&w1, &w2] {
            while worker.worker_status().await.busy {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let cpu =
            cpu_seconds_with_children(w1.pid) + cpu_seconds_with_children(w2.pid) - cpu_before;
        let completed =
            w1.worker_status().await.requests_served + w2.worker_status().await.requests_served;
        let (_, scrape) = harness::http_get(proxy.metrics, "/metrics").await;
        let attempts: f64 = scrape
            .lines()
            .filter(|l| l.starts_with("mps_proxy_worker_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        println!(
            "| {name} | {delivered} of 8 | {tries} | {attempts} | {completed} | {cpu:.1} s | {:.1} s |",
            wall.as_secs_f64()
        );
    }
}

/// `fleet`: the stand-in load on hosts made of network namespaces (`harness::rig`): 8 stand-ins
/// on four worker hosts (two each), clients on a client host, through one proxy and through two
/// (clients alternating), in plaintext and with TLS on both hops (clients → proxy, proxy →
/// stand-ins). Added latency: 8 clients through the proxies against 8 clients calling the
/// stand-ins directly over the same links; throughput: 64 clients against the ideal 160 req/s;
/// TLS's cost: the proxies' CPU per request, TLS against plaintext.
async fn fleet() {
    let roles = ["client", "proxy-a", "proxy-b", "worker-1", "worker-2", "worker-3", "worker-4"];
    let rig = harness::rig::Rig::new(&roles).expect("the rig needs root and iproute2");
    let certs = tempfile::tempdir().expect("tempdir");
    let ips: Vec<std::net::IpAddr> = roles.iter().map(|r| rig.host(r).ip.into()).collect();
    harness::certs::make_ca(certs.path(), "ca");
    harness::certs::make_cert(certs.path(), "host", "ca", &ips);
    let file = |name: &str| certs.path().join(name).to_str().expect("utf-8").to_owned();
    let read = |name: &str| std::fs::read(file(name)).expect("a certificate file");
    let identity = (read("host.pem"), read("host.key"));
    println!("## the fleet rig: {}", rig.describe());
    println!("| run | answered | throughput | p50 | p99 | proxies' CPU |");
    println!("|---|---|---|---|---|---|");
    let mut cpu_per_request = Vec::new();
    for tls in [false, true] {
        let label = if tls { "TLS" } else { "plaintext" };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = fleet_standins(&rig, tls.then(|| identity.clone()), &stopped).await;
        let proxies = fleet_proxies(&rig, &workers, tls.then_some(certs.path())).await;
        let ca = tls.then(|| read("ca.pem"));
        let direct = load_from(&rig, workers.clone(), 40, ca.clone()).await;
        fleet_row(&format!("{label}: 8 clients → stand-ins directly"), &direct, None);
        for count in [1, 2] {
            let name = if count == 1 { "1 proxy" } else { "2 proxies" };
            let targets = |n: usize| (0..n).map(|i| proxies[i % count].daemon.addr).collect();
            let through = load_from(&rig, targets(8), 40, ca.clone()).await;
            fleet_row(&format!("{label}: 8 clients → {name}"), &through, None);
            let before: f64 = proxies.iter().map(|p| cpu_seconds(p.daemon.pid)).sum();
            let loaded = load_from(&rig, targets(64), 2_048 / 64, ca.clone()).await;
            let cpu = proxies.iter().map(|p| cpu_seconds(p.daemon.pid)).sum::<f64>() - before;
            fleet_row(&format!("{label}: 64 clients → {name}"), &loaded, Some(cpu));
            cpu_per_request.push(cpu / loaded.latencies.len().max(1) as f64);
            println!(
                "{label}, {name}: added p50 {:.2} ms, p99 {:.2} ms (8 clients); 64 clients {:.1} % of 160 req/s",
                ms(percentile(&through.latencies, 0.5)) - ms(percentile(&direct.latencies, 0.5)),
                ms(percentile(&through.latencies, 0.99)) - ms(percentile(&direct.latencies, 0.99)),
                loaded.latencies.len() as f64 / loaded.wall.as_secs_f64() / 160.0 * 100.0,
            );
        }
        drop(proxies);
        let _ = stop.send(true);
    }
    println!(
        "TLS's cost, the proxies' CPU per request TLS / plaintext: one proxy {:.2}×, two {:.2}×",
        cpu_per_request[2] / cpu_per_request[0],
        cpu_per_request[3] / cpu_per_request[1]
    );
}

/// Two stand-ins on each of the rig's four worker hosts, serving (over TLS with `tls`) until
/// `stopped`; TLS takes other ports, so a plaintext round's listeners may still be closing.
async fn fleet_standins(
    rig: &Rig,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> Vec<SocketAddr> {
    let ports = if tls.is_some() { [50061, 50062] } else { [50051, 50052] };
    let mut addrs = Vec::new();
    for role in ["worker-1", "worker-2", "worker-3", "worker-4"] {
        let host: Vec<SocketAddr> =
            ports.iter().map(|port| SocketAddr::new(rig.host(role).ip.into(), *port)).collect();
        let (tls, mut stopped, listen) = (tls.clone(), stopped.clone(), host.clone());
        let (ready, up) = tokio::sync::oneshot::channel();
        drop(rig.spawn_in(role, move || async move {
            let version = env!("CARGO_PKG_VERSION");
            for bind in listen {
                start_at(bind, version, FAKE_DELAY, Answer::Proof, tls.clone()).await;
            }
            let _ = ready.send(());
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        up.await.expect("the stand-ins are up");
        addrs.extend(host);
    }
    addrs
}

/// A proxy on each proxy host in front of `workers` (over TLS, both ways, with the
/// certificates in `certs`).
async fn fleet_proxies(
    rig: &Rig,
    workers: &[SocketAddr],
    certs: Option<&std::path::Path>,
) -> Vec<harness::Proxy> {
    let scheme = if certs.is_some() { "https://" } else { "" };
    let listed: Vec<String> = workers.iter().map(|a| format!("{scheme}{a}")).collect();
    let mut proxies = Vec::new();
    for role in ["proxy-a", "proxy-b"] {
        let ip = rig.host(role).ip.to_string();
        let mut launch = harness::Launch::proxy_at(&ip, "transaction", &listed);
        // 64 clients from one host: the per-client bound would be exactly full.
        launch.command.env("MPS_MAX_QUEUE_ITEMS", "128");
        launch.command.env("MPS_MAX_CONNECTIONS_PER_CLIENT", "128");
        if let Some(dir) = certs {
            launch.command.env("MPS_TLS_CERT_FILE", dir.join("host.pem"));
            launch.command.env("MPS_TLS_KEY_FILE", dir.join("host.key"));
            launch.command.env("MPS_TLS_WORKER_CA_FILE", dir.join("ca.pem"));
        }
        let mut proxy = rig.launch_in(role, launch).start_proxy().await;
        proxy.wait_healthy(8, 8).await;
        proxies.push(proxy);
    }
    proxies
}

/// [`run_load_over`] from the rig's client host.
async fn load_from(
    rig: &Rig,
    targets: Vec<SocketAddr>,
    per_client: usize,
    ca: Option<Vec<u8>>,
) -> Load {
    let deadline = Duration::from_secs(120);
    let run = move || run_load_over(targets, per_client, deadline, ca);
    rig.spawn_in("client", run).await.expect("the client host's load")
}

fn fleet_row(name: &str, load: &Load, cpu: Option<f64>) {
    let answered = load.latencies.len();
    let throughput = answered as f64 / load.wall.as_secs_f64();
    println!(
        "| {name} | {answered} of {} | {throughput:.1} req/s = {:.1} % | {:.2} ms | {:.2} ms | {} |",
        load.sent,
        throughput / 160.0 * 100.0,
        ms(percentile(&load.latencies, 0.5)),
        ms(percentile(&load.latencies, 0.99)),
        cpu.map_or_else(String::new, |cpu| format!("{cpu:.2} s")),
    );
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_owned());
    let _latency = harness::machine::hold_cpu_latency_from_env();
    if which == "fake" || which == "all" {
        fake().await;
    }
    if which == "real" || which == "all" {
        real().await;
    }
    if which == "batch" {
        batch_only().await;
    }
    if which == "cache" {
        cache().await;
    }
    if which == "upstream" {
        upstream().await;
    }
    if which == "fleet" {
        fleet().await;
    }
}
