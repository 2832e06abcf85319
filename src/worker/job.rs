//! Contained proving: every request is decoded and proved in a prover process of its own, a child
//! of the worker running this binary's hidden `prove-job` mode. A crash, an abort or a limit hit
//! on hostile input ends that process, and the worker turns the way it ended into an answer.
//!
//! - **A transaction process per proof**: it proves one request and exits, so nothing a request
//!   brings (account code pinned in the prover's MAST store, a grown heap) reaches the next one.
//! - **Batch and block processes are kept while they prove well**: their provers keep no state
//!   between proofs, so a process that gave a proof waits for the next request, up to
//!   `proofs_per_prover_process` proofs and while its resident memory stays small. A process
//!   whose request was malformed, failed, crashed, hit a limit or was cancelled is never reused.
//! - **A spare waits**: [`ProverProcesses`] keeps one process started ahead of time (at start-up
//!   and whenever the worker's slot frees), so a batch or block proof (milliseconds) does not pay
//!   for `exec` and start-up.
//! - **Limits**: address space (`prover_memory_limit`, `RLIMIT_AS`), no core dumps, a large
//!   stack for the proving thread ([`PROVER_STACK_SIZE`]), set by the process itself before it
//!   reads a byte of input (the crate forbids the `unsafe` a `pre_exec` hook needs); a wall-clock
//!   limit (`max_proof_time`) enforced by the worker with SIGKILL; death with the worker
//!   (`PR_SET_PDEATHSIG`). SIGTERM is blocked in the process: the proof in flight is the worker's
//!   to finish or abandon when systemd stops the service's whole control group.
//! - **Cancellation**: dropping the future of [`ProverProcesses::prove`] (the client left) kills
//!   the process; the worker's slot is released once it has been reaped.
//!
//! The protocol on the pipes: the worker writes the payload's length (u64, little-endian) and
//! the payload on stdin; the process answers on stdout with frames of a tag byte, a u32
//! little-endian length and the bytes: [`Frame::Subject`] once the payload decoded, then one of
//! [`Frame::Proof`], [`Frame::Invalid`] or [`Frame::Failed`]. Its stderr (a panic message, Rust's
//! "memory allocation of N bytes failed" or "has overflowed its stack") says why it died.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Buf;
use nix::sys::signal::{SigSet, Signal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::ProofKind;
use crate::config::Limits;
use crate::daemon::error_chain;
use crate::prover::{ProveError, Prover};

/// Stack of the thread that proves. The VM executes nested MAST nodes by recursion on it; 2 MiB
/// (a Tokio blocking thread's) was enough for every real input, so 64 MiB leaves a margin of
/// 32× while a self-referencing program still overflows it in milliseconds.
pub const PROVER_STACK_SIZE: usize = 64 << 20;

/// Largest frame a prover process may send: a proof is at most a gRPC message.
const MAX_FRAME: usize = crate::wire::MAX_MESSAGE_SIZE;

/// How much of a prover process's stderr is kept to explain its death.
const STDERR_TAIL: usize = 4096;

/// Exit status of a prover process that could not set its limits (`EX_OSERR`).
const EXIT_SETUP: u8 = 71;

/// How a contained proof ended when it did not give a proof.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The payload is not the input its proof type names (found by the decoder).
    #[error("{0}")]
    Invalid(String),
    /// The Miden prover rejected the input or failed (its error chain).
    #[error("{0}")]
    Failed(String),
    /// `max_proof_time` passed; the process was killed.
    #[error(
        "the proof took longer than max_proof_time ({}); the prover process was killed. This \
         input needs more time than this worker allows",
        humantime::format_duration(*.0)
    )]
    TimeLimit(Duration),
    /// The process ran out of its address space.
    #[error(
        "the prover process ran out of memory at its limit (prover_memory_limit = {} MiB) on this \
         input and was stopped{}", .limit >> 20, detail_suffix(.detail)
    )]
    MemoryLimit {
        /// The limit in bytes.
        limit: u64,
        /// The process's last words.
        detail: String,
    },
    /// The proving thread overflowed its stack: the input's code recurses without end.
    #[error(
        "the prover process overflowed its {} MiB stack on this input (its code recurses too \
         deep, e.g. a procedure that refers to itself) and was stopped", PROVER_STACK_SIZE >> 20
    )]
    StackLimit,
    /// The process died another way (a signal, an abort, a panic).
    #[error("the prover process {how} on this input{}", detail_suffix(.detail))]
    Died {
        /// "was killed by signal 11 (SIGSEGV)", "exited with status 101".
        how: String,
        /// The process's last words.
        detail: String,
    },
    /// No prover process could be started or talked to.
    #[error("this worker cannot start a prover process; send the request to another worker")]
    Start(#[source] std::io::Error),
}

