//! [`ProofKind`]: which of the three Miden provers a worker runs and a request asks for.

use std::fmt;
use std::str::FromStr;

/// The kind of proof a request asks for and a worker serves (one kind per worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProofKind {
    /// `TransactionInputs` → `ProvenTransaction` (a STARK proof, seconds).
    Transaction,
    /// `ProposedBatch` → `ProvenBatch` (verifies the transaction proofs, milliseconds).
    Batch,
    /// `ProposedBlock` → `ProvenBlock` (milliseconds).
    Block,
}

impl ProofKind {
    /// Every kind, in wire order.
    pub const ALL: [ProofKind; 3] = [ProofKind::Transaction, ProofKind::Batch, ProofKind::Block];

    /// Lower-case name as used in configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ProofKind::Transaction => "transaction",
            ProofKind::Batch => "batch",
            ProofKind::Block => "block",
        }
    }

    /// Capitalised, as the original service spells it in its status document and messages.
    pub fn upstream_name(self) -> &'static str {
        match self {
            ProofKind::Transaction => "Transaction",
            ProofKind::Batch => "Batch",
            ProofKind::Block => "Block",
        }
    }
}

impl fmt::Display for ProofKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A proof-type name that is not one of `transaction`, `batch`, `block`.
#[derive(Debug, thiserror::Error)]
#[error("unknown proof type `{0}`; expected transaction, batch or block")]
pub struct UnknownProofKind(pub String);

impl FromStr for ProofKind {
    type Err = UnknownProofKind;

    /// Case-insensitive, so upstream's `Transaction` (as in its status JSON) is accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProofKind::ALL
            .into_iter()
            .find(|kind| kind.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownProofKind(s.to_owned()))
    }
}
