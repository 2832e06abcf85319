//! A `Prove` call's way through the proxy: admission (rate limit and queue room from the headers,
//! then the message's proof type), the proof shared by identical requests ([`share`]), and the
//! attempt loop that takes a worker from the queue, calls it, and decides what each failure
//! means: another worker, or the client's answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::{Code, Status};
use tracing::{Instrument, Span, info, info_span, warn};

use super::error::ProxyError;
use super::pool::{self, AcquireError};
use super::{LiveSettings, Proxy, RequestMeta, codes, forward, limit, poison};
use crate::share::{self, Served};
use crate::wire::BUSY_MESSAGE;
use crate::{ProofKind, telemetry};

impl Proxy {
    /// What a `Prove` call's headers decide, before its body is read: the client's rate limit
    /// and room in the queue.
    pub fn admit_call(&self, client: IpAddr) -> Result<(), ProxyError> {
        let live = self.live();
        let key = limit::RateLimiter::key(client, live.rate_limit_ipv6_prefix);
        if !self.limiter.allow(key, live.max_req_per_sec) {
            self.metrics.rate_limited.inc();
            let client = if key.is_ipv6() {
                format!("{key}/{}", live.rate_limit_ipv6_prefix)
            } else {
                key.to_string()
            };
            return Err(ProxyError::RateLimited { client, limit: live.max_req_per_sec });
        }
        let (queued, max) = self.pool.queue();
        if queued > 0 && queued >= max {
            self.metrics.queue_drops.inc();
            return Err(AcquireError::QueueFull.into());
        }
        Ok(())
    }

