//! Real Miden inputs made with `miden-testing`'s `MockChain`: executed transactions by wallets
//! with Falcon-signature authentication, each consuming a P2ID note sent to it. Shared by the
//! integration tests, the quickstart example and the benchmarks.

use anyhow::Context;
use miden_objects::asset::FungibleAsset;
use miden_objects::note::NoteType;
use miden_objects::transaction::{ProvenTransaction, TransactionInputs};
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::ProofKind;
use miden_proving_service::prover::{ProveError, Prover};
use miden_testing::{Auth, MockChain};

/// Proves `input` in this process with the service's own prover (the code a worker's prover
/// process runs: `prover::Prover`, which Miden's provers are compiled into once, in the library).
/// Tests and examples prove through it, not with `LocalTransactionProver::prove` itself: that is
/// generic (`impl Into<TransactionInputs>`), so every binary calling it would compile the whole
/// STARK prover again, at opt-level 3 (four minutes a binary on two cores).
pub fn prove_here(kind: ProofKind, input: &impl Serializable) -> Result<Vec<u8>, ProveError> {
    let mut prover = Prover::new(kind);
    let job = prover.decode(&input.to_bytes())?;
    prover.prove(job)
}

/// [`prove_here`] for a transaction, decoded.
pub fn prove_transaction_here(inputs: &TransactionInputs) -> ProvenTransaction {
    let proof = prove_here(ProofKind::Transaction, inputs).expect("the transaction proves");
    ProvenTransaction::read_from_bytes(&proof).expect("the proof decodes")
}

/// A mock chain and `count` independent transactions against its latest block, ready to prove.
pub struct SampleTransactions {
    /// The chain the transactions were executed against (to propose batches and blocks).
    pub chain: MockChain,
    /// One `TransactionInputs` per transaction, as a client would send them to a prover.
    pub inputs: Vec<TransactionInputs>,
}

/// Builds a chain with `count` wallets, each with a P2ID note to consume, and executes one
/// transaction per wallet (execution only; proving is left to the caller).
pub async fn sample_transactions(count: usize) -> anyhow::Result<SampleTransactions> {
    let mut builder = MockChain::builder();
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let wallet = builder.add_existing_wallet(Auth::BasicAuth)?;
        let asset = FungibleAsset::mock(100);
        let note = builder.add_p2id_note(wallet.id(), wallet.id(), &[asset], NoteType::Public)?;
        pairs.push((wallet.id(), note.id()));
    }
    let mut chain = builder.build()?;
    chain.prove_next_block()?;

    let mut inputs = Vec::with_capacity(count);
    for (wallet, note) in pairs {
        let executed = chain
            .build_tx_context(wallet, &[note], &[])?
            .build()?
            .execute()
            .await
            .context("executing the sample transaction")?;
        inputs.push(TransactionInputs::from(executed));
    }
    Ok(SampleTransactions { chain, inputs })
}
