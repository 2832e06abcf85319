//! Content-addressed proofs: no proof is computed twice. The proxy and the worker both keep one
//! such table.
//!
//! A proof is a function of its input, so every `Prove` call is keyed by the digest of its content
//! ([`digest`]: BLAKE3 of the proof type and the payload; the key is the whole input, and a
//! 256-bit digest cannot be steered onto another input's proof). A call whose key is being proved
//! joins that proof instead of proving it again (a [`Flight`]); a proof that finished is kept for
//! `proof_cache_ttl`, within `proof_cache_size` bytes (oldest out first), and answers the same key
//! at once. Only proofs are kept, never errors. A proof tells nobody anything the sender of its
//! input did not already hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;
use tonic::Status;

/// The digest of a request's content: the key of its proof.
pub type Digest = [u8; 32];

/// The digest of a `ProofRequest`'s content: BLAKE3 of the proof type (little-endian `i32`) and
/// the payload. Not of the encoded message, which a client could vary without changing what is
/// proved.
pub fn digest(proof_type: i32, payload: &[u8]) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&proof_type.to_le_bytes());
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

/// What an entry costs beyond its proof's bytes: the key, its time, two map slots.
pub const ENTRY_OVERHEAD: usize = 128;

/// How a shared proof ended, as its waiters see it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The proof: everyone's answer.
    Proof(Bytes),
    /// The workers' verdict on the input (or the proxy's on its content): everyone's answer.
    Final(Status),
    /// Workers failed, or the proof was abandoned: the leader answers with this, and a waiter
    /// tries again (it joins another waiter's try or leads one itself).
    Retry(Status),
}

impl Outcome {
    /// A failure as its status says: `UNAVAILABLE` (no worker could do it) may go better on
    /// another try; anything else is the answer for every identical request.
    pub fn of(status: Status) -> Self {
        if status.code() == tonic::Code::Unavailable {
            Outcome::Retry(status)
        } else {
            Outcome::Final(status)
        }
    }
}

/// A proof being computed, and who waits for it.
pub struct Flight {
    outcome: watch::Sender<Option<Outcome>>,
    waiters: AtomicUsize,
    /// Cancels the attempt when its last waiter left and the proof is not to be kept.
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// Whether a proof nobody waits for any more runs on (the cache is on).
    keep: bool,
    /// Whether a worker took it: until then, a flight nobody waits for is cancelled whatever
    /// `keep` says (it has cost nothing yet, and abandoned requests must not hold the queue).
    started: AtomicBool,
}

impl Flight {
    /// A worker took the proof: from now on it runs to its end if it is to be kept.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
    }
}

/// One caller's place in a [`Flight`]. Leaving (dropping it) does not disturb the others; the
/// last to leave a flight whose proof would not be kept cancels it.
pub struct Waiter {
    flight: Arc<Flight>,
}

impl Waiter {
    fn new(flight: Arc<Flight>) -> Self {
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        Waiter { flight }
    }

    /// The flight waited for.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Hands the flight the task computing its proof, so it can be cancelled.
    pub fn attach(&self, task: tokio::task::AbortHandle) {
        *self.flight.abort.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// Waits for the flight to end.
    pub async fn outcome(&self) -> Outcome {
        let mut seen = self.flight.outcome.subscribe();
        match seen.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| unreachable!("waited for Some")),
            Err(_) => Outcome::Retry(Status::unavailable("the shared proof was abandoned")),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let left = self.flight.waiters.fetch_sub(1, Ordering::SeqCst) - 1;
        let runs_on = self.flight.keep && self.flight.started.load(Ordering::SeqCst);
        if left == 0 && !runs_on && self.flight.outcome.borrow().is_none() {
            let task = self.flight.abort.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(task) = task.as_ref() {
                task.abort();
            }
        }
    }
}

/// The leader of a flight: it runs the attempt inside its own future (no task hop on the common
/// path). When it leaves before the attempt ends, the attempt moves to a task of its own if
/// anyone else waits for it or its proof is to be kept (the cache is on and a worker took it);
/// otherwise it is dropped, which cancels it.
pub struct Leader {
    attempt: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    waiter: Waiter,
}

