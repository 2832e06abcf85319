//! Hostile but well-formed transaction payloads, for tests of the prover process. Each starts from
//! a real transaction that `MockChain` executed ([`super::fixtures`]) and changes only what the
//! attack needs, so the payload decodes like any other and reaches `LocalTransactionProver`.
//!
//! They rest on three facts of the Miden 0.12 line (miden-core/miden-processor 0.19, miden-tx
//! 0.12), read in their sources:
//! - A serialized `MastForest` stores every node's digest and the decoder trusts it
//!   (`mast/serialization/info.rs`: `JoinNode::new_unsafe(children, digest)` and so on); the
//!   processor that builds the trace checks a control block's hash only with a `debug_assert`
//!   (`decoder/mod.rs`, `start_join_node`), which is compiled out here: `Cargo.toml` builds
//!   every dependency with `debug-assertions = false` (with them, that assertion panics first).
//! - The kernel authenticates an account's code by its procedure list alone:
//!   `AccountCode::commitment` hashes the procedures' MAST roots and storage ranges, not the
//!   forest (`account/code/mod.rs`), so a forest with other node bodies under the same roots
//!   passes the prologue, and the account's commitment is unchanged.
//! - The prover resolves every procedure by digest through a MAST store into which it loads the
//!   account's forest last (`miden-tx` `prover/mod.rs` and `prover/mast_store.rs`), and the
//!   epilogue always runs the auth procedure, procedure 0, with a `dyncall` on its root
//!   (`miden-lib` `asm/kernels/transaction/lib/epilogue.masm`). So what the account's forest
//!   has under the auth root is what runs, in every transaction.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use miden_lib::utils::ScriptBuilder;
use miden_objects::Word;
use miden_objects::account::AccountComponent;
use miden_objects::assembly::Assembler;
use miden_objects::assembly::mast::{JoinNode, MastForest, MastNode, MastNodeExt, MastNodeId};
use miden_objects::transaction::{TransactionInputs, TransactionScript};
use miden_objects::utils::{Deserializable, Serializable};

use super::fixtures::{SampleTransactions, sample_transactions};

/// A complete 9-byte payload that announces 2^40 elements and brings none: winter-utils' vint64
/// in its 9-byte form (a zero first byte, then the value as 8 little-endian bytes). A batch or
/// block prover reads it as the length of its first `Vec` (the batch's transactions, the block's
/// batches), and the stock decoder (`ByteReader::read_many`) reserves room for that many first.
pub const LENGTH_BOMB: [u8; 9] = [0, 0, 0, 0, 0, 0, 1, 0, 0];

/// Procedures in each of [`distinct_large_code_requests`]' libraries.
const LARGE_CODE_PROCEDURES: usize = 256;

/// `push.<value> drop` pairs in each of those procedures: about 10 bytes of MAST apiece (an
/// opcode with its 8-byte immediate, an opcode), some 400 KB of MAST a library.
const LARGE_CODE_PUSHES: usize = 160;

/// An account procedure that never returns: its loop condition is 1 every time round.
const SPIN_SOURCE: &str = "\
pub proc spin
    push.1
    while.true
        push.1
    end
end
";

/// A transaction script that fails at once: it runs after the input notes, so the account's code
/// has been loaded by then.
const FAILING_SCRIPT: &str = "begin push.0 assert end";

