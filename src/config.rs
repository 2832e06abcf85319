//! Configuration in two stages: layered raw values (built-in default < TOML file < `MPS_*`
//! environment < command-line flag, merged by figment), then validated settings.
//!
//! Validation looks at every key and reports every problem at once, each naming where the value
//! came from (the file path, the environment variable or the flag), the key and the reason, so an
//! operator fixes a broken file in one round. It runs before any port is bound.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ProofKind;

/// Where the worker reads its file when `--config` is not given.
pub const DEFAULT_WORKER_CONFIG: &str = "/etc/miden-prover/worker.toml";

/// Every problem found in one configuration load.
#[derive(Debug)]
pub struct ConfigError {
    /// One line per problem: "SOURCE: key `KEY`: REASON".
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str(")")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// WORKER
// ================================================================================================

/// The worker's built-in defaults; every key the worker file accepts is a field here.
#[derive(Serialize)]
struct WorkerDefaults {
    /// TCP port of the gRPC listener.
    port: u16,
    /// Bind 127.0.0.1 instead of 0.0.0.0.
    localhost: bool,
    /// The one proof type this worker proves.
    prover_type: &'static str,
    /// How long a stopping worker waits for the proof in flight.
    grace_period: &'static str,
    /// `tracing` filter directives; `RUST_LOG` overrides it.
    log_filter: &'static str,
    /// Address space of each prover process.
    prover_memory_limit: &'static str,
    /// Wall-clock limit of one proof.
    max_proof_time: &'static str,
    /// Largest `Prove` request.
    max_request_size: &'static str,
    /// Time for a request's body to arrive whole.
    request_timeout: &'static str,
    /// Time for a new connection's first byte.
    handshake_timeout: &'static str,
    /// Connections served at once.
    max_connections: usize,
    /// Bytes of finished proofs kept to answer identical requests.
    proof_cache_size: &'static str,
    /// How long a finished proof is kept.
    proof_cache_ttl: &'static str,
}

const WORKER_DEFAULTS: WorkerDefaults = WorkerDefaults {
    port: 50051,
    localhost: false,
    prover_type: "transaction",
    grace_period: "60s",
    // miden-prover logs its execution-trace size at info; one line per request is ours.
    log_filter: "info,miden_prover=warn",
    // A real transaction proof peaks at ≈ 1.4 GB resident and ≈ 2.5 GB of address space
    // (threads' stacks and malloc arenas count too); 8 GiB leaves room for larger ones while a
    // runaway input stops long before the machine's memory does.
    prover_memory_limit: "8GiB",
    // A transaction proof takes 4–23 s here, batches and blocks milliseconds. Below the proxy's
    // 100 s per attempt, so behind a proxy the client learns which limit it hit.
    max_proof_time: "90s",
    // A transaction is ≈ 109 KB, a batch of 2 ≈ 170 KB, a block of one such batch ≈ 60 KB; a
    // full block (hundreds of transactions) stays in the low megabytes.
    max_request_size: "16MiB",
    request_timeout: "30s",
    handshake_timeout: "10s",
    max_connections: 64,
    // The last few proofs: a transaction proof is ≈ 100 KB, a batch's and a block's smaller, so
    // 16 MiB holds well over a hundred, which is minutes of a worker's output.
    proof_cache_size: "16MiB",
    proof_cache_ttl: "5m",
};

/// The keys of the worker's file, in the order `worker.toml` lists them.
const WORKER_KEYS: &[&str] = &[
    "port",
    "localhost",
    "prover_type",
    "grace_period",
    "log_filter",
    "prover_memory_limit",
    "max_proof_time",
    "max_request_size",
    "request_timeout",
    "handshake_timeout",
    "max_connections",
    "proof_cache_size",
    "proof_cache_ttl",
];

/// Limits every prover process runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address-space limit in bytes (`RLIMIT_AS`).
    pub memory: u64,
    /// Wall-clock limit of one proof, from the moment the worker hands over the payload.
    pub max_proof_time: Duration,
}

/// The worker's transport limits (settings of the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Largest `Prove` request accepted, in bytes.
    pub max_request_size: usize,
    /// How long a request's body may take to arrive whole.
    pub request_timeout: Duration,
    /// How long a new connection may take to send its first byte.
    pub handshake_timeout: Duration,
    /// Connections served at once, and connections waiting for their first byte.
    pub max_connections: usize,
}

/// Validated worker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSettings {
    /// TCP port to listen on (0 picks a free one).
    pub port: u16,
    /// Listen on loopback only.
    pub localhost: bool,
    /// The proof type served; requests for another type get `UNIMPLEMENTED`.
    pub prover_type: ProofKind,
    /// On SIGTERM, how long the proof in flight may take to finish and reach its client.
    pub grace_period: Duration,
    /// Log filter directives (`RUST_LOG` syntax).
    pub log_filter: String,
    /// Limits of every prover process (changed live by a reload, for the next proof).
    pub limits: Limits,
    /// Transport bounds (take effect on restart).
    pub bounds: Bounds,
    /// Bytes of finished proofs kept to answer identical requests; zero keeps none (a request
    /// identical to the running proof still joins it). Live on reload.
    pub proof_cache_size: usize,
    /// How long a finished proof is kept; zero keeps none. Live on reload.
    pub proof_cache_ttl: Duration,
}

impl WorkerSettings {
    /// The socket address the gRPC listener binds.
    pub fn listen_addr(&self) -> SocketAddr {
        let ip = if self.localhost { Ipv4Addr::LOCALHOST } else { Ipv4Addr::UNSPECIFIED };
        SocketAddr::new(IpAddr::V4(ip), self.port)
    }
}

/// Settings as a reload sees them: which changes need a restart, and how the rest are taken.
pub trait Reloadable: Sized {
    /// The log filter (`RUST_LOG` syntax), swapped by the reload itself.
    fn log_filter(&mut self) -> &mut String;
    /// Names the settings that differ in `new` and only take effect after a restart.
    fn restart_only_changes(&self, new: &Self) -> Vec<&'static str>;
    /// Takes the settings that change live from `new`, keeping those that need a restart.
    fn apply_live(&mut self, new: Self);
}

impl Reloadable for WorkerSettings {
    fn log_filter(&mut self) -> &mut String {
        &mut self.log_filter
    }

