//! Hostile input against real worker processes: crafted payloads, inputs that crash or exhaust
//! the prover, cancelled proofs, stream floods, silent connections and stalled uploads. Memory,
//! descriptors and child processes are read from `/proc` while the attack holds.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use miden_objects::batch::ProvenBatch;
use miden_objects::block::ProvenBlock;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::proto::ProofType;
use miden_proving_service::proto::api_client::ApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::fixtures::{prove_transaction_here, sample_transactions};
use crate::support::requests::request;
use crate::support::{Daemon, Launch, START_TIMEOUT, Seen, alive, children, hostile};

/// Generous bound for one real transaction proof on a loaded 2-core machine.
const PROOF_TIMEOUT: Duration = Duration::from_secs(300);

/// The 9-byte payload that aborted upstream's batch and block workers: a vint announcing 2^40
/// elements for the first `Vec`.
const NINE_BYTE_BOMB: [u8; 9] = [0, 0, 0, 0, 0, 0, 1, 0, 0];

/// Sends every fuzz finding for `target` (tests/fixtures/fuzz/TARGET, see its README) to `worker`:
/// each is refused as malformed, with a message naming the input type and, for a decoder that
/// panicked, the panic.
async fn refuse_fuzz_findings(worker: &Daemon, target: &str, kind: ProofType, input: &str) {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target);
    let mut findings: Vec<_> =
        std::fs::read_dir(&dir).expect("fuzz findings").map(|e| e.expect("entry").path()).collect();
    findings.sort();
    assert!(!findings.is_empty(), "no findings in {}", dir.display());
    let mut api = worker.api().await;
    for finding in findings {
        let name = finding.file_name().expect("name").to_string_lossy().into_owned();
        let payload = std::fs::read(&finding).expect("read a finding");
        let err = api.prove(request(kind, payload)).await.expect_err(&name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        let message = err.message();
        assert!(message.contains(&format!("not a valid {input}")), "{name}: {message}");
        let expected = match name.as_str() {
            "allocation-over-limit" => "-byte allocation while it is decoded",
            "capacity-overflow" => "the decoder panicked: capacity overflow",
            _ => "the decoder panicked: ",
        };
        assert!(message.contains(expected), "{name}: {message}");
        eprintln!("{target}/{name}: {message}");
    }
}

/// A worker for `kind` with `settings` (TOML lines) in its file.
/// The prover processes of `worker` alive now.
fn prover_processes(worker: &Daemon) -> HashSet<i32> {
    children(worker.pid).into_iter().filter(|pid| alive(*pid)).collect()
}