/// The bytes of a `TransactionInputs` that decodes fine but whose auth procedure refers to itself
/// through an `External` node: 32 changed bytes of a real transaction (the digest in one node of
/// the account's MAST forest).
///
/// Why the prover recurses: the auth procedure (a Join tree over a basic block and `External`
/// nodes for `miden::active_account::get_item` and `miden::auth::rpo_falcon512`, which the
/// account components link dynamically) keeps its root digest, so the kernel's checks pass and
/// the epilogue `dyncall`s it as usual. Its first `External` node now names that same root. The
/// tracing processor (`miden-processor` `Process::execute_mast_node`) runs an `External` node by
/// looking the digest up in the host's MAST store, which finds the account's forest and the Join
/// root (not an `External` node, so the `CircularExternalNode` check does not fire), and calling
/// itself on it: one Rust call per node level, nothing that bounds the depth. A round is three
/// such calls (the root Join, the inner Join, the `External` node) and about nine cycles (two
/// JOIN operations and the block's `dropw push.0`), some 7 KB of trace and hasher rows, so the
/// stack overflows long before anything else gives out: at a few tens of thousands of rounds on
/// a 64 MiB stack, a few thousand on the main thread's 8 MiB, within a second.
#[allow(clippy::unused_async)] // Async like `distinct_large_code_requests`, which runs a chain.
pub async fn recursive_account_code(sample: &SampleTransactions) -> anyhow::Result<Vec<u8>> {
    let inputs = sample.inputs.first().context("a sample transaction")?;
    let code = inputs.account().code();
    let forest = code.mast();
    let auth_root = *code.get_procedure_by_index(0).mast_root();
    let root_id = forest.find_procedure_root(auth_root).context("the auth procedure's root")?;
    ensure!(!forest[root_id].is_external(), "the auth procedure is not in the account's forest");
    let external = first_external_on_path(&forest, root_id)
        .context("the auth procedure reaches no External node")?;

    let original = inputs.to_bytes();
    let mut bytes = original.clone();
    let at = account_forest_offset(inputs, &bytes)?
        + node_digest_offset(&forest, &forest.to_bytes(), external)?;
    bytes[at..at + Word::SERIALIZED_SIZE].copy_from_slice(&auth_root.to_bytes());

    let changed = original.iter().zip(&bytes).filter(|(a, b)| a != b).count();
    ensure!((1..=Word::SERIALIZED_SIZE).contains(&changed), "{changed} bytes changed, not ≤ 32");
    let decoded = decode(&bytes)?;
    let mast = decoded.account().code().mast();
    ensure!(
        matches!(&mast[external], MastNode::External(node) if node.digest() == auth_root),
        "the patched node names the auth procedure"
    );
    ensure!(mast.find_procedure_root(auth_root) == Some(root_id), "the auth root is unchanged");
    ensure!(decoded.account().code().commitment() == code.commitment(), "same code commitment");
    Ok(bytes)
}

/// The bytes of a `TransactionInputs` whose auth procedure spins in `push.1 while.true push.1
/// end`, so the execution trace grows until memory runs out.
///
/// Made by hand, not by executing such a transaction (the executor would spin too, until its
/// cycle limit): the account's forest gets a `spin` procedure (merged in with
/// `MastForest::merge`), and the node at the auth root becomes a Join over `spin` that keeps the
/// auth root's digest, trusted as in [`recursive_account_code`]. The procedure list, and so the
/// code and account commitments, are unchanged; the input notes run as in the real transaction,
/// then the epilogue `dyncall`s the auth root and never comes back.
///
/// Each round of the loop is five cycles (REPEAT, SPAN, PAD, INCR, END), which the tracing
/// processor records in full: 49 main-trace columns of 8 bytes a cycle, plus the 8 hasher-chiplet
/// rows of 16 columns that every SPAN copies, about 0.6 KB a cycle. The only bound is the cycle
/// limit of `ExecutionOptions::default()` (what `LocalTransactionProver::default()` uses), 2^29
/// cycles: some 300 GB of trace, so memory runs out first, after a few million cycles per GB.
#[allow(clippy::unused_async)] // Async like `distinct_large_code_requests`, which runs a chain.
pub async fn looping_account_code(sample: &SampleTransactions) -> anyhow::Result<Vec<u8>> {
    let inputs = sample.inputs.first().context("a sample transaction")?;
    let code = inputs.account().code();
    let auth_root = *code.get_procedure_by_index(0).mast_root();
    let spin = AccountComponent::compile(SPIN_SOURCE, Assembler::default(), Vec::new())
        .context("compiling the looping procedure")?;
    let spin_root = spin.mast_forest().procedure_digests().next().context("the spin procedure")?;

    let original = code.mast();
    let (mut forest, _) = MastForest::merge([original.as_ref(), spin.mast_forest()])
        .context("merging the looping procedure into the account's forest")?;
    let auth_id = forest.find_procedure_root(auth_root).context("the merged auth root")?;
    let spin_id = forest.find_procedure_root(spin_root).context("the merged spin root")?;
    forest[auth_id] = MastNode::Join(JoinNode::new_unsafe([spin_id, spin_id], auth_root));
    let bytes = with_account_forest(inputs, &forest)?;

    let decoded = decode(&bytes)?;
    let mast = decoded.account().code().mast();
    let id = mast.find_procedure_root(auth_root).context("the decoded auth root")?;
    ensure!(
        matches!(&mast[id], MastNode::Join(join) if mast[join.first()].digest() == spin_root),
        "the auth root runs the loop"
    );
    ensure!(decoded.account().code().commitment() == code.commitment(), "same code commitment");
    Ok(bytes)
}

