//! The proxy as a systemd service: binds every listener (a taken port is an error naming the
//! setting), reports readiness and a live `STATUS=`, reloads on SIGHUP or the control plane's
//! `Reload`, and drains on SIGTERM. The one module that wires the control plane to the proxy it
//! drives.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use super::{DaemonError, Signal, Signals};
use crate::config::{ProxyConfigSource, ProxySettings, WorkerAddress};
use crate::control::{self, Control, ReloadRequest};
use crate::proxy::front::{self, Role};
use crate::proxy::pool::Origin;
use crate::proxy::{Proxy, health, limit, state};
use crate::systemd;
use crate::telemetry::Telemetry;

/// Runs a proxy from `source` until SIGTERM; the process entry point of `start-proxy`.
pub fn main(source: &ProxyConfigSource) -> ExitCode {
    super::run_daemon("miden-prover-proxy", source.load(), async |settings, telemetry| {
        run(source, settings, telemetry).await
    })
}

/// The proxy's listeners, bound before anything else starts.
struct Bound {
    main: TcpListener,
    status: TcpListener,
    metrics: Option<TcpListener>,
    control: Option<control::socket::ControlListener>,
}

impl Bound {
    fn bind(settings: &ProxySettings) -> Result<Self, DaemonError> {
        let at = |ip: IpAddr, port| SocketAddr::new(ip, port);
        let metrics = match settings.metrics_port {
            Some(port) => {
                Some(super::bind(at(settings.status_bind_address, port), "metrics_port")?)
            }
            None => None,
        };
        Ok(Self {
            main: super::bind(at(settings.bind_address, settings.port), "port")?,
            status: super::bind(
                at(settings.status_bind_address, settings.status_port),
                "status_port",
            )?,
            metrics,
            control: settings.control_socket.as_deref().map(control::socket::bind).transpose()?,
        })
    }

    /// Logs where each listener is.
    fn announce(&self, proxy: &Proxy, settings: &ProxySettings, telemetry: &Telemetry) {
        let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let control = self.control.as_ref().map(|c| c.path().display().to_string());
        info!(
            version = env!("CARGO_PKG_VERSION"),
            build = crate::cpu::BUILD,
            proof_type = %proxy.kind(),
            address = %local(&self.main),
            tls = if settings.tls.is_some() { "on" } else { "off" },
            status = %local(&self.status),
            metrics = %self.metrics.as_ref().map_or_else(|| "off".to_owned(), local),
            control = %control.unwrap_or_else(|| "off".to_owned()),
            workers = settings.workers.len(),
            logs = telemetry.destination,
            traces = if telemetry.exports_traces() { "otlp" } else { "off" },
            "proxy listening on {}",
            local(&self.main)
        );
        if proxy.pool().declared().is_empty() {
            warn!("no workers configured: requests get UNAVAILABLE until one is added");
        }
    }
}

/// The proxy's tasks once it serves.
struct Running {
    /// Listeners, the control socket and the state file's keeper: they end when `stop` is sent.
    tasks: JoinSet<()>,
    stop: watch::Sender<bool>,
    /// Whether the listeners admit new requests.
    serving: Arc<AtomicBool>,
    /// Health checks, `STATUS=` and the rate limiter's pruning: aborted at the end.
    background: Vec<JoinHandle<()>>,
}

impl Running {
    fn spawn(
        proxy: &Arc<Proxy>,
        bound: Bound,
        settings: &ProxySettings,
        reload_requests: mpsc::Sender<ReloadRequest>,
    ) -> Self {
        let serving = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let listeners = [
            (Role::Grpc, Some(bound.main)),
            (Role::Status, Some(bound.status)),
            (Role::Metrics, bound.metrics),
        ];
        for (role, listener) in listeners {
            if let Some(listener) = listener {
                let serving = Arc::clone(&serving);
                tasks.spawn(front::serve(
                    Arc::clone(proxy),
                    role,
                    listener,
                    serving,
                    stopped.clone(),
                ));
            }
        }
        if let Some(path) = &settings.state_file {
            tasks.spawn(state::keep(Arc::clone(proxy.pool()), path.clone(), stopped.clone()));
        }
        if let Some(listener) = bound.control {
            let control = Control::new(Arc::clone(proxy), reload_requests);
            tasks.spawn(control::socket::serve(listener, control, stopped));
        }
        Self { tasks, stop, serving, background: Vec::new() }
    }

    /// Starts the health checks, the `STATUS=` reporter and the rate limiter's pruning.
    fn spawn_background(&mut self, proxy: &Arc<Proxy>) {
        let checked = Arc::clone(proxy);
        self.background.push(tokio::spawn(health::run(
            Arc::clone(proxy.pool()),
            proxy.kind(),
            move || checked.live().health_check,
        )));
        self.background.push(tokio::spawn(report_status(Arc::clone(proxy))));
        self.background.push(tokio::spawn(prune(Arc::clone(proxy))));
    }

