//! Quickstart: starts a real transaction worker and a proxy in front of it on loopback, makes a
//! sample transaction with `miden-testing`'s `MockChain`, proves it over gRPC through the proxy,
//! verifies the proof, and prints the timing and what the proxy reports.
//!
//! ```sh
//! cargo build --locked --bins --examples && target/debug/examples/quickstart
//! ```

#[allow(dead_code)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::transaction::ProvenTransaction;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::proto::{ProofRequest, ProofType};
use miden_tx::TransactionVerifier;
use nix::sys::signal::Signal;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("starting a transaction worker and a proxy on 127.0.0.1 ...");
    let mut worker = support::Launch::worker("transaction").start().await;
    println!("worker ready at {} (pid {})", worker.endpoint(), worker.pid);
    let mut proxy = support::Launch::proxy("transaction", &[&worker]).start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    println!(
        "proxy ready at {} (pid {}; status http://{}/status, control socket {})",
        proxy.daemon.endpoint(),
        proxy.daemon.pid,
        proxy.status,
        proxy.control.display()
    );

    let started = Instant::now();
    let sample = support::fixtures::sample_transactions(1).await?;
    let inputs = &sample.inputs[0];
    let payload = inputs.to_bytes();
    println!(
        "sample transaction for account {} executed on a MockChain in {:.2?} ({} KB of inputs)",
        inputs.account().id(),
        started.elapsed(),
        payload.len() / 1000
    );

    let mut api = proxy.daemon.api().await;
    let started = Instant::now();
    let proof = api
        .prove(ProofRequest { proof_type: ProofType::Transaction.into(), payload })
        .await?
        .into_inner();
    let proving = started.elapsed();
    let proven = ProvenTransaction::read_from_bytes(&proof.payload)?;
    TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL).verify(&proven)?;
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
