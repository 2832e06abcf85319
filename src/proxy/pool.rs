//! The worker pool and the request queue, one value behind one short-held lock.
//!
//! A request takes a [`Lease`] on one healthy, free worker; the lease is released when it is
//! dropped — on every path: success, error, retry, timeout, client gone. A request that finds no
//! free worker waits in a bounded FIFO queue; whoever frees a worker (a released lease, a worker
//! turning healthy, a worker added) hands it straight to the first waiter that may use it. Nobody
//! polls, and a waiter whose client went away leaves the queue when its future is dropped.
//! Nothing here does network I/O; the lock is never held across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::forward::Upstream;
use crate::config::WorkerAddress;
use crate::tls::ClientTls;
use crate::wire::PROXY_WINDOW;

/// A worker's health as the proxy last saw it. Serialised as the original service's status
/// document has it: `"Healthy"`, `"Unknown"`, `{"Unhealthy": {"failed_attempts": 2, "reason": …}}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Health {
    /// Not checked yet; no requests go to it until a check passes.
    Unknown,
    /// Answers health checks with the right proof type and version.
    Healthy,
    /// Failed its last checks or requests.
    Unhealthy {
        /// Consecutive failures.
        failed_attempts: u32,
        /// The last failure, as an operator would want to read it.
        reason: String,
    },
}

/// Where a worker came from: the configuration (reload may remove it) or the control plane.
/// Serialised `"config"` or `"runtime"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Listed in `workers` (file, environment or command line).
    Config,
    /// Added at run time.
    Runtime,
}

impl Health {
    /// "healthy", "unhealthy" or "unknown" (not checked yet).
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy { .. } => "unhealthy",
        }
    }

    /// Why it is unhealthy; empty otherwise.
    pub fn reason(&self) -> &str {
        match self {
            Health::Unhealthy { reason, .. } => reason,
            _ => "",
        }
    }
}

impl Origin {
    /// "config" or "runtime".
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Runtime => "runtime",
        }
    }
}

/// A copy of one worker's state, for status pages and metrics.
#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    /// `host:port` as configured.
    pub address: String,
    /// Version the worker reported, empty until known.
    pub version: String,
    /// Last known health.
    pub health: Health,
    /// True while a request of this proxy runs on it.
    pub busy: bool,
    /// Requests this proxy finished on it.
    pub served: u64,
    /// How often it turned unhealthy (for upstream's `worker_unhealthy` counter).
    pub times_unhealthy: u64,
    /// Configuration or run time.
    pub origin: Origin,
    /// The DNS name this worker was found under (`host:port` as declared), if any.
    pub name: Option<String>,
}

/// Why no lease was given.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// No worker is configured at all: waiting cannot help.
    #[error(
        "the proxy has no workers; add one to `workers` in proxy.toml or with `minedctl add-worker`"
    )]
    NoWorkers,
    /// Every worker failed its last health check (none is healthy, unchecked or being
    /// re-checked): waiting would only hold the client until its deadline. Names each failure.
    #[error(
        "no healthy worker: {0}; check the workers (`minedctl workers`, the proxy's status port)"
    )]
    NoHealthyWorkers(String),
    /// The queue is at `max_queue_items`.
    #[error("Too many requests in the queue")]
    QueueFull,
    /// The proxy is shutting down and admits nothing new.
    #[error("the proxy is shutting down; retry on another proxy")]
    ShuttingDown,
}

/// Why a worker was not added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The pool holds `max_workers` already.
    #[error(
        "the proxy has {0} workers, its max_workers; remove one (`minedctl remove-worker`) or \
         raise max_workers"
    )]
    Full(usize),
}

struct WorkerEntry {
    /// Unique for the pool's life: a worker removed while busy and added again is a new entry,
    /// and each lease frees its own.
    id: u64,
    address: WorkerAddress,
    /// The declared name whose DNS answer this worker is (it goes when the answer drops it).
    name: Option<WorkerAddress>,
    /// The connections to it.
    link: Arc<Link>,
    /// What the link was made with: when a reload changed the pool's settings, it is made
    /// anew once the worker is idle.
    made_with: ChannelSettings,
    /// Channels made anew for it after reloads.
    renewed: u32,
    version: String,
    health: Health,
    busy: bool,
    served: u64,
    times_unhealthy: u64,
    /// Marked unhealthy by a failed request; its re-check has not answered yet.
    recheck_pending: bool,
    origin: Origin,
    /// Removed while busy: dropped from the list when its lease is released.
    removed: bool,
    /// When the health loop should look at it next (failed workers back off).
    pub(crate) next_check: Instant,
}

impl WorkerEntry {
    /// Whether `excluded` (addresses a request tried already) names this worker.
    fn excluded_by(&self, excluded: &[String]) -> bool {
        excluded.iter().any(|address| self.address == address.as_str())
    }

    fn usable(&self) -> bool {
        self.health == Health::Healthy && !self.busy && !self.removed
    }

    /// This worker, to be handed to a request.
    fn grant(&self) -> Grant {
        Grant { worker: self.id, address: self.address.to_string(), link: Arc::clone(&self.link) }
    }

    fn set_health(&mut self, health: Health) {
        if matches!(health, Health::Unhealthy { .. })
            && !matches!(self.health, Health::Unhealthy { .. })
        {
            self.times_unhealthy += 1;
        }
        self.health = health;
    }
}

struct Waiter {
    id: u64,
    excluded: Vec<String>,
    grant: oneshot::Sender<Grant>,
}

/// A worker handed to a waiter; becomes a [`Lease`] on receipt.
struct Grant {
    worker: u64,
    address: String,
    link: Arc<Link>,
}

