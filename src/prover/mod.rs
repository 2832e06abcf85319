//! The prover backend: the only module that names Miden types. It decodes a payload into a job,
//! proves the job with the real Miden prover for its kind, and encodes the proof. Everything here
//! is synchronous and CPU-bound, and runs in a prover process of its own ([`crate::worker::job`]),
//! never in the worker: a fault of the Miden code on hostile input ends that process, not the
//! service. Payloads are decoded through [`reader::BoundedReader`], which refuses lengths the
//! payload cannot back.

pub mod reader;

use miden_block_prover::LocalBlockProver;
use miden_objects::MIN_PROOF_SECURITY_LEVEL;
use miden_objects::batch::ProposedBatch;
use miden_objects::block::ProposedBlock;
use miden_objects::transaction::TransactionInputs;
use miden_objects::utils::{Deserializable, DeserializationError, Serializable};
use miden_tx::LocalTransactionProver;
use miden_tx_batch_prover::LocalBatchProver;
use reader::BoundedReader;

use crate::ProofKind;

/// Why a payload was not proved.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    /// The payload is not the serialized input its proof type names: the caller's fault.
    #[error("payload is not a valid {input}")]
    Decode {
        /// The Miden type the payload should have been.
        input: &'static str,
        /// What the decoder found wrong.
        #[source]
        source: DeserializationError,
    },
    /// The prover rejected the input or failed while proving.
    #[error("{kind} proving failed")]
    Prove {
        /// Which prover failed.
        kind: ProofKind,
        /// The prover's own error, with its cause chain.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A decoded request, ready to prove.
pub struct Job {
    input: Input,
    /// Names what is being proved, for logs and `STATUS=`: "transaction for account 0x…",
    /// "batch 0x…", "block 12".
    pub subject: String,
}

enum Input {
    Transaction(Box<TransactionInputs>),
    Batch(Box<ProposedBatch>),
    Block(Box<ProposedBlock>),
}

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

/// Decodes `payload` as the input of `kind` (without a prover: what the fuzz targets run).
///
/// Miden's decoders panic on some malformed payloads (fuzzing found an `expect` on a decoded
/// value in `PartialBlockchain`, an assertion in winter-air's `TraceInfo::new` reached from a
/// proof's header, a `capacity overflow` from a decoded length): that is the payload's fault like
/// any other decoding error, and is reported as one.
pub fn decode(kind: ProofKind, payload: &[u8]) -> Result<Job, ProveError> {
    std::panic::catch_unwind(|| decode_unguarded(kind, payload)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(ProveError::Decode {
            input: input_name(kind),
            source: DeserializationError::InvalidValue(format!("the decoder panicked: {message}")),
        })
    })
}

/// The Miden type a payload of `kind` holds.
pub fn input_name(kind: ProofKind) -> &'static str {
    match kind {
        ProofKind::Transaction => "TransactionInputs",
        ProofKind::Batch => "ProposedBatch",
        ProofKind::Block => "ProposedBlock",
    }
}

fn decode_unguarded(kind: ProofKind, payload: &[u8]) -> Result<Job, ProveError> {
    fn read<T: Deserializable>(payload: &[u8], kind: ProofKind) -> Result<T, ProveError> {
        BoundedReader::decode::<T>(payload)
            .map_err(|source| ProveError::Decode { input: input_name(kind), source })
    }
    Ok(match kind {
        ProofKind::Transaction => {
            let inputs: TransactionInputs = read(payload, kind)?;
            let subject = format!("transaction for account {}", inputs.account().id());
            Job { input: Input::Transaction(Box::new(inputs)), subject }
        }
        ProofKind::Batch => {
            let batch: ProposedBatch = read(payload, kind)?;
            let subject = format!("batch {}", batch.id());
            Job { input: Input::Batch(Box::new(batch)), subject }
        }
        ProofKind::Block => {
            let block: ProposedBlock = read(payload, kind)?;
            let subject = format!("block {}", block.block_num());
            Job { input: Input::Block(Box::new(block)), subject }
        }
    })
}