    /// Proves one request on some worker: the whole proxy path of a `Prove` call.
    /// `message` is the encoded `ProofRequest`; the answer is the worker's encoded `Proof`.
    pub async fn prove(
        self: &Arc<Self>,
        message: Bytes,
        client: Option<IpAddr>,
        meta: RequestMeta,
    ) -> Result<Bytes, ProxyError> {
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
                .unwrap_or_else(|_| Err(self.deadline_passed())),
        };
        self.record(&result, started, &span);
        result.map(|(proof, _)| proof)
    }

    /// Counts and logs an answered call.
    fn record(&self, result: &Result<(Bytes, Served), ProxyError>, started: Instant, span: &Span) {
        let outcome = result.as_ref().map_or_else(ProxyError::outcome, |_| codes::name(Code::Ok));
        self.served.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.with_label_values(&[self.kind.as_str(), outcome]).inc();
        self.metrics
            .request_duration
            .with_label_values(&[self.kind.as_str()])
            .observe(started.elapsed().as_secs_f64());
        span.in_scope(|| match result {
            Ok((_, how)) => {
                info!(
                    outcome = how.as_str(),
                    duration_ms = started.elapsed().as_millis(),
                    "request done"
                );
            }
            Err(err) => info!(
                outcome,
                duration_ms = started.elapsed().as_millis(),
                error = %err,
                "request failed"
            ),
        });
    }

    /// The answer to a client whose own deadline (`grpc-timeout`) passed first.
    fn deadline_passed(&self) -> ProxyError {
        let kept = self.proofs.limits();
        ProxyError::ClientDeadline(kept.keeps().then_some(kept.ttl))
    }

    /// What the message itself decides: it is a `ProofRequest` for the kind this proxy serves.
    fn admit(&self, message: &Bytes) -> Result<(), ProxyError> {
        let request = <forward::RequestHead as prost::Message>::decode(message.as_ref())
            .map_err(ProxyError::Undecodable)?;
        let requested = ProofKind::from_wire(request.proof_type)?;
        if requested != self.kind {
            return Err(ProxyError::WrongProofType { requested, served: self.kind });
        }
        Ok(())
    }

    /// Admission checks, then the proof: kept, running (joined) or computed here.
    async fn prove_inner(
        self: &Arc<Self>,
        message: Bytes,
        client: Option<IpAddr>,
        meta: &RequestMeta,
    ) -> Result<(Bytes, Served), ProxyError> {
        let live = self.live();
        self.admit(&message)?;
        let key = poison::digest(&message);
        loop {
            // Checked on every round: a waiter whose leader's workers died may lead next.
            self.refuse_poison(&key, client, &live)?;
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
                        share::Outcome::Final(status) => return Err(ProxyError::Shared(status)),
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
                    // `live` moves: this branch ends the loop.
                    return self.lead(waiter, message, client, meta.clone(), live, key).await;
                }
            }
        }
    }

    /// Refuses content that took down two workers lately (`poison_ttl`).
    fn refuse_poison(
        &self,
        key: &poison::Digest,
        client: Option<IpAddr>,
        live: &LiveSettings,
    ) -> Result<(), ProxyError> {
        if live.poison_ttl > Duration::ZERO
            && self.poison.in_use()
            && let Some(deaths) = self.poison.refused(key, live.poison_ttl)
        {
            self.metrics.poison_refused.inc();
            warn!(
                client = client.map(|ip| ip.to_string()).unwrap_or_default(),
                "refused a request whose content took down {deaths} workers"
            );
            return Err(ProxyError::Poisoned { deaths, ttl: live.poison_ttl });
        }
        Ok(())
    }

    /// Computes a proof nobody else is computing. A client that leaves does not stop the
    /// attempts (unless the cache is off or no worker has the request yet, and nobody else
    /// waits): they move to a task of their own, and their proof is kept for the retry that very
    /// likely follows.
    async fn lead(
        self: &Arc<Self>,
        waiter: share::Waiter,
        message: Bytes,
        client: Option<IpAddr>,
        meta: RequestMeta,
        live: LiveSettings,
        key: poison::Digest,
    ) -> Result<(Bytes, Served), ProxyError> {
        let landing = share::Landing::new(Arc::clone(self), key, &waiter);
        let attempt = async move {
            let call = Call { message: &message, client, meta: &meta, live: &live, key: &key };
            let outcome = landing.holder().attempts(&call, landing.flight()).await;
            landing.land(outcome);
        }
        .instrument(Span::current());
        let mut leader = share::Leader::new(waiter, attempt);
        match leader.outcome().await {
            share::Outcome::Proof(proof) => Ok((proof, Served::Proved)),
            share::Outcome::Final(status) | share::Outcome::Retry(status) => {
                Err(ProxyError::Shared(status))
            }
        }
    }

    /// The attempts at a proof, as everyone waiting for it sees their end.
    async fn attempts(&self, call: &Call<'_>, flight: &share::Flight) -> share::Outcome {
        match self.attempt_loop(call, flight).await {
            Ok(proof) => share::Outcome::Proof(proof),
            Err(err) => err.into_outcome(),
        }
    }

    /// The attempt loop: a worker from the queue, the call, and what each failure means.
    async fn attempt_loop(
        &self,
        call: &Call<'_>,
        flight: &share::Flight,
    ) -> Result<Bytes, ProxyError> {
        let attempts = 1 + call.live.max_retries_per_request;
        let mut tried = Tried::default();
        let mut attempt = 1;
        while attempt <= attempts {
            let lease = self.acquire(attempt, &tried, call.live).await?;
            flight.start();
            // The worker's trace parent: this attempt's span when this proxy exports traces
            // (client → proxy_prove → proxy_attempt → the worker's prove).
            let span = info_span!("proxy_attempt", attempt, worker = lease.address());
            let (lease, answer) = self.attempt(lease, call, &span).await;
            let failure = match answer {
                Ok(proof) => return Ok(proof),
                Err(failure) => failure,
            };
            if matches!(failure, Failure::Busy) && tried.taken_elsewhere < MAX_TAKEN_ELSEWHERE {
                span.in_scope(|| self.taken_elsewhere(lease, &mut tried));
                continue;
            }
            let lease = self.failed(lease, failure, &mut tried, call)?;
            span.in_scope(|| warn!(attempts, failure = %tried.last, "attempt failed"));
            tried.excluded.push(lease.address().to_owned());
            drop(lease);
            if attempt < attempts {
                self.metrics.retries.inc();
            }
            attempt += 1;
        }
        Err(ProxyError::Exhausted { attempts, last: tried.last })
    }

    /// A healthy free worker not tried yet, waiting in the queue for at most `max_queue_wait`.
    async fn acquire(
        &self,
        attempt: u32,
        tried: &Tried,
        live: &LiveSettings,
    ) -> Result<pool::Lease, ProxyError> {
        let queued = Instant::now();
        // A request that already had a worker (it failed, or another proxy had taken it) waits
        // at the head of the queue: it was admitted once, and must not count against
        // `max_queue_items` again behind the requests that came after it.
        let retry = attempt > 1 || tried.taken_elsewhere > 0;
        let acquired =
            tokio::time::timeout(live.max_queue_wait, self.pool.acquire(&tried.excluded, retry))
                .await;
        let lease = match acquired {
            Ok(Ok(lease)) => lease,
            Ok(Err(err)) => {
                if matches!(err, AcquireError::QueueFull) {
                    self.metrics.queue_drops.inc();
                }
                return Err(err.into());
            }
            Err(_) if attempt > 1 => {
                let (wait, last) = (live.max_queue_wait, tried.last.clone());
                return Err(ProxyError::NoWorkerToRetryOn { wait, last });
            }
            Err(_) => return Err(ProxyError::QueueWait(live.max_queue_wait)),
        };
        self.metrics.queue_wait.observe(queued.elapsed().as_secs_f64());
        self.metrics.worker_requests.with_label_values(&[lease.address()]).inc();
        Ok(lease)
    }

    /// One call to the leased worker within the proxy's `timeout`; the lease comes back with
    /// the answer.
    async fn attempt(
        &self,
        lease: pool::Lease,
        call: &Call<'_>,
        span: &Span,
    ) -> (pool::Lease, Result<Bytes, Failure>) {
        let headers = worker_headers(call.meta, span);
        let in_flight = InFlight(Some(lease));
        let upstream = in_flight.lease().upstream();
        let answer = tokio::time::timeout(
            call.live.timeout,
            forward::prove(upstream, call.message, headers).instrument(span.clone()),
        )
        .await;
        let lease = in_flight.landed();
        let answer = match answer {
            Ok(Ok(proof)) => Ok(proof),
            Ok(Err(status)) => Err(classify(status)),
            Err(_elapsed) => Err(Failure::TimedOut),
        };
        (lease, answer)
    }

    /// The worker answered busy although this proxy held it free: another proxy's request took
    /// it (two proxies in front of one fleet). Not a failure and not an attempt: the worker stays
    /// leased here until its `WorkerStatus` says it is idle, so this proxy sends it nothing
    /// meanwhile, and the request goes to another free worker at once (or waits in the queue).
    fn taken_elsewhere(&self, lease: pool::Lease, tried: &mut Tried) {
        tried.taken_elsewhere += 1;
        tried.last = format!("worker {} is busy with another proxy's request", lease.address());
        info!(worker = lease.address(), "worker taken by another proxy's request; trying another");
        self.metrics.taken_elsewhere.inc();
        hold_until_idle(lease);
    }

    /// What a failed attempt means: another try (the lease comes back, the failure noted in
    /// `tried`), or the client's answer.
    fn failed(
        &self,
        lease: pool::Lease,
        failure: Failure,
        tried: &mut Tried,
        call: &Call<'_>,
    ) -> Result<pool::Lease, ProxyError> {
        match failure {
            Failure::PassThrough(status) => return Err(ProxyError::Worker(status)),
            Failure::Busy => tried.last = format!("worker {} is busy", lease.address()),
            Failure::WorkerDown(status) if forward::never_sent(&status) => {
                tried.last =
                    format!("worker {} is unreachable: {}", lease.address(), status.message());
                self.pool.mark_failed(lease.address(), status.message().to_owned());
            }
            Failure::WorkerDown(status) => {
                tried.last = format!("worker {} failed: {}", lease.address(), status.message());
                self.pool.mark_failed(lease.address(), status.message().to_owned());
                tried.deaths += 1;
                self.worker_died(tried, call)?;
            }
            Failure::TimedOut => {
                // The worker is still proving: keep it leased until it says it is idle, so no
                // other request is sent to a busy worker.
                hold_until_idle(lease);
                return Err(ProxyError::Timeout(call.live.timeout));
            }
        }
        Ok(lease)
    }

    /// A worker died under the request: content that took down two (here or lately) goes no
    /// further.
    fn worker_died(&self, tried: &Tried, call: &Call<'_>) -> Result<(), ProxyError> {
        let ttl = call.live.poison_ttl;
        if ttl > Duration::ZERO {
            let took = self.poison.record(*call.key, ttl);
            if took >= poison::REFUSE_AFTER {
                warn!(
                    client = call.client.map(|ip| ip.to_string()).unwrap_or_default(),
                    "a request's content took down {took} workers; it is refused for {ttl:?} \
                     (poison_ttl)"
                );
                return Err(ProxyError::Poisoned { deaths: took, ttl });
            }
        }
        if tried.deaths >= poison::REFUSE_AFTER {
            // Final: a waiter trying again would take two more workers with it.
            return Err(ProxyError::WorkersDied { deaths: tried.deaths, last: tried.last.clone() });
        }
        Ok(())
    }
}