/// `count` transaction payloads, each bringing different large account code: the real account's
/// forest merged with a library of 256 procedures of 160 `push.<value> drop` pairs each (some
/// 400 KB of MAST), whose values are drawn from a per-call salt and the request's index, so no
/// two requests (nor two calls) share a procedure digest.
///
/// They decode fine, and each fails to prove within milliseconds: its transaction script (`push.0
/// assert`) fails after the input notes have run, so the prover has decoded the code, loaded it
/// into its MAST store and started executing by then, but never builds a STARK. The procedure
/// list is the real account's, so the extra procedures change no commitment; without the script
/// the transaction would prove (in the usual ~10 s). For checking that a worker's memory stays
/// flat across many requests with code it has not seen before.
pub async fn distinct_large_code_requests(count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut sample = sample_transactions(1).await?;
    let inputs = sample.inputs.pop().context("a sample transaction")?;
    let script = ScriptBuilder::new(false)
        .compile_tx_script(FAILING_SCRIPT)
        .context("compiling the failing transaction script")?;
    let script_root = script.root();
    let args = inputs.tx_args().clone().with_tx_script(script);
    let inputs = inputs.with_tx_args(args);
    let original = inputs.account().code().mast();

    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is past 1970");
    let salt = now.as_secs().rotate_left(32) ^ u64::from(now.subsec_nanos());
    let mut payloads = Vec::with_capacity(count);
    for request in 0..count {
        let library = AccountComponent::compile(
            large_library_source(salt ^ splitmix64(request as u64)),
            Assembler::default(),
            Vec::new(),
        )
        .context("compiling a large library")?;
        let (forest, _) = MastForest::merge([original.as_ref(), library.mast_forest()])
            .context("merging the large library into the account's forest")?;
        let size = forest.to_bytes().len();
        ensure!(size >= 128 * 1024, "a large library is only {size} bytes of MAST");
        let bytes = with_account_forest(&inputs, &forest)?;

        let decoded = decode(&bytes)?;
        let code = decoded.account().code();
        ensure!(
            code.mast().procedure_roots().len()
                >= original.procedure_roots().len() + LARGE_CODE_PROCEDURES,
            "the decoded code carries the library"
        );
        ensure!(code.commitment() == inputs.account().code().commitment(), "same commitment");
        ensure!(
            decoded.tx_script().map(TransactionScript::root) == Some(script_root),
            "the failing script is in place"
        );
        payloads.push(bytes);
    }
    Ok(payloads)
}

/// A real transaction's `TransactionInputs` with one length made to announce 2^40 elements, in
/// the 9-byte form of [`LENGTH_BOMB`]; everything after it is the real transaction's bytes.
///
/// The length changed is that of the procedure roots (`Vec<u32>`) of the account code's MAST
/// forest: the first length in the whole encoding that the stock decoder preallocates for
/// (`Vec::with_capacity` in `read_many`: 2^40 × 4 bytes, 4 TB). Before it come only the account
/// ID, the nonce, the forest's magic and version, and its node and decorator counts (the node
/// infos are collected from an iterator, without reserving). It is located by re-serializing that
/// prefix from the decoded values and checking it, and the roots' node ids after it, against the
/// bytes.
pub fn inflated_length_transaction(inputs: &TransactionInputs) -> Vec<u8> {
    inflate_roots_length(inputs).expect("the account code's roots length is where it should be")
}

