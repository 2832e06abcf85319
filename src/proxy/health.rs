//! The health loop: every interval, checks the workers that are due, all in parallel and outside
//! the pool's lock, each with its own timeout: standard gRPC health, then `WorkerStatus` (proof
//! type must match; version must share major.minor with the proxy). Failed workers stay in the
//! list and are re-checked with exponential backoff (up to eight intervals); a recovered worker
//! turns healthy and takes requests again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{info, warn};

use super::pool::{Health, WorkerPool};
use crate::ProofKind;
use crate::proto::ProofType;
use crate::proto::worker_status_api_client::WorkerStatusApiClient;

/// Runs health checks forever (the daemon aborts the task at shutdown). `settings` yields the
/// current interval and per-check timeout, so a reload takes effect at the next round.
pub async fn run(
    pool: Arc<WorkerPool>,
    kind: ProofKind,
    settings: impl Fn() -> (Duration, Duration) + Send + 'static,
) {
    loop {
        let (every, timeout) = settings();
        let now = Instant::now();
        let mut checks = tokio::task::JoinSet::new();
        for (address, channel, failed) in pool.due_for_check(now) {
            let pool = Arc::clone(&pool);
            checks.spawn(async move {
                let result = tokio::time::timeout(timeout, check(channel, kind))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
                match result {
                    Ok(version) => {
                        if failed > 0 {
                            info!(worker = %address, "worker healthy again");
                        }
                        pool.set_health(&address, Health::Healthy, Some(version), now + every);
                    }
                    Err(reason) => {
                        if failed == 0 {
                            warn!(worker = %address, %reason, "worker unhealthy");
                        }
                        let backoff = every * 2u32.saturating_pow(failed.min(3));
                        let health = Health::Unhealthy { failed_attempts: failed + 1, reason };
                        pool.set_health(&address, health, None, now + backoff);
                    }
                }
            });
        }
        while checks.join_next().await.is_some() {}
        // Next round after the interval, or at once when a worker is added or failed a request.
        tokio::select! {
            () = tokio::time::sleep(every) => {},
            () = pool.check_requested() => {},
        }
    }
}

/// Checks one worker; returns its version, or why it is unhealthy.
async fn check(channel: Channel, kind: ProofKind) -> Result<String, String> {
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| describe(&status))?
        .into_inner();
    if health.status != ServingStatus::Serving as i32 {
        return Err("health check answered NOT_SERVING".to_owned());
    }
    let status = WorkerStatusApiClient::new(channel)
        .status(())
        .await
        .map_err(|status| describe(&status))?
        .into_inner();
    let served = ProofType::try_from(status.supported_proof_type)
        .map(ProofKind::from)
        .map_err(|_| format!("Unknown prover type number {}", status.supported_proof_type))?;
    if served != kind {
        return Err(format!("Unsupported prover type: {}", capitalised(served)));
    }
    if !same_minor(&status.version, env!("CARGO_PKG_VERSION")) {
        return Err(format!(
            "Incompatible version: worker {} vs proxy {}",
            status.version,
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(status.version)
}

fn describe(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unavailable => format!("unreachable: {}", status.message()),
        code => format!("{code:?}: {}", status.message()),
    }
}

/// "Batch", as upstream's status JSON spells proof types.
pub fn capitalised(kind: ProofKind) -> &'static str {
    match kind {
        ProofKind::Transaction => "Transaction",
        ProofKind::Batch => "Batch",
        ProofKind::Block => "Block",
    }
}

fn same_minor(a: &str, b: &str) -> bool {
    let major_minor = |v: &str| v.split('.').take(2).map(str::to_owned).collect::<Vec<_>>();
    major_minor(a) == major_minor(b)
}
