//! The generated gRPC code for `proto/remote_prover.proto` and the descriptor set that server
//! reflection serves. Conversions between wire enums and [`ProofKind`] live here so every other
//! module speaks `ProofKind`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use crate::ProofKind;

tonic::include_proto!("remote_prover");

/// Encoded `FileDescriptorSet` of `remote_prover.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/remote_prover_descriptor.bin"));

impl From<ProofKind> for ProofType {
    fn from(kind: ProofKind) -> Self {
        match kind {
            ProofKind::Transaction => ProofType::Transaction,
            ProofKind::Batch => ProofType::Batch,
            ProofKind::Block => ProofType::Block,
        }
    }
}

/// A `proof_type` number the protocol does not define. The worker and the proxy both refuse it
/// with `INVALID_ARGUMENT` (upstream proved it as a transaction).
#[derive(Debug, thiserror::Error)]
#[error("unknown proof_type {0}; expected 0 (TRANSACTION), 1 (BATCH) or 2 (BLOCK)")]
pub struct UnknownProofType(pub i32);

impl ProofKind {
    /// The kind a request's `proof_type` field asks for.
    pub fn from_wire(proof_type: i32) -> Result<ProofKind, UnknownProofType> {
        ProofType::try_from(proof_type)
            .map(ProofKind::from)
            .map_err(|_| UnknownProofType(proof_type))
    }
}

impl From<ProofType> for ProofKind {
    fn from(ty: ProofType) -> Self {
        match ty {
            ProofType::Transaction => ProofKind::Transaction,
            ProofType::Batch => ProofKind::Batch,
            ProofType::Block => ProofKind::Block,
        }
    }
}
