//! The service manager protocol: `READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1` and watchdog
//! pings. Every call is a no-op when `NOTIFY_SOCKET` is unset, so the daemons run the same way by
//! hand and under systemd. The socket is made once and kept, so a daemon out of descriptors still
//! reports. Send failures are logged (at most once a minute), never fatal: a daemon that proves
//! correctly but cannot reach its supervisor should keep proving.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::telemetry::{LogEvery, more_since};

/// Tells the service manager that start-up (or a reload) is complete, with a one-line status.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Announces a configuration reload; systemd 252 wants `MONOTONIC_USEC` beside `RELOADING=1`.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(err) => {
            tracing::warn!(%err, "cannot read the monotonic clock for MONOTONIC_USEC");
            send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
        }
    }
}

/// Announces that the daemon is shutting down and will take up to `expected` to do it: the
/// service manager's stop timeout is extended to that plus a margin (`EXTEND_TIMEOUT_USEC`, which
/// only ever lengthens it), so a grace period raised in the configuration, even by a reload, is
/// not cut short by the unit's `TimeoutStopSec=` with a SIGKILL.
pub fn stopping(status: &str, expected: Duration) {
    let usec = (expected + STOP_MARGIN).as_micros().min(u128::from(u32::MAX));
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(status),
        NotifyState::ExtendTimeoutUsec(u32::try_from(usec).unwrap_or(u32::MAX)),
    ]);
}

/// Time for what follows the grace period: closing connections, flushing logs and traces.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// The interval at which to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when the service manager
/// asked for pings and `WATCHDOG_PID`, if set, names this process (`sd_watchdog_enabled(3)`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&usec| usec > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `interval` for as long as the runtime lives. The pings come from the
/// async runtime, so a wedged runtime stops them and systemd restarts the daemon.
pub fn spawn_watchdog(interval: Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

/// The datagram socket to the service manager, made at the first message and kept: a daemon out
/// of descriptors still reaches it. (A socket per message, as `sd_notify::notify` makes, fails
/// with `EMFILE` then, and missed `WATCHDOG=1` pings would have systemd kill a daemon that is
/// only waiting for descriptors to come back.)
static SOCKET: Mutex<Option<UnixDatagram>> = Mutex::new(None);

/// Failures to notify, logged at most once a minute.
static FAILURES: LogEvery = LogEvery::new(Duration::from_secs(60));

fn send(states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let mut message = String::new();
    for state in states {
        let _ = writeln!(message, "{state}");
    }
    let mut socket = SOCKET.lock().unwrap_or_else(PoisonError::into_inner);
    let sent = match socket.as_ref().map(|socket| socket.send(message.as_bytes())) {
        Some(Ok(_)) => Ok(()),
        // None made yet, or the manager's socket was made anew (systemd re-executed): connect
        // again.
        _ => connect(&path).and_then(|made| {
            let sent = made.send(message.as_bytes()).map(drop);
            *socket = Some(made);
            sent
        }),
    };
    drop(socket);
    if let Err(err) = sent {
        if let Some(unlogged) = FAILURES.occurred() {
            tracing::warn!(%err, "cannot notify the service manager{}", more_since(unlogged));
        } else {
            tracing::debug!(%err, "cannot notify the service manager");
        }
    }
}

/// A datagram socket connected to `NOTIFY_SOCKET`: a path, or `@name` in the abstract namespace.
fn connect(path: &OsStr) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => socket.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => socket.connect(path)?,
    }
    Ok(socket)
}