/// Waits until `worker` has exactly one live prover process (its spare, after an answer) that
/// `test` accepts, and returns it.
async fn one_prover_process(worker: &Daemon, what: &str, test: impl Fn(i32) -> bool) -> i32 {
    let started = Instant::now();
    loop {
        let live = prover_processes(worker);
        if let [pid] = live.iter().copied().collect::<Vec<_>>()[..]
            && test(pid)
        {
            return pid;
        }
        assert!(started.elapsed() < START_TIMEOUT, "{what}: prover processes {live:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_batch_prover_process_proves_until_its_limit_and_never_after_a_bad_request() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let proven = prove_transaction_here(&sample.inputs[0]);
    let batch = sample.chain.propose_transaction_batch([proven]).expect("propose a batch");
    // Every request is proved (no kept proof answers it), by processes that make three proofs.
    let mut worker =
        worker_with("batch", "proofs_per_prover_process = 3\nproof_cache_size = 0\n").await;
    let mut api = worker.api().await;
    let payload = batch.to_bytes();

    let first = one_prover_process(&worker, "the spare at start", |_| true).await;
    let first_seen = Seen::now(first);
    assert!(first_seen.alive(), "the spare {first} is seen running");
    for proofs in 1..=2 {
        prove_batch(&mut api, &payload).await;
        let kept = one_prover_process(&worker, "kept after a proof", |_| true).await;
        assert_eq!(kept, first, "after {proofs} proofs the same process waits for the next");
    }
    prove_batch(&mut api, &payload).await;
    let second =
        one_prover_process(&worker, "a new spare after three proofs", |pid| pid != first).await;
    let second_seen = Seen::now(second);
    assert!(!first_seen.alive(), "a process that made proofs_per_prover_process proofs is gone");

    // A malformed payload ends the process that decoded it, though it made no proof before.
    let err = api.prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec())).await;
    assert_eq!(err.expect_err("a bomb").code(), Code::InvalidArgument);
    let third =
        one_prover_process(&worker, "a new spare after a bad request", |pid| pid != second).await;
    assert!(!second_seen.alive(), "a process that decoded a malformed payload is not reused");
    prove_batch(&mut api, &payload).await;
    assert_eq!(one_prover_process(&worker, "kept", |_| true).await, third);

    // Twenty batches back to back: each turns the worker "proving" and "idle" again, but the
    // service manager reads a STATUS= line at most every 100 ms (and one at once after a quiet
    // spell), not forty; the last it reads says idle.
    let seen = worker.notify.messages().len();
    let started = Instant::now();
    for _ in 0..20 {
        prove_batch(&mut api, &payload).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = worker.notify.messages()[seen..]
        .iter()
        .filter(|message| message.text.contains("STATUS="))
        .count();
    // Lines are at least 100 ms apart: one per 100 ms of the burst and of the 100 ms after it,
    // and one more for a line sent as the count began.
    let most = 3 + usize::try_from(elapsed.as_millis() / 100).expect("a short burst");
    assert!((1..=most).contains(&sent), "{sent} STATUS= lines for 20 batches in {elapsed:?}");
    assert_eq!(worker.notify.wait_for_status("", START_TIMEOUT).await, "idle");
}

async fn prove_batch(api: &mut ApiClient<Channel>, payload: &[u8]) {
    let proof = api.prove(request(ProofType::Batch, payload.to_vec())).await;
    let proof = proof.expect("the batch is proved").into_inner();
    ProvenBatch::read_from_bytes(&proof.payload).expect("the batch proof decodes");
}

async fn worker_with(kind: &str, settings: &str) -> Daemon {
    let launch = Launch::worker(kind);
    std::fs::write(launch.dir.path().join("worker.toml"), settings).expect("worker.toml");
    launch.start().await
}

// /proc
// ================================================================================================

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS:").unwrap_or_else(|| panic!("no VmRSS for {pid}"))
}

fn status_field(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix(" kB")?.parse().ok())
}

/// User and system CPU time of `pid` in clock ticks (1/100 s).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(") ").expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read fds").count()
}

// PAYLOADS
// ================================================================================================

#[tokio::test]
async fn bombs_are_refused_precisely_and_each_worker_then_proves() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let tx_worker = Launch::worker("transaction").start().await;
    let batch_worker = Launch::worker("batch").start().await;
    let block_worker = Launch::worker("block").start().await;

    // A real transaction with one length field inflated to 2^40.
    let inflated = hostile::inflated_length_transaction(&sample.inputs[0]);
    let mut api = tx_worker.api().await;
    let err = api.prove(request(ProofType::Transaction, inflated)).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a valid TransactionInputs"), "{}", err.message());
    assert!(
        err.message().contains("a MAST forest announces 1099511627776 procedure roots"),
        "{}",
        err.message()
    );
    refuse_fuzz_findings(
        &tx_worker,
        "decode_transaction",
        ProofType::Transaction,
        "TransactionInputs",
    )
    .await;
    let proof = api
        .prove(request(ProofType::Transaction, sample.inputs[0].to_bytes()))
        .await
        .expect("the same worker proves a valid transaction")
        .into_inner();
    let proven = miden_objects::transaction::ProvenTransaction::read_from_bytes(&proof.payload)
        .expect("the proof decodes");

    let mut api = batch_worker.api().await;
    let err =
        api.prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec())).await.expect_err("bomb");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a valid ProposedBatch"), "{}", err.message());
    assert!(
        err.message().contains("announces 1099511627776 elements but only 0 bytes"),
        "{}",
        err.message()
    );
    refuse_fuzz_findings(&batch_worker, "decode_batch", ProofType::Batch, "ProposedBatch").await;
    let batch = sample.chain.propose_transaction_batch([proven]).expect("propose a batch");
    let proof = api
        .prove(request(ProofType::Batch, batch.to_bytes()))
        .await
        .expect("the same worker proves a valid batch")
        .into_inner();
    let batch = ProvenBatch::read_from_bytes(&proof.payload).expect("the batch proof decodes");

    let mut api = block_worker.api().await;
    let err =
        api.prove(request(ProofType::Block, NINE_BYTE_BOMB.to_vec())).await.expect_err("bomb");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a valid ProposedBlock"), "{}", err.message());
    refuse_fuzz_findings(&block_worker, "decode_block", ProofType::Block, "ProposedBlock").await;
    let block = sample.chain.propose_block([batch]).expect("propose a block");
    let proof = api
        .prove(request(ProofType::Block, block.to_bytes()))
        .await
        .expect("the same worker proves a valid block")
        .into_inner();
    ProvenBlock::read_from_bytes(&proof.payload).expect("the block proof decodes");
}

