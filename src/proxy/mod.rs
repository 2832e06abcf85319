//! The proxy: one endpoint for many clients and many workers.
//!
//! How a `Prove` call flows: [`front`] (Pingora: HTTP/2 cleartext gRPC and gRPC-web on HTTP/1.1)
//! reads the whole request → [`Proxy::prove`] checks the per-IP rate limit and the proof type,
//! admits the request, takes a [`pool::Lease`] on a healthy free worker (waiting in the bounded
//! queue if none is free) and calls the worker with its own gRPC client → on a connect failure, a
//! busy answer or a worker that died mid-proof it retries on another worker with the body it
//! kept (Pingora's own retry buffer stops at 64 KiB; a transaction is ≈ 109 KB) → the answer
//! goes back through [`front`]. Requests are keyed by their content ([`share`]): one identical to
//! a request being proved waits for that proof, and finished proofs are kept for a while, so no
//! input is proved twice; a proof a worker has taken runs on when its client leaves. [`health`]
//! checks workers in the background; [`metrics`] counts.

pub mod bounds;
pub mod forward;
pub mod front;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod poison;
pub mod pool;
pub mod proxy_protocol;
pub mod state;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::{Code, Status};
use tracing::{Instrument, info, info_span, warn};

use self::metrics::Metrics;
use self::pool::{AcquireError, Health, Origin, WorkerPool};
use crate::ProofKind;
use crate::config::{ClientBounds, ProxySettings};
use crate::proto::{self, ProofType};
use crate::share::{self, Served};
use crate::telemetry;
use crate::worker::BUSY_MESSAGE;

/// Settings a reload may change while requests run.
#[derive(Clone, Debug)]
pub struct LiveSettings {
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Longest wait in the queue.
    pub max_queue_wait: Duration,
    /// Extra attempts on other workers.
    pub max_retries_per_request: u32,
    /// How long content that took down two workers is refused; zero: never.
    pub poison_ttl: Duration,
    /// What finished proofs are kept for identical requests.
    pub proof_cache: share::Limits,
    /// Per-IP requests per second.
    pub max_req_per_sec: u32,
    /// The IPv6 prefix a client is limited by.
    pub rate_limit_ipv6_prefix: u8,
    /// Forwarders whose `X-Forwarded-For` names the client.
    pub trusted_forwarders: Vec<limit::Network>,
    /// Connections from trusted forwarders begin with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// What clients may hold: connections, buffered bytes, time.
    pub client_bounds: ClientBounds,
    /// Health-check interval and per-check timeout.
    pub health_check: (Duration, Duration),
    /// Whether `ProxyStatusApi/Status` names the workers' addresses.
    pub public_worker_addresses: bool,
}

impl From<&ProxySettings> for LiveSettings {
    fn from(s: &ProxySettings) -> Self {
        LiveSettings {
            timeout: s.timeout,
            max_queue_wait: s.max_queue_wait,
            max_retries_per_request: s.max_retries_per_request,
            poison_ttl: s.poison_ttl,
            proof_cache: share::Limits { max_bytes: s.proof_cache_size, ttl: s.proof_cache_ttl },
            max_req_per_sec: s.max_req_per_sec,
            rate_limit_ipv6_prefix: s.rate_limit_ipv6_prefix,
            trusted_forwarders: s.trusted_forwarders.clone(),
            proxy_protocol: s.proxy_protocol,
            client_bounds: s.client_bounds,
            health_check: (s.health_check_interval, s.health_check_timeout),
            public_worker_addresses: s.public_worker_addresses,
        }
    }
}

/// Trace headers passed on to the worker.
#[derive(Clone, Debug, Default)]
pub struct RequestMeta {
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
    /// W3C `tracestate`.
    pub tracestate: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// When the client stops waiting (its `grpc-timeout`).
    pub deadline: Option<Instant>,
}

