//! Proves and verifies a transaction in-process from files, so that different builds of the
//! prover (generic, x86-64-v3, native) can be compared on the very same input and can check each
//! other's proofs.
//!
//! ```sh
//! prove_file write-inputs FILE        # a sample transaction's inputs (miden-testing MockChain)
//! prove_file prove FILE [PROOF]       # prove in-process; prints "<ms> ms (<build> build)"
//! prove_file verify PROOF             # verify a proven transaction with this build's verifier
//! prove_file bench RUNS FILE BIN…     # runs `BIN prove FILE` for each build in turn, RUNS rounds
//! prove_file remote ENDPOINT FILE     # prove through a proxy or worker with the upstream client
//! ```
//!
//! `remote` is what `tests/packages.sh` proves with against the installed services: the client
//! miden-client uses (miden-remote-prover-client 0.12), then this build's verifier.
//!
//! The CPU-build benchmark (BENCHMARKS.md):
//!
//! ```sh
//! cargo build --locked --examples
//! scripts/build-fast.sh --examples && MPSDEV_TARGET_CPU=native scripts/build-fast.sh --examples
//! target/debug/examples/prove_file bench 5 target/tx.inputs target/debug/examples/prove_file \
//!     target/x86-64-v3/debug/examples/prove_file target/native/debug/examples/prove_file
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::transaction::{ProvenTransaction, TransactionInputs};
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::prover::{self, Prover};
use miden_proving_service::{ProofKind, cpu};
use miden_tx::TransactionVerifier;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["write-inputs", file] => {
            let sample = harness::fixtures::sample_transactions(1).await?;
            std::fs::write(file, sample.inputs[0].to_bytes())?;
            println!("wrote {file}");
        }
        ["prove", file, rest @ ..] => {
            // The service's own prover (as a worker's prover process runs it), not
            // `LocalTransactionProver::prove`, which each binary calling it compiles anew.
            let job = prover::decode(ProofKind::Transaction, &std::fs::read(file)?)
                .context("the file does not hold TransactionInputs")?;
            let started = Instant::now();
            let proof = Prover::new(ProofKind::Transaction).prove(job)?;
            let elapsed = started.elapsed();
            let proven = ProvenTransaction::read_from_bytes(&proof)?;
            TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL).verify(&proven)?;
            if let [out] = rest {
                std::fs::write(out, proven.to_bytes())?;
            }
            println!("{:.1} ms ({} build)", elapsed.as_secs_f64() * 1e3, cpu::BUILD);
        }
        ["verify", proof] => {
            let proven = ProvenTransaction::read_from_bytes(&std::fs::read(proof)?)
                .context("the file does not hold a ProvenTransaction")?;
            TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL).verify(&proven)?;
            println!("transaction {} verified by the {} build", proven.id(), cpu::BUILD);
        }
        ["remote", endpoint, file] => {
            use miden_remote_prover_client::remote_prover::tx_prover::RemoteTransactionProver;

            let inputs = TransactionInputs::read_from_bytes(&std::fs::read(file)?)
                .context("the file does not hold TransactionInputs")?;
            let started = Instant::now();
            let proven = RemoteTransactionProver::new(*endpoint)
                .with_timeout(std::time::Duration::from_secs(300))
                .prove(inputs)
                .await
                .with_context(|| format!("proving through {endpoint}"))?;
            let elapsed = started.elapsed();
            TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL).verify(&proven)?;
            println!(
                "transaction {} proved through {endpoint} in {:.1} ms; the proof verifies",
                proven.id(),
                elapsed.as_secs_f64() * 1e3
            );
        }
        ["bench", runs, file, bins @ ..] if !bins.is_empty() => bench(runs.parse()?, file, bins)?,
        _ => bail!(
            "usage: prove_file write-inputs FILE | prove FILE [PROOF] | verify PROOF | \
             bench RUNS FILE BIN… | remote ENDPOINT FILE"
        ),
    }
    Ok(())
}

/// Runs each build on the same inputs in turn (A B C A B C …), then prints medians and ratios.
fn bench(runs: usize, file: &str, bins: &[&str]) -> anyhow::Result<()> {
    if !Path::new(file).exists() {
        let sample = sample_inputs()?;
        std::fs::write(file, sample)?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    let mut names = vec![String::new(); bins.len()];
    for round in 1..=runs {
        for (i, bin) in bins.iter().enumerate() {
            let output = Command::new(bin).args(["prove", file]).output()?;
            if !output.status.success() {
                bail!("{bin}: {}", String::from_utf8_lossy(&output.stderr));
            }
            let line = String::from_utf8(output.stdout)?;
            let ms: f64 = line.split_whitespace().next().context("no time")?.parse()?;
            line.split('(').nth(1).unwrap_or("?").trim_end_matches(")\n").clone_into(&mut names[i]);
            eprintln!("round {round}: {} {ms:.1} ms", names[i]);
            times[i].push(ms);
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    println!("| build | runs | median | all runs | speed-up over the first |");
    println!("|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let all: Vec<String> = times[i].iter().map(|t| format!("{:.2}", t / 1e3)).collect();
        println!(
            "| {name} | {runs} | {:.2} s | {} s | **{:.2}×** |",
            medians[i] / 1e3,
            all.join(", "),
            medians[0] / medians[i]
        );
    }
    Ok(())
}

/// Inputs for `bench` when the file does not exist yet.
fn sample_inputs() -> anyhow::Result<Vec<u8>> {
    let runtime = tokio::runtime::Handle::current();
    let sample = tokio::task::block_in_place(|| {
        runtime.block_on(harness::fixtures::sample_transactions(1))
    })?;
    Ok(sample.inputs[0].to_bytes())
}