#[tokio::test]
async fn a_recursing_and_a_runaway_transaction_hit_limits_and_the_worker_goes_on() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let recursing = hostile::recursive_account_code(&sample).await.expect("recursing input");
    let looping = hostile::looping_account_code(&sample).await.expect("looping input");
    // Limits a test can reach: a 2 GiB address space and 60 s per proof.
    let worker =
        worker_with("transaction", "prover_memory_limit = \"2GiB\"\nmax_proof_time = \"60s\"\n")
            .await;
    let mut api = worker.api().await;

    let started = Instant::now();
    let err = api.prove(request(ProofType::Transaction, recursing)).await.expect_err("recursion");
    eprintln!("recursion answered after {:?}: {err:?}", started.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("overflowed its 64 MiB stack"), "{}", err.message());

    let started = Instant::now();
    let err = api.prove(request(ProofType::Transaction, looping)).await.expect_err("runaway loop");
    eprintln!("runaway loop answered after {:?}: {err:?}", started.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("prover_memory_limit = 2048 MiB")
            || err.message().contains("max_proof_time (1m)"),
        "{}",
        err.message()
    );

    assert!(alive(worker.pid), "the worker survives");
    let proof = api
        .prove(request(ProofType::Transaction, sample.inputs[0].to_bytes()))
        .await
        .expect("the worker proves its next valid request")
        .into_inner();
    assert!(!proof.payload.is_empty());

    // With room to grow, the same loop meets max_proof_time: the worker kills its process.
    let mut worker =
        worker_with("transaction", "prover_memory_limit = \"16GiB\"\nmax_proof_time = \"3s\"\n")
            .await;
    let looping = hostile::looping_account_code(&sample).await.expect("looping input");
    let proving = {
        let mut api = worker.api().await;
        tokio::spawn(async move { api.prove(request(ProofType::Transaction, looping)).await })
    };
    worker.notify.wait_for_status("proving transaction", PROOF_TIMEOUT).await;
    let prover = Seen::now(busiest_child(worker.pid));
    let err = proving.await.expect("join").expect_err("time limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("longer than max_proof_time (3s)"), "{}", err.message());
    assert!(!prover.alive(), "the prover process {} was killed", prover.pid);
    // max_proof_time changes live: a reload lets the next valid request take its 5–10 s.
    let config = worker.dir().join("worker.toml");
    std::fs::write(&config, "max_proof_time = \"300s\"\n").expect("edit worker.toml");
    let seen = worker.notify.messages().len();
    worker.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = worker.notify.wait_for_line("RELOADING=1", seen, START_TIMEOUT).await;
    worker.notify.wait_for_line("READY=1", reloading, START_TIMEOUT).await;
    let proof = worker
        .api()
        .await
        .prove(request(ProofType::Transaction, sample.inputs[0].to_bytes()))
        .await
        .expect("and the worker proves its next valid request")
        .into_inner();
    assert!(!proof.payload.is_empty());
}

/// The child of `pid` using the most memory: the prover process at work, not a spare waiting
/// nor an earlier one being reaped.
fn busiest_child(pid: i32) -> i32 {
    children(pid)
        .into_iter()
        .max_by_key(|child| status_field(*child, "VmRSS:").unwrap_or(0))
        .expect("a prover process")
}

