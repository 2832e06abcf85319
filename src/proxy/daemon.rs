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
use super::{Proxy, health, state};
use crate::config::{ProxyConfigSource, ProxySettings};
use crate::control::{self, Control, ReloadRequest};
use crate::telemetry::Telemetry;
use crate::{process, systemd};

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
    /// The control socket could not be created.
    #[error(transparent)]
    Control(#[from] crate::control::socket::SocketError),
}

/// Runs a proxy from `source` until SIGTERM; the process entry point of `start-proxy`.
pub fn main(source: &ProxyConfigSource) -> ExitCode {
    process::run_daemon("miden-prover-proxy", source.load(), |settings| run(source, settings))
}

/// Forgets the rate limiter's idle clients every `PRUNE_INTERVAL`, forever.
async fn prune(proxy: Arc<Proxy>) {
    let mut every = tokio::time::interval(super::limit::PRUNE_INTERVAL);
    loop {
        every.tick().await;
        proxy.prune_limiter();
    }
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
    let status = bind(settings.status_bind_address, settings.status_port, "status_port").await?;
    let metrics = match settings.metrics_port {
        Some(port) => Some(bind(settings.status_bind_address, port, "metrics_port").await?),
        None => None,
    };
    let control = settings.control_socket.as_deref().map(control::socket::bind).transpose()?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    descriptor_headroom(&settings);
    let proxy = Proxy::new(&settings);
    if let Some(path) = &settings.state_file {
        state::restore(proxy.pool(), path);
    }
    let serving = Arc::new(AtomicBool::new(true));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        build = crate::cpu::BUILD,
        proof_type = %proxy.kind(),
        address = %local(&main),
        status = %local(&status),
        metrics = %metrics.as_ref().map_or_else(|| "off".to_owned(), local),
        control = %control.as_ref().map_or_else(|| "off".to_owned(), |c| c.path().display().to_string()),
        workers = settings.workers.len(),
        logs = telemetry.destination,
        traces = if telemetry.exports_traces() { "otlp" } else { "off" },
        "proxy listening on {}",
        local(&main)
    );
    if proxy.pool().snapshot().is_empty() {
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
    if let Some(path) = &settings.state_file {
        tasks.spawn(state::keep(Arc::clone(proxy.pool()), path.clone(), stopped.clone()));
    }
    let (reload_requests, mut reloads) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    if let Some(listener) = control {
        let control = Control::new(Arc::clone(&proxy), reload_requests);
        tasks.spawn(control::socket::serve(listener, control, stopped.clone()));
    }
    // READY=1 before the health checks start: its STATUS= (no worker checked yet) must not
    // arrive after, and overwrite, the first checks' results that the reporter sends.
    systemd::ready(&proxy.status_line());
    let checker = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(health::run(Arc::clone(proxy.pool()), proxy.kind(), move || {
            proxy.live().health_check
        }))
    };
    let reporter = tokio::spawn(report_status(Arc::clone(&proxy)));
    let pruner = tokio::spawn(prune(Arc::clone(&proxy)));
    if let Some(interval) = systemd::watchdog_interval() {
        systemd::spawn_watchdog(interval);
    }

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let _ = reload(source, &mut settings, &telemetry, &proxy);
            }
            Some(reply) = reloads.recv() => {
                let _ = reply.send(reload(source, &mut settings, &telemetry, &proxy));
            }
        }
    }
    // Reloads asked for from now on are answered "shutting down".
    drop(reloads);

    // Stop admitting before announcing it, so nothing arrives in between.
    proxy.pool().close();
    serving.store(false, Ordering::SeqCst);
    drain(&proxy, settings.grace_period, settings.graceful_shutdown_timeout).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(settings.graceful_shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    checker.abort();
    reporter.abort();
    pruner.abort();
    info!("stopped");
    telemetry.shutdown();
    Ok(())
}