impl Leader {
    /// Leads `waiter`'s flight with `attempt`, which ends it ([`Proofs::finish`]) however it
    /// ends, dropped included.
    pub fn new(
        waiter: Waiter,
        attempt: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        Leader { attempt: Some(Box::pin(attempt)), waiter }
    }

    /// Runs the attempt and returns how the flight ended.
    pub async fn outcome(&mut self) -> Outcome {
        if let Some(attempt) = self.attempt.as_mut() {
            attempt.await;
            self.attempt = None;
        }
        self.waiter.outcome().await
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let Some(attempt) = self.attempt.take() else { return };
        let flight = &self.waiter.flight;
        let others = flight.waiters.load(Ordering::SeqCst).saturating_sub(1);
        let runs_on = others > 0 || (flight.keep && flight.started.load(Ordering::SeqCst));
        if runs_on && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let task = runtime.spawn(attempt);
            self.waiter.attach(task.abort_handle());
        }
        // Otherwise `attempt` is dropped here: cancelled, and its flight told so.
    }
}

/// How a request got its proof, for its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Proved for it.
    Proved,
    /// It waited for an identical request's proof, running when it arrived.
    Joined,
    /// A kept proof of the same input.
    Cached,
}

impl Served {
    /// The name logs and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Proved => "proved",
            Served::Joined => "joined",
            Served::Cached => "cached",
        }
    }
}

/// What a key finds.
pub enum Found {
    /// A kept proof.
    Cached(Bytes),
    /// A proof being computed: wait for it.
    Running(Waiter),
    /// Nothing: the caller leads a new flight, computes the proof and calls [`Proofs::finish`].
    New(Waiter),
}

/// How much is kept, and for how long; zero in either turns keeping off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of proofs (and [`ENTRY_OVERHEAD`] each) held at most.
    pub max_bytes: usize,
    /// How long a proof is kept after it was made.
    pub ttl: Duration,
}

impl Limits {
    /// Whether anything is kept (neither limit is zero).
    pub fn keeps(self) -> bool {
        self.max_bytes > 0 && self.ttl > Duration::ZERO
    }
}

struct Stored {
    proof: Bytes,
    made: Instant,
    order: u64,
}

struct Inner {
    running: HashMap<Digest, Arc<Flight>>,
    stored: HashMap<Digest, Stored>,
    /// Stored keys, oldest first.
    order: BTreeMap<u64, Digest>,
    next: u64,
    bytes: usize,
    limits: Limits,
}

impl Inner {
    fn forget(&mut self, key: &Digest) {
        if let Some(stored) = self.stored.remove(key) {
            self.order.remove(&stored.order);
            self.bytes -= stored.proof.len() + ENTRY_OVERHEAD;
        }
    }
}

/// The gauges and counter the table keeps up to date itself.
pub struct Gauges {
    /// Proofs held.
    pub entries: IntGauge,
    /// Bytes held.
    pub bytes: IntGauge,
    /// Proofs dropped for age or room.
    pub evictions: IntCounter,
}

impl Gauges {
    /// Gauges in no registry, for a table whose figures nobody exports (the worker's).
    pub fn detached() -> Self {
        Gauges {
            entries: IntGauge::new("proofs", "proofs held").expect("a valid gauge name"),
            bytes: IntGauge::new("bytes", "bytes held").expect("a valid gauge name"),
            evictions: IntCounter::new("evictions", "proofs dropped").expect("a valid name"),
        }
    }
}

/// Who holds a [`Proofs`] table: what a [`Landing`] ends its flight in.
pub trait HoldsProofs: Send + 'static {
    /// The table.
    fn proofs(&self) -> &Proofs;
}

/// Ends a flight however its attempt ends: with the attempt's outcome ([`Landing::land`]), or,
/// when the attempt is dropped before it (cancelled: everyone waiting left), as abandoned, so
/// that the key is free to be proved again.
pub struct Landing<H: HoldsProofs> {
    holder: H,
    key: Digest,
    flight: Arc<Flight>,
    landed: bool,
}

