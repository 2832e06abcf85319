//! Prometheus metrics of the proxy, in a registry owned by the proxy (no global state, one
//! `prometheus` version in the build — upstream registered into one version and exported from
//! another, so its endpoint was always empty). Names follow Prometheus conventions; the README
//! maps upstream's names onto them.

use std::fmt::{Display, Write as _};

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
    /// Workers found busy with another proxy's request (two proxies, one fleet).
    pub taken_elsewhere: IntCounter,
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

/// A metric's name and help text, as a scrape shows them.
type Def = (&'static str, &'static str);

// The proxy's own metrics, in the order of `Metrics`' fields (a scrape lists them by name).
const QUEUE_SIZE: Def = ("mps_proxy_queue_size", "Requests waiting for a worker");
const QUEUE_WAIT: Def = ("mps_proxy_queue_wait_seconds", "Time requests waited for a free worker");
const QUEUE_DROPS: Def =
    ("mps_proxy_queue_drops_total", "Requests refused because the queue was full");
const WORKERS: Def = ("mps_proxy_workers", "Workers known to the proxy");
const WORKERS_HEALTHY: Def = ("mps_proxy_workers_healthy", "Healthy workers");
const WORKERS_UNHEALTHY: Def = ("mps_proxy_workers_unhealthy", "Unhealthy workers");
const WORKERS_BUSY: Def = ("mps_proxy_workers_busy", "Workers running a request of this proxy");
const WORKER_REQUESTS: Def = ("mps_proxy_worker_requests_total", "Attempts sent to each worker");
const REQUESTS: Def =
    ("mps_proxy_requests_total", "Finished requests by proof type and gRPC status code");
const RETRIES: Def = ("mps_proxy_request_retries_total", "Attempts repeated on another worker");
const TAKEN_ELSEWHERE: Def = (
    "mps_proxy_workers_taken_elsewhere_total",
    "Workers that answered busy with another proxy's request; the request went to another worker",
);
const REQUEST_DURATION: Def =
    ("mps_proxy_request_duration_seconds", "Whole request duration, queue wait included");
const RATE_LIMITED: Def =
    ("mps_proxy_rate_limited_requests_total", "Requests refused by the per-client-IP rate limit");
const POISON_REFUSED: Def = (
    "mps_proxy_poison_refused_total",
    "Requests refused without reaching a worker: their content took down two workers",
);
const CACHE_HITS: Def =
    ("mps_proxy_proof_cache_hits_total", "Requests answered with a kept proof of the same input");
const CACHE_JOINS: Def = (
    "mps_proxy_proof_cache_joins_total",
    "Requests that waited for the running proof of an identical request",
);
const CACHE_MISSES: Def =
    ("mps_proxy_proof_cache_misses_total", "Requests whose input had no kept or running proof");
const CACHE_EVICTIONS: Def = (
    "mps_proxy_proof_cache_evictions_total",
    "Kept proofs dropped for age (proof_cache_ttl) or room (proof_cache_size)",
);
const CACHE_PROOFS: Def = ("mps_proxy_proof_cache_proofs", "Proofs kept");
const CACHE_BYTES: Def =
    ("mps_proxy_proof_cache_bytes", "Bytes the kept proofs take, per-entry overhead included");

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let add = Registrar(&registry);
        Metrics {
            queue_size: add.gauge(QUEUE_SIZE),
            queue_wait: add.histogram(QUEUE_WAIT),
            queue_drops: add.counter(QUEUE_DROPS),
            workers: add.gauge(WORKERS),
            workers_healthy: add.gauge(WORKERS_HEALTHY),
            workers_unhealthy: add.gauge(WORKERS_UNHEALTHY),
            workers_busy: add.gauge(WORKERS_BUSY),
            worker_requests: add.counter_vec(WORKER_REQUESTS, &["worker"]),
            requests: add.counter_vec(REQUESTS, &["proof_type", "code"]),
            retries: add.counter(RETRIES),
            taken_elsewhere: add.counter(TAKEN_ELSEWHERE),
            request_duration: add.histogram_vec(REQUEST_DURATION, &["proof_type"]),
            rate_limited: add.counter(RATE_LIMITED),
            poison_refused: add.counter(POISON_REFUSED),
            cache_hits: add.counter(CACHE_HITS),
            cache_joins: add.counter(CACHE_JOINS),
            cache_misses: add.counter(CACHE_MISSES),
            cache_evictions: add.counter(CACHE_EVICTIONS),
            cache_proofs: add.gauge(CACHE_PROOFS),
            cache_bytes: add.gauge(CACHE_BYTES),
            registry,
        }
    }

    /// Upstream's metric families (miden-remote-prover 0.12), derived from this proxy's, for the
    /// dashboards built on them: `GET /metrics?names=upstream` serves them after the metrics
    /// above. Same names, types and labels (`worker_id`); the histograms have this proxy's
    /// buckets, which reach 10 minutes. Not promtool-clean: upstream's counters lack `_total`.
    pub fn render_upstream(&self, workers: &[WorkerSnapshot]) -> String {
        let (requests, failures) = self.request_totals();
        let worker_requests = self.worker_requests.collect();
        let mut text = Text::default();
        text.gauge("queue_size", "Number of requests in the queue", self.queue_size.get());
        text.histogram(
            "queue_latency",
            "Time (in seconds) requests spend in the queue",
            &self.queue_wait.collect(),
        );
        text.counter(
            "queue_drop_count",
            "Number of requests dropped due to a full queue",
            self.queue_drops.get(),
        );
        text.gauge("worker_count", "Total number of workers", self.workers.get());
        text.per_worker(
            "worker_unhealthy",
            "Number of times that each worker was registered as unhealthy",
            workers.iter().map(|w| (w.address.as_str(), w.times_unhealthy)),
        );
        text.gauge("worker_busy", "Number of busy workers", self.workers_busy.get());
        text.per_worker(
            "worker_request_count",
            "Number of requests processed by each worker",
            worker_requests.iter().flat_map(MetricFamily::get_metric).map(|m| {
                let worker = m.get_label().iter().find(|l| l.name() == "worker");
                (worker.map_or("", |l| l.value()), m.get_counter().get_value())
            }),
        );
        text.counter("request_failure_count", "Number of failed requests", failures);
        text.counter("request_retries", "Number of request retries", self.retries.get());
        text.counter("request_count", "Number of requests processed", requests);
        text.histogram(
            "request_latency",
            "Time (in seconds) requests take to process",
            &self.request_duration.collect(),
        );
        // Both of upstream's rate-limit families count the same refusals here.
        let rate_limited = self.rate_limited.get();
        text.counter(
            "rate_limited_requests",
            "Number of requests blocked due to rate limiting",
            rate_limited,
        );
        text.counter(
            "rate_limit_violations",
            "Number of rate limit violations by clients",
            rate_limited,
        );
        text.0
    }

    /// Finished requests, and those of them that failed (any code but `ok`), over every label.
    fn request_totals(&self) -> (f64, f64) {
        self.requests.collect().iter().flat_map(MetricFamily::get_metric).fold(
            (0.0, 0.0),
            |(all, failed), m| {
                let value = m.get_counter().get_value();
                let ok = m.get_label().iter().any(|l| l.name() == "code" && l.value() == "ok");
                (all + value, if ok { failed } else { failed + value })
            },
        )
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

/// Makes each metric from its [`Def`] and registers it; the names are constants, so a failure
/// is a bug caught by the first test that makes a `Metrics`.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<C: Collector + Clone + 'static>(&self, metric: prometheus::Result<C>) -> C {
        let metric = metric.expect("valid metric");
        self.0.register(Box::new(metric.clone())).expect("metric names are unique");
        metric
    }

    fn gauge(&self, (name, help): Def) -> IntGauge {
        self.register(IntGauge::new(name, help))
    }

    fn counter(&self, (name, help): Def) -> IntCounter {
        self.register(IntCounter::new(name, help))
    }

    fn counter_vec(&self, (name, help): Def, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn histogram(&self, (name, help): Def) -> Histogram {
        self.register(Histogram::with_opts(latency(name, help)))
    }

    fn histogram_vec(&self, (name, help): Def, labels: &[&str]) -> HistogramVec {
        self.register(HistogramVec::new(latency(name, help), labels))
    }
}

