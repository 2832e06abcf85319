//! What happens between `main` and `exit`, for both daemons: load the configuration (exit 78 when
//! it is broken, before anything is bound), start the async runtime and logging, report readiness
//! and keep the watchdog fed, turn SIGTERM/SIGINT into a drain and SIGHUP into a reload (re-read,
//! name what needs a restart, apply the rest, report `READY=1` or "reload failed"), and turn the
//! outcome into an exit status with the whole cause chain on stderr and in the log.
//!
//! Each daemon supplies only what differs: [`worker`] binds one gRPC listener and serves it;
//! [`proxy`] binds its ports and the control socket, and is the one module that sees both the
//! proxy and the control plane that drives it.

pub mod proxy;
pub mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{ConfigError, Reloadable};
use crate::systemd;
use crate::telemetry::{LogEvery, Telemetry, more_since};

/// Exit status for an invalid configuration (`EX_CONFIG` from sysexits.h), so a unit can set
/// `RestartPreventExitStatus=78` instead of restarting into the same error.
pub const EXIT_CONFIG: u8 = 78;

/// Why a daemon stopped with an error.
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
    /// The worker's gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// This binary's path, which the worker's prover processes run, is unknown.
    #[error("cannot find this program's own path to start prover processes")]
    OwnPath(#[source] std::io::Error),
    /// The proxy's control socket could not be created.
    #[error(transparent)]
    Control(#[from] crate::control::socket::SocketError),
}

/// Runs a daemon named `name` (for messages and the journal) with the settings `load` returns,
/// logging through a [`Telemetry`] started with their log filter and flushed at the end.
pub fn run_daemon<S: Reloadable>(
    name: &'static str,
    load: Result<S, ConfigError>,
    run: impl AsyncFnOnce(&mut S, &Telemetry) -> Result<(), DaemonError>,
) -> ExitCode {
    let mut settings = match load {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let result = match Telemetry::init(name, settings.log_filter()) {
            Ok(telemetry) => {
                let result = run(&mut settings, &telemetry).await;
                telemetry.shutdown();
                result
            }
            Err(err) => Err(err.into()),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!("{message}");
                eprintln!("{name}: {message}");
                ExitCode::FAILURE
            }
        }
    });
    // A proof abandoned after the grace period must not hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// Connections the kernel holds for a listener before it accepts them: a burst of new clients
/// (or an accept loop paused out of descriptors) waits here rather than having its SYNs dropped
/// and retried a second later. The kernel caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds the TCP listener of `setting` (a taken port is an error naming it), with a backlog of
/// [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr, setting: &'static str) -> Result<TcpListener, DaemonError> {
    let listen = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| DaemonError::Bind { addr, setting, source })
}

/// What a signal asks of a daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop taking work, finish what runs within the grace period, exit.
    Stop,
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// The signals a daemon answers, installed before it reports readiness.
pub struct Signals {
    terminate: UnixSignal,
    interrupt: UnixSignal,
    hangup: UnixSignal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> Result<Self, DaemonError> {
        let install = |kind| signal(kind).map_err(DaemonError::Signals);
        Ok(Self {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// The next signal to act on.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.terminate.recv() => Signal::Stop,
            _ = self.interrupt.recv() => Signal::Stop,
            _ = self.hangup.recv() => Signal::Reload,
        }
    }
}

/// Tells the service manager the daemon is ready, with its status line, and starts the watchdog
/// pings when the unit asks for them.
pub fn announce_ready(status: &str) {
    systemd::ready(status);
    if let Some(interval) = systemd::watchdog_interval() {
        systemd::spawn_watchdog(interval);
    }
}

/// Announces a drain that may take up to `expected`, in the log and to the service manager.
pub fn announce_stopping(status: &str, expected: Duration) {
    info!(grace_period = ?expected, "{status}");
    systemd::stopping(status, expected);
}

/// The reload both daemons run on SIGHUP (and the proxy on the control plane's `Reload`):
/// announces it, re-reads the configuration with `load`, and either applies it or keeps
/// the running configuration whole when it is broken.
///
/// Applying names the settings that need a restart, swaps the log filter (keeping the old one if
/// the new one cannot be installed), lets `apply` hand the new settings to the running service
/// (it returns what it changed, for the summary), then keeps the live settings. Either way the
/// service manager gets `READY=1` with `status()`, followed by "reload failed: …" when it failed.
/// Returns the summary, or the configuration's problems.
pub fn reload<S: Reloadable>(
    settings: &mut S,
    load: impl FnOnce() -> Result<S, ConfigError>,
    telemetry: &Telemetry,
    status: impl Fn() -> String,
    apply: impl FnOnce(&S, &S) -> String,
) -> Result<String, String> {
    systemd::reloading();
    let mut new = match load() {
        Ok(new) => new,
        Err(err) => {
            error!("reload failed; the running configuration stays in force: {err}");
            let first = err.problems.first().map_or("", String::as_str);
            systemd::ready(&format!("{}; reload failed: {first}", status()));
            return Err(err.to_string());
        }
    };
    let restart = settings.restart_only_changes(&new);
    if !restart.is_empty() {
        warn!(settings = %restart.join(", "), "changed settings take effect only after a restart");
    }
    if new.log_filter() != settings.log_filter()
        && let Err(err) = telemetry.set_filter(new.log_filter())
    {
        warn!(error = %err, "keeping the previous log filter");
        new.log_filter().clone_from(settings.log_filter());
    }
    let mut summary = format!("configuration reloaded{}", apply(settings, &new));
    settings.apply_live(new);
    if !restart.is_empty() {
        summary.push_str("; needs a restart to change: ");
        summary.push_str(&restart.join(", "));
    }
    info!("{summary}");
    systemd::ready(&status());
    Ok(summary)
}

/// "outer: cause: root cause", so the client and the log see why, not only what.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Makes room for `needed` descriptors, what `settings` (named in the warning) may open: raises
/// the soft `RLIMIT_NOFILE` to the hard one (systemd's default soft limit is 1024; the units set
/// both higher) and warns when even that is short, since running out means refused connections,
/// not a crash (accept errors pause accepting). Returns whether the limit leaves that room.
pub fn descriptor_headroom(needed: u64, settings: &str) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return true };
    let mut limit = soft;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::info!(
            from = soft,
            to = hard,
            "raised the descriptor limit (RLIMIT_NOFILE) to its maximum"
        );
        limit = hard;
    }
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "{settings} need more descriptors than RLIMIT_NOFILE allows; lower them or raise \
             LimitNOFILE= in the unit"
        );
    }
    limit >= needed
}

/// How long accepting pauses after an accept error, rather than spinning.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How often an accept error is logged at warn, at most; the others are counted in that line.
pub const ACCEPT_ERRORS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// After an accept error (EMFILE and friends: out of descriptors) a listener stays readable, so
/// the accept loop waits [`ACCEPT_PAUSE`] rather than spin; `warnings` (one per listener, made
/// with [`ACCEPT_ERRORS_LOGGED_EVERY`]) keeps it to a line every ten seconds.
pub async fn pause_accepting(err: &std::io::Error, warnings: &LogEvery) {
    if let Some(unlogged) = warnings.occurred() {
        warn!(
            error = %err,
            "cannot accept connections; pausing accepts for {} at a time{}",
            humantime::format_duration(ACCEPT_PAUSE),
            more_since(unlogged)
        );
    } else {
        tracing::debug!(error = %err, "cannot accept a connection");
    }
    tokio::time::sleep(ACCEPT_PAUSE).await;
}