/// [`inflated_length_transaction`], with its checks as errors.
fn inflate_roots_length(inputs: &TransactionInputs) -> anyhow::Result<Vec<u8>> {
    let bytes = inputs.to_bytes();
    let forest = inputs.account().code().mast();
    let start = account_forest_offset(inputs, &bytes)?;
    ensure!(bytes[start..].starts_with(b"MAST\0"), "the forest begins with its magic");

    // Magic (5 bytes) and version (3 bytes), then the node and decorator counts.
    let mut at = start + 8;
    for count in [forest.nodes().len(), forest.decorators().len()] {
        let encoded = count.to_bytes();
        ensure!(bytes[at..].starts_with(&encoded), "a forest count at {at}");
        at += encoded.len();
    }
    let roots = forest.procedure_roots();
    let length = roots.len().to_bytes();
    ensure!(bytes[at..].starts_with(&length), "the roots' length at {at}");
    let ids: Vec<u8> = roots.iter().flat_map(|&id| u32::from(id).to_le_bytes()).collect();
    ensure!(bytes[at + length.len()..].starts_with(&ids), "the root IDs after their length");

    // Not decoded here: with the stock decoder that would try to reserve the 4 TB in this
    // process.
    let inflated = inflate_length_at(&bytes, at);
    ensure!(inflated[at..].starts_with(&LENGTH_BOMB), "the inflated length is in place");
    Ok(inflated)
}

/// `payload` with the length (a winter-utils vint64) at `offset` replaced by 2^40, in the 9-byte
/// form of [`LENGTH_BOMB`]; the bytes around it are kept, so the payload is longer than before
/// unless the original was already 9 bytes long. At offset 0 of a serialized `ProposedBatch` or
/// `ProposedBlock` that is the length of its first `Vec` (the transactions, the batches). Panics
/// if no whole vint64 starts at `offset`.
pub fn inflate_length_at(payload: &[u8], offset: usize) -> Vec<u8> {
    let first = *payload.get(offset).expect("a vint64 at the offset");
    // The position of the lowest set bit of the first byte gives the length; a zero byte, 9.
    let length = if first == 0 { 9 } else { first.trailing_zeros() as usize + 1 };
    assert!(offset + length <= payload.len(), "the vint64 at {offset} is cut short");
    let mut inflated = Vec::with_capacity(payload.len() + LENGTH_BOMB.len());
    inflated.extend_from_slice(&payload[..offset]);
    inflated.extend_from_slice(&LENGTH_BOMB);
    inflated.extend_from_slice(&payload[offset + length..]);
    inflated
}

/// Decodes a payload as the prover will, so a helper never hands out bytes that do not decode.
fn decode(bytes: &[u8]) -> anyhow::Result<TransactionInputs> {
    TransactionInputs::read_from_bytes(bytes).context("the hostile payload decodes")
}

/// Where the native account's MAST forest starts in `bytes`, the encoding of `inputs`:
/// `TransactionInputs` begins with its `PartialAccount`, which writes the account ID, the nonce
/// and then the code, forest first. Checked by re-serializing that prefix and the forest.
fn account_forest_offset(inputs: &TransactionInputs, bytes: &[u8]) -> anyhow::Result<usize> {
    let account = inputs.account();
    let mut prefix = account.id().to_bytes();
    prefix.extend(account.nonce().to_bytes());
    ensure!(bytes.starts_with(&prefix), "the payload starts with the account ID and nonce");
    let forest = account.code().mast().to_bytes();
    ensure!(bytes[prefix.len()..].starts_with(&forest), "the account's forest follows them");
    Ok(prefix.len())
}

