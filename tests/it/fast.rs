//! The fast (x86-64-v3) build against the generic one. These tests need that build, so they are
//! ignored by a plain `cargo test`; `.ci/run` makes it with `scripts/build-fast.sh --bins` (what
//! the packages carry) and runs them with `MPSDEV_FAST_DIR=target/x86-64-v3/debug … --include-ignored`
//! (and every worker test against it with `MPSDEV_TEST_BIN`). The build's name is the directory's:
//! `MPSDEV_TARGET_CPU=x86-64-v4` gives `target/x86-64-v4/debug`, tested the same way.

use std::path::PathBuf;
use std::process::Command;

use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::batch::ProvenBatch;
use miden_objects::transaction::ProvenTransaction;
use miden_objects::utils::Deserializable;
use miden_tx::TransactionVerifier;

use crate::support::Launch;
use crate::support::fixtures::sample_transactions;
use crate::support::requests::{batch_request, tx_request};

fn fast_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("MPSDEV_FAST_DIR").expect(
        "MPSDEV_FAST_DIR names the fast build's directory (scripts/build-fast.sh --bins → \
         target/x86-64-v3/debug)",
    ))
}

/// The generic build of this checkout: `bin()` follows `MPSDEV_TEST_BIN`, which `.ci/run` points at
/// the fast build for the worker tests.
fn generic_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_miden-proving-service"))
}

/// "x86-64-v3" for `target/x86-64-v3/debug`.
fn fast_build() -> String {
    let dir = fast_dir();
    let name = dir.parent().and_then(|p| p.file_name()).expect("target/<cpu>/<profile>");
    name.to_string_lossy().into_owned()
}

#[tokio::test]
#[ignore = "needs the fast build: scripts/build-fast.sh --bins, MPSDEV_FAST_DIR"]
async fn the_fast_and_the_generic_build_verify_each_others_proofs() {
    let fast = fast_dir();
    let build = fast_build();
    let sample = sample_transactions(1).await.expect("sample transaction");
    let request = || tx_request(&sample.inputs[0]);

    // The fast worker proves; this (generic) process verifies.
    let fast_worker =
        Launch::worker_from(&fast.join("miden-proving-service"), "transaction", 0).start().await;
    let status = fast_worker.worker_status().await;
    assert!(status.version.ends_with(&format!("+{build}")), "version {}", status.version);
    let proof = fast_worker.api().await.prove(request()).await.expect("fast proof");
    let fast_proof = ProvenTransaction::read_from_bytes(&proof.get_ref().payload).expect("decodes");
    TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL)
        .verify(&fast_proof)
        .expect("the generic verifier accepts the fast build's proof");
    assert!(
        fast_worker.output().contains(&format!("build=\"{build}\""))
            || fast_worker.output().contains(&format!("build={build}")),
        "{}",
        fast_worker.output()
    );

    // The generic worker proves; the fast build's verifier checks it: a fast batch worker,
    // which verifies each transaction's proof before it proves their batch.
    let generic_worker = Launch::worker_from(&generic_bin(), "transaction", 0).start().await;
    assert_eq!(generic_worker.worker_status().await.version, env!("CARGO_PKG_VERSION"));
    let proof = generic_worker.api().await.prove(request()).await.expect("generic proof");
    let generic_proof = ProvenTransaction::read_from_bytes(&proof.get_ref().payload).expect("ok");
    assert_eq!(generic_proof.id(), fast_proof.id(), "the same transaction either way");
    let batch = sample.chain.propose_transaction_batch([generic_proof]).expect("a batch");
    let fast_batches =
        Launch::worker_from(&fast.join("miden-proving-service"), "batch", 0).start().await;
    let request = batch_request(&batch);
    let proof = fast_batches
        .api()
        .await
        .prove(request)
        .await
        .expect("the fast build's verifier accepts the generic build's proof");
    let proven = ProvenBatch::read_from_bytes(&proof.get_ref().payload).expect("decodes");
    assert_eq!(proven.id(), batch.id());
}

