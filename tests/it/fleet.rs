//! A fleet across hosts, on the network-namespace rig (`harness::rig`): real addresses and
//! routes between a client host, proxy hosts, worker hosts and a DNS server, and real faults — a
//! worker host's link cut mid-proof, DNS records that change under a running proxy, two proxies
//! sharing the workers while one of them is killed. The workers prove real transactions.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use miden_objects::transaction::TransactionInputs;
use miden_proving_service::proto::Proof;
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::worker_status_api_client::WorkerStatusApiClient;
use nix::sys::signal::Signal;
use tonic::{Code, Status};

use crate::support::fixtures::sample_transactions;
use crate::support::requests::{tx_request, verify_tx};
use crate::support::rig::{Rig, delay_relay};
use crate::support::{Daemon, Launch, Proxy, START_TIMEOUT};

/// The port every worker host's worker listens on (each host is its own namespace).
const WORKER_PORT: u16 = 50051;

/// How long a real transaction proof may take on this 2-core machine with others beside it.
const PROOF_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts a transaction worker on each of `roles`, listening on the host's address.
async fn start_workers(rig: &Rig, roles: &[&str]) -> Vec<Daemon> {
    let mut workers = Vec::new();
    for role in roles {
        let launch = Launch::worker_on_all_addresses("transaction", WORKER_PORT);
        let mut worker = rig.launch_in(role, launch).start().await;
        worker.addr = SocketAddr::new(rig.host(role).ip.into(), WORKER_PORT);
        workers.push(worker);
    }
    workers
}

/// Starts a transaction proxy on `role` in front of `workers` (as written), with `env`.
async fn start_proxy(rig: &Rig, role: &str, workers: &[String], env: &[(&str, &str)]) -> Proxy {
    let ip = rig.host(role).ip.to_string();
    let mut launch = Launch::proxy_at(&ip, "transaction", workers);
    launch.command.envs(env.iter().copied());
    rig.launch_in(role, launch).start_proxy().await
}

/// One proof request from `role`'s host to `endpoint`.
fn prove_from(
    rig: &Rig,
    role: &str,
    endpoint: String,
    inputs: TransactionInputs,
) -> tokio::task::JoinHandle<Result<tonic::Response<Proof>, Status>> {
    rig.spawn_in(role, move || async move {
        let mut client = ApiClient::connect(endpoint)
            .await
            .map_err(|err| Status::unavailable(format!("connect: {err}")))?;
        client.prove(tx_request(&inputs)).await
    })
}

