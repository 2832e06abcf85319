//! The proxy daemon in front of real workers: concurrency, retries after a worker dies, busy
//! workers, the queue and its limits, health, the upstream client, gRPC-web, metrics, traces,
//! shutdown.

use std::time::{Duration, Instant};

use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::batch::ProvenBatch;
use miden_objects::transaction::TransactionInputs;
use miden_objects::utils::Deserializable;
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::proxy_status_api_client::ProxyStatusApiClient;
use miden_proving_service::proto::{ProofType, WorkerHealthStatus};
use miden_tx::TransactionVerifier;
use nix::sys::signal::Signal;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::support::fixtures::sample_transactions;
use crate::support::otlp::Collector;
use crate::support::requests::{batch_request, request, tx_request, verify_tx};
use crate::support::{Daemon, Launch, START_TIMEOUT};

const PROOF_TIMEOUT: Duration = Duration::from_secs(300);

async fn api(daemon: &Daemon) -> ApiClient<Channel> {
    daemon.api().await
}

/// Starts proving `inputs` through `daemon` in the background.
async fn spawn_prove(
    daemon: &Daemon,
    inputs: &TransactionInputs,
) -> tokio::task::JoinHandle<
    Result<tonic::Response<miden_proving_service::proto::Proof>, tonic::Status>,
> {
    let mut client = api(daemon).await;
    let request = tx_request(inputs);
    tokio::spawn(async move { client.prove(request).await })
}

fn worker_entry<'a>(status: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    status["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .find(|w| w["address"] == addr)
        .unwrap_or_else(|| panic!("{addr} missing from {status}"))
}

#[tokio::test]
async fn two_workers_serve_four_concurrent_clients() {
    let sample = sample_transactions(4).await.expect("sample transactions");
    let w1 = Launch::worker("transaction").start().await;
    let w2 = Launch::worker("transaction").start().await;
    // One worker by host name: the name stands for the address it resolves to.
    let mut launch = Launch::proxy("transaction", &[&w1]);
    let by_name = format!("localhost:{}", w2.addr.port());
    launch.command.arg(&by_name);
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let mut clients = Vec::new();
    for inputs in &sample.inputs {
        clients.push(spawn_prove(&proxy.daemon, inputs).await);
    }
    for client in clients {
        let proof = client.await.expect("join").expect("every client gets a proof");
        verify_tx(&proof.into_inner().payload);
    }
    let status = proxy.status_json().await;
    let found = worker_entry(&status, &w2.addr.to_string());
    assert_eq!(found["name"], by_name.as_str(), "shown with the name it was found under");
    let served: Vec<u64> = [w1.addr.to_string(), w2.addr.to_string()]
        .iter()
        .map(|address| worker_entry(&status, address)["requests_served"].as_u64().expect("n"))
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 4, "{status}");
    assert!(served.iter().all(|&n| n >= 1), "both workers were used: {status}");
    assert_eq!(status["requests_served"], 4);
}

#[tokio::test]
async fn a_worker_killed_mid_proof_is_retried_on_another_and_used_again_after_restart() {
    let sample = sample_transactions(3).await.expect("sample transactions");
    let mut w1 = Launch::worker("transaction").start().await;
    let mut w2 = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&w1, &w2]).start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let first = spawn_prove(&proxy.daemon, &sample.inputs[0]).await;
    // Whichever worker got it: kill it while it proves.
    let victim_is_w1 = tokio::select! {
        _ = w1.notify.wait_for_status("proving", PROOF_TIMEOUT) => true,
        _ = w2.notify.wait_for_status("proving", PROOF_TIMEOUT) => false,
    };
    let (victim, survivor) = if victim_is_w1 { (&mut w1, &w2) } else { (&mut w2, &w1) };
    let victim_addr = victim.addr;
    victim.signal(Signal::SIGKILL);
    victim.wait(START_TIMEOUT).await;

    let proof = first.await.expect("join").expect("the client still gets a proof");
    verify_tx(&proof.into_inner().payload);
    assert_eq!(survivor.worker_status().await.requests_served, 1, "the survivor proved it");

    let status = proxy.status_json().await;
    let dead = worker_entry(&status, &victim_addr.to_string());
    let reason = dead["status"]["Unhealthy"]["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "dead worker unhealthy with a reason: {status}");
    let grpc = ProxyStatusApiClient::new(proxy.daemon.channel().await)
        .status(())
        .await
        .expect("proxy status")
        .into_inner();
    let dead = grpc.workers.iter().find(|w| w.address == victim_addr.to_string()).expect("listed");
    assert_eq!(dead.status, WorkerHealthStatus::Unhealthy as i32);

    // Restart it on the same port: healthy again, and used.
    let restarted = Launch::worker_at("transaction", victim_addr.port()).start().await;
    proxy.wait_healthy(2, 2).await;
    let a = spawn_prove(&proxy.daemon, &sample.inputs[1]).await;
    let b = spawn_prove(&proxy.daemon, &sample.inputs[2]).await;
    for client in [a, b] {
        verify_tx(&client.await.expect("join").expect("proof").into_inner().payload);
    }
    assert_eq!(restarted.worker_status().await.requests_served, 1, "the restarted worker is used");
}

