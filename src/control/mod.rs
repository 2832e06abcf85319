//! The control plane: change a running proxy's workers without a restart, from the same machine
//! only.
//!
//! [`Control`] holds the plain operations (add, remove and list workers, reload, status); the
//! D-Bus interface in [`dbus`] is a one-line shim over each, served peer-to-peer (no bus daemon)
//! on a Unix socket that [`socket`] makes root-only twice over: by file modes and by checking
//! every caller's credentials. [`client`] is `minedctl`, the operator's side of the socket.

pub mod client;
pub mod dbus;
pub mod socket;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::info;
use zvariant::Type;

use crate::config::{InvalidWorkerAddress, WorkerAddress};
use crate::proxy::Proxy;
use crate::proxy::pool::Origin;

/// A reload asked for over the control socket, answered by the daemon's main loop (which owns
/// the configuration) with a summary or the reason it failed.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// Why a control operation was refused; each becomes a D-Bus error of the same name.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// An address that is not `host:port`; nothing was changed.
    #[error("{0}")]
    InvalidAddress(String),
    /// Removal of workers the proxy does not have; nothing was changed.
    #[error("{0}")]
    UnknownWorker(String),
    /// Adding would exceed `max_workers`; the workers named before it were added.
    #[error("{0}")]
    TooManyWorkers(String),
    /// The configuration could not be reloaded; the running one stays in force.
    #[error("reload failed; the running configuration stays in force: {0}")]
    ReloadFailed(String),
    /// The proxy is stopping and no longer reloads.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// One worker as `minedctl workers` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct WorkerInfo {
    /// `host:port`.
    pub address: String,
    /// "healthy", "unhealthy" or "unknown" (not checked yet).
    pub health: String,
    /// Why it is unhealthy; empty otherwise.
    pub reason: String,
    /// True while a request of this proxy runs on it.
    pub busy: bool,
    /// Requests this proxy finished on it.
    pub requests_served: u64,
    /// "config" (the file, environment or command line: a reload may remove it) or "runtime"
    /// (added over the control socket: kept across reloads).
    pub origin: String,
    /// The version the worker reported; empty until known.
    pub version: String,
    /// The DNS name it was found under (`host:port` as declared); empty for a worker declared by
    /// its address.
    pub name: String,
}

/// The control operations, shared by every control connection.
#[derive(Clone)]
pub struct Control {
    proxy: Arc<Proxy>,
    reload: mpsc::Sender<ReloadRequest>,
}

impl Control {
    /// Operations on `proxy`; reloads are sent to the daemon's main loop through `reload`.
    pub fn new(proxy: Arc<Proxy>, reload: mpsc::Sender<ReloadRequest>) -> Self {
        Control { proxy, reload }
    }

    /// Adds workers at run time; returns each address with `true` when it was added and `false`
    /// when it was already present. A malformed address rejects the whole call.
    pub fn add_workers(&self, addresses: &[String]) -> Result<Vec<(String, bool)>, ControlError> {
        let addresses: Vec<WorkerAddress> = addresses
            .iter()
            .map(|address| address.parse())
            .collect::<Result<_, InvalidWorkerAddress>>()
            .map_err(|err| ControlError::InvalidAddress(err.to_string()))?;
        let pool = self.proxy.pool();
        let mut outcome = Vec::with_capacity(addresses.len());
        for address in addresses {
            let added = pool.add(&address, Origin::Runtime).map_err(|full| {
                ControlError::TooManyWorkers(format!(
                    "{address} not added: {full}{}",
                    if outcome.is_empty() {
                        String::new()
                    } else {
                        let before: Vec<&str> =
                            outcome.iter().map(|(a, _): &(String, bool)| a.as_str()).collect();
                        format!("; the ones before it are in: {}", before.join(", "))
                    }
                ))
            })?;
            if added {
                info!(worker = %address, "worker added over the control socket");
            }
            outcome.push((address.into(), added));
        }
        Ok(outcome)
    }

    /// Removes workers; a request running on one finishes first. An address the proxy does not
    /// have rejects the whole call.
    pub fn remove_workers(&self, addresses: &[String]) -> Result<(), ControlError> {
        let pool = self.proxy.pool();
        let present: Vec<String> =
            pool.declared().into_iter().map(|(address, _)| address.to_string()).collect();
        let unknown: Vec<&str> =
            addresses.iter().filter(|a| !present.contains(a)).map(String::as_str).collect();
        if !unknown.is_empty() {
            return Err(ControlError::UnknownWorker(format!(
                "no such worker: {}; `minedctl workers` lists the present ones",
                unknown.join(", ")
            )));
        }
        for address in addresses {
            if pool.remove(address) {
                info!(worker = %address, "worker removed over the control socket");
            }
        }
        Ok(())
    }

    /// Every worker with its health, load and origin.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.proxy
            .pool()
            .snapshot()
            .into_iter()
            .map(|w| WorkerInfo {
                health: w.health.as_str().to_owned(),
                reason: w.health.reason().to_owned(),
                origin: w.origin.as_str().to_owned(),
                address: w.address,
                busy: w.busy,
                requests_served: w.served,
                version: w.version,
                name: w.name.unwrap_or_default(),
            })
            .collect()
    }

    /// The proxy's status as the JSON document `GET /status` serves.
    pub fn status(&self) -> String {
        self.proxy.status_json()
    }

    /// Re-reads the configuration, exactly as SIGHUP does; returns what changed.
    pub async fn reload(&self) -> Result<String, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.reload.send(reply).await.map_err(|_| ControlError::ShuttingDown)?;
        answer.await.map_err(|_| ControlError::ShuttingDown)?.map_err(ControlError::ReloadFailed)
    }
}
