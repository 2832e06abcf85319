//! Quickstart: starts a real transaction worker and a proxy in front of it on loopback, makes a
//! sample transaction with `miden-testing`'s `MockChain`, proves it over gRPC through the proxy,
//! verifies the proof, and prints the timing and what the proxy reports.
//!
//! ```sh
//! cargo build --locked --bins --examples && target/debug/examples/quickstart
//! ```

use std::time::{Duration, Instant};

use harness::requests::{tx_request, verify_tx};
use miden_objects::utils::Serializable;
use nix::sys::signal::Signal;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("starting a transaction worker and a proxy on 127.0.0.1 ...");
    let mut worker = harness::Launch::worker("transaction").start().await;
    println!("worker ready at {} (pid {})", worker.endpoint(), worker.pid);
    let mut proxy = harness::Launch::proxy("transaction", &[&worker]).start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    println!(
        "proxy ready at {} (pid {}; status http://{}/status, control socket {})",
        proxy.daemon.endpoint(),
        proxy.daemon.pid,
        proxy.status,
        proxy.control.display()
    );

    let started = Instant::now();
    let sample = harness::fixtures::sample_transactions(1).await?;
    let inputs = &sample.inputs[0];
    println!(
        "sample transaction for account {} executed on a MockChain in {:.2?} ({} KB of inputs)",
        inputs.account().id(),
        started.elapsed(),
        inputs.to_bytes().len() / 1000
    );

    let mut api = proxy.daemon.api().await;
    let started = Instant::now();
    let proof = api.prove(tx_request(inputs)).await?.into_inner();
    let proving = started.elapsed();
    let proven = verify_tx(&proof.payload);
    println!(
        "proved transaction {} through the proxy in {:.2?} ({} KB proof); the proof verifies",
        proven.id(),
        proving,
        proof.payload.len() / 1000
    );
    println!("proxy status: {}", proxy.status_json().await);

    proxy.daemon.signal(Signal::SIGTERM);
    println!("proxy stopped ({})", proxy.daemon.wait(Duration::from_secs(30)).await);
    worker.signal(Signal::SIGTERM);
    println!("worker stopped ({})", worker.wait(Duration::from_secs(30)).await);
    Ok(())
}