    /// Names the settings that differ from `other` and only take effect after a restart.
    fn restart_only_changes(&self, other: &WorkerSettings) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.port != other.port {
            changed.push("port");
        }
        if self.localhost != other.localhost {
            changed.push("localhost");
        }
        if self.prover_type != other.prover_type {
            changed.push("prover_type");
        }
        let (a, b) = (&self.bounds, &other.bounds);
        for (name, differs) in [
            ("max_request_size", a.max_request_size != b.max_request_size),
            ("request_timeout", a.request_timeout != b.request_timeout),
            ("handshake_timeout", a.handshake_timeout != b.handshake_timeout),
            ("max_connections", a.max_connections != b.max_connections),
        ] {
            if differs {
                changed.push(name);
            }
        }
        changed
    }

    /// Takes the settings that change live from `new` (log filter, grace period, prover limits,
    /// proof cache), keeping those that need a restart.
    fn apply_live(&mut self, new: WorkerSettings) {
        *self = WorkerSettings {
            port: self.port,
            localhost: self.localhost,
            prover_type: self.prover_type,
            bounds: self.bounds,
            ..new
        };
    }
}

/// The proxy's bounds on what clients hold (settings of the same names; all live on reload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientBounds {
    /// Largest `Prove` request, in bytes.
    pub max_request_size: usize,
    /// How long a request's body may take to arrive whole.
    pub request_timeout: Duration,
    /// How long a new connection may take to show its protocol, and any HTTP/1 request its
    /// headers.
    pub handshake_timeout: Duration,
    /// How long an HTTP/2 connection with no request may stay open.
    pub idle_timeout: Duration,
    /// Connections open at once, all listeners together.
    pub max_connections: usize,
    /// Connections open at once from one client (an IPv4 address, an IPv6 prefix); trusted
    /// forwarders are exempt.
    pub max_connections_per_client: usize,
    /// Request bytes held at once, all clients together (bodies being received, queued or
    /// being proved).
    pub max_buffered: usize,
    /// Request bytes held at once for one client.
    pub max_buffered_per_client: usize,
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerFlags {
    /// `--port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `--localhost` (only ever `Some(true)`: the flag cannot turn it off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub localhost: Option<bool>,
    /// `--prover-type` / `--proof-type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prover_type: Option<String>,
}

/// Everything needed to (re)load the worker's configuration: reload reads the same sources again.
#[derive(Clone, Debug)]
pub struct WorkerConfigSource {
    /// The TOML file, and whether it was named explicitly (then it must exist).
    pub file: ConfigFile,
    /// Command-line values, the top layer.
    pub flags: WorkerFlags,
}

impl WorkerConfigSource {
    /// Loads and validates the layered configuration, reporting every problem at once.
    pub fn load(&self) -> Result<WorkerSettings, ConfigError> {
        let figment = layered(
            Serialized::defaults(WORKER_DEFAULTS),
            &self.file,
            Env::prefixed("MPS_WORKER_"),
            FlagProvider(&self.flags),
        );
        let mut check = Check::new(&figment, &self.file, "MPS_WORKER_")?;
        check.unknown_keys(WORKER_KEYS);
        let port = check.get::<u16>("port");
        let localhost = check.get::<bool>("localhost");
        let prover_type = check.parse("prover_type", |s: String| s.parse::<ProofKind>());
        let grace_period = check.duration("grace_period");
        let log_filter = check.log_filter("log_filter");
        // At least what a transaction proof needs, so a typo ("8MiB") is an error, not a worker
        // whose every proof fails.
        let memory = check.size("prover_memory_limit", 1 << 30, u64::MAX);
        let max_proof_time = check.positive_duration("max_proof_time");
        let max_request_size =
            check.size("max_request_size", 1 << 10, crate::proto::MAX_MESSAGE_SIZE as u64);
        let request_timeout = check.positive_duration("request_timeout");
        let handshake_timeout = check.positive_duration("handshake_timeout");
        let max_connections = check.positive::<usize>("max_connections");
        let proof_cache_size = check
            .size("proof_cache_size", 0, u64::MAX)
            .map(|size| usize::try_from(size).unwrap_or(usize::MAX));
        let proof_cache_ttl = check.duration("proof_cache_ttl");
        check.finish()?;
        let limits = Limits {
            memory: memory.unwrap_or_default(),
            max_proof_time: max_proof_time.unwrap_or_default(),
        };
        let bounds = Bounds {
            max_request_size: max_request_size
                .and_then(|size| usize::try_from(size).ok())
                .unwrap_or_default(),
            request_timeout: request_timeout.unwrap_or_default(),
            handshake_timeout: handshake_timeout.unwrap_or_default(),
            max_connections: max_connections.unwrap_or_default(),
        };
        match (port, localhost, prover_type, grace_period, log_filter) {
            (
                Some(port),
                Some(localhost),
                Some(prover_type),
                Some(grace_period),
                Some(log_filter),
            ) => Ok(WorkerSettings {
                port,
                localhost,
                prover_type,
                grace_period,
                log_filter,
                limits,
                bounds,
                proof_cache_size: proof_cache_size.unwrap_or_default(),
                proof_cache_ttl: proof_cache_ttl.unwrap_or_default(),
            }),
            _ => unreachable!("Check::finish fails when any key failed"),
        }
    }
}

// PROXY
// ================================================================================================

/// Where the proxy reads its file when `--config` is not given.
pub const DEFAULT_PROXY_CONFIG: &str = "/etc/miden-prover-proxy/proxy.toml";

/// Where the proxy's control socket lives unless `control_socket` says otherwise; systemd's
/// `RuntimeDirectory=miden-prover-proxy` makes its directory, mode 0700.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/miden-prover-proxy/control.sock";

/// Where the proxy keeps the workers added at run time unless `state_file` says otherwise;
/// systemd's `StateDirectory=miden-prover-proxy` makes its directory, mode 0700.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/miden-prover-proxy/workers";

