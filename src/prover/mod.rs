//! The prover backend: the only module that names Miden types. It decodes a payload into a job,
//! proves the job with the real Miden prover for its kind, and encodes the proof. Everything here
//! is synchronous and CPU-bound, and runs in a prover process of its own ([`crate::worker::job`]),
//! never in the worker: a fault of the Miden code on hostile input ends that process, not the
//! service. Payloads are decoded through [`reader::BoundedReader`], which refuses lengths the
//! payload cannot back.

mod decode;
pub mod reader;

use decode::Input;
pub use decode::{Job, ProveError, decode, input_name};
use miden_block_prover::LocalBlockProver;
use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::utils::Serializable;
use miden_tx::LocalTransactionProver;
use miden_tx_batch_prover::LocalBatchProver;

use crate::ProofKind;

/// The Miden prover for one proof kind. A prover process makes one for its one request, so
/// nothing a request brings (the transaction prover's MAST store grows with every account's
/// code) outlives it.
pub struct Prover {
    kind: ProofKind,
    /// Only a transaction prover has state (its MAST store: kernel, standard library, miden-lib).
    transaction: Option<LocalTransactionProver>,
}

impl Prover {
    /// A prover for `kind` at Miden's minimum security level (what clients verify against),
    /// ready to prove: what Miden decodes lazily on first use (the kernel, the standard library)
    /// is decoded here, so a prover process waiting as the spare pays it before its request
    /// comes (≈ 12 ms a batch, ≈ 0.3 s a transaction).
    pub fn new(kind: ProofKind) -> Self {
        let transaction = (kind == ProofKind::Transaction).then(LocalTransactionProver::default);
        if kind == ProofKind::Batch {
            // A batch proof verifies each transaction's proof: the kernel's program and the
            // standard library's precompile verifiers.
            let _ = miden_tx::TransactionVerifier::new(MIN_PROOF_SECURITY_LEVEL);
            let _ = miden_lib::StdLibrary::default();
        }
        Prover { kind, transaction }
    }

    /// Which kind this prover serves.
    pub fn kind(&self) -> ProofKind {
        self.kind
    }

    /// Decodes `payload` as the input of this prover's kind.
    pub fn decode(&self, payload: &[u8]) -> Result<Job, ProveError> {
        decode(self.kind, payload)
    }

    /// Proves `job` and returns the serialized proof (`ProvenTransaction`, `ProvenBatch` or
    /// `ProvenBlock`).
    pub fn prove(&mut self, job: Job) -> Result<Vec<u8>, ProveError> {
        let kind = self.kind;
        let failed =
            |source: Box<dyn std::error::Error + Send + Sync>| ProveError::Prove { kind, source };
        match job.input {
            Input::Transaction(inputs) => self
                .transaction
                .get_or_insert_with(LocalTransactionProver::default)
                .prove(*inputs)
                .map(|proven| proven.to_bytes())
                .map_err(|err| failed(Box::new(err))),
            Input::Batch(batch) => LocalBatchProver::new(MIN_PROOF_SECURITY_LEVEL)
                .prove(*batch)
                .map(|proven| proven.to_bytes())
                .map_err(|err| failed(Box::new(err))),
            Input::Block(block) => LocalBlockProver::new(MIN_PROOF_SECURITY_LEVEL)
                .prove(*block)
                .map(|proven| proven.to_bytes())
                .map_err(|err| failed(Box::new(err))),
        }
    }
}
