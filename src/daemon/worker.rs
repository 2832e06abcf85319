//! The worker as a systemd service: binds the listener, serves one proof at a time, reloads on
//! SIGHUP and drains on SIGTERM/SIGINT within the grace period.

use std::process::ExitCode;

use tracing::{info, warn};

use super::{DaemonError, Signal, Signals};
use crate::config::{WorkerConfigSource, WorkerSettings};
use crate::telemetry::Telemetry;
use crate::tls::ServerTlsCell;
use crate::worker::{Worker, serve};

/// Runs a worker from `source` until SIGTERM; the process entry point of `start-worker`.
pub fn main(source: &WorkerConfigSource) -> ExitCode {
    super::run_daemon("miden-prover", source.load(), async |settings, telemetry| {
        run(source, settings, telemetry).await
    })
}

async fn run(
    source: &WorkerConfigSource,
    settings: &mut WorkerSettings,
    telemetry: &Telemetry,
) -> Result<(), DaemonError> {
    let listener = super::bind(settings.listen_addr(), "port")?;
    let local = listener.local_addr().unwrap_or_else(|_| settings.listen_addr());
    let mut signals = Signals::install()?;
    // A served and a waiting descriptor per connection, six pipes for a proof and its spare,
    // and the runtime's own.
    super::descriptor_headroom(2 * settings.bounds.max_connections as u64 + 64, "max_connections");
    let worker =
        Worker::new(settings.prover_type, settings.limits, settings.bounds, proof_cache(settings))
            .map_err(DaemonError::OwnPath)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tls = ServerTlsCell::new(settings.tls.clone());
    let mut server = tokio::spawn(serve(worker.clone(), listener, tls.clone(), async move {
        let _ = stopped.await;
    }));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        build = crate::cpu::BUILD,
        proof_type = %worker.kind(),
        address = %local,
        tls = tls_mode(settings),
        logs = telemetry.destination,
        traces = if telemetry.exports_traces() { "otlp" } else { "off" },
        "worker listening on {local}"
    );
    super::announce_ready(&worker.status_line());

    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => reload(source, settings, telemetry, &worker, &tls),
            },
            // The server only ends on its own when it fails.
            result = &mut server => return server_result(result),
        }
    }

    // Stop accepting before announcing it, so nothing arrives in between.
    worker.stop_accepting();
    super::announce_stopping(
        if worker.is_busy() { "stopping: finishing the proof in flight" } else { "stopping" },
        settings.grace_period,
    );
    let _ = stop.send(());
    if let Ok(result) = tokio::time::timeout(settings.grace_period, &mut server).await {
        server_result(result)?;
    } else {
        warn!(
            grace_period = ?settings.grace_period,
            "grace period over; abandoning the proof in flight (its client gets no answer)"
        );
    }
    info!("stopped");
    worker.shutdown().await;
    Ok(())
}

/// What the gRPC server task ended with.
fn server_result(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), DaemonError> {
    match result {
        Ok(result) => result.map_err(DaemonError::Serve),
        Err(join) => panic!("the gRPC server task panicked: {join}"),
    }
}

/// SIGHUP: applies what can change live (log filter, grace period, prover limits, proof cache)
/// and names what needs a restart. A broken file keeps the running configuration.
fn reload(
    source: &WorkerConfigSource,
    settings: &mut WorkerSettings,
    telemetry: &Telemetry,
    worker: &Worker,
    tls: &ServerTlsCell,
) {
    let _ = super::reload(
        settings,
        || source.load(),
        telemetry,
        || worker.status_line(),
        |old, new| {
            if new.limits != old.limits {
                worker.set_limits(new.limits);
            }
            worker.set_proof_cache(proof_cache(new));
            if new.tls != old.tls {
                tls.set(new.tls.clone());
            }
            format!(
                "; grace period {:?}, prover memory limit {} bytes, max proof time {:?}, proof \
                 cache {} bytes for {:?}, {}",
                new.grace_period,
                new.limits.memory,
                new.limits.max_proof_time,
                new.proof_cache_size,
                new.proof_cache_ttl,
                tls_mode(new),
            )
        },
    );
}

/// How the port serves: "plaintext", "TLS" or "mutual TLS" (as the certificate files read now).
fn tls_mode(settings: &WorkerSettings) -> &'static str {
    match &settings.tls {
        None => "plaintext",
        Some(tls) if tls.is_mutual() => "mutual TLS",
        Some(_) => "TLS",
    }
}

/// The proof cache's limits in `settings`.
fn proof_cache(settings: &WorkerSettings) -> crate::share::Limits {
    crate::share::Limits { max_bytes: settings.proof_cache_size, ttl: settings.proof_cache_ttl }
}