impl JobError {
    /// Short outcome name for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            JobError::Invalid(_) => "invalid_payload",
            JobError::Failed(_) => "prove_failed",
            JobError::TimeLimit(_) => "time_limit",
            JobError::MemoryLimit { .. } => "memory_limit",
            JobError::StackLimit => "stack_limit",
            JobError::Died { .. } => "prover_died",
            JobError::Start(_) => "no_prover_process",
        }
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() { String::new() } else { format!(": {detail}") }
}

/// Frames a prover process sends on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Frame {
    /// The payload decoded; the text names what is proved. Proving starts.
    Subject = 1,
    /// The serialized proof; the process is done.
    Proof = 2,
    /// The payload did not decode; the text says why.
    Invalid = 3,
    /// Proving failed; the text is the prover's error chain.
    Failed = 4,
}

impl Frame {
    fn from_tag(tag: u8) -> Option<Frame> {
        [Frame::Subject, Frame::Proof, Frame::Invalid, Frame::Failed]
            .into_iter()
            .find(|frame| *frame as u8 == tag)
    }
}

// THE PROVER PROCESS
// ================================================================================================

/// The `prove-job` mode: applies the limits, reads one payload from stdin, proves it on a thread
/// with a [`PROVER_STACK_SIZE`] stack and answers on stdout. `parent` is the worker's pid: the
/// process exits if the worker is already gone.
pub fn child_main(kind: ProofKind, memory_limit: u64, parent: u32) -> ExitCode {
    if let Err(err) = contain(memory_limit, parent) {
        eprintln!("prove-job: cannot set the prover process's limits: {err}");
        return ExitCode::from(EXIT_SETUP);
    }
    // The proving thread gets ready before the request comes (a spare does this while it waits):
    // Miden's lazily decoded libraries are decoded on it, in its own malloc arena.
    let prover = std::thread::Builder::new()
        .name("prover".into())
        .stack_size(PROVER_STACK_SIZE)
        .spawn(move || {
            let mut warm = Prover::new(kind);
            let mut out = raw_stdout()?;
            let payload = read_payload()?;
            prove_to(&mut warm, &payload, &mut out)?;
            // A batch or block prover keeps nothing between proofs: the worker may hand this
            // process further payloads ([`Limits::proofs_per_process`]), and closes stdin when
            // it will not. A transaction prover's MAST store keeps every account's code: one
            // proof, then exit, whatever the worker would send.
            if kind == ProofKind::Transaction {
                return Ok(());
            }
            loop {
                let payload = match read_payload() {
                    Ok(payload) => payload,
                    Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(err) => return Err(err),
                };
                prove_to(&mut warm, &payload, &mut out)?;
            }
        });
    match prover.map(std::thread::JoinHandle::join) {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        // A spare the worker no longer needs: its stdin closed before any payload.
        Ok(Ok(Err(err))) if err.kind() == std::io::ErrorKind::UnexpectedEof => ExitCode::SUCCESS,
        Ok(Ok(Err(err))) => {
            eprintln!("prove-job: {err}");
            ExitCode::FAILURE
        }
        // A panic has printed its message to stderr, which the worker reads.
        Ok(Err(_)) | Err(_) => ExitCode::FAILURE,
    }
}

/// The payload on stdin: its length (u64, little-endian), then the bytes.
fn read_payload() -> std::io::Result<Vec<u8>> {
    let mut stdin = std::io::stdin().lock();
    let mut len = [0u8; 8];
    stdin.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(std::io::Error::other)?;
    let mut payload = vec![0u8; len];
    stdin.read_exact(&mut payload)?;
    Ok(payload)
}