/// The proxy's built-in defaults (upstream's where it had one); every key the file accepts.
#[derive(Serialize)]
struct ProxyDefaults {
    workers: Vec<String>,
    prover_type: &'static str,
    bind_address: &'static str,
    status_bind_address: &'static str,
    port: u16,
    status_port: u16,
    metrics_port: Option<u16>,
    public_worker_addresses: bool,
    max_workers: usize,
    timeout: &'static str,
    connection_timeout: &'static str,
    max_queue_items: usize,
    max_queue_wait: &'static str,
    max_retries_per_request: u32,
    poison_ttl: &'static str,
    proof_cache_size: &'static str,
    proof_cache_ttl: &'static str,
    max_req_per_sec: u32,
    rate_limit_ipv6_prefix: u8,
    trusted_forwarders: Vec<String>,
    proxy_protocol: bool,
    max_request_size: &'static str,
    request_timeout: &'static str,
    handshake_timeout: &'static str,
    idle_timeout: &'static str,
    max_connections: usize,
    max_connections_per_client: usize,
    max_buffered: &'static str,
    max_buffered_per_client: &'static str,
    health_check_interval: &'static str,
    health_check_timeout: &'static str,
    grace_period: &'static str,
    graceful_shutdown_timeout: &'static str,
    log_filter: &'static str,
    control_socket: &'static str,
    state_file: &'static str,
}

const PROXY_DEFAULTS: ProxyDefaults = ProxyDefaults {
    workers: Vec::new(),
    prover_type: "transaction",
    bind_address: "0.0.0.0",
    // "": the same as bind_address.
    status_bind_address: "",
    port: 8082,
    status_port: 8083,
    metrics_port: None,
    public_worker_addresses: true,
    // Each worker costs a connection, a health check per interval and a line in every status
    // answer; a cluster larger than this runs several proxies.
    max_workers: 256,
    timeout: "100s",
    connection_timeout: "10s",
    max_queue_items: 10,
    max_queue_wait: "100s",
    max_retries_per_request: 1,
    poison_ttl: "1h",
    // A few minutes of a busy proxy's proofs: a transaction proof is ≈ 84 KB, so 64 MiB holds
    // some 780 of them; a client that timed out asks again within seconds.
    proof_cache_size: "64MiB",
    proof_cache_ttl: "5m",
    max_req_per_sec: 5,
    rate_limit_ipv6_prefix: 64,
    trusted_forwarders: Vec::new(),
    proxy_protocol: false,
    // The worker's own defaults: a transaction is ≈ 109 KB, a full block a few megabytes.
    max_request_size: "16MiB",
    request_timeout: "30s",
    handshake_timeout: "10s",
    idle_timeout: "60s",
    // Below the units' LimitNOFILE=65536, with room for worker connections and the journal.
    max_connections: 16_384,
    max_connections_per_client: 64,
    max_buffered: "256MiB",
    max_buffered_per_client: "32MiB",
    health_check_interval: "10s",
    health_check_timeout: "2s",
    grace_period: "20s",
    graceful_shutdown_timeout: "5s",
    log_filter: "info",
    control_socket: DEFAULT_CONTROL_SOCKET,
    state_file: DEFAULT_STATE_FILE,
};

const PROXY_KEYS: &[&str] = &[
    "workers",
    "prover_type",
    "bind_address",
    "status_bind_address",
    "port",
    "status_port",
    "metrics_port",
    "public_worker_addresses",
    "max_workers",
    "timeout",
    "connection_timeout",
    "max_queue_items",
    "max_queue_wait",
    "max_retries_per_request",
    "poison_ttl",
    "proof_cache_size",
    "proof_cache_ttl",
    "max_req_per_sec",
    "rate_limit_ipv6_prefix",
    "trusted_forwarders",
    "proxy_protocol",
    "max_request_size",
    "request_timeout",
    "handshake_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_client",
    "max_buffered",
    "max_buffered_per_client",
    "health_check_interval",
    "health_check_timeout",
    "grace_period",
    "graceful_shutdown_timeout",
    "log_filter",
    "control_socket",
    "state_file",
];

/// Validated proxy settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// Workers from the configuration, `host:port` each.
    pub workers: Vec<String>,
    /// The proof type this proxy accepts; workers of another type are marked unhealthy.
    pub prover_type: ProofKind,
    /// Address every listener binds (0.0.0.0 by default; 127.0.0.1 keeps it local).
    pub bind_address: IpAddr,
    /// Address the status and metrics ports bind (`status_bind_address`; `bind_address` unless
    /// set).
    pub status_bind_address: IpAddr,
    /// gRPC (h2c) and gRPC-web port.
    pub port: u16,
    /// Port of the JSON `GET /status` endpoint.
    pub status_port: u16,
    /// Port of the Prometheus `GET /metrics` endpoint; `None` turns metrics off.
    pub metrics_port: Option<u16>,
    /// Whether the public `ProxyStatusApi/Status` answer (main port) names each worker's address;
    /// when false it lists them as `worker-1`, `worker-2`, … (the status port still names them).
    pub public_worker_addresses: bool,
    /// Most workers the proxy holds, configured and added at run time together.
    pub max_workers: usize,
    /// How long one attempt on a worker may take.
    pub timeout: Duration,
    /// How long connecting to a worker may take.
    pub connection_timeout: Duration,
    /// Requests that may wait for a worker at once; more get `RESOURCE_EXHAUSTED`.
    pub max_queue_items: usize,
    /// How long a request may wait in the queue for a healthy free worker.
    pub max_queue_wait: Duration,
    /// Further attempts on other workers after a worker failed, was busy or died.
    pub max_retries_per_request: u32,
    /// How long a request whose content (proof type and payload) took down two workers is
    /// refused at once; zero turns the refusal off (the per-request cap of one retry after a
    /// worker died stays).
    pub poison_ttl: Duration,
    /// Bytes of finished proofs kept to answer identical requests; zero keeps none (identical
    /// requests still share a running proof, and one nobody waits for any more is cancelled).
    pub proof_cache_size: usize,
    /// How long a finished proof is kept; zero keeps none.
    pub proof_cache_ttl: Duration,
    /// Requests per second one client IP may make; more get `RESOURCE_EXHAUSTED`.
    pub max_req_per_sec: u32,
    /// IPv6 clients are limited by this prefix of their address (64: one host's allocation).
    pub rate_limit_ipv6_prefix: u8,
    /// Load balancers whose `X-Forwarded-For` names the client (addresses or prefixes).
    pub trusted_forwarders: Vec<crate::proxy::limit::Network>,
    /// Connections from `trusted_forwarders` begin with a PROXY protocol header (v1 or v2)
    /// naming the client.
    pub proxy_protocol: bool,
    /// What clients may hold of the proxy: connections, buffered bodies, time.
    pub client_bounds: ClientBounds,
    /// How often every worker's health is checked.
    pub health_check_interval: Duration,
    /// How long one health check may take.
    pub health_check_timeout: Duration,
    /// On SIGTERM, how long queued and in-flight requests may take to finish.
    pub grace_period: Duration,
    /// After the grace period, how long connections get to close.
    pub graceful_shutdown_timeout: Duration,
    /// Log filter directives (`RUST_LOG` syntax).
    pub log_filter: String,
    /// The root-only Unix socket `minedctl` talks to; `None` (set to "") runs without one.
    pub control_socket: Option<PathBuf>,
    /// Where the workers added at run time are kept across restarts; `None` (set to "") forgets
    /// them at every stop.
    pub state_file: Option<PathBuf>,
}