impl<H: HoldsProofs> Landing<H> {
    /// The landing of `waiter`'s flight for `key`, in `holder`'s table.
    pub fn new(holder: H, key: Digest, waiter: &Waiter) -> Self {
        Landing { holder, key, flight: Arc::clone(waiter.flight()), landed: false }
    }

    /// Who holds the table.
    pub fn holder(&self) -> &H {
        &self.holder
    }

    /// The flight landed.
    pub fn flight(&self) -> &Flight {
        &self.flight
    }

    /// Ends the flight with `outcome`.
    pub fn land(mut self, outcome: Outcome) {
        self.holder.proofs().finish(&self.key, &self.flight, outcome);
        self.landed = true;
    }
}

impl<H: HoldsProofs> Drop for Landing<H> {
    fn drop(&mut self) {
        if !self.landed {
            self.holder.proofs().finish(
                &self.key,
                &self.flight,
                Outcome::Retry(Status::cancelled(
                    "the proof was cancelled: every client waiting for it left",
                )),
            );
        }
    }
}

/// Running and finished proofs by content.
pub struct Proofs {
    inner: Mutex<Inner>,
    gauges: Gauges,
}

impl Proofs {
    /// An empty table.
    pub fn new(limits: Limits, gauges: Gauges) -> Self {
        Proofs {
            inner: Mutex::new(Inner {
                running: HashMap::new(),
                stored: HashMap::new(),
                order: BTreeMap::new(),
                next: 0,
                bytes: 0,
                limits,
            }),
            gauges,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept proof of `key`, the flight computing it, or a new flight for the caller to lead.
    pub fn find(&self, key: &Digest) -> Found {
        let mut inner = self.lock();
        if let Some(found) = self.existing(&mut inner, key) {
            return found;
        }
        let flight = Arc::new(Flight {
            outcome: watch::Sender::new(None),
            waiters: AtomicUsize::new(0),
            abort: Mutex::new(None),
            keep: inner.limits.keeps(),
            started: AtomicBool::new(false),
        });
        inner.running.insert(*key, Arc::clone(&flight));
        Found::New(Waiter::new(flight))
    }

    /// The kept proof of `key` or the flight computing it, never a new flight: for a caller that
    /// could not prove it itself (a busy worker's request).
    pub fn join(&self, key: &Digest) -> Option<Found> {
        self.existing(&mut self.lock(), key)
    }

    fn existing(&self, inner: &mut Inner, key: &Digest) -> Option<Found> {
        self.evict(inner, Instant::now());
        if let Some(stored) = inner.stored.get(key) {
            return Some(Found::Cached(stored.proof.clone()));
        }
        let flight = inner.running.get(key)?;
        Some(Found::Running(Waiter::new(Arc::clone(flight))))
    }

    /// Whether any proof is being computed.
    pub fn is_running(&self) -> bool {
        !self.lock().running.is_empty()
    }

    /// Ends `flight` (found for `key`) with `outcome`: keeps a proof when it fits and wakes every
    /// waiter.
    pub fn finish(&self, key: &Digest, flight: &Arc<Flight>, outcome: Outcome) {
        {
            let mut inner = self.lock();
            if inner.running.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                inner.running.remove(key);
            }
            if let Outcome::Proof(proof) = &outcome {
                let cost = proof.len() + ENTRY_OVERHEAD;
                if inner.limits.keeps() && cost <= inner.limits.max_bytes {
                    inner.forget(key);
                    let order = inner.next;
                    inner.next += 1;
                    inner.order.insert(order, *key);
                    inner
                        .stored
                        .insert(*key, Stored { proof: proof.clone(), made: Instant::now(), order });
                    inner.bytes += cost;
                    self.evict(&mut inner, Instant::now());
                }
            }
            self.update(&inner);
        }
        flight.outcome.send_replace(Some(outcome));
    }

    /// Applies reloaded limits, dropping what no longer fits.
    pub fn set_limits(&self, limits: Limits) {
        let mut inner = self.lock();
        inner.limits = limits;
        self.evict(&mut inner, Instant::now());
        self.update(&inner);
    }

    /// Drops proofs past their age; the daemon calls it every second.
    pub fn prune(&self) {
        let mut inner = self.lock();
        self.evict(&mut inner, Instant::now());
        self.update(&inner);
    }

    /// Proofs held, their bytes (overhead included), and proofs being computed.
    pub fn held(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.stored.len(), inner.bytes, inner.running.len())
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Drops the oldest proofs while they are too old or too many bytes are held.
    fn evict(&self, inner: &mut Inner, now: Instant) {
        let limits = inner.limits;
        while let Some((_, key)) = inner.order.first_key_value() {
            let key = *key;
            let expired =
                inner.stored.get(&key).is_none_or(|s| now.duration_since(s.made) >= limits.ttl);
            if !expired && inner.bytes <= limits.max_bytes {
                break;
            }
            inner.forget(&key);
            self.gauges.evictions.inc();
        }
    }

    fn update(&self, inner: &Inner) {
        self.gauges.entries.set(i64::try_from(inner.stored.len()).unwrap_or(i64::MAX));
        self.gauges.bytes.set(i64::try_from(inner.bytes).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max_bytes: usize, ttl: Duration) -> Proofs {
        Proofs::new(
            Limits { max_bytes, ttl },
            Gauges {
                entries: IntGauge::new("e", "e").expect("gauge"),
                bytes: IntGauge::new("b", "b").expect("gauge"),
                evictions: IntCounter::new("v", "v").expect("counter"),
            },
        )
    }

    fn key(n: u8) -> Digest {
        [n; 32]
    }

    fn prove(proofs: &Proofs, n: u8, size: usize) {
        let Found::New(waiter) = proofs.find(&key(n)) else { panic!("{n} is new") };
        proofs.finish(&key(n), waiter.flight(), Outcome::Proof(Bytes::from(vec![n; size])));
    }

    #[tokio::test]
    async fn an_identical_key_joins_the_running_proof_and_then_finds_it_kept() {
        let proofs = table(1 << 20, Duration::from_secs(60));
        let Found::New(leader) = proofs.find(&key(1)) else { panic!("new") };
        let Found::Running(joined) = proofs.find(&key(1)) else { panic!("running") };
        let Found::New(_other) = proofs.find(&key(2)) else { panic!("another key is new") };
        proofs.finish(&key(1), leader.flight(), Outcome::Proof(Bytes::from_static(b"proof")));
        for waiter in [&leader, &joined] {
            let Outcome::Proof(proof) = waiter.outcome().await else { panic!("a proof") };
            assert_eq!(&proof[..], b"proof");
        }
        let Found::Cached(proof) = proofs.find(&key(1)) else { panic!("kept") };
        assert_eq!(&proof[..], b"proof");
        assert_eq!(proofs.held(), (1, 5 + ENTRY_OVERHEAD, 1));
    }

    #[tokio::test]
    async fn errors_are_not_kept_and_a_retry_lets_the_next_caller_lead() {
        let proofs = table(1 << 20, Duration::from_secs(60));
        let Found::New(leader) = proofs.find(&key(1)) else { panic!("new") };
        let Found::Running(joined) = proofs.find(&key(1)) else { panic!("running") };
        proofs.finish(&key(1), leader.flight(), Outcome::Retry(Status::unavailable("down")));
        assert!(matches!(joined.outcome().await, Outcome::Retry(_)));
        let Found::New(again) = proofs.find(&key(1)) else { panic!("led again") };
        proofs.finish(&key(1), again.flight(), Outcome::Final(Status::invalid_argument("bad")));
        assert!(matches!(proofs.find(&key(1)), Found::New(_)), "errors are not kept");
    }

    #[test]
    fn proofs_leave_at_their_age_and_oldest_first_when_the_bytes_are_exceeded() {
        let room = 3 * (100 + ENTRY_OVERHEAD);
        let proofs = table(room, Duration::from_secs(60));
        for n in 1..=4 {
            prove(&proofs, n, 100);
        }
        assert_eq!(proofs.held().0, 3);
        assert!(matches!(proofs.find(&key(1)), Found::New(_)), "the oldest left");
        assert!(matches!(proofs.find(&key(2)), Found::Cached(_)));
        // A proof larger than the whole cache is not kept (and evicts nothing).
        prove(&proofs, 9, room);
        assert!(matches!(proofs.find(&key(9)), Found::New(_)));
        assert!(matches!(proofs.find(&key(4)), Found::Cached(_)));
        assert_eq!(proofs.gauges.evictions.get(), 1);

        let short = table(1 << 20, Duration::from_millis(50));
        prove(&short, 1, 100);
        assert!(matches!(short.find(&key(1)), Found::Cached(_)));
        std::thread::sleep(Duration::from_millis(60));
        short.prune();
        assert_eq!(short.held().0, 0, "past proof_cache_ttl");

        // Zero keeps nothing; shrinking on reload drops what no longer fits.
        let off = table(0, Duration::from_secs(60));
        prove(&off, 1, 100);
        assert_eq!(off.held().0, 0);
        proofs.set_limits(Limits { max_bytes: 100 + ENTRY_OVERHEAD, ttl: Duration::from_secs(60) });
        assert_eq!(proofs.held().0, 1);
    }

    #[tokio::test]
    async fn a_leader_that_leaves_hands_its_attempt_on_only_when_someone_still_needs_it() {
        let proofs = Arc::new(table(0, Duration::from_secs(60)));
        let Found::New(waiter) = proofs.find(&key(1)) else { panic!("new") };
        let Found::Running(joined) = proofs.find(&key(1)) else { panic!("running") };
        let (table, flight) = (Arc::clone(&proofs), Arc::clone(waiter.flight()));
        let mut leader = Leader::new(waiter, async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            table.finish(&key(1), &flight, Outcome::Proof(Bytes::from_static(b"proof")));
        });
        let _ = tokio::time::timeout(Duration::from_millis(1), leader.outcome()).await;
        drop(leader);
        let Outcome::Proof(proof) = joined.outcome().await else { panic!("the joiner's proof") };
        assert_eq!(&proof[..], b"proof");

        // Nobody else waits and nothing is kept: the attempt is cancelled with its leader.
        let Found::New(waiter) = proofs.find(&key(2)) else { panic!("new") };
        let ran = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&ran);
        let mut leader = Leader::new(waiter, async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            done.store(true, Ordering::SeqCst);
        });
        let _ = tokio::time::timeout(Duration::from_millis(1), leader.outcome()).await;
        drop(leader);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!ran.load(Ordering::SeqCst), "cancelled");
    }

    #[tokio::test]
    async fn the_last_waiter_to_leave_cancels_a_proof_not_kept_or_not_started() {
        for (max_bytes, cancelled) in [(0, true), (1 << 20, false)] {
            let proofs = table(max_bytes, Duration::from_secs(60));
            let Found::New(leader) = proofs.find(&key(1)) else { panic!("new") };
            let task = tokio::spawn(std::future::pending::<()>());
            leader.attach(task.abort_handle());
            leader.flight().start();
            let Found::Running(joined) = proofs.find(&key(1)) else { panic!("running") };
            drop(leader);
            tokio::task::yield_now().await;
            assert!(!task.is_finished(), "one waiter is left");
            drop(joined);
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(task.is_finished(), cancelled, "max_bytes {max_bytes}");
            task.abort();
        }
        // Still waiting for a worker: cancelled even with the cache on.
        let proofs = table(1 << 20, Duration::from_secs(60));
        let Found::New(leader) = proofs.find(&key(1)) else { panic!("new") };
        let task = tokio::spawn(std::future::pending::<()>());
        leader.attach(task.abort_handle());
        drop(leader);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(task.is_finished(), "a queued flight nobody waits for is cancelled");
    }
}