/// Waits until one of `workers` reports a proof running; returns its index.
async fn proving(workers: &[Daemon]) -> usize {
    let deadline = Instant::now() + PROOF_TIMEOUT;
    loop {
        for (index, worker) in workers.iter().enumerate() {
            if worker.worker_status().await.busy {
                return index;
            }
        }
        assert!(Instant::now() < deadline, "no worker started proving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workers the proxy lists (address → health), from its status port.
async fn listed(proxy: &Proxy) -> Vec<(String, serde_json::Value)> {
    let status = proxy.status_json().await;
    let workers = status["workers"].as_array().expect("workers").clone();
    workers.into_iter().map(|w| (w["address"].as_str().unwrap_or("").to_owned(), w)).collect()
}

#[tokio::test]
async fn a_worker_host_cut_off_mid_proof_is_proved_around_and_used_again_when_its_link_returns() {
    let Some(rig) = Rig::or_skip(&["client", "proxy", "worker-1", "worker-2"]) else { return };
    let sample = sample_transactions(3).await.expect("sample transactions");
    let workers = start_workers(&rig, &["worker-1", "worker-2"]).await;
    let addresses: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let mut proxy = start_proxy(&rig, "proxy", &addresses, &[]).await;
    proxy.wait_healthy(2, 2).await;
    let endpoint = format!("http://{}", proxy.daemon.addr);

    let first = prove_from(&rig, "client", endpoint.clone(), sample.inputs[0].clone());
    let victim = proving(&workers).await;
    let (cut, other) = (["worker-1", "worker-2"][victim], &workers[1 - victim]);
    rig.set_link(cut, false);
    let cut_at = Instant::now();
    // Packets to and from the host vanish: the proxy's HTTP/2 PINGs go unanswered, the attempt
    // fails, and the request is proved on the other host.
    let proof = first.await.expect("join").expect("the client gets its proof");
    verify_tx(&proof.into_inner().payload);
    eprintln!("proved around the cut-off host in {:?}", cut_at.elapsed());
    assert_eq!(other.worker_status().await.requests_served, 1, "the other host proved it");
    let status = proxy.status_json().await;
    let entry = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["address"] == addresses[victim].as_str());
    let reason = entry.map(|w| w["status"]["Unhealthy"]["reason"].clone()).unwrap_or_default();
    assert!(reason.is_string(), "the cut-off host is unhealthy: {status}");

    // The link returns: the host is healthy again and takes requests.
    rig.set_link(cut, true);
    proxy.wait_healthy(2, 2).await;
    let requests: Vec<_> = sample.inputs[1..]
        .iter()
        .map(|inputs| prove_from(&rig, "client", endpoint.clone(), inputs.clone()))
        .collect();
    for request in requests {
        verify_tx(&request.await.expect("join").expect("a proof").into_inner().payload);
    }
    let status = proxy.status_json().await;
    let served = |address: &str| {
        status["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| w["address"] == address)
            .and_then(|w| w["requests_served"].as_u64())
            .unwrap_or(0)
    };
    assert!(served(&addresses[victim]) >= 1, "the host is used again: {status}");
}

#[tokio::test]
async fn eight_requests_over_slow_distant_worker_links_all_get_verified_proofs() {
    let roles = ["client", "proxy", "worker-1", "worker-2", "worker-3"];
    let Some(rig) = Rig::or_skip(&roles) else { return };
    let sample = sample_transactions(8).await.expect("sample transactions");
    let hosts = ["worker-1", "worker-2", "worker-3"];
    let workers = start_workers(&rig, &hosts).await;
    // Each worker host: 100 ms added each way by a relay in front of its worker, and its link
    // capped at 10 Mbit/s both ways.
    let delay = Duration::from_millis(100);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut relays = Vec::new();
    for role in hosts {
        rig.limit_rate(role, "10mbit");
        let listen = SocketAddr::new(rig.host(role).ip.into(), WORKER_PORT + 1);
        let target = SocketAddr::from(([127, 0, 0, 1], WORKER_PORT));
        let mut stopped = stopped.clone();
        relays.push(listen.to_string());
        rig.spawn_in(role, move || async move {
            tokio::select! {
                () = delay_relay(listen, target, delay) => {},
                _ = stopped.wait_for(|stop| *stop) => {},
            }
        });
    }
    let mut proxy = start_proxy(&rig, "proxy", &relays, &[]).await;
    proxy.wait_healthy(3, 3).await;
    // The delay is there: one call from the proxy's host over a fresh connection takes a TCP
    // handshake, HTTP/2's and the call's round trips, each at least 200 ms.
    let relay = format!("http://{}", relays[0]);
    let took = rig
        .spawn_in("proxy", move || async move {
            let started = Instant::now();
            let channel = tonic::transport::Endpoint::from_shared(relay).expect("uri");
            let channel = channel.connect().await.expect("connect through the relay");
            WorkerStatusApiClient::new(channel).status(()).await.expect("status");
            started.elapsed()
        })
        .await
        .expect("join");
    assert!(took >= 2 * delay, "a call through the relay took only {took:?}");

    let endpoint = format!("http://{}", proxy.daemon.addr);
    let started = Instant::now();
    let requests: Vec<_> = sample
        .inputs
        .iter()
        .map(|inputs| prove_from(&rig, "client", endpoint.clone(), inputs.clone()))
        .collect();
    for request in requests {
        let proof = request.await.expect("join").expect("every request gets a proof");
        verify_tx(&proof.into_inner().payload);
    }
    eprintln!("8 proofs over 100 ms, 10 Mbit/s worker links in {:?}", started.elapsed());
    let mut served = 0;
    for worker in &workers {
        served += worker.worker_status().await.requests_served;
    }
    assert_eq!(served, 8, "each request proved once");
    let _ = stop.send(true);
}

#[tokio::test]
async fn workers_found_by_dns_follow_the_records_and_a_request_on_a_removed_host_completes() {
    let roles = ["client", "dns", "proxy", "worker-1", "worker-2", "worker-3"];
    let Some(mut rig) = Rig::or_skip(&roles) else { return };
    let sample = sample_transactions(1).await.expect("sample transactions");
    let workers = start_workers(&rig, &["worker-1", "worker-2", "worker-3"]).await;
    let ips: Vec<_> = ["worker-1", "worker-2", "worker-3"].map(|r| rig.host(r).ip).to_vec();
    let ip = |index: usize| ips[index];
    let name = "provers.fleet.test";
    rig.start_dns("dns", &[(name, ip(0)), (name, ip(1))]).expect("dnsmasq");
    // Health checks (and the worker connections' PINGs) answer within the 2 s timeout even on
    // a machine busy with proofs; the interval is what the proxy's resolution follows.
    let interval = Duration::from_secs(2);
    let env = [("MPS_HEALTH_CHECK_INTERVAL", "2s"), ("MPS_HEALTH_CHECK_TIMEOUT", "2s")];
    let declared = format!("{name}:{WORKER_PORT}");
    let mut proxy = start_proxy(&rig, "proxy", std::slice::from_ref(&declared), &env).await;
    proxy.wait_healthy(2, 2).await;
    let at = |index: usize| format!("{}:{WORKER_PORT}", ip(index));
    let names = |workers: &[(String, serde_json::Value)]| -> BTreeSet<String> {
        workers
            .iter()
            .filter(|(_, w)| w["name"] == declared.as_str())
            .map(|(a, _)| a.clone())
            .collect()
    };
    assert_eq!(names(&listed(&proxy).await), BTreeSet::from([at(0), at(1)]));

    // A request runs on one of the two; the records then drop that host and add the third.
    let endpoint = format!("http://{}", proxy.daemon.addr);
    let running = prove_from(&rig, "client", endpoint, sample.inputs[0].clone());
    let victim = proving(&workers[..2]).await;
    let kept = 1 - victim;
    rig.set_dns_records(&[(name, ip(kept)), (name, ip(2))]);
    let changed = Instant::now();
    let want = BTreeSet::from([at(kept), at(2)]);
    loop {
        if names(&listed(&proxy).await) == want {
            break;
        }
        // Within two health intervals (each round is a resolution, checks, then the interval's
        // wait), with a second's slack for a machine busy proving.
        let limit = 2 * interval + Duration::from_secs(1);
        assert!(changed.elapsed() < limit, "the DNS change was not followed within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the proxy followed the DNS change in {:?} (interval {interval:?})",
        changed.elapsed()
    );
    proxy.wait_healthy(2, 2).await;

    // The request in flight on the removed host still completes there.
    let proof = running.await.expect("join").expect("the request on the removed host completes");
    verify_tx(&proof.into_inner().payload);
    assert_eq!(workers[victim].worker_status().await.requests_served, 1);
    assert!(names(&listed(&proxy).await) == want, "the drained host is gone once idle");
}

#[tokio::test]
async fn two_proxies_share_three_workers_no_client_sees_busy_and_clients_survive_a_proxy_killed() {
    let roles = ["client", "proxy-a", "proxy-b", "worker-1", "worker-2", "worker-3"];
    let Some(rig) = Rig::or_skip(&roles) else { return };
    let sample = sample_transactions(12).await.expect("sample transactions");
    let workers = start_workers(&rig, &["worker-1", "worker-2", "worker-3"]).await;
    let addresses: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    // Once A is gone, B proves all 12 requests on 3 workers, four rounds one after another,
    // each of them slow on a machine that runs other tests' proofs too (31–45 s a round has been
    // seen): the last ones wait in B's queue longer than its 100 s default.
    let queue = [("MPS_MAX_QUEUE_ITEMS", "12"), ("MPS_MAX_QUEUE_WAIT", "600s")];
    let mut a = start_proxy(&rig, "proxy-a", &addresses, &queue).await;
    let mut b = start_proxy(&rig, "proxy-b", &addresses, &queue).await;
    a.wait_healthy(3, 3).await;
    b.wait_healthy(3, 3).await;
    let endpoints = [format!("http://{}", a.daemon.addr), format!("http://{}", b.daemon.addr)];

    // 12 clients, alternately on A and B, each retrying on the other proxy when its proxy is
    // gone (as a client with two prover URLs does); any busy answer is a failure.
    let clients: Vec<_> = sample
        .inputs
        .iter()
        .enumerate()
        .map(|(index, inputs)| {
            let (first, second) = (endpoints[index % 2].clone(), endpoints[1 - index % 2].clone());
            let inputs = inputs.clone();
            rig.spawn_in("client", move || async move {
                let mut tries = Vec::new();
                for endpoint in [first, second] {
                    let answer = match ApiClient::connect(endpoint.clone()).await {
                        Ok(mut client) => client.prove(tx_request(&inputs)).await,
                        Err(err) => Err(Status::unavailable(format!("connect: {err}"))),
                    };
                    match answer {
                        Ok(proof) => return Ok((proof.into_inner(), tries)),
                        Err(status) if status.code() == Code::ResourceExhausted => {
                            return Err(format!("{endpoint} answered busy: {status:?}"));
                        }
                        Err(status) => tries.push(format!("{endpoint}: {status:?}")),
                    }
                }
                Err(format!("no proxy proved it: {tries:?}"))
            })
        })
        .collect();

    // Once proofs run on all three workers, proxy A is killed.
    let deadline = Instant::now() + PROOF_TIMEOUT;
    loop {
        let mut busy = 0;
        for worker in &workers {
            busy += usize::from(worker.worker_status().await.busy);
        }
        if busy == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the workers never all proved at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.daemon.signal(Signal::SIGKILL);
    a.daemon.wait(START_TIMEOUT).await;

    let mut moved = 0;
    for client in clients {
        let (proof, tries) = client.await.expect("join").expect("every client gets a proof");
        verify_tx(&proof.payload);
        moved += usize::from(!tries.is_empty());
    }
    eprintln!("{moved} clients moved to proxy B after A was killed");
    assert!(moved >= 1, "proxy A had requests when it was killed");
    let status = b.status_json().await;
    assert!(
        status["workers"].as_array().expect("workers").iter().all(|w| w["status"] == "Healthy")
    );
    let served: u64 = {
        let mut total = 0;
        for worker in &workers {
            total += worker.worker_status().await.requests_served;
        }
        total
    };
    assert!(served >= 12, "every proof was proved by a worker: {served}");
}