impl Reloadable for ProxySettings {
    fn log_filter(&mut self) -> &mut String {
        &mut self.log_filter
    }

    fn restart_only_changes(&self, new: &ProxySettings) -> Vec<&'static str> {
        let mut changed = Vec::new();
        for (name, differs) in [
            ("bind_address", self.bind_address != new.bind_address),
            ("port", self.port != new.port),
            ("status_bind_address", self.status_bind_address != new.status_bind_address),
            ("status_port", self.status_port != new.status_port),
            ("metrics_port", self.metrics_port != new.metrics_port),
            ("prover_type", self.prover_type != new.prover_type),
            ("control_socket", self.control_socket != new.control_socket),
            ("state_file", self.state_file != new.state_file),
        ] {
            if differs {
                changed.push(name);
            }
        }
        changed
    }

    fn apply_live(&mut self, new: ProxySettings) {
        let kept = std::mem::replace(self, new);
        self.prover_type = kept.prover_type;
        self.bind_address = kept.bind_address;
        self.status_bind_address = kept.status_bind_address;
        self.port = kept.port;
        self.status_port = kept.status_port;
        self.metrics_port = kept.metrics_port;
        self.control_socket = kept.control_socket;
        self.state_file = kept.state_file;
    }
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyFlags {
    /// Positional worker addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
    /// `--prover-type` / `--proof-type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prover_type: Option<String>,
    /// `--bind-address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<String>,
    /// `--port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `--status-port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_port: Option<u16>,
    /// `--metrics-port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
}

/// Everything needed to (re)load the proxy's configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfigSource {
    /// The TOML file, and whether `--config` named it.
    pub file: ConfigFile,
    /// Command-line values, the top layer.
    pub flags: ProxyFlags,
}

impl ProxyConfigSource {
    /// Loads and validates the layered configuration, reporting every problem at once.
    pub fn load(&self) -> Result<ProxySettings, ConfigError> {
        // `MPS_WORKER_*` belong to a worker that may share the environment.
        let env = Env::prefixed("MPS_").filter(|key| !key.as_str().starts_with("worker_"));
        let figment = layered(
            Serialized::defaults(PROXY_DEFAULTS),
            &self.file,
            env,
            FlagProvider(&self.flags),
        );
        let mut check = Check::new(&figment, &self.file, "MPS_")?;
        check.unknown_keys(PROXY_KEYS);
        let workers = check.workers("workers");
        let prover_type = check.parse("prover_type", |s: String| s.parse::<ProofKind>());
        let bind_address = check.parse("bind_address", |s: String| {
            s.parse::<IpAddr>().map_err(|err| format!("`{s}` is not an IP address: {err}"))
        });
        let status_bind_address = check.parse("status_bind_address", |s: String| ip_or_empty(&s));
        let public_worker_addresses = check.get::<bool>("public_worker_addresses");
        let max_workers = proxy_max_workers(&mut check, workers.as_deref());
        let port = check.get::<u16>("port");
        let status_port = check.get::<u16>("status_port");
        let metrics_port = check.optional::<u16>("metrics_port");
        let timeout = check.duration("timeout");
        let connection_timeout = check.duration("connection_timeout");
        let max_queue_items = check.get::<usize>("max_queue_items");
        let max_queue_wait = check.duration("max_queue_wait");
        let max_retries_per_request = check.get::<u32>("max_retries_per_request");
        let poison_ttl = check.duration("poison_ttl");
        let proof_cache_size = check
            .size("proof_cache_size", 0, u64::MAX)
            .map(|size| usize::try_from(size).unwrap_or(usize::MAX));
        let proof_cache_ttl = check.duration("proof_cache_ttl");
        let max_req_per_sec = check.get::<u32>("max_req_per_sec");
        let rate_limit_ipv6_prefix = check.get::<u8>("rate_limit_ipv6_prefix").and_then(|p| {
            if (1..=128).contains(&p) {
                Some(p)
            } else {
                let origin = check.origin("rate_limit_ipv6_prefix");
                check.problems.push(format!("{origin}: must be 1 to 128, not {p}"));
                None
            }
        });
        let client_bounds = proxy_client_bounds(&mut check);
        let trusted_forwarders = check.get::<Vec<String>>("trusted_forwarders").and_then(|list| {
            let mut networks = Vec::new();
            for text in &list {
                match text.parse() {
                    Ok(network) => networks.push(network),
                    Err(err) => {
                        let origin = check.origin("trusted_forwarders");
                        check.problems.push(format!("{origin}: {err}"));
                    }
                }
            }
            (networks.len() == list.len()).then_some(networks)
        });
        let proxy_protocol = check.get::<bool>("proxy_protocol");
        let health_check_interval = check.duration("health_check_interval");
        let health_check_timeout = check.duration("health_check_timeout");
        let grace_period = check.duration("grace_period");
        let graceful_shutdown_timeout = check.duration("graceful_shutdown_timeout");
        let log_filter = check.log_filter("log_filter");
        let control_socket =
            check.parse("control_socket", |s: String| absolute_or_off(&s, "the socket"));
        let state_file = check.parse("state_file", |s: String| {
            absolute_or_off(&s, "keeping run-time workers across restarts")
        });
        check.finish()?;
        Ok(ProxySettings {
            workers: workers.unwrap_or_else(missing),
            prover_type: prover_type.unwrap_or_else(missing),
            bind_address: bind_address.unwrap_or_else(missing),
            status_bind_address: status_bind_address
                .unwrap_or_else(missing)
                .unwrap_or_else(|| bind_address.unwrap_or_else(missing)),
            port: port.unwrap_or_else(missing),
            status_port: status_port.unwrap_or_else(missing),
            metrics_port: metrics_port.unwrap_or_else(missing),
            public_worker_addresses: public_worker_addresses.unwrap_or_else(missing),
            max_workers: max_workers.unwrap_or_else(missing),
            timeout: timeout.unwrap_or_else(missing),
            connection_timeout: connection_timeout.unwrap_or_else(missing),
            max_queue_items: max_queue_items.unwrap_or_else(missing),
            max_queue_wait: max_queue_wait.unwrap_or_else(missing),
            max_retries_per_request: max_retries_per_request.unwrap_or_else(missing),
            poison_ttl: poison_ttl.unwrap_or_else(missing),
            proof_cache_size: proof_cache_size.unwrap_or_else(missing),
            proof_cache_ttl: proof_cache_ttl.unwrap_or_else(missing),
            max_req_per_sec: max_req_per_sec.unwrap_or_else(missing),
            rate_limit_ipv6_prefix: rate_limit_ipv6_prefix.unwrap_or_else(missing),
            trusted_forwarders: trusted_forwarders.unwrap_or_else(missing),
            proxy_protocol: proxy_protocol.unwrap_or_else(missing),
            client_bounds: client_bounds.unwrap_or_else(missing),
            health_check_interval: health_check_interval.unwrap_or_else(missing),
            health_check_timeout: health_check_timeout.unwrap_or_else(missing),
            grace_period: grace_period.unwrap_or_else(missing),
            graceful_shutdown_timeout: graceful_shutdown_timeout.unwrap_or_else(missing),
            log_filter: log_filter.unwrap_or_else(missing),
            control_socket: control_socket.unwrap_or_else(missing),
            state_file: state_file.unwrap_or_else(missing),
        })
    }
}

