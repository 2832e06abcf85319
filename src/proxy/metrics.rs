//! Prometheus metrics of the proxy, in a registry owned by the proxy (no global state, one
//! `prometheus` version in the build — upstream registered into one version and exported from
//! another, so its endpoint was always empty). Names follow Prometheus conventions; the README
//! maps upstream's names onto them.

use std::fmt::Write as _;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use super::pool::WorkerSnapshot;

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
    /// Requests refused because their content took down two workers (`poison_ttl`).
    pub poison_refused: IntCounter,
    /// Requests answered with a kept proof (`proof_cache_size`).
    pub cache_hits: IntCounter,
    /// Requests that joined an identical request's running proof.
    pub cache_joins: IntCounter,
    /// Requests whose proof was neither kept nor running: they took a worker.
    pub cache_misses: IntCounter,
    /// Kept proofs dropped for age or room.
    pub cache_evictions: IntCounter,
    /// Proofs kept now.
    pub cache_proofs: IntGauge,
    /// Bytes the kept proofs take.
    pub cache_bytes: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    // One definition per metric, each a few lines: splitting them would only scatter the list.
    #[allow(clippy::too_many_lines)]
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
            poison_refused: IntCounter::new(
                "mps_proxy_poison_refused_total",
                "Requests refused without reaching a worker: their content took down two workers",
            )
            .expect("valid metric"),
            cache_hits: IntCounter::new(
                "mps_proxy_proof_cache_hits_total",
                "Requests answered with a kept proof of the same input",
            )
            .expect("valid metric"),
            cache_joins: IntCounter::new(
                "mps_proxy_proof_cache_joins_total",
                "Requests that waited for the running proof of an identical request",
            )
            .expect("valid metric"),
            cache_misses: IntCounter::new(
                "mps_proxy_proof_cache_misses_total",
                "Requests whose input had no kept or running proof",
            )
            .expect("valid metric"),
            cache_evictions: IntCounter::new(
                "mps_proxy_proof_cache_evictions_total",
                "Kept proofs dropped for age (proof_cache_ttl) or room (proof_cache_size)",
            )
            .expect("valid metric"),
            cache_proofs: IntGauge::new("mps_proxy_proof_cache_proofs", "Proofs kept")
                .expect("valid metric"),
            cache_bytes: IntGauge::new(
                "mps_proxy_proof_cache_bytes",
                "Bytes the kept proofs take, per-entry overhead included",
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
            Box::new(m.poison_refused.clone()),
            Box::new(m.cache_hits.clone()),
            Box::new(m.cache_joins.clone()),
            Box::new(m.cache_misses.clone()),
            Box::new(m.cache_evictions.clone()),
            Box::new(m.cache_proofs.clone()),
            Box::new(m.cache_bytes.clone()),
        ] {
            m.registry.register(collector).expect("metric names are unique");
        }
        m
    }

    /// Upstream's metric families (miden-remote-prover 0.12), derived from this proxy's, for the
    /// dashboards built on them: `GET /metrics?names=upstream` serves them after the metrics
    /// above. Same names, types and labels (`worker_id`); the histograms have this proxy's
    /// buckets, which reach 10 minutes. Not promtool-clean: upstream's counters lack `_total`.
    pub fn render_upstream(&self, workers: &[WorkerSnapshot]) -> String {
        let mut out = String::new();
        let (requests, failures) =
            self.requests.collect().iter().flat_map(MetricFamily::get_metric).fold(
                (0.0, 0.0),
                |(all, failed), m| {
                    let value = m.get_counter().get_value();
                    let ok = m.get_label().iter().any(|l| l.name() == "code" && l.value() == "ok");
                    (all + value, if ok { failed } else { failed + value })
                },
            );

        sample(
            &mut out,
            "gauge",
            "queue_size",
            "Number of requests in the queue",
            self.queue_size.get(),
        );
        histogram(
            &mut out,
            "queue_latency",
            "Time (in seconds) requests spend in the queue",
            &self.queue_wait.collect(),
        );
        sample(
            &mut out,
            "counter",
            "queue_drop_count",
            "Number of requests dropped due to a full queue",
            self.queue_drops.get(),
        );
        sample(&mut out, "gauge", "worker_count", "Total number of workers", self.workers.get());
        family(
            &mut out,
            "worker_unhealthy",
            "Number of times that each worker was registered as unhealthy",
            "counter",
        );
        for worker in workers {
            let _ = writeln!(
                out,
                "worker_unhealthy{{worker_id=\"{}\"}} {}",
                escape(&worker.address),
                worker.times_unhealthy
            );
        }
        sample(&mut out, "gauge", "worker_busy", "Number of busy workers", self.workers_busy.get());
        family(
            &mut out,
            "worker_request_count",
            "Number of requests processed by each worker",
            "counter",
        );
        for m in self.worker_requests.collect().iter().flat_map(MetricFamily::get_metric) {
            let worker = m.get_label().iter().find(|l| l.name() == "worker");
            let _ = writeln!(
                out,
                "worker_request_count{{worker_id=\"{}\"}} {}",
                escape(worker.map_or("", |l| l.value())),
                m.get_counter().get_value()
            );
        }
        sample(&mut out, "counter", "request_failure_count", "Number of failed requests", failures);
        sample(
            &mut out,
            "counter",
            "request_retries",
            "Number of request retries",
            self.retries.get(),
        );
        sample(&mut out, "counter", "request_count", "Number of requests processed", requests);
        histogram(
            &mut out,
            "request_latency",
            "Time (in seconds) requests take to process",
            &self.request_duration.collect(),
        );
        sample(
            &mut out,
            "counter",
            "rate_limited_requests",
            "Number of requests blocked due to rate limiting",
            self.rate_limited.get(),
        );
        sample(
            &mut out,
            "counter",
            "rate_limit_violations",
            "Number of rate limit violations by clients",
            self.rate_limited.get(),
        );
        out
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

/// A family of one unlabelled sample.
fn sample(out: &mut String, kind: &str, name: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One histogram, the sum of every series of `families` (all have the same buckets).
fn histogram(out: &mut String, name: &str, help: &str, families: &[MetricFamily]) {
    let mut buckets: Vec<(f64, u64)> = BUCKETS.iter().map(|&bound| (bound, 0)).collect();
    let (mut count, mut sum) = (0, 0.0);
    for m in families.iter().flat_map(MetricFamily::get_metric) {
        let h = m.get_histogram();
        for (total, bucket) in buckets.iter_mut().zip(h.get_bucket()) {
            total.1 += bucket.cumulative_count();
        }
        count += h.get_sample_count();
        sum += h.get_sample_sum();
    }
    family(out, name, help, "histogram");
    for (bound, cumulative) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}

/// A label value in the text format.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