/// The proxy's shared state.
pub struct Proxy {
    kind: ProofKind,
    pool: Arc<WorkerPool>,
    live: RwLock<LiveSettings>,
    limiter: limit::RateLimiter,
    poison: poison::PoisonTable,
    proofs: share::Proofs,
    connections: Arc<bounds::Connections>,
    budget: Arc<bounds::Budget>,
    /// Metrics, rendered on the metrics port.
    pub metrics: Metrics,
    served: AtomicU64,
}

impl Proxy {
    /// A proxy for `settings.prover_type` with the configured workers (not yet checked).
    pub fn new(settings: &ProxySettings) -> Arc<Self> {
        let pool = WorkerPool::new(
            settings.max_queue_items,
            settings.max_workers,
            channel_settings(settings),
        );
        for address in &settings.workers {
            // The configuration holds at most max_workers, so none is refused.
            if let Err(err) = pool.add(address, Origin::Config) {
                tracing::warn!(worker = %address, "worker from the configuration not added: {err}");
            }
        }
        let live = LiveSettings::from(settings);
        let metrics = Metrics::new();
        let proofs = share::Proofs::new(
            live.proof_cache,
            share::Gauges {
                entries: metrics.cache_proofs.clone(),
                bytes: metrics.cache_bytes.clone(),
                evictions: metrics.cache_evictions.clone(),
            },
        );
        Arc::new(Proxy {
            kind: settings.prover_type,
            proofs,
            pool,
            live: RwLock::new(live),
            limiter: limit::RateLimiter::default(),
            poison: poison::PoisonTable::default(),
            connections: Arc::default(),
            budget: Arc::default(),
            metrics,
            served: AtomicU64::new(0),
        })
    }

    /// The proof type served.
    pub fn kind(&self) -> ProofKind {
        self.kind
    }