/// An IP address, or `None` for "" (`bind_address` then applies).
fn ip_or_empty(value: &str) -> Result<Option<IpAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse::<IpAddr>()
        .map(Some)
        .map_err(|err| format!("`{value}` is not an IP address (\"\": bind_address): {err}"))
}

/// `max_workers`, which the configured list may not exceed.
fn proxy_max_workers(check: &mut Check<'_>, workers: Option<&[String]>) -> Option<usize> {
    let max = check.positive::<usize>("max_workers")?;
    if let Some(workers) = workers
        && workers.len() > max
    {
        let origin = check.origin("workers");
        check.problems.push(format!(
            "{origin}: {} workers, more than max_workers ({max}); raise max_workers or split \
             the workers across proxies",
            workers.len()
        ));
    }
    Some(max)
}

/// An absolute path, or `None` for "": what `off` names is then turned off.
fn absolute_or_off(value: &str, off: &str) -> Result<Option<PathBuf>, String> {
    match value {
        "" => Ok(None),
        path if path.starts_with('/') => Ok(Some(PathBuf::from(path))),
        path => Err(format!("`{path}` is not an absolute path (\"\" turns {off} off)")),
    }
}

/// The proxy's [`ClientBounds`]; a budget below `max_request_size` could never admit a request.
fn proxy_client_bounds(check: &mut Check<'_>) -> Option<ClientBounds> {
    let most = crate::proto::MAX_MESSAGE_SIZE as u64;
    let max_request_size = check.size("max_request_size", 1 << 10, most);
    let request_timeout = check.positive_duration("request_timeout");
    let handshake_timeout = check.positive_duration("handshake_timeout");
    let idle_timeout = check.positive_duration("idle_timeout");
    let max_connections = check.positive::<usize>("max_connections");
    let max_connections_per_client = check.positive::<usize>("max_connections_per_client");
    let max_buffered = check.size("max_buffered", 1 << 10, u64::MAX);
    let max_buffered_per_client = check.size("max_buffered_per_client", 1 << 10, u64::MAX);
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let (max_request_size, max_buffered, max_buffered_per_client) =
        (max_request_size?, max_buffered?, max_buffered_per_client?);
    for (key, budget) in
        [("max_buffered", max_buffered), ("max_buffered_per_client", max_buffered_per_client)]
    {
        if budget < max_request_size {
            let origin = check.origin(key);
            check.problems.push(format!(
                "{origin}: {budget} bytes is less than max_request_size ({max_request_size} \
                 bytes): no request of that size could ever be admitted"
            ));
            return None;
        }
    }
    Some(ClientBounds {
        max_request_size: size(max_request_size),
        request_timeout: request_timeout?,
        handshake_timeout: handshake_timeout?,
        idle_timeout: idle_timeout?,
        max_connections: max_connections?,
        max_connections_per_client: max_connections_per_client?,
        max_buffered: size(max_buffered),
        max_buffered_per_client: size(max_buffered_per_client),
    })
}

/// Stands in for a value `Check::finish` guarantees to be present.
fn missing<T>() -> T {
    unreachable!("Check::finish fails when any key failed")
}

/// Checks a worker address: `host:port`, where host is a name or an IP (IPv6 in brackets).
pub fn check_worker_address(address: &str) -> Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not host:port (no port)"))?;
    port.parse::<u16>().map_err(|_| format!("`{address}`: `{port}` is not a port number"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err(format!("`{address}`: `{host}` is not a host name or IP address"));
    }
    Ok(())
}

// SHARED MACHINERY
// ================================================================================================

/// Parses "16MiB", "8GiB", "512KiB", "1024B" or "1024" (binary units; `K`, `M`, `G` alone mean
/// the same, since memory is counted in them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}`; write a size such as \"16MiB\" or \"8GiB\""
            ));
        }
    };
    let number: u64 =
        digits.parse().map_err(|_| format!("`{text}` is not a size such as \"16MiB\""))?;
    number.checked_mul(1 << shift).ok_or_else(|| format!("`{text}` is too large"))
}