#[test]
#[ignore = "needs the fast build and qemu-user: scripts/build-fast.sh --bins, MPSDEV_FAST_DIR"]
fn on_a_cpu_without_avx2_the_fast_build_refuses_to_start_naming_what_is_missing() {
    let fast = fast_dir().join("miden-proving-service");
    let build = fast_build();
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
            stderr.starts_with(&format!(
                "miden-proving-service: this is the {build} build, and this CPU lacks "
            )) && stderr.contains("avx2")
                && stderr.contains("run the generic build"),
            "{stderr}"
        );
    }
    // A CPU that reports AVX2 but whose OS has not enabled the AVX register state (no OSXSAVE:
    // qemu's "max" model without XSAVE, as under a kernel booted with `noxsave`) would SIGILL
    // on the first AVX instruction; the check names the state instead.
    let output = Command::new("qemu-x86_64")
        .args(["-cpu", "max,-xsave"])
        .arg(&fast)
        .arg("--version")
        .output()
        .expect("run qemu-x86_64");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("avx2 (disabled by the OS)"), "{stderr}");
    // The same binary on a CPU with the features starts normally: under qemu's "max" model (AVX2,
    // no AVX-512) for the x86-64-v3 build, directly for another (this machine runs it).
    let mut command = if build == "x86-64-v3" {
        let mut qemu = Command::new("qemu-x86_64");
        qemu.args(["-cpu", "max"]).arg(&fast);
        qemu
    } else {
        Command::new(&fast)
    };
    let output = command.arg("--version").output().expect("run the fast build");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("miden-proving-service {} ({build} build)\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The packages' layout: the generic binary in `bin/`, the fast build in
/// `lib/miden-proving-service/miden-proving-service.x86-64-v3`. The generic binary hands over
/// to the fast one where the CPU runs it, and stays itself where not, or when told to.
#[test]
#[ignore = "needs the x86-64-v3 build and qemu-user: scripts/build-fast.sh --bins, MPSDEV_FAST_DIR"]
fn the_generic_binary_starts_the_fast_build_where_the_cpu_runs_it() {
    if fast_build() != miden_proving_service::cpu::FAST_BUILD {
        eprintln!(
            "skipped: the packages carry the {} build, MPSDEV_FAST_DIR holds {}",
            miden_proving_service::cpu::FAST_BUILD,
            fast_build()
        );
        return;
    }
    let prefix = tempfile::tempdir().expect("tempdir");
    let generic = prefix.path().join("bin/miden-proving-service");
    let fast = prefix.path().join(format!(
        "lib/miden-proving-service/miden-proving-service.{}",
        miden_proving_service::cpu::FAST_BUILD
    ));
    std::fs::create_dir_all(generic.parent().expect("bin")).expect("bin/");
    std::fs::create_dir_all(fast.parent().expect("lib")).expect("lib/");
    std::fs::copy(generic_bin(), &generic).expect("copy the generic build");
    std::fs::copy(fast_dir().join("miden-proving-service"), &fast).expect("copy the fast build");
    let version = |build: &str| {
        format!("miden-proving-service {} ({build} build)\n", env!("CARGO_PKG_VERSION"))
    };
    let run = |command: &mut Command| {
        let output = command.arg("--version").output().expect("run");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    // x86-64-v3's features as /proc/cpuinfo names them (abm: lzcnt; pni: sse3; cx16: cmpxchg16b).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .map(|flags| flags.trim_start_matches([' ', '\t', ':']).split(' ').collect())
        .unwrap_or_default();
    let cpu_runs_v3 = [
        "avx", "avx2", "bmi1", "bmi2", "cx16", "f16c", "fma", "abm", "movbe", "popcnt", "pni",
        "sse4_1", "sse4_2", "ssse3", "xsave",
    ]
    .iter()
    .all(|f| flags.contains(f));
    let here = run(&mut Command::new(&generic));
    assert_eq!(here, version(if cpu_runs_v3 { "x86-64-v3" } else { "generic" }));
    assert_eq!(
        run(Command::new(&generic).env(miden_proving_service::cpu::BUILD_ENV, "generic")),
        version("generic")
    );
    // A CPU without AVX2 (qemu's Nehalem): the generic binary stays; had it handed over, the
    // exec'd fast build would run natively, outside qemu, and print its own name.
    let old = run(Command::new("qemu-x86_64").args(["-cpu", "Nehalem"]).arg(&generic));
    assert_eq!(old, version("generic"));
}