#[tokio::test]
async fn distinct_large_account_code_leaves_the_worker_rss_flat() {
    // 15 requests to warm the worker's allocator (its malloc arenas settle at a few MiB of
    // ~0.5 MB payload buffers, later under load), then the 20 measured.
    const WARM_UP: usize = 15;
    let payloads = hostile::distinct_large_code_requests(WARM_UP + 20).await.expect("payloads");
    let worker = Launch::worker("transaction").start().await;
    let mut api = worker.api().await;
    let mut rss = Vec::new();
    for payload in payloads {
        let len = payload.len();
        // Decoded, loaded into the prover's MAST store and executed until the script's assert.
        let answer = api.prove(request(ProofType::Transaction, payload)).await;
        assert!(
            matches!(&answer, Err(status) if status.code() == Code::Internal
                && status.message().contains("transaction proving failed")),
            "{answer:?}"
        );
        rss.push(rss_kib(worker.pid));
        eprintln!(
            "RssAnon {:?} RssFile {:?}",
            status_field(worker.pid, "RssAnon:"),
            status_field(worker.pid, "RssFile:")
        );
        eprintln!(
            "payload {len} bytes: {:?}; worker VmRSS {} KiB",
            answer.map(|_| ()),
            rss[rss.len() - 1]
        );
    }
    // Before the change to prover processes, each such request pinned its code in the worker for
    // good (+47 MB a request with a large advice map, 940 MB over the 20). Now flat: within
    // 8 MiB over the 20, the malloc arenas' wobble under a loaded machine (2 MB was seen while
    // other tests ran beside it).
    let (first, last) = (rss[WARM_UP - 1], rss[rss.len() - 1]);
    assert!(last <= first + 8 * 1024, "worker RSS grew from {first} KiB to {last} KiB: {rss:?}");
}

/// Writes the fuzz campaigns' seed corpus to `$MPSDEV_FUZZ_SEEDS` (`scripts/fuzz.sh` runs it): real
/// payloads made with `MockChain` (two transactions, a batch of one proven transaction, a block
/// of that batch), the hostile ones above (an inflated length, self-referencing and looping
/// account code) and each real batch and block with its first length inflated.
#[tokio::test]
#[ignore = "writes the fuzz seed corpus; scripts/fuzz.sh runs it with MPSDEV_FUZZ_SEEDS=DIR"]
async fn write_fuzz_seeds() {
    fn write(dir: &std::path::Path, target: &str, name: &str, bytes: &[u8]) {
        let dir = dir.join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        std::fs::write(dir.join(name), bytes).expect("write a seed");
        eprintln!("{target}/{name}: {} bytes", bytes.len());
    }
    let dir =
        std::env::var_os("MPSDEV_FUZZ_SEEDS").expect("MPSDEV_FUZZ_SEEDS names the seed directory");
    let dir = std::path::Path::new(&dir);
    let sample = sample_transactions(2).await.expect("sample transactions");

    let tx = "decode_transaction";
    for (i, inputs) in sample.inputs.iter().enumerate() {
        write(dir, tx, &format!("real-{i}"), &inputs.to_bytes());
    }
    write(dir, tx, "inflated-roots", &hostile::inflated_length_transaction(&sample.inputs[0]));
    let recursing = hostile::recursive_account_code(&sample).await.expect("recursing input");
    write(dir, tx, "recursive-code", &recursing);
    let looping = hostile::looping_account_code(&sample).await.expect("looping input");
    write(dir, tx, "looping-code", &looping);

    let proven = crate::support::fixtures::prove_transaction_here(&sample.inputs[0]);
    let batch = sample.chain.propose_transaction_batch([proven]).expect("batch");
    let proven_batch =
        miden_tx_batch_prover::LocalBatchProver::new(miden_objects::MIN_PROOF_SECURITY_LEVEL)
            .prove(batch.clone())
            .expect("batch proof");
    let block = sample.chain.propose_block([proven_batch]).expect("block");
    for (target, bytes) in [("decode_batch", batch.to_bytes()), ("decode_block", block.to_bytes())]
    {
        write(dir, target, "real", &bytes);
        write(dir, target, "inflated-first", &hostile::inflate_length_at(&bytes, 0));
        write(dir, target, "bomb", &NINE_BYTE_BOMB);
    }
}

// CANCELLATION
// ================================================================================================

