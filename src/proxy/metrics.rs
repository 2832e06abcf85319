//! Prometheus metrics of the proxy, in a registry owned by the proxy (no global state, one
//! `prometheus` version in the build — upstream registered into one version and exported from
//! another, so its endpoint was always empty). Names follow Prometheus conventions; the README
//! maps upstream's names onto them.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 5 ms to 10 minutes: batches and blocks take milliseconds, a transaction
/// proof seconds to minutes.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0, 180.0, 300.0, 450.0, 600.0,
];

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests waiting for a worker (upstream `queue_size`).
    pub queue_size: IntGauge,
    /// Time from admission to a worker being leased (upstream `queue_latency`).
    pub queue_wait: Histogram,
    /// Requests refused because the queue was full (upstream `queue_drop_count`).
    pub queue_drops: IntCounter,
    /// Workers known (upstream `worker_count`).
    pub workers: IntGauge,
    /// Workers currently healthy.
    pub workers_healthy: IntGauge,
    /// Workers currently unhealthy (upstream `worker_unhealthy`).
    pub workers_unhealthy: IntGauge,
    /// Workers running a request of this proxy (upstream `worker_busy`).
    pub workers_busy: IntGauge,
    /// Attempts sent to each worker (upstream `worker_request_count`).
    pub worker_requests: IntCounterVec,
    /// Finished requests by proof type and gRPC code (upstream `request_count`,
    /// `request_failure_count`).
    pub requests: IntCounterVec,
    /// Attempts repeated on another worker (upstream `request_retries`).
    pub retries: IntCounter,
    /// Whole request duration, queue included (upstream `request_latency`).
    pub request_duration: HistogramVec,
    /// Requests refused by the per-IP rate limit (upstream `rate_limited_requests`,
    /// `rate_limit_violations`).
    pub rate_limited: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            queue_size: IntGauge::new("mps_proxy_queue_size", "Requests waiting for a worker")
                .expect("valid metric"),
            queue_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "mps_proxy_queue_wait_seconds",
                    "Time requests waited for a free worker",
                )
                .buckets(BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            queue_drops: IntCounter::new(
                "mps_proxy_queue_drops_total",
                "Requests refused because the queue was full",
            )
            .expect("valid metric"),
            workers: IntGauge::new("mps_proxy_workers", "Workers known to the proxy")
                .expect("valid metric"),
            workers_healthy: IntGauge::new("mps_proxy_workers_healthy", "Healthy workers")
                .expect("valid metric"),
            workers_unhealthy: IntGauge::new("mps_proxy_workers_unhealthy", "Unhealthy workers")
                .expect("valid metric"),
            workers_busy: IntGauge::new(
                "mps_proxy_workers_busy",
                "Workers running a request of this proxy",
            )
            .expect("valid metric"),
            worker_requests: IntCounterVec::new(
                Opts::new("mps_proxy_worker_requests_total", "Attempts sent to each worker"),
                &["worker"],
            )
            .expect("valid metric"),
            requests: IntCounterVec::new(
                Opts::new(
                    "mps_proxy_requests_total",
                    "Finished requests by proof type and gRPC status code",
                ),
                &["proof_type", "code"],
            )
            .expect("valid metric"),
            retries: IntCounter::new(
                "mps_proxy_request_retries_total",
                "Attempts repeated on another worker",
            )
            .expect("valid metric"),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "mps_proxy_request_duration_seconds",
                    "Whole request duration, queue wait included",
                )
                .buckets(BUCKETS.to_vec()),
                &["proof_type"],
            )
            .expect("valid metric"),
            rate_limited: IntCounter::new(
                "mps_proxy_rate_limited_requests_total",
                "Requests refused by the per-client-IP rate limit",
            )
            .expect("valid metric"),
            registry,
        };
        for collector in [
            Box::new(m.queue_size.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.queue_wait.clone()),
            Box::new(m.queue_drops.clone()),
            Box::new(m.workers.clone()),
            Box::new(m.workers_healthy.clone()),
            Box::new(m.workers_unhealthy.clone()),
            Box::new(m.workers_busy.clone()),
            Box::new(m.worker_requests.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.rate_limited.clone()),
        ] {
            m.registry.register(collector).expect("metric names are unique");
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
