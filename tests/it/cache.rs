//! Content-addressed proofs through the proxy: identical requests share one proof, a client whose
//! deadline is shorter than the proof gets it on its retry, finished proofs are kept within
//! `proof_cache_size` and `proof_cache_ttl`, and a worker fault during a shared proof still gives
//! every waiter a proof.

use std::time::Duration;

use miden_proving_service::proto::{Proof, ProofRequest, ProofType};
use nix::sys::signal::Signal;
use tonic::{Code, Status};

use crate::support::fixtures::sample_transactions;
use crate::support::requests::{request, tx_request, verify_tx};
use crate::support::{Daemon, Launch, START_TIMEOUT, standin};

const PROOF_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `request` through `daemon` in the background.
async fn spawn_prove(
    daemon: &Daemon,
    request: ProofRequest,
) -> tokio::task::JoinHandle<Result<tonic::Response<Proof>, Status>> {
    let mut client = daemon.api().await;
    tokio::spawn(async move { client.prove(request).await })
}

/// The workers' `requests_served`, summed from the proxy's status.
fn served(status: &serde_json::Value) -> u64 {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["requests_served"].as_u64().expect("requests_served"))
        .sum()
}

#[tokio::test]
async fn identical_requests_at_once_share_one_proof_and_a_different_one_gets_its_own() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let w1 = Launch::worker("transaction").start().await;
    let w2 = Launch::worker("transaction").start().await;
    let mut launch = Launch::proxy("transaction", &[&w1, &w2]);
    launch.command.env("MPS_MAX_REQ_PER_SEC", "100");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let mut same = Vec::new();
    for _ in 0..4 {
        same.push(spawn_prove(&proxy.daemon, tx_request(&sample.inputs[0])).await);
    }
    let other = spawn_prove(&proxy.daemon, tx_request(&sample.inputs[1])).await;
    let mut proofs = Vec::new();
    for client in same {
        proofs.push(client.await.expect("join").expect("every client gets a proof").into_inner());
    }
    assert!(proofs.iter().all(|p| p.payload == proofs[0].payload), "one proof for all four");
    let proven = verify_tx(&proofs[0].payload);
    assert_eq!(proven.account_id(), sample.inputs[0].account().id());
    let other = other.await.expect("join").expect("its own proof").into_inner();
    assert_ne!(other.payload, proofs[0].payload);
    let proven = verify_tx(&other.payload);
    assert_eq!(proven.account_id(), sample.inputs[1].account().id(), "proved from its own input");

    let status = proxy.status_json().await;
    assert_eq!(served(&status), 2, "one proof per distinct input: {status}");
    let cache = &status["proof_cache"];
    assert_eq!(cache["misses"], 2, "{cache}");
    let shared = cache["joins"].as_u64().expect("joins") + cache["hits"].as_u64().expect("hits");
    assert_eq!(shared, 3, "{cache}");
    assert_eq!(status["requests_served"], 5);
    proxy.daemon.wait_for_lines("request done", 5, START_TIMEOUT).await;
    let logged = proxy.daemon.output();
    let done: Vec<_> = logged.lines().filter(|l| l.contains("request done")).collect();
    assert_eq!(done.len(), 5, "one line per request:\n{logged}");
    assert_eq!(done.iter().filter(|l| l.contains("proved")).count(), 2, "{logged}");
}

#[tokio::test]
async fn a_client_whose_deadline_is_shorter_than_the_proof_gets_it_on_its_retry() {
    let sample = sample_transactions(1).await.expect("sample transactions");
    let worker = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&worker]).start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let mut api = proxy.daemon.api().await;

    // A transaction proof takes seconds; this client allows two (a `grpc-timeout` header).
    let mut impatient = tonic::Request::new(tx_request(&sample.inputs[0]));
    impatient.set_timeout(Duration::from_secs(2));
    let err = api.prove(impatient).await.expect_err("the deadline passes first");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("send the same request again"), "{err:?}");
    assert!(worker.worker_status().await.busy, "the proof runs on");

    // The retry, sent while that proof runs, receives it.
    let retry = api.prove(tx_request(&sample.inputs[0])).await.expect("the retry gets the proof");
    verify_tx(&retry.get_ref().payload);
    assert_eq!(worker.worker_status().await.requests_served, 1, "one proof was computed");

    // A retry after it ended is answered from the cache, without a worker.
    let again = api.prove(tx_request(&sample.inputs[0])).await.expect("from the cache");
    assert_eq!(again.get_ref().payload, retry.get_ref().payload);
    assert_eq!(worker.worker_status().await.requests_served, 1);
    let cache = proxy.status_json().await["proof_cache"].clone();
    assert_eq!(
        (&cache["misses"], &cache["joins"], &cache["hits"]),
        (&1.into(), &1.into(), &1.into())
    );
    assert_eq!(cache["proofs"], 1, "{cache}");
    let (_, scrape) = crate::support::http_get(proxy.metrics, "/metrics").await;
    for line in [
        "\nmps_proxy_proof_cache_hits_total 1\n",
        "\nmps_proxy_proof_cache_joins_total 1\n",
        "\nmps_proxy_proof_cache_misses_total 1\n",
        "\nmps_proxy_proof_cache_proofs 1\n",
    ] {
        assert!(scrape.contains(line), "{line:?} in {scrape}");
    }
    // The log line is written as the answer leaves; its reading may lag a busy machine.
    proxy.daemon.wait_for_output("outcome=\"cached\"", START_TIMEOUT).await;
    let logged = proxy.daemon.output();
    let cached = logged.lines().filter(|l| l.contains("request done") && l.contains("cached"));
    assert_eq!(cached.count(), 1, "{logged}");
}

