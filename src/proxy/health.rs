//! The health loop: every interval, resolves the workers declared by DNS name (each address in
//! the answer is a worker; [`WorkerPool::set_members`]), then checks the workers that are due, in parallel (at most
//! [`MAX_CONCURRENT_CHECKS`] at once) and outside the pool's lock, each with its own timeout: standard gRPC health, then `WorkerStatus` (proof
//! type must match; version must share major.minor with the proxy). Failed workers stay in the
//! list and are re-checked with exponential backoff (up to eight intervals); a recovered worker
//! turns healthy and takes requests again.

use std::net::SocketAddr;
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

/// Health checks under way at once, at most: with `max_workers` workers all due together, the
/// rest wait for a free slot rather than open hundreds of connections in one burst.
pub const MAX_CONCURRENT_CHECKS: usize = 32;

/// Runs health checks forever (the daemon aborts the task at shutdown). `settings` yields the
/// current interval and per-check timeout, so a reload takes effect at the next round.
pub async fn run(
    pool: Arc<WorkerPool>,
    kind: ProofKind,
    settings: impl Fn() -> (Duration, Duration) + Send + 'static,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS));
    loop {
        let (every, timeout) = settings();
        resolve_names(&pool, &slots, timeout).await;
        let now = Instant::now();
        let mut checks = tokio::task::JoinSet::new();
        for (address, channel, failed) in pool.due_for_check(now) {
            let pool = Arc::clone(&pool);
            let slots = Arc::clone(&slots);
            checks.spawn(async move {
                // The semaphore is never closed.
                let Ok(_slot) = slots.acquire().await else { return };
                let result = tokio::time::timeout(timeout, check(channel, kind))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
                    .map_err(|reason| with_tls_hint(address.is_tls(), reason));
                match result {
                    Ok(version) => {
                        if failed > 0 {
                            info!(worker = %address, "worker healthy again");
                        }
                        pool.set_health(
                            address.as_str(),
                            Health::Healthy,
                            Some(version),
                            now + every,
                        );
                    }
                    Err(reason) => {
                        if failed == 0 {
                            warn!(worker = %address, %reason, "worker unhealthy");
                        }
                        let backoff = every * 2u32.saturating_pow(failed.min(3));
                        let health = Health::Unhealthy { failed_attempts: failed + 1, reason };
                        pool.set_health(address.as_str(), health, None, now + backoff);
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

/// Resolves every declared name, all at once (at most [`MAX_CONCURRENT_CHECKS`] lookups under
/// way, each within `timeout`, so slow names cost one timeout, not one each), and makes each
/// name's workers the addresses it stands for now. A name that fails to resolve keeps the workers
/// it had (a DNS outage must not empty the fleet).
async fn resolve_names(pool: &WorkerPool, slots: &Arc<tokio::sync::Semaphore>, timeout: Duration) {
    let mut lookups = tokio::task::JoinSet::new();
    for name in pool.names() {
        let slots = Arc::clone(slots);
        lookups.spawn(async move {
            // Never closed: an error would only mean no wait.
            let _slot = slots.acquire().await;
            let lookup = tokio::net::lookup_host(name.authority().to_owned());
            let answer = match tokio::time::timeout(timeout, lookup).await {
                Ok(Ok(addrs)) => Ok(addrs.collect::<Vec<SocketAddr>>()),
                Ok(Err(err)) => Err(format!("cannot resolve the worker name: {err}")),
                Err(_) => Err(format!("no DNS answer within {timeout:?}")),
            };
            (name, answer)
        });
    }
    while let Some(joined) = lookups.join_next().await {
        // A lookup task is never aborted and does not panic.
        let Ok((name, answer)) = joined else { continue };
        let mut addrs = match answer {
            Ok(addrs) => addrs,
            Err(reason) => {
                warn!(%name, "{reason}; the name's workers stay as they were");
                continue;
            }
        };
        // One per socket type in getaddrinfo's answer.
        addrs.sort_unstable();
        addrs.dedup();
        let (added, removed) = pool.set_members(&name, &addrs);
        for worker in added {
            info!(%worker, %name, "worker found under its DNS name");
        }
        for worker in removed {
            info!(%worker, %name, "worker gone from its name's DNS answer; removed once idle");
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
        return Err(format!("Unsupported prover type: {}", served.upstream_name()));
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

/// The status's code and message, then the transport's causes (a refused connection, a TLS
/// handshake's certificate error), which tonic keeps out of the message.
fn describe(status: &tonic::Status) -> String {
    let mut text = match status.code() {
        tonic::Code::Unavailable => format!("unreachable: {}", status.message()),
        code => format!("{code:?}: {}", status.message()),
    };
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(": ");
        text.push_str(&crate::daemon::error_chain(source));
    }
    text
}

/// `reason`, with what to check when it is how a TLS (`https://`) worker refuses this proxy's
/// client certificate; `tls` says whether the worker is one. With TLS 1.3 the worker checks the
/// client's certificate after the client's side of the handshake has ended, so the proxy learns
/// of a refusal only as an alert or the connection closing on its first request, which say
/// nothing of certificates by themselves.
fn with_tls_hint(tls: bool, reason: String) -> String {
    if !tls {
        return reason;
    }
    let text = reason.to_ascii_lowercase();
    let hint = if text.contains("certificaterequired") {
        "the worker asks for a client certificate and this proxy sent none: set \
         tls_client_cert_file and tls_client_key_file"
    } else if ["badcertificate", "unknownca", "certificateunknown", "accessdenied"]
        .iter()
        .any(|alert| text.contains(alert))
    {
        "the worker refused this proxy's client certificate: check that the CA in the worker's \
         tls_client_ca_file signed the proxy's tls_client_cert_file"
    } else if ["connection closed", "reset by peer", "broken pipe"]
        .iter()
        .any(|closed| text.contains(closed))
    {
        "the worker closed the connection after the TLS handshake, as a worker that \
         refuses this proxy's client certificate answers with TLS 1.3: check the proxy's \
         tls_client_cert_file against the worker's tls_client_ca_file"
    } else {
        return reason;
    };
    format!("{reason} ({hint})")
}

fn same_minor(a: &str, b: &str) -> bool {
    let major_minor = |v: &str| v.split('.').take(2).map(str::to_owned).collect::<Vec<_>>();
    major_minor(a) == major_minor(b)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::proxy::pool::{ChannelSettings, Origin};

    #[test]
    fn a_refused_client_certificate_is_named_only_for_tls_workers() {
        let required = "Unknown: transport error: connection error: received fatal alert: \
                        CertificateRequired";
        let hinted = with_tls_hint(true, required.to_owned());
        assert!(hinted.starts_with(required), "{hinted}");
        assert!(hinted.contains("sent none: set tls_client_cert_file"), "{hinted}");
        let closed = "Cancelled: operation was canceled: connection closed";
        let hinted = with_tls_hint(true, closed.to_owned());
        assert!(hinted.contains("check the proxy's tls_client_cert_file"), "{hinted}");
        let piped = with_tls_hint(true, "stream closed because of a broken pipe".into());
        assert!(piped.contains("check the proxy's tls_client_cert_file"), "{piped}");
        let unknown_ca = with_tls_hint(true, "received fatal alert: UnknownCA".into());
        assert!(unknown_ca.contains("worker's tls_client_ca_file signed"), "{unknown_ca}");
        // Cleartext workers, and failures that are not a refusal, read as they were.
        assert_eq!(with_tls_hint(false, closed.to_owned()), closed);
        let refused = "unreachable: tcp connect error: Connection refused (os error 111)";
        assert_eq!(with_tls_hint(true, refused.to_owned()), refused);
    }

    /// 40 workers that accept connections and never answer: the first round opens exactly
    /// `MAX_CONCURRENT_CHECKS` connections; the others follow as those checks time out.
    #[tokio::test]
    async fn no_more_than_the_cap_of_health_checks_run_at_once() {
        let settings = ChannelSettings {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            tls: crate::tls::ClientTls::default(),
        };
        let pool = WorkerPool::new(10, 64, settings);
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut held = Vec::new();
        for _ in 0..40 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("addr").to_string();
            pool.add(&address.parse().expect("address"), Origin::Config).expect("add");
            let accepted = Arc::clone(&accepted);
            held.push(tokio::spawn(async move {
                let mut silent = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    silent.push(stream);
                }
            }));
        }
        let timeout = Duration::from_secs(3);
        let checks = tokio::spawn(run(Arc::clone(&pool), ProofKind::Transaction, move || {
            (Duration::from_secs(60), timeout)
        }));
        let count = || accepted.load(Ordering::SeqCst);
        let started = Instant::now();
        while count() < MAX_CONCURRENT_CHECKS {
            assert!(started.elapsed() < Duration::from_secs(10), "only {} checks started", count());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Until the first checks time out, none of the remaining eight may start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count(), MAX_CONCURRENT_CHECKS, "checks beyond the cap started");
        while count() < 40 {
            assert!(started.elapsed() < Duration::from_secs(10), "the rest never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        checks.abort();
        for task in held {
            task.abort();
        }
    }
}