    /// Stops admitting, lets what is queued and running finish within the grace period, then
    /// closes every listener.
    async fn stop(mut self, proxy: &Proxy, settings: &ProxySettings) {
        // Stop admitting before announcing it, so nothing arrives in between.
        proxy.pool().close();
        self.serving.store(false, Ordering::SeqCst);
        drain(proxy, settings.grace_period, settings.graceful_shutdown_timeout).await;
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(settings.graceful_shutdown_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        for task in self.background {
            task.abort();
        }
        info!("stopped");
    }
}

async fn run(
    source: &ProxyConfigSource,
    settings: &mut ProxySettings,
    telemetry: &Telemetry,
) -> Result<(), DaemonError> {
    let bound = Bound::bind(settings)?;
    let mut signals = Signals::install()?;
    descriptor_headroom(settings);
    let proxy = Proxy::new(settings);
    if let Some(path) = &settings.state_file {
        state::restore(proxy.pool(), path);
    }
    bound.announce(&proxy, settings, telemetry);
    let (reload_requests, mut reloads) = mpsc::channel::<ReloadRequest>(4);
    let mut running = Running::spawn(&proxy, bound, settings, reload_requests);
    // READY=1 before the health checks start: its STATUS= (no worker checked yet) must not
    // arrive after, and overwrite, the first checks' results that the reporter sends.
    super::announce_ready(&proxy.status_line());
    running.spawn_background(&proxy);

    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => {
                    let _ = reload(source, settings, telemetry, &proxy);
                }
            },
            Some(reply) = reloads.recv() => {
                let _ = reply.send(reload(source, settings, telemetry, &proxy));
            }
        }
    }
    // Reloads asked for from now on are answered "shutting down".
    drop(reloads);
    running.stop(&proxy, settings).await;
    Ok(())
}

/// Lets queued and running requests finish within `grace_period`; the pool admits nothing new.
async fn drain(proxy: &Proxy, grace_period: Duration, shutdown_timeout: Duration) {
    let in_flight = proxy.pool().in_flight();
    super::announce_stopping(
        &format!("stopping: admitting nothing new; {in_flight} requests to finish"),
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

/// How often `STATUS=` is rewritten, at most.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// Keeps `STATUS=` current: "2/3 workers healthy, queue 1/10". A change is reported at once
/// after a quiet spell, then at most every [`STATUS_EVERY`] with the latest state: a busy proxy
/// changes its queue on every request, and each line is a message for the service manager to
/// read and a wake-up of this task on the request's path.
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
        // Changes meanwhile mark the channel, and the next turn reports the state they left.
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// Forgets the rate limiter's idle clients every `PRUNE_INTERVAL`, forever.
async fn prune(proxy: Arc<Proxy>) {
    let mut every = tokio::time::interval(limit::PRUNE_INTERVAL);
    loop {
        every.tick().await;
        proxy.prune_limiter();
    }
}

/// Descriptors the proxy may need: one per client connection (all ports together), a channel and
/// a health check's per worker, and the runtime's own (journal, control socket, state file).
fn descriptor_headroom(settings: &ProxySettings) {
    let needed =
        settings.client_bounds.max_connections as u64 + 2 * settings.max_workers as u64 + 64;
    super::descriptor_headroom(needed, "max_connections and max_workers");
}

/// SIGHUP or the control plane's `Reload`: reconciles the configured workers (run-time additions
/// stay) and applies the live settings. A broken file changes nothing. Returns what changed, or
/// why nothing did.
fn reload(
    source: &ProxyConfigSource,
    settings: &mut ProxySettings,
    telemetry: &Telemetry,
    proxy: &Proxy,
) -> Result<String, String> {
    super::reload(
        settings,
        || source.load(),
        telemetry,
        || proxy.status_line(),
        |_, new| {
            let (added, removed) = reconcile_workers(proxy, &new.workers);
            proxy.set_live(new);
            descriptor_headroom(new);
            let list = |workers: &[String]| {
                if workers.is_empty() { "none".to_owned() } else { workers.join(", ") }
            };
            format!("; workers added: {}; removed: {}", list(&added), list(&removed))
        },
    )
}

/// Makes the pool's configured workers `configured`, leaving those added at run time; returns
/// the addresses added and removed.
fn reconcile_workers(proxy: &Proxy, configured: &[WorkerAddress]) -> (Vec<String>, Vec<String>) {
    let pool = proxy.pool();
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for (address, origin) in pool.declared() {
        if origin == Origin::Config && !configured.contains(&address) {
            pool.remove(address.as_str());
            info!(worker = %address, "worker removed (no longer in the configuration)");
            removed.push(address.to_string());
        }
    }
    for address in configured {
        match pool.add(address, Origin::Config) {
            Ok(true) => {
                info!(worker = %address, "worker added from the configuration");
                added.push(address.to_string());
            }
            Ok(false) => {}
            Err(err) => warn!(worker = %address, "worker from the configuration not added: {err}"),
        }
    }
    (added, removed)
}
