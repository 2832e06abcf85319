//! Command-line interface of `miden-proving-service`, kept compatible with upstream's
//! (`start-worker --port 8082 --prover-type transaction`). Flags override the file and the
//! environment (see [`crate::config`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::{
    ConfigFile, DEFAULT_CONTROL_SOCKET, DEFAULT_PROXY_CONFIG, DEFAULT_WORKER_CONFIG, Flags,
    ProxyConfigSource, WorkerConfigSource,
};

/// The Miden proving service: a gRPC prover worker for transactions, batches or blocks.
#[derive(Debug, Parser)]
#[command(name = "miden-proving-service", version = crate::cpu::LONG_VERSION, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a worker that proves one kind of request at a time.
    StartWorker(WorkerArgs),
    /// Start a proxy that queues requests and spreads them over workers.
    StartProxy(ProxyArgs),
    /// Add workers to a running proxy over its control socket (as `minedctl add-worker`).
    #[command(visible_alias = "add-worker")]
    AddWorkers(ControlArgs),
    /// Remove workers from a running proxy over its control socket (as `minedctl remove-worker`).
    #[command(visible_alias = "remove-worker")]
    RemoveWorkers(ControlArgs),
    /// A worker's prover process: proves the one request on stdin (started by the worker only).
    #[command(hide = true)]
    ProveJob(ProveJobArgs),
}

/// `prove-job`: what the worker tells each prover process it starts.
#[derive(Debug, Args)]
pub struct ProveJobArgs {
    /// The proof type to prove.
    #[arg(long, value_name = "TYPE")]
    pub prover_type: crate::ProofKind,
    /// Address-space limit in bytes.
    #[arg(long, value_name = "BYTES")]
    pub memory_limit: u64,
    /// The worker's pid: the process exits at once if the worker is already gone.
    #[arg(long, value_name = "PID")]
    pub parent: u32,
}

/// `add-workers` / `remove-workers` (or `add-worker` / `remove-worker`, as upstream's usage line
/// spells them): upstream's commands, here over the root-only control socket.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Worker addresses, host:port.
    #[arg(required = true, value_name = "ADDR")]
    pub workers: Vec<String>,
    /// The proxy's control socket (its setting `control_socket`).
    #[arg(long, value_name = "PATH", env = "MPS_CONTROL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
    /// Upstream's TCP control port; gone: the proxy listens on a root-only Unix socket instead.
    #[arg(long, hide = true, value_name = "PORT")]
    pub control_port: Option<u16>,
}

impl ControlArgs {
    /// Refuses upstream's `--control-port` with what to use instead.
    pub fn check(&self) -> Result<(), String> {
        match self.control_port {
            Some(port) => Err(format!(
                "--control-port {port}: the proxy has no control port any more; it listens on the \
                 root-only Unix socket {} (--socket PATH); run as root",
                self.socket.display()
            )),
            None => Ok(()),
        }
    }
}

/// `start-worker` flags; each overrides `MPS_WORKER_*` and the file. They serialise as the
/// command-line layer of the configuration: each field is named as the setting it overrides, and
/// a flag left out serialises to nothing.
#[derive(Debug, Args, Serialize)]
pub struct WorkerArgs {
    /// TCP port to listen on (0: any free port) [file: `port`, env: `MPS_WORKER_PORT`, default 50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Listen on 127.0.0.1 only [file: `localhost`, env: `MPS_WORKER_LOCALHOST`].
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub localhost: bool,
    /// Proof type to serve: transaction, batch or block
    /// [file: `prover_type`, env: `MPS_WORKER_PROVER_TYPE`, default transaction].
    #[arg(long, visible_alias = "proof-type", value_name = "TYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prover_type: Option<String>,
    /// Configuration file [default: /etc/miden-prover/worker.toml, skipped when absent].
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl WorkerArgs {
    /// The configuration sources these flags describe.
    pub fn config_source(&self) -> WorkerConfigSource {
        WorkerConfigSource {
            file: ConfigFile::new(self.config.clone(), DEFAULT_WORKER_CONFIG),
            flags: Flags::new(self),
        }
    }
}

/// `start-proxy` flags; each overrides `MPS_*` and the file. They serialise as the command-line
/// layer of the configuration, as [`WorkerArgs`] do.
#[derive(Debug, Args, Serialize)]
pub struct ProxyArgs {
    /// Workers as `host:port`; given here they replace the file's `workers` list.
    #[arg(value_name = "WORKER")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    /// Proof type to serve: transaction, batch or block [file: `prover_type`, env: `MPS_PROVER_TYPE`].
    #[arg(long, visible_alias = "proof-type", value_name = "TYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prover_type: Option<String>,
    /// Address every listener binds [file: `bind_address`, env: `MPS_BIND_ADDRESS`, default 0.0.0.0].
    #[arg(long, value_name = "IP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<String>,
    /// gRPC and gRPC-web port [file: `port`, env: `MPS_PORT`, default 8082].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// JSON status port [file: `status_port`, env: `MPS_STATUS_PORT`, default 8083].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_port: Option<u16>,
    /// Prometheus metrics port [file: `metrics_port`, env: `MPS_METRICS_PORT`, default off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// Configuration file [default: /etc/miden-prover-proxy/proxy.toml, skipped when absent].
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl ProxyArgs {
    /// The configuration sources these flags describe.
    pub fn config_source(&self) -> ProxyConfigSource {
        ProxyConfigSource {
            file: ConfigFile::new(self.config.clone(), DEFAULT_PROXY_CONFIG),
            flags: Flags::new(self),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use figment::Jail;

    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("miden-proving-service").chain(args.iter().copied()))
            .expect("valid command line")
            .command
    }

    #[test]
    fn every_proxy_flag_is_a_setting_and_beats_the_environment() {
        let Command::StartProxy(args) = parse(&[
            "start-proxy",
            "--proof-type",
            "batch",
            "--bind-address",
            "127.0.0.1",
            "--port",
            "1",
            "--status-port",
            "2",
            "--metrics-port",
            "3",
            "--config",
            "none.toml",
            "h:4",
        ]) else {
            panic!("start-proxy");
        };
        Jail::expect_with(|jail| {
            jail.set_env("MPS_PORT", "5");
            let mut source = args.config_source();
            source.file.explicit = false;
            let settings = source.load().expect("every flag names a known key");
            assert_eq!(settings.prover_type, crate::ProofKind::Batch);
            assert!(settings.bind_address.is_loopback());
            assert_eq!((settings.port, settings.status_port), (1, 2));
            assert_eq!(settings.metrics_port, Some(3));
            assert_eq!(settings.workers, ["h:4"]);
            Ok(())
        });
    }

    #[test]
    fn every_worker_flag_is_a_setting() {
        let Command::StartWorker(args) =
            parse(&["start-worker", "--localhost", "--port", "1", "--proof-type", "block"])
        else {
            panic!("start-worker");
        };
        Jail::expect_with(|_jail| {
            let settings = args.config_source().load().expect("every flag names a known key");
            assert!(settings.localhost);
            assert_eq!(settings.port, 1);
            assert_eq!(settings.prover_type, crate::ProofKind::Block);
            Ok(())
        });
    }
}
