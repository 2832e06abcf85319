//! Fuzz target: a `block` payload through the prover process's decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    miden_proving_service_fuzz::decode(miden_proving_service_fuzz::ProofKind::Block, data);
});
