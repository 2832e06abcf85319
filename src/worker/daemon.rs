//! The worker as a systemd service: binds the listener, reports readiness, reloads on SIGHUP and
//! drains on SIGTERM/SIGINT within the grace period.

use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::{Worker, serve};
use crate::config::{WorkerConfigSource, WorkerSettings};
use crate::telemetry::Telemetry;
use crate::{process, systemd};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Logging could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address from the configuration.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// This binary's path, which prover processes run, is unknown.
    #[error("cannot find this program's own path to start prover processes")]
    OwnPath(#[source] std::io::Error),
}

/// Runs a worker from `source` until SIGTERM; the process entry point of `start-worker`.
pub fn main(source: &WorkerConfigSource) -> ExitCode {
    process::run_daemon("miden-prover", source.load(), |settings| run(source, settings))
}

async fn run(source: &WorkerConfigSource, mut settings: WorkerSettings) -> Result<(), DaemonError> {
    let telemetry = Telemetry::init("miden-prover", &settings.log_filter)?;
    let result = serve_until_stopped(source, &mut settings, &telemetry).await;
    telemetry.shutdown();
    result
}

async fn serve_until_stopped(
    source: &WorkerConfigSource,
    settings: &mut WorkerSettings,
    telemetry: &Telemetry,
) -> Result<(), DaemonError> {
    let addr = settings.listen_addr();
    let listener =
        TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| DaemonError::Bind { addr, source })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    // A served and a waiting descriptor per connection, six pipes for a proof and its spare,
    // and the runtime's own.
    crate::process::descriptor_headroom(
        2 * settings.bounds.max_connections as u64 + 64,
        "max_connections",
    );
    let worker =
        Worker::new(settings.prover_type, settings.limits, settings.bounds, proof_cache(settings))
            .map_err(DaemonError::OwnPath)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(serve(worker.clone(), listener, async move {
        let _ = stopped.await;
    }));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        build = crate::cpu::BUILD,
        proof_type = %worker.kind(),
        address = %local,
        logs = telemetry.destination,
        traces = if telemetry.exports_traces() { "otlp" } else { "off" },
        "worker listening on {local}"
    );
    systemd::ready(&worker.status_line());
    if let Some(interval) = systemd::watchdog_interval() {
        systemd::spawn_watchdog(interval);
    }

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => reload(source, settings, telemetry, &worker),
            result = &mut server => {
                // The server only ends on its own when it fails.
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(DaemonError::Serve(err)),
                    Err(join) => panic!("the gRPC server task panicked: {join}"),
                };
            },
        }
    }

    // Stop accepting before announcing it, so nothing arrives in between.
    worker.stop_accepting();
    let busy = worker.is_busy();
    info!(busy, grace_period = ?settings.grace_period, "stopping: no new requests; finishing the proof in flight");
    systemd::stopping(
        if busy { "stopping: finishing the proof in flight" } else { "stopping" },
        settings.grace_period,
    );
    let _ = stop.send(());
    match tokio::time::timeout(settings.grace_period, &mut server).await {
        Ok(Ok(Ok(()))) => info!("stopped"),
        Ok(Ok(Err(err))) => return Err(DaemonError::Serve(err)),
        Ok(Err(join)) => panic!("the gRPC server task panicked: {join}"),
        Err(_) => warn!(
            grace_period = ?settings.grace_period,
            "grace period over; abandoning the proof in flight (its client gets no answer)"
        ),
    }
    worker.shutdown().await;
    Ok(())
}

/// SIGHUP: re-reads the file and the environment, applies what can change live (log filter,
/// grace period, prover limits, proof cache) and names what needs a restart. A broken file keeps
/// the running configuration.
fn reload(
    source: &WorkerConfigSource,
    settings: &mut WorkerSettings,
    telemetry: &Telemetry,
    worker: &Worker,
) {
    systemd::reloading();
    match source.load() {
        Ok(new) => {
            let restart_only = settings.restart_only_changes(&new);
            if !restart_only.is_empty() {
                warn!(
                    settings = %restart_only.join(", "),
                    "changed settings take effect only after a restart (systemctl restart miden-prover)"
                );
            }
            if new.log_filter != settings.log_filter
                && let Err(err) = telemetry.set_filter(&new.log_filter)
            {
                warn!(error = %err, "keeping the previous log filter");
            } else {
                settings.log_filter = new.log_filter;
            }
            settings.grace_period = new.grace_period;
            if new.limits != settings.limits {
                worker.set_limits(new.limits);
                settings.limits = new.limits;
            }
            settings.proof_cache_size = new.proof_cache_size;
            settings.proof_cache_ttl = new.proof_cache_ttl;
            worker.set_proof_cache(proof_cache(settings));
            info!(
                log_filter = %settings.log_filter,
                grace_period = ?settings.grace_period,
                prover_memory_limit = settings.limits.memory,
                max_proof_time = ?settings.limits.max_proof_time,
                proof_cache_size = settings.proof_cache_size,
                proof_cache_ttl = ?settings.proof_cache_ttl,
                "configuration reloaded"
            );
            systemd::ready(&worker.status_line());
        }
        Err(err) => {
            error!("reload failed; the running configuration stays in force: {err}");
            let first = err.problems.first().map_or("", String::as_str);
            systemd::ready(&format!("{}; reload failed: {first}", worker.status_line()));
        }
    }
}

/// The proof cache's limits in `settings`.
fn proof_cache(settings: &WorkerSettings) -> crate::share::Limits {
    crate::share::Limits { max_bytes: settings.proof_cache_size, ttl: settings.proof_cache_ttl }
}
