//! Requests as a client sends them, and the check a client makes of the answer: one way to write
//! each, for the tests and the examples alike.

use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::batch::ProposedBatch;
use miden_objects::transaction::{ProvenTransaction, TransactionInputs};
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::proto::{ProofRequest, ProofType};
use miden_tx::TransactionVerifier;

/// A `ProofRequest` of `kind` with any payload, well-formed or not.
pub fn request(kind: ProofType, payload: Vec<u8>) -> ProofRequest {
    ProofRequest { proof_type: kind.into(), payload }
}

/// The `ProofRequest` a client sends to have `inputs` proved.
pub fn tx_request(inputs: &TransactionInputs) -> ProofRequest {
    request(ProofType::Transaction, inputs.to_bytes())
}

/// The `ProofRequest` a client sends to have `batch` proved.
pub fn batch_request(batch: &ProposedBatch) -> ProofRequest {
    request(ProofType::Batch, batch.to_bytes())
}

/// Decodes a transaction proof and verifies it; panics naming which step failed.
pub fn verify_tx(proof: &[u8]) -> ProvenTransaction {
    let proven = ProvenTransaction::read_from_bytes(proof).expect("the proof decodes");
    TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL)
        .verify(&proven)
        .expect("the transaction proof verifies");
    proven
}
