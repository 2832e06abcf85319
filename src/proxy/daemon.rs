//! The proxy as a systemd service: binds every listener (a taken port is an error naming the
//! setting), reports readiness and a live `STATUS=`, reloads on SIGHUP and drains on SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::front::{self, Role};
use super::pool::Origin;
use super::{Proxy, health};
use crate::config::{ProxyConfigSource, ProxySettings};
use crate::systemd;
use crate::telemetry::Telemetry;
use crate::worker::daemon::EXIT_CONFIG;
use crate::worker::error_chain;

/// Why the proxy stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Logging could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (setting `{setting}`)")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Which setting names the port.
        setting: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Runs a proxy from `source` until SIGTERM; the process entry point of `start-proxy`.
pub fn main(source: &ProxyConfigSource) -> ExitCode {
    let settings = match source.load() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("miden-prover-proxy: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("miden-prover-proxy: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match run(source, settings).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                let message = error_chain(&err);
                error!("{message}");
                eprintln!("miden-prover-proxy: {message}");
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn bind(
    ip: std::net::IpAddr,
    port: u16,
    setting: &'static str,
) -> Result<TcpListener, DaemonError> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { addr, setting, source })
}

async fn run(source: &ProxyConfigSource, mut settings: ProxySettings) -> Result<(), DaemonError> {
    let telemetry = Telemetry::init("miden-prover-proxy", &settings.log_filter)?;
    let main = bind(settings.bind_address, settings.port, "port").await?;
    let status = bind(settings.bind_address, settings.status_port, "status_port").await?;
    let metrics = match settings.metrics_port {
        Some(port) => Some(bind(settings.bind_address, port, "metrics_port").await?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let proxy = Proxy::new(&settings);
    let serving = Arc::new(AtomicBool::new(true));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        proof_type = %proxy.kind(),
        address = %local(&main),
        status = %local(&status),
        metrics = %metrics.as_ref().map_or_else(|| "off".to_owned(), local),
        workers = settings.workers.len(),
        "proxy listening on {}",
        local(&main)
    );
    if settings.workers.is_empty() {
        warn!("no workers configured: requests get UNAVAILABLE until one is added");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let listeners =
        [(Role::Grpc, Some(main)), (Role::Status, Some(status)), (Role::Metrics, metrics)];
    for (role, listener) in listeners {
        if let Some(listener) = listener {
            tasks.spawn(front::serve(
                Arc::clone(&proxy),
                role,
                listener,
                Arc::clone(&serving),
                stopped.clone(),
            ));
        }
    }
    let checker = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(health::run(Arc::clone(proxy.pool()), proxy.kind(), move || {
            proxy.live().health_check
        }))
    };
    let reporter = tokio::spawn(report_status(Arc::clone(&proxy)));
    systemd::ready(&proxy.status_line());
    if let Some(interval) = systemd::watchdog_interval() {
        systemd::spawn_watchdog(interval);
    }

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => reload(source, &mut settings, &telemetry, &proxy),
        }
    }

    // Stop admitting before announcing it, so nothing arrives in between.
    proxy.pool().close();
    serving.store(false, Ordering::SeqCst);
    let in_flight = proxy.pool().in_flight();
    info!(in_flight, grace_period = ?settings.grace_period, "stopping: admitting nothing new; finishing queued and running requests");
    systemd::stopping(&format!("stopping: {in_flight} requests to finish"));
    let mut changed = proxy.pool().subscribe();
    let drained = tokio::time::timeout(settings.grace_period, async {
        while proxy.pool().in_flight() > 0 {
            if changed.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            left = proxy.pool().in_flight(),
            "grace period over; dropping the requests still running"
        );
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(settings.graceful_shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    checker.abort();
    reporter.abort();
    info!("stopped");
    telemetry.shutdown();
    Ok(())
}

/// Keeps `STATUS=` current: "2/3 workers healthy, queue 1/10".
async fn report_status(proxy: Arc<Proxy>) {
    let mut changed = proxy.pool().subscribe();
    let mut last = String::new();
    while changed.changed().await.is_ok() {
        let line = proxy.status_line();
        if line != last {
            systemd::status(&line);
            last = line;
        }
        proxy.update_gauges();
    }
}

/// SIGHUP: re-reads file and environment; reconciles the configured workers (run-time additions
/// stay), applies live settings and names those that need a restart. A broken file changes
/// nothing.
fn reload(
    source: &ProxyConfigSource,
    settings: &mut ProxySettings,
    telemetry: &Telemetry,
    proxy: &Proxy,
) {
    systemd::reloading();
    let new = match source.load() {
        Ok(new) => new,
        Err(err) => {
            error!("reload failed; the running configuration stays in force: {err}");
            let first = err.problems.first().map_or("", String::as_str);
            systemd::ready(&format!("{}; reload failed: {first}", proxy.status_line()));
            return;
        }
    };
    let mut restart = Vec::new();
    if new.bind_address != settings.bind_address {
        restart.push("bind_address");
    }
    if new.port != settings.port {
        restart.push("port");
    }
    if new.status_port != settings.status_port {
        restart.push("status_port");
    }
    if new.metrics_port != settings.metrics_port {
        restart.push("metrics_port");
    }
    if new.prover_type != settings.prover_type {
        restart.push("prover_type");
    }
    if !restart.is_empty() {
        warn!(settings = %restart.join(", "), "changed settings take effect only after a restart");
    }
    let pool = proxy.pool();
    for worker in pool.snapshot() {
        if worker.origin == Origin::Config && !new.workers.contains(&worker.address) {
            pool.remove(&worker.address);
            info!(worker = %worker.address, "worker removed (no longer in the configuration)");
        }
    }
    for address in &new.workers {
        if let Ok(true) = pool.add(address, Origin::Config) {
            info!(worker = %address, "worker added from the configuration");
        }
    }
    if new.log_filter != settings.log_filter
        && let Err(err) = telemetry.set_filter(&new.log_filter)
    {
        warn!(error = %err, "keeping the previous log filter");
    }
    proxy.set_live(&new);
    let (bind_address, port, status_port, metrics_port, prover_type) = (
        settings.bind_address,
        settings.port,
        settings.status_port,
        settings.metrics_port,
        settings.prover_type,
    );
    *settings = ProxySettings { prover_type, bind_address, port, status_port, metrics_port, ..new };
    info!("configuration reloaded");
    systemd::ready(&proxy.status_line());
}