    /// The worker pool (for the control plane and status pages).
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.pool
    }

    /// The settings in force now.
    pub fn live(&self) -> LiveSettings {
        self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Applies reloaded settings to requests from now on.
    pub fn set_live(&self, settings: &ProxySettings) {
        let live = LiveSettings::from(settings);
        self.proofs.set_limits(live.proof_cache);
        *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) = live;
        self.pool.set_limits(
            settings.max_queue_items,
            settings.max_workers,
            channel_settings(settings),
        );
    }

    /// The client a request on a connection from `peer` comes from (see [`limit::client_address`]).
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let live = self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        limit::client_address(peer, forwarded_for, &live.trusted_forwarders)
    }

    /// The key a client is counted under (its address, or its IPv6 prefix).
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        let live = self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        limit::RateLimiter::key(ip, live.rate_limit_ipv6_prefix)
    }

    /// Whether `ip` is a trusted forwarder (exempt from the per-client connection bound).
    pub fn is_forwarder(&self, ip: IpAddr) -> bool {
        let live = self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        live.trusted_forwarders.iter().any(|n| n.contains(ip))
    }

    /// The open connections (see [`bounds`]).
    pub fn connections(&self) -> &Arc<bounds::Connections> {
        &self.connections
    }

    /// The buffered-bytes budget (see [`bounds`]).
    pub fn budget(&self) -> &Arc<bounds::Budget> {
        &self.budget
    }

    /// What a `Prove` call's headers decide, before its body is read: the client's rate limit
    /// and room in the queue.
    pub fn admit_call(&self, client: IpAddr) -> Result<(), Status> {
        let live = self.live();
        let key = limit::RateLimiter::key(client, live.rate_limit_ipv6_prefix);
        if !self.limiter.allow(key, live.max_req_per_sec) {
            self.metrics.rate_limited.inc();
            let who = if key.is_ipv6() {
                format!("{key}/{}", live.rate_limit_ipv6_prefix)
            } else {
                key.to_string()
            };
            return Err(Status::resource_exhausted(format!(
                "Too many requests from {who}: the limit is {} per second per client IP",
                live.max_req_per_sec
            )));
        }
        let (queued, max) = self.pool.queue();
        if queued > 0 && queued >= max {
            self.metrics.queue_drops.inc();
            return Err(acquire_status(&AcquireError::QueueFull));
        }
        Ok(())
    }

    /// Drops idle rate-limit buckets; the daemon calls it every [`limit::PRUNE_INTERVAL`].
    pub fn prune_limiter(&self) {
        self.limiter.prune();
        self.proofs.prune();
    }

    /// Requests answered since start (any outcome).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// "2/3 workers healthy, queue 1/10" for `STATUS=`.
    pub fn status_line(&self) -> String {
        let workers = self.pool.snapshot();
        let healthy = workers.iter().filter(|w| w.health == Health::Healthy).count();
        let (queued, max) = self.pool.queue();
        if workers.is_empty() {
            return format!("no workers configured, queue {queued}/{max}");
        }
        format!("{healthy}/{} workers healthy, queue {queued}/{max}", workers.len())
    }

    /// Refreshes the worker and queue gauges.
    pub fn update_gauges(&self) {
        let workers = self.pool.snapshot();
        let count = |f: &dyn Fn(&pool::WorkerSnapshot) -> bool| {
            i64::try_from(workers.iter().filter(|w| f(w)).count()).unwrap_or(i64::MAX)
        };
        self.metrics.workers.set(count(&|_| true));
        self.metrics.workers_healthy.set(count(&|w| w.health == Health::Healthy));
        self.metrics
            .workers_unhealthy
            .set(count(&|w| matches!(w.health, Health::Unhealthy { .. })));
        self.metrics.workers_busy.set(count(&|w| w.busy));
        self.metrics.queue_size.set(i64::try_from(self.pool.queue().0).unwrap_or(i64::MAX));
    }

    /// Proves one request on some worker: the whole proxy path of a `Prove` call.
    /// `message` is the encoded `ProofRequest`; the answer is the worker's encoded `Proof`.
    pub async fn prove(
        self: &Arc<Self>,
        message: Bytes,
        client: Option<IpAddr>,
        meta: RequestMeta,
    ) -> Result<Bytes, Status> {
        let started = Instant::now();
        let span = info_span!(
            "proxy_prove",
            client = client.map(|ip| ip.to_string()).unwrap_or_default(),
            request_id = meta.request_id.clone().unwrap_or_default()
        );
        telemetry::continue_trace_from(
            &span,
            meta.traceparent.as_deref(),
            meta.tracestate.as_deref(),
        );
        let proving = self.prove_inner(message, client, &meta).instrument(span.clone());
        let result = match meta.deadline {
            None => proving.await,
            Some(deadline) => tokio::time::timeout_at(deadline.into(), proving)
                .await
                .unwrap_or_else(|_| Err(self.deadline_status())),
        };
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        let result = result.map(|(proof, how)| (proof, how.as_str()));
        self.served.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.with_label_values(&[self.kind.as_str(), code_name(code)]).inc();
        self.metrics
            .request_duration
            .with_label_values(&[self.kind.as_str()])
            .observe(started.elapsed().as_secs_f64());
        self.update_gauges();
        span.in_scope(|| match &result {
            Ok((_, how)) => {
                info!(outcome = how, duration_ms = started.elapsed().as_millis(), "request done");
            }
            Err(status) => info!(
                outcome = code_name(code),
                duration_ms = started.elapsed().as_millis(),
                error = status.message(),
                "request failed"
            ),
        });
        result.map(|(proof, _)| proof)
    }

    /// The answer to a client whose own deadline (`grpc-timeout`) passed first.
    fn deadline_status(&self) -> Status {
        let kept = self.proofs.limits();
        if kept.keeps() {
            Status::deadline_exceeded(format!(
                "the client's deadline (grpc-timeout) passed before the proof was ready; a proof \
                 a worker started runs on and is kept for {}: send the same request again to \
                 receive it (or allow more time)",
                humantime::format_duration(kept.ttl)
            ))
        } else {
            Status::deadline_exceeded(
                "the client's deadline (grpc-timeout) passed before the proof was ready; allow \
                 more time",
            )
        }
    }

    /// Admission checks, then the proof: kept, running (joined) or computed here.
    async fn prove_inner(
        self: &Arc<Self>,
        message: Bytes,
        client: Option<IpAddr>,
        meta: &RequestMeta,
    ) -> Result<(Bytes, Served), Status> {
        let live = self.live();
        let request =
            <forward::RequestHead as prost::Message>::decode(message.as_ref()).map_err(|err| {
                Status::invalid_argument(format!("the request does not decode: {err}"))
            })?;
        let requested = ProofType::try_from(request.proof_type).map_err(|_| {
            Status::invalid_argument(format!(
                "unknown proof_type {}; expected 0 (TRANSACTION), 1 (BATCH) or 2 (BLOCK)",
                request.proof_type
            ))
        })?;
        if ProofKind::from(requested) != self.kind {
            return Err(Status::unimplemented(format!(
                "this proxy serves {} requests only, not {}",
                self.kind,
                ProofKind::from(requested)
            )));
        }

        let key = poison::digest(&message);
        loop {
            // Checked on every round: a waiter whose leader's workers died may lead next.
            if live.poison_ttl > Duration::ZERO
                && self.poison.in_use()
                && let Some(deaths) = self.poison.refused(&key, live.poison_ttl)
            {
                self.metrics.poison_refused.inc();
                warn!(
                    client = client.map(|ip| ip.to_string()).unwrap_or_default(),
                    "refused a request whose content took down {deaths} workers"
                );
                return Err(poison_status(deaths, live.poison_ttl));
            }
            match self.proofs.find(&key) {
                share::Found::Cached(proof) => {
                    self.metrics.cache_hits.inc();
                    return Ok((proof, Served::Cached));
                }
                share::Found::Running(waiter) => {
                    self.metrics.cache_joins.inc();
                    info!("an identical request is being proved: waiting for its proof");
                    match waiter.outcome().await {
                        share::Outcome::Proof(proof) => return Ok((proof, Served::Joined)),
                        share::Outcome::Final(status) => return Err(status),
                        share::Outcome::Retry(status) => {
                            info!(
                                error = status.message(),
                                "the identical request's proof failed; trying again"
                            );
                        }
                    }
                }
                share::Found::New(waiter) => {
                    self.metrics.cache_misses.inc();
                    // A client that leaves does not stop the attempts (unless the cache is off
                    // or no worker has the request yet, and nobody else waits): they move to a
                    // task of their own, and their proof is kept for the retry that very likely
                    // follows.
                    let landing = share::Landing::new(Arc::clone(self), key, &waiter);
                    // `live` moves: this branch ends the loop.
                    let (message, meta) = (message.clone(), meta.clone());
                    let attempt = async move {
                        let outcome = landing
                            .holder()
                            .attempts(&message, client, &meta, &live, &key, landing.flight())
                            .await;
                        landing.land(outcome);
                    }
                    .instrument(tracing::Span::current());
                    let mut leader = share::Leader::new(waiter, attempt);
                    return match leader.outcome().await {
                        share::Outcome::Proof(proof) => Ok((proof, Served::Proved)),
                        share::Outcome::Final(status) | share::Outcome::Retry(status) => {
                            Err(status)
                        }
                    };
                }
            }
        }
    }

    /// The attempt loop: a worker from the queue, the call, and what each failure means. Without
    /// a proof, the outcome says whether another try may do better (`Retry`: workers failed) or
    /// is the answer for every identical request (`Final`).
    // One linear story of the attempts and their outcomes.
    #[allow(clippy::too_many_lines)]
    async fn attempts(
        &self,
        message: &Bytes,
        client: Option<IpAddr>,
        meta: &RequestMeta,
        live: &LiveSettings,
        key: &poison::Digest,
        flight: &share::Flight,
    ) -> share::Outcome {
        let mut excluded: Vec<String> = Vec::new();
        let attempts = 1 + live.max_retries_per_request;
        let mut last_failure = String::new();
        // Workers that died under this request (not: could not be reached).
        let mut deaths = 0;
        for attempt in 1..=attempts {
            let queued = Instant::now();
            self.update_gauges();
            let lease = match tokio::time::timeout(
                live.max_queue_wait,
                self.pool.acquire(&excluded, attempt > 1),
            )
            .await
            {
                Ok(Ok(lease)) => lease,
                Ok(Err(AcquireError::QueueFull)) => {
                    self.metrics.queue_drops.inc();
                    return share::Outcome::of(acquire_status(&AcquireError::QueueFull));
                }
                Ok(Err(err)) => return share::Outcome::of(acquire_status(&err)),
                Err(_) if attempt > 1 => {
                    return share::Outcome::Retry(Status::unavailable(format!(
                        "no other worker became free within {:?} to retry on after: {last_failure}",
                        live.max_queue_wait
                    )));
                }
                Err(_) => {
                    return share::Outcome::Retry(Status::unavailable(format!(
                        "no healthy worker became free within {:?} (max_queue_wait)",
                        live.max_queue_wait
                    )));
                }
            };
            flight.start();
            self.metrics.queue_wait.observe(queued.elapsed().as_secs_f64());
            self.metrics.worker_requests.with_label_values(&[lease.address()]).inc();
            self.update_gauges();

            // The worker's trace parent: this attempt's span when this proxy exports traces
            // (client → proxy_prove → proxy_attempt → the worker's prove); otherwise (no
            // exporter, or a log filter that disables info spans) the client's own context,
            // passed on, so the worker's span still joins the client's trace.
            let attempt_span = info_span!("proxy_attempt", attempt, worker = lease.address());
            let exported = telemetry::trace_headers(&attempt_span);
            let (traceparent, tracestate) = match exported.get("traceparent") {
                Some(own) => (Some(own.clone()), exported.get("tracestate").cloned()),
                None => (meta.traceparent.clone(), meta.tracestate.clone()),
            };
            // No `grpc-timeout` header: tonic answers an expired one with CANCELLED, which reads
            // as a worker gone. The proxy keeps the time itself, and an attempt it gives up is
            // dropped, which makes the worker kill that proof's prover process.
            let mut call = tonic::Request::new(message.clone());
            for (key, value) in [
                ("traceparent", &traceparent),
                ("tracestate", &tracestate),
                ("x-request-id", &meta.request_id),
            ] {
                if let Some(value) = value.as_deref().and_then(|v| v.parse().ok()) {
                    call.metadata_mut().insert(key, value);
                }
            }
            let channel = lease.channel();
            let in_flight = InFlight(Some(lease));
            let answer = tokio::time::timeout(
                live.timeout,
                forward::prove(channel, call).instrument(attempt_span.clone()),
            )
            .await;
            let lease = in_flight.landed();
            let (failure, status) = match answer {
                Ok(Ok(proof)) => return share::Outcome::Proof(proof.into_inner()),
                Ok(Err(status)) => (classify(&status), status),
                Err(_elapsed) => (Failure::TimedOut, Status::deadline_exceeded("")),
            };
            match failure {
                Failure::PassThrough => return share::Outcome::Final(status),
                Failure::Busy => {
                    last_failure = format!("worker {} is busy", lease.address());
                }
                Failure::WorkerDown if forward::never_sent(&status) => {
                    last_failure =
                        format!("worker {} is unreachable: {}", lease.address(), status.message());
                    self.pool.mark_failed(lease.address(), status.message().to_owned());
                }
                Failure::WorkerDown => {
                    last_failure =
                        format!("worker {} failed: {}", lease.address(), status.message());
                    self.pool.mark_failed(lease.address(), status.message().to_owned());
                    deaths += 1;
                    if live.poison_ttl > Duration::ZERO {
                        let took = self.poison.record(*key, live.poison_ttl);
                        if took >= poison::REFUSE_AFTER {
                            warn!(
                                client = client.map(|ip| ip.to_string()).unwrap_or_default(),
                                "a request's content took down {took} workers; it is refused \
                                 for {:?} (poison_ttl)",
                                live.poison_ttl
                            );
                            return share::Outcome::Final(poison_status(took, live.poison_ttl));
                        }
                    }
                    if deaths >= poison::REFUSE_AFTER {
                        // Final: a waiter trying again would take two more workers with it.
                        return share::Outcome::Final(Status::unavailable(format!(
                            "{deaths} workers died under this request; it is not sent to a \
                             third: {last_failure}"
                        )));
                    }
                }
                Failure::TimedOut => {
                    // The worker is still proving: keep it leased until it says it is idle,
                    // so no other request is sent to a busy worker.
                    hold_until_idle(lease);
                    return share::Outcome::Final(Status::deadline_exceeded(format!(
                        "the worker did not answer within {:?} (the proxy's `timeout`; \
                             raise it if proofs take longer)",
                        live.timeout
                    )));
                }
            }
            attempt_span.in_scope(|| {
                warn!(attempts, failure = %last_failure, "attempt failed");
            });
            excluded.push(lease.address().to_owned());
            drop(lease);
            if attempt < attempts {
                self.metrics.retries.inc();
            }
        }
        share::Outcome::Retry(Status::unavailable(format!(
            "all {attempts} attempts failed; the last: {last_failure}"
        )))
    }

    /// The answer to `ProxyStatusApi/Status`, on the public port: without the workers'
    /// addresses unless `public_worker_addresses` (they are `worker-1`, `worker-2`, … then).
    pub fn status(&self) -> proto::ProxyStatus {
        let addresses = self
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .public_worker_addresses;
        proto::ProxyStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            supported_proof_type: ProofType::from(self.kind).into(),
            workers: self
                .pool
                .snapshot()
                .into_iter()
                .enumerate()
                .map(|(index, w)| proto::ProxyWorkerStatus {
                    address: if addresses { w.address } else { format!("worker-{}", index + 1) },
                    version: w.version,
                    status: match w.health {
                        Health::Unknown => proto::WorkerHealthStatus::Unknown,
                        Health::Healthy => proto::WorkerHealthStatus::Healthy,
                        Health::Unhealthy { .. } => proto::WorkerHealthStatus::Unhealthy,
                    }
                    .into(),
                })
                .collect(),
        }
    }

    /// Upstream's JSON status, plus busy/served/queue figures an operator wants.
    pub fn status_json(&self) -> serde_json::Value {
        let (queued, max_queue) = self.pool.queue();
        let workers: Vec<serde_json::Value> = self
            .pool
            .snapshot()
            .into_iter()
            .map(|w| {
                let status = match &w.health {
                    Health::Unknown => serde_json::json!("Unknown"),
                    Health::Healthy => serde_json::json!("Healthy"),
                    Health::Unhealthy { failed_attempts, reason } => serde_json::json!({
                        "Unhealthy": {"failed_attempts": failed_attempts, "reason": reason}
                    }),
                };
                serde_json::json!({
                    "address": w.address,
                    "version": w.version,
                    "status": status,
                    "busy": w.busy,
                    "requests_served": w.served,
                    "source": match w.origin { Origin::Config => "config", Origin::Runtime => "runtime" },
                })
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "prover_type": health::capitalised(self.kind),
            "workers": workers,
            "queue": {"length": queued, "max": max_queue},
            "requests_served": self.served(),
            "proof_cache": self.proof_cache_json(),
        })
    }

    /// What the proof cache holds and has done, for the status JSON and `minedctl status`.
    fn proof_cache_json(&self) -> serde_json::Value {
        let (proofs, bytes, running) = self.proofs.held();
        let limits = self.proofs.limits();
        serde_json::json!({
            "proofs": proofs,
            "bytes": bytes,
            "max_bytes": limits.max_bytes,
            "ttl_seconds": limits.ttl.as_secs(),
            "running": running,
            "hits": self.metrics.cache_hits.get(),
            "joins": self.metrics.cache_joins.get(),
            "misses": self.metrics.cache_misses.get(),
            "evictions": self.metrics.cache_evictions.get(),
        })
    }
}