/// Stdout without Rust's line buffering, which would cut a frame at each newline byte into
/// several writes, each waking the worker: a frame leaves in one write.
fn raw_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    Ok(std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?))
}

/// Limits set before any input is read.
fn contain(memory_limit: u64, parent: u32) -> nix::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_AS, memory_limit, memory_limit)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid().as_raw().cast_unsigned() != parent {
        // The worker died before the death signal was armed.
        std::process::exit(0);
    }
    let mut blocked = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        blocked.add(signal);
    }
    blocked.thread_block()
}

/// Decodes and proves `payload` with `prover`, writing the frames to `out`.
fn prove_to(prover: &mut Prover, payload: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let job = match prover.decode(payload) {
        Ok(job) => job,
        Err(err) => return write_frame(out, Frame::Invalid, error_chain(&err).as_bytes()),
    };
    write_frame(out, Frame::Subject, job.subject.as_bytes())?;
    match prover.prove(job) {
        Ok(proof) => write_frame(out, Frame::Proof, &proof),
        Err(err @ ProveError::Prove { .. }) => {
            write_frame(out, Frame::Failed, error_chain(&err).as_bytes())
        }
        Err(err @ ProveError::Decode { .. }) => {
            write_frame(out, Frame::Invalid, error_chain(&err).as_bytes())
        }
    }
}

/// Writes one frame in one write: the worker wakes once for it, not once per part.
fn write_frame(out: &mut impl Write, frame: Frame, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    let mut whole = Vec::with_capacity(5 + bytes.len());
    whole.push(frame as u8);
    whole.extend_from_slice(&len.to_le_bytes());
    whole.extend_from_slice(bytes);
    out.write_all(&whole)?;
    out.flush()
}

// THE WORKER'S SIDE
// ================================================================================================

/// A started prover process and its pipes, waiting for a payload: a new one, or one that has
/// made `proofs` batch or block proofs and may make more.
struct Spawned {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// The end of its stderr, read in the background until the process is gone.
    last_words: tokio::task::JoinHandle<String>,
    /// Proofs it has made.
    proofs: usize,
}

impl Spawned {
    /// Its resident memory in bytes, from `/proc`; `None` when it cannot be read (it is gone).
    /// Read on the answer's path: `statm` (a line of numbers, in pages) is one `read`, where
    /// `status` is a page of text that `read_to_string` takes in eight growing reads.
    fn resident(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let mut statm = std::fs::File::open(format!("/proc/{pid}/statm")).ok()?;
        let mut line = [0u8; 128];
        let len = statm.read(&mut line).ok()?;
        let pages: u64 = std::str::from_utf8(&line[..len]).ok()?.split(' ').nth(1)?.parse().ok()?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
        Some(pages * u64::try_from(page).ok()?)
    }
}

/// Starts prover processes for one proof kind and keeps one spare.
pub struct ProverProcesses {
    exe: PathBuf,
    kind: ProofKind,
    /// The allocator's settings for each process (see [`malloc_env`]), decided once.
    malloc_env: Vec<(&'static str, &'static str)>,
    limits: Mutex<Limits>,
    spare: Mutex<Option<Spawned>>,
    /// Batch or block processes out proving, which may come back as the spare: while one is out,
    /// [`ProverProcesses::prepare`] starts none (it would take CPU from the proof for a process
    /// that the one coming back makes useless).
    out: AtomicUsize,
    /// Processes killed after their answer and still being reaped in the background.
    reaping: Arc<AtomicUsize>,
    /// Set by [`ProverProcesses::shutdown`]: no spare starts any more.
    closed: AtomicBool,
}

