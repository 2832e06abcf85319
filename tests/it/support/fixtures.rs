//! Real Miden inputs made with `miden-testing`'s `MockChain`: executed transactions by wallets
//! with Falcon-signature authentication, each consuming a P2ID note sent to it. Shared by the
//! integration tests, the quickstart example and the benchmarks.

use anyhow::Context;
use miden_objects::asset::FungibleAsset;
use miden_objects::note::NoteType;
use miden_objects::transaction::TransactionInputs;
use miden_testing::{Auth, MockChain};

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