/// What every attempt at one request needs.
struct Call<'a> {
    /// The encoded `ProofRequest`, sent as it came.
    message: &'a Bytes,
    /// Who asked (for the logs).
    client: Option<IpAddr>,
    /// Trace headers passed on.
    meta: &'a RequestMeta,
    /// The settings when the request arrived.
    live: &'a LiveSettings,
    /// The content's digest (for the poison table).
    key: &'a poison::Digest,
}

/// What the failed attempts at one request left.
#[derive(Default)]
struct Tried {
    /// Workers tried already.
    excluded: Vec<String>,
    /// What the last attempt met, for the client's answer.
    last: String,
    /// Workers that died under this request (not: could not be reached).
    deaths: u32,
    /// Workers found busy with another proxy's request (not counted as attempts).
    taken_elsewhere: u32,
}

/// The first pause between two `WorkerStatus` calls of [`hold_until_idle`] (0.15 ms each).
const HOLD_POLL_FIRST: Duration = Duration::from_millis(10);

/// The longest pause of [`hold_until_idle`], reached after about a second.
const HOLD_POLL_MAX: Duration = Duration::from_millis(100);

/// How many workers a request may find taken by other proxies before a busy answer counts as an
/// attempt: a bound on one request's rounds when every proxy's view of the fleet is stale.
const MAX_TAKEN_ELSEWHERE: u32 = 16;