/// Lets queued and running requests finish within `grace_period`; the pool admits nothing new.
async fn drain(proxy: &Proxy, grace_period: Duration, shutdown_timeout: Duration) {
    let in_flight = proxy.pool().in_flight();
    info!(in_flight, grace_period = ?grace_period, "stopping: admitting nothing new; finishing queued and running requests");
    systemd::stopping(
        &format!("stopping: {in_flight} requests to finish"),
        grace_period + shutdown_timeout,
    );
    let mut changed = proxy.pool().subscribe();
    let drained = tokio::time::timeout(grace_period, async {
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

/// Descriptors the proxy may need: one per client connection (all ports together), a channel and
/// a health check's per worker, and the runtime's own (journal, control socket, state file).
fn descriptor_headroom(settings: &ProxySettings) {
    let needed =
        settings.client_bounds.max_connections as u64 + 2 * settings.max_workers as u64 + 64;
    crate::process::descriptor_headroom(needed, "max_connections and max_workers");
}

/// SIGHUP or the control plane's `Reload`: re-reads file and environment; reconciles the
/// configured workers (run-time additions stay), applies live settings and names those that need
/// a restart. A broken file changes nothing. Returns what changed, or why nothing did.
fn reload(
    source: &ProxyConfigSource,
    settings: &mut ProxySettings,
    telemetry: &Telemetry,
    proxy: &Proxy,
) -> Result<String, String> {
    systemd::reloading();
    let new = match source.load() {
        Ok(new) => new,
        Err(err) => {
            error!("reload failed; the running configuration stays in force: {err}");
            let first = err.problems.first().map_or("", String::as_str);
            systemd::ready(&format!("{}; reload failed: {first}", proxy.status_line()));
            return Err(err.to_string());
        }
    };
    let mut restart = Vec::new();
    if new.bind_address != settings.bind_address {
        restart.push("bind_address");
    }
    if new.port != settings.port {
        restart.push("port");
    }
    if new.status_bind_address != settings.status_bind_address {
        restart.push("status_bind_address");
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
    if new.control_socket != settings.control_socket {
        restart.push("control_socket");
    }
    if new.state_file != settings.state_file {
        restart.push("state_file");
    }
    if !restart.is_empty() {
        warn!(settings = %restart.join(", "), "changed settings take effect only after a restart");
    }
    let pool = proxy.pool();
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for worker in pool.snapshot() {
        if worker.origin == Origin::Config && !new.workers.contains(&worker.address) {
            pool.remove(&worker.address);
            info!(worker = %worker.address, "worker removed (no longer in the configuration)");
            removed.push(worker.address);
        }
    }
    for address in &new.workers {
        match pool.add(address, Origin::Config) {
            Ok(true) => {
                info!(worker = %address, "worker added from the configuration");
                added.push(address.clone());
            }
            Ok(false) => {}
            Err(err) => warn!(worker = %address, "worker from the configuration not added: {err}"),
        }
    }
    if new.log_filter != settings.log_filter
        && let Err(err) = telemetry.set_filter(&new.log_filter)
    {
        warn!(error = %err, "keeping the previous log filter");
    }
    proxy.set_live(&new);
    descriptor_headroom(&new);
    let kept = settings.clone();
    *settings = ProxySettings {
        prover_type: kept.prover_type,
        bind_address: kept.bind_address,
        status_bind_address: kept.status_bind_address,
        port: kept.port,
        status_port: kept.status_port,
        metrics_port: kept.metrics_port,
        control_socket: kept.control_socket,
        state_file: kept.state_file,
        ..new
    };
    let list = |workers: &[String]| {
        if workers.is_empty() { "none".to_owned() } else { workers.join(", ") }
    };
    let mut summary = format!(
        "configuration reloaded; workers added: {}; removed: {}",
        list(&added),
        list(&removed)
    );
    if !restart.is_empty() {
        summary.push_str("; needs a restart to change: ");
        summary.push_str(&restart.join(", "));
    }
    info!("{summary}");
    systemd::ready(&proxy.status_line());
    Ok(summary)
}
