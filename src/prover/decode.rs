//! Payload decoding: a request's bytes into a [`Job`], through [`BoundedReader`], which refuses
//! lengths the payload cannot back. Apart from the prover (the parent module), so that the fuzz
//! targets (`fuzz/`) compile exactly this code without compiling Miden's provers.

use miden_objects::batch::ProposedBatch;
use miden_objects::block::ProposedBlock;
use miden_objects::transaction::TransactionInputs;
use miden_objects::utils::{Deserializable, DeserializationError};

use super::reader::BoundedReader;
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
    pub(super) input: Input,
    /// Names what is being proved, for logs and `STATUS=`: "transaction for account 0x…",
    /// "batch 0x…", "block 12".
    pub subject: String,
}

pub(super) enum Input {
    Transaction(Box<TransactionInputs>),
    Batch(Box<ProposedBatch>),
    Block(Box<ProposedBlock>),
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
