//! The versioned D-Bus interface `org.miden.ProverProxy1` at `/org/miden/ProverProxy`: one line
//! per method into [`Control`], errors mapped in one place, and the client proxy `minedctl` uses.
//!
//! Independent clients work too:
//! `dbus-send --peer=unix:path=/run/miden-prover-proxy/control.sock --print-reply
//! /org/miden/ProverProxy org.miden.ProverProxy1.AddWorkers array:string:10.0.0.7:50051`.

use super::{Control, ControlError, WorkerInfo};

/// The interface name; a new major version of the interface gets a new name.
pub const INTERFACE: &str = "org.miden.ProverProxy1";

/// Where the interface is served.
pub const OBJECT_PATH: &str = "/org/miden/ProverProxy";

/// The D-Bus errors of the interface, named `org.miden.ProverProxy1.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.miden.ProverProxy1.Error")]
pub enum Error {
    /// A D-Bus protocol error.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An address is not `host:port`.
    InvalidAddress(String),
    /// A worker to remove is not present.
    UnknownWorker(String),
    /// The proxy holds `max_workers` workers already.
    TooManyWorkers(String),
    /// The configuration file or environment is broken; nothing changed.
    ReloadFailed(String),
    /// The proxy is stopping.
    ShuttingDown(String),
}

impl From<ControlError> for Error {
    fn from(err: ControlError) -> Self {
        let message = err.to_string();
        match err {
            ControlError::InvalidAddress(_) => Error::InvalidAddress(message),
            ControlError::UnknownWorker(_) => Error::UnknownWorker(message),
            ControlError::TooManyWorkers(_) => Error::TooManyWorkers(message),
            ControlError::ReloadFailed(_) => Error::ReloadFailed(message),
            ControlError::ShuttingDown => Error::ShuttingDown(message),
        }
    }
}

/// The served object.
pub(super) struct Interface {
    pub(super) control: Control,
}

// zbus hands each method its arguments deserialised into owned values.
#[allow(clippy::needless_pass_by_value)]
#[zbus::interface(name = "org.miden.ProverProxy1")]
impl Interface {
    /// Adds workers (`host:port`); returns each with true if added, false if already present.
    fn add_workers(&self, addresses: Vec<String>) -> Result<Vec<(String, bool)>, Error> {
        Ok(self.control.add_workers(&addresses)?)
    }

    /// Removes workers; requests running on them finish first.
    fn remove_workers(&self, addresses: Vec<String>) -> Result<(), Error> {
        Ok(self.control.remove_workers(&addresses)?)
    }

    /// Every worker: address, health, reason, busy, requests served, origin, version.
    fn list_workers(&self) -> Vec<WorkerInfo> {
        self.control.workers()
    }

    /// Re-reads the configuration file and environment, like `systemctl reload`.
    async fn reload(&self) -> Result<String, Error> {
        Ok(self.control.reload().await?)
    }

    /// The status document (JSON) that `GET /status` serves.
    fn status(&self) -> String {
        self.control.status()
    }
}

/// The client side of [`INTERFACE`], for `minedctl`.
#[zbus::proxy(
    interface = "org.miden.ProverProxy1",
    // Peer-to-peer: no bus routes by this name and the server registers none; zbus wants one.
    default_service = "org.miden.ProverProxy",
    default_path = "/org/miden/ProverProxy",
    gen_blocking = false
)]
pub trait ProverProxy1 {
    /// See the server's `AddWorkers`.
    fn add_workers(&self, addresses: &[String]) -> zbus::Result<Vec<(String, bool)>>;
    /// See the server's `RemoveWorkers`.
    fn remove_workers(&self, addresses: &[String]) -> zbus::Result<()>;
    /// See the server's `ListWorkers`.
    fn list_workers(&self) -> zbus::Result<Vec<WorkerInfo>>;
    /// See the server's `Reload`.
    fn reload(&self) -> zbus::Result<String>;
    /// See the server's `Status`.
    fn status(&self) -> zbus::Result<String>;
}