#[tokio::test]
async fn a_cancelled_proof_frees_the_worker_at_once() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let mut worker = Launch::worker("transaction").start().await;
    let proving = {
        let mut api = worker.api().await;
        let req = request(ProofType::Transaction, sample.inputs[0].to_bytes());
        tokio::spawn(async move { api.prove(req).await })
    };
    worker.notify.wait_for_status("proving transaction", PROOF_TIMEOUT).await;
    let prover = Seen::now(busiest_child(worker.pid));
    assert!(worker.worker_status().await.busy);

    proving.abort();
    let cancelled = Instant::now();
    loop {
        if !worker.worker_status().await.busy {
            break;
        }
        assert!(cancelled.elapsed() < Duration::from_secs(5), "still busy after a cancel");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let idle_after = cancelled.elapsed();
    eprintln!("idle {idle_after:?} after the cancel");
    assert!(idle_after < Duration::from_millis(100), "idle only after {idle_after:?}");
    assert!(!prover.alive(), "the prover process {} is gone once the worker is idle", prover.pid);

    let proof = worker
        .api()
        .await
        .prove(request(ProofType::Transaction, sample.inputs[0].to_bytes()))
        .await
        .expect("a valid request is then proved")
        .into_inner();
    assert!(!proof.payload.is_empty());

    // A worker that dies takes its prover processes with it (PR_SET_PDEATHSIG).
    let seen = worker.notify.messages().len();
    // Another input: the first one's proof is kept, and would answer at once.
    let proving = {
        let mut api = worker.api().await;
        let req = request(ProofType::Transaction, sample.inputs[1].to_bytes());
        tokio::spawn(async move { api.prove(req).await })
    };
    let started = Instant::now();
    while !worker.notify.messages()[seen..].iter().any(|m| m.text.contains("STATUS=proving")) {
        assert!(started.elapsed() < PROOF_TIMEOUT, "the second proof never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The prover process (and maybe the last proof's, still being reaped).
    let orphans: Vec<Seen> = children(worker.pid).into_iter().map(Seen::now).collect();
    assert!(!orphans.is_empty(), "no prover process while proving");
    worker.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    while orphans.iter().any(Seen::alive) {
        assert!(killed.elapsed() < Duration::from_secs(5), "prover processes outlived the worker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proving.await.expect("join").is_err(), "no proof from a killed worker");
}

// TRANSPORT
// ================================================================================================

/// A minimal HTTP/2 client that speaks only as much as an attacker needs: the preface, an empty
/// SETTINGS frame, and HEADERS (HPACK literals, no Huffman) / DATA frames.
struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        stream.write_all(&frame(0x4, 0, 0, &[])).await.expect("settings");
        RawH2 { stream }
    }

    /// HEADERS of a gRPC call to `path` on `stream_id`, the stream left open.
    fn headers(stream_id: u32, path: &str) -> Vec<u8> {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
        for (index, value) in [(4u8, path), (1, "worker"), (31, "application/grpc")] {
            // Literal without indexing, indexed name: 4-bit prefix.
            if index < 15 {
                block.push(index);
            } else {
                block.extend([0x0f, index - 15]);
            }
            block.push(u8::try_from(value.len()).expect("short value"));
            block.extend(value.as_bytes());
        }
        block.extend([0x00, 2]);
        block.extend(b"te");
        block.push(8);
        block.extend(b"trailers");
        frame(0x1, 0x4, stream_id, &block) // END_HEADERS, not END_STREAM
    }

    /// Reads frames for up to `wait` until stream `id` ends (HEADERS with `END_STREAM`: a gRPC
    /// trailers-only answer, or `RST_STREAM`); returns when, or `None`.
    async fn stream_end(&mut self, id: u32, wait: Duration) -> Option<Instant> {
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while pending.len() >= 9 {
                let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                if pending.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (pending[3], pending[4]);
                let stream = u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]);
                if stream == id && ((kind == 0x1 && flags & 0x1 != 0) || kind == 0x3) {
                    return Some(Instant::now());
                }
                pending.drain(..9 + len);
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(n @ 1..)) => pending.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Reads whatever the server sends for `wait` (and discards it).
    async fn drain(&mut self, wait: Duration) -> usize {
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await
        {
            total += n;
        }
        total
    }
}

/// `launch` run under `prlimit` with at most `descriptors` open files (its environment kept).
pub fn prlimited(mut launch: Launch, descriptors: u32) -> Launch {
    let program = launch.command.get_program().to_owned();
    let args: Vec<_> = launch.command.get_args().map(ToOwned::to_owned).collect();
    let envs: Vec<_> = launch
        .command
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
        .collect();
    let mut command = std::process::Command::new("prlimit");
    command.arg(format!("--nofile={descriptors}:{descriptors}")).arg("--").arg(program).args(args);
    crate::support::clean_env(&mut command);
    command.envs(envs);
    launch.command = command;
    launch
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend(stream_id.to_be_bytes());
    out.extend(payload);
    out
}

#[tokio::test]
async fn stream_floods_and_silent_connections_stay_bounded() {
    // A descriptor limit like systemd's default, and a short handshake timeout.
    let launch = Launch::worker("batch");
    // The flood's first stream takes the slot with a body that never ends: request_timeout
    // frees it.
    let settings = "handshake_timeout = \"5s\"\nrequest_timeout = \"2s\"\n";
    std::fs::write(launch.dir.path().join("worker.toml"), settings).expect("worker.toml");
    let worker = prlimited(launch, 1024).start().await;
    let (rss_before, fds_before) = (rss_kib(worker.pid), fd_count(worker.pid));

    // 50,000 never-ending Prove streams on one connection, sent as fast as the socket takes them.
    let mut flood = RawH2::connect(worker.addr).await;
    let mut sent = 0u32;
    let flooding = Instant::now();
    for chunk in 0..50u32 {
        let mut bytes = Vec::new();
        for i in 0..1000u32 {
            bytes.extend(RawH2::headers(2 * (chunk * 1000 + i) + 1, "/remote_prover.Api/Prove"));
        }
        if flood.stream.write_all(&bytes).await.is_err() {
            break; // the worker closed the connection (GOAWAY): also a bound
        }
        sent += 1000;
        flood.drain(Duration::from_millis(1)).await;
    }
    eprintln!("sent {sent} streams in {:?}", flooding.elapsed());

    // 1,000 connections that never send a byte, on top.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        match TcpStream::connect(worker.addr).await {
            Ok(stream) => silent.push(stream),
            Err(err) => panic!("connect {}: {err}", silent.len()),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_during, fds_during) = (rss_kib(worker.pid), fd_count(worker.pid));
    eprintln!(
        "worker during the attack: VmRSS {rss_during} KiB (before {rss_before}), {fds_during} fds \
         (before {fds_before})"
    );
    // 64 served + 64 waiting connections, the listener, pipes, runtime: far below 1,000.
    assert!(fds_during < fds_before + 2 * 64 + 16, "{fds_during} descriptors");
    assert!(rss_during < rss_before + 64 * 1024, "RSS {rss_during} KiB");

    // A valid request still gets its answer while the attack holds (the silent connections are
    // still open), once the flood's stalled Prove has timed out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The newest 64 silent connections are still waiting (the older ones made room for them).
    assert!(fd_count(worker.pid) >= fds_before + 48, "the silent connections are still held");
    let answered = Instant::now();
    let status = worker.worker_status().await;
    assert_eq!(status.supported_proof_type, ProofType::Batch as i32);
    let err = worker
        .api()
        .await
        .prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec()))
        .await
        .expect_err("an answer");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    eprintln!("valid requests answered in {:?} during the attack", answered.elapsed());
    assert!(alive(worker.pid));

    // The silent ones are closed after handshake_timeout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fds_after = fd_count(worker.pid);
    eprintln!("{fds_after} fds after handshake_timeout");
    assert!(fds_after < fds_before + 16, "{fds_after} descriptors after the timeout");
    drop((silent, flood));
}