/// The end of a shared proof's attempts: their outcome goes to every waiter, and a task that
/// ends without one (cancelled) tells the waiters to try again.
impl share::HoldsProofs for Arc<Proxy> {
    fn proofs(&self) -> &share::Proofs {
        &self.proofs
    }
}

fn channel_settings(settings: &ProxySettings) -> pool::ChannelSettings {
    pool::ChannelSettings {
        connect_timeout: settings.connection_timeout,
        keepalive_interval: settings.health_check_interval,
        keepalive_timeout: settings.health_check_timeout,
    }
}

enum Failure {
    /// The worker's own verdict on the request (proving error, bad payload): the client's answer.
    PassThrough,
    /// Someone else's proof runs there: try another worker.
    Busy,
    /// Unreachable, reset or died mid-proof: mark it and try another worker.
    WorkerDown,
    /// Our per-attempt timeout.
    TimedOut,
}

fn classify(status: &Status) -> Failure {
    match status.code() {
        // Only "busy" means someone else's proof: RESOURCE_EXHAUSTED also says that this input
        // hit a limit of the worker's prover process (memory, time, stack), and another worker
        // would spend the same on it.
        Code::ResourceExhausted if status.message() == BUSY_MESSAGE => Failure::Busy,
        // The worker's own request_timeout: the upload to it stalled.
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded => Failure::WorkerDown,
        _ => Failure::PassThrough,
    }
}