impl ProverProcesses {
    /// Prover processes of this very binary (after a hand-over to the fast build, that build).
    pub fn new(kind: ProofKind, limits: Limits) -> std::io::Result<Self> {
        // The running binary itself, also after a package upgrade replaced the file on disk: a
        // prover process must speak this worker's protocol and prove with its Miden version.
        let exe = PathBuf::from("/proc/self/exe");
        std::fs::metadata(&exe)?;
        Ok(ProverProcesses {
            exe,
            kind,
            malloc_env: malloc_env(kind, std::env::var_os("GLIBC_TUNABLES").is_some()),
            limits: Mutex::new(limits),
            spare: Mutex::new(None),
            out: AtomicUsize::new(0),
            reaping: Arc::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// New limits for the proofs that start from now on (reload); the spare is replaced.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
        let spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(spare) = spare {
            self.retire(spare);
        }
    }

    /// Starts the spare if there is none. Call it from a task on the runtime's worker threads
    /// only: `PR_SET_PDEATHSIG` fires when the *thread* that started a process ends, and those
    /// threads live as long as the worker (a blocking-pool thread ends after 10 s idle).
    /// True when it started one; fails when one was wanted and could not start (out of
    /// descriptors or processes).
    pub fn prepare(&self) -> std::io::Result<bool> {
        let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = self.out.load(Ordering::SeqCst);
        if spare.is_none() && out == 0 && !self.closed.load(Ordering::SeqCst) {
            *spare = Some(self.spawn()?);
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether a spare waits (alive or not: [`ProverProcesses::take`] replaces a dead one).
    pub fn has_spare(&self) -> bool {
        self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    /// The worker is stopping: kills and reaps the spare, and waits (at most `wait`) for the
    /// processes still being reaped, so none is left for systemd to kill after the worker exits.
    pub async fn shutdown(&self, wait: Duration) {
        self.closed.store(true, Ordering::SeqCst);
        let spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(mut spare) = spare {
            let _ = spare.child.kill().await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while self.reaping.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(&self) -> std::io::Result<Spawned> {
        let limits = self.limits();
        let mut child = Command::new(&self.exe)
            .arg("prove-job")
            .args(["--prover-type", self.kind.as_str()])
            .args(["--memory-limit", &limits.memory.to_string()])
            .args(["--parent", &std::process::id().to_string()])
            // What systemd gave the worker is the worker's alone.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .envs(self.malloc_env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let (stdin, stdout, stderr) = pipes(&mut child)?;
        widen(&stdin);
        widen(&stdout);
        let last_words = tokio::spawn(tail(stderr));
        Ok(Spawned { child, stdin, stdout, last_words, proofs: 0 })
    }

    /// Keeps `spawned`, whose last proof went well, as the spare for the next request when it
    /// may prove again (see [`ProverProcesses::may_prove_again`]) while its resident memory stays
    /// under an eighth of `prover_memory_limit` (1 GiB at the default), under the limits still in
    /// force. Otherwise it is retired.
    fn keep(&self, spawned: Spawned, limits: Limits) {
        let reusable = self.may_prove_again(spawned.proofs, &limits)
            && !self.closed.load(Ordering::SeqCst)
            && self.limits() == limits
            && spawned.resident().is_some_and(|bytes| bytes < limits.memory / 8);
        let unkept = if reusable {
            let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A fresh spare started while this one proved (a request came first) is worth less
            // than a warm process: it makes way.
            if spare.as_ref().is_some_and(|spare| spare.proofs > 0) {
                Some(spawned)
            } else {
                spare.replace(spawned)
            }
        } else {
            Some(spawned)
        };
        if let Some(unkept) = unkept {
            self.retire(unkept);
        }
    }

    /// Whether a process that has made `proofs` proofs may make another under `limits`: a
    /// transaction process makes one, since its prover keeps what a request brings; a batch or
    /// block prover keeps nothing between proofs, so its process makes up to
    /// `proofs_per_process`.
    fn may_prove_again(&self, proofs: usize, limits: &Limits) -> bool {
        self.kind != ProofKind::Transaction && proofs < limits.proofs_per_process
    }

    /// Kills a process that will prove no more and reaps it in the background, counted in
    /// `reaping` so that [`ProverProcesses::shutdown`] waits for it.
    fn retire(&self, spawned: Spawned) {
        drop(Reaper {
            child: Some(spawned.child),
            hold: None::<()>,
            reaping: Arc::clone(&self.reaping),
        });
    }

    /// A process to prove in: the spare when it is alive, else a new one.
    /// Counted as out while it proves when it may come back as the spare after this proof.
    fn take(&self, limits: &Limits) -> Result<(Spawned, Out<'_>), JobError> {
        let returns = |proofs: usize| self.may_prove_again(proofs + 1, limits);
        let mut spare = self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Counted under the lock that `prepare` takes, so it never sees the spare gone and
        // nothing out.
        if let Some(mut spawned) = spare.take()
            && matches!(spawned.child.try_wait(), Ok(None))
        {
            let out = Out::count(returns(spawned.proofs), &self.out);
            return Ok((spawned, out));
        }
        let out = Out::count(returns(0), &self.out);
        drop(spare);
        Ok((self.spawn().map_err(JobError::Start)?, out))
    }

    /// Proves `payload` in a prover process. `on_subject` is called once the payload decoded,
    /// with what is proved. `hold` (the worker's slot) is dropped once the process has been reaped,
    /// also when the future is dropped: that kills the process.
    pub async fn prove<H: Send + 'static>(
        &self,
        payload: &[u8],
        on_subject: impl FnOnce(&str),
        hold: H,
    ) -> Result<Vec<u8>, JobError> {
        let limits = self.limits();
        let (Spawned { child, mut stdin, mut stdout, mut last_words, proofs }, out) =
            self.take(&limits)?;
        let mut reaper =
            Reaper { child: Some(child), hold: Some(hold), reaping: Arc::clone(&self.reaping) };
        let deadline = tokio::time::Instant::now() + limits.max_proof_time;
        let mut decoded = false;
        let answer = async {
            let len = (payload.len() as u64).to_le_bytes();
            // One vectored write of both, which the widened pipe takes whole: the process wakes
            // once. A write that fails means the process died: its exit status says how.
            if stdin.write_all_buf(&mut Buf::chain(len.as_slice(), payload)).await.is_ok() {
                read_answer(&mut stdout, on_subject, &mut decoded).await
            } else {
                Ok(None)
            }
        };
        let answer = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Some(answer))) => answer,
            Err(_elapsed) => {
                reaper.kill().await;
                Err(JobError::TimeLimit(limits.max_proof_time))
            }
            Ok(Err(err)) => {
                // The process sent what is not a frame: nothing it says can be trusted.
                reaper.kill().await;
                Err(JobError::Died {
                    how: "sent a malformed answer".to_owned(),
                    detail: err.to_string(),
                })
            }
            // It closed stdout without an answer: it died, or is about to.
            Ok(Ok(None)) => match tokio::time::timeout_at(deadline, reaper.wait()).await {
                Ok(Ok(status)) => {
                    let words = (&mut last_words).await.unwrap_or_default();
                    Err(classify_death(self.kind, status, &words, limits.memory, decoded))
                }
                Ok(Err(err)) => Err(JobError::Start(err)),
                Err(_elapsed) => {
                    reaper.kill().await;
                    Err(JobError::TimeLimit(limits.max_proof_time))
                }
            },
        };
        // An answer came: the slot is free at once (a client that proves one request after
        // another must not find its worker busy). A batch or block process that gave a proof may
        // wait for the next request; any other is killed and reaped in the background (the
        // teardown of a transaction prover's 1.4 GB takes a while). Only a proof abandoned midway
        // holds the slot until its process is gone.
        if answer.is_ok()
            && let Some(child) = reaper.child.take()
        {
            let proofs = proofs + 1;
            self.keep(Spawned { child, stdin, stdout, last_words, proofs }, limits);
        }
        drop(out);
        drop(reaper.hold.take());
        drop(reaper);
        answer
    }
}

/// The environment that sets up glibc's allocator in a prover process of `kind`; `tunables_set`:
/// the worker's own environment has `GLIBC_TUNABLES`, which then reaches the process untouched.
/// - `MALLOC_ARENA_MAX=4`: glibc reserves 64 MiB of address space per malloc arena, up to 8 per
///   core; on a large machine that alone would approach `prover_memory_limit` (`RLIMIT_AS`). Four
///   arenas serve the prover's threads as fast (BENCHMARKS.md).
/// - For a transaction, the mmap and trim thresholds of a process that has proved before. glibc
///   maps every block over its mmap threshold on its own and unmaps it on free; the threshold
///   starts at 128 KiB and rises to a freed block's size, up to 32 MiB, only once such a block
///   is freed, and the freed heap it keeps follows at twice that. A new process would start the
///   proof mapping, faulting in and unmapping every mid-sized block: with them set, its proof
///   takes the faults of a second proof in a warm one (BENCHMARKS.md). Batch and block
///   processes prove request after request, warm from the second on, and gained nothing from
///   keeping their memory.
fn malloc_env(kind: ProofKind, tunables_set: bool) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("MALLOC_ARENA_MAX", "4")];
    if kind == ProofKind::Transaction && !tunables_set {
        env.push((
            "GLIBC_TUNABLES",
            "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864",
        ));
    }
    env
}

/// A batch or block process out proving that may come back, counted while this lives (see
/// `ProverProcesses::out`).
struct Out<'a>(Option<&'a AtomicUsize>);