/// A worker host that goes silent mid-proof (here the worker process stopped with SIGSTOP: its
/// connection stays open and nothing answers) is noticed by the connection's HTTP/2 PINGs, and
/// the request is retried on another worker instead of waited on until the proxy's `timeout`
/// (100 s here).
#[tokio::test]
async fn a_worker_frozen_mid_proof_is_noticed_and_the_request_retried_elsewhere() {
    let sample = sample_transactions(1).await.expect("sample transactions");
    let w1 = Launch::worker("transaction").start().await;
    let w2 = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&w1, &w2]).start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let running = spawn_prove(&proxy.daemon, &sample.inputs[0]).await;
    let started = Instant::now();
    let (frozen, other) = loop {
        if w1.worker_status().await.busy {
            break (&w1, &w2);
        }
        if w2.worker_status().await.busy {
            break (&w2, &w1);
        }
        assert!(started.elapsed() < START_TIMEOUT, "no worker took the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    frozen.signal(Signal::SIGSTOP);
    let proof = running.await.expect("join");
    frozen.signal(Signal::SIGCONT);
    let proof = proof.expect("proved on the other worker");
    verify_tx(&proof.into_inner().payload);
    assert_eq!(other.worker_status().await.requests_served, 1, "the other worker proved it");
}

#[tokio::test]
async fn a_worker_kept_busy_by_a_direct_client_is_skipped_for_the_free_one() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let mut w1 = Launch::worker("transaction").start().await;
    let w2 = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&w1, &w2]).start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let direct = spawn_prove(&w1, &sample.inputs[0]).await;
    w1.notify.wait_for_status("proving", PROOF_TIMEOUT).await;
    let through_proxy = api(&proxy.daemon).await.prove(tx_request(&sample.inputs[1])).await;
    let proof = through_proxy.expect("no busy answer while a worker is free");
    verify_tx(&proof.into_inner().payload);
    assert_eq!(w2.worker_status().await.requests_served, 1, "the free worker proved it");
    verify_tx(&direct.await.expect("join").expect("direct proof").into_inner().payload);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_a_cancelled_request_frees_its_slot() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let mut worker = Launch::worker("transaction").start().await;
    let mut launch = Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_MAX_QUEUE_ITEMS", "1");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;

    let running = spawn_prove(&proxy.daemon, &sample.inputs[0]).await;
    worker.notify.wait_for_status("proving", PROOF_TIMEOUT).await;
    let queued = spawn_prove(&proxy.daemon, &sample.inputs[1]).await;
    proxy.daemon.notify.wait_for_status("1/1 workers healthy, queue 1/1", START_TIMEOUT).await;

    let asked = Instant::now();
    let err =
        api(&proxy.daemon).await.prove(tx_request(&sample.inputs[1])).await.expect_err("full");
    eprintln!("queue-full answer after {:?}", asked.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "Too many requests in the queue");
    assert!(!running.is_finished(), "refused at once, not after the running proof");

    // The queued client gives up: its slot frees and the next request takes it.
    queued.abort();
    proxy.daemon.notify.wait_for_status("1/1 workers healthy, queue 0/1", START_TIMEOUT).await;
    let next = spawn_prove(&proxy.daemon, &sample.inputs[1]).await;
    proxy.daemon.notify.wait_for_status("1/1 workers healthy, queue 1/1", START_TIMEOUT).await;
    verify_tx(&running.await.expect("join").expect("first proof").into_inner().payload);
    verify_tx(
        &next.await.expect("join").expect("the request behind is served").into_inner().payload,
    );
    assert_eq!(worker.worker_status().await.requests_served, 2, "the cancelled one never ran");
}