/// A configuration file path and whether the operator named it (`--config`).
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// Path of the TOML file.
    pub path: PathBuf,
    /// Named on the command line: then a missing file is an error, not "use the defaults".
    pub explicit: bool,
}

impl ConfigFile {
    /// The file named by `--config`, or `default` (which may be absent).
    pub fn new(explicit: Option<PathBuf>, default: &str) -> Self {
        match explicit {
            Some(path) => ConfigFile { path, explicit: true },
            None => ConfigFile { path: PathBuf::from(default), explicit: false },
        }
    }
}

fn layered(
    defaults: impl Provider,
    file: &ConfigFile,
    env: impl Provider,
    flags: impl Provider,
) -> Figment {
    let mut figment = Figment::new().merge(defaults);
    // An absent default file means "built-in defaults"; an absent `--config` file was already
    // reported by `Check::new`.
    if file.path.exists() {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    figment.merge(env).merge(flags)
}

/// Serves command-line values to figment under the name "command-line flag", so problems name
/// the flag (`--prover-type`) rather than an anonymous code source.
struct FlagProvider<'a, T>(&'a T);

impl<T: Serialize> Provider for FlagProvider<'_, T> {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
            .interpolater(|_, keys| format!("--{}", keys.join(".").replace('_', "-")))
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Serialized::defaults(self.0).data()
    }
}

/// Collects problems key by key instead of stopping at the first one.
struct Check<'a> {
    figment: &'a Figment,
    env_prefix: &'static str,
    dict: Dict,
    problems: Vec<String>,
}

impl<'a> Check<'a> {
    fn new(
        figment: &'a Figment,
        file: &ConfigFile,
        env_prefix: &'static str,
    ) -> Result<Self, ConfigError> {
        if file.explicit && !file.path.exists() {
            return Err(ConfigError {
                problems: vec![format!(
                    "{}: the configuration file does not exist (named by --config)",
                    file.path.display()
                )],
            });
        }
        // A file that does not parse as TOML (or an unreadable one) hides every key in it.
        let mut data = figment.data().map_err(|err| ConfigError {
            problems: err.into_iter().map(|e| describe_figment_error(&e, &file.path)).collect(),
        })?;
        let dict = data.remove(&Profile::Default).unwrap_or_default();
        Ok(Check { figment, env_prefix, dict, problems: Vec::new() })
    }

    fn origin(&self, key: &str) -> String {
        origin(self.figment.find_metadata(key), key, self.env_prefix)
    }

    fn unknown_keys(&mut self, known: &[&str]) {
        let unknown: Vec<String> =
            self.dict.keys().filter(|key| !known.contains(&key.as_str())).cloned().collect();
        for key in unknown {
            let origin = self.origin(&key);
            self.problems
                .push(format!("{origin}: unknown key; known keys are {}", known.join(", ")));
        }
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        match self.figment.extract_inner::<T>(key) {
            Ok(value) => Some(value),
            Err(err) => {
                let origin = self.origin(key);
                self.problems.push(format!("{origin}: {}", err.kind));
                None
            }
        }
    }

    fn parse<T, E: fmt::Display>(
        &mut self,
        key: &str,
        parse: impl FnOnce(String) -> Result<T, E>,
    ) -> Option<T> {
        let raw = self.get::<String>(key)?;
        match parse(raw) {
            Ok(value) => Some(value),
            Err(err) => {
                let origin = self.origin(key);
                self.problems.push(format!("{origin}: {err}"));
                None
            }
        }
    }

    /// A humantime duration such as "100s" or "20ms".
    fn duration(&mut self, key: &str) -> Option<Duration> {
        self.parse(key, |s: String| {
            humantime::parse_duration(&s)
                .map_err(|err| format!("`{s}` is not a duration like \"100s\" or \"20ms\": {err}"))
        })
    }

    /// A duration above zero.
    fn positive_duration(&mut self, key: &str) -> Option<Duration> {
        let value = self.duration(key)?;
        if value.is_zero() {
            let origin = self.origin(key);
            self.problems.push(format!("{origin}: must be longer than 0s"));
            return None;
        }
        Some(value)
    }

    /// A whole number above zero.
    fn positive<T: DeserializeOwned + Default + PartialEq>(&mut self, key: &str) -> Option<T> {
        let value = self.get::<T>(key)?;
        if value == T::default() {
            let origin = self.origin(key);
            self.problems.push(format!("{origin}: must be at least 1"));
            return None;
        }
        Some(value)
    }

    /// A size in bytes, written "16MiB", "8GiB", "512KiB" or as a plain number of bytes, from
    /// `min` to `max`.
    fn size(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        let raw = match self.get::<figment::value::Value>(key)? {
            figment::value::Value::Num(_, num) => num.to_u128_lossy().map(|n| n.to_string()),
            value => value.into_string(),
        };
        let origin = self.origin(key);
        let parsed = raw.as_deref().map_or_else(
            || Err("expected a size such as \"16MiB\" or a number of bytes".to_owned()),
            parse_size,
        );
        match parsed {
            Ok(size) if (min..=max).contains(&size) => Some(size),
            Ok(size) => {
                self.problems.push(format!(
                    "{origin}: {size} bytes is outside the accepted range, {min} to {max} bytes"
                ));
                None
            }
            Err(err) => {
                self.problems.push(format!("{origin}: {err}"));
                None
            }
        }
    }

    /// A key whose default is "unset": `None` when the key failed, `Some(None)` when unset.
    #[allow(clippy::option_option)]
    fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<Option<T>> {
        // The default serialises as an empty value, which an `Option` reads as `None`.
        if self.figment.contains(key) { self.get::<Option<T>>(key) } else { Some(None) }
    }

    /// A list of worker addresses; each is checked, and every bad one reported.
    fn workers(&mut self, key: &str) -> Option<Vec<String>> {
        let list = self.get::<Vec<String>>(key)?;
        let mut ok = true;
        for address in &list {
            if let Err(err) = check_worker_address(address) {
                let origin = self.origin(key);
                self.problems.push(format!("{origin}: {err}"));
                ok = false;
            }
        }
        ok.then_some(list)
    }

