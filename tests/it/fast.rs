//! The fast (x86-64-v3) build against the generic one. These tests need that build, so they are
//! ignored by a plain `cargo test`; `.ci/run` makes it with `scripts/build-fast.sh --bins
//! --examples` and runs them with `MPS_FAST_DIR=target/x86-64-v3/debug … --include-ignored`
//! (and every worker test against it with `MPS_TEST_BIN`).

use std::path::PathBuf;
use std::process::Command;

use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::transaction::ProvenTransaction;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::proto::{ProofRequest, ProofType};
use miden_tx::TransactionVerifier;

use crate::support::fixtures::sample_transactions;
use crate::support::{Launch, bin};

fn fast_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("MPS_FAST_DIR").expect(
        "MPS_FAST_DIR names the fast build's directory (scripts/build-fast.sh --bins --examples \
         → target/x86-64-v3/debug)",
    ))
}

#[tokio::test]
#[ignore = "needs the fast build: scripts/build-fast.sh --bins --examples, MPS_FAST_DIR"]
async fn the_fast_and_the_generic_build_verify_each_others_proofs() {
    let fast = fast_dir();
    let sample = sample_transactions(1).await.expect("sample transaction");
    let request = || ProofRequest {
        proof_type: ProofType::Transaction.into(),
        payload: sample.inputs[0].to_bytes(),
    };

    // The fast worker proves; this (generic) process verifies.
    let fast_worker =
        Launch::worker_from(&fast.join("miden-proving-service"), "transaction", 0).start().await;
    let status = fast_worker.worker_status().await;
    assert!(status.version.ends_with("+x86-64-v3"), "version {}", status.version);
    let proof = fast_worker.api().await.prove(request()).await.expect("fast proof");
    let fast_proof = ProvenTransaction::read_from_bytes(&proof.get_ref().payload).expect("decodes");
    TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL)
        .verify(&fast_proof)
        .expect("the generic verifier accepts the fast build's proof");
    assert!(
        fast_worker.output().contains("build=\"x86-64-v3\"")
            || fast_worker.output().contains("build=x86-64-v3"),
        "{}",
        fast_worker.output()
    );

    // The generic worker proves; the fast build's verifier checks it.
    let generic_worker = Launch::worker_from(&bin(), "transaction", 0).start().await;
    let proof = generic_worker.api().await.prove(request()).await.expect("generic proof");
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), &proof.get_ref().payload).expect("write the proof");
    let output = Command::new(fast.join("examples/prove_file"))
        .arg("verify")
        .arg(file.path())
        .output()
        .expect("run the fast build's prove_file");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("verified by the x86-64-v3 build"), "{stdout}");
    let generic_proof = ProvenTransaction::read_from_bytes(&proof.get_ref().payload).expect("ok");
    assert_eq!(generic_proof.id(), fast_proof.id(), "the same transaction either way");
}

#[test]
#[ignore = "needs the fast build and qemu-user: scripts/build-fast.sh --bins, MPS_FAST_DIR"]
fn on_a_cpu_without_avx2_the_fast_build_refuses_to_start_naming_what_is_missing() {
    let fast = fast_dir().join("miden-proving-service");
    // qemu-user emulating a Nehalem (SSE4.2, no AVX) reports that CPU's CPUID to the binary.
    for args in [&["--version"][..], &["start-worker", "--localhost", "--port", "0"]] {
        let output = Command::new("qemu-x86_64")
            .args(["-cpu", "Nehalem"])
            .arg(&fast)
            .args(args)
            .output()
            .expect("run qemu-x86_64 (Debian package qemu-user)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{stderr}");
        assert!(
            stderr.starts_with(
                "miden-proving-service: this is the x86-64-v3 build, and this CPU lacks "
            ) && stderr.contains("avx2")
                && stderr.contains("run the generic build"),
            "{stderr}"
        );
    }
    // The same binary on a CPU model with AVX2 starts normally.
    let output = Command::new("qemu-x86_64")
        .args(["-cpu", "max"])
        .arg(&fast)
        .arg("--version")
        .output()
        .expect("run qemu-x86_64");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("miden-proving-service {} (x86-64-v3 build)\n", env!("CARGO_PKG_VERSION"))
    );
}