/// Waits until the worker's `WorkerStatus` says `busy`.
async fn wait_busy(worker: &Daemon, busy: bool) {
    let deadline = Instant::now() + PROOF_TIMEOUT;
    while worker.worker_status().await.busy != busy {
        assert!(Instant::now() < deadline, "the worker's busy never became {busy}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proof nobody waits for any more is stopped: after the proxy's timeout, and (with the proof
/// cache off) after a client that gives up mid-proof, the proxy drops its call, the worker kills that proof's prover process
/// and is idle again, and the next request is taken by the worker, never sent to it while busy.
#[tokio::test]
async fn a_proof_given_up_by_the_proxy_or_the_client_is_stopped_and_the_worker_serves_on() {
    let sample = sample_transactions(1).await.expect("sample transactions");
    let worker = Launch::worker("transaction").start().await;
    // The next request: a payload the worker refuses at once, so its answer tells whether the
    // worker took it (INVALID_ARGUMENT) or was busy (the proxy's UNAVAILABLE after retries).
    let garbage = request(ProofType::Transaction, vec![1, 2, 3]);

    // The proxy's own timeout, far shorter than a proof.
    let mut launch = Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_TIMEOUT", "1s");
    let mut short = launch.start_proxy().await;
    short.wait_healthy(1, 1).await;
    let err =
        api(&short.daemon).await.prove(tx_request(&sample.inputs[0])).await.expect_err("late");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("did not answer within 1s"), "{err:?}");
    wait_busy(&worker, false).await;
    let entry = worker_entry(&short.status_json().await, &worker.addr.to_string()).clone();
    assert_eq!(entry["status"], "Healthy", "a slow proof is no failure: {entry}");
    let next = api(&short.daemon).await.prove(garbage.clone()).await.expect_err("garbage");
    assert_eq!(next.code(), Code::InvalidArgument, "taken by the worker: {next:?}");
    drop(short);

    // A client that gives up mid-proof, with the proof cache off (with it on, the proof runs
    // on to be kept for the client's retry: see `cache.rs`).
    let mut launch = Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_PROOF_CACHE_SIZE", "0");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let abandoned = spawn_prove(&proxy.daemon, &sample.inputs[0]).await;
    wait_busy(&worker, true).await;
    abandoned.abort();
    proxy.daemon.wait_for_output("the client went away mid-proof", START_TIMEOUT).await;
    wait_busy(&worker, false).await;
    let next = api(&proxy.daemon).await.prove(garbage).await.expect_err("garbage");
    assert_eq!(next.code(), Code::InvalidArgument, "taken by the worker: {next:?}");
    assert!(
        !proxy.daemon.output().contains("is busy"),
        "no request was sent to the busy worker:\n{}",
        proxy.daemon.output()
    );
}

#[tokio::test]
async fn no_workers_is_unavailable_at_once_and_the_rate_limit_is_per_client_ip() {
    let mut launch = Launch::proxy("transaction", &[]);
    launch.command.env("MPS_MAX_REQ_PER_SEC", "2");
    let proxy = launch.start_proxy().await;
    let garbage = request(ProofType::Transaction, vec![1, 2]);

    let from = |ip: &str| {
        let endpoint = Endpoint::from_shared(proxy.daemon.endpoint()).expect("endpoint");
        let ip = ip.parse().expect("ip");
        async move { ApiClient::new(endpoint.local_address(Some(ip)).connect().await.expect("connect")) }
    };
    let mut first = from("127.0.0.1").await;
    for _ in 0..2 {
        let asked = Instant::now();
        let err = first.prove(garbage.clone()).await.expect_err("no workers");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("no workers"), "{}", err.message());
        assert!(asked.elapsed() < Duration::from_secs(5), "answered at once, not at a deadline");
    }
    // A new connection from the same IP shares the IP's budget.
    let mut same_ip = from("127.0.0.1").await;
    let err = same_ip.prove(garbage.clone()).await.expect_err("rate limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("per client IP"), "{}", err.message());
    // Another IP has its own budget.
    let mut other = from("127.0.0.2").await;
    let err = other.prove(garbage).await.expect_err("no workers");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Status calls are exempt.
    let mut status = ProxyStatusApiClient::new(proxy.daemon.channel().await);
    for _ in 0..5 {
        status.status(()).await.expect("status is never rate limited");
    }
}

/// Workers that all failed their health checks: a request is refused at once, naming each
/// worker's failure, rather than queued until the client's deadline.
#[tokio::test]
async fn when_every_worker_is_unhealthy_a_request_is_refused_naming_why() {
    // A port nothing listens on: bound, then closed.
    let gone =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let batch_worker = Launch::worker("batch").start().await;
    let proxy = Launch::proxy_for("transaction", &[gone, batch_worker.addr]).start_proxy().await;
    let started = Instant::now();
    loop {
        let status = proxy.status_json().await;
        let checked = |addr: std::net::SocketAddr| {
            worker_entry(&status, &addr.to_string())["status"] != "Unknown"
        };
        if checked(gone) && checked(batch_worker.addr) {
            break;
        }
        assert!(started.elapsed() < START_TIMEOUT, "still unchecked: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let garbage = request(ProofType::Transaction, vec![1, 2]);
    let err = api(&proxy.daemon).await.prove(garbage).await.expect_err("no healthy worker");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let message = err.message();
    assert!(message.starts_with("no healthy worker: "), "{message}");
    assert!(message.contains(&format!("{gone} (")), "{message}");
    assert!(
        message.contains(&format!("{} (Unsupported prover type: Batch)", batch_worker.addr)),
        "{message}"
    );
}

#[tokio::test]
async fn a_batch_worker_in_a_transaction_proxy_is_unhealthy_unused_and_metrics_are_clean() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let tx_worker = Launch::worker("transaction").start().await;
    let batch_worker = Launch::worker("batch").start().await;
    let mut proxy = Launch::proxy("transaction", &[&tx_worker, &batch_worker]).start_proxy().await;
    proxy.wait_healthy(1, 2).await;

    // The two first checks run in parallel; wait for the batch worker's verdict too.
    let started = Instant::now();
    let status = loop {
        let status = proxy.status_json().await;
        if worker_entry(&status, &batch_worker.addr.to_string())["status"] != "Unknown" {
            break status;
        }
        assert!(started.elapsed() < START_TIMEOUT, "still unchecked: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let batch = worker_entry(&status, &batch_worker.addr.to_string());
    assert_eq!(
        batch["status"]["Unhealthy"]["reason"], "Unsupported prover type: Batch",
        "{status}"
    );
    let grpc = ProxyStatusApiClient::new(proxy.daemon.channel().await)
        .status(())
        .await
        .expect("status")
        .into_inner();
    let entry = grpc.workers.iter().find(|w| w.address == batch_worker.addr.to_string());
    assert_eq!(entry.expect("listed").status, WorkerHealthStatus::Unhealthy as i32);

    let proof = api(&proxy.daemon).await.prove(tx_request(&sample.inputs[0])).await.expect("proof");
    verify_tx(&proof.into_inner().payload);
    assert_eq!(batch_worker.worker_status().await.requests_served, 0, "never given a request");

    let (code, scrape) = crate::support::http_get(proxy.metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        scrape.contains(r#"mps_proxy_requests_total{code="ok",proof_type="transaction"} 1"#),
        "{scrape}"
    );
    assert!(scrape.contains("mps_proxy_workers_unhealthy 1"), "{scrape}");
    assert!(!scrape.contains("request_count"), "upstream's names only when asked: {scrape}");
    promtool_check(&scrape);

    // Upstream's names, for the dashboards built on them: the same figures.
    let (code, both) = crate::support::http_get(proxy.metrics, "/metrics?names=upstream").await;
    assert_eq!(code, 200);
    let upstream =
        both.strip_prefix(scrape.as_str()).unwrap_or_else(|| panic!("ours first: {both}"));
    for line in [
        "queue_size 0".to_owned(),
        "queue_latency_count 1".to_owned(),
        "queue_drop_count 0".to_owned(),
        "worker_count 2".to_owned(),
        format!(r#"worker_unhealthy{{worker_id="{}"}} 1"#, batch_worker.addr),
        format!(r#"worker_unhealthy{{worker_id="{}"}} 0"#, tx_worker.addr),
        "worker_busy 0".to_owned(),
        format!(r#"worker_request_count{{worker_id="{}"}} 1"#, tx_worker.addr),
        "request_failure_count 0".to_owned(),
        "request_retries 0".to_owned(),
        "request_count 1".to_owned(),
        "request_latency_count 1".to_owned(),
        r#"request_latency_bucket{le="600"} 1"#.to_owned(),
        "rate_limited_requests 0".to_owned(),
        "rate_limit_violations 0".to_owned(),
    ] {
        assert!(upstream.lines().any(|l| l == line), "no `{line}` in:\n{upstream}");
    }
    // Valid exposition; promtool's only objections are to upstream's own counter names.
    for problem in promtool(&both).lines().filter(|l| !l.is_empty()) {
        assert!(
            problem.ends_with(r#"counter metrics should have "_total" suffix"#)
                || problem.ends_with(
                    r#"non-histogram and non-summary metrics should not have "_count" suffix"#
                ),
            "promtool: {problem}"
        );
    }
}

/// Runs `promtool check metrics` (from Debian's prometheus package; `.ci/run` unpacks it and
/// sets `PROMTOOL`) on a scrape.
fn promtool_check(scrape: &str) {
    let problems = promtool(scrape);
    assert!(problems.is_empty(), "promtool: {problems}");
}

/// What `promtool check metrics` says of a scrape (nothing when it is clean).
fn promtool(scrape: &str) -> String {
    use std::io::Write;

    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot run {promtool} ({err}); install it as .ci/run does, or set PROMTOOL")
        });
    child.stdin.take().expect("stdin").write_all(scrape.as_bytes()).expect("feed promtool");
    let output = child.wait_with_output().expect("promtool result");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.success(), said.is_empty(), "promtool: {said}");
    said
}

#[tokio::test]
async fn the_upstream_client_and_grpc_web_work_through_the_proxy() {
    use miden_remote_prover_client::remote_prover::tx_prover::RemoteTransactionProver;

    let sample = sample_transactions(2).await.expect("sample transactions");
    let tx_worker = Launch::worker("transaction").start().await;
    let batch_worker = Launch::worker("batch").start().await;
    let mut tx_proxy = Launch::proxy("transaction", &[&tx_worker]).start_proxy().await;
    let mut batch_proxy = Launch::proxy("batch", &[&batch_worker]).start_proxy().await;
    tx_proxy.wait_healthy(1, 1).await;
    batch_proxy.wait_healthy(1, 1).await;

    // miden-remote-prover-client 0.12, unchanged, against the proxy and against a worker.
    let mut proven = Vec::new();
    for (endpoint, inputs) in
        [(tx_proxy.daemon.endpoint(), &sample.inputs[0]), (tx_worker.endpoint(), &sample.inputs[1])]
    {
        let remote = RemoteTransactionProver::new(endpoint).with_timeout(PROOF_TIMEOUT);
        let tx = remote.prove(inputs.clone()).await.expect("upstream client proves");
        TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL).verify(&tx).expect("verifies");
        proven.push(tx);
    }

    // gRPC-web (HTTP/1.1) proves a batch through the batch proxy.
    let batch = sample.chain.propose_transaction_batch(proven).expect("propose a batch");
    let request = batch_request(&batch);
    let (data, trailers) = grpc_web(
        batch_proxy.daemon.addr,
        "/remote_prover.Api/Prove",
        &prost::Message::encode_to_vec(&request),
    )
    .await;
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let proof: miden_proving_service::proto::Proof =
        prost::Message::decode(&data.expect("a proof")[..]).expect("Proof message");
    let proven = ProvenBatch::read_from_bytes(&proof.payload).expect("the batch proof decodes");
    assert_eq!(proven.id(), batch.id());

    // ProxyStatus over gRPC-web.
    let (data, trailers) =
        grpc_web(batch_proxy.daemon.addr, "/remote_prover.ProxyStatusApi/Status", &[]).await;
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let status: miden_proving_service::proto::ProxyStatus =
        prost::Message::decode(&data.expect("status")[..]).expect("ProxyStatus");
    assert_eq!(status.supported_proof_type, ProofType::Batch as i32);
    assert_eq!(status.workers.len(), 1);
}

/// One gRPC-web call over HTTP/1.1 (after a CORS preflight, as a browser makes it); returns the
/// data frame and the trailer frame's text.
async fn grpc_web(
    addr: std::net::SocketAddr,
    path: &str,
    message: &[u8],
) -> (Option<Vec<u8>>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let preflight = format!(
        "OPTIONS {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://example.test\r\n\
         Access-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: content-type,x-grpc-web\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(preflight.as_bytes()).await.expect("preflight");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("preflight answer");
    let head = String::from_utf8_lossy(&response).to_lowercase();
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("x-grpc-web"), "{head}");

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    body.extend_from_slice(message);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/grpc-web+proto\r\n\
         X-Grpc-Web: 1\r\nOrigin: http://example.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream.write_all(&body).await.expect("send body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/grpc-web+proto"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    let mut rest = &response[split + 4..];
    let (mut data, mut trailers) = (None, String::new());
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest[5..5 + len].to_vec();
        if rest[0] & 0x80 == 0 {
            data = Some(payload);
        } else {
            trailers = String::from_utf8_lossy(&payload).into_owned();
        }
        rest = &rest[5 + len..];
    }
    (data, trailers)
}

#[tokio::test]
async fn sigterm_lets_queued_and_running_requests_finish() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let mut worker = Launch::worker("transaction").start().await;
    let mut launch = Launch::proxy("transaction", &[&worker]);
    launch.command.env("MPS_GRACE_PERIOD", "300s");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;

    let running = spawn_prove(&proxy.daemon, &sample.inputs[0]).await;
    worker.notify.wait_for_status("proving", PROOF_TIMEOUT).await;
    let queued = spawn_prove(&proxy.daemon, &sample.inputs[1]).await;
    proxy.daemon.notify.wait_for_status("1/1 workers healthy, queue 1/", START_TIMEOUT).await;

    proxy.daemon.signal(Signal::SIGTERM);
    proxy.daemon.notify.wait_for_line("STOPPING=1", 0, START_TIMEOUT).await;
    // grace_period (300 s here) + graceful_shutdown_timeout (5 s) + 10 s: past TimeoutStopSec.
    proxy.daemon.notify.wait_for_line("EXTEND_TIMEOUT_USEC=315000000", 0, START_TIMEOUT).await;
    let late = api(&proxy.daemon).await.prove(tx_request(&sample.inputs[1])).await;
    assert_eq!(late.expect_err("nothing new is admitted").code(), Code::Unavailable);

    for client in [running, queued] {
        verify_tx(
            &client
                .await
                .expect("join")
                .expect("finished within the grace period")
                .into_inner()
                .payload,
        );
    }
    let status = proxy.daemon.wait(START_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.daemon.output());
}

/// Proves `inputs` through `daemon` with these request headers (W3C trace context).
async fn prove_with(
    daemon: &Daemon,
    inputs: &TransactionInputs,
    headers: &[(&'static str, String)],
) {
    let mut request = tonic::Request::new(tx_request(inputs));
    for (key, value) in headers {
        request.metadata_mut().insert(*key, value.parse().expect("ascii"));
    }
    let proof = api(daemon).await.prove(request).await.expect("proved through the proxy");
    verify_tx(&proof.get_ref().payload);
}

// The collector runs on this test's runtime: give it threads of its own while the test verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_trace_runs_through_the_proxy_into_the_worker() {
    let (collector_addr, collector) = Collector::start().await;
    let endpoint = format!("http://{collector_addr}");
    let exporting = |mut launch: Launch| {
        // Export every 100 ms rather than every 5 s.
        launch.command.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        launch.command.env("OTEL_BSP_SCHEDULE_DELAY", "100");
        launch
    };
    let sample = sample_transactions(1).await.expect("sample transaction");
    let inputs = &sample.inputs[0];
    let worker = exporting(Launch::worker("transaction")).start().await;
    // It proves the same input twice: with its proof cache on, the second would not reach the
    // worker.
    let mut tracing = exporting(Launch::proxy("transaction", &[&worker]));
    tracing.command.env("MPS_PROOF_CACHE_SIZE", "0");
    let mut tracing_proxy = tracing.start_proxy().await;
    let mut quiet_proxy = Launch::proxy("transaction", &[&worker]).start_proxy().await;
    tracing_proxy.wait_healthy(1, 1).await;
    quiet_proxy.wait_healthy(1, 1).await;
    let output = tracing_proxy.daemon.output();
    assert!(output.contains("traces=\"otlp\"") || output.contains("traces=otlp"), "{output}");
    let wait = Duration::from_secs(30);

    // A proxy that exports traces: client span → the proxy's proxy_prove → its proxy_attempt →
    // the worker's prove, the client's tracestate carried along.
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let headers = [
        ("traceparent", format!("00-{trace}-{client_span}-01")),
        ("tracestate", "mps=t61rcWkgMzE".to_owned()),
    ];
    prove_with(&tracing_proxy.daemon, inputs, &headers).await;
    let proxy_span = collector
        .wait_for("proxy_prove span", wait, |s| s.name == "proxy_prove" && s.trace_id == trace)
        .await;
    assert_eq!(proxy_span.service, "miden-prover-proxy");
    assert_eq!(proxy_span.parent_span_id, client_span, "the proxy continues the client's trace");
    let attempt_span = collector
        .wait_for("proxy_attempt span", wait, |s| s.name == "proxy_attempt" && s.trace_id == trace)
        .await;
    assert_eq!(attempt_span.parent_span_id, proxy_span.span_id);
    let worker_span = collector
        .wait_for("worker prove span", wait, |s| s.name == "prove" && s.trace_id == trace)
        .await;
    assert_eq!(worker_span.service, "miden-prover");
    assert_eq!(
        worker_span.parent_span_id, attempt_span.span_id,
        "the worker's span is a child of the proxy's attempt"
    );
    assert_eq!(
        (&*proxy_span.trace_state, &*worker_span.trace_state),
        ("mps=t61rcWkgMzE", "mps=t61rcWkgMzE")
    );

    // A client without trace context: the proxy's span starts the trace, the worker's joins it.
    prove_with(&tracing_proxy.daemon, inputs, &[]).await;
    let root = collector
        .wait_for("root proxy_prove span", wait, |s| {
            s.name == "proxy_prove" && s.parent_span_id.is_empty()
        })
        .await;
    let attempt_span = collector
        .wait_for("proxy_attempt span", wait, |s| {
            s.name == "proxy_attempt" && s.trace_id == root.trace_id
        })
        .await;
    assert_eq!(attempt_span.parent_span_id, root.span_id);
    let worker_span = collector
        .wait_for("worker prove span", wait, |s| s.name == "prove" && s.trace_id == root.trace_id)
        .await;
    assert_eq!(worker_span.parent_span_id, attempt_span.span_id);

    // A proxy that does not export: it passes the client's context on, so the worker's span
    // still joins the client's trace, one level up.
    let (trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    prove_with(
        &quiet_proxy.daemon,
        inputs,
        &[("traceparent", format!("00-{trace}-{client_span}-01"))],
    )
    .await;
    let worker_span = collector
        .wait_for("worker prove span", wait, |s| s.name == "prove" && s.trace_id == trace)
        .await;
    assert_eq!(worker_span.parent_span_id, client_span);
}

/// A request whose worker was taken by another client (another proxy's request; here a direct
/// client of a STAND-IN worker whose busy answer is slow, as across a slow link) was admitted
/// once: it goes back to the head of the queue, even a queue that filled meanwhile, and gets the
/// worker before the request that came after it.
#[tokio::test]
async fn a_request_whose_worker_was_taken_elsewhere_keeps_its_place_ahead_of_a_full_queue() {
    use crate::support::standin;

    let version = env!("CARGO_PKG_VERSION");
    let (addr, standin) = standin::start(version, Duration::from_millis(1500)).await;
    standin.answer_busy_after(Duration::from_millis(500));
    let mut launch = Launch::proxy_for("transaction", &[addr]);
    launch.command.env("MPS_MAX_QUEUE_ITEMS", "1");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let finished = |n: u8, mut client: ApiClient<Channel>| {
        let request = request(ProofType::Transaction, vec![n; 64]);
        tokio::spawn(async move { client.prove(request).await.map(|_| Instant::now()) })
    };

    // Another client holds the stand-in, unseen by the proxy.
    let direct = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    let direct = finished(0, ApiClient::new(direct.connect().await.expect("connect")));
    while !standin.busy() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The proxy sends `first` there; while its busy answer takes its time, `second` fills the
    // queue.
    let first = finished(1, api(&proxy.daemon).await);
    while standin.received() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = finished(2, api(&proxy.daemon).await);
    proxy.daemon.notify.wait_for_status("1/1 workers healthy, queue 1/1", START_TIMEOUT).await;

    direct.await.expect("join").expect("the direct client's answer");
    let first = first.await.expect("join").expect("taken elsewhere, then proved: not refused");
    let second = second.await.expect("join").expect("the request behind it is proved");
    assert!(first < second, "the request taken elsewhere was served first");
    assert_eq!(standin.served(), 3);
    let (_, scrape) = crate::support::http_get(proxy.metrics, "/metrics").await;
    assert!(scrape.contains("\nmps_proxy_workers_taken_elsewhere_total 1\n"), "{scrape}");
}

/// A request that kills the worker it reaches (MORTAL STAND-INS that die on a marked payload;
/// real workers contain what an input does) costs at most two workers: after two deaths its
/// content is refused at once, without reaching a worker, counted and logged; other requests
/// are served as before.
#[tokio::test]
async fn a_request_that_kills_workers_costs_two_at_most_and_is_then_refused_at_once() {
    use crate::support::standin;

    const MARK: &[u8] = b"poison";
    let version = env!("CARGO_PKG_VERSION");
    let delay = Duration::from_millis(20);
    let mut standins = Vec::new();
    for _ in 0..3 {
        standins.push(standin::start_mortal(version, delay, MARK).await);
    }
    let addrs: Vec<_> = standins.iter().map(|(addr, _)| *addr).collect();
    let mut launch = Launch::proxy_for("transaction", &addrs);
    // Without the cap, three retries would reach every worker.
    launch.command.env("MPS_MAX_RETRIES_PER_REQUEST", "3");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(3, 3).await;

    let poison = || request(ProofType::Transaction, [MARK, &[1, 2, 3][..]].concat());
    let err = api(&proxy.daemon).await.prove(poison()).await.expect_err("the workers died");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().starts_with("this request's content took down 2 workers"), "{err:?}");
    let dead = standins.iter().filter(|(_, s)| s.dead()).count();
    assert_eq!(dead, 2, "one request took {dead} workers");
    let (_, survivor) = standins.iter().find(|(_, s)| !s.dead()).expect("a survivor");
    assert_eq!(survivor.received(), 0);

    for _ in 0..2 {
        let err = api(&proxy.daemon).await.prove(poison()).await.expect_err("refused");
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(err.message().contains("refused for 1h"), "{err:?}");
        assert!(err.message().contains("without reaching a worker"), "{err:?}");
    }
    assert_eq!(survivor.received(), 0, "a refused request reached a worker");
    assert!(!survivor.dead());
    let (_, scrape) = crate::support::http_get(proxy.metrics, "/metrics").await;
    assert!(scrape.contains("\nmps_proxy_poison_refused_total 2\n"), "{scrape}");
    proxy
        .daemon
        .wait_for_output("refused a request whose content took down 2 workers", START_TIMEOUT)
        .await;
    let logged = proxy.daemon.output();
    let line = logged
        .lines()
        .find(|l| l.contains("refused a request whose content"))
        .expect("the refusal is logged");
    assert!(line.contains("127.0.0.1"), "the client address is logged: {line}");

    // Other content goes to the survivor as before.
    let ordinary = request(ProofType::Transaction, b"ordinary".to_vec());
    api(&proxy.daemon).await.prove(ordinary).await.expect("served");
    assert_eq!(survivor.served(), 1);
}