#[tokio::test]
async fn a_worker_out_of_descriptors_pauses_accepting_warns_once_and_starts_its_spare_again() {
    // Far fewer descriptors than its connection bounds need: accept() fails with EMFILE.
    let launch = Launch::worker("batch");
    std::fs::write(launch.dir.path().join("worker.toml"), "handshake_timeout = \"30s\"\n")
        .expect("worker.toml");
    let launch = prlimited(launch, 64);
    let mut worker = launch.start().await;
    let pid = worker.pid;
    worker.wait_for_output("need more descriptors than RLIMIT_NOFILE allows", START_TIMEOUT).await;
    // A client connected before the shortage, and the spare prover process waiting.
    let mut early = worker.api().await;
    let spare = wait_for_children(pid, |children| !children.is_empty()).await;
    assert!(spare, "no spare prover process started");

    // Silent connections until no descriptor is left (about 48), and more waiting in the
    // listener's backlog.
    let mut silent = Vec::new();
    for _ in 0..120 {
        silent.push(TcpStream::connect(worker.addr).await.expect("connect (the backlog holds)"));
    }
    worker.wait_for_output("cannot accept connections", START_TIMEOUT).await;
    let ticks = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(pid) - ticks;
    eprintln!("worker CPU: {spent} ticks in 2 s out of descriptors; {} fds", fd_count(pid));
    assert!(spent < 50, "the worker spent {spent}/200 ticks of CPU: accepting spins");
    // Twenty failed accepts in those two seconds, one warning.
    let logged = worker.output();
    let warned = logged.lines().filter(|l| l.contains("cannot accept connections")).count();
    assert_eq!(warned, 1, "{logged}");

    // A request over the early connection uses up the spare, and no other can start; the
    // service manager still hears that the worker is idle again (its socket was kept).
    let notified = worker.notify.messages().len();
    let err = early.prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec())).await;
    assert_eq!(err.expect_err("refused").code(), Code::InvalidArgument);
    worker.wait_for_output("cannot start a spare prover process", START_TIMEOUT).await;
    assert!(wait_for_children(pid, HashSet::is_empty).await, "the used process outlived it");
    worker.notify.wait_for_line("STATUS=idle", notified, START_TIMEOUT).await;
    assert!(!worker.output().contains("cannot notify"), "{}", worker.output());

    // Descriptors back: a spare starts again without waiting for a request, and the next
    // client is served.
    drop(silent);
    worker.wait_for_output("prover processes start again", START_TIMEOUT).await;
    let spare = wait_for_children(pid, |children| !children.is_empty()).await;
    assert!(spare, "no spare prover process once descriptors were back");
    let err = tokio::time::timeout(START_TIMEOUT, async {
        worker.api().await.prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec())).await
    })
    .await
    .expect("served once descriptors are free")
    .expect_err("an answer");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// Whether `pid`'s children come to satisfy `done` within [`START_TIMEOUT`].
