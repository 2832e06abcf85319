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
//!
//! The `Prove` path is in `prove.rs`; every answer that is not a proof is a [`ProxyError`] and
//! becomes a gRPC status in one place, [`ProxyError::into_status`]. What the proxy says about
//! itself (status pages, `STATUS=`, gauges) is in `status.rs`; this module keeps the shared state.

pub mod bounds;
mod codes;
pub mod error;
pub mod forward;
pub mod front;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod poison;
pub mod pool;
mod prove;
pub mod proxy_protocol;
pub mod state;
pub mod status;
mod tls_stream;

pub use self::error::ProxyError;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use self::metrics::Metrics;
use self::pool::{Origin, WorkerPool};
use crate::ProofKind;
use crate::config::{ClientBounds, ProxySettings};
use crate::share;

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
    /// TLS on the main port (new connections get the files' contents as of the last reload).
    pub tls: Option<crate::tls::ServerTls>,
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
            tls: s.tls.clone(),
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

    /// Drops idle rate-limit buckets; the daemon calls it every [`limit::PRUNE_INTERVAL`].
    pub fn prune_limiter(&self) {
        self.limiter.prune();
        self.proofs.prune();
    }

    /// Requests answered since start (any outcome).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
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
        tls: settings.worker_tls.clone(),
    }
}