impl<'a> Out<'a> {
    fn count(returns: bool, out: &'a AtomicUsize) -> Self {
        if !returns {
            return Out(None);
        }
        out.fetch_add(1, Ordering::SeqCst);
        Out(Some(out))
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        if let Some(out) = &self.0 {
            out.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A pipe's buffer, widened from 64 KiB so a batch's payload (≈ 170 KB) or a proof passes in one
/// write and one wake-up of the reader instead of one per 64 KiB. Pages are taken only as bytes
/// wait in it. A pipe that cannot be widened (the user's pipe pages are used up: see
/// `fs.pipe-user-pages-soft`) works as it is.
const PIPE_SIZE: i32 = 1 << 20;

/// Widens `pipe` to [`PIPE_SIZE`], or leaves it as it is.
fn widen(pipe: &impl std::os::fd::AsFd) {
    if let Err(err) = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        tracing::debug!("cannot widen a prover process's pipe: {err}");
    }
}

/// The prover process's standard streams, taken out of `child`.
fn pipes(child: &mut Child) -> std::io::Result<(ChildStdin, ChildStdout, ChildStderr)> {
    match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(stdin), Some(stdout), Some(stderr)) => Ok((stdin, stdout, stderr)),
        _ => Err(std::io::Error::other("a pipe is missing")),
    }
}

