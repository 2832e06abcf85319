//! What the proxy says about itself: `ProxyStatusApi/Status` on the main port, the JSON
//! `GET /status` (upstream's shape plus busy/served/queue figures), the `STATUS=` line for
//! systemd, and the worker and queue gauges.

use super::pool::{self, Health, Origin};
use super::{Proxy, health};
use crate::proto::{self, ProofType};

impl Proxy {
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