async fn wait_for_children(pid: i32, done: impl Fn(&HashSet<i32>) -> bool) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if done(&children(pid)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn busy_is_answered_from_the_headers_and_a_stalled_upload_times_out() {
    let mut worker = worker_with("batch", "request_timeout = \"2s\"\n").await;

    // A Prove whose body never ends takes the slot…
    let mut stalled = RawH2::connect(worker.addr).await;
    let mut bytes = RawH2::headers(1, "/remote_prover.Api/Prove");
    // A gRPC message header announcing 1,000 bytes, then 10 of them.
    bytes.extend(frame(0x0, 0, 1, &[0, 0, 0, 0x03, 0xe8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]));
    stalled.stream.write_all(&bytes).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // …so another Prove is refused as busy at once, though its own body never comes either.
    let mut second = RawH2::connect(worker.addr).await;
    second.stream.write_all(&RawH2::headers(1, "/remote_prover.Api/Prove")).await.expect("send");
    let asked = Instant::now();
    let answered = second.stream_end(1, Duration::from_secs(1)).await;
    let answered = answered.expect("an answer to a Prove whose body was not sent");
    eprintln!("busy answered from the headers in {:?}", answered - asked);
    let err = worker
        .api()
        .await
        .prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec()))
        .await
        .expect_err("busy");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "Server is busy handling another request");

    // After request_timeout the stalled upload is answered and lets go of the slot.
    let ended = stalled.stream_end(1, Duration::from_secs(5)).await.expect("the stalled call ends");
    let after = ended - asked;
    assert!(after > Duration::from_millis(1200), "ended after only {after:?}");
    let err = worker
        .api()
        .await
        .prove(request(ProofType::Batch, NINE_BYTE_BOMB.to_vec()))
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    worker
        .wait_for_output(
            "request body did not arrive whole within request_timeout",
            Duration::from_secs(5),
        )
        .await;
}