/// Owns a prover process and what must live until it is gone. Dropped (an answer was given, or
/// the future that owned it was dropped), it kills the process if it still runs and reaps it in
/// the background, and only then lets go of what it held.
struct Reaper<H: Send + 'static> {
    child: Option<Child>,
    hold: Option<H>,
    reaping: Arc<AtomicUsize>,
}

impl<H: Send + 'static> Reaper<H> {
    /// Kills the process and reaps it (a limit was hit: it is gone before the answer goes out).
    /// Dropped midway, the process is still in `self`, and [`Drop`] finishes the job.
    async fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
        self.child = None;
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => Err(std::io::Error::other("the prover process is gone")),
        }
    }
}

impl<H: Send + 'static> Drop for Reaper<H> {
    fn drop(&mut self) {
        let (Some(mut child), hold) = (self.child.take(), self.hold.take()) else { return };
        let _ = child.start_kill();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let reaping = Arc::clone(&self.reaping);
            reaping.fetch_add(1, Ordering::SeqCst);
            runtime.spawn(async move {
                let _ = child.wait().await;
                reaping.fetch_sub(1, Ordering::SeqCst);
                drop(hold);
            });
        }
    }
}

/// Reads frames until the final one; `None` when stdout closed first. `decoded` is set when the
/// payload has decoded (the subject arrived).
async fn read_answer(
    stdout: &mut ChildStdout,
    on_subject: impl FnOnce(&str),
    decoded: &mut bool,
) -> std::io::Result<Option<Result<Vec<u8>, JobError>>> {
    let mut on_subject = Some(on_subject);
    loop {
        let mut head = [0u8; 5];
        match stdout.read_exact(&mut head).await {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let frame = Frame::from_tag(head[0]).filter(|_| len <= MAX_FRAME).ok_or_else(|| {
            std::io::Error::other(format!("bad frame from the prover process: tag {}", head[0]))
        })?;
        let mut bytes = vec![0u8; len];
        stdout.read_exact(&mut bytes).await?;
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        return Ok(Some(match frame {
            Frame::Subject => {
                *decoded = true;
                if let Some(on_subject) = on_subject.take() {
                    on_subject(&text());
                }
                continue;
            }
            Frame::Proof => Ok(bytes),
            Frame::Invalid => Err(JobError::Invalid(text())),
            Frame::Failed => Err(JobError::Failed(text())),
        }));
    }
}

/// The last [`STDERR_TAIL`] bytes of `stream`, read to its end.
async fn tail(mut stream: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * STDERR_TAIL {
            kept.drain(..kept.len() - STDERR_TAIL);
        }
    }
    let start = kept.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&kept[start..]).trim().to_owned()
}