/// The proxy's two connections to one worker, made together with the same settings.
struct Link {
    /// Health checks and status polls (tonic; connects on first use, reconnects after failures).
    channel: Channel,
    /// `Prove` calls (h2, written and read by the request's own task).
    upstream: Upstream,
}

impl Link {
    /// The connections to `address` (found under the DNS `name`, if any); made on first use.
    fn new(
        address: &WorkerAddress,
        name: Option<&WorkerAddress>,
        settings: &ChannelSettings,
    ) -> Self {
        Link {
            channel: connect_lazy(address, name, settings),
            upstream: Upstream::new(address, name, settings),
        }
    }
}

/// A worker entry that is a DNS name: it stands for every address it resolves to, each a
/// worker of its own (`WorkerEntry::name`), re-resolved every health interval.
struct Named {
    address: WorkerAddress,
    origin: Origin,
}

struct State {
    workers: Vec<WorkerEntry>,
    /// Declared names, in the order they were added.
    names: Vec<Named>,
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    next_worker: u64,
    max_queue: usize,
    max_workers: usize,
    closed: bool,
    /// Requests admitted (queued or running) and not yet finished, for the shutdown drain.
    in_flight: usize,
}

impl State {
    /// The workers not removed (a removed worker stays only until its lease ends).
    fn listed(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.iter().filter(|w| !w.removed)
    }

    /// Refuses a request that waiting cannot help: there is no worker at all, or every worker
    /// failed its last check (a worker that just failed a request is being re-checked: its
    /// verdict is worth waiting for).
    fn worth_waiting(&self) -> Result<(), AcquireError> {
        if self.listed().next().is_none() {
            return Err(AcquireError::NoWorkers);
        }
        if self.listed().any(|w| w.recheck_pending || !matches!(w.health, Health::Unhealthy { .. }))
        {
            return Ok(());
        }
        let failures: Vec<String> = self
            .listed()
            .map(|w| match &w.health {
                Health::Unhealthy { reason, .. } => format!("{} ({reason})", w.address),
                _ => w.address.to_string(),
            })
            .collect();
        Err(AcquireError::NoHealthyWorkers(failures.join(", ")))
    }

    /// The workers a request still avoids: a retry that has tried every worker may go back to
    /// one of them (once it is free) rather than wait for a worker that does not exist.
    fn still_excluded<'a>(&self, excluded: &'a [String]) -> &'a [String] {
        if self.listed().all(|w| w.excluded_by(excluded)) { &[] } else { excluded }
    }

    /// Takes a healthy free worker not in `excluded`, if there is one.
    fn take_free(&mut self, excluded: &[String]) -> Option<Grant> {
        let worker = self.workers.iter_mut().find(|w| w.usable() && !w.excluded_by(excluded))?;
        worker.busy = true;
        Some(worker.grant())
    }

    /// Queues a request: a new one at the back, if the queue has room; a retry at the front,
    /// room or not. Returns the waiter's id and where its worker will arrive.
    fn enqueue(
        &mut self,
        excluded: &[String],
        retry: bool,
    ) -> Result<(u64, oneshot::Receiver<Grant>), AcquireError> {
        if !retry && self.waiters.len() >= self.max_queue {
            return Err(AcquireError::QueueFull);
        }
        let (grant, receiver) = oneshot::channel();
        let id = self.next_waiter;
        self.next_waiter += 1;
        let waiter = Waiter { id, excluded: excluded.to_vec(), grant };
        if retry {
            self.waiters.push_front(waiter);
        } else {
            self.waiters.push_back(waiter);
        }
        Ok((id, receiver))
    }
}

/// How the proxy's connections to its workers behave; a reload that changes them makes each
/// worker's connection anew once the worker is idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSettings {
    /// TCP connect timeout (`connection_timeout`).
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on each worker connection (`health_check_interval`), so that a
    /// worker host that goes silent mid-proof (frozen, cable pulled) is noticed and the request
    /// retried elsewhere rather than waited on until the proxy's `timeout`.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered (`health_check_timeout`).
    pub keepalive_timeout: Duration,
    /// How `https://` workers are verified, and the certificate shown to them.
    pub tls: ClientTls,
}

/// The pool of workers and the queue of requests waiting for one.
pub struct WorkerPool {
    state: Mutex<State>,
    channel_settings: Mutex<ChannelSettings>,
    /// Wakes the shutdown drain and the status reporter when something changed.
    changed: tokio::sync::watch::Sender<()>,
    /// Wakes the health loop: a worker was added or failed a request.
    check_now: tokio::sync::Notify,
}

/// One request's hold on one worker; dropping it frees the worker.
pub struct Lease {
    pool: Arc<WorkerPool>,
    worker: u64,
    address: String,
    link: Arc<Link>,
}

impl Lease {
    /// The worker's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A gRPC channel to the worker (shared, connects lazily, reconnects after failures).
    pub fn channel(&self) -> Channel {
        self.link.channel.clone()
    }

    /// The worker's connection for `Prove` calls.
    pub fn upstream(&self) -> &Upstream {
        &self.link.upstream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.worker);
    }
}

/// Counts a request from admission to its end, so a stopping proxy knows when it has drained.
pub struct Admission {
    pool: Arc<WorkerPool>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        state.in_flight -= 1;
        drop(state);
        self.pool.changed.send_replace(());
    }
}