/// A latency histogram's options: [`BUCKETS`].
fn latency(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(BUCKETS.to_vec())
}

/// Upstream's families in the text format, written by hand: they are derived at scrape time
/// and never registered.
#[derive(Default)]
struct Text(String);

impl Text {
    fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.sample(name, help, "gauge", value);
    }

    fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.sample(name, help, "counter", value);
    }

    /// A family of one unlabelled sample.
    fn sample(&mut self, name: &str, help: &str, kind: &str, value: impl Display) {
        self.family(name, help, kind);
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A counter with one sample per worker, labelled `worker_id`.
    fn per_worker<'a, V: Display>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl Iterator<Item = (&'a str, V)>,
    ) {
        self.family(name, help, "counter");
        for (worker, value) in samples {
            let _ = writeln!(self.0, "{name}{{worker_id=\"{}\"}} {value}", escape(worker));
        }
    }

    /// One histogram, the sum of every series of `families` (all have the same buckets).
    fn histogram(&mut self, name: &str, help: &str, families: &[MetricFamily]) {
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
        self.family(name, help, "histogram");
        for (bound, cumulative) in buckets {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(
            self.0,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }

    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// A label value in the text format.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pool::{Health, Origin};

    #[test]
    fn upstream_families_keep_their_names_order_types_and_labels() {
        let metrics = Metrics::new();
        metrics.requests.with_label_values(&["transaction", "ok"]).inc_by(5);
        metrics.requests.with_label_values(&["batch", "unavailable"]).inc_by(2);
        metrics.worker_requests.with_label_values(&["a\"b"]).inc();
        metrics.rate_limited.inc();
        let worker = WorkerSnapshot {
            address: "127.0.0.1:1".to_owned(),
            version: String::new(),
            health: Health::Healthy,
            busy: false,
            served: 0,
            times_unhealthy: 2,
            origin: Origin::Config,
            name: None,
        };
        let text = metrics.render_upstream(&[worker]);

        // Dashboards built on upstream's proxy read these, in this order.
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert_eq!(
            families,
            [
                "queue_size gauge",
                "queue_latency histogram",
                "queue_drop_count counter",
                "worker_count gauge",
                "worker_unhealthy counter",
                "worker_busy gauge",
                "worker_request_count counter",
                "request_failure_count counter",
                "request_retries counter",
                "request_count counter",
                "request_latency histogram",
                "rate_limited_requests counter",
                "rate_limit_violations counter",
            ]
        );
        for sample in [
            r#"worker_unhealthy{worker_id="127.0.0.1:1"} 2"#,
            r#"worker_request_count{worker_id="a\"b"} 1"#,
            "request_count 7",
            "request_failure_count 2",
            r#"queue_latency_bucket{le="+Inf"} 0"#,
            "rate_limited_requests 1",
            "rate_limit_violations 1",
        ] {
            assert!(text.lines().any(|line| line == sample), "no `{sample}` in:\n{text}");
        }
    }
}