/// Names how a prover process that gave no answer ended. Its stderr is input-influenced (a panic
/// message may quote the input), so the limits are recognised only from Rust's own last words
/// before an abort (SIGABRT): "thread '…' has overflowed its stack", "memory allocation of N
/// bytes failed". An allocation that failed before the payload had decoded was announced by the
/// payload: a malformed input, not one that needs more memory.
fn classify_death(
    kind: ProofKind,
    status: ExitStatus,
    last_words: &str,
    memory: u64,
    decoded: bool,
) -> JobError {
    // One line for the client: the panic or abort message, not a backtrace hint.
    let detail = last_words
        .lines()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .collect::<Vec<_>>()
        .join("; ");
    let aborted = status.signal() == Some(libc::SIGABRT);
    let said = |test: &dyn Fn(&str) -> bool| aborted && last_words.lines().any(test);
    if said(&|line| line.starts_with("thread '") && line.ends_with("has overflowed its stack")) {
        return JobError::StackLimit;
    }
    let allocation = last_words.lines().find_map(|line| {
        line.strip_prefix("memory allocation of ")?
            .strip_suffix(" bytes failed")?
            .parse::<u64>()
            .ok()
    });
    if let Some(bytes) = allocation.filter(|_| aborted) {
        if !decoded {
            return JobError::Invalid(format!(
                "payload is not a valid {}: it announces a {bytes}-byte allocation while it is \
                 decoded, which the prover process's address space (prover_memory_limit = {} MiB) \
                 could not give",
                crate::prover::input_name(kind),
                memory >> 20
            ));
        }
        return JobError::MemoryLimit { limit: memory, detail };
    }
    let how = match (status.signal(), status.code()) {
        (Some(signal), _) => {
            let name = Signal::try_from(signal).map_or("unknown", Signal::as_str);
            let by = if signal == libc::SIGKILL {
                " (not by the worker: the kernel's OOM killer, or an operator)"
            } else {
                ""
            };
            format!("was killed by signal {signal} ({name}){by}")
        }
        (None, Some(code)) => format!("exited with status {code} without an answer"),
        (None, None) => "ended without an answer".to_owned(),
    };
    JobError::Died { how, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resident_memory_is_what_proc_says() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start sleep");
        let (stdin, stdout, stderr) = pipes(&mut child).expect("its pipes");
        let last_words = tokio::spawn(tail(stderr));
        let mut spawned = Spawned { child, stdin, stdout, last_words, proofs: 0 };
        let pid = spawned.child.id().expect("running");
        // `status` as text: the process's name and state, and VmRSS in bytes.
        let status = || {
            let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            let field = |name: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            let kib = field("VmRSS:").trim_end_matches("kB").trim().parse::<u64>().ok();
            (field("Name:"), field("State:"), kib.map(|kib| kib << 10))
        };
        // Until `sleep` sleeps, it may still be in `exec` or loading its libraries, and its
        // memory moves between two reads: compare once it sleeps, with VmRSS the same on both
        // sides of the read of `statm`.
        let started = std::time::Instant::now();
        loop {
            let (name, state, before) = status();
            if name == "sleep" && state.starts_with('S') && before.is_some() {
                let resident = spawned.resident();
                if status().2 == before {
                    assert_eq!(resident, before, "statm against status' VmRSS");
                    assert!(resident.is_some_and(|bytes| bytes > 0));
                    break;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{name} {state} {before:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        spawned.child.kill().await.expect("kill");
        assert_eq!(spawned.resident(), None, "a reaped process has no memory to read");
    }
}