impl WorkerPool {
    /// An empty pool whose queue holds `max_queue` waiting requests and that holds at most
    /// `max_workers` workers.
    pub fn new(
        max_queue: usize,
        max_workers: usize,
        channel_settings: ChannelSettings,
    ) -> Arc<Self> {
        Arc::new(WorkerPool {
            state: Mutex::new(State {
                workers: Vec::new(),
                names: Vec::new(),
                waiters: VecDeque::new(),
                next_waiter: 0,
                next_worker: 0,
                max_queue,
                max_workers,
                closed: false,
                in_flight: 0,
            }),
            channel_settings: Mutex::new(channel_settings),
            changed: tokio::sync::watch::channel(()).0,
            check_now: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock; a panic elsewhere does not poison it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }

    /// Resolves when a worker wants checking before the next round.
    pub async fn check_requested(&self) {
        self.check_now.notified().await;
    }

    /// Subscribes to "something changed" (health, queue, leases).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Adds a worker (unchecked: it takes requests once a health check passes), or a name that
    /// stands for the workers it resolves to (resolved by the health loop, at once and then every
    /// interval: [`WorkerPool::set_members`]). Returns false when it is already present (a
    /// present one named by the configuration becomes a configured one). Does no network I/O:
    /// the channel connects on first use.
    pub fn add(&self, address: &WorkerAddress, origin: Origin) -> Result<bool, AddError> {
        if address.is_name() {
            return Ok(self.add_name(address, origin));
        }
        self.add_entry(address, None, origin)
    }

    fn add_name(&self, address: &WorkerAddress, origin: Origin) -> bool {
        let mut state = self.lock();
        if let Some(present) = state.names.iter_mut().find(|n| n.address == *address) {
            if origin == Origin::Config {
                present.origin = Origin::Config;
                for member in state.workers.iter_mut().filter(|w| w.name.as_ref() == Some(address))
                {
                    member.origin = Origin::Config;
                }
            }
            return false;
        }
        state.names.push(Named { address: address.clone(), origin });
        drop(state);
        self.notify();
        self.check_now.notify_one();
        true
    }

    fn add_entry(
        &self,
        address: &WorkerAddress,
        name: Option<&WorkerAddress>,
        origin: Origin,
    ) -> Result<bool, AddError> {
        let settings = self.channel_settings();
        let link = Arc::new(Link::new(address, name, &settings));
        let mut state = self.lock();
        if let Some(present) =
            state.workers.iter_mut().find(|w| w.address == *address && !w.removed)
        {
            // The configuration adopts a worker added at run time, so that a later reload
            // that drops it from the file removes it.
            if origin == Origin::Config {
                present.origin = Origin::Config;
            }
            return Ok(false);
        }
        let present = state.workers.iter().filter(|w| !w.removed).count();
        if present >= state.max_workers {
            return Err(AddError::Full(state.max_workers));
        }
        let id = state.next_worker;
        state.next_worker += 1;
        state.workers.push(WorkerEntry {
            id,
            address: address.clone(),
            name: name.cloned(),
            link,
            made_with: settings,
            renewed: 0,
            version: String::new(),
            health: Health::Unknown,
            busy: false,
            served: 0,
            times_unhealthy: 0,
            recheck_pending: false,
            origin,
            removed: false,
            next_check: Instant::now(),
        });
        drop(state);
        self.notify();
        self.check_now.notify_one();
        Ok(true)
    }

    /// Removes a worker, or a name with every worker it resolved to; a request running on one
    /// finishes first. Returns false when absent.
    pub fn remove(&self, address: &str) -> bool {
        let mut state = self.lock();
        if let Some(index) = state.names.iter().position(|n| n.address == address) {
            let name = state.names.remove(index).address;
            state.workers.retain_mut(|w| w.name.as_ref() != Some(&name) || drain(w));
        } else {
            let Some(index) = state.workers.iter().position(|w| w.address == address && !w.removed)
            else {
                return false;
            };
            if !drain(&mut state.workers[index]) {
                state.workers.remove(index);
            }
        }
        drop(state);
        self.notify();
        true
    }

    /// The declared names, for the resolver.
    pub fn names(&self) -> Vec<WorkerAddress> {
        self.lock().names.iter().map(|n| n.address.clone()).collect()
    }

    /// Makes `name`'s workers the addresses it resolved to now: new ones are added (unchecked),
    /// those no longer in the answer are removed (a request running on one finishes first).
    /// Returns the addresses added and removed; nothing when the name is no longer declared.
    pub fn set_members(
        &self,
        name: &WorkerAddress,
        resolved: &[std::net::SocketAddr],
    ) -> (Vec<String>, Vec<String>) {
        let wanted: Vec<WorkerAddress> = resolved.iter().map(|addr| name.member(*addr)).collect();
        let (origin, gone) = {
            let mut state = self.lock();
            let Some(origin) = state.names.iter().find(|n| n.address == *name).map(|n| n.origin)
            else {
                return (Vec::new(), Vec::new());
            };
            let is_gone =
                |w: &WorkerEntry| w.name.as_ref() == Some(name) && !wanted.contains(&w.address);
            let gone: Vec<String> =
                state.listed().filter(|w| is_gone(w)).map(|w| w.address.to_string()).collect();
            state.workers.retain_mut(|w| w.removed || !is_gone(w) || drain(w));
            (origin, gone)
        };
        let mut added = Vec::new();
        for address in &wanted {
            match self.add_entry(address, Some(name), origin) {
                Ok(true) => added.push(address.to_string()),
                Ok(false) => {}
                Err(err) => tracing::warn!(worker = %address, %name, "not added: {err}"),
            }
        }
        if !gone.is_empty() {
            self.notify();
        }
        (added, gone)
    }

    /// Admits a request for the shutdown drain's count, or refuses it when the proxy stops.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, AcquireError> {
        let mut state = self.lock();
        if state.closed {
            return Err(AcquireError::ShuttingDown);
        }
        state.in_flight += 1;
        Ok(Admission { pool: Arc::clone(self) })
    }

    /// Waits for a healthy free worker not in `excluded`. A retry (`retry = true`) goes to the
    /// head of the queue and may exceed its bound: it was admitted once already.
    pub async fn acquire(
        self: &Arc<Self>,
        excluded: &[String],
        retry: bool,
    ) -> Result<Lease, AcquireError> {
        let (id, receiver) = {
            let mut state = self.lock();
            state.worth_waiting()?;
            let excluded = state.still_excluded(excluded);
            // A new request does not overtake the queue; a retry is at its head anyway.
            if (state.waiters.is_empty() || retry)
                && let Some(grant) = state.take_free(excluded)
            {
                drop(state);
                self.notify();
                return Ok(self.lease(grant));
            }
            let queued = state.enqueue(excluded, retry)?;
            // A free worker that the waiters ahead excluded may suit this one.
            dispatch(&mut state);
            queued
        };
        self.notify();
        let mut waiting = Waiting { pool: Arc::clone(self), id, receiver: Some(receiver) };
        let grant = waiting
            .receiver
            .as_mut()
            .expect("the receiver is only taken by Drop")
            .await
            .map_err(|_| AcquireError::ShuttingDown)?;
        waiting.receiver = None;
        Ok(self.lease(grant))
    }

    fn lease(self: &Arc<Self>, grant: Grant) -> Lease {
        Lease {
            pool: Arc::clone(self),
            worker: grant.worker,
            address: grant.address,
            link: grant.link,
        }
    }

    /// Frees a worker and hands it to the first waiter that may use it.
    fn release(&self, worker: u64) {
        let mut state = self.lock();
        if let Some(index) = state.workers.iter().position(|w| w.id == worker) {
            state.workers[index].served += 1;
            free(&mut state, index, &self.channel_settings());
        }
        dispatch(&mut state);
        drop(state);
        self.notify();
    }

    /// Records a health-check (or request) result for `address`; a worker that turns healthy
    /// is handed to waiters at once.
    pub fn set_health(
        &self,
        address: &str,
        health: Health,
        version: Option<String>,
        next_check: Instant,
    ) {
        let mut state = self.lock();
        if let Some(worker) = state.workers.iter_mut().find(|w| w.address == address && !w.removed)
        {
            worker.set_health(health);
            worker.recheck_pending = false;
            if let Some(version) = version {
                worker.version = version;
            }
            worker.next_check = next_check;
        }
        dispatch(&mut state);
        drop(state);
        self.notify();
    }

    /// Marks a worker unhealthy after a request failed on it; returns the failure count.
    pub fn mark_failed(&self, address: &str, reason: String) -> u32 {
        let mut state = self.lock();
        let mut failed = 1;
        if let Some(worker) = state.workers.iter_mut().find(|w| w.address == address && !w.removed)
        {
            if let Health::Unhealthy { failed_attempts, .. } = worker.health {
                failed = failed_attempts + 1;
            }
            worker.set_health(Health::Unhealthy { failed_attempts: failed, reason });
            worker.recheck_pending = true;
            worker.next_check = Instant::now();
        }
        drop(state);
        self.notify();
        self.check_now.notify_one();
        failed
    }

    /// Workers due for a health check: address, channel, consecutive failures.
    pub fn due_for_check(&self, now: Instant) -> Vec<(WorkerAddress, Channel, u32)> {
        self.lock()
            .workers
            .iter()
            .filter(|w| !w.removed && w.next_check <= now)
            .map(|w| {
                let failed = match w.health {
                    Health::Unhealthy { failed_attempts, .. } => failed_attempts,
                    _ => 0,
                };
                (w.address.clone(), w.link.channel.clone(), failed)
            })
            .collect()
    }

    /// Every worker's state.
    pub fn snapshot(&self) -> Vec<WorkerSnapshot> {
        self.lock()
            .workers
            .iter()
            .filter(|w| !w.removed)
            .map(|w| WorkerSnapshot {
                address: w.address.to_string(),
                version: w.version.clone(),
                health: w.health.clone(),
                busy: w.busy,
                served: w.served,
                times_unhealthy: w.times_unhealthy,
                origin: w.origin,
                name: w.name.as_ref().map(ToString::to_string),
            })
            .collect()
    }

    /// The workers and names as declared (configuration, control socket), with their origin:
    /// a name once, not the workers it resolved to.
    pub fn declared(&self) -> Vec<(WorkerAddress, Origin)> {
        let state = self.lock();
        let workers = state.listed().filter(|w| w.name.is_none());
        let workers = workers.map(|w| (w.address.clone(), w.origin));
        workers.chain(state.names.iter().map(|n| (n.address.clone(), n.origin))).collect()
    }

    /// The workers and names added at run time, in the order they were added (names last).
    pub fn runtime_workers(&self) -> Vec<WorkerAddress> {
        let declared = self.declared().into_iter();
        declared.filter(|(_, origin)| *origin == Origin::Runtime).map(|(a, _)| a).collect()
    }

    /// Requests waiting for a worker, and the bound.
    pub fn queue(&self) -> (usize, usize) {
        let state = self.lock();
        (state.waiters.len(), state.max_queue)
    }

    /// Changes the bounds (reload): requests already queued stay, and so do workers beyond a
    /// lowered `max_workers` (only adding is refused). When the connection settings changed,
    /// idle workers get a new connection made with them at once, busy ones when their request
    /// ends.
    pub fn set_limits(
        &self,
        max_queue: usize,
        max_workers: usize,
        channel_settings: ChannelSettings,
    ) {
        let mut state = self.lock();
        state.max_queue = max_queue;
        state.max_workers = max_workers;
        // Busy workers follow when their request ends (`release`).
        for worker in state.workers.iter_mut().filter(|w| !w.removed && !w.busy) {
            renew_if_stale(worker, &channel_settings);
        }
        *self.channel_settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            channel_settings;
    }

    fn channel_settings(&self) -> ChannelSettings {
        self.channel_settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Each worker's address, how often its connection was made anew after a reload, and
    /// whether it waits for that (tests).
    #[cfg(test)]
    fn renewals(&self) -> Vec<(String, u32, bool)> {
        let current = self.channel_settings();
        self.lock()
            .workers
            .iter()
            .map(|w| (w.address.to_string(), w.renewed, w.made_with != current))
            .collect()
    }

    /// Stops admitting requests; queued and running ones go on.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify();
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
}

/// A channel to `address` made with `settings`; connects on first use. A worker found under a
/// DNS `name` is dialled at its address and its TLS certificate checked against the name.
fn connect_lazy(
    address: &WorkerAddress,
    name: Option<&WorkerAddress>,
    settings: &ChannelSettings,
) -> Channel {
    let mut endpoint = address.endpoint();
    if address.is_tls() {
        let mut tls = settings.tls.config(settings.connect_timeout);
        if let Some(name) = name {
            tls = tls.domain_name(name.host());
        }
        // The files were checked when the settings were loaded; a failure here leaves the
        // endpoint without TLS, which tonic refuses to dial: the worker's health says why.
        endpoint = endpoint.clone().tls_config(tls).unwrap_or_else(|err| {
            tracing::warn!(worker = %address, "no TLS settings for this worker: {err}");
            endpoint
        });
    }
    endpoint
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(PROXY_WINDOW))
        .initial_connection_window_size(Some(PROXY_WINDOW))
        .connect_lazy()
}

/// Gives an idle worker whose link was made with other settings one made with `settings`; the
/// old connections close once their last user (a health check under way) is gone.
fn renew_if_stale(worker: &mut WorkerEntry, settings: &ChannelSettings) {
    if worker.made_with == *settings {
        return;
    }
    // The address was accepted when the worker was added.
    worker.link = Arc::new(Link::new(&worker.address, worker.name.as_ref(), settings));
    worker.made_with = settings.clone();
    worker.renewed += 1;
}

/// Marks a worker that is being removed; true when it must stay listed, `removed`, until its
/// request ends (it is busy), false when it can go at once.
fn drain(worker: &mut WorkerEntry) -> bool {
    worker.removed = true;
    worker.busy
}

/// Hands free workers to waiters, first come first served (a waiter skips workers it excluded).
fn dispatch(state: &mut State) {
    let mut index = 0;
    while index < state.waiters.len() {
        let excluded = &state.waiters[index].excluded;
        let Some(worker) =
            state.workers.iter_mut().find(|w| w.usable() && !w.excluded_by(excluded))
        else {
            index += 1;
            continue;
        };
        let waiter = state.waiters.remove(index).expect("index < len");
        if waiter.grant.send(worker.grant()).is_ok() {
            worker.busy = true;
        }
        // A waiter whose client left is simply gone; the worker stays free for the next one.
    }
}

/// A queued request; dropping it (client gone, timeout) leaves the queue, and returns a worker
/// that was granted but never received.
struct Waiting {
    pool: Arc<WorkerPool>,
    id: u64,
    receiver: Option<oneshot::Receiver<Grant>>,
}

/// Marks the worker at `index` free, or forgets it if it was removed while busy.
fn free(state: &mut State, index: usize, channel_settings: &ChannelSettings) {
    let worker = &mut state.workers[index];
    worker.busy = false;
    if worker.removed {
        state.workers.remove(index);
    } else {
        renew_if_stale(worker, channel_settings);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        let mut state = self.pool.lock();
        let before = state.waiters.len();
        state.waiters.retain(|w| w.id != self.id);
        let mut changed = state.waiters.len() != before;
        // Granted under the lock before we took it: give the worker back, and say so (the
        // status reporter and a draining proxy wait for a free worker too).
        if let Ok(grant) = receiver.try_recv()
            && let Some(index) = state.workers.iter().position(|w| w.id == grant.worker)
        {
            free(&mut state, index, &self.pool.channel_settings());
            dispatch(&mut state);
            changed = true;
        }
        drop(state);
        if changed {
            self.pool.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn addr(address: &str) -> WorkerAddress {
        address.parse().expect("a valid address")
    }

    fn settings(connect_timeout: u64) -> ChannelSettings {
        ChannelSettings {
            connect_timeout: Duration::from_secs(connect_timeout),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(2),
            tls: crate::tls::ClientTls::default(),
        }
    }

    #[tokio::test]
    async fn max_workers_refuses_the_next_worker_and_counts_configured_and_runtime_alike() {
        let pool = WorkerPool::new(10, 2, settings(10));
        assert!(pool.add(&addr("127.0.0.1:1"), Origin::Config).expect("first"));
        assert!(pool.add(&addr("127.0.0.1:2"), Origin::Runtime).expect("second"));
        // Already present: no new worker, so no refusal either.
        assert!(!pool.add(&addr("127.0.0.1:2"), Origin::Config).expect("present"));
        let err = pool.add(&addr("127.0.0.1:3"), Origin::Runtime).expect_err("third");
        assert!(matches!(err, AddError::Full(2)), "{err:?}");
        assert!(err.to_string().contains("raise max_workers"), "{err}");
        assert_eq!(pool.snapshot().len(), 2);
        // Room again once one is removed; a lowered bound keeps the present ones.
        assert!(pool.remove("127.0.0.1:1"));
        assert!(pool.add(&addr("127.0.0.1:3"), Origin::Runtime).expect("room again"));
        pool.set_limits(10, 1, settings(10));
        assert_eq!(pool.snapshot().len(), 2);
        assert!(matches!(pool.add(&addr("127.0.0.1:4"), Origin::Runtime), Err(AddError::Full(1))));
    }

    #[tokio::test]
    async fn a_reload_that_changes_connection_settings_renews_idle_workers_now_busy_ones_later() {
        let pool = WorkerPool::new(10, 8, settings(10));
        for address in ["127.0.0.1:1", "127.0.0.1:2"] {
            pool.add(&addr(address), Origin::Config).expect("add");
            pool.set_health(address, Health::Healthy, None, Instant::now());
        }
        let lease = pool.acquire(&[], false).await.expect("lease");
        let busy = lease.address().to_owned();
        // Unchanged settings renew nothing.
        pool.set_limits(10, 8, settings(10));
        assert!(pool.renewals().iter().all(|(_, renewed, stale)| *renewed == 0 && !stale));

        pool.set_limits(10, 8, settings(3));
        for (address, renewed, stale) in pool.renewals() {
            if address == busy {
                assert_eq!((renewed, stale), (0, true), "the busy worker waits for its request");
            } else {
                assert_eq!((renewed, stale), (1, false), "an idle worker is renewed at once");
            }
        }
        drop(lease);
        assert!(pool.renewals().iter().all(|(_, renewed, stale)| *renewed == 1 && !stale));
    }

    // From here on, one test per rule of the module header and of `acquire`. The pool's channels
    // are lazy and nothing here sends on them, so no server need listen on these addresses.
    // Time is paused: a timeout costs no wall time.
    const A: &str = "127.0.0.1:1";
    const B: &str = "127.0.0.1:2";
    const C: &str = "127.0.0.1:3";

    /// A pool whose `workers` have all passed a health check.
    fn pool_of(max_queue: usize, workers: &[&str]) -> Arc<WorkerPool> {
        let pool = WorkerPool::new(max_queue, 8, settings(10));
        for &address in workers {
            pool.add(&addr(address), Origin::Config).expect("add");
            healthy(&pool, address);
        }
        pool
    }

    fn healthy(pool: &WorkerPool, address: &str) {
        pool.set_health(address, Health::Healthy, None, Instant::now());
    }

    fn unhealthy(pool: &WorkerPool, address: &str, reason: &str) {
        let health = Health::Unhealthy { failed_attempts: 1, reason: reason.to_owned() };
        pool.set_health(address, health, None, Instant::now());
    }

    fn busy(pool: &WorkerPool, address: &str) -> bool {
        pool.snapshot().iter().find(|w| w.address == address).expect("listed").busy
    }

    /// A request for a worker, polled by hand so a test decides when each one looks again.
    type Acquiring<'a> = Pin<Box<dyn Future<Output = Result<Lease, AcquireError>> + 'a>>;

    fn poll(acquiring: &mut Acquiring<'_>) -> Poll<Result<Lease, AcquireError>> {
        acquiring.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    fn acquiring<'a>(
        pool: &'a Arc<WorkerPool>,
        excluded: &'a [String],
        retry: bool,
    ) -> Acquiring<'a> {
        Box::pin(pool.acquire(excluded, retry))
    }

    /// A request that found no worker for it and is now in the queue.
    fn waiter<'a>(pool: &'a Arc<WorkerPool>, excluded: &'a [String], retry: bool) -> Acquiring<'a> {
        let mut acquiring = acquiring(pool, excluded, retry);
        assert!(poll(&mut acquiring).is_pending(), "expected to wait, but was answered");
        acquiring
    }

    /// The lease a request holds by now.
    fn leased(acquiring: &mut Acquiring<'_>) -> Lease {
        match poll(acquiring) {
            Poll::Ready(Ok(lease)) => lease,
            Poll::Ready(Err(err)) => panic!("refused: {err}"),
            Poll::Pending => panic!("still waiting for a worker"),
        }
    }

    /// A request that gets a worker at once.
    fn lease_now(pool: &Arc<WorkerPool>, excluded: &[String], retry: bool) -> Lease {
        leased(&mut acquiring(pool, excluded, retry))
    }

    fn refused(pool: &Arc<WorkerPool>, excluded: &[String], retry: bool) -> AcquireError {
        match poll(&mut acquiring(pool, excluded, retry)) {
            Poll::Ready(Err(err)) => err,
            Poll::Ready(Ok(lease)) => panic!("leased {}", lease.address()),
            Poll::Pending => panic!("queued"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_frees_its_worker_on_success_failure_and_timeout() {
        let pool = pool_of(4, &[A]);
        // Success: the request ends, its lease is dropped.
        drop(lease_now(&pool, &[], false));
        assert!(!busy(&pool, A));

        // Failure: the worker is marked failed, then the lease goes; nobody gets the worker
        // until a health check passes again.
        let lease = lease_now(&pool, &[], false);
        assert_eq!(pool.mark_failed(A, "connection reset".to_owned()), 1);
        let mut next = waiter(&pool, &[], false);
        drop(lease);
        assert!(!busy(&pool, A));
        assert!(poll(&mut next).is_pending(), "an unhealthy worker was handed out");
        healthy(&pool, A);
        let lease = leased(&mut next);

        // Timeout (or client gone): the future holding the lease is dropped.
        let running = async move {
            let _lease = lease;
            std::future::pending::<()>().await;
        };
        let started = tokio::time::Instant::now();
        assert!(tokio::time::timeout(Duration::from_secs(600), running).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(600));
        assert!(!busy(&pool, A));
        assert_eq!(pool.snapshot()[0].served, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_workers_first_come_first_served() {
        let pool = pool_of(8, &[A]);
        let lease = lease_now(&pool, &[], false);
        let mut first = waiter(&pool, &[], false);
        let mut second = waiter(&pool, &[], false);
        let mut third = waiter(&pool, &[], false);
        assert_eq!(pool.queue(), (3, 8));

        drop(lease);
        let lease = leased(&mut first);
        assert!(poll(&mut second).is_pending() && poll(&mut third).is_pending());
        drop(lease);
        let lease = leased(&mut second);
        assert!(poll(&mut third).is_pending());
        drop(lease);
        drop(leased(&mut third));
        assert_eq!(pool.queue(), (0, 8));
        assert!(!busy(&pool, A));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_new_requests_but_a_retry_joins_it_at_the_head() {
        let pool = pool_of(1, &[A]);
        let lease = lease_now(&pool, &[], false);
        let mut queued = waiter(&pool, &[], false);
        assert!(matches!(refused(&pool, &[], false), AcquireError::QueueFull));

        // Admitted once already: a retry may exceed the bound, and goes first.
        let mut retry = waiter(&pool, &[], true);
        assert_eq!(pool.queue(), (2, 1));
        drop(lease);
        let lease = leased(&mut retry);
        assert!(poll(&mut queued).is_pending());
        drop(lease);
        drop(leased(&mut queued));
    }

    #[tokio::test(start_paused = true)]
    async fn max_queue_wait_drops_the_waiter_from_the_queue() {
        let pool = pool_of(4, &[A]);
        let lease = lease_now(&pool, &[], false);
        // The proxy bounds the wait with a timeout around `acquire` (`max_queue_wait`).
        let started = tokio::time::Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(30), pool.acquire(&[], false)).await;
        assert!(waited.is_err(), "no worker was free: the wait must time out");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(pool.queue(), (0, 4));

        // The worker freed later is not held for the request that left.
        drop(lease);
        assert!(!busy(&pool, A));
        drop(lease_now(&pool, &[], false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gone_after_its_grant_hands_the_worker_to_the_next() {
        let pool = pool_of(4, &[A]);
        let lease = lease_now(&pool, &[], false);
        let first = waiter(&pool, &[], false);
        let mut second = waiter(&pool, &[], false);

        // The worker is sent to `first`, whose client leaves before it looks.
        drop(lease);
        assert!(busy(&pool, A));
        assert!(poll(&mut second).is_pending());
        drop(first);
        let lease = leased(&mut second);
        assert_eq!(lease.address(), A);
        assert_eq!(pool.queue(), (0, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_handed_back_by_a_gone_waiter_is_announced_free() {
        let pool = pool_of(4, &[A]);
        let lease = lease_now(&pool, &[], false);
        let first = waiter(&pool, &[], false);
        drop(lease);
        let mut changed = pool.subscribe();
        changed.mark_unchanged();
        drop(first);
        assert!(!busy(&pool, A));
        assert!(changed.has_changed().expect("the pool is alive"), "no change was announced");
    }

    /// A name stands for the addresses it resolves to: each is a worker shown with the name,
    /// the answer's changes add and drain workers, and the name is declared (and removed) once.
    #[tokio::test(start_paused = true)]
    async fn a_dns_name_follows_its_answer_and_drains_the_addresses_it_drops() {
        let pool = pool_of(4, &[]);
        let name: WorkerAddress = "provers.internal:50051".parse().expect("valid");
        assert!(pool.add(&name, Origin::Config).expect("a name is declared"));
        assert!(pool.snapshot().is_empty(), "no worker until the name resolves");
        let at = |ip: &str| -> std::net::SocketAddr { format!("{ip}:50051").parse().expect("ip") };
        let (added, gone) = pool.set_members(&name, &[at("10.0.0.1"), at("10.0.0.2")]);
        assert_eq!((added.len(), gone.len()), (2, 0));
        let shown: Vec<_> = pool.snapshot().into_iter().map(|w| (w.address, w.name)).collect();
        let named = Some("provers.internal:50051".to_owned());
        assert_eq!(
            shown,
            [("10.0.0.1:50051".to_owned(), named.clone()), ("10.0.0.2:50051".to_owned(), named)]
        );
        assert_eq!(pool.declared(), [(name.clone(), Origin::Config)]);

        // 10.0.0.1 is busy when the answer drops it: it stays until its request ends.
        healthy(&pool, "10.0.0.1:50051");
        let lease = lease_now(&pool, &[], false);
        let (added, gone) = pool.set_members(&name, &[at("10.0.0.2"), at("10.0.0.3")]);
        assert_eq!(
            (added, gone),
            (vec!["10.0.0.3:50051".to_owned()], vec![lease.address().into()])
        );
        let listed = |pool: &WorkerPool| -> Vec<String> {
            pool.snapshot().into_iter().map(|w| w.address).collect()
        };
        assert_eq!(listed(&pool), ["10.0.0.2:50051", "10.0.0.3:50051"]);
        assert_eq!(pool.lock().workers.len(), 3, "the busy one drains");
        drop(lease);
        assert_eq!(pool.lock().workers.len(), 2);

        // The same answer again changes nothing; removing the name removes its workers.
        assert_eq!(pool.set_members(&name, &[at("10.0.0.3"), at("10.0.0.2")]), (vec![], vec![]));
        assert!(pool.remove(name.as_str()));
        assert!(pool.snapshot().is_empty() && pool.names().is_empty());
        assert_eq!(pool.set_members(&name, &[at("10.0.0.9")]), (vec![], vec![]), "not declared");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_removed_while_busy_is_never_handed_out_again() {
        let pool = pool_of(4, &[A]);
        let lease = lease_now(&pool, &[], false);
        let mut waiting = waiter(&pool, &[], false);
        assert!(pool.remove(A));
        assert!(pool.snapshot().is_empty() && !pool.remove(A));
        assert!(matches!(refused(&pool, &[], false), AcquireError::NoWorkers));
        // Its request ends: the worker goes, and the waiter does not get it.
        drop(lease);
        assert!(poll(&mut waiting).is_pending());
        assert!(pool.snapshot().is_empty());

        // The same address added again is a new worker: each lease frees only its own.
        assert!(pool.add(&addr(A), Origin::Runtime).expect("add"));
        healthy(&pool, A);
        let old = leased(&mut waiting);
        assert!(pool.remove(A));
        assert!(pool.add(&addr(A), Origin::Runtime).expect("add again"));
        healthy(&pool, A);
        drop(lease_now(&pool, &[], false));
        assert!(!busy(&pool, A), "the new worker's lease freed the removed one");
        let new = lease_now(&pool, &[], false);
        drop(old);
        assert!(busy(&pool, A), "the removed worker's lease freed the new one");
        assert_eq!(pool.snapshot().len(), 1);
        drop(new);
        assert!(!busy(&pool, A));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_another_worker_and_back_only_when_it_tried_them_all() {
        let pool = pool_of(4, &[A, B]);
        let tried_a = [A.to_owned()];
        // A is free and first, but the retry failed on it.
        let on_b = lease_now(&pool, &tried_a, true);
        assert_eq!(on_b.address(), B);
        // B busy, A free: the retry waits for B rather than go back to A.
        let mut retry = waiter(&pool, &tried_a, true);
        assert!(!busy(&pool, A));
        drop(on_b);
        assert_eq!(leased(&mut retry).address(), B);

        // Every worker tried: any free one will do.
        let tried_both = [A.to_owned(), B.to_owned()];
        assert_eq!(lease_now(&pool, &tried_both, true).address(), A);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_worker_goes_to_the_first_waiter_that_may_use_it() {
        let pool = pool_of(4, &[A, B]);
        let on_a = lease_now(&pool, &[], false);
        let on_b = lease_now(&pool, &[], false);
        let tried_a = [A.to_owned()];
        let mut retry = waiter(&pool, &tried_a, true);
        let mut fresh = waiter(&pool, &[], false);
        // A comes free: the retry ahead skips it, the request behind gets it.
        drop(on_a);
        assert_eq!(leased(&mut fresh).address(), A);
        assert!(poll(&mut retry).is_pending());
        drop(on_b);
        assert_eq!(leased(&mut retry).address(), B);
    }

    #[tokio::test(start_paused = true)]
    async fn unchecked_and_unhealthy_workers_are_skipped() {
        let pool = WorkerPool::new(4, 8, settings(10));
        assert!(matches!(refused(&pool, &[], false), AcquireError::NoWorkers));
        for address in [A, B, C] {
            pool.add(&addr(address), Origin::Config).expect("add");
        }
        unhealthy(&pool, B, "wrong proof type");
        healthy(&pool, C);
        let on_c = lease_now(&pool, &[], false);
        assert_eq!(on_c.address(), C);
        // A is not checked yet, B failed: wait rather than use either.
        let mut waiting = waiter(&pool, &[], false);
        drop(on_c);
        let on_c = leased(&mut waiting);
        assert_eq!(on_c.address(), C);

        // A worker turning healthy goes to a waiter at once.
        let mut waiting = waiter(&pool, &[], false);
        healthy(&pool, A);
        assert_eq!(leased(&mut waiting).address(), A);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_worker_failed_a_request_is_refused_unless_a_recheck_is_due() {
        let pool = WorkerPool::new(4, 8, settings(10));
        pool.add(&addr(A), Origin::Config).expect("add");
        pool.add(&addr(B), Origin::Config).expect("add");
        unhealthy(&pool, A, "refused");
        unhealthy(&pool, B, "timed out");
        let err = refused(&pool, &[], false);
        assert!(matches!(&err, AcquireError::NoHealthyWorkers(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1 (refused)") && text.contains("127.0.0.1:2 (timed out)"));

        // A worker that just failed a request is being re-checked: wait for the verdict.
        pool.mark_failed(A, "reset mid-proof".to_owned());
        let mut waiting = waiter(&pool, &[], false);
        healthy(&pool, A);
        assert_eq!(leased(&mut waiting).address(), A);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_pool_admits_nothing_new_and_counts_what_still_runs() {
        let pool = pool_of(4, &[A]);
        let admission = pool.admit().expect("open");
        assert_eq!(pool.in_flight(), 1);
        pool.close();
        assert!(matches!(pool.admit(), Err(AcquireError::ShuttingDown)));
        assert_eq!(pool.in_flight(), 1);
        drop(admission);
        assert_eq!(pool.in_flight(), 0);
    }
}