#[tokio::test]
async fn kept_proofs_leave_at_their_age_and_oldest_first_beyond_the_size_and_zero_keeps_none() {
    let version = env!("CARGO_PKG_VERSION");
    let (addr, standin) = standin::start(version, Duration::from_millis(5)).await;
    let request = |n: u8| request(ProofType::Transaction, vec![n; 64]);
    // Room for two of the stand-in's 84 KB proofs.
    let room = 2 * (84_000 + miden_proving_service::share::ENTRY_OVERHEAD) + 1000;
    let mut launch = Launch::proxy_for("transaction", &[addr]);
    launch.command.env("MPS_PROOF_CACHE_SIZE", room.to_string());
    launch.command.env("MPS_PROOF_CACHE_TTL", "2s");
    launch.command.env("MPS_MAX_REQ_PER_SEC", "100");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let mut api = proxy.daemon.api().await;
    // Proves request `n`; how many requests the stand-in has received since it started.
    let mut prove = async |n: u8| {
        api.prove(request(n)).await.expect("proved");
        standin.received()
    };
    assert_eq!(prove(1).await, 1);
    assert_eq!(prove(1).await, 1, "kept");
    assert_eq!(prove(2).await, 2);
    assert_eq!(prove(3).await, 3, "1 leaves: the oldest");
    assert_eq!(prove(2).await, 3, "kept");
    assert_eq!(prove(1).await, 4, "1 had left; now 2 leaves");
    assert_eq!(prove(3).await, 4, "kept");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(prove(3).await, 5, "older than proof_cache_ttl");
    let status = proxy.status_json().await;
    assert_eq!(status["proof_cache"]["proofs"], 1, "{status}");
    assert!(status["proof_cache"]["evictions"].as_u64().expect("evictions") >= 3, "{status}");

    let mut launch = Launch::proxy_for("transaction", &[addr]);
    launch.command.env("MPS_PROOF_CACHE_SIZE", "0");
    let mut off = launch.start_proxy().await;
    off.wait_healthy(1, 1).await;
    let mut api = off.daemon.api().await;
    let before = standin.received();
    for _ in 0..2 {
        api.prove(request(9)).await.expect("proved");
    }
    assert_eq!(standin.received(), before + 2, "nothing is kept with proof_cache_size = 0");
    let status = off.status_json().await;
    assert_eq!(status["proof_cache"]["proofs"], 0, "{status}");
    let mut minedctl = std::process::Command::new(crate::support::minedctl());
    crate::support::clean_env(&mut minedctl);
    let summary =
        minedctl.arg("--socket").arg(&off.control).arg("status").output().expect("minedctl");
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(text.contains("proof cache: off"), "{text}");
}

#[tokio::test]
async fn a_worker_killed_during_a_shared_proof_leaves_every_waiter_a_proof() {
    let sample = sample_transactions(1).await.expect("sample transactions");
    let mut w1 = Launch::worker("transaction").start().await;
    let mut w2 = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&w1, &w2]).start_proxy().await;
    proxy.wait_healthy(2, 2).await;

    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(spawn_prove(&proxy.daemon, tx_request(&sample.inputs[0])).await);
    }
    let victim_is_w1 = tokio::select! {
        _ = w1.notify.wait_for_status("proving", PROOF_TIMEOUT) => true,
        _ = w2.notify.wait_for_status("proving", PROOF_TIMEOUT) => false,
    };
    let (victim, survivor) = if victim_is_w1 { (&mut w1, &w2) } else { (&mut w2, &w1) };
    victim.signal(Signal::SIGKILL);
    victim.wait(START_TIMEOUT).await;

    let mut proofs = Vec::new();
    for waiter in waiters {
        proofs.push(waiter.await.expect("join").expect("every waiter gets the retry's proof"));
    }
    verify_tx(&proofs[0].get_ref().payload);
    assert!(proofs.iter().all(|p| p.get_ref().payload == proofs[0].get_ref().payload));
    assert_eq!(survivor.worker_status().await.requests_served, 1, "proved once, on the survivor");
    let cache = proxy.status_json().await["proof_cache"].clone();
    assert_eq!(cache["misses"], 1, "{cache}");
}