/// The encoding of `inputs` with the native account's MAST forest replaced by `forest`. The
/// forest is self-delimiting and not length-prefixed, so the bytes around it stay as they are.
fn with_account_forest(inputs: &TransactionInputs, forest: &MastForest) -> anyhow::Result<Vec<u8>> {
    let bytes = inputs.to_bytes();
    let start = account_forest_offset(inputs, &bytes)?;
    let end = start + inputs.account().code().mast().to_bytes().len();
    let mut spliced = bytes[..start].to_vec();
    forest.write_into(&mut spliced);
    spliced.extend_from_slice(&bytes[end..]);
    Ok(spliced)
}

/// The first `External` node the procedure at `root` always reaches: depth first, first child
/// first, through Join children and Call callees only (the nodes that run unconditionally). An
/// `External` node that is a procedure root itself is passed over: patched, it could be what a
/// look-up of the digest finds, and the processor refuses an `External` node found that way.
fn first_external_on_path(forest: &MastForest, root: MastNodeId) -> Option<MastNodeId> {
    let mut pending = vec![root];
    while let Some(id) = pending.pop() {
        match &forest[id] {
            MastNode::External(_) if !forest.is_procedure_root(id) => return Some(id),
            MastNode::Join(join) => pending.extend([join.second(), join.first()]),
            MastNode::Call(call) => pending.push(call.callee()),
            _ => {}
        }
    }
    None
}

/// Where node `id`'s digest lies in `encoded`, the serialization of `forest`. The node table of
/// the format (miden-core `mast/serialization`) is a run of fixed-width entries in ID order, an
/// 8-byte type word and then the 32-byte digest; it is found as the one place where the digests
/// of all the forest's nodes follow each other so, not computed from the header's variable-width
/// fields, so a change of format makes this fail rather than patch the wrong bytes.
fn node_digest_offset(
    forest: &MastForest,
    encoded: &[u8],
    id: MastNodeId,
) -> anyhow::Result<usize> {
    const ENTRY: usize = 8 + Word::SERIALIZED_SIZE;
    let digests: Vec<Vec<u8>> =
        forest.nodes().iter().map(|node| node.digest().to_bytes()).collect();
    let first = digests.first().context("an empty forest")?;
    let table = digests.len() * ENTRY;
    ensure!(encoded.len() >= table, "the encoding is shorter than its node table");
    let mut tables = (0..=encoded.len() - table).filter(|&start| {
        encoded[start + 8..start + ENTRY] == first[..]
            && digests.iter().enumerate().all(|(index, digest)| {
                let at = start + index * ENTRY + 8;
                encoded[at..at + Word::SERIALIZED_SIZE] == digest[..]
            })
    });
    let start = tables.next().context("no node table in the forest's encoding")?;
    ensure!(tables.next().is_none(), "two node tables in the forest's encoding");
    let index = usize::try_from(u32::from(id)).expect("a node ID fits a usize");
    Ok(start + index * ENTRY + 8)
}

/// The MASM of a library of [`LARGE_CODE_PROCEDURES`] procedures, each of [`LARGE_CODE_PUSHES`]
/// `push.<value> drop` pairs with values drawn from `seed`: distinct blocks, so nothing is
/// deduplicated, and distinct digests for distinct seeds.
fn large_library_source(seed: u64) -> String {
    let mut source = String::with_capacity(LARGE_CODE_PROCEDURES * LARGE_CODE_PUSHES * 32);
    let mut state = seed;
    for procedure in 0..LARGE_CODE_PROCEDURES {
        writeln!(source, "pub proc bulk_{procedure}").expect("writing to a String");
        for _ in 0..LARGE_CODE_PUSHES {
            state = splitmix64(state);
            // Below 2^62, so a field element, and at least 2, so a PUSH with an immediate (0 and
            // 1 assemble to PAD and PAD INCR).
            let value = (state >> 2) | 2;
            writeln!(source, "    push.{value} drop").expect("writing to a String");
        }
        source.push_str("end\n");
    }
    source
}

/// The `SplitMix64` step: a cheap, well-mixed sequence of values from any seed.
fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