    /// A `tracing` filter; `RUST_LOG`, when set, takes the place of the configured value.
    fn log_filter(&mut self, key: &str) -> Option<String> {
        if let Ok(rust_log) = std::env::var("RUST_LOG") {
            return match crate::telemetry::check_filter(&rust_log) {
                Ok(()) => Some(rust_log),
                Err(err) => {
                    self.problems.push(format!("environment variable RUST_LOG: {err}"));
                    None
                }
            };
        }
        self.parse(key, |s: String| crate::telemetry::check_filter(&s).map(|()| s))
    }

    fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() { Ok(()) } else { Err(ConfigError { problems: self.problems }) }
    }
}

/// "PATH: key `KEY`", "environment variable `MPS_WORKER_PORT`", "command-line flag `--port`".
fn origin(metadata: Option<&Metadata>, key: &str, env_prefix: &str) -> String {
    let Some(metadata) = metadata else {
        return format!("key `{key}`");
    };
    match &metadata.source {
        Some(Source::File(path)) => format!("{}: key `{key}`", path.display()),
        _ if metadata.name.contains("environment") => {
            format!("environment variable {env_prefix}{}", key.to_uppercase())
        }
        _ if metadata.name == "command-line flag" => {
            let name = metadata.interpolate(&Profile::Default, &[key]);
            format!("command-line flag {name}")
        }
        _ => format!("{}: key `{key}`", metadata.name),
    }
}

