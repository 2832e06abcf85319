//! What the proxy says about itself, from one [`StatusDocument`]: the JSON `GET /status` and the
//! control plane's `Status` (the document itself: upstream's shape plus busy/served/queue and
//! proof cache figures), `ProxyStatusApi/Status` on the main port, the `STATUS=` line for
//! systemd, and `minedctl status`, which reads the document back. The worker and queue gauges
//! live here too.

use serde::{Deserialize, Serialize};

use super::Proxy;
use super::pool::{self, Health, Origin};
use crate::proto::{self, ProofType};

/// The proxy's status, as `GET /status` serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    /// This proxy's version.
    pub version: String,
    /// The proof type it serves, capitalised as upstream has it ("Transaction").
    pub prover_type: String,
    /// Every worker, in the order they were added.
    pub workers: Vec<WorkerStatus>,
    /// Requests waiting for a worker.
    pub queue: QueueStatus,
    /// Requests answered with a proof since start.
    pub requests_served: u64,
    /// What the proof cache holds and has done.
    pub proof_cache: ProofCacheStatus,
}

/// One worker in the [`StatusDocument`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// `host:port` as configured.
    pub address: String,
    /// The version it reported; empty until known.
    pub version: String,
    /// `"Healthy"`, `"Unknown"` or `{"Unhealthy": {"failed_attempts": …, "reason": …}}`.
    pub status: Health,
    /// True while a request of this proxy runs on it.
    pub busy: bool,
    /// Requests this proxy finished on it.
    pub requests_served: u64,
    /// `"config"` or `"runtime"`.
    pub source: Origin,
    /// The DNS name it was found under (`host:port` as declared); absent for a worker declared
    /// by its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The queue's length and bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Requests waiting.
    pub length: usize,
    /// `max_queue_items`.
    pub max: usize,
}

/// The proof cache in the [`StatusDocument`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofCacheStatus {
    /// Proofs kept.
    pub proofs: usize,
    /// Their bytes.
    pub bytes: usize,
    /// `proof_cache_size`.
    pub max_bytes: usize,
    /// `proof_cache_ttl`, in seconds.
    pub ttl_seconds: u64,
    /// Proofs running that identical requests may join.
    pub running: usize,
    /// Requests answered from a kept proof.
    pub hits: u64,
    /// Requests that joined an identical running one.
    pub joins: u64,
    /// Requests that found neither.
    pub misses: u64,
    /// Proofs dropped for room or age.
    pub evictions: u64,
}

impl StatusDocument {
    /// "2/3 workers healthy, queue 1/10" for `STATUS=`.
    pub fn line(&self) -> String {
        let QueueStatus { length, max } = self.queue;
        if self.workers.is_empty() {
            return format!("no workers configured, queue {length}/{max}");
        }
        format!("{}/{} workers healthy, queue {length}/{max}", self.healthy(), self.workers.len())
    }

    /// Workers whose last check passed.
    pub fn healthy(&self) -> usize {
        self.workers.iter().filter(|w| w.status == Health::Healthy).count()
    }

    /// Workers running a request of this proxy.
    pub fn busy(&self) -> usize {
        self.workers.iter().filter(|w| w.busy).count()
    }

    /// The answer to `ProxyStatusApi/Status`: without the workers' addresses unless
    /// `public_addresses` (they are `worker-1`, `worker-2`, … then).
    pub fn to_proto(&self, kind: crate::ProofKind, public_addresses: bool) -> proto::ProxyStatus {
        let worker = |(index, w): (usize, &WorkerStatus)| proto::ProxyWorkerStatus {
            address: if public_addresses {
                w.address.clone()
            } else {
                format!("worker-{}", index + 1)
            },
            version: w.version.clone(),
            status: match w.status {
                Health::Unknown => proto::WorkerHealthStatus::Unknown,
                Health::Healthy => proto::WorkerHealthStatus::Healthy,
                Health::Unhealthy { .. } => proto::WorkerHealthStatus::Unhealthy,
            }
            .into(),
        };
        proto::ProxyStatus {
            version: self.version.clone(),
            supported_proof_type: ProofType::from(kind).into(),
            workers: self.workers.iter().enumerate().map(worker).collect(),
        }
    }
}

impl From<pool::WorkerSnapshot> for WorkerStatus {
    fn from(w: pool::WorkerSnapshot) -> Self {
        WorkerStatus {
            address: w.address,
            version: w.version,
            status: w.health,
            busy: w.busy,
            requests_served: w.served,
            source: w.origin,
            name: w.name,
        }
    }
}

