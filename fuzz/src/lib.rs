//! The decoders the worker's prover processes run (`src/prover` of the service, compiled here
//! from the same files), for the fuzz targets.

#[path = "../../src/kind.rs"]
mod kind;
#[path = "../../src/prover/mod.rs"]
pub mod prover;

pub use kind::ProofKind;

/// Decodes `data` as a prover process would for `kind`; the result is dropped. A crash, an abort,
/// an allocation over libFuzzer's limit or a hang here is a finding.
pub fn decode(kind: ProofKind, data: &[u8]) {
    let _ = prover::decode(kind, data);
}
