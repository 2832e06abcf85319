//! `minedctl`, the operator's side of the control socket: one D-Bus call per command, and
//! messages a person can act on. Exit status: 0 done, 1 failed, 2 usage (from clap).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::net::UnixStream;
use zbus::proxy::CacheProperties;

use super::WorkerInfo;
use super::dbus::ProverProxy1Proxy;
use crate::config::DEFAULT_CONTROL_SOCKET;
use crate::proxy::status::{ProofCacheStatus, StatusDocument};

/// How long one call may take; a reload re-reads a file, nothing here should take long.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Change a running miden-prover-proxy's workers, reload it and read its status, over its
/// root-only control socket.
#[derive(Debug, Parser)]
#[command(name = "minedctl", version = crate::cpu::LONG_VERSION)]
pub struct CtlCli {
    /// The proxy's control socket (its setting `control_socket`).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "MPS_CONTROL_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Add workers (host:port); each takes requests once a health check passes. Workers added
    /// here stay across reloads; the configuration file's list is reconciled around them.
    #[command(visible_alias = "add-workers")]
    AddWorker {
        /// Worker addresses, host:port.
        #[arg(required = true, value_name = "ADDR")]
        workers: Vec<String>,
    },
    /// Remove workers; a request running on one finishes first. A worker from the
    /// configuration file comes back on the next reload unless the file drops it too.
    #[command(visible_alias = "remove-workers")]
    RemoveWorker {
        /// Worker addresses, host:port, as `minedctl workers` shows them.
        #[arg(required = true, value_name = "ADDR")]
        workers: Vec<String>,
    },
    /// List the workers: health, whether busy, requests served, and where each came from.
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the proxy's status: workers, queue, requests served.
    Status {
        /// Print the status document as JSON (the same as `GET /status`).
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration file and environment, as `systemctl reload` does.
    Reload,
}

/// Runs one command against the proxy at `socket`, printing its result or a message on stderr.
pub fn run(socket: &Path, command: &CtlCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("minedctl: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(socket, command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("minedctl: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, makes the call and renders its answer.
async fn execute(socket: &Path, command: &CtlCommand) -> Result<String, String> {
    let (_connection, proxy) = connect(socket).await?;
    let call = async {
        match command {
            CtlCommand::AddWorker { workers } => {
                let outcome = proxy.add_workers(workers).await.map_err(call_error)?;
                Ok(outcome
                    .into_iter()
                    .map(|(address, added)| {
                        if added {
                            format!("added worker {address}\n")
                        } else {
                            format!("worker {address} is already present\n")
                        }
                    })
                    .collect())
            }
            CtlCommand::RemoveWorker { workers } => {
                proxy.remove_workers(workers).await.map_err(call_error)?;
                Ok(workers
                    .iter()
                    .fold(String::new(), |text, address| text + "removed worker " + address + "\n"))
            }
            CtlCommand::Workers { json } => {
                let workers = proxy.list_workers().await.map_err(call_error)?;
                Ok(if *json { to_json(&workers) } else { table(&workers) })
            }
            CtlCommand::Status { json } => {
                let status = proxy.status().await.map_err(call_error)?;
                let document: StatusDocument = serde_json::from_str(&status).map_err(|err| {
                    format!("the proxy sent a status this minedctl cannot read: {err}")
                })?;
                Ok(if *json { to_json(&document) } else { summary(&document) })
            }
            CtlCommand::Reload => {
                let summary = proxy.reload().await.map_err(call_error)?;
                Ok(format!("{summary}\n"))
            }
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| {
        format!(
            "the proxy at {} did not answer within {} s",
            socket.display(),
            CALL_TIMEOUT.as_secs()
        )
    })?
}

/// Opens the socket and the D-Bus peer-to-peer connection, turning each way it can fail into
/// what the operator should do about it.
async fn connect(socket: &Path) -> Result<(zbus::Connection, ProverProxy1Proxy<'static>), String> {
    let path = socket.display();
    let stream = UnixStream::connect(socket).await.map_err(|err| match err.kind() {
        ErrorKind::PermissionDenied => {
            format!("the control socket {path} is root-only; run with sudo")
        }
        ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::NotADirectory => {
            format!("no proxy is listening at {path} — is miden-prover-proxy running?")
        }
        _ => format!("cannot connect to the control socket {path}: {err}"),
    })?;
    let connection =
        zbus::connection::Builder::unix_stream(stream).p2p().build().await.map_err(|err| {
            // The proxy hangs up on callers it does not admit before saying anything.
            if is_hang_up(&err) {
                let uid = nix::unistd::geteuid();
                format!(
                    "the proxy at {path} refused this user (uid {uid}): the control socket is \
                     root-only; run with sudo"
                )
            } else {
                format!("no D-Bus handshake with the proxy at {path}: {err}")
            }
        })?;
    let proxy = ProverProxy1Proxy::builder(&connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(|err| format!("cannot use the control interface at {path}: {err}"))?;
    Ok((connection, proxy))
}

fn is_hang_up(err: &zbus::Error) -> bool {
    match err {
        zbus::Error::InputOutput(io) => matches!(
            io.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        zbus::Error::Handshake(message) => {
            message.contains("EOF") || message.contains("reset") || message.contains("closed")
        }
        _ => false,
    }
}

/// The proxy's own message for a refused call; its D-Bus error name otherwise.
fn call_error(err: zbus::Error) -> String {
    match err {
        zbus::Error::MethodError(_, Some(message), _) => message,
        zbus::Error::MethodError(name, None, _) => name.to_string(),
        other => format!("the control call failed: {other}"),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|err| err.to_string());
    text.push('\n');
    text
}

/// The workers as an aligned table.
fn table(workers: &[WorkerInfo]) -> String {
    if workers.is_empty() {
        return "no workers; add one with `minedctl add-worker HOST:PORT`\n".to_owned();
    }
    let rows: Vec<[String; 6]> = workers
        .iter()
        .map(|w| {
            [
                if w.name.is_empty() {
                    w.address.clone()
                } else {
                    format!("{} ({})", w.address, w.name)
                },
                w.health.clone(),
                if w.busy { "yes" } else { "no" }.to_owned(),
                w.requests_served.to_string(),
                w.origin.clone(),
                w.reason.clone(),
            ]
        })
        .collect();
    let header = ["ADDRESS", "HEALTH", "BUSY", "SERVED", "ORIGIN", "REASON"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> =
            row.iter().zip(widths).map(|(cell, width)| format!("{cell:width$}")).collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// "transaction proxy 0.1.0: 2/3 workers healthy, 1 busy; queue 0/10; 42 requests served",
/// and a line on the proof cache.
fn summary(status: &StatusDocument) -> String {
    format!(
        "{} proxy {}: {}/{} workers healthy, {} busy; queue {}/{}; {} requests served\n",
        status.prover_type.to_lowercase(),
        status.version,
        status.healthy(),
        status.workers.len(),
        status.busy(),
        status.queue.length,
        status.queue.max,
        status.requests_served,
    ) + &proof_cache_line(&status.proof_cache)
}

/// "proof cache: 3 proofs, 252 KB of 64 MiB, kept 5m; 5 hits, 2 joins, 4 misses, 0 evictions".
fn proof_cache_line(cache: &ProofCacheStatus) -> String {
    let ttl = std::time::Duration::from_secs(cache.ttl_seconds);
    let kept = if cache.max_bytes == 0 || ttl.is_zero() {
        "off (identical running requests are still shared)".to_owned()
    } else {
        format!(
            "{} proofs, {} of {}, kept {}",
            cache.proofs,
            size(cache.bytes as u64),
            size(cache.max_bytes as u64),
            humantime::format_duration(ttl)
        )
    };
    format!(
        "proof cache: {kept}; {} hits, {} joins, {} misses, {} evictions\n",
        cache.hits, cache.joins, cache.misses, cache.evictions
    )
}

/// Bytes in binary units: "252.0 KiB" (a display: precision beyond 2^52 bytes does not matter).
#[allow(clippy::cast_precision_loss)]
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} B"),
    }
}