/// The lease of a worker that has the request. When the attempt is dropped before the answer
/// (the client went away), the worker kills that proof's prover process and is idle within
/// milliseconds; the lease is held until the worker says so (a worker of an older version may
/// go on proving), not released to the next request at once.
struct InFlight(Option<pool::Lease>);

impl InFlight {
    /// The answer (or the proxy's timeout) came: the caller decides what becomes of the lease.
    fn landed(mut self) -> pool::Lease {
        self.0.take().expect("an InFlight holds its lease until it lands")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            info!(
                worker = lease.address(),
                "the client went away mid-proof; the worker stays leased until it is idle"
            );
            hold_until_idle(lease);
        }
    }
}

/// Keeps a worker that may still be proving leased until its `WorkerStatus` says it is idle
/// (checked ten times a second; however long the proof takes, as the worker would refuse anything
/// else meanwhile) or stops answering (the health checks take it from there), so the proxy
/// never sends a second proof to a busy worker.
fn hold_until_idle(lease: pool::Lease) {
    // Without a runtime (the proxy is shutting down) there is nobody left to send to it.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let mut status =
            crate::proto::worker_status_api_client::WorkerStatusApiClient::new(lease.channel());
        loop {
            match tokio::time::timeout(Duration::from_secs(10), status.status(())).await {
                Ok(Ok(answer)) if answer.get_ref().busy => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
        drop(lease);
    });
}

/// The answer to content that took down `deaths` workers.
fn poison_status(deaths: u32, ttl: Duration) -> Status {
    Status::internal(format!(
        "this request's content took down {deaths} workers; it is refused for {} after the last \
         (poison_ttl) without reaching a worker. Check the input: the workers' logs name how \
         their prover processes ended",
        humantime::format_duration(ttl)
    ))
}

fn acquire_status(err: &AcquireError) -> Status {
    match err {
        AcquireError::QueueFull => Status::resource_exhausted(err.to_string()),
        AcquireError::NoWorkers
        | AcquireError::NoHealthyWorkers(_)
        | AcquireError::ShuttingDown => Status::unavailable(err.to_string()),
    }
}

/// Lower-case gRPC code name for metrics and logs.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