impl Proxy {
    /// The status document, from one snapshot of the pool.
    pub fn status_document(&self) -> StatusDocument {
        let (length, max) = self.pool.queue();
        StatusDocument {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            prover_type: self.kind.upstream_name().to_owned(),
            workers: self.pool.snapshot().into_iter().map(WorkerStatus::from).collect(),
            queue: QueueStatus { length, max },
            requests_served: self.served(),
            proof_cache: self.proof_cache_status(),
        }
    }

    /// "2/3 workers healthy, queue 1/10" for `STATUS=`.
    pub fn status_line(&self) -> String {
        self.status_document().line()
    }

    /// The answer to `ProxyStatusApi/Status`, on the public port.
    pub fn status(&self) -> proto::ProxyStatus {
        let public = self
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .public_worker_addresses;
        self.status_document().to_proto(self.kind, public)
    }

    /// The status document as JSON, for `GET /status` and the control plane.
    pub fn status_json(&self) -> String {
        serde_json::to_string(&self.status_document())
            .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"))
    }

    /// Refreshes the worker and queue gauges: on every change of the pool (the `STATUS=`
    /// reporter) and before `/metrics` renders them, so requests need not.
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

    fn proof_cache_status(&self) -> ProofCacheStatus {
        let (proofs, bytes, running) = self.proofs.held();
        let limits = self.proofs.limits();
        let count = |counter: &prometheus::IntCounter| counter.get();
        ProofCacheStatus {
            proofs,
            bytes,
            max_bytes: limits.max_bytes,
            ttl_seconds: limits.ttl.as_secs(),
            running,
            hits: count(&self.metrics.cache_hits),
            joins: count(&self.metrics.cache_joins),
            misses: count(&self.metrics.cache_misses),
            evictions: count(&self.metrics.cache_evictions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> StatusDocument {
        let worker = |address: &str, status, busy, source| WorkerStatus {
            address: address.to_owned(),
            version: "0.12.0".to_owned(),
            status,
            busy,
            requests_served: 3,
            source,
            name: None,
        };
        StatusDocument {
            version: "0.1.0".to_owned(),
            prover_type: "Transaction".to_owned(),
            workers: vec![
                worker("10.0.0.1:50051", Health::Healthy, true, Origin::Config),
                worker(
                    "10.0.0.2:50051",
                    Health::Unhealthy { failed_attempts: 2, reason: "refused".to_owned() },
                    false,
                    Origin::Runtime,
                ),
                worker("10.0.0.3:50051", Health::Unknown, false, Origin::Config),
            ],
            queue: QueueStatus { length: 1, max: 10 },
            requests_served: 42,
            proof_cache: ProofCacheStatus {
                proofs: 3,
                bytes: 1000,
                max_bytes: 1 << 24,
                ttl_seconds: 300,
                running: 1,
                hits: 5,
                joins: 2,
                misses: 4,
                evictions: 0,
            },
        }
    }

    #[test]
    fn the_document_has_upstreams_shape_and_reads_back() {
        let document = document();
        let json = serde_json::to_value(&document).expect("serialises");
        assert_eq!(json["prover_type"], "Transaction");
        assert_eq!(json["workers"][0]["status"], "Healthy");
        assert_eq!(
            json["workers"][1]["status"],
            serde_json::json!({"Unhealthy": {"failed_attempts": 2, "reason": "refused"}})
        );
        assert_eq!(json["workers"][2]["status"], "Unknown");
        assert_eq!(json["workers"][1]["source"], "runtime");
        assert_eq!(json["queue"], serde_json::json!({"length": 1, "max": 10}));
        assert_eq!(json["proof_cache"]["ttl_seconds"], 300);
        let back: StatusDocument = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, document);
    }

    #[test]
    fn the_status_line_and_the_grpc_status_come_from_the_document() {
        let mut document = document();
        assert_eq!(document.line(), "1/3 workers healthy, queue 1/10");
        assert_eq!((document.healthy(), document.busy()), (1, 1));
        let hidden = document.to_proto(crate::ProofKind::Transaction, false);
        assert_eq!(hidden.workers[1].address, "worker-2");
        assert_eq!(hidden.workers[1].status, i32::from(proto::WorkerHealthStatus::Unhealthy));
        let shown = document.to_proto(crate::ProofKind::Transaction, true);
        assert_eq!(shown.workers[0].address, "10.0.0.1:50051");
        document.workers.clear();
        assert_eq!(document.line(), "no workers configured, queue 1/10");
    }
}