fn describe_figment_error(err: &figment::Error, path: &Path) -> String {
    match err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
        Some(Source::File(file)) => format!("{}: {}", file.display(), err.kind),
        _ => format!("{}: {}", path.display(), err.kind),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use figment::Jail;

    use super::*;

    fn source(flags: WorkerFlags) -> WorkerConfigSource {
        WorkerConfigSource {
            file: ConfigFile { path: PathBuf::from("worker.toml"), explicit: false },
            flags,
        }
    }

    #[test]
    fn defaults_apply_without_file_env_or_flags() {
        Jail::expect_with(|_jail| {
            let settings = source(WorkerFlags::default()).load().expect("defaults are valid");
            assert_eq!(settings.port, 50051);
            assert!(!settings.localhost);
            assert_eq!(settings.prover_type, ProofKind::Transaction);
            assert_eq!(settings.grace_period, Duration::from_secs(60));
            assert_eq!(settings.log_filter, "info,miden_prover=warn");
            Ok(())
        });
    }

    #[test]
    fn file_overrides_default_env_overrides_file_flag_overrides_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "worker.toml",
                "port = 1000\nprover_type = \"batch\"\ngrace_period = \"5s\"\nlocalhost = true\n",
            )?;
            let settings = source(WorkerFlags::default()).load().expect("valid");
            assert_eq!(settings.port, 1000, "file beats default");
            assert_eq!(settings.prover_type, ProofKind::Batch, "file beats default");
            assert_eq!(settings.grace_period, Duration::from_secs(5));
            assert!(settings.localhost);

            jail.set_env("MPS_WORKER_PORT", "2000");
            jail.set_env("MPS_WORKER_PROVER_TYPE", "block");
            let settings = source(WorkerFlags::default()).load().expect("valid");
            assert_eq!(settings.port, 2000, "environment beats file");
            assert_eq!(settings.prover_type, ProofKind::Block, "environment beats file");
            assert_eq!(settings.grace_period, Duration::from_secs(5), "file still applies");

            let flags = WorkerFlags {
                port: Some(3000),
                prover_type: Some("Transaction".into()),
                ..WorkerFlags::default()
            };
            let settings = source(flags).load().expect("valid");
            assert_eq!(settings.port, 3000, "flag beats environment");
            assert_eq!(settings.prover_type, ProofKind::Transaction, "flag beats environment");
            Ok(())
        });
    }

    #[test]
    fn rust_log_overrides_the_configured_filter() {
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", "log_filter = \"warn\"\n")?;
            assert_eq!(source(WorkerFlags::default()).load().expect("valid").log_filter, "warn");
            jail.set_env("RUST_LOG", "debug");
            assert_eq!(source(WorkerFlags::default()).load().expect("valid").log_filter, "debug");
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_with_its_origin() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "worker.toml",
                "port = \"fifty\"\nprover_typ = \"batch\"\ngrace_period = \"soon\"\n",
            )?;
            jail.set_env("MPS_WORKER_PROVER_TYPE", "blok");
            let err = source(WorkerFlags::default()).load().expect_err("four problems");
            let text = err.to_string();
            assert_eq!(err.problems.len(), 4, "{text}");
            assert!(text.contains("worker.toml: key `port`"), "{text}");
            assert!(text.contains("worker.toml: key `prover_typ`: unknown key"), "{text}");
            assert!(text.contains("worker.toml: key `grace_period`"), "{text}");
            assert!(text.contains("environment variable MPS_WORKER_PROVER_TYPE"), "{text}");
            assert!(text.contains("unknown proof type `blok`"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_flag_value_is_named_as_a_flag() {
        Jail::expect_with(|_jail| {
            let flags = WorkerFlags { prover_type: Some("tx".into()), ..WorkerFlags::default() };
            let err = source(flags).load().expect_err("bad flag");
            assert!(err.to_string().contains("command-line flag --prover-type"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn broken_toml_and_missing_explicit_file_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", "port = [\n")?;
            let err = source(WorkerFlags::default()).load().expect_err("syntax error");
            assert!(err.to_string().contains("worker.toml"), "{err}");

            let missing = WorkerConfigSource {
                file: ConfigFile { path: PathBuf::from("nope.toml"), explicit: true },
                flags: WorkerFlags::default(),
            };
            let err = missing.load().expect_err("missing explicit file");
            assert!(err.to_string().contains("nope.toml: the configuration file does not exist"));
            Ok(())
        });
    }

    fn proxy_source() -> ProxyConfigSource {
        ProxyConfigSource {
            file: ConfigFile { path: PathBuf::from("proxy.toml"), explicit: false },
            flags: ProxyFlags::default(),
        }
    }

    #[test]
    fn the_control_socket_defaults_to_run_is_absolute_and_can_be_turned_off() {
        Jail::expect_with(|jail| {
            let settings = proxy_source().load().expect("defaults are valid");
            assert_eq!(
                settings.control_socket.as_deref(),
                Some(Path::new("/run/miden-prover-proxy/control.sock"))
            );
            jail.set_env("MPS_CONTROL_SOCKET", "");
            assert_eq!(proxy_source().load().expect("valid").control_socket, None);
            jail.set_env("MPS_CONTROL_SOCKET", "control.sock");
            let err = proxy_source().load().expect_err("relative");
            assert!(
                err.to_string().contains(
                    "environment variable MPS_CONTROL_SOCKET: `control.sock` is not an absolute path"
                ),
                "{err}"
            );
            jail.set_env("MPS_CONTROL_SOCKET", "/tmp/x/control.sock");
            jail.set_env("MPS_WORKERS", "[\"10.0.0.7:50051\", \"prover.internal:50052\"]");
            let settings = proxy_source().load().expect("valid");
            assert_eq!(settings.control_socket.as_deref(), Some(Path::new("/tmp/x/control.sock")));
            assert_eq!(settings.workers, ["10.0.0.7:50051", "prover.internal:50052"]);
            Ok(())
        });
    }

    #[test]
    fn status_ports_bind_apart_and_max_workers_bounds_the_configured_list() {
        Jail::expect_with(|jail| {
            let settings = proxy_source().load().expect("defaults are valid");
            assert_eq!(settings.status_bind_address, settings.bind_address);
            assert_eq!(settings.max_workers, 256);
            assert!(settings.public_worker_addresses);
            jail.set_env("MPS_BIND_ADDRESS", "127.0.0.2");
            let settings = proxy_source().load().expect("valid");
            assert_eq!(settings.status_bind_address, "127.0.0.2".parse::<IpAddr>().expect("ip"));
            jail.create_file(
                "proxy.toml",
                "status_bind_address = \"::1\"\nmax_workers = 2\n\
                 workers = [\"10.0.0.1:1\", \"10.0.0.2:1\", \"10.0.0.3:1\"]\n",
            )?;
            let err = proxy_source().load().expect_err("three workers");
            assert!(
                err.to_string().contains(
                    "3 workers, more than max_workers (2); raise max_workers or split the \
                     workers across proxies"
                ),
                "{err}"
            );
            jail.set_env("MPS_MAX_WORKERS", "3");
            let settings = proxy_source().load().expect("valid");
            assert_eq!(settings.status_bind_address, "::1".parse::<IpAddr>().expect("ip"));
            assert_eq!(settings.bind_address, "127.0.0.2".parse::<IpAddr>().expect("ip"));
            jail.set_env("MPS_STATUS_BIND_ADDRESS", "localhost");
            let err = proxy_source().load().expect_err("a name");
            assert!(err.to_string().contains("`localhost` is not an IP address"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_shipped_proxy_file_is_valid_shows_every_key_and_keeps_status_local() {
        let shipped = include_str!("../etc/proxy.toml");
        for key in PROXY_KEYS {
            assert!(
                shipped
                    .lines()
                    .any(|line| line.trim_start_matches('#').starts_with(&format!("{key} = "))),
                "etc/proxy.toml does not show `{key}`"
            );
        }
        Jail::expect_with(|jail| {
            jail.create_file("proxy.toml", shipped)?;
            let settings = proxy_source().load().expect("the shipped file is valid");
            assert!(settings.status_bind_address.is_loopback(), "status and metrics stay local");
            assert!(settings.bind_address.is_unspecified(), "the gRPC port stays public");
            Ok(())
        });
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("8GB").expect_err("unit").contains("unknown unit `GB`"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999T").expect_err("overflow").contains("too large"));
    }

    #[test]
    fn hostile_input_bounds_have_defaults_and_are_checked() {
        Jail::expect_with(|jail| {
            let settings = source(WorkerFlags::default()).load().expect("defaults are valid");
            assert_eq!(settings.limits.memory, 8 << 30);
            assert_eq!(settings.limits.max_proof_time, Duration::from_secs(90));
            assert_eq!(settings.bounds.max_request_size, 16 << 20);
            assert_eq!(settings.bounds.request_timeout, Duration::from_secs(30));
            assert_eq!(settings.bounds.handshake_timeout, Duration::from_secs(10));
            assert_eq!(settings.bounds.max_connections, 64);
            assert_eq!(settings.proof_cache_size, 16 << 20);
            assert_eq!(settings.proof_cache_ttl, Duration::from_secs(300));
            jail.create_file(
                "worker.toml",
                "prover_memory_limit = \"8MiB\"\nmax_proof_time = \"0s\"\n\
                 max_request_size = \"1GiB\"\nmax_connections = 0\n\
                 proof_cache_size = \"lots\"\n",
            )?;
            let err = source(WorkerFlags::default()).load().expect_err("five problems");
            let text = err.to_string();
            assert!(text.contains("5 problems"), "{text}");
            assert!(text.contains("key `proof_cache_size`"), "{text}");
            assert!(text.contains("key `prover_memory_limit`: 8388608 bytes is outside"), "{text}");
            assert!(text.contains("key `max_proof_time`: must be longer than 0s"), "{text}");
            assert!(text.contains("key `max_request_size`"), "{text}");
            assert!(text.contains("key `max_connections`: must be at least 1"), "{text}");
            jail.create_file("worker.toml", "max_request_size = 65536\nproof_cache_size = 0\n")?;
            jail.set_env("MPS_WORKER_PROVER_MEMORY_LIMIT", "3GiB");
            let settings = source(WorkerFlags::default()).load().expect("valid");
            assert_eq!(settings.proof_cache_size, 0, "0 turns the cache off");
            assert_eq!(settings.bounds.max_request_size, 65536);
            assert_eq!(settings.limits.memory, 3 << 30);
            Ok(())
        });
    }

    #[test]
    fn the_shipped_worker_file_is_valid_and_shows_every_key() {
        let shipped = include_str!("../etc/worker.toml");
        for key in WORKER_KEYS {
            assert!(
                shipped
                    .lines()
                    .any(|line| line.trim_start_matches('#').starts_with(&format!("{key} = "))),
                "etc/worker.toml does not show `{key}`"
            );
        }
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", shipped)?;
            let settings =
                source(WorkerFlags::default()).load().expect("the shipped file is valid");
            assert!(settings.localhost, "the packaged worker listens on loopback");
            Ok(())
        });
    }
}