/// The headers of the call to a worker: trace headers and the request id. The worker's trace
/// parent is the attempt's span when this proxy exports traces; otherwise (no exporter, or a log
/// filter that disables info spans) the client's own context, passed on, so the worker's span
/// still joins the client's trace.
fn worker_headers(meta: &RequestMeta, span: &Span) -> http::HeaderMap {
    let exported = telemetry::trace_headers(span);
    let (traceparent, tracestate) = match exported.get("traceparent") {
        Some(own) => (Some(own.clone()), exported.get("tracestate").cloned()),
        None => (meta.traceparent.clone(), meta.tracestate.clone()),
    };
    // No `grpc-timeout` header: tonic answers an expired one with CANCELLED, which reads as a
    // worker gone. The proxy keeps the time itself, and an attempt it gives up is dropped, which
    // makes the worker kill that proof's prover process.
    let mut headers = http::HeaderMap::new();
    for (key, value) in [
        ("traceparent", &traceparent),
        ("tracestate", &tracestate),
        ("x-request-id", &meta.request_id),
    ] {
        if let Some(value) = value.as_deref().and_then(|v| v.parse().ok()) {
            headers.insert(key, value);
        }
    }
    headers
}

/// What a failed attempt met.
enum Failure {
    /// The worker's own verdict on the request (proving error, bad payload): the client's answer.
    PassThrough(Status),
    /// Someone else's proof runs there: try another worker.
    Busy,
    /// Unreachable, reset or died mid-proof: mark it and try another worker.
    WorkerDown(Status),
    /// Our per-attempt timeout.
    TimedOut,
}

fn classify(status: Status) -> Failure {
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
        | Code::DeadlineExceeded => Failure::WorkerDown(status),
        _ => Failure::PassThrough(status),
    }
}

/// The lease of a worker that has the request. When the attempt is dropped before the answer
/// (the client went away), the worker kills that proof's prover process and is idle within
/// milliseconds; the lease is held until the worker says so (a worker of an older version may
/// go on proving), not released to the next request at once.
struct InFlight(Option<pool::Lease>);

impl InFlight {
    /// The lease it holds.
    fn lease(&self) -> &pool::Lease {
        self.0.as_ref().expect("an InFlight holds its lease until it lands")
    }

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
/// (however long the proof takes, as the worker would refuse anything else meanwhile) or stops
/// answering (the health checks take it from there), so the proxy never sends a second proof to
/// a busy worker. It asks after [`HOLD_POLL_FIRST`], then 10 % later each time up to
/// [`HOLD_POLL_MAX`]: a batch proof or another proxy's request ends in milliseconds, and a
/// worker held long after would sit idle (and, with two proxies, be taken by the other again).
fn hold_until_idle(lease: pool::Lease) {
    // Without a runtime (the proxy is shutting down) there is nobody left to send to it.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let mut status =
            crate::proto::worker_status_api_client::WorkerStatusApiClient::new(lease.channel());
        let mut pause = HOLD_POLL_FIRST;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), status.status(())).await {
                Ok(Ok(answer)) if answer.get_ref().busy => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 11 / 10).min(HOLD_POLL_MAX);
                }
                _ => break,
            }
        }
        drop(lease);
    });
}
